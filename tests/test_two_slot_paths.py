"""The CPU two-slot path (rows on a cached multi-task set, the default ``topk`` router's second pass): bank
views instead of gathered copies, each row group's task biases written once before the base GEMM, and the
patch embedding as one GEMM per group with a cached whole weight. Results against fp64 oracles within the
worst-case bounds of ``mass_kernels.reference`` / ``tests/_tolerances.py``."""
import pytest
import torch
import torch.nn.functional as F

import mass
from mass.nn.layers import MASSConv2d, PassState, bank_layout
from mass.method.merging import tsv_merge_from_decomposition
from mass.nn.model import extract_embedding
from mass_kernels.cpu import bias_runs, segment_runs
from mass_kernels.reference import lowrank_linear_segments_torch

from _tolerances import assert_within, encoder_bound, gamma
from conftest import make_setup
from test_reference_ops import assert_lowrank_within_bound


def _pair_segments(n_sets: int, first: int, rows: int) -> list:
    """What ``group_rows`` gives for a batch where set j (entries first + 2j, first + 2j + 1) holds ``rows``
    consecutive rows: the bench's topk row (every sample on {i, i+1 mod T})."""
    segs = [(0, first + 2 * j, j * rows, (j + 1) * rows) for j in range(n_sets)]
    return segs + [(1, first + 2 * j + 1, j * rows, (j + 1) * rows) for j in range(n_sets)]


def _entries(segments, N):
    tasks = torch.full((N, 2), -1)
    for slot, t, start, stop in segments:
        tasks[start:stop, slot] = t
    return tasks


def test_pair_sets_run_on_bank_views_not_copies():
    """Adjacent sets' slot-0 entries step by 2: each slot is one run whose banks are a strided slice (a view of
    the bank's storage), and the biases are one run summing both slots."""
    runs = segment_runs(_pair_segments(4, 5, 3))
    assert [(slot, sel, m, n) for slot, sel, _, _, m, n in runs] == [(0, slice(5, 12, 2), 4, 3),
                                                                     (1, slice(6, 13, 2), 4, 3)]
    V = bank_layout(torch.randn(13, 2, 7))
    assert V[runs[0][1]].untyped_storage().data_ptr() == V.untyped_storage().data_ptr()
    assert bias_runs(_pair_segments(4, 5, 3)) == ((0, 12, 4, 3, (slice(5, 12, 2), slice(6, 13, 2))),)


def test_runs_split_where_tasks_stop_progressing():
    """Scattered tasks are split into runs that are each a progression (never a gathered copy); rows with no
    task, single-task rows and pair rows get their own bias runs."""
    segs = [(0, 3, 0, 2), (0, 1, 2, 4), (0, 2, 4, 6), (0, 4, 6, 8), (0, 7, 9, 11), (1, 8, 9, 11)]
    assert [sel for _, sel, *_ in segment_runs(segs)] == [slice(3, 4, 1), slice(1, 3, 1), slice(4, 5, 1),
                                                         slice(7, 8, 1), slice(8, 9, 1)]
    assert [(a, b, sels) for a, b, _, _, sels in bias_runs(segs)] == [
        (0, 2, (slice(3, 4, 1),)), (2, 6, (slice(1, 3, 1),)), (6, 8, (slice(4, 5, 1),)),
        (9, 11, (slice(7, 8, 1), slice(8, 9, 1)))]


CASES = {
    "bench pairs": _pair_segments(4, 5, 3),
    "pairs scattered": [(0, 5, 0, 3), (0, 11, 3, 6), (0, 7, 6, 9), (1, 6, 0, 3), (1, 12, 3, 6), (1, 8, 6, 9)],
    "singles, pairs, no task": [(0, 0, 0, 2), (0, 2, 2, 4), (0, 5, 5, 8), (0, 7, 8, 11), (1, 6, 5, 8),
                                (1, 8, 8, 11)],
    "ragged pairs": [(0, 5, 0, 2), (0, 7, 2, 6), (1, 6, 0, 2), (1, 8, 2, 6)],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_bias", [False, True])
def test_two_slot_segments_within_bound(case, with_bias):
    """The segment fast path on two-slot rows (biases summed per row group before the GEMM, runs on views)
    against the fp64 oracle, within ``lowrank_error_bound`` (fp32 accumulation, any order)."""
    gen = torch.Generator().manual_seed(11)
    E, din, dout, k, N = 13, 20, 12, 3, 12
    x, W = torch.randn(N, din, generator=gen), torch.randn(dout, din, generator=gen)
    b = torch.randn(dout, generator=gen) if with_bias else None
    U, S, V = torch.randn(E, dout, k, generator=gen), torch.rand(E, k, generator=gen), torch.randn(E, k, din, generator=gen)
    U, V = bank_layout(U), bank_layout(V)
    tb = torch.randn(E, dout, generator=gen) if with_bias else None
    segments = CASES[case]
    got = lowrank_linear_segments_torch(x, W, b, U, S, V, segments, None, tb)
    assert_lowrank_within_bound(got, x, W, b, U, S, V, _entries(segments, N), None, tb)


def _conv_setup(n_entries=9, bias=True, seed=2):
    state = PassState()
    conv = MASSConv2d(torch.nn.Conv2d(3, 8, 4, stride=4, bias=bias), state)
    gen = torch.Generator().manual_seed(seed)
    conv.set_weight_deltas(torch.randn(4, 8, 3, 4, 4, generator=gen))  # the layer's own bank: 4 tasks
    bank = type("Bank", (), {})()  # a pass's extended banks: the tasks plus set slots
    bank.task_weight = torch.randn(n_entries, 8, 3, 4, 4, generator=gen)
    bank.task_bias = torch.randn(n_entries, 8, generator=gen) if bias else None
    return state, conv, bank, gen


def _conv_exact(conv, bank, x, entries):
    """conv(x_i, W0 + Σ_j Δ_eij) + b + Σ_j b_eij per sample in fp64, and the bound of an fp32 evaluation in any
    order (weights summed first, or one GEMM per term): γ_n on the same expression in absolute values, n = the
    patch size + K·(patch size + 2) + 2 for K slots (Higham §3.5)."""
    want, mag = [], []
    for i in range(x.shape[0]):
        w, ww = conv.weight.double(), conv.weight.double().abs()
        bb = torch.zeros(8, dtype=torch.float64) if conv.bias is None else conv.bias.double()
        bm = bb.abs()
        for e in entries[i].tolist():
            if e >= 0:
                w, ww = w + bank.task_weight[e].double(), ww + bank.task_weight[e].double().abs()
                if bank.task_bias is not None:
                    bb, bm = bb + bank.task_bias[e].double(), bm + bank.task_bias[e].double().abs()
        want.append(F.conv2d(x[i : i + 1].double(), w, bb, stride=4))
        mag.append(F.conv2d(x[i : i + 1].double().abs(), ww, bm, stride=4))
    patch = conv.weight[0].numel()
    return torch.cat(want), gamma(patch + 2 * (patch + 2) + 2) * torch.cat(mag)


def _run_conv(conv, state, bank, x, entries, sample_segments):
    with torch.no_grad(), state.use("tasks", entries, torch.ones(entries.shape), sample_segments,
                                    extension=type("Ext", (), {"of": lambda self, layer: bank})()):
        return conv(x)


@pytest.mark.parametrize("bias", [True, False])
def test_patch_embedding_on_sets_is_one_gemm_per_group_with_cached_whole_weights(bias):
    """Samples on two-task sets (and single tasks) embed patches with a cached ``W0 + Σ Δ`` per row group:
    the values of the per-term computation within the bound, the cache sized by the groups used, rebuilt when
    the deltas change in place, and the delta GEMMs (same values) when there are more groups than tasks."""
    state, conv, bank, gen = _conv_setup(bias=bias)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    entries = torch.tensor([[2, -1], [4, 5], [4, 5], [6, 7]])  # in group_rows' order (by slot-0 entry)
    segments = [(0, 2, 0, 1), (0, 4, 1, 3), (0, 6, 3, 4), (1, 5, 1, 3), (1, 7, 3, 4)]
    got = _run_conv(conv, state, bank, x, entries, segments)
    want, bound = _conv_exact(conv, bank, x, entries)
    assert_within(got, want, bound, "sets, cached whole weights")
    assert conv._fine_tuned_sets[3].shape == (3, 8, 48)  # groups (2,), (4, 5), (6, 7)
    with torch.no_grad():
        bank.task_weight[5].add_(1.0)  # an in-place write: the next call must see it
    got = _run_conv(conv, state, bank, x, entries, segments)
    want, bound = _conv_exact(conv, bank, x, entries)
    assert_within(got, want, bound, "after an in-place write")
    # Five groups for a layer of four tasks: not cached, the delta GEMMs give the same values.
    entries = torch.tensor([[0, -1], [1, -1], [2, -1], [4, 5], [6, 7]])
    segments = [(0, 0, 0, 1), (0, 1, 1, 2), (0, 2, 2, 3), (0, 4, 3, 4), (0, 6, 4, 5), (1, 5, 3, 4), (1, 7, 4, 5)]
    x = torch.randn(5, 3, 8, 8, generator=gen)
    cached = conv._fine_tuned_sets
    got = _run_conv(conv, state, bank, x, entries, segments)
    want, bound = _conv_exact(conv, bank, x, entries)
    assert_within(got, want, bound, "more groups than tasks")
    assert conv._fine_tuned_sets is cached


def test_bench_topk_pattern_equals_tsv_merge_per_set(images):
    """Every sample on a two-task set {i, i+1 mod T} (the bench's topk row; T = 4, six images: four sets, two of
    them with two samples) equals the TSV-M model of its set, computed densely in fp64 (``encoder_bound``)."""
    pretrained, finetuned, reference = make_setup("hf", n_tasks=4)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=2))
    ids = torch.arange(images.shape[0]) % 4
    pairs = torch.stack([ids, (ids + 1) % 4], 1)
    got = extract_embedding(model(images, task_ids=pairs))
    reference.double()
    rank = 2 * model.arch.fc1[0].rank  # two slots of rank k
    for i in range(images.shape[0]):
        reference.load_state_dict(tsv_merge_from_decomposition(dec, tasks=sorted(pairs[i].tolist())))
        want = extract_embedding(reference(images[i : i + 1].double()))
        assert_within(got[i : i + 1], want, encoder_bound(reference, want, rank=rank), f"sample {i}")
