#!/usr/bin/env python3
"""Independent reference for Flint's Llama forward pass: numpy, float64 activations, weights
dequantized by the `gguf` Python package (not by Flint). Greedy-decodes from token ids.

    python3 tests/reference.py MODEL.gguf --tokens 1,2,3 [--tokens 4,5 ...] --n 8
        -> [{"tokens": [...], "logits": [...]}, ...]   (one object per prompt)

`logits` are the logits after the prompt (for tolerance checks against Flint's backends).
"""
import argparse
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load(path):
    r = GGUFReader(path)
    arch = field(r, "general.architecture")
    assert arch == "llama", arch
    p = lambda k, d=None: field(r, f"llama.{k}", d)
    cfg = dict(
        n_layer=p("block_count"), n_embd=p("embedding_length"), n_head=p("attention.head_count"),
        n_kv=p("attention.head_count_kv", p("attention.head_count")), base=p("rope.freq_base", 10000.0),
        eps=p("attention.layer_norm_rms_epsilon", 1e-5),
    )
    cfg["head_dim"] = cfg["n_embd"] // cfg["n_head"]
    cfg["rope_dims"] = p("rope.dimension_count", cfg["head_dim"])
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        # numpy shape is the GGUF dims reversed: (rows, row_length).
        w[t.name] = a.reshape([int(d) for d in reversed(t.shape.tolist())])
    return cfg, w


def rmsnorm(x, g, eps):
    return x / np.sqrt(np.mean(x * x) + eps) * g


def rope(x, pos, n_heads, hd, dims, base):
    x = x.reshape(n_heads, hd).copy()
    i = np.arange(dims // 2)
    ang = pos * base ** (-2.0 * i / dims)
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[:, 0:dims:2].copy(), x[:, 1:dims:2].copy()
    x[:, 0:dims:2] = a * c - b * s
    x[:, 1:dims:2] = a * s + b * c
    return x.reshape(-1)


def step(cfg, w, cache, tok, pos):
    c = cfg
    hd, nh, nkv = c["head_dim"], c["n_head"], c["n_kv"]
    x = w["token_embd.weight"][tok].copy()
    for l in range(c["n_layer"]):
        g = lambda n: w[f"blk.{l}.{n}.weight"]
        h = rmsnorm(x, g("attn_norm"), c["eps"])
        q = rope(g("attn_q") @ h, pos, nh, hd, c["rope_dims"], c["base"])
        k = rope(g("attn_k") @ h, pos, nkv, hd, c["rope_dims"], c["base"])
        v = g("attn_v") @ h
        cache[l][0].append(k)
        cache[l][1].append(v)
        K = np.stack(cache[l][0]).reshape(pos + 1, nkv, hd)
        V = np.stack(cache[l][1]).reshape(pos + 1, nkv, hd)
        out = np.zeros(nh * hd)
        for head in range(nh):
            kv = head // (nh // nkv)
            sc = K[:, kv, :] @ q[head * hd:(head + 1) * hd] / np.sqrt(hd)
            p = np.exp(sc - sc.max())
            p /= p.sum()
            out[head * hd:(head + 1) * hd] = p @ V[:, kv, :]
        x = x + g("attn_output") @ out
        h = rmsnorm(x, g("ffn_norm"), c["eps"])
        gate, up = g("ffn_gate") @ h, g("ffn_up") @ h
        x = x + g("ffn_down") @ (gate / (1.0 + np.exp(-gate)) * up)
    x = rmsnorm(x, w["output_norm.weight"], c["eps"])
    out_w = w.get("output.weight", w["token_embd.weight"])
    return out_w @ x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True, action="append", help="prompt token ids, comma separated")
    ap.add_argument("--n", type=int, default=8)
    a = ap.parse_args()
    cfg, w = load(a.model)
    results = []
    for prompt in a.tokens:
        toks = [int(t) for t in prompt.split(",")]
        cache = [([], []) for _ in range(cfg["n_layer"])]
        for pos, t in enumerate(toks):
            logits = step(cfg, w, cache, t, pos)
        first = logits
        out = []
        for i in range(a.n):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if i + 1 < a.n:
                logits = step(cfg, w, cache, nxt, len(toks) + i)
        results.append({"tokens": out, "logits": [float(v) for v in first]})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
