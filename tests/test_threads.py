"""One model, many threads: every concurrent call returns exactly (torch.equal) its single-threaded result."""
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mass
from mass.nn.model import extract_embedding

from conftest import make_setup

N_THREADS = 8
ROUNDS = 4  # every workload runs this many times per thread, in a shuffled order


def _heads(width, n_tasks=3):
    gen = torch.Generator().manual_seed(7)
    return {f"task{i}": torch.randn(3 + i, width, generator=gen) for i in range(n_tasks)}


def _workloads(model, views, images):
    """Named calls covering forced tasks (tensor, names, sets), routed calls, route(), classify(), prefix
    reuse and top-k multi-task sets; the set cache holds one set, so concurrent calls keep rebuilding it."""
    top1, reuse = views
    B = images.shape[0]
    # One multi-task set per workload, cache of one set: nearly every call builds a new cache generation
    # while others run on the previous one.
    sets = {combo: torch.tensor([list(combo), [combo[0], -1, -1], list(combo[::-1]), [-1, -1, -1],
                                 list(combo), [combo[-1], -1, -1]][:B]).view(B, -1)
            for combo in [(0, 1, -1), (0, 2, -1), (1, 2, -1), (0, 1, 2)]}

    def emb(out):
        return (extract_embedding(out),)

    work = {f"forced task{t}": (lambda t=t: emb(model(images, task_ids=torch.full((B,), t)))) for t in range(3)}
    work.update({f"forced set {combo}": (lambda ids=ids: emb(model(images, task_ids=ids)))
                 for combo, ids in sets.items()})
    work.update({
        "forced names": lambda: emb(model(images, task_ids=["task2", "task0", "task1", "task1", "task0", "task2"])),
        "routed topk": lambda: _routed(model, images),
        "route": lambda: _routing(model.route(images)),
        "classify": lambda: _classification(model.classify(images)),
        "routed top1 view": lambda: _routed(top1, images),
        "routed reuse-prefix view": lambda: _routed(reuse, images),
        "pretrained": lambda: emb(model.forward_pretrained(images)),
    })
    return work


def _routing(r):
    return (r.task_ids, r.weights) + (() if r.residuals is None else (r.residuals,))


def _routed(model, images):
    out, routing = model(images, return_routing=True)
    return (extract_embedding(out),) + _routing(routing)


def _classification(c):
    return (c.logits, c.task_ids, c.predictions) + _routing(c.routing)


@pytest.mark.parametrize("arch", ["hf", "openclip_sf"])
def test_concurrent_calls_on_one_model_are_exact(arch, images):
    pretrained, finetuned, _ = make_setup(arch, n_tasks=3, scale=0.2)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    width = 32 if arch == "openclip_sf" else 32
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=1, threshold=0.1), heads=_heads(width),
                           max_cached_combos=1)
    views = (model.with_router(mass.RouterConfig(layer=2, mode="top1")),
             model.with_router(mass.RouterConfig(layer=1, mode="top1"), reuse_prefix=True))
    work = _workloads(model, views, images)
    want = {name: fn() for name, fn in work.items()}  # single-threaded results first
    assert any(len(set(r)) > 1 for r in want["routed topk"][1].tolist())  # routed sets of two tasks occur

    barrier = threading.Barrier(N_THREADS)

    def run(seed):
        order = [name for name in work for _ in range(ROUNDS)]
        random.Random(seed).shuffle(order)
        barrier.wait()  # start together
        return [(name, work[name]()) for name in order]

    with ThreadPoolExecutor(N_THREADS) as pool:
        results = [r for rs in pool.map(run, range(N_THREADS)) for r in rs]
    wrong = [name for name, got in results
             if len(got) != len(want[name]) or not all(torch.equal(a, b) for a, b in zip(got, want[name]))]
    assert not wrong, f"{len(wrong)} of {len(results)} concurrent results differ: {sorted(set(wrong))}"


def test_stop_of_one_first_pass_never_ends_another_call(images):
    """Routed first passes stop early with an exception; forced calls running at the same time on the same
    model must neither see it nor stop."""
    pretrained, finetuned, _ = make_setup("hf", n_tasks=3, scale=0.2)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=0, mode="top1"), progress=False)
    forced = torch.tensor([0, 1, 2, 0, 1, 2])
    want_forced = extract_embedding(model(images, task_ids=forced))
    want_routed = model.route(images).task_ids
    errors, barrier = [], threading.Barrier(4)

    def run(i):
        barrier.wait()
        for _ in range(6):
            try:
                if i % 2:
                    assert torch.equal(extract_embedding(model(images, task_ids=forced)), want_forced)
                else:
                    assert torch.equal(model.route(images).task_ids, want_routed)
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                errors.append(repr(exc))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(run, range(4)))
    assert not errors, errors[:3]


@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_a_call_changes_no_shared_module(images, reuse_prefix):
    """What another thread could see mid-call: every module's hooks, instance attributes and class are the same
    during a call (read from inside the forward) as before it."""
    pretrained, finetuned, _ = make_setup("openclip_sf", n_tasks=3, scale=0.2)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=1, threshold=0.1),
                       reuse_prefix=reuse_prefix, progress=False)

    def shape_of_modules():
        return [(name, type(m), dict(m._forward_pre_hooks), dict(m._forward_hooks),
                 {k: id(v) for k, v in m._parameters.items()}, {k: id(v) for k, v in m._buffers.items()},
                 {k: v for k, v in m.__dict__.items() if not k.startswith("_")}) for name, m in model.named_modules()]

    seen = []
    probe = model.arch.blocks[-1].register_forward_pre_hook(lambda m, a: seen.append(shape_of_modules()))
    before = shape_of_modules()
    model(images)
    model(images, task_ids=torch.tensor([[0, 1]] * images.shape[0]))
    probe.remove()
    assert len(seen) == 2 and all(s == before for s in seen)
