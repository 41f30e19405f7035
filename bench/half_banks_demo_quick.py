"""Quick check of half-precision banks on the demo (issue 23): seed 0, the first 150 test images per task,
three routers and the oracle, fp32 vs bfloat16 banks on the same data (what bench/half_banks_demo.py does in
full; that one did not finish on the shared VM). Run: python bench/half_banks_demo_quick.py"""
import statistics, torch, mass
from mass.tools.demo.run import SUPPORT_PER_TASK, demo_routers
from mass.tools.demo.training import DemoConfig, prepare_demo
art = prepare_demo(config=DemoConfig.make(seed=0), progress=False, verbose=False)
N = 150
data = {t.name: torch.utils.data.TensorDataset(t.test_images[:N], t.test_labels[:N]) for t in art.tasks}
support = {t.name: torch.utils.data.TensorDataset(t.train_images, t.train_labels) for t in art.tasks}
r = demo_routers(art.config.router_block, art.pretrained.config.num_hidden_layers)
routers = {k: r[k] for k in ("paper", "recommended", "few-example-last")}
res = {}
for dt in (None, "bfloat16"):
    torch.manual_seed(0)
    e = mass.evaluate(art.clip, art.finetuned, data, art.heads, methods=("individual", "mass", "mass_oracle"), routers=routers,
                      batch_size=150, progress=False, latency=False, support_per_task=SUPPORT_PER_TASK, support_data=support, bank_dtype=dt)
    res[dt] = {row: 100 * e.average(row, normalized=True) for row in e.rows if row.startswith("mass")}
    print(dt, {k: round(v, 2) for k, v in res[dt].items()}, "storage", round(e.storage_factor, 3), flush=True)
print({k: round(res["bfloat16"][k] - res[None][k], 2) for k in res[None]})
