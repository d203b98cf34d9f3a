#!/usr/bin/env bash
# The GPU benchmarks in one command, side by side with nanoGPT's own model.py, within 8 minutes on one
# H100/H200-class GPU. Writes three JSON files to OUT (default benchmarks/gpu_results/):
#   time_to_loss.json   the baby and baby-modern recipes against nanoGPT's baby GPT, each until validation
#                       loss 1.47 on shakespeare_char (nanoGPT's README: about 3 minutes on an A100), bf16
#   train_speed.json    tokens/s of the baby config in fp32 and mixed_bfloat16, against nanoGPT
#   generate_speed.json 200-token generation against nanoGPT's generate and keras-hub
#   torch_aot_cuda.json PyTorch decoding from the step's AOTInductor package compiled for CUDA (issue 37) against
#                       the traced graph and the eager step on the GPU, while the package builds and after
#                       (torch_aot.py; only where torch sees a GPU, or in the rehearsal)
#
#   NANOGPT=/path/to/nanoGPT bash benchmarks/gpu.sh [OUT]
#   GPU_SH_QUICK=1 NANOGPT=/path/to/nanoGPT bash benchmarks/gpu.sh /tmp/gpu   # a tiny rehearsal on CPU
#
# Needs the package installed with its backend (`pip install -e .[jax]` on a CUDA machine: JAX's CUDA
# wheels, or torch's) and TensorFlow for the tf.data pipeline. KERAS_BACKEND defaults to jax here.
set -euo pipefail
cd "$(dirname "$0")"
: "${NANOGPT:?set NANOGPT to a checkout of karpathy/nanoGPT}"
OUT=${1:-gpu_results}
mkdir -p "$OUT"
export KERAS_BACKEND=${KERAS_BACKEND:-jax} TF_CPP_MIN_LOG_LEVEL=3
PYTHON=${PYTHON:-python3}

if [ -n "${GPU_SH_QUICK:-}" ]; then
  quality=(--steps 20 --eval-every 10 --eval-batches 2 --batch-size 4 --target 3.9)
  speed=(--steps 2 --bursts 1 --batch-size 4)
  generation=(--new-tokens 8 --rounds 1 --batch-sizes 1)
  aot=(--new-tokens 8 --rounds 1 --batch-sizes 1 --building-calls 3 --fresh 1)
else
  quality=(--eval-every 250 --eval-batches 200 --target 1.47)
  speed=(--steps 50 --bursts 3 --batch-size 64)
  generation=(--rounds 3)
  aot=(--rounds 3 --batch-sizes 1,8 --building-calls 30)
fi

start=$(date +%s)
"$PYTHON" train_quality.py --size baby --nanogpt "$NANOGPT" --mixed-precision --stop-at-target \
  --recipes nanogpt modern "${quality[@]}" > "$OUT/time_to_loss.json"
echo "time_to_loss.json after $(( $(date +%s) - start )) s" >&2
"$PYTHON" train_speed.py --backends "$KERAS_BACKEND" --precisions fp32,bf16 --config baby \
  --nanogpt "$NANOGPT" "${speed[@]}" > "$OUT/train_speed.json"
echo "train_speed.json after $(( $(date +%s) - start )) s" >&2
"$PYTHON" generate_speed.py --backends "$KERAS_BACKEND" --nanogpt "$NANOGPT" "${generation[@]}" \
  > "$OUT/generate_speed.json"
echo "generate_speed.json after $(( $(date +%s) - start )) s; results in $OUT" >&2
if "$PYTHON" -c "import sys, torch; sys.exit(not (torch.cuda.is_available() or '${GPU_SH_QUICK:-}'))"; then
  KERAS_BACKEND=torch "$PYTHON" torch_aot.py "${aot[@]}" > "$OUT/torch_aot_cuda.json"
  echo "torch_aot_cuda.json after $(( $(date +%s) - start )) s" >&2
fi
