"""``mass eval``: checkpoints + labelled data → the paper's accuracy table (JSON, Markdown, PNG).

    mass eval --preset vit-b-32-8 --out results/                       # online: the public 8-task benchmark
    mass eval --pretrained ID_OR_DIR --finetuned TASK=ID_OR_PATH ... --data TASK=DIR_OR_ID ... --out DIR

Heads are zero-shot heads from the CLIP text tower of ``--text-model`` (default: ``--pretrained``, which
must then be a full CLIP model). Registered as ``mass eval`` by :mod:`mass.tools.cli.main`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mass.files.hub import HubUnavailableError
from mass.tools.cli.args import parse_pairs, parse_rank
from mass.tools.cli.errors import UserError, run_reporting


def _pairs(items, flag: str) -> dict[str, str]:
    return parse_pairs(items or [], flag)


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--preset", default=None, help="public benchmark: vit-b-32-8, vit-b-16-14, vit-l-14-20, ...")
    p.add_argument("--pretrained", default=None, help="CLIP model (hub id or directory); overrides the preset's")
    p.add_argument("--text-model", default=None,
                   help="full CLIP model whose text tower makes the zero-shot heads (default: --pretrained)")
    p.add_argument("--finetuned", nargs="+", metavar="TASK=ID_OR_PATH", default=None,
                   help="fine-tuned checkpoints: hub ids, HF directories, .safetensors, .pt, open_clip names, "
                        "PEFT LoRA adapter directories")
    p.add_argument("--bank-dtype", default=None, choices=["bfloat16", "float16"],
                   help="the MASS rows' task factors stored and applied in half precision")
    p.add_argument("--data", nargs="+", metavar="TASK=DIR_OR_ID", default=None,
                   help="labelled data: image folder DIR/<class>/*, a save_to_disk directory, or a hub dataset "
                        "id (ID or ID:CONFIG)")
    p.add_argument("--data-root", default=None, help="ROOT/<task>/<class>/* for tasks without --data")
    p.add_argument("--split", default=None, help="dataset split (default: the preset's, else 'test')")
    p.add_argument("--templates", default=None, help="JSON file: a list of templates, or {task: [templates]}")
    p.add_argument("--classes", default=None,
                   help="JSON file {task: [class names in label order]} for data without usable class names")
    p.add_argument("--limit", type=int, default=None, help="at most N samples per task (seeded subset)")
    p.add_argument("--methods", default=",".join(_methods()), help="comma list (default: all)")
    p.add_argument("--routers", default="paper", help="comma list of paper, top1, recommended, energy, few-example, fast")
    p.add_argument("--support-per-task", type=int, default=None, metavar="N",
                   help="unlabelled images per task that calibrate routers needing them (few-example, --unknown; "
                        "default 32): drawn from --support-split, else from the evaluated data (after --limit) and "
                        "left out of every row")
    p.add_argument("--support-split", default=None, metavar="SPLIT",
                   help="dataset split the support images come from (e.g. train); not for image folders")
    p.add_argument("--unknown", choices=("pretrained", "merged"), default=None,
                   help="unknown-task detector on every MASS router: a flagged image gets the pretrained or merged "
                        "model's output and counts as wrong; the table shows the share flagged")
    p.add_argument("--unknown-threshold", type=float, default=None, metavar="T",
                   help="flag when the chosen task's residual exceeds T x its calibrated scale (default 1.0)")
    p.add_argument("--rank", default=None, help="k per matrix: int or fraction (default floor(min(out,in)/T))")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="directory for results.json, results.md and the plots")
    return p


def _methods():
    from mass.evaluation.protocol import METHODS

    return METHODS


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``mass`` command's subparsers."""
    p = subparsers.add_parser("eval", help="accuracy table of MASS vs merges on checkpoints + labelled data")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _plan(args):
    """Pretrained source, text source, {task: checkpoint}, {task: (data source, config, split)}."""
    from mass.evaluation.presets import preset

    pre = preset(args.preset) if args.preset else None
    pretrained = args.pretrained or (pre.pretrained if pre else None)
    if pretrained is None:
        raise UserError("give --preset, or --pretrained with --finetuned and --data")
    finetuned = dict(pre.finetuned) if pre else {}
    finetuned.update(_pairs(args.finetuned, "--finetuned"))
    if not finetuned:
        raise UserError("no fine-tuned checkpoints: give --finetuned TASK=ID_OR_PATH ... (or --preset)")
    given = _pairs(args.data, "--data")
    unknown = sorted(set(given) - set(finetuned))
    if unknown:
        raise UserError(f"--data names tasks without a fine-tuned checkpoint: {unknown}")
    specs = {t.name: t for t in pre.tasks} if pre else {}
    data = {}
    for task in finetuned:
        spec = specs.get(task)
        split = args.split or (spec.split if spec else "test")
        if task in given:
            data[task] = (given[task], None, split)
        elif args.data_root:
            data[task] = (str(Path(args.data_root) / task), None, split)
        elif spec is not None:
            data[task] = (spec.dataset, spec.config, split)
        else:
            raise UserError(f"no data for task {task!r}: give --data {task}=DIR_OR_ID or --data-root ROOT")
    return pretrained, args.text_model or pretrained, finetuned, data


def _routers(args) -> dict:
    """{name: RouterConfig} for --routers, with the detector of --unknown / --unknown-threshold on each."""
    import dataclasses

    from mass.evaluation.protocol import resolve_routers

    names = _csv(args.routers)
    if not names:
        raise UserError(f"--routers names no router (got {args.routers!r}): give a comma list of paper, top1, "
                        f"recommended, energy, few-example")
    try:
        configs = resolve_routers(names)
    except ValueError as exc:
        raise UserError(f"--routers: {exc}") from None
    if args.unknown_threshold is not None and args.unknown is None:
        raise UserError("--unknown-threshold needs --unknown pretrained|merged")
    if args.unknown is not None:
        extra = {} if args.unknown_threshold is None else {"unknown_threshold": args.unknown_threshold}
        configs = {name: dataclasses.replace(c, unknown=args.unknown, **extra) for name, c in configs.items()}
    return configs


def _check_support_split(args, data_sources: dict) -> None:
    """A support split must exist apart from the evaluated one: refuse the same split and image folders."""
    from mass.evaluation.data import is_saved_dataset

    if args.support_split is None:
        return
    for task, (source, _, split) in data_sources.items():
        if args.support_split == split:
            raise UserError(f"--support-split {split!r} is the split evaluated for task {task!r}: the support "
                                 f"images would be evaluated too (omit --support-split to leave them out instead)")
        if Path(source).is_dir() and not is_saved_dataset(source):
            raise UserError(f"--support-split: the data of task {task!r} is an image folder, which has no "
                                 f"splits (omit --support-split: support images are then drawn from it and left "
                                 f"out of the evaluation)")


def _tokenizer(source):
    from transformers import AutoTokenizer

    from mass.files.hub import from_hub, is_hub_id

    if is_hub_id(source):
        return from_hub("tokenizer of", source, lambda: AutoTokenizer.from_pretrained(source))
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"{source!r} has no usable tokenizer for the zero-shot heads ({exc})") from exc


def _json_file(path: str, flag: str):
    """The JSON a flag's file holds; a missing file or invalid JSON names the flag and the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path}: cannot read the file ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{flag} {path}: not valid JSON ({exc})") from None


def run(args) -> int:
    from mass.nn.clip import load_clip, load_vision, vision_encoder
    from mass.evaluation.data import ClipPreprocess, load_task_data
    from mass.evaluation.protocol import evaluate
    from mass.evaluation.heads import templates_for, zero_shot_heads

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    _routers(args)  # bad router options fail before anything is loaded
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    pretrained, text_source, finetuned, data_sources = _plan(args)
    _check_support_split(args, data_sources)
    templates = _json_file(args.templates, "--templates") if args.templates else None
    classes = _json_file(args.classes, "--classes") if args.classes else {}
    if not isinstance(classes, dict):
        raise UserError("--classes must hold a JSON object {task: [class names]}")
    try:
        clip = load_clip(text_source)
    except HubUnavailableError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"the zero-shot heads need a CLIP text tower: {exc}; pass --text-model ID_OR_DIR "
                             f"(a full CLIP model)") from exc
    vision = vision_encoder(clip) if text_source == pretrained else load_vision(pretrained)
    image_size = vision.config.image_size if hasattr(vision, "config") else None
    preprocess = ClipPreprocess.from_pretrained(text_source, image_size=image_size)
    data = {t: load_task_data(src, preprocess, t, split=split, config=cfg, classes=classes.get(t)).subset(args.limit)
            for t, (src, cfg, split) in data_sources.items()}
    names = {t: [c.replace("_", " ") for c in d.classes] for t, d in data.items()}
    heads = zero_shot_heads(clip, _tokenizer(text_source), names, templates=templates)
    used_templates = {t: templates_for(t, templates) for t in data}  # recorded: a table traces to its inputs
    support_data = None
    if args.support_split is not None:
        support_data = {t: load_task_data(src, preprocess, t, split=args.support_split, config=cfg,
                                          classes=classes.get(t)) for t, (src, cfg, _) in data_sources.items()}
    result = evaluate(vision, finetuned, data, heads, methods=_csv(args.methods), routers=_routers(args),
                      rank=parse_rank(args.rank), batch_size=args.batch_size, progress=not args.quiet,
                      latency=not args.no_latency, device=args.device, num_workers=args.num_workers,
                      support_per_task=args.support_per_task, support_data=support_data,
                      bank_dtype=args.bank_dtype)
    result.config.update(pretrained=str(pretrained), text_model=str(text_source), preset=args.preset,
                         finetuned={t: str(c) for t, c in finetuned.items()},
                         data={t: str(s[0]) for t, s in data_sources.items()}, limit=args.limit,
                         classes=names, templates=used_templates)
    paths = result.save(args.out)
    print(result.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="mass eval", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return run_reporting(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
