"""Fit cycle models to the simulated mesh GEMVs and the layer's units, and project decode
speed on a WSE-3-sized mesh. Usage: perf_model.py PERF_FILE (the STATS and UNIT lines
`make perf` collects; UNIT lines need MODEL=).

Every assumption is a named constant below and is printed with the result."""

import functools
import math
import sys

import numpy as np

# --- Assumptions -----------------------------------------------------------------------
PES = 900_000             # WSE-3: about 900,000 PEs
SRAM_BYTES = 48 * 1024    # per PE
WEIGHT_SHARE = 0.75       # of a GEMV PE's SRAM for resident weights (the rest: accumulators, code, buffers)
KV_SHARE = 0.75           # of an attention PE's SRAM for its slice of the KV cache
CLOCK_HZ = 1.1e9          # PE clock (not published; WSE-2 estimates are about 1.1 GHz)
HOP_CYCLES = 1            # cycles per mesh hop between regions
# This design's PE: one 32-bit word (four int8 MACs) per cycle; 9 words per Q8_0 block.
# The units (norms, RoPE, SwiGLU, residual adds) run on the PEs at the east edge of the GEMV
# region whose outputs they take, one unit per mesh row of it, each on its rows' share of
# the vector; RMSNorm's exact 128-bit partial sums of squares meet in a binary tree over them
# and its scale comes back down it (4 words each way, pipelined: see tree()). Attention: each KV head's
# positions are split evenly over the attention PEs given to it, each PE holding its slice
# of the cache; the max, then the exact sums (S and the head's values, 4 words each) meet in
# a binary tree. Region to region: the vector crosses sqrt(region PEs) hops.
# Not modelled: sampling beyond the argmax, host I/O, the prompt (prefill).
CEREBRAS_LLAMA31_8B_TOK_S = 1800  # Cerebras's published Llama 3.1 8B decode figure (about)

# Weight types on the mesh, by words a block (the STATS lines' BW): Q8_0 9, Q4_1 5.
WEIGHT_TYPES = {9: "Q8_0", 5: "Q4_1"}


def blocks_per_pe(bw):
    return int(SRAM_BYTES * WEIGHT_SHARE / 4 / bw)


def load(path, tag):
    rows = []
    for line in open(path):
        if not line.startswith(tag):
            continue
        kv = dict(x.split("=") for x in line.split()[1:])
        rows.append({k: (v if k == "name" else int(v)) for k, v in kv.items()})
    return rows


def features(R, C, M, NB):
    rows_pe = math.ceil(M / R)
    nb_pe = math.ceil(NB / C)
    # Block-rows of MAC work, activation blocks received, rows reduced, mesh span.
    return [rows_pe * nb_pe, nb_pe, rows_pe, R + C, 1.0]


def fit(stats, base=None):
    """Least squares of the features; with `base` (the Q8_0 fit), only the block-row term is
    fitted and the rest taken from it: another weight type changes the words a block-row
    reads, not the activation stream or the reduction."""
    X = np.array([features(s["R"], s["C"], s["M"], s["NB"]) for s in stats], dtype=float)
    y = np.array([s["cycles"] for s in stats], dtype=float)
    if base is None:
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    else:
        rest = y - X[:, 1:] @ np.array(base[1:])
        a = float(X[:, 0] @ rest / (X[:, 0] @ X[:, 0]))
        coef = np.array([a, *base[1:]])
    pred = X @ coef
    err = np.abs(pred - y) / y
    return coef, err


@functools.lru_cache(maxsize=None)
def gemv_cycles(w, M, NB, pes):
    """Best rectangle of at most `pes` PEs for an M x NB-block matrix (weights must fit);
    `w` is (the fitted coefficients, words a weight block)."""
    coef, bw = w
    bpp = blocks_per_pe(bw)
    best = None
    need = math.ceil(M * NB / bpp)
    if need > pes:
        return None
    for R in sorted({max(1, min(M, int(M / k))) for k in range(1, 4096)} | {1, M}):
        C = max(1, min(NB, pes // R))
        if math.ceil(M / R) * math.ceil(NB / C) > bpp:
            continue
        cyc = float(np.dot(coef, features(R, C, M, NB))) + HOP_CYCLES * math.sqrt(R * C)
        if best is None or cyc < best[0]:
            best = (cyc, R, C)
    return best


# Words through a unit's port per element of its vector (the design: RMSNorm takes x in,
# then sends each value into its quantizer; RoPE and the residual's pass one; SwiGLU takes gate
# and up on one port). The rest of a unit's cycles is its fill and drain, measured.
UNIT_WORDS = {"attn_norm": 2, "ffn_norm": 2, "residual": 2, "rope_q": 1, "rope_k": 1, "v_q8": 1, "swiglu": 2}
UNIT_LEN = {"attn_norm": "d", "ffn_norm": "d", "residual": "d", "rope_q": "qd", "rope_k": "kvd", "v_q8": "kvd", "swiglu": "ff"}


def fit_units(units):
    """Per unit: the fill (cycles beyond UNIT_WORDS per element, the most seen); attention:
    cycles = heads * (a * positions + b), per number of terms, by least squares."""
    fill = {}
    for u in units:
        if u["name"] in UNIT_WORDS:
            n = u["in"] // (2 if u["name"] == "swiglu" else 1)
            fill[u["name"]] = max(fill.get(u["name"], 0), u["cycles"] - UNIT_WORDS[u["name"]] * n)
    attn = {}
    for terms in sorted({u["terms"] for u in units}):
        pts = sorted({(u["pos"] + 1, u["cycles"] / u["heads"]) for u in units if u["name"] == "attention" and u["terms"] == terms})
        if len(pts) >= 2:
            X = np.array([[l, 1.0] for l, _ in pts])
            y = np.array([c for _, c in pts])
            (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
            err = max(abs(a * l + b - c) / c for l, c in pts)
            hb = next(u["hb"] for u in units if u["name"] == "attention")
            attn[terms] = (a, b, hb, len(pts), err)
    return fill, attn


def tree(p, words):
    """A binary-tree reduction over p PEs of `words` words, pipelined as the mesh's partial
    sums are (low word first, each level adding as the words arrive): the words once, then a
    hop and an add a level."""
    return words + math.ceil(math.log2(p)) * (HOP_CYCLES + 1) if p > 1 else 0


def project_layer(w, fill, attn, name, m, ctx, terms, attn_share):
    """One token's cycles through the whole model at context `ctx`; None if it does not fit."""
    layers, d, ff, kv, heads, hd, vocab = m
    mats = {"q": (heads * hd, d), "k": (kv, d), "v": (kv, d), "o": (d, heads * hd), "gate": (ff, d), "up": (ff, d), "down": (d, ff)}
    total = layers * sum(a * b for a, b in mats.values()) + vocab * d
    gemv_pes = PES * (1 - attn_share)
    share = lambda a, b: max(1, int(gemv_pes * a * b / total))
    # Two terms: every activation block twice against its weight block.
    t = {k: gemv_cycles(w, a, terms * b // 32, share(a, b)) for k, (a, b) in mats.items()}
    head = gemv_cycles(w, vocab, terms * d // 32, share(vocab, d))
    if any(v is None for v in t.values()) or head is None:
        return None
    # The attention PEs of a KV head, and its cache slice per PE.
    kv_heads = kv // hd
    per_kvh = int(PES * attn_share / (layers * kv_heads))
    if per_kvh < 1:
        return None
    block_bytes = 9 * 4  # a Q8_0 block as the mesh stores it (9 words)
    slice_pos = math.ceil(ctx / per_kvh)
    cache_bytes = slice_pos * 2 * terms * (hd // 32) * block_bytes
    if cache_bytes > SRAM_BYTES * KV_SHARE:
        return None
    a, b, hb_fit, _, _ = attn[terms]
    # The fit's cost per position scales with the head's blocks (hd / 32).
    a_h = (a - 1) * (hd / 32) / hb_fit + 1
    group = heads // kv_heads
    attention = group * (a_h * slice_pos + b * (hd / 32) / hb_fit + tree(per_kvh, 2) + tree(per_kvh, 4 * (hd + 1)))
    unit = lambda u, n, rows: UNIT_WORDS[u] * math.ceil(n / rows) + fill[u]
    hop = lambda pes: HOP_CYCLES * math.sqrt(pes)
    rows = lambda k: t[k][1]
    norm = lambda rows_in: unit("attn_norm", d, rows_in) + 2 * tree(rows_in, 4)
    parts = {
        "gemv": max(t["q"][0], t["k"][0], t["v"][0]) + t["o"][0] + max(t["gate"][0], t["up"][0]) + t["down"][0],
        "norms": norm(rows("down")) + norm(rows("o")),
        "rope": unit("rope_q", heads * hd, rows("q")),
        "attention": attention,
        "swiglu": unit("swiglu", ff, rows("gate")),
        "residual": unit("residual", d, rows("down")),
        "transfers": sum(hop(share(a, b)) for a, b in mats.values()) + 2 * hop(per_kvh * kv_heads),
    }
    layer = sum(parts.values())
    cycles = layers * layer + head[0] + norm(rows("down")) + math.ceil(vocab / head[1]) + tree(head[1], 2)
    return cycles, parts, layer, per_kvh, cache_bytes


ATTN_SHARES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def project(w, fill, attn, name, m, ctx, terms):
    """The best split of the PEs between the GEMV regions and attention, and its figures."""
    best = None
    for share in ATTN_SHARES:
        r = project_layer(w, fill, attn, name, m, ctx, terms, share)
        if r and (best is None or r[0] < best[1][0]):
            best = (share, r)
    if best is None:
        print(f"  {name}, {WEIGHT_TYPES[w[1]]} weights, at {ctx:,} positions, {terms} term(s): does not fit {PES:,} PEs")
        return None
    share, (cycles, parts, layer, per_kvh, cache_bytes) = best
    tok_s = CLOCK_HZ / cycles
    detail = ", ".join(f"{k} {v:,.0f}" for k, v in parts.items())
    print(f"  {name}, {WEIGHT_TYPES[w[1]]} weights, at {ctx:,} positions, {terms} term(s): {tok_s:,.0f} tok/s ({cycles:,.0f} cycles a token; "
          f"{int(share * 100)}% of the PEs for attention, {per_kvh:,} a KV head, {cache_bytes / 1024:.1f} KB of cache each); "
          f"a layer {layer:,.0f} cycles: {detail}")
    return tok_s


def gemv_only(w, name, m):
    """The earlier projection (GEMVs only, all PEs for weights), for comparison."""
    layers, d, ff, kv, heads, hd, vocab = m
    mats = [(heads * hd, d), (kv, d), (kv, d), (d, heads * hd), (ff, d), (ff, d), (d, ff)]
    total = layers * sum(a * b for a, b in mats) + vocab * d
    t = [gemv_cycles(w, a, b // 32, max(1, int(PES * a * b / total)))[0] for a, b in mats]
    head = gemv_cycles(w, vocab, d // 32, max(1, int(PES * vocab * d / total)))[0]
    cycles = layers * (max(t[0:3]) + t[3] + max(t[4:6]) + t[6]) + head
    return CLOCK_HZ / cycles


MODELS = {
    # layers, width, FFN, KV width, heads, head size, vocabulary
    "SmolLM2-135M": (30, 576, 1536, 192, 9, 64, 49152),
    "Llama-3.1-8B": (32, 4096, 14336, 1024, 32, 128, 128256),
}


def main():
    stats = load(sys.argv[1], "STATS")
    units = load(sys.argv[1], "UNIT")
    weights = {}
    for bw, label in WEIGHT_TYPES.items():  # Q8_0 first: the other types' fits build on it
        st = [x for x in stats if x.get("BW", 9) == bw]
        if len(st) < 6:
            if bw == 9:
                sys.exit(f"need at least 6 Q8_0 STATS lines in {sys.argv[1]}, found {len(st)}")
            print(f"{label}: {len(st)} STATS lines, fewer than the 6 a fit needs")
            continue
        coef, err = fit(st, None if bw == 9 else weights[9][0])
        weights[bw] = (tuple(float(c) for c in coef), bw)
        print(f"fitted {label} GEMV cycles = %.3f * rows_pe*blocks_pe + %.3f * blocks_pe + %.3f * rows_pe + %.3f * (R + C) + %.1f"
              % tuple(coef))
        print(f"fit over {len(st)} simulated GEMVs: mean |error| {100 * err.mean():.1f}%, max {100 * err.max():.1f}%")
        for x in st:
            util = x["mac"] / (x["cycles"] * x["R"] * x["C"])
            print(f"  {x['R']}x{x['C']} mesh, {x['M']}x{x['NB'] * 32}: {x['cycles']} cycles, PE utilization {util:.3f}")

    print(f"assumptions: {PES:,} PEs, {SRAM_BYTES // 1024} KB SRAM each, {int(WEIGHT_SHARE * 100)}% for weights "
          f"({blocks_per_pe(9)} Q8_0 or {blocks_per_pe(5)} Q4_1 blocks) or {int(KV_SHARE * 100)}% for KV cache, "
          f"{CLOCK_HZ / 1e9:.1f} GHz, {HOP_CYCLES} cycle per hop, one weight word a PE per cycle")
    for name, m in MODELS.items():
        print(f"GEMVs only, Q8_0 (attention, norms, transfers left out): {name} {gemv_only(weights[9], name, m):,.0f} tok/s")
    if not units:
        print("no UNIT lines (make perf MODEL=...): the whole-layer projection needs the units' cycles")
        return
    fill, attn = fit_units(units)
    print("units (one per mesh row of the GEMV feeding them): cycles = words per element x elements + fill: "
          + ", ".join(f"{u} {UNIT_WORDS[u]} x n + {f}" for u, f in fill.items()))
    for terms, (a, b, hb, npts, e) in attn.items():
        print(f"attention, {terms} term(s), head of {hb} blocks: cycles = heads x ({a:.2f} x positions + {b:.1f}) "
              f"(fit over {npts} caches, max |error| {100 * e:.2f}%)")
    print("the whole model, one token:")
    tok = {}
    for w in weights.values():
        for name in MODELS:
            for ctx in [1024, 8192, 131072]:
                for terms in sorted(attn):
                    tok[(w[1], name, ctx, terms)] = project(w, fill, attn, name, MODELS[name], ctx, terms)
    for bw, label in WEIGHT_TYPES.items():
        t8 = tok.get((bw, "Llama-3.1-8B", 1024, 1))
        if t8:
            print(f"Cerebras's published Llama 3.1 8B figure: about {CEREBRAS_LLAMA31_8B_TOK_S} tok/s; this design's "
                  f"whole-layer projection at 1k positions, {label} weights, plain Q8_0 activations, is "
                  f"{t8 / CEREBRAS_LLAMA31_8B_TOK_S:.2f}x that")


if __name__ == "__main__":
    main()
