"""Load benchmark of the served model (issue 22): MASS behind Ray Serve against what users run today.

Side by side on one machine, one local Ray instance, the same HTTP load, each as a Ray Serve app with one replica
and the same image decoding and batching settings (``@serve.batch``, ``--max-batch-size``, ``--batch-wait-ms``):

1. ``mass`` / ``mass-few-example``: :func:`mass.serve.app` on a saved MASS model with the recommended data-free
   router, and with the few-example router (calibrated on a few images per task). The client sends no task.
2. ``multiplexed``: T fine-tuned encoders behind Ray Serve model multiplexing (``@serve.multiplexed``, the request
   carries its task in the ``serve_multiplexed_model_id`` header: this baseline is *given* the task, MASS is not).
   A batch is split by task, one forward per task present (what ray-project/ray#59334 does for multiplexed
   batches).
3. ``pretrained``: one plain pretrained encoder, one forward per batch, no routing (the ceiling).

Encoders are built from configs (weights random: throughput, latency and memory depend on shapes only); the MASS
model's factors come from :func:`mass.method.synthetic.random_decomposition` (exact shapes and ranks, no SVDs).
The client (aiohttp, on 127.0.0.1) keeps ``c`` requests of one image each in flight, tasks drawn uniformly, for
``--requests`` requests or ``--seconds`` per level, whichever ends first, after an unrecorded warm-up of 3T
requests (which also loads every multiplexed model). Apps run one after the other, not interleaved. Reported per app and level: images/s,
p50/p95/p99 latency, the mean batch size the server reports per image, errors, and the replica's resident memory
(/proc of the replica, read through the app's health endpoint after the load).

    python bench/serve_load.py --out bench/results/serve-load-cpu-2core
"""
# No "from __future__ import annotations": FastAPI reads the handlers' annotations (Request) at runtime.

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ENCODERS = {
    "tiny": dict(hidden=32, layers=4, heads=4, intermediate=64, image_size=32, patch_size=8, projection_dim=16),
    "vit-b-32": dict(hidden=768, layers=12, heads=12, intermediate=3072, image_size=224, patch_size=32,
                     projection_dim=512),
}
CLASSES = 10
APPS = ("mass", "mass-few-example", "multiplexed", "pretrained")


# ---------------------------------------------------------------------------------------------- models
def encoder(size: str, seed: int):
    from mass.method.synthetic import tiny_hf_clip

    return tiny_hf_clip(seed=seed, **ENCODERS[size])


def class_names(tasks):
    return {t: [f"{t} class {c}" for c in range(CLASSES)] for t in tasks}


def heads_for(tasks, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {t: torch.randn(CLASSES, width, generator=gen) for t in tasks}


def build_mass(size: str, n_tasks: int, root: Path) -> dict:
    """Two saved MASS directories of one model: the recommended router, and the few-example one."""
    import mass
    from mass.method.synthetic import random_decomposition

    pretrained = encoder(size, seed=0)
    dec = random_decomposition(pretrained, n_tasks, seed=1)
    tasks = list(dec.tasks)
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig.recommended(),
                           heads=heads_for(tasks, ENCODERS[size]["projection_dim"]))
    model.class_names = class_names(tasks)
    out = {"mass": root / f"{size}-mass", "mass-few-example": root / f"{size}-mass-few"}
    model.save_pretrained(out["mass"])
    gen = torch.Generator().manual_seed(2)
    s = ENCODERS[size]["image_size"]
    support = {t: torch.randn(8, 3, s, s, generator=gen) for t in tasks}
    model.calibrate(support, mass.RouterConfig.few_example()).save_pretrained(out["mass-few-example"])
    return {"dirs": out, "tasks": tasks, "storage_factor": model.storage_factor()}


# ---------------------------------------------------------------------------------------------- baselines
def baseline_apps(size: str, tasks: list, max_batch_size: int, batch_wait_ms: float, threads: int):
    """(multiplexed app, pretrained app): Ray Serve deployments with the same decoding and batching as MASS."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    from mass.nn.encoders import default_preprocess
    from mass.serve.api import ApiError, Limits, parse_request
    from mass.evaluation.data import ClipPreprocess
    from mass.serve.engine import rss_bytes

    def setup(self):
        torch.set_num_threads(threads)
        self.preprocess = ClipPreprocess.from_spec(default_preprocess(ENCODERS[size]["image_size"]))
        self.heads = {t: torch.nn.functional.normalize(h, dim=-1)
                      for t, h in heads_for(tasks, ENCODERS[size]["projection_dim"]).items()}
        self.limits = Limits()
        for b in (self.batch,):
            b.set_max_batch_size(max_batch_size)
            b.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    def forward(model, x):
        with torch.inference_mode():  # as MASSModel runs (torch.no_grad)
            return model(pixel_values=x).image_embeds

    def answer(self, emb, task, n):
        logits = 100.0 * torch.nn.functional.normalize(emb, dim=-1) @ self.heads[task].T
        probs = torch.softmax(logits.double(), 0)
        i = int(probs.argmax())
        return {"task": task, "label": f"{task} class {i}", "probability": float(probs[i]), "batch_size": n}

    multiplexed_api, pretrained_api = FastAPI(), FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(multiplexed_api)
    class Multiplexed:
        """T fine-tuned encoders, one per task, loaded on first use and kept (max_num_models_per_replica=T)."""

        def __init__(self):
            setup(self)

        @serve.multiplexed(max_num_models_per_replica=len(tasks))
        async def get_model(self, task: str):
            return encoder(size, seed=10 + tasks.index(task))  # a "fine-tuned" encoder: same shapes

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def batch(self, items):
            n, out = len(items), [None] * len(items)
            for task in sorted({t for t, _ in items}):  # split by model id: one forward per task present
                rows = [i for i, (t, _) in enumerate(items) if t == task]
                model = await self.get_model(task)
                x = torch.stack([items[i][1] for i in rows])
                emb = await asyncio.to_thread(forward, model, x)
                for j, i in enumerate(rows):
                    out[i] = answer(self, emb[j], task, n)
            return out

        @multiplexed_api.post("/v1/classify")
        async def classify(self, request: Request):
            task = serve.get_multiplexed_model_id()
            if task not in tasks:
                return JSONResponse(ApiError(400, f"unknown task {task!r}").body(), status_code=400)
            parsed = await parse_request(request, self.preprocess, tasks, self.limits)
            results = await asyncio.gather(*[self.batch((task, p.pixels)) for p in parsed.images])
            return {"results": results}

        @multiplexed_api.get("/v1/health")
        def health(self):
            return {"status": "ok", "pid": os.getpid(), "rss_bytes": rss_bytes()}

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(pretrained_api)
    class Pretrained:
        """One plain pretrained encoder: one forward per batch; the answer uses the first task's head."""

        def __init__(self):
            setup(self)
            self.model = encoder(size, seed=0)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def batch(self, items):
            x = torch.stack(items)
            emb = await asyncio.to_thread(forward, self.model, x)
            return [answer(self, emb[j], tasks[0], len(items)) for j in range(len(items))]

        @pretrained_api.post("/v1/classify")
        async def classify(self, request: Request):
            parsed = await parse_request(request, self.preprocess, tasks, self.limits)
            return {"results": await asyncio.gather(*[self.batch(p.pixels) for p in parsed.images])}

        @pretrained_api.get("/v1/health")
        def health(self):
            return {"status": "ok", "pid": os.getpid(), "rss_bytes": rss_bytes()}

    return Multiplexed.bind(), Pretrained.bind()


# ---------------------------------------------------------------------------------------------- load
def png_images(size: str, n: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    s = ENCODERS[size]["image_size"]
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(s, s, 3)).astype(np.uint8)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


async def load_level(url: str, images: list, tasks: list, concurrency: int, n_requests: int, seconds: float,
                     send_task: bool, seed: int) -> dict:
    import aiohttp

    rng = random.Random(seed)
    plan = [(rng.randrange(len(images)), rng.choice(tasks)) for _ in range(n_requests)]
    latencies, batch_sizes, errors = [], [], []
    next_index = 0
    deadline = time.perf_counter() + seconds

    async def worker(session):
        nonlocal next_index
        while next_index < len(plan) and time.perf_counter() < deadline:
            image, task = plan[next_index]
            next_index += 1
            headers = {"serve_multiplexed_model_id": task} if send_task else {}
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/classify", json={"image": images[image]}, headers=headers) as r:
                    body = await r.json()
                    if r.status != 200:
                        errors.append(f"{r.status}: {body}")
                        continue
            except Exception as exc:  # noqa: BLE001 - a benchmark counts failures, it does not stop on them
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            batch_sizes.append(body["results"][0]["batch_size"])

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*[worker(session) for _ in range(concurrency)])
        wall = time.perf_counter() - started
    q = np.quantile(np.array(latencies) * 1000, [0.5, 0.95, 0.99]).tolist() if latencies else [None] * 3
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "seconds": wall, "images_per_s": len(latencies) / wall,
            "p50_ms": q[0], "p95_ms": q[1], "p99_ms": q[2],
            "mean_batch_size": statistics.fmean(batch_sizes) if batch_sizes else None}


def health(url: str) -> dict:
    import requests

    return requests.get(f"{url}/v1/health", timeout=60).json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- report
def write_report(results: dict, out: Path) -> None:
    lines = ["# Serve load: MASS vs multiplexed fine-tuned models vs one pretrained model (Ray Serve)", "",
             f"CPU: {results['cpu']} ({os.cpu_count()} cores; load average "
             f"{results['loadavg_at_start']} at the start). Commit {results['git_commit']}, {results['date']}. "
             f"One replica per app, {results['args']['threads']} torch threads, max batch "
             f"{results['args']['max_batch_size']}, batch wait {results['args']['batch_wait_ms']} ms, "
             f"{results['args']['tasks']} tasks, one image per request, tasks drawn uniformly; each level stops after "
             f"{results['args']['requests']} requests or {results['args']['seconds']} s.", "",
             "`python bench/serve_load.py " + " ".join(results["argv"]) + "`", ""]
    for size, apps in results["encoders"].items():
        lines += [f"## {size} encoder", "",
                  "| app | concurrency | images/s | p50 ms | p95 ms | p99 ms | mean batch | errors | replica RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for app, row in apps.items():
            for lv in row["levels"]:
                fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
                lines.append(f"| {app} | {lv['concurrency']} | {fmt(lv['images_per_s'])} | {fmt(lv['p50_ms'], '{:.0f}')}"
                             f" | {fmt(lv['p95_ms'], '{:.0f}')} | {fmt(lv['p99_ms'], '{:.0f}')} | "
                             f"{fmt(lv['mean_batch_size'])} | {lv['errors']} | {row['rss_bytes'] / 2**20:.0f} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["encoders"])
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
    for col, size in enumerate(sizes):
        for app, row in results["encoders"][size].items():
            c = [lv["concurrency"] for lv in row["levels"]]
            axes[0][col].plot(c, [lv["images_per_s"] for lv in row["levels"]], marker="o", label=app)
            axes[1][col].plot(c, [lv["p95_ms"] for lv in row["levels"]], marker="o", label=app)
        axes[0][col].set_title(f"{size}: throughput")
        axes[0][col].set_ylabel("images/s")
        axes[1][col].set_title(f"{size}: p95 latency")
        axes[1][col].set_ylabel("ms")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent requests")
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "serve_load.png", dpi=110)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/serve-load-cpu")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=300, help="requests per level at most")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per level at most")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per replica (1: on a shared CPU, 2-thread OpenMP regions stall whenever a core is taken)")
    parser.add_argument("--apps", nargs="+", default=list(APPS), choices=list(APPS), help="which apps, in order")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    import mass.serve as mass_serve
    from mass.tools.common import git_commit

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | sed 's/.*: *//'"], capture_output=True,
                         text=True).stdout.strip() or platform.processor()
    results = {"cpu": cpu, "git_commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "loadavg_at_start": [round(v, 1) for v in os.getloadavg()], "args": vars(args),
               "argv": list(argv) if argv is not None else __import__("sys").argv[1:], "encoders": {}}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
            for size in args.encoders:
                print(f"[{size}] building the models", flush=True)
                built = build_mass(size, args.tasks, Path(tmp))
                tasks = built["tasks"]
                images = png_images(size, 16)
                multiplexed, pretrained = baseline_apps(size, tasks, args.max_batch_size, args.batch_wait_ms,
                                                        args.threads)
                apps = {name: mass_serve.app(built["dirs"][name], max_batch_size=args.max_batch_size,
                                             batch_wait_ms=args.batch_wait_ms, threads=args.threads,
                                             cpus_per_replica=0)
                        for name in ("mass", "mass-few-example")}
                apps.update({"multiplexed": multiplexed, "pretrained": pretrained})
                rows = {}
                for name in args.apps:
                    application = apps[name]
                    started = time.perf_counter()
                    serve.run(application, name="bench", route_prefix="/")
                    ready = time.perf_counter() - started
                    # Warm-up, not recorded: every task once or more (the multiplexed app loads its models lazily).
                    asyncio.run(load_level(url, images, tasks, 4, 3 * len(tasks), 60, name == "multiplexed", 99))
                    levels = []
                    for i, c in enumerate(args.concurrency):
                        level = asyncio.run(load_level(url, images, tasks, c, args.requests, args.seconds,
                                                       send_task=name == "multiplexed", seed=i))
                        print(f"[{size}] {name:>16} c={c:<3} {level['images_per_s']:7.1f} img/s  p50 "
                              f"{level['p50_ms'] or 0:7.0f} ms  p95 {level['p95_ms'] or 0:7.0f} ms  batch "
                              f"{level['mean_batch_size'] or 0:5.1f}  errors {level['errors']}", flush=True)
                        levels.append(level)
                    h = health(url)
                    rows[name] = {"levels": levels, "rss_bytes": h["rss_bytes"], "ready_s": ready}
                    serve.delete("bench")
                results["encoders"][size] = rows
                results.setdefault("storage_factor", {})[size] = built["storage_factor"]
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    plot(results, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
