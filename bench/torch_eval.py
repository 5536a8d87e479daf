#!/usr/bin/python3
"""PyTorch eager forward of a LLaMA-family checkpoint, for bench/model_eval.sh.

Reads config.json and model.safetensors (parsed with numpy, no extra packages), runs the same
windows as bench_model (token id i of window w = (w * 7919 + i * 104729) % vocab) and prints
one line: `torch tokens_per_s=<x> peak_rss_mb=<y> windows=<n> seq=<s>`.
"""
import json
import resource
import struct
import sys
import time

import numpy as np
import torch


def load(dir_):
    cfg = json.load(open(f"{dir_}/config.json"))
    with open(f"{dir_}/model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    dt = {"F32": np.float32, "F16": np.float16}
    w = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        if info["dtype"] == "BF16":
            raw = np.frombuffer(data[b:e], dtype=np.uint16).astype(np.uint32) << 16
            arr = raw.view(np.float32)
        else:
            arr = np.frombuffer(data[b:e], dtype=dt[info["dtype"]]).astype(np.float32)
        w[name] = torch.from_numpy(arr.reshape(info["shape"]).copy())
    return cfg, w


def rms(x, g, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(cfg, T):
    """cos/sin tables (T x head_dim, rotate-half layout) and the causal mask of T positions."""
    D = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    mask = torch.full((T, T), float("-inf")).triu(1)
    return torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin(), mask


def block(cfg, w, l, x, tables, capture=None):
    """Decoder block l on x (B x T x hidden). capture(name, input), when given, sees the input
    of each group of linears that share it: "qkv", "o", "gate_up", "down"."""
    B, T, _ = x.shape
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    D = cfg.get("head_dim", cfg["hidden_size"] // H)
    eps = cfg["rms_norm_eps"]
    cos, sin, mask = tables
    p = f"model.layers.{l}."
    h = rms(x, w[p + "input_layernorm.weight"], eps)
    if capture:
        capture("qkv", h)
    q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, D).transpose(1, 2)
    k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, KV, D).transpose(1, 2)
    v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, KV, D).transpose(1, 2)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(H // KV, dim=1)
    v = v.repeat_interleave(H // KV, dim=1)
    att = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5 + mask, dim=-1)
    o = (att @ v).transpose(1, 2).reshape(B, T, H * D)
    if capture:
        capture("o", o)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    h = rms(x, w[p + "post_attention_layernorm.weight"], eps)
    if capture:
        capture("gate_up", h)
    a = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
    if capture:
        capture("down", a)
    return x + a @ w[p + "mlp.down_proj.weight"].T


def forward(cfg, w, ids):
    tables = rope(cfg, ids.shape[1])
    x = w["model.embed_tokens.weight"][ids]
    for l in range(cfg["num_hidden_layers"]):
        x = block(cfg, w, l, x, tables)
    x = rms(x, w["model.norm.weight"], cfg["rms_norm_eps"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def main():
    dir_, windows, seq, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    cfg, w = load(dir_)
    vocab = cfg["vocab_size"]
    ids = torch.tensor([[(wi * 7919 + i * 104729) % vocab for i in range(seq)] for wi in range(windows)])
    batch = 8
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            for b in range(0, windows, batch):
                forward(cfg, w, ids[b:b + batch])
            best = min(best, time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch tokens_per_s={windows * seq / best:.0f} peak_rss_mb={rss:.0f} windows={windows} seq={seq}")


if __name__ == "__main__":
    main()
