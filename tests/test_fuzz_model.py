"""Fuzz cases for the model side: router settings, wrapping, inference inputs. Every case asserts the exact
outcome: the error type and that its message names the problem, or the result of a direct computation."""
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

import mass
from mass.nn.adapters import AlreadyWrappedError
from mass.nn.model import extract_embedding

from conftest import build_model, make_setup

N_TASKS = 3
WIDTH = 32  # image embedding width of the "hf" test model


def _heads(width=WIDTH, classes=(3, 4, 5)):
    gen = torch.Generator().manual_seed(11)
    return {f"task{i}": torch.randn(c, width, generator=gen) for i, c in enumerate(classes)}


@pytest.fixture(scope="module")
def built():
    """One wrapped model shared by the read-only cases below (topk, layer 1, heads)."""
    pretrained, finetuned, _ = make_setup("hf", n_tasks=N_TASKS, scale=0.2)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=1, threshold=0.1), heads=_heads(),
                       progress=False)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, images


def _emb(out):
    return extract_embedding(out)


# ---------------------------------------------------------------------------------------------- router settings
@pytest.mark.parametrize("fields, error, names", [
    (dict(layer=True), TypeError, "layer must be an int"),
    (dict(layer=2.0), TypeError, "layer must be an int"),
    (dict(layer=-1), ValueError, "layer must be >= 0"),
    (dict(layer="3"), TypeError, "layer must be an int"),
    (dict(max_tasks=True), TypeError, "max_tasks must be an int"),
    (dict(max_tasks=0), ValueError, "max_tasks must be >= 1"),
    (dict(temperature=0), ValueError, "temperature must be > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(temperature="1"), TypeError, "temperature must be a number"),
    (dict(threshold=1.0), ValueError, r"threshold must lie in \[0, 1\)"),
    (dict(threshold=True), TypeError, "threshold must be a number"),
    (dict(batch_level=1), TypeError, "batch_level must be a bool"),
    (dict(batch_level="false"), TypeError, "batch_level must be a bool"),
    (dict(layers=[]), ValueError, "layers must be distinct"),
    (dict(layers=[1, 1]), ValueError, "layers must be distinct"),
    (dict(layers=[1, True]), TypeError, r"layers\[\] must be an int"),
    (dict(layers="12"), TypeError, "layers must be a list or tuple"),
    (dict(mode="bogus"), ValueError, "mode must be one of"),
    (dict(token=None), ValueError, "token must be one of"),
    (dict(features="tsv"), ValueError, "features must be one of"),
    (dict(norm="maha"), ValueError, "norm must be one of"),
])
def test_router_config_refuses(fields, error, names):
    with pytest.raises(error, match=names):
        mass.RouterConfig(**fields)


@pytest.mark.parametrize("fields, want", [
    (dict(layer=np.int64(2)), dict(layer=2)),
    (dict(temperature=np.float32(0.5)), dict(temperature=0.5)),
    (dict(threshold=0), dict(threshold=0.0)),
    (dict(max_tasks=np.int32(3)), dict(max_tasks=3)),
    (dict(batch_level=np.bool_(True)), dict(batch_level=True)),
    (dict(layers=[3, np.int64(1)]), dict(layers=(1, 3))),
    (dict(layers=(2,)), dict(layers=(2,))),
])
def test_router_config_converts_to_plain_values(fields, want):
    config = mass.RouterConfig(**fields)
    for name, value in want.items():
        got = getattr(config, name)
        assert got == value and type(got) is type(value), (name, got)
    if config.layers is not None:
        assert all(type(layer) is int for layer in config.layers)
    saved = json.loads(json.dumps(dataclasses.asdict(config)))  # what a save writes and a load reads back
    assert mass.RouterConfig(**saved) == config


def test_router_config_is_immutable():
    config = mass.RouterConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = "bogus"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.layer = 3
    assert dataclasses.replace(config, mode="top1").mode == "top1" and config.mode == "topk"
    with pytest.raises(ValueError, match="mode must be one of"):
        dataclasses.replace(config, mode="bogus")


# ---------------------------------------------------------------------------------------------- wrapping
def _snapshot(module):
    return ({k: v.clone() for k, v in module.state_dict().items()}, [(n, type(m)) for n, m in module.named_modules()])


def _assert_untouched(module, snapshot):
    state, classes = snapshot
    assert [(n, type(m)) for n, m in module.named_modules()] == classes
    now = module.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    for m in module.modules():
        assert "forward" not in m.__dict__ and not m._forward_pre_hooks and not m._forward_hooks


def _no_svd(*args, **kwargs):
    raise AssertionError("decompose ran although the arguments were invalid")


@pytest.mark.parametrize("kwargs, error, names", [
    (dict(router=mass.RouterConfig(layer=7)), ValueError, "router layer 7 does not exist"),
    (dict(router=mass.RouterConfig(layers=[1, 9])), ValueError, "router layer 9 does not exist"),
    (dict(router="top1"), TypeError, "router must be a mass.RouterConfig"),
    (dict(heads={"task0": torch.randn(3, WIDTH)}), ValueError, r"missing \['task1', 'task2'\]"),
    (dict(heads={**_heads(), "extra": torch.randn(3, WIDTH)}), ValueError, r"unknown \['extra'\]"),
    (dict(heads=_heads(width=7)), ValueError, "takes 7-d embeddings but the model's image embedding is 32-d"),
    (dict(heads={**_heads(), "task1": torch.randn(0, WIDTH)}), ValueError, "'task1' has 0 classes"),
    (dict(heads={**_heads(), "task2": torch.full((3, WIDTH), float("nan"))}), ValueError, "'task2' must be finite"),
    (dict(heads={**_heads(), "task0": torch.ones(3, WIDTH, dtype=torch.long)}), ValueError, "float"),
    (dict(heads={**_heads(), "task0": torch.randn(WIDTH)}), ValueError, r"\(C, D\)"),
    (dict(heads=[torch.randn(3, WIDTH)] * 3), TypeError, "heads must be a dict"),
    (dict(reuse_prefix="false"), TypeError, "reuse_prefix must be a bool"),
    (dict(keep_merged="none"), ValueError, "keep_merged must be 'prefix' or 'all'"),
    (dict(rank=64), ValueError, "rank 64 is larger than matrix"),
    (dict(rank=1.5), ValueError, r"a fractional rank must lie in \(0, 1\]"),
    (dict(rank="4"), ValueError, "rank must be an int"),
])
def test_merge_validates_before_the_svds_and_leaves_the_module(kwargs, error, names, monkeypatch):
    pretrained, finetuned, _ = make_setup("hf", n_tasks=N_TASKS)
    before = _snapshot(pretrained)
    monkeypatch.setattr("mass.nn.merge.decompose", _no_svd)
    with pytest.raises(error, match=names):
        mass.merge(pretrained, finetuned, progress=False, **kwargs)
    _assert_untouched(pretrained, before)


@pytest.mark.parametrize("names, message", [
    ({"": 0}, "non-empty strings"),
    ({3: 0}, "non-empty strings"),
])
def test_merge_refuses_bad_task_names(names, message, monkeypatch):
    pretrained, finetuned, _ = make_setup("hf", n_tasks=1)
    monkeypatch.setattr("mass.nn.merge.decompose", _no_svd)
    with pytest.raises(ValueError, match=message):
        mass.merge(pretrained, {name: finetuned["task0"] for name in names}, heads={}, progress=False)


@pytest.mark.parametrize("arch", ["hf", "openclip_sf"])
@pytest.mark.parametrize("stage", ["build", "install"])
def test_failed_wrap_leaves_the_module_as_it_was_and_a_retry_works(arch, stage, monkeypatch, images):
    pretrained, finetuned, reference = make_setup(arch, n_tasks=N_TASKS)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    before = _snapshot(pretrained)

    def explode(*args, **kwargs):
        raise RuntimeError(f"injected failure at {stage}")

    # 'build': while the banks are built (nothing installed yet); 'install': after the layers are in place,
    # while the last hook is registered (the steps done so far must be undone).
    monkeypatch.setattr("mass.nn.model.build_banks" if stage == "build" else "mass.nn.model.TokenDeltas", explode)
    with pytest.raises(RuntimeError, match="injected failure"):
        mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=1))
    _assert_untouched(pretrained, before)
    torch.testing.assert_close(pretrained(images), reference(images), rtol=0, atol=0)  # same module, same output
    monkeypatch.undo()
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=1))
    assert model(images, task_ids=torch.zeros(6, dtype=torch.long)) is not None


@pytest.mark.parametrize("damage, names", [
    (lambda dec: dec.lowrank.pop("encoder.layers.1.mlp.fc1.weight"), "no task values for 'encoder.layers.1.mlp.fc1"),
    (lambda dec: dec.dense.update({"pre_layrnorm.bias": dec.dense["pre_layrnorm.bias"][:2]}),
     r"'pre_layrnorm.bias' have shape \(2, 32\), expected \(3, 32\)"),
    (lambda dec: dec.lowrank.update({"encoder.layers.0.mlp.fc2.weight": mass.LowRankFactors(
        *(t[:2] for t in dataclasses.astuple(dec.lowrank["encoder.layers.0.mlp.fc2.weight"])))}),
     "factors for 'encoder.layers.0.mlp.fc2.weight' do not fit the model's"),
    (lambda dec: dec.tasks.append("task3"), r"expected \(4, 32\) \(4 tasks\)"),
])
def test_a_decomposition_of_another_model_is_refused(damage, names):
    pretrained, finetuned, _ = make_setup("hf", n_tasks=N_TASKS)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    damage(dec)
    before = _snapshot(pretrained)
    with pytest.raises(ValueError, match=names):
        mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=1))
    _assert_untouched(pretrained, before)


def test_wrapping_twice_is_refused_with_a_clear_error():
    pretrained, finetuned, _ = make_setup("hf", n_tasks=N_TASKS)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=1), progress=False)
    with pytest.raises(AlreadyWrappedError, match="already wrapped by a MASSModel.*with_router"):
        mass.merge(pretrained, finetuned, progress=False)
    with pytest.raises(AlreadyWrappedError, match="already wrapped"):
        mass.MASSModel(pretrained, model.decomposition())


def test_failed_load_leaves_the_base_model_as_it_was(tmp_path, built):
    model, images = built
    model.save_pretrained(tmp_path / "m")
    base = build_model("hf", seed=123)
    before = _snapshot(base)
    with pytest.raises(ValueError, match="heads must have one entry per task"):
        mass.MASSModel.from_pretrained(tmp_path / "m", base_model=base, heads={"nope": torch.randn(2, WIDTH)})
    _assert_untouched(base, before)  # the saved θ0 was loaded, then put back
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m", base_model=base)
    assert torch.equal(_emb(loaded(images, task_ids="task1")), _emb(model(images, task_ids="task1")))


@pytest.mark.parametrize("new", [
    mass.RouterConfig(layer=3, mode="top1"),  # deeper than the merged weights the model kept (blocks 0-1)
    mass.RouterConfig(layer=0, mode="weighted", max_tasks=2),
    mass.RouterConfig(layers=[0, 3], mode="topk", threshold=0.1),
    mass.RouterConfig(layer=2, features="pretrained", mode="top1"),
])
def test_with_router_equals_a_fresh_merge_without_decomposing_again(new, built, monkeypatch):
    model, images = built
    pretrained, finetuned, _ = make_setup("hf", n_tasks=N_TASKS, scale=0.2)
    fresh = mass.merge(pretrained, finetuned, router=new, heads=_heads(), progress=False)
    monkeypatch.setattr("mass.nn.merge.decompose", _no_svd)
    view = model.with_router(new)
    assert view.router_config == new and model.router_config == mass.RouterConfig(layer=1, threshold=0.1)
    # The same fp32 factors and the same operations: bit-equal to the fresh model.
    got, want = view.route(images), fresh.route(images)
    assert torch.equal(got.residuals, want.residuals) and torch.equal(got.task_ids, want.task_ids)
    assert torch.equal(_emb(view(images)), _emb(fresh(images)))
    assert torch.equal(view.classify(images).logits, fresh.classify(images).logits)
    assert torch.equal(model.route(images).task_ids, model.route(images).task_ids)  # the original still works


def test_with_router_validates(built):
    model, _ = built
    with pytest.raises(ValueError, match="router layer 4 does not exist"):
        model.with_router(mass.RouterConfig(layer=4))
    with pytest.raises(TypeError, match="reuse_prefix must be a bool"):
        model.with_router(mass.RouterConfig(layer=1), reuse_prefix="yes")


# ---------------------------------------------------------------------------------------------- inference inputs
@pytest.mark.parametrize("shape, names", [
    ((2, 1, 32, 32), "images have 1 channels but the model takes 3"),
    ((2, 4, 32, 32), "images have 4 channels but the model takes 3"),
    ((3, 32, 32), "images must be a 4-D tensor"),
    ((2, 3, 32, 32, 1), "images must be a 4-D tensor"),
])
@pytest.mark.parametrize("call", ["forward", "forced", "route", "classify"])
def test_bad_image_shapes_name_the_problem(built, shape, names, call):
    model, _ = built
    x = torch.randn(shape)
    fn = {"forward": lambda: model(x), "forced": lambda: model(x, task_ids="task0"), "route": lambda: model.route(x),
          "classify": lambda: model.classify(x)}[call]
    with pytest.raises(ValueError, match=names):
        fn()


@pytest.mark.parametrize("given, tensor", [
    ([0, 1, 2, 0, 1, 2], torch.tensor([0, 1, 2, 0, 1, 2])),
    (np.array([2, 1, 0, 0, 1, 2]), torch.tensor([2, 1, 0, 0, 1, 2])),
    (np.array([[0, 1], [2, -1], [1, 2], [0, -1], [-1, -1], [2, 0]], dtype=np.int32),
     torch.tensor([[0, 1], [2, -1], [1, 2], [0, -1], [-1, -1], [2, 0]])),
    ("task1", torch.full((6,), 1)),
    (2, torch.full((6,), 2)),
    (torch.tensor(0), torch.full((6,), 0)),
    (["task2", "task0", "task1", "task1", "task0", "task2"], torch.tensor([2, 0, 1, 1, 0, 2])),
    ([["task0", "task2"], "task1", [1], [], ["task1", 0], (2, "task0")],
     torch.tensor([[0, 2], [1, -1], [1, -1], [-1, -1], [1, 0], [2, 0]])),
    (torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int16), torch.tensor([0, 1, 2, 0, 1, 2])),
])
def test_task_ids_forms_equal_the_tensor_form(built, given, tensor):
    model, images = built
    out, routing = model(images, task_ids=given, return_routing=True)
    assert torch.equal(_emb(out), _emb(model(images, task_ids=tensor)))
    assert torch.equal(routing.task_ids, tensor.view(6, -1))


@pytest.mark.parametrize("given, error, names", [
    ("nope", ValueError, r"unknown task name\(s\) \['nope'\]"),
    ("colors", ValueError, r"unknown task name\(s\) \['colors'\]"),
    ([["task0", "nope"]] * 6, ValueError, r"unknown task name\(s\) \['nope'\]"),
    (3, ValueError, "task index 3 does not exist"),
    (-1, ValueError, "task index -1 does not exist"),
    (True, TypeError, "task_ids must be a task name, an index.*got bool"),
    ([True] * 6, TypeError, "name or its index"),
    ([0.0] * 6, TypeError, "must be a name, an index or a list of them, got 0.0"),
    (np.zeros(6), ValueError, "LongTensor"),
    (torch.zeros(6, dtype=torch.bool), ValueError, "LongTensor"),
    (torch.zeros(6, 2, 1, dtype=torch.long), ValueError, r"\(B,\) or \(B, K\)"),
    ({0, 1}, TypeError, "task_ids must be a task name"),
    ([[1, 1]] * 6, ValueError, "names a task twice"),
    (torch.tensor([[2, 2]] * 6), ValueError, "names a task twice"),
    ([0, 1, 5, 0, 1, 2], ValueError, r"\[-1, 2\]"),
    ([0, 1], ValueError, "names 2 samples but the batch has 6"),
    ([{"task0"}] * 6, TypeError, "a name, an index or a list"),
])
def test_bad_task_ids_name_the_problem(built, given, error, names):
    model, images = built
    with pytest.raises(error, match=names):
        model(images, task_ids=given)


@pytest.mark.parametrize("call", ["forward", "forced", "route", "classify", "pretrained"])
def test_an_empty_batch_gives_an_empty_result(built, call):
    model, images = built
    empty = images[:0]
    if call == "route":
        routing = model.route(empty)
    elif call == "classify":
        result = model.classify(empty)
        assert result.logits.shape == (0, 5) and result.task_ids.shape == (0,) and result.predictions.shape == (0,)
        routing = result.routing
    elif call == "pretrained":
        out = model.forward_pretrained(empty)
        assert type(out) is type(model.forward_pretrained(images)) and _emb(out).shape == (0, WIDTH)
        return
    else:
        out, routing = model(empty, return_routing=True, task_ids="task0" if call == "forced" else None)
        full = model(images)
        assert type(out) is type(full) and _emb(out).shape == (0, WIDTH) and _emb(out).dtype == _emb(full).dtype
        assert out.last_hidden_state.shape == (0, *full.last_hidden_state.shape[1:])
    K = 1 if call == "forced" else 2
    assert routing.task_ids.shape == (0, K) and routing.task_ids.dtype == torch.long
    assert routing.weights.shape == (0, K)
    assert routing.residuals is None if call == "forced" else routing.residuals.shape == (0, N_TASKS)


def test_reprs_are_short_and_classify_refuses_return_routing(built):
    model, images = built
    result = model.classify(images)
    text = repr(result)
    assert "\n" not in text and len(text) < 600 and "CLIP" not in text and "shape=(6, 5)" in text
    assert repr(result.routing).startswith("Routing(task_ids=Tensor(shape=(6, 2)")
    with pytest.raises(TypeError, match="always returns the routing"):
        model.classify(images, return_routing=True)


def test_non_finite_samples_take_no_part_in_a_batch_decision(built):
    model, images = built
    for mode in ("top1", "topk"):
        view = model.with_router(mass.RouterConfig(layer=1, mode=mode, batch_level=True, threshold=0.1))
        clean = view.route(images[1:])
        assert (clean.task_ids[:, 0] != 0).all()  # so the old behaviour (NaN mean -> argmax 0) would show
        bad = images.clone()
        bad[0, 0, 0, 0] = float("nan")
        out, routing = view(bad, return_routing=True)
        assert torch.equal(routing.task_ids[1:], clean.task_ids)  # the others decide as without it
        emb = _emb(out)
        assert not torch.isfinite(emb[0]).any() and torch.isfinite(emb[1:]).all()
        # and run the tasks they were routed to (the same batch with those tasks forced: the same computation)
        assert torch.equal(emb[1:], _emb(view(bad, task_ids=routing.task_ids))[1:])


def test_inference_mode_then_normal_mode(built):
    model, images = built
    sets = torch.tensor([[0, 1], [1, 2], [2, -1], [0, 2], [1, -1], [0, 1]])
    with torch.inference_mode():
        inside = [_emb(model(images)), _emb(model(images, task_ids=sets)), _emb(model(images, task_ids="task2")),
                  model.classify(images).logits]
        model.with_router(mass.RouterConfig(layer=3, mode="top1")).route(images)
    outside = [_emb(model(images)), _emb(model(images, task_ids=sets)), _emb(model(images, task_ids="task2")),
               model.classify(images).logits]
    assert all(torch.equal(a, b) for a, b in zip(inside, outside))


def test_meta_device_gives_a_clear_error():
    pretrained, finetuned, _ = make_setup("hf", n_tasks=N_TASKS)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=1), progress=False)
    model.to("meta")
    for call in (lambda x: model(x), lambda x: model(x, task_ids=[0, 1]), lambda x: model.route(x)):
        with pytest.raises(RuntimeError, match="meta device"):
            call(torch.randn(2, 3, 32, 32))
        with pytest.raises(RuntimeError, match="meta device"):
            call(torch.randn(2, 3, 32, 32, device="meta"))


def test_a_copied_model_is_independent(built):
    model, images = built
    copied = copy.deepcopy(model)
    want = _emb(model(images, task_ids=torch.tensor([[0, 1]] * 6)))
    assert torch.equal(_emb(copied(images, task_ids=torch.tensor([[0, 1]] * 6))), want)
    assert copied.state is not model.state and copied.banks is not model.banks


def test_a_block_forward_set_before_wrapping_is_kept_and_restored(images, monkeypatch):
    """An instance-level ``forward`` on a block (as hooks libraries set) still runs inside MASS, and a failed
    wrap puts that same function back."""
    pretrained, finetuned, _ = make_setup("hf", n_tasks=N_TASKS)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    block = mass.nn.adapters.detect(pretrained).blocks[2]
    calls = []
    original = block.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = counted
    monkeypatch.setattr("mass.nn.model.TokenDeltas", lambda *a: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=1))
    assert block.__dict__["forward"] is counted
    monkeypatch.undo()
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=1))
    model(images, task_ids="task0")
    assert calls == [1]


# ---------------------------------------------------------------------------------------------- issue 24
def test_router_config_is_read_only_and_points_to_with_router(built):
    model, images = built
    before = model.router_config
    for value in (mass.RouterConfig(mode="top1"), "top1", None):
        with pytest.raises(AttributeError, match=r"router_config is read-only .*model\.with_router\(RouterConfig"):
            model.router_config = value
    assert model.router_config is before
    top1 = model.with_router(mass.RouterConfig(layer=1, mode="top1"))
    assert top1.router_config.mode == "top1" and model.router_config is before
    assert _emb(model(images)).shape == (6, WIDTH)  # the model still routes with its own router


def _lowrank_operands(dtype=torch.float32, n=5):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 8, generator=gen)
    w, b = torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)
    U, S, V = torch.randn(2, 6, 3, generator=gen), torch.rand(2, 3, generator=gen), torch.randn(2, 3, 8, generator=gen)
    tasks = torch.tensor([0, 1, -1, 1, 0][:n])
    return [t.to(dtype) for t in (x, w, b, U, S, V)] + [tasks]


_KERNEL_PATHS = [("torch", None), ("triton", "fused"), ("triton", "vendor")]


def _use_path(monkeypatch, impl, candidate):
    monkeypatch.setenv("MASS_KERNEL_IMPL", impl)
    if candidate is None:
        monkeypatch.delenv("MASS_LOWRANK_IMPL", raising=False)
    else:
        monkeypatch.setenv("MASS_LOWRANK_IMPL", candidate)


@pytest.mark.parametrize("impl, candidate", _KERNEL_PATHS, ids=["cpu", "triton_interpreter", "vendor_interpreter"])
@pytest.mark.parametrize("bad", ["x", "weight", "U", "bias"])
def test_lowrank_linear_refuses_non_floating_inputs_naming_the_dtypes(monkeypatch, impl, candidate, bad):
    """An integer x used to give an integer output with the fractions truncated: every path refuses it."""
    import mass_kernels

    _use_path(monkeypatch, impl, candidate)
    x, w, b, U, S, V, tasks = _lowrank_operands()
    args = dict(x=x, weight=w, bias=b, U=U, S=S, V=V)
    args[bad] = args[bad].round().to(torch.int64)
    with pytest.raises(ValueError, match=rf"lowrank_linear: every input but row_tasks must be floating point: "
                                         rf"{bad} is torch\.int64 \(the others: .*torch\.float32"):
        mass_kernels.lowrank_linear(args["x"], args["weight"], args["bias"], args["U"], args["S"], args["V"], tasks)


@pytest.mark.parametrize("impl, candidate", _KERNEL_PATHS, ids=["cpu", "triton_interpreter", "vendor_interpreter"])
def test_fp32_activations_with_an_fp16_bank_compute_in_fp32_on_every_path(monkeypatch, impl, candidate):
    """Mixed dtypes: the CPU path used to fail inside a matmul; every path now computes with the bank upcast
    to fp32 (exactly: an fp16 value is an fp32 value), i.e. the same result as with the upcast bank."""
    import mass_kernels

    _use_path(monkeypatch, impl, candidate)
    x, w, b, U, S, V, tasks = _lowrank_operands()
    half = [t.half() for t in (U, S, V)]
    got = mass_kernels.lowrank_linear(x, w, b, *half, tasks)
    want = mass_kernels.lowrank_linear(x, w, b, *(t.float() for t in half), tasks)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    got = mass_kernels.lowrank_linear(x, w.half(), b, *half, tasks)  # an fp16 weight too
    assert torch.equal(got, mass_kernels.lowrank_linear(x, w.half().float(), b, *(t.float() for t in half), tasks))


@pytest.mark.parametrize("impl, candidate", _KERNEL_PATHS, ids=["cpu", "triton_interpreter", "vendor_interpreter"])
def test_lowrank_linear_with_zero_rows_gives_an_empty_output_on_every_path(monkeypatch, impl, candidate):
    import mass_kernels

    _use_path(monkeypatch, impl, candidate)
    x, w, b, U, S, V, tasks = _lowrank_operands()
    for row_tasks in (tasks[:0], tasks[:0].view(0, 1), tasks[:0].view(0, 2)):
        y = mass_kernels.lowrank_linear(x[:0], w, b, U, S, V, row_tasks)
        assert y.shape == (0, 6) and y.dtype == torch.float32
    assert mass_kernels.routing_residuals(x[:0], V).shape == (0, 2)


def test_triton_forced_on_cpu_tensors_without_the_interpreter_says_it_needs_cuda(monkeypatch):
    import mass_kernels

    monkeypatch.setenv("MASS_KERNEL_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, U, S, V, tasks = _lowrank_operands()
    for call in (lambda: mass_kernels.lowrank_linear(x, w, b, U, S, V, tasks),
                 lambda: mass_kernels.routing_residuals(x, V)):
        with pytest.raises(ValueError, match=r"MASS_KERNEL_IMPL=triton: the Triton kernels need CUDA tensors, got "
                                             r"tensors on cpu \(set TRITON_INTERPRET=1 .*MASS_KERNEL_IMPL=torch\)"):
            call()


def test_an_empty_batch_with_zero_length_task_ids_gives_an_empty_result(built):
    model, images = built
    for ids in (torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long), []):
        out, routing = model(images[:0], task_ids=ids, return_routing=True)
        assert _emb(out).shape == (0, WIDTH) and routing.task_ids.shape[0] == 0
    with pytest.raises(ValueError, match="task_ids names 0 samples but the batch has 6"):
        model(images, task_ids=torch.zeros(0, dtype=torch.long))


def test_a_call_without_images_names_the_missing_argument(built):
    model, _ = built
    for call in (model, model.classify, model.forward_pretrained):
        with pytest.raises(TypeError, match=r"no images given: the argument 'pixel_values' is missing"):
            call()


@pytest.mark.parametrize("size", [(40, 40), (32, 40), (24, 24)])
def test_open_clip_images_of_the_wrong_size_are_refused_like_hf_does(size):
    pretrained, finetuned, _ = make_setup("openclip_bf", n_tasks=2)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=1), progress=False)
    images = torch.randn(2, 3, *size)
    for call in (lambda: model(images), lambda: model(images, task_ids=0), lambda: model.forward_pretrained(images)):
        with pytest.raises(ValueError, match=rf"images are {size[0]}x{size[1]} but the model takes 32x32 images"):
            call()
    assert _emb(model(torch.randn(2, 3, 32, 32))).shape == (2, 32)


def test_uint8_images_are_cast_to_float_as_the_plain_hf_model_does_and_open_clip_refuses_them(built):
    """Documented behaviour (README, Guarantees): HF's CLIP casts integer pixel values to float as they are
    (no rescaling); so does MASS, bit for bit. open_clip's conv refuses them; so does MASS, naming the dtype."""
    model, _ = built
    u8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    plain = build_model("hf")
    assert torch.equal(_emb(plain(pixel_values=u8)), _emb(plain(pixel_values=u8.float())))
    for call in ("forward", "forced", "pretrained"):
        run = {"forward": lambda x: model(x), "forced": lambda x: model(x, task_ids=[0, 1, 2, 0]),
               "pretrained": model.forward_pretrained}[call]
        assert torch.equal(_emb(run(u8)), _emb(run(u8.float()))), call
    pretrained, finetuned, _ = make_setup("openclip_bf", n_tasks=2)
    with pytest.raises(RuntimeError):
        pretrained(u8)  # the plain open_clip tower refuses it too
    oc = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=1), progress=False)
    with pytest.raises(TypeError, match=r"images are torch\.uint8: this open_clip model takes floating-point images"):
        oc(u8)
