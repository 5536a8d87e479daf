#!/usr/bin/python3
"""Block-sequential GPTQ in PyTorch eager, for bench/calib_gptq.sh.

The pipeline quantlab runs for `quant: [{algorithm: gptq, bits: B}]` on a model (GPTQ's
llama.py shape): per block, a forward pass of the FP block over every calibration window
accumulating H = 2/n XᵀX of each group of linears that share an input (q/k/v, o, gate/up,
down), GPTQ on the block's seven linears (lazy batch updates of `blocksize` columns, damping
percdamp * mean diag H, the upper Cholesky factor of H⁻¹; per-output-channel asymmetric min-max
grid), then a forward pass of the quantized block, whose outputs are the next block's inputs.
Windows run `batch` at a time (GPTQ's reference runs one; batching is faster in PyTorch, so
this is the stronger baseline). With TRUE_SEQUENTIAL=1, GPTQ's --true-sequential as its
llama.py does it: per group (q/k/v, o, gate/up, down) a pass of the block with the earlier
groups already quantized captures that group's Hessian, then the group is quantized.

  torch_gptq.py CHECKPOINT_DIR IDS_FILE N SEQ THREADS [BITS=4] [BATCH=8] [TRUE_SEQUENTIAL=0]

IDS_FILE: one window of whitespace-separated token ids per line; the first N are used.
Prints one line: `torch gptq_seconds=<total> calib_seconds=<forward passes + Hessians>
solve_seconds=<GPTQ> tokens=<N*SEQ> ...` (the checkpoint load is not timed).
"""
import sys
import time

import torch

from torch_eval import block, load, rope

# Each linear with the group whose captured input is its calibration input.
LINEARS = [("self_attn.q_proj", "qkv"), ("self_attn.k_proj", "qkv"), ("self_attn.v_proj", "qkv"),
           ("self_attn.o_proj", "o"), ("mlp.gate_proj", "gate_up"), ("mlp.up_proj", "gate_up"),
           ("mlp.down_proj", "down")]


def grid(W, bits):
    """Per-row asymmetric min-max grid (range widened to include 0): scale, zero, maxq."""
    maxq = 2 ** bits - 1
    lo = torch.clamp(W.min(1, keepdim=True).values, max=0)
    hi = torch.clamp(W.max(1, keepdim=True).values, min=0)
    scale = (hi - lo) / maxq
    scale[scale == 0] = 1
    return scale, torch.round(-lo / scale), maxq


def gptq(W, H, bits, blocksize=128, percdamp=0.01):
    """Quantized copy of W (rows = outputs) minimising ||(W - Q) X||² under H = 2/n XᵀX."""
    W = W.clone()
    H = H.clone()
    scale, zero, maxq = grid(W, bits)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i:i + 1]
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
            Q[:, i1 + i:i1 + i + 1] = q
            e = (w - q) / U1[i, i]
            W1[:, i:] -= e @ U1[i:i + 1, i:]
            err[:, i:i + 1] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return Q


def main():
    dir_, ids_path, n, seq, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    bits = int(sys.argv[6]) if len(sys.argv) > 6 else 4
    batch = int(sys.argv[7]) if len(sys.argv) > 7 else 8
    true_sequential = len(sys.argv) > 8 and sys.argv[8] in ("1", "true")
    groups = [["qkv", "o", "gate_up", "down"]] if not true_sequential else [["qkv"], ["o"], ["gate_up"], ["down"]]
    torch.set_num_threads(threads)
    cfg, w = load(dir_)
    with open(ids_path) as f:
        ids = torch.tensor([[int(t) for t in line.split()][:seq] for line in f][:n])
    t0 = time.perf_counter()
    solve = 0.0
    with torch.no_grad():
        tables = rope(cfg, seq)
        x = w["model.embed_tokens.weight"][ids]
        for l in range(cfg["num_hidden_layers"]):
            for stage in groups:
                H, rows = {}, {}

                def capture(name, inp):
                    if name not in stage:
                        return
                    X = inp.reshape(-1, inp.shape[-1])
                    if name not in H:
                        H[name], rows[name] = torch.zeros(X.shape[1], X.shape[1]), 0
                    H[name] += X.T @ X
                    rows[name] += X.shape[0]

                for b in range(0, n, batch):
                    block(cfg, w, l, x[b:b + batch], tables, capture)
                ts = time.perf_counter()
                for name, group in LINEARS:
                    if group in stage:
                        key = f"model.layers.{l}.{name}.weight"
                        w[key] = gptq(w[key], H[group] * (2.0 / rows[group]), bits)
                solve += time.perf_counter() - ts
            x = torch.cat([block(cfg, w, l, x[b:b + batch], tables) for b in range(0, n, batch)])
    total = time.perf_counter() - t0
    print(f"torch gptq_seconds={total:.3f} calib_seconds={total - solve:.3f} solve_seconds={solve:.3f} "
          f"tokens={n * seq} calib_tokens_per_s={n * seq / (total - solve):.0f} threads={threads} batch={batch} "
          f"true_sequential={int(true_sequential)}")


if __name__ == "__main__":
    main()
