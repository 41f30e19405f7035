"""``mass inspect DIR``: what a saved MASS model holds (tasks, ranks, bytes per task, storage factor)."""
from __future__ import annotations

import json
import sys
import warnings

from mass.tools.cli.errors import one_line


def run(args) -> int:
    from mass.storage.serialization import read_saved

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, dec, heads = read_saved(args.dir, trust_task_order=True)  # described, not served: warned
    for warning in caught:
        print(f"mass: warning: {one_line(warning.message)}", file=sys.stderr)
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
    print(f"  task banks     {str(dec.bank_dtype or 'model dtype').removeprefix('torch.')}; rank rule {dec.rank_rule}")
    print("  ranks per matrix:")
    width = max(len(k) for k in dec.lowrank)
    for key, f in dec.lowrank.items():
        shape = tuple(dec.base[key].shape)
        print(f"    {key:<{width}}  {str(shape):>14}  k={f.rank}")
    return 0


def add_parser(subparsers):
    inspect = subparsers.add_parser("inspect", help="describe a saved MASS model")
    inspect.add_argument("dir")
    inspect.set_defaults(func=run)
    return inspect
