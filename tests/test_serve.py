"""The Ray Serve app, end to end: a real local Ray instance (started once for this module, stopped by a finaliser
even when a test fails), a tiny model built from a config, a real HTTP client on 127.0.0.1.

What is bit-equal and why. A request that runs alone in a batch (the answer says which batch size it ran in, and
the tests check it) runs exactly the call the in-process model makes (``model.classify(images)``, or with
``task_ids=`` for forced images), with the same torch thread count (1), so its logits, probabilities, routing and
embeddings are bit-equal to the in-process result. Inside a batch shared with other requests it is not: CPU GEMM
kernels choose their blocking (and a one-row product a GEMV) by the number of rows, so the same row can be summed
in another order (measured on this machine: a (1, 32) x (32, 16) product differs in the last bit from row 0 of
the same product over 16 rows). There the tests check the answer against the single-request one within the
forward error bound of ``tests/_tolerances.py`` (both sides fp32: twice the one-sided bound), and the routing
decision and label wherever the single-request margin exceeds the bound on what it can move by.
"""
import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("ray")
pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")

import mass  # noqa: E402
from mass.evaluation.data import ClipPreprocess  # noqa: E402
from mass.evaluation.heads import Head, Heads  # noqa: E402
from mass.nn.encoders import build_encoder  # noqa: E402
from mass.nn.model import extract_embedding  # noqa: E402

from _tolerances import TOKENS, feature_error, logit_bound, residual_bound  # noqa: E402
from conftest import make_setup  # noqa: E402

LIMITS = dict(max_body_bytes=1 << 20, max_images=8, max_image_bytes=200 << 10, max_image_pixels=200 * 200)
SIZES = [(40, 48), (32, 32), (64, 40), (50, 50), (33, 70), (48, 36), (90, 60), (32, 45)]


def _png(seed: int, size=(40, 48)) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _flat_png(size) -> bytes:
    """A one-colour PNG: many pixels in few bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, in-process model of the same directory, directory): Ray and Serve started once, stopped after."""
    import ray
    from ray import serve

    import mass.serve as mass_serve

    pretrained, finetuned, _ = make_setup("hf_proj", n_tasks=3, scale=0.3)
    gen = torch.Generator().manual_seed(5)
    heads = Heads({f"task{i}": Head(tuple(f"label {i}.{j}" for j in range(3 + i)),
                                    torch.randn(3 + i, 16, generator=gen)) for i in range(3)})
    directory = tmp_path_factory.mktemp("served") / "model"
    mass.merge(pretrained, finetuned, router=mass.RouterConfig.recommended(), heads=heads,
               progress=False).save_pretrained(directory)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(mass_serve.app(directory, max_batch_size=16, batch_wait_ms=100, threads=1, cpus_per_replica=0,
                                 limits=mass_serve.Limits(**LIMITS)), name="main", route_prefix="/")
        yield f"http://127.0.0.1:{port}", mass.MASSModel.from_pretrained(directory), directory
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _preprocess(model):
    p = model.preprocessing
    return ClipPreprocess(**{**p, "crop": tuple(p["crop"]), "mean": tuple(p["mean"]), "std": tuple(p["std"])})


def _pixels(model, blobs):
    from PIL import Image

    prep = _preprocess(model)
    return torch.stack([prep(Image.open(io.BytesIO(b))) for b in blobs])


class _OneThread:
    """torch on one thread, as the served replica runs (threads=1)."""

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


def _alone(model, blobs, tasks):
    """What one request gets from the in-process model: routed images in one call, forced ones in another (as
    the server groups them); per image (logits (C,), task index, routing {task: weight}, embedding)."""
    x = _pixels(model, blobs)
    out = [None] * len(blobs)
    with _OneThread():
        for rows, forced in (([i for i, t in enumerate(tasks) if t is None], None),
                             ([i for i, t in enumerate(tasks) if t is not None], [t for t in tasks if t is not None])):
            if not rows:
                continue
            c = model.classify(pixel_values=x[rows], task_ids=forced)
            emb, routing = model(pixel_values=x[rows], task_ids=forced, return_routing=True)
            emb = extract_embedding(emb)
            for j, i in enumerate(rows):
                t = int(c.task_ids[j])
                weights = {model.tasks[k]: w for k, w in zip(c.routing.task_ids[j].tolist(),
                                                            c.routing.weights[j].tolist()) if k >= 0}
                out[i] = (c.logits[j, :model.head(model.tasks[t]).shape[0]], t, weights, emb[j])
    return out


def _post_images(url, endpoint, blobs, tasks=None, top_k=None, as_json=False, timeout=60):
    if as_json:
        body = {"images": [{"data": base64.b64encode(b).decode(), **({"task": t} if t else {})}
                           for b, t in zip(blobs, tasks or [None] * len(blobs))]}
        if top_k is not None:
            body["top_k"] = top_k
        return requests.post(f"{url}/v1/{endpoint}", json=body, timeout=timeout)
    files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    data = [("task", t or "") for t in tasks] if tasks else []
    if top_k is not None:
        data.append(("top_k", str(top_k)))
    return requests.post(f"{url}/v1/{endpoint}", files=files, data=data, timeout=timeout)


def _exact(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- endpoints
def test_tasks_and_health(server):
    url, model, _ = server
    meta = requests.get(f"{url}/v1/tasks", timeout=30).json()
    assert meta["tasks"] == model.tasks and meta["classes"] == model.class_names
    assert meta["router"]["mode"] == "top1" and meta["router"]["features"] == "pretrained"
    assert meta["storage_factor"] == model.storage_factor() and meta["preprocess"] == model.preprocessing
    health = requests.get(f"{url}/v1/health", timeout=30).json()
    assert health["status"] == "ok" and health["tasks"] == 3


@pytest.mark.parametrize("as_json", [False, True])
def test_classify_alone_is_bit_equal_to_the_in_process_model(server, as_json):
    url, model, _ = server
    cases = [([_png(1, SIZES[0])], None, None),
             ([_png(i, SIZES[i]) for i in range(2, 7)], None, 3),
             ([_png(i, SIZES[i]) for i in range(4)], ["task2", None, "task0", None], 2)]
    for blobs, tasks, top_k in cases:
        tasks = tasks or [None] * len(blobs)
        r = _post_images(url, "classify", blobs, tasks, top_k, as_json=as_json)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        want = _alone(model, blobs, tasks)
        assert len(results) == len(blobs)
        for got, (logits, t, weights, _), forced in zip(results, want, tasks):
            assert got["batch_size"] == len(blobs)  # ran alone: the in-process call is the same call
            assert torch.equal(_exact(got["logits"]), logits.double())
            probs = F.softmax(logits.double(), dim=0)
            order = torch.argsort(probs, descending=True, stable=True)[:top_k or 1].tolist()
            names = model.class_names[model.tasks[t]]
            assert got["task"] == model.tasks[t] and got["forced"] == (forced is not None)
            assert got["label"] == names[order[0]] and got["probability"] == float(probs[order[0]])
            assert [e["label"] for e in got["top_k"]] == [names[i] for i in order]
            assert got["routing"] == weights and got["unknown"] is False


def test_embed_alone_is_bit_equal_to_the_in_process_model(server):
    url, model, _ = server
    blobs, tasks = [_png(i, SIZES[i]) for i in range(3)], [None, "task1", None]
    r = _post_images(url, "embed", blobs, tasks, as_json=True)
    assert r.status_code == 200, r.text
    for got, (_, _, weights, emb) in zip(r.json()["results"], _alone(model, blobs, tasks)):
        assert got["batch_size"] == 3
        assert torch.equal(_exact(got["embedding"]), emb.double()) and got["routing"] == weights


def test_concurrent_mixed_requests_get_their_single_request_answers(server):
    """Single-image requests of every task (routed and forced) sent at once share batches; each answer equals
    its single-request one within the stated bound; a bad image among them fails only its own request."""
    url, model, _ = server
    n = 12
    blobs = [_png(100 + i, SIZES[i % len(SIZES)]) for i in range(n)]
    tasks = [None if i % 3 else f"task{i % 2}" for i in range(n)]
    barrier = threading.Barrier(n + 1)

    def send(i):
        barrier.wait()
        if i == n:  # the bad request
            return requests.post(f"{url}/v1/classify", json={"image": base64.b64encode(b"not an image").decode()},
                                 timeout=60)
        return _post_images(url, "classify", [blobs[i]], [tasks[i]], as_json=True)

    with ThreadPoolExecutor(n + 1) as pool:
        responses = list(pool.map(send, range(n + 1)))
    bad = responses.pop()
    assert bad.status_code == 400 and "not an image" in bad.json()["error"]["message"]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    answers = [r.json()["results"][0] for r in responses]
    assert max(a["batch_size"] for a in answers) > 1, "the concurrent requests never shared a batch"

    x = _pixels(model, blobs)
    encoder = build_encoder(model.encoder_spec)
    rank = max(model.ranks.values())
    with _OneThread():
        features = model.first_pass(pixel_values=x)[0]
    r_bound = residual_bound(features[0], model.routing_basis[0], feature_error(encoder, features[0], sides=2))
    residuals = model.route(pixel_values=x).residuals
    for i, (got, (logits, t, weights, emb)) in enumerate(zip(answers, (_alone(model, [b], [tk])[0]
                                                                        for b, tk in zip(blobs, tasks)))):
        if tasks[i] is None:
            order = torch.argsort(residuals[i])
            margin = residuals[i, order[1]] - residuals[i, order[0]]
            if margin <= r_bound[i, order[0]] + r_bound[i, order[1]]:
                continue  # a tie within the bound: either task is a correct answer
        assert got["task"] == model.tasks[t], f"request {i}"
        bound = 2 * logit_bound(encoder, emb.unsqueeze(0).double(), 100.0, rank=rank, tokens=TOKENS)
        err = (_exact(got["logits"]) - logits.double()).abs().max()
        assert err <= bound, f"request {i}: logits differ by {err:.3g} > bound {float(bound):.3g}"
        top2 = torch.topk(logits.double(), 2).values
        if top2[0] - top2[1] > 2 * bound:
            names = model.class_names[model.tasks[t]]
            assert got["label"] == names[int(logits.argmax())], f"request {i}"


# ---------------------------------------------------------------------------------------------- bad requests
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD = [
    ("malformed JSON", dict(data=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    ("JSON not an object", dict(json=[1, 2]), 400, "must be an object"),
    ("no images field", dict(json={"top_k": 1}), 400, "exactly one of 'images'"),
    ("empty batch", dict(json={"images": []}), 400, "no images"),
    ("bad base64", dict(json={"images": [{"data": "@@@"}]}), 400, "not valid base64"),
    ("not an image", dict(json={"image": _b64(b"GIF89a-but-not-really")}), 400, "not an image"),
    ("unknown task", dict(json={"image": {"data": _b64(_png(1)), "task": "cars"}}), 400, "unknown task 'cars'"),
    ("task not a string", dict(json={"image": {"data": _b64(_png(1)), "task": 3}}), 400, "'task' must be"),
    ("unknown field", dict(json={"images": [_b64(_png(1))], "topk": 3}), 400, "unknown field"),
    ("top_k zero", dict(json={"images": [_b64(_png(1))], "top_k": 0}), 400, "top_k"),
    ("top_k a bool", dict(json={"images": [_b64(_png(1))], "top_k": True}), 400, "top_k"),
    ("too many pixels", dict(json={"image": _b64(_flat_png((300, 300)))}), 413, "pixels"),
    ("decompression bomb", dict(files={"image": ("bomb.png", _flat_png((4000, 4000)))}), 413, "pixels"),
    ("image too many bytes", dict(json={"image": _b64(b"x" * (300 << 10))}), 413, "bytes per image"),
    ("too many images", dict(json={"images": [_b64(_png(1))] * 9}), 413, "limit is 8"),
    ("body too large", dict(data=b"{" + b" " * (2 << 20) + b"}", headers={"content-type": "application/json"}),
     413, "the body is"),
    ("wrong content type", dict(data=b"abc", headers={"content-type": "text/plain"}), 415, "content type"),
    ("no content type", dict(data=b"abc"), 415, "content type"),
    ("empty multipart", dict(files={"note": (None, "x")}), 400, "unknown form field"),
    ("multipart, no files", dict(files={"top_k": (None, "2")}), 400, "no images"),
    ("multipart, too many task fields", dict(files=[("image", ("a.png", _png(1))), ("task", (None, "task0")),
                                                   ("task", (None, "task1"))]), 400, "one 'task' field"),
    ("multipart, malformed", dict(data=b"--xx\r\nnonsense", headers={"content-type": "multipart/form-data"}),
     400, "multipart"),
]


@pytest.mark.parametrize("name, kwargs, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_json_error_naming_the_problem(server, name, kwargs, status, message):
    url, _, _ = server
    r = requests.post(f"{url}/v1/classify", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and message in error["message"], error


def test_unknown_endpoint_and_method_are_json_errors(server):
    url, _, _ = server
    r = requests.get(f"{url}/v2/classify", timeout=30)
    assert r.status_code == 404 and "/v1/classify" in r.json()["error"]["message"]
    r = requests.get(f"{url}/v1/classify", timeout=30)
    assert r.status_code == 405 and "GET" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- faults
def _with_retries(send, deadline: float):
    """``send()`` until it answers 200 (retrying connection errors and 5xx) or the deadline passes."""
    attempts = 0
    while True:
        attempts += 1
        try:
            r = send()
            if r.status_code == 200:
                return r, attempts
            if r.status_code < 500:
                return r, attempts
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer after {attempts} attempts")
        time.sleep(0.25)


def test_a_killed_replica_is_restarted_and_retried_requests_succeed(server):
    import os
    import signal

    from ray import serve

    import mass.serve as mass_serve

    url, model, directory = server
    serve.run(mass_serve.app(directory, max_batch_size=8, batch_wait_ms=5, threads=1, cpus_per_replica=0,
                             deployment_options={"health_check_period_s": 1.0, "health_check_timeout_s": 5.0}),
              name="fault", route_prefix="/fault")
    base = f"{url}/fault"
    try:
        pid = requests.get(f"{base}/v1/health", timeout=30).json()["pid"]
        blobs = [_png(i) for i in range(4)]
        done, killed = [], threading.Event()
        deadline = time.monotonic() + 120

        def client(c):
            out = []
            for i in range(8):
                r, _ = _with_retries(lambda: requests.post(
                    f"{base}/v1/classify", json={"image": _b64(blobs[(c + i) % 4])}, timeout=60), deadline)
                out.append(r)
                done.append(1)
                if len(done) == 6 and not killed.is_set():
                    killed.set()
                    os.kill(pid, signal.SIGKILL)  # the replica dies under load
            return out

        with ThreadPoolExecutor(3) as pool:
            responses = [r for rs in pool.map(client, range(3)) for r in rs]
        assert killed.is_set()
        assert all(r.status_code == 200 and len(r.json()["results"]) == 1 for r in responses)
        new_pid = requests.get(f"{base}/v1/health", timeout=30).json()["pid"]
        assert new_pid != pid  # Ray started a new replica
    finally:
        serve.delete("fault")


def test_requests_in_flight_at_shutdown_complete_or_fail_clearly(server):
    """Requests waiting in a batch when the app is deleted: each gets an HTTP answer (200, or a 5xx/404 with a
    body) well before the client's timeout; none hangs."""
    from ray import serve

    import mass.serve as mass_serve

    url, _, directory = server
    serve.run(mass_serve.app(directory, max_batch_size=64, batch_wait_ms=1500, threads=1, cpus_per_replica=0),
              name="drain", route_prefix="/drain")
    timeout = 60.0

    def send(i):
        started = time.monotonic()
        try:
            r = requests.post(f"{url}/drain/v1/classify", json={"image": _b64(_png(i))}, timeout=timeout)
            return r.status_code, r.text, time.monotonic() - started
        except requests.ConnectionError as exc:
            return None, str(exc), time.monotonic() - started

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(send, i) for i in range(6)]
        time.sleep(0.5)  # in the replica, waiting for the batch to fill
        serve.delete("drain")
        results = [f.result() for f in futures]
    for status, text, elapsed in results:
        assert elapsed < timeout, "a request hung until the client's timeout"
        assert status is not None, f"no HTTP answer: {text}"
        assert status == 200 or (status >= 400 and text), (status, text)
    assert any(status == 200 for status, _, _ in results)  # the in-flight requests were drained, not dropped
