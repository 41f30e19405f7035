"""Few-example router variants on a validation split of the demo's training images (never test images).

Support: the first 32 training images of each task; validation: training images 2000-2249 of each task (not
used by the support); seeds 0-2 of ``mass demo`` (cached towers). Prints top-1 routing accuracy per variant.
This is how the demo's "few-example at the last block" row was chosen (docs/router_study.md, section 6).

    python bench/few_example_variants.py
"""
import copy
import json

import torch

import mass
from mass.demo.training import prepare_demo, DemoConfig
variants = {
 "L4 c r1": dict(layer=4), "L4 nc r1": dict(layer=4, centre=False),
 "L5 c r1": dict(layer=5), "L5 nc r1": dict(layer=5, centre=False),
 "L[3,4,5] c r1": dict(layers=[3,4,5]), "L[4,5] c r1": dict(layers=[4,5]),
 "L[4,5] nc r1": dict(layers=[4,5], centre=False),
 "L5 c r2": dict(layer=5, support_rank=2), "L[3,4,5] nc r1": dict(layers=[3,4,5], centre=False),
}
res = {k: [] for k in variants}
for seed in (0, 1, 2):
    art = prepare_demo(config=DemoConfig.make(seed=seed), progress=False, verbose=False, num_threads=1)
    dec = mass.decompose(art.pretrained, art.finetuned, progress=False)
    base = mass.MASSModel(copy.deepcopy(art.pretrained), dec, router=mass.RouterConfig(layer=4), heads=art.heads)
    support = {t.name: t.train_images[:32] for t in art.tasks}
    val = torch.cat([t.train_images[2000:2250] for t in art.tasks]); lab = torch.arange(8).repeat_interleave(250)
    for name, kw in variants.items():
        m = base.calibrate(support, mass.RouterConfig.few_example(**kw))
        with torch.no_grad():
            ids = torch.cat([m.route(pixel_values=val[i:i+500]).task_ids[:, 0] for i in range(0, len(val), 500)])
        res[name].append((ids == lab).float().mean().item())
        print(seed, name, f"{100*res[name][-1]:.2f}", flush=True)
print(json.dumps({k: [round(100*v, 2) for v in vs] for k, vs in res.items()}))
