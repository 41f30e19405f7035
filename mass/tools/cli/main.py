"""The ``mass`` command line: ``demo``, ``merge``, ``inspect``, ``bench``, ``eval``, ``serve``.

User mistakes, bad arguments and file-system errors (a missing, unreadable or unwritable path) end with
exactly one ``mass: error: ...`` line on stderr and exit code 2, never a traceback (``MASS_DEBUG=1``
re-raises, for bug reports: :mod:`.errors`). ``main`` returns the exit code; it does not call ``sys.exit``.
"""
from __future__ import annotations

import argparse
import sys

from mass.tools.cli import eval as eval_command
from mass.tools.cli import inspect as inspect_command
from mass.tools.cli import merge as merge_command
from mass.tools.cli import serve as serve_command
from mass.tools.cli.errors import Parser, run_reporting


def cmd_demo(args) -> int:
    from mass.tools.demo.run import run_demo

    run_demo(out_dir=args.out, quick=args.quick, cache_dir=args.cache_dir, n_tasks=args.tasks, seeds=args.seeds)
    return 0


def cmd_bench(args) -> int:
    from mass.tools.bench.e2e import run_bench

    run_bench(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mass", description="MASS: many fine-tuned CLIP vision encoders as one")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline multi-task benchmark: accuracy of MASS vs merges (main job)")
    demo.add_argument("--quick", action="store_true", help="small, fast variant")
    demo.add_argument("--out", default="mass_demo_out", help="directory for the JSON/Markdown/PNG results")
    demo.add_argument("--cache-dir", default=None, help="checkpoint cache (default ~/.cache/mass-demo)")
    demo.add_argument("--tasks", type=int, default=8, help="number of tasks (8 by default)")
    demo.add_argument("--seeds", type=int, default=1, help="router-study seeds (run-to-run spread)")
    demo.set_defaults(func=cmd_demo)

    merge_command.add_parser(sub)
    inspect_command.add_parser(sub)

    bench = sub.add_parser("bench", help="end-to-end latency, memory and storage")
    try:
        from mass.tools.bench.e2e import add_arguments
    except ImportError:
        add_arguments = None
    if add_arguments is not None:
        add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    eval_command.add_parser(sub)
    serve_command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already reported)
        return exc.code if isinstance(exc.code, int) else 0
    return run_reporting(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
