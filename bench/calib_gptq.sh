#!/usr/bin/env bash
# Whole-model block-sequential GPTQ (W4, per output channel, asymmetric min-max) with quantlab
# against a PyTorch eager implementation of the same pipeline (bench/torch_gptq.py), side by
# side in one run on the same cores and the same calibration windows; and quantlab's
# calibration tokens/s against its evaluation forward's (bench_model) in the same run.
# Issue 9 targets: whole-model GPTQ >= 3x faster than PyTorch; calibration >= 70% of the
# evaluation forward's tokens/s.
#   bash bench/calib_gptq.sh [CHECKPOINT_DIR] [windows=128] [seq=256] [threads=nproc] [true_sequential=false]
# Windows are synthetic token ids (time does not depend on the text): token i of window w is
# (w * 7919 + i * 104729) % vocab, as bench_model. Needs Debian's python3-torch (installed on
# demand).
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=$(realpath "${1:-../shared/data/austen-llama-7m}")
n=${2:-128}
seq=${3:-256}
threads=${4:-$(nproc)}
true_seq=${5:-false}
if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-torch >/dev/null
fi
cmake --build build --target quantlab bench_model -j"$(nproc)" >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
/usr/bin/python3 - "$ckpt" "$n" "$seq" >"$tmp/ids.txt" <<'EOF'
import json, sys
vocab = json.load(open(sys.argv[1] + "/config.json"))["vocab_size"]
n, seq = int(sys.argv[2]), int(sys.argv[3])
# n + 1 windows: quantlab's strided rule over n * seq + seq tokens starts window i at i * seq.
for w in range(n + 1):
    print(" ".join(str((w * 7919 + i * 104729) % vocab) for i in range(seq)))
EOF
cat >"$tmp/run.yaml" <<EOF
workload: {kind: model, path: $ckpt}
calib: {ids: $tmp/ids.txt, n_samples: $n, seq_len: $seq, rule: strided, true_sequential: $true_seq}
eval: {seq_len: $seq, token_ids: [{name: one, path: $tmp/ids.txt, max_windows: 1}]}
quant: [{algorithm: gptq, bits: 4, scheme: asym, scale_dtype: fp32}]
# Two runs: the second finds the checkpoint and windows prepared, so seconds_calib +
# seconds_quant is whole-model GPTQ alone; the layer rows' seconds are the solver's.
sweep: {grid: {seed: [0, 1]}}
output: {path: $tmp/out.h5}
EOF
build/quantlab run "$tmp/run.yaml" --threads "$threads" --quiet >"$tmp/log" 2>&1 || { cat "$tmp/log"; exit 1; }
ours=$(/usr/bin/python3 - "$tmp/out.h5" "$n" "$seq" <<'EOF'
import sys, h5py
runs = h5py.File(sys.argv[1])["runs"]
g = [g for g in runs.values() if g.attrs["seed"] == 1][0]
a, tok = g.attrs, int(sys.argv[2]) * int(sys.argv[3])
total = a["seconds_calib"] + a["seconds_quant"]
solve = float(g["layers"]["seconds"].sum())
print(f"quantlab gptq_seconds={total:.3f} calib_seconds={total - solve:.3f} solve_seconds={solve:.3f} tokens={tok} "
      f"calib_tokens_per_s={tok / (total - solve):.0f} threads={a['threads']}")
EOF
)
eval=$(OMP_NUM_THREADS=$threads build/bench_model "$ckpt" 64 "$seq")
theirs=$(/usr/bin/python3 bench/torch_gptq.py "$ckpt" "$tmp/ids.txt" "$n" "$seq" "$threads" 4 8 "$true_seq")
echo "true_sequential=$true_seq"
echo "$ours"
echo "$theirs"
echo "$eval"
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" <<<"$2"; }
awk -v q="$(field gptq_seconds "$ours")" -v t="$(field gptq_seconds "$theirs")" \
  'BEGIN { printf "ratio torch/quantlab whole-model GPTQ seconds: %.2f (target >= 3.0)\n", t / q }'
awk -v c="$(field calib_tokens_per_s "$ours")" -v e="$(field tokens_per_s "$eval")" \
  'BEGIN { printf "ratio calibration/evaluation tokens/s: %.2f (target >= 0.70)\n", c / e }'
