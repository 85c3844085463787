#!/usr/bin/env bash
# Every recipe for a few training steps at bf16 and fp16 on every visible GPU (torchrun, one process each);
# arguments go to gpu_check.py (e.g. --out gpu_check.json).
set -euo pipefail
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then
    echo "error: no CUDA GPU is visible; on a CPU run: python benchmarks/gpu_check.py --device cpu --precisions bf16" >&2
    exit 2
fi
exec torchrun --nproc-per-node "$gpus" "$(dirname "$0")/gpu_check.py" "$@"
