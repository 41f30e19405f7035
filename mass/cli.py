"""The ``mass`` command line: ``demo``, ``merge``, ``inspect``, ``bench``.

User mistakes, bad arguments and file-system errors (a missing, unreadable or unwritable path) end with
exactly one ``mass: error: ...`` line on stderr and exit code 2, never a traceback (``MASS_DEBUG=1``
re-raises, for bug reports). ``main`` returns the exit code; it does not call ``sys.exit``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .checkpoints import CheckpointError, require_regular_file
from .serialization import SavedModelError

USER_ERRORS = (CheckpointError, SavedModelError, ValueError, OSError, TypeError, NotImplementedError)


class UserError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one error line (``mass: error: ...``) after the usage."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"mass: error: {_one_line(message)}", file=sys.stderr)
        raise SystemExit(2)


def _one_line(message) -> str:
    return " ".join(str(message).split())


def _parse_rank(text: str | None):
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--rank must be an int or a fraction, got {text!r}") from None


def _parse_finetuned(items: list[str], flag: str = "--finetuned") -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{flag} takes NAME=PATH, got {item!r}")
        if name in out:
            raise UserError(f"task {name!r} given twice")
        out[name] = path
    return out


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
    from .clip import load_vision  # a CLIPModel directory keeps its visual projection

    try:
        return load_vision(str(p), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, safetensors errors... for broken files
        raise UserError(f"--pretrained {path}: cannot load the model ({type(exc).__name__}: {exc})") from exc


def _check_out(path: str) -> None:
    """Fail before the merge, not after it, when ``--out`` cannot become a directory we can write."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {path} exists and is not a directory")
    existing = next(a for a in [p, *p.parents] if a.exists())
    if not existing.is_dir():
        raise UserError(f"--out {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {path}: {existing} is not writable")


def _load_finetuned(name: str, path: str, target_keys: list[str], allow_pickle: bool):
    """A fine-tuned checkpoint as a state dict with the pretrained model's key names."""
    import torch

    from .checkpoints import open_checkpoint
    from .convert import is_openclip_state_dict, openclip_to_hf

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
        sd = openclip_to_hf(sd, target_keys)
    return sd


ROUTER_PRESETS = ("paper", "recommended", "few-example")


def router_from_args(args):
    """The ``RouterConfig`` of ``mass merge``: the ``--router`` preset (the paper's router, ``recommended()``
    or ``few_example()``), with every routing flag given on the command line overriding it."""
    from .router import RouterConfig

    base = {"paper": RouterConfig, "recommended": RouterConfig.recommended,
            "few-example": RouterConfig.few_example}[args.router]
    flags = {"layer": args.layer, "mode": args.mode, "token": args.token, "features": args.features,
             "basis": args.basis, "whiten": args.whiten, "centre": args.centre}
    return base(**{k: v for k, v in flags.items() if v is not None}, unknown=args.unknown,
                unknown_threshold=args.unknown_threshold)


def cmd_merge(args) -> int:
    from .clip import is_hub_id, load_vision
    from .model import merge
    from .router import RouterConfig

    finetuned = _parse_finetuned(args.finetuned)
    rank = _parse_rank(args.rank)
    try:
        router = router_from_args(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    support_dirs = _parse_finetuned(args.support, "--support") if args.support else None
    for name, path in finetuned.items():
        if not os.path.lexists(path) and not is_hub_id(path):
            raise UserError(f"checkpoint {name!r}: no such file {path}")
    _check_out(args.out)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    pretrained = load_vision(args.pretrained) if is_hub_id(args.pretrained) else load_pretrained_hf(args.pretrained)
    if args.allow_pickle:
        keys = list(pretrained.state_dict().keys())
        finetuned = {n: _load_finetuned(n, p, keys, True) for n, p in finetuned.items()}
    support = None
    if support_dirs is not None:
        from .data import ClipPreprocess
        from .support import DEFAULT_IMAGES, read_support_dir

        preprocess = ClipPreprocess.from_pretrained(args.pretrained, image_size=pretrained.config.image_size)
        try:
            support = {t: read_support_dir(d, preprocess, limit=args.support_images or DEFAULT_IMAGES)
                       for t, d in support_dirs.items()}
        except ValueError as exc:
            raise UserError(str(exc)) from None
    keep_merged = "all" if args.unknown == "merged" else "prefix"
    try:
        model = merge(pretrained, finetuned, rank=rank, router=router, progress=not args.quiet, support=support,
                      keep_merged=keep_merged, solver=args.solver, device=args.device)
    except ValueError as exc:
        if support is None and (router.basis == "support" or args.unknown != "off"):
            raise UserError(f"{exc} (give --support TASK=DIR ...)") from None
        raise
    model.save_pretrained(args.out)
    print(f"saved MASS model with {len(model.tasks)} tasks to {args.out} "
          f"(storage {model.storage_factor():.3f}x the pretrained model)")
    return 0


def cmd_inspect(args) -> int:
    from .serialization import read_saved

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, dec, heads = read_saved(args.dir)
    for warning in caught:
        print(f"mass: warning: {_one_line(warning.message)}", file=sys.stderr)
    n = dec.stored_numel()
    T = len(dec.tasks)
    bytes_per = {"base": sum(v.numel() * v.element_size() for v in dec.base.values())}
    task_bytes = sum(f.U.numel() * f.U.element_size() + f.S.numel() * f.S.element_size()
                     + f.V.numel() * f.V.element_size() for f in dec.lowrank.values())
    task_bytes += sum(v.numel() * v.element_size() for v in dec.dense.values())
    print(f"MASS model: {args.dir}")
    print(f"  architecture   {config['architecture']} ({config['model_class']})")
    print(f"  tasks ({T})      {', '.join(dec.tasks)}")
    print(f"  heads          {'yes' if heads else 'no'}")
    print(f"  router         {json.dumps(config['router'])}")
    print(f"  reuse_prefix   {config['reuse_prefix']}")
    print(f"  pretrained     {n['pretrained']:,} params, {bytes_per['base'] / 2**20:.2f} MiB")
    print(f"  per task       {task_bytes / T / 2**20:.2f} MiB (factors + non-matrix params)")
    print(f"  storage factor {dec.storage_factor():.4f}x the pretrained model")
    print("  ranks per matrix:")
    width = max(len(k) for k in dec.lowrank)
    for key, f in dec.lowrank.items():
        shape = tuple(dec.base[key].shape)
        print(f"    {key:<{width}}  {str(shape):>14}  k={f.rank}")
    return 0


def cmd_demo(args) -> int:
    from .demo.run import run_demo

    run_demo(out_dir=args.out, quick=args.quick, cache_dir=args.cache_dir, n_tasks=args.tasks, seeds=args.seeds)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    run_bench(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mass", description="MASS: many fine-tuned CLIP vision encoders as one")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline multi-task benchmark: accuracy of MASS vs merges (main job)")
    demo.add_argument("--quick", action="store_true", help="small, fast variant")
    demo.add_argument("--out", default="mass_demo_out", help="directory for the JSON/Markdown/PNG results")
    demo.add_argument("--cache-dir", default=None, help="checkpoint cache (default ~/.cache/mass-demo)")
    demo.add_argument("--tasks", type=int, default=8, help="number of tasks (8 by default)")
    demo.add_argument("--seeds", type=int, default=1, help="router-study seeds (run-to-run spread)")
    demo.set_defaults(func=cmd_demo)

    merge = sub.add_parser("merge", help="build a MASS model from a pretrained and fine-tuned checkpoints")
    merge.add_argument("--pretrained", required=True, help="HF CLIP (vision) model directory or hub id")
    merge.add_argument("--finetuned", required=True, nargs="+", metavar="NAME=PATH",
                       help="fine-tuned checkpoints: HF directories, .safetensors, or .pt state dicts")
    merge.add_argument("--rank", default=None, help="k per matrix: int, or fraction of min(out, in); "
                                                     "default floor(min(out, in) / T)")
    merge.add_argument("--layer", type=int, default=None, help="routing block (default: 3/4 depth)")
    merge.add_argument("--router", default="paper", choices=ROUTER_PRESETS,
                       help="router preset: the paper's (data-free, topk), RouterConfig.recommended() (data-free, "
                            "pretrained features, top-1) or RouterConfig.few_example() (needs --support); the "
                            "routing flags below override it")
    merge.add_argument("--mode", default=None, choices=["top1", "topk", "weighted"], help="default: the preset's")
    merge.add_argument("--token", default=None, choices=["cls", "mean"], help="default: the preset's")
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
    merge.set_defaults(func=cmd_merge)

    inspect = sub.add_parser("inspect", help="describe a saved MASS model")
    inspect.add_argument("dir")
    inspect.set_defaults(func=cmd_inspect)

    bench = sub.add_parser("bench", help="end-to-end latency, memory and storage")
    try:
        from .bench import add_arguments
    except ImportError:
        add_arguments = None
    if add_arguments is not None:
        add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    from .eval_cli import add_parser as add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already reported)
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.func(args)
    except (UserError, *USER_ERRORS) as exc:
        if os.environ.get("MASS_DEBUG"):
            raise
        print(f"mass: error: {_one_line(exc) or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mass: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
