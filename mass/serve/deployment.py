"""The Ray Serve application: a FastAPI ingress over :class:`~mass.serve.engine.Engine` with dynamic batching.

Every image of every request goes through one ``@serve.batch`` queue per endpoint, so images of different
requests, and of different tasks, share one routed forward (up to ``max_batch_size`` images, waiting at most
``batch_wait_ms`` for a batch to fill). Images are decoded and checked in the request handler, before they
join a batch: a bad image fails only its own request. If a batched forward itself fails, its images are
retried one request at a time, so that one request's failure cannot fail the others.
"""
# No "from __future__ import annotations": FastAPI reads the handlers' annotations (Request) at runtime.

import asyncio
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from mass.serve.api import ApiError, Limits, parse_request
from mass.serve.engine import Engine, Item, classify_answer, embed_answer, rss_bytes

logger = logging.getLogger("ray.serve")
API_VERSION = "v1"

api = FastAPI(title="mass", version=API_VERSION,
              description="Many fine-tuned CLIP vision models served as one (MASS). See the README's 'Serve it'.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    message = {404: f"no such endpoint {request.url.path!r}; endpoints: /v1/classify, /v1/embed, /v1/tasks, "
                    f"/v1/health", 405: f"method {request.method} not allowed on {request.url.path}"}
    return JSONResponse(ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail))).body(),
                        status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse(ApiError(400, f"invalid request: {exc.errors()}").body(), status_code=400)


@serve.deployment(name="MASS")
@serve.ingress(api)
class MASSServer:
    """One replica: the model loaded once, a batching queue per endpoint."""

    def __init__(self, directory: str, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
                 threads: int | None = None, limits: Limits | None = None):
        self.engine = Engine(directory, threads=threads)
        self.limits = limits or Limits()
        for batcher in (self._classify_batch, self._embed_batch):
            batcher.set_max_batch_size(max_batch_size)
            batcher.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)
        self.pid = os.getpid()
        try:
            from ray.serve import metrics

            self._batch_metric = metrics.Histogram(
                "mass_batch_size", description="images per batched forward",
                boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("endpoint",))
        except Exception:  # metrics are best effort
            self._batch_metric = None
        logger.info("mass serve: %s; max batch %d images, batch wait %.1f ms, pid %d", self.engine.summary(),
                    max_batch_size, batch_wait_ms, self.pid)

    # ------------------------------------------------------------------ batching
    async def _run(self, endpoint: str, run, items: list) -> list:
        n = len(items)
        if self._batch_metric is not None:
            self._batch_metric.observe(n, tags={"endpoint": endpoint})
        try:
            results = await asyncio.to_thread(run, items)
            return [(True, r, n) for r in results]
        except Exception:  # isolate: each image alone, so only the images that fail get an error
            logger.exception("mass serve: a batch of %d images failed; retrying its images one at a time", n)
            out = []
            for item in items:
                try:
                    out.append((True, (await asyncio.to_thread(run, [item]))[0], 1))
                except Exception as exc:
                    out.append((False, f"{type(exc).__name__}: {exc}", 1))
            return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, items: list) -> list:
        return await self._run("classify", self.engine.classify, items)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, items: list) -> list:
        return await self._run("embed", self.engine.embed, items)

    async def _handle(self, request: Request, endpoint: str, batcher, answer):
        started = time.perf_counter()
        parsed = await parse_request(request, self.engine.preprocess, self.engine.tasks, self.limits)
        items = [Item(p.pixels, p.task) for p in parsed.images]
        results = await asyncio.gather(*[batcher(item) for item in items])
        failed = [f"image {i}: {r[1]}" for i, r in enumerate(results) if not r[0]]
        batches = sorted({r[2] for r in results})
        logger.info("mass serve: %s %d image(s) (%d forced) ran in batch(es) of %s image(s), %.1f ms%s", endpoint,
                    len(items), sum(p.task is not None for p in parsed.images), batches,
                    1000 * (time.perf_counter() - started), f", {len(failed)} failed" if failed else "")
        if failed:
            return JSONResponse(ApiError(500, "; ".join(failed)).body(), status_code=500)
        out = [answer(r[1], item, parsed, r[2]) for r, item in zip(results, items)]
        return {"model": self.engine.directory, "results": out}

    # ------------------------------------------------------------------ endpoints
    @api.post(f"/{API_VERSION}/classify")
    async def classify(self, request: Request):
        """Per image: the task chosen, its label and probability, top-k labels, routing weights, unknown flag."""
        if self.engine.model.heads is None:
            raise ApiError(409, "this model was saved without classification heads: use /v1/embed")
        tasks, names = self.engine.tasks, self.engine.model.class_names
        return await self._handle(request, "classify", self._classify_batch, lambda r, item, parsed, n: classify_answer(
            r, tasks, names, parsed.top_k, item.task is not None, n))

    @api.post(f"/{API_VERSION}/embed")
    async def embed(self, request: Request):
        """Per image: the projected image embedding of the routed (or forced) model, routing weights."""
        tasks = self.engine.tasks
        return await self._handle(request, "embed", self._embed_batch,
                                  lambda r, item, parsed, n: embed_answer(r, tasks, item.task is not None, n))

    @api.get(f"/{API_VERSION}/tasks")
    def tasks(self):
        """Tasks, class names, router, storage factor and preprocessing of the served model."""
        return self.engine.metadata()

    @api.get(f"/{API_VERSION}/health")
    def health(self):
        return {"status": "ok", "tasks": len(self.engine.tasks), "pid": self.pid, "rss_bytes": rss_bytes()}

    def check_health(self):  # Ray Serve's own health check: the replica is restarted if this raises
        if self.engine.model is None:
            raise RuntimeError("no model loaded")
