#!/usr/bin/env bash
# Every GPU number the README's benchmark section asks for, in one run (~9 minutes on one H100 / H200):
# the step (ViT-B/16, batch 256, bf16; RC-MAE and MAE; eager and torch.compile), the input pipelines
# (torchvision / fast on the node's cores, nvJPEG on the GPU), the end-to-end mode (JPEG folder -> step) and
# the linear-probe grid against one run per head (ViT-B/16, 8 heads).
# JSON results land in $OUT (default output/gpu_session).   Usage: bash benchmarks/gpu_session.sh
set -euo pipefail
OUT=${OUT:-output/gpu_session}
CORES=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__)" | tee -a "$OUT/gpu.txt"
step="python benchmarks/pretrain_throughput.py --batch 256 --precision bf16 --steps 30"
$step --warmup 10 --json "$OUT/step_eager.json"
$step --warmup 20 --compile --json "$OUT/step_compile.json"
python benchmarks/data_throughput.py --images 8192 --workers "$CORES" --json "$OUT/data.json"
for pipeline in fast gpu; do
  $step --warmup 10 --gamma-values 1.0 --data output/bench_jpegs --workers "$CORES" --pipeline $pipeline \
      --json "$OUT/end_to_end_$pipeline.json"
done
python benchmarks/linprobe_grid.py --arch vit_base_patch16 --img-size 224 --images-per-class 128 --batch 256 \
    --epochs 2 --device cuda --precision bf16 --workers "$CORES" --json "$OUT/linprobe_grid.json"
