#!/usr/bin/python3
"""PyTorch autograd through one decoder block, for bench/block_grad.sh: the block of
bench/torch_eval.py on W windows of T random hidden states (float32), timed forward alone
(no_grad) and forward + backward of L = sum(r * block(x)) with gradients for x and the nine
parameters. Prints `torch fwd_ms=<a> fwd_bwd_ms=<b> ...` (best of 20 after a warm-up)."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_eval import block, load, rope  # noqa: E402


def best_ms(f, reps=20):
    f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    dir_, layer, windows, seq, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(threads)
    cfg, w = load(dir_)
    p = f"model.layers.{layer}."
    for name in list(w):
        if name.startswith(p):
            w[name].requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(windows, seq, cfg["hidden_size"], generator=g, requires_grad=True)
    r = torch.randn(windows, seq, cfg["hidden_size"], generator=g)
    tables = rope(cfg, seq)

    def fwd():
        with torch.no_grad():
            block(cfg, w, layer, x, tables)

    def fwd_bwd():
        for t in [x] + [w[n] for n in w if n.startswith(p)]:
            t.grad = None
        (block(cfg, w, layer, x, tables) * r).sum().backward()

    f, fb = best_ms(fwd), best_ms(fwd_bwd)
    print(f"torch fwd_ms={f:.2f} fwd_bwd_ms={fb:.2f} ratio={fb / f:.2f} windows={windows} seq={seq} threads={threads}")


if __name__ == "__main__":
    main()
