#!/usr/bin/env bash
# The GPU checks of issues 3 and 4 in one go, for a session that is lent a CUDA GPU (e.g. through the
# device tool: `bash bench/gpu_targets.sh`). Needs torch, triton, transformers, safetensors, tqdm,
# matplotlib and pytest (the device image has them all); runs from the repository root without installing.
# Writes JSON/PNG/Markdown to $OUT (the device tool's folder) or bench/results, and a log beside them.
# Stages (pass their names; with the device tool, one or two per call: each call has a 10-minute limit, and
# torch.compile's first call per shape can take most of a stage's time):
#   tests   the Triton kernel tests compiled on the GPU (no interpreter) and the model through them
#   micro   lowrank_linear / routing_residuals at the targets' shapes (B/16, batch 64, T=8, bf16)
#   shapes  the same ops at B/32 and L/14 fc1 shapes, batch 8/128, T=8/20
#   e2e     mass bench: B/16 bf16, T=8, batch 1/8/64, mixed and routed, with CUDA graphs
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET MASS_KERNEL_IMPL
py="${PYTHON:-python3}"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_targets.sh: no CUDA GPU here')"

stages=("${@:-tests micro shapes e2e}")
for stage in ${stages[*]}; do
  case "$stage" in
    tests)
      "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_routing.py tests/test_kernels_lowrank.py \
        tests/test_model.py 2>&1 | tee "$out/gpu-kernel-tests.log" ;;
    micro)
      "$py" bench/microbench.py --models B16 --layers attn fc1 fc2 --batches 64 --tasks 8 --topk 1 2 \
        --mix mixed homogeneous --out "$out" --tag gpu-microbench-targets 2>&1 | tee "$out/gpu-microbench.log" ;;
    shapes)
      "$py" bench/microbench.py --models B32 L14 --layers fc1 --batches 8 128 --tasks 8 20 --topk 1 \
        --mix mixed --out "$out" --tag gpu-microbench-shapes 2>&1 | tee "$out/gpu-microbench-shapes.log" ;;
    e2e)
      "$py" -m mass.bench --models B16 --tasks 8 --batches 1 8 64 --mix mixed router --dtype bf16 \
        --out "$out" --tag gpu-e2e-b16 2>&1 | tee "$out/gpu-e2e.log" ;;
    *) echo "gpu_targets.sh: unknown stage '$stage' (tests, micro, shapes, e2e)" >&2; exit 2 ;;
  esac
done
