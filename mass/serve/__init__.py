"""Serve a saved MASS model behind Ray Serve (``pip install 'mass[serve]'``).

``mass.serve.app(dir, ...)`` returns a Ray Serve application for ``serve.run``; ``mass.serve.run(dir, ...)``
(what ``mass serve DIR`` calls) starts or joins Ray, runs it over HTTP, and stops what it started.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Optional

from mass.serve.api import ApiError, Limits

__all__ = ["ApiError", "Limits", "app", "run"]

logger = logging.getLogger("mass.serve")


def app(directory, *, replicas: int = 1, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
        threads: Optional[int] = None, cpus_per_replica: Optional[float] = None, limits: Optional[Limits] = None,
        name: str = "MASS", deployment_options: Optional[dict] = None):
    """A Ray Serve application serving the self-contained MASS directory ``directory``.

    ``replicas``: copies of the model (each loads it once); ``max_batch_size`` images per forward, waiting at
    most ``batch_wait_ms`` for a batch to fill; ``threads``: torch threads per replica (default: torch's);
    ``cpus_per_replica``: the CPUs Ray reserves for each (default ``threads`` or 1); ``limits``: what one request
    may carry (:class:`~mass.serve.api.Limits`); ``deployment_options``: more Ray Serve deployment options
    (e.g. ``health_check_period_s``, ``autoscaling_config``)."""
    from mass.serve.deployment import MASSServer

    directory = Path(directory).resolve()
    _check_options(replicas, max_batch_size, batch_wait_ms, threads, cpus_per_replica)
    from mass.serve.engine import check_servable

    check_servable(directory)  # a clear error here, not in a replica's log
    cpus = cpus_per_replica if cpus_per_replica is not None else float(threads or 1)
    options = {"name": name, "num_replicas": replicas, "ray_actor_options": {"num_cpus": cpus},
               "max_ongoing_requests": max(100, 4 * max_batch_size), **(deployment_options or {})}
    deployment = MASSServer.options(**options)
    return deployment.bind(str(directory), max_batch_size, batch_wait_ms, threads, limits)


def _check_options(replicas, max_batch_size, batch_wait_ms, threads, cpus) -> None:
    for label, value, low in (("replicas", replicas, 1), ("max_batch_size", max_batch_size, 1)):
        if type(value) is not int or value < low:
            raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
    if threads is not None and (type(threads) is not int or threads < 1):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    if not 0 <= batch_wait_ms <= 10_000:
        raise ValueError(f"batch_wait_ms must lie in [0, 10000], got {batch_wait_ms!r}")
    if cpus is not None and not cpus >= 0:
        raise ValueError(f"cpus_per_replica must be >= 0, got {cpus!r}")


def run(directory, *, address: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
        num_cpus: Optional[int] = None, route_prefix: str = "/", stop: Optional[threading.Event] = None,
        **options) -> None:
    """Serve ``directory`` over HTTP until ``stop`` is set or SIGINT/SIGTERM: start a local Ray instance
    (``num_cpus``: the CPUs it may use, default all) or join the cluster at ``address``; everything started
    here is stopped on the way out."""
    import ray
    from ray import serve

    application = app(directory, **options)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING)
    stop = stop or threading.Event()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name="mass", route_prefix=route_prefix, blocking=False)
        logger.warning("mass serve: %s is served at http://%s:%d%sv1/ (Ctrl-C stops it)", directory, host, port,
                       route_prefix if route_prefix.endswith("/") else route_prefix + "/")
        stop.wait()
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        try:
            serve.delete("mass")
            if started_ray and not address:
                serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
