"""``mass merge``: a pretrained CLIP directory or hub id and fine-tuned checkpoints to a saved MASS model."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from mass.files.checkpoints import CheckpointError, require_regular_file
from mass.tools.cli.args import check_out, parse_pairs, parse_rank
from mass.tools.cli.errors import UserError


def load_pretrained_hf(path: str):
    """An HF CLIP vision encoder (with the projection where the directory has one) from a local directory
    (config.json + weights), offline."""
    p = Path(path)
    if not p.is_dir() or not os.path.lexists(p / "config.json"):
        raise UserError(f"--pretrained must be a HF model directory with config.json: {path}")
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    weights = [p / n for n in names if os.path.lexists(p / n)]
    if not weights:
        raise UserError(f"--pretrained {path} has no weights (model.safetensors or pytorch_model.bin)")
    for file in [p / "config.json", *weights]:
        require_regular_file(file, "--pretrained")
    from mass.nn.clip import load_vision  # a CLIPModel directory keeps its visual projection

    try:
        return load_vision(str(p), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, safetensors errors... for broken files
        raise UserError(f"--pretrained {path}: cannot load the model ({type(exc).__name__}: {exc})") from exc


def load_finetuned(name: str, path: str, target_keys: list[str], allow_pickle: bool):
    """A fine-tuned checkpoint as a state dict with the pretrained model's key names."""
    import torch

    from mass.files.checkpoints import open_checkpoint
    from mass.files.openclip import is_openclip_state_dict, openclip_to_hf

    p = Path(path)
    if allow_pickle and p.suffix in (".pt", ".pth", ".bin"):
        require_regular_file(p, f"checkpoint {name!r}")
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {name!r}: cannot load {p} ({type(exc).__name__}: {exc})") from exc
        sd = obj.state_dict() if hasattr(obj, "state_dict") else obj
    else:
        src = open_checkpoint(name, p)
        keys = src.keys()
        if not is_openclip_state_dict(keys):
            return p  # read lazily, key prefixes matched during decomposition
        sd = {k: src.get(k) for k in keys}
    if is_openclip_state_dict(sd.keys()):
        sd = openclip_to_hf(sd, target_keys, name)
    return sd


def preprocess_of_pretrained(source: str, pretrained):
    """The image preprocessing of the pretrained model ``source`` (its ``preprocessor_config.json``, else CLIP's
    at the encoder's image size)."""
    from mass.evaluation.data import ClipPreprocess

    return ClipPreprocess.from_pretrained(source, image_size=pretrained.config.image_size)


def read_support(args, make_preprocess):
    """``--support TASK=DIR ...`` as ``{task: images}`` (None without the flag), each folder read through the
    preprocessing ``make_preprocess()`` builds (only when there are folders to read)."""
    if not args.support:
        return None
    from mass.method.support import DEFAULT_IMAGES, read_support_dir

    preprocess = make_preprocess()
    try:
        return {t: read_support_dir(d, preprocess, limit=args.support_images or DEFAULT_IMAGES)
                for t, d in parse_pairs(args.support, "--support").items()}
    except ValueError as exc:
        raise UserError(str(exc)) from None


ROUTER_PRESETS = ("paper", "recommended", "few-example", "fast")


def router_from_args(args):
    """The ``RouterConfig`` of ``mass merge``: the ``--router`` preset (the paper's router, ``recommended()``
    ``few_example()`` or ``fast()``), with every routing flag given on the command line overriding it."""
    from mass.method.router import RouterConfig

    base = {"paper": RouterConfig, "recommended": RouterConfig.recommended,
            "few-example": RouterConfig.few_example, "fast": RouterConfig.fast}[args.router]
    flags = {"layer": args.layer, "mode": args.mode, "token": args.token, "features": args.features,
             "basis": args.basis, "whiten": args.whiten, "centre": args.centre}
    return base(**{k: v for k, v in flags.items() if v is not None}, unknown=args.unknown,
                unknown_threshold=args.unknown_threshold)


def run(args) -> int:
    from mass.files.hub import is_hub_id
    from mass.nn.clip import load_vision
    from mass.nn.merge import merge

    if args.from_dir is not None:
        return run_update(args)
    if args.add or args.remove:
        raise UserError("--add and --remove change a saved model: give it with --from DIR")
    if not args.finetuned:
        raise UserError("give --finetuned NAME=PATH ... (or --from DIR to change a saved model)")
    if args.pretrained is None:
        raise UserError("give --pretrained DIR_OR_ID: the model the checkpoints were fine-tuned from")
    finetuned = parse_pairs(args.finetuned)
    rank = parse_rank(args.rank)
    try:
        router = router_from_args(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.support:
        parse_pairs(args.support, "--support")  # a malformed list is refused before the model is loaded
    for name, path in finetuned.items():
        if not os.path.lexists(path) and not is_hub_id(path):
            raise UserError(f"checkpoint {name!r}: no such file {path}")
    check_out(args.out)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    pretrained = load_vision(args.pretrained) if is_hub_id(args.pretrained) else load_pretrained_hf(args.pretrained)
    if args.allow_pickle:
        keys = list(pretrained.state_dict().keys())
        finetuned = {n: load_finetuned(n, p, keys, True) for n, p in finetuned.items()}
    support = read_support(args, lambda: preprocess_of_pretrained(args.pretrained, pretrained))
    keep_merged = "all" if args.unknown == "merged" else "prefix"
    try:
        model = merge(pretrained, finetuned, rank=rank, router=router, progress=not args.quiet, support=support,
                      keep_merged=keep_merged, solver=args.solver, device=args.device, bank_dtype=args.bank_dtype)
    except ValueError as exc:
        if support is None and (router.basis == "support" or args.unknown != "off"):
            raise UserError(f"{exc} (give --support TASK=DIR ...)") from None
        raise
    if not is_hub_id(args.pretrained) and (Path(args.pretrained) / "preprocessor_config.json").is_file():
        from mass.evaluation.data import ClipPreprocess  # saved with the model, for `mass serve`

        model.preprocessing = ClipPreprocess.from_pretrained(args.pretrained)
    model.save_pretrained(args.out)
    print(f"saved MASS model with {len(model.tasks)} tasks to {args.out} "
          f"(storage {model.storage_factor():.3f}x the pretrained model)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    merge = subparsers.add_parser("merge", help="build a MASS model from a pretrained and fine-tuned checkpoints")
    merge.add_argument("--pretrained", default=None,
                       help="HF CLIP (vision) model directory or hub id (with --from: only for a saved model that "
                            "is not self-contained)")
    merge.add_argument("--finetuned", nargs="+", metavar="NAME=PATH", default=None,
                       help="fine-tuned checkpoints: HF directories, .safetensors, .pt state dicts, or PEFT LoRA "
                            "adapter directories")
    merge.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                       help="change a saved MASS model instead of merging: --add / --remove tasks, --bank-dtype "
                            "(a directory saved before the encoder's config was saved needs --pretrained, whose "
                            "weights must be the saved θ0)")
    merge.add_argument("--add", nargs="+", metavar="NAME=PATH", default=[],
                       help="with --from: tasks to add (only their deltas are decomposed)")
    merge.add_argument("--remove", nargs="+", metavar="NAME", default=[], help="with --from: tasks to remove")
    merge.add_argument("--bank-dtype", default=None, choices=["bfloat16", "float16"],
                       help="store and apply the task factors in half precision (θ0 keeps its dtype)")
    merge.add_argument("--rank", default=None, help="k per matrix: int, or fraction of min(out, in); "
                                                     "default floor(min(out, in) / T)")
    merge.add_argument("--layer", type=int, default=None, help="routing block (default: 3/4 depth)")
    merge.add_argument("--router", default="paper", choices=ROUTER_PRESETS,
                       help="router preset: the paper's (data-free, topk), RouterConfig.recommended() (data-free, "
                            "pretrained features, top-1), RouterConfig.few_example() or RouterConfig.fast() (the early "
                            "few-example router: a shorter first pass; both need --support); the "
                            "routing flags below override it")
    merge.add_argument("--mode", default=None, choices=["top1", "topk", "weighted"], help="default: the preset's")
    merge.add_argument("--token", default=None, choices=["cls", "mean", "patch_mean"], help="default: the preset's")
    merge.add_argument("--features", default=None, choices=["merged", "pretrained"],
                       help="routing features: the TSV-M model (paper) or θ0 (recommended by docs/router_study.md)")
    merge.add_argument("--solver", default="auto", choices=["auto", "full", "randomized"],
                       help="SVD solver: exact, randomized range finder, or auto (randomized for large matrices)")
    merge.add_argument("--device", default=None, help="where the SVDs run, e.g. cuda (default: cpu)")
    merge.add_argument("--basis", default=None, choices=["fc1", "support"],
                       help="routing basis: the fc1 deltas (data-free, paper) or the --support images' subspaces")
    merge.add_argument("--whiten", type=float, default=None,
                       help="support basis only: whiten features by the support images' covariance mixed with a "
                            "scaled identity (weight in [0, 1); few-example preset: 0.2)")
    merge.add_argument("--centre", default=None, action=argparse.BooleanOptionalAction,
                       help="support basis only: affine subspaces around each task's support mean")
    merge.add_argument("--support", nargs="+", metavar="TASK=DIR", default=None,
                       help="a few unlabelled images of each task (a folder per task, 32 recommended): fits the "
                            "support-set router and the unknown-task detector")
    merge.add_argument("--support-images", type=int, default=None,
                       help="images read per support folder (default 32, the first in sorted path order)")
    merge.add_argument("--unknown", default="off", choices=["off", "merged", "pretrained", "error"],
                       help="samples that match no task: merged / pretrained model output, or an error")
    merge.add_argument("--unknown-threshold", type=float, default=1.0,
                       help="flag a sample whose residual exceeds this many times its task's calibrated scale")
    merge.add_argument("--out", required=True, help="output directory")
    merge.add_argument("--allow-pickle", action="store_true", help="accept pickled modules in .pt files")
    merge.add_argument("--quiet", action="store_true")
    merge.set_defaults(func=run)
    return merge


def run_update(args) -> int:
    """``mass merge --from DIR [--remove NAME ...] [--add NAME=PATH ...] [--bank-dtype D] --out DIR2``: the
    saved model with tasks removed, then added (``MASSModel.remove_tasks`` / ``add_tasks``), or its banks
    rounded; the saved router is kept."""
    import torch

    from mass.files.hub import is_hub_id
    from mass.nn.clip import load_vision
    from mass.nn.model import MASSModel
    from mass.storage.saved_format import SavedModelError
    from mass.storage.serialization import read_saved
    from mass.evaluation.data import ClipPreprocess

    if args.finetuned or args.rank is not None:
        raise UserError("--from changes a saved model: use --add NAME=PATH (not --finetuned); its ranks follow the "
                        "saved model's (no --rank)")
    if not (args.add or args.remove or args.bank_dtype):
        raise UserError("--from DIR needs --add, --remove or --bank-dtype")
    added = parse_pairs(args.add, "--add") if args.add else {}
    for name, path in added.items():
        if not os.path.lexists(path) and not is_hub_id(path):
            raise UserError(f"checkpoint {name!r}: no such file {path}")
    check_out(args.out)
    try:
        _, dec, heads = read_saved(args.from_dir)
    except SavedModelError as exc:
        raise UserError(f"--from {args.from_dir}: {exc}") from None
    if heads is not None and added:
        raise UserError("the saved model has classification heads: adding tasks needs their heads, which the "
                        "command line cannot make yet (use MASSModel.add_tasks(..., heads=...) in Python)")
    if args.pretrained is None:  # a self-contained directory: the encoder is built from its saved config
        try:
            model = MASSModel.from_pretrained(args.from_dir)
        except ValueError as exc:
            raise UserError(f"--from {args.from_dir}: {exc}; give --pretrained DIR_OR_ID (the encoder it was "
                            f"merged from)") from None
        make_preprocess = lambda: ClipPreprocess.from_spec(model.preprocessing)  # noqa: E731
    else:
        pretrained = (load_vision(args.pretrained) if is_hub_id(args.pretrained)
                      else load_pretrained_hf(args.pretrained))
        weights = pretrained.state_dict()
        differ = [k for k, v in dec.base.items() if k not in weights or not torch.equal(weights[k], v)]
        if differ or set(weights) != set(dec.base):
            raise UserError(f"--pretrained {args.pretrained} is not the encoder the saved model was merged from "
                            f"(its weights differ from the saved θ0, e.g. "
                            f"{(differ or sorted(set(weights) ^ set(dec.base)))[0]!r})")
        model = MASSModel.from_pretrained(args.from_dir, pretrained)
        make_preprocess = lambda: preprocess_of_pretrained(args.pretrained, pretrained)  # noqa: E731
    support = read_support(args, make_preprocess)
    if args.bank_dtype:
        model = model.with_bank_dtype(args.bank_dtype)
    if args.remove:
        remaining = [t for t in model.tasks if t not in args.remove]
        model = model.remove_tasks(args.remove, support=None if support is None else
                                   {t: support[t] for t in remaining if t in support})
    if added:
        model = model.add_tasks(added, support=support, solver=args.solver, device=args.device,
                                progress=not args.quiet)
    model.save_pretrained(args.out)
    print(f"saved MASS model with {len(model.tasks)} tasks to {args.out} "
          f"(storage {model.storage_factor():.3f}x the pretrained model)")
    return 0
