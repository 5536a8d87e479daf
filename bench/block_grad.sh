#!/usr/bin/env bash
# Forward + backward of one decoder block against the forward alone, and against PyTorch
# autograd on the same block, side by side in one run on the same cores (issue 11 targets:
# forward+backward <= 3.5x the forward; faster than PyTorch's forward+backward).
#   bash bench/block_grad.sh [CHECKPOINT_DIR] [block] [windows] [seq]
# Needs Debian's python3-torch (installed on demand).
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=${1:-../shared/data/austen-llama-7m}
layer=${2:-2}
windows=${3:-4}
seq=${4:-256}
threads=$(nproc)
if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-torch >/dev/null
fi
cmake --build build --target bench_block_grad -j"$threads" >/dev/null
ours=$(OMP_NUM_THREADS=$threads build/bench_block_grad "$ckpt" "$layer" "$windows" "$seq")
theirs=$(/usr/bin/python3 bench/torch_block_grad.py "$ckpt" "$layer" "$windows" "$seq" "$threads")
echo "$ours"
echo "$theirs"
get() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$2"; }
awk -v inf="$(get infer_fwd_ms "$ours")" -v f="$(get fwd_ms "$ours")" -v fb="$(get fwd_bwd_ms "$ours")" \
    -v tf="$(get fwd_ms "$theirs")" -v tfb="$(get fwd_bwd_ms "$theirs")" 'BEGIN {
  printf "quantlab fwd+bwd / quantlab inference forward: %.2f (target <= 3.5)\n", fb / inf
  printf "quantlab fwd+bwd / quantlab training forward:  %.2f\n", fb / f
  printf "torch fwd+bwd / quantlab fwd+bwd:              %.2f (target > 1)\n", tfb / fb
  printf "torch forward / quantlab inference forward:    %.2f\n", tf / inf
}'
