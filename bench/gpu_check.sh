#!/usr/bin/env bash
# The GPU check (docs/BENCHMARKS.md, "GPU"): about 5 minutes on one GPU, 8 at most.
#   bash bench/gpu_check.sh [MODEL]          (default: the embedded smollm2-135m)
# 1. a learn step on CUDA in float32 and bfloat16 against CPU float32: logprob and LoRA-gradient
#    agreement, then tokens/s and peak GPU memory of full optimizer steps;
# 2. replay generate --engine vllm on CUDA, score, learn a round-0 adapter on CUDA, generate round 1
#    with that adapter through vLLM, and compare its logprobs with the learner's recompute;
# 3. torchrun with one process per visible GPU (2 at most) on the same store, when there are 2+.
# Needs torch with CUDA, vllm (GPU build) and the replay dev dependencies. Exit status 1 on a FAIL.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-smollm2-135m}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STORE="$(mktemp -d /tmp/replay-gpu-check-XXXXXX)"
status=0
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch ' + torch.__version__"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== learn step: CUDA float32 / bfloat16 vs CPU float32"
timeout 240 python bench/gpu_check.py learn --device cuda --model "$MODEL" || status=1
echo "== generate --engine vllm with a round-0 adapter vs the learner"
timeout 300 python bench/gpu_check.py vllm --device cuda --model "$MODEL" --store "$STORE" || status=1
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
  echo "== torchrun --nproc_per_node 2 (NCCL) vs one process, same global batch"
  common=(learn --store "$STORE/store" --round 0 --lr 1e-4 --micro-batch-size 4 --device cuda --dtype float32)
  timeout 120 python -m replay "${common[@]}" --adapter-name one --grad-accum 4 || status=1
  timeout 120 python -m torch.distributed.run --standalone --nproc_per_node 2 -m replay "${common[@]}" \
    --adapter-name two --grad-accum 2 || status=1
  python - "$STORE/store" <<'PY' || status=1
import sys
from safetensors.torch import load_file
from replay.store import Store
s = Store.open(sys.argv[1])
a, b = (load_file(str(s.adapter_dir(0, n) / "adapter_model.safetensors")) for n in ("one", "two"))
worst = max(float((a[k] - b[k]).abs().max()) for k in a)
print(f"torchrun 2 GPUs vs 1: max |adapter difference| {worst:.2e} -> {'ok' if worst < 1e-4 else 'FAIL'}")
sys.exit(worst >= 1e-4)
PY
fi
rm -rf "$STORE"
exit $status
