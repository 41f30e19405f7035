"""Issue 23: half-precision banks (``bank_dtype``), against the error bound stated in mass/method/half_banks.py.

Rounding to nearest changes each stored task value x by at most e(x) = u_h·|x| + η_h/2 (u_h = 2⁻⁸ bfloat16,
2⁻¹¹ float16; η_h the smallest subnormal): a block U diag(S) V of three rounded factors is within
(|U| + e(U)) diag(|S| + e(S)) (|V| + e(V)) − |U| diag|S| |V| of the fp32 one, elementwise.
Everything the model computes from the banks is then an fp32 computation on those rounded values: forcing a
task gives, within the fp32 encoder bound of tests/_tolerances.py, the output of the encoder whose weights are
θ0 plus the rounded task values.
"""
import copy

import pytest
import torch

import mass
from mass.method.half_banks import resolve_bank_dtype, rounding_error, to_bank_dtype
from mass.nn.model import extract_embedding

from _tolerances import U32, U64, assert_within, encoder_bound, gamma
from conftest import build_model, make_setup

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF)
def test_rounded_task_values_within_the_bound(dtype):
    pretrained, finetuned, _ = make_setup("hf_proj")
    dec = mass.decompose(pretrained, finetuned, solver="full", progress=False)
    half = to_bank_dtype(dec, dtype)
    assert half.bank_dtype == dtype and all(t.dtype == dtype for t in half.dense.values())
    for key, f in dec.lowrank.items():
        g = half.lowrank[key]
        assert all(t.dtype == dtype for t in (g.U, g.S, g.V))
        k = f.rank
        for t in range(len(dec.tasks)):
            U, S, V = (x[t].double() for x in (f.U, f.S, f.V))
            exact = (U * S) @ V
            got = (g.U[t].double() * g.S[t].double()) @ g.V[t].double()
            M = (U.abs() * S.abs()) @ V.abs()
            eU, eS, eV = (rounding_error(x, dtype) for x in (U, S, V))
            widened = ((U.abs() + eU) * (S.abs() + eS)) @ (V.abs() + eV)
            # the rounding, plus the fp64 evaluation of both products (γ_k(u64) each, on magnitudes ≤ widened)
            bound = widened - M + 2 * gamma(k + 1, U64) * widened
            assert_within(got, exact, bound, f"{key} task {t}")
    for key, v in dec.dense.items():
        delta32 = v.float() - dec.base[key].float()  # what is rounded: the fp32 delta
        assert torch.equal(half.dense[key], delta32.to(dtype))
        exact = v.double() - dec.base[key].double()
        assert_within(half.dense_delta(key), exact, rounding_error(delta32, dtype) + U32 * exact.abs(), key)


@pytest.mark.parametrize("arch", ["hf_proj", "openclip_sf"])
def test_forced_tasks_compute_the_rounded_weights(arch, images):
    pretrained, finetuned, reference = make_setup(arch)
    model = mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=2), progress=False, solver="full",
                       bank_dtype="bfloat16")
    dec = model.decomposition()
    assert dec.bank_dtype == torch.bfloat16 and model.bank_dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # θ0 keeps its dtype
    k = max(m.rank for m in model.modules() if isinstance(m, mass.MASSLinear))
    reference.double()
    for t in range(len(model.tasks)):
        reference.load_state_dict(dec.task_state_dict(t))  # θ0 + the rounded values, in fp32
        want = extract_embedding(reference(images.double()))
        got = extract_embedding(model(images, task_ids=torch.full((images.shape[0],), t)))
        assert_within(got, want, encoder_bound(reference, want, rank=k), f"{arch} task {t}")
    # Several tasks per sample (the multi-task TSV-M sets and the two-slot paths) run too.
    assert torch.isfinite(extract_embedding(model(images, task_ids=[[0, 1]] * images.shape[0]))).all()


def test_save_load_storage_and_growth(tmp_path, images):
    pretrained, finetuned, _ = make_setup("hf_proj", n_tasks=3)
    fp32 = mass.merge(copy.deepcopy(pretrained), finetuned, progress=False, solver="full")
    model = mass.merge(copy.deepcopy(pretrained), finetuned, progress=False, solver="full", bank_dtype="bfloat16")
    dec32, dec = fp32.decomposition(), model.decomposition()
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    base = size(dec.base.values())
    factors = [t for f in dec.lowrank.values() for t in (f.U, f.S, f.V)]
    assert model.storage_factor() == (base + size(factors) + size(dec.dense.values())) / base
    assert model.storage_factor() - 1 == pytest.approx((fp32.storage_factor() - 1) / 2, rel=1e-12)  # 2 bytes, not 4
    model.save_pretrained(tmp_path / "m")
    loaded = mass.MASSModel.from_pretrained(tmp_path / "m", build_model("hf_proj"))
    assert loaded.bank_dtype == torch.bfloat16
    got = loaded.decomposition()
    for key, f in dec.lowrank.items():
        assert torch.equal(got.lowrank[key].U, f.U) and torch.equal(got.lowrank[key].V, f.V)
    assert all(torch.equal(got.dense[k], v) for k, v in dec.dense.items())
    out, routing = loaded(images, return_routing=True)
    want, want_routing = model(images, return_routing=True)
    assert torch.equal(routing.task_ids, want_routing.task_ids)
    assert torch.equal(extract_embedding(out), extract_embedding(want))
    # Growing a half-precision model rounds the new task's values the same way a merge does.
    names = list(finetuned)
    small = mass.merge(copy.deepcopy(pretrained), {n: finetuned[n] for n in names[:2]}, rank=4, progress=False,
                       solver="full", bank_dtype="bfloat16")
    grown = small.add_tasks({names[2]: finetuned[names[2]]}, solver="full")
    at_once = mass.merge(copy.deepcopy(pretrained), finetuned, rank=4, progress=False, solver="full",
                         bank_dtype="bfloat16")
    for key, f in at_once.decomposition().lowrank.items():
        assert torch.equal(grown.decomposition().lowrank[key].U, f.U)
    del dec32


def test_bad_bank_dtype():
    for bad in ("float32", "bf16", torch.float32, 16):
        with pytest.raises(ValueError, match="bank_dtype"):
            resolve_bank_dtype(bad)
    pretrained, finetuned, _ = make_setup("hf", n_tasks=2)
    with pytest.raises(ValueError, match="bank_dtype"):
        mass.merge(pretrained, finetuned, bank_dtype="int8", progress=False)
    assert not any(isinstance(m, mass.MASSLinear) for m in pretrained.modules())  # refused before wrapping
