"""Fit a cycle model to the simulated mesh GEMVs and project decode speed on a
WSE-3-sized mesh. Usage: perf_model.py STATS_FILE (the STATS lines `make perf` collects).

Every assumption is a named constant below and is printed with the result."""

import math
import sys

import numpy as np

# --- Assumptions -----------------------------------------------------------------------
PES = 900_000             # WSE-3: about 900,000 PEs
SRAM_BYTES = 48 * 1024    # per PE
WEIGHT_SHARE = 0.75       # of a PE's SRAM for resident weights (the rest: accumulators, code, buffers)
CLOCK_HZ = 1.1e9          # PE clock (not published; WSE-2 estimates are about 1.1 GHz)
HOP_CYCLES = 1            # cycles per mesh hop between regions
# This design's PE: one 32-bit word (four int8 MACs) per cycle; 9 words per Q8_0 block.
# Not modelled: attention over the KV cache, norms, RoPE, SwiGLU, sampling, host I/O; these
# run on other PEs in parallel or are small at short context, so the projection is an
# upper bound on decode speed for short prompts.
CEREBRAS_LLAMA31_8B_TOK_S = 1800  # Cerebras's published Llama 3.1 8B decode figure (about)

WORDS_PER_BLOCK = 9
BLOCKS_PER_PE = int(SRAM_BYTES * WEIGHT_SHARE / 4 / WORDS_PER_BLOCK)


def load(path):
    rows = []
    for line in open(path):
        if not line.startswith("STATS"):
            continue
        kv = dict(x.split("=") for x in line.split()[1:])
        rows.append({k: int(v) for k, v in kv.items()})
    return rows


def features(R, C, M, NB):
    rows_pe = math.ceil(M / R)
    nb_pe = math.ceil(NB / C)
    # Block-rows of MAC work, activation blocks received, rows reduced, mesh span.
    return [rows_pe * nb_pe, nb_pe, rows_pe, R + C, 1.0]


def fit(stats):
    X = np.array([features(s["R"], s["C"], s["M"], s["NB"]) for s in stats], dtype=float)
    y = np.array([s["cycles"] for s in stats], dtype=float)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    pred = X @ coef
    err = np.abs(pred - y) / y
    return coef, err


def gemv_cycles(coef, M, NB, pes):
    """Best rectangle of at most `pes` PEs for an M x NB-block matrix (weights must fit)."""
    best = None
    need = math.ceil(M * NB / BLOCKS_PER_PE)
    if need > pes:
        return None
    for R in sorted({max(1, min(M, int(M / k))) for k in range(1, 4096)} | {1, M}):
        C = max(1, min(NB, pes // R))
        if math.ceil(M / R) * math.ceil(NB / C) > BLOCKS_PER_PE:
            continue
        cyc = float(np.dot(coef, features(R, C, M, NB))) + HOP_CYCLES * math.sqrt(R * C)
        if best is None or cyc < best[0]:
            best = (cyc, R, C)
    return best


def project(coef, name, layers, d, ff, kv, vocab):
    mats = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "gate": (ff, d), "up": (ff, d), "down": (d, ff)}
    per_layer = sum(m * n for m, n in mats.values())
    total = layers * per_layer + vocab * d
    # PEs for each matrix in proportion to its size (all matrices resident at once).
    share = lambda m, n: max(1, int(PES * m * n / total))
    t = {k: gemv_cycles(coef, m, n // 32, share(m, n)) for k, (m, n) in mats.items()}
    head = gemv_cycles(coef, vocab, d // 32, share(vocab, d))
    if any(v is None for v in t.values()) or head is None:
        print(f"{name}: does not fit {PES} PEs of {BLOCKS_PER_PE} blocks")
        return
    # Critical path of a layer: q, k, v in parallel, then o; gate and up in parallel, then down.
    layer = max(t["q"][0], t["k"][0], t["v"][0]) + t["o"][0] + max(t["gate"][0], t["up"][0]) + t["down"][0]
    cycles = layers * layer + head[0]
    tok_s = CLOCK_HZ / cycles
    used = sum(share(m, n) for m, n in mats.values()) * layers + share(vocab, d)
    print(f"{name}: {total / 1e9:.2f}B weights in GEMVs, {used} PEs; per layer {layer:.0f} cycles "
          f"(q {t['q'][1]}x{t['q'][2]} PEs: {t['q'][0]:.0f}, gate {t['gate'][1]}x{t['gate'][2]}: {t['gate'][0]:.0f}); "
          f"lm_head {head[0]:.0f}; {cycles:.0f} cycles per token -> {tok_s:,.0f} tok/s")
    return tok_s


def main():
    stats = load(sys.argv[1])
    if len(stats) < 6:
        sys.exit(f"need at least 6 STATS lines in {sys.argv[1]}, found {len(stats)}")
    coef, err = fit(stats)
    print("fitted GEMV cycles = %.3f * rows_pe*blocks_pe + %.3f * blocks_pe + %.3f * rows_pe + %.3f * (R + C) + %.1f"
          % tuple(coef))
    print(f"fit over {len(stats)} simulated GEMVs: mean |error| {100 * err.mean():.1f}%, max {100 * err.max():.1f}%")
    for s in stats:
        util = s["mac"] / (s["cycles"] * s["R"] * s["C"])
        print(f"  {s['R']}x{s['C']} mesh, {s['M']}x{s['NB'] * 32}: {s['cycles']} cycles, PE utilization {util:.3f}")
    print(f"assumptions: {PES} PEs, {SRAM_BYTES // 1024} KB SRAM each, {int(WEIGHT_SHARE * 100)}% for weights "
          f"({BLOCKS_PER_PE} Q8_0 blocks), {CLOCK_HZ / 1e9:.1f} GHz, {HOP_CYCLES} cycle per hop, "
          "4 int8 MACs per PE per cycle, GEMVs only (attention, norms, sampling not modelled)")
    project(coef, "SmolLM2-135M", 30, 576, 1536, 192, 49152)
    tok = project(coef, "Llama-3.1-8B", 32, 4096, 14336, 1024, 128256)
    if tok:
        print(f"Cerebras's published Llama 3.1 8B figure: about {CEREBRAS_LLAMA31_8B_TOK_S} tok/s; "
              f"this design's GEMV-only projection is {tok / CEREBRAS_LLAMA31_8B_TOK_S:.1f}x that")


if __name__ == "__main__":
    main()
