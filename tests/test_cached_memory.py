"""``MASSModel.cached_tensors``: what the caches grown by calls hold beyond the module's parameters and buffers
(counted by ``mass bench`` as ``cached_bytes``, so the memory a served model holds is not under-reported)."""
import torch

import mass
from mass.tools.common import tensor_bytes
from mass.nn.layers import MASSConv2d

from conftest import make_setup


def _storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_cached_tensors_are_the_sets_banks_and_patch_weights(images):
    pretrained, finetuned, _ = make_setup("hf", n_tasks=4)
    dec = mass.decompose(pretrained, finetuned, progress=False)
    model = mass.MASSModel(pretrained, dec, router=mass.RouterConfig(layer=2))
    module = _storages(list(model.model.parameters()) + [b for b in model.model.buffers() if b is not None])
    assert model.cached_tensors() == []
    model(images, task_ids=torch.arange(images.shape[0]) % 4)  # top-1 rows: no set is cached
    assert model.cached_tensors() == []

    ids = torch.arange(images.shape[0]) % 4
    model(images, task_ids=torch.stack([ids, (ids + 1) % 4], 1))  # two-task sets
    held = model.cached_tensors()
    generation = model.banks.combos.tensors()
    convs = [m for m in model.model.modules() if isinstance(m, MASSConv2d)]
    per_set = [t for m in convs for t in m.cached_tensors()]
    assert generation and per_set and len(held) == len(generation) + len(per_set)
    assert _storages(held) == _storages(generation) | _storages(per_set)
    assert not _storages(held) & module  # none of it is already counted as a parameter or buffer
    assert tensor_bytes(*held) == sum(s.nbytes() for s in {t.untyped_storage().data_ptr(): t.untyped_storage()
                                                          for t in held}.values())
    model.banks.combos.clear()
    assert _storages(model.cached_tensors()) == _storages(per_set)
