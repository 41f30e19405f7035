"""``mass serve DIR``: serve a self-contained saved MASS model over HTTP with Ray Serve (``pip install
'mass-moerging[serve]'``). Ray is imported only when the command runs, so the rest of the CLI works without it."""
from __future__ import annotations

import importlib.util
import logging

from mass.tools.cli.errors import UserError


def run(args) -> int:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
        raise UserError("mass serve needs Ray Serve: pip install 'mass-moerging[serve]' (or 'ray[serve]')")
    from mass.serve import run as serve_run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve_run(args.dir, address=args.address, host=args.host, port=args.port, num_cpus=args.num_cpus,
              replicas=args.replicas, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
              threads=args.threads)
    return 0


def add_parser(subparsers):
    serve = subparsers.add_parser("serve", help="serve a saved MASS model over HTTP (Ray Serve)")
    serve.add_argument("dir", help="a self-contained saved MASS model (save_pretrained / mass merge --out)")
    serve.add_argument("--address", default=None,
                       help="join this Ray cluster (e.g. auto or ray://head:10001); default: start a local Ray")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1, help="copies of the model (each loads it once)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="images per batched forward")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    serve.add_argument("--threads", type=int, default=None, help="torch threads per replica")
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray instance may use")
    serve.set_defaults(func=run)
    return serve
