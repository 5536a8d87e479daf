#!/usr/bin/env bash
# Evaluation throughput of quantlab's forward pass against a PyTorch eager implementation of
# the same model, side by side in one run on the same cores (issue target: >= 2x tokens/s).
#   bash bench/model_eval.sh [CHECKPOINT_DIR] [windows] [seq]
# Needs Debian's python3-torch (installed on demand).
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=${1:-../shared/data/austen-llama-7m}
windows=${2:-64}
seq=${3:-256}
threads=$(nproc)
if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-torch >/dev/null
fi
[ -x build/bench_model ] || cmake --build build --target bench_model -j"$threads" >/dev/null
ours=$(OMP_NUM_THREADS=$threads build/bench_model "$ckpt" "$windows" "$seq")
theirs=$(/usr/bin/python3 bench/torch_eval.py "$ckpt" "$windows" "$seq" "$threads")
echo "$ours"
echo "$theirs"
q=$(sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p' <<<"$ours")
t=$(sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p' <<<"$theirs")
awk -v q="$q" -v t="$t" 'BEGIN { printf "ratio quantlab/torch tokens/s: %.2f (target >= 2.0)\n", q / t }'
