//! The decoder layer's numeric contract between the GEMVs (docs/hdl.md, "The decoder
//! layer"): RMSNorm, RoPE, the 8-bit activations, attention with its softmax, SwiGLU and the
//! residual adds, each defined to the bit.
//!
//! Floating point here is IEEE-754 binary32 with round to nearest, ties to even, every
//! operation rounded on its own (no fused multiply-add), in the order written: Rust's `f32`
//! arithmetic is exactly that, and so is any FPU's. Division and square root are IEEE's
//! correctly rounded ones. Sums over many values (the norm's sum of squares, the softmax's
//! sums, the weighted values) are exact integers, so a unit may split them over PEs and
//! combine the parts in any order.

use super::{block_term, f16_parts, round_to_f32, Block, QK};
use anyhow::{bail, Result};

/// log2(e) rounded to f32.
pub const LOG2E: f32 = std::f32::consts::LOG2_E;

/// 2^f on [-1/2, 1/2]: a degree-6 polynomial, `EXP2_P[0] + f * (EXP2_P[1] + f * (...))`,
/// fitted for relative error (Lawson's weighted least squares; `EXP2_P[0]` is 1 so that
/// 2^0 = 1). Evaluated in f32 as written, its error against 2^f is below 1.1e-7 relative
/// (1.7 units of 2^-24); `tests/hdl_layer.rs` measures it.
pub const EXP2_P: [f32; 7] = [
    f32::from_bits(0x3f80_0000),
    f32::from_bits(0x3f31_7218),
    f32::from_bits(0x3e75_fdee),
    f32::from_bits(0x3d63_5774),
    f32::from_bits(0x3c1d_96a6),
    f32::from_bits(0x3aaf_9f2a),
    f32::from_bits(0x3920_fdde),
];

/// The contract's 2^t: `t` clamped to at most 126; 0 below -125 (no subnormal results);
/// otherwise `n = round_ties_even(t)`, `f = t - n` (exact, |f| <= 1/2), the polynomial's
/// value at `f` by Horner's rule, times 2^n (exact: an exponent add).
pub fn exp2(t: f32) -> f32 {
    if t < -125.0 {
        return 0.0;
    }
    let t = t.min(126.0);
    let n = t.round_ties_even();
    let f = t - n;
    let mut y = EXP2_P[6];
    for c in EXP2_P[..6].iter().rev() {
        y = y * f + c;
    }
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The logistic function: `1 / (1 + 2^(-x * log2 e))`.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp2(-x * LOG2E))
}

/// SwiGLU's product: `(g * sigmoid(g)) * u`, per element.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| (g * sigmoid(g)) * u).collect()
}

/// The residual add: `x += y`, per element.
pub fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

/// `v >> s`, rounded to nearest, ties to even.
fn shift_rne(v: u128, s: u32) -> u128 {
    if s == 0 {
        return v;
    }
    if s >= 128 {
        return 0; // v < 2^127: below half of 2^s
    }
    let q = v >> s;
    let r = v & ((1u128 << s) - 1);
    let half = 1u128 << (s - 1);
    q + (r > half || (r == half && q & 1 == 1)) as u128
}

/// Inputs to the norm must be below 2^32 in magnitude: their squares then fit the 128-bit
/// accumulator for rows of up to 2^14 values.
pub const NORM_MAX_ABS: f32 = 4_294_967_296.0;
pub const NORM_MAX_LEN: usize = 1 << 14;

/// `x^2` in units of 2^-48, rounded to nearest, ties to even (the exact square has at most
/// 48 significant bits; values below 2^-24.5 in magnitude give 0 or 1 unit).
pub fn square_units(x: f32) -> Result<i128> {
    if !x.is_finite() || x.abs() >= NORM_MAX_ABS {
        bail!("norm input {x} is outside the contract's range (finite, |x| < 2^32)");
    }
    let (e, f) = ((x.to_bits() >> 23) & 255, (x.to_bits() & 0x7f_ffff) as u128);
    let (m, e) = if e == 0 { (f, 1i32) } else { (f | 1 << 23, e as i32) };
    // x = m * 2^(e - 150); x^2 in units of 2^-48 is m^2 * 2^(2e - 300 + 48).
    let sh = 2 * e - 252;
    let sq = m * m;
    Ok(if sh >= 0 { (sq << sh) as i128 } else { shift_rne(sq, (-sh) as u32) as i128 })
}

/// RMSNorm: `S = sum of square_units(x_i)` (exact), `ms = round_f32(S * 2^-48) * fl(1/n)`,
/// `r = 1 / sqrt(ms + eps)` (correctly rounded square root, then division),
/// `y_i = (x_i * r) * w_i`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
    if x.len() != w.len() || x.is_empty() || x.len() > NORM_MAX_LEN {
        bail!("rmsnorm of {} values with {} weights (1 to {NORM_MAX_LEN} values)", x.len(), w.len());
    }
    let mut s = 0i128;
    for &v in x {
        s += square_units(v)?;
    }
    let ms = round_to_f32(s) * (1.0 / x.len() as f32);
    let r = 1.0 / (ms + eps).sqrt();
    Ok(x.iter().zip(w).map(|(&v, &w)| (v * r) * w).collect())
}

/// The cos/sin table for position `pos`: `(cos, sin)` of `pos * f_i` for each of the
/// `rope.inv_freq` frequencies, computed in f64 and rounded to f32. The hardware takes this
/// table as data (it is part of the vectors); the contract starts from its bits.
pub fn rope_table(inv_freq: &[f32], pos: usize) -> Vec<(f32, f32)> {
    inv_freq
        .iter()
        .map(|&f| {
            let (s, c) = (pos as f64 * f as f64).sin_cos();
            (c as f32, s as f32)
        })
        .collect()
}

/// RoPE in place on each `head_dim`-wide head of `x`, adjacent pairs (GGUF's Llama order):
/// `(a, b) -> (a*c - b*s, a*s + b*c)`, each product rounded, then the sum; dimensions past
/// the table's (partial rotary) are left as they are.
pub fn rope(x: &mut [f32], head_dim: usize, cs: &[(f32, f32)]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in cs.iter().enumerate() {
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * c - b * s;
            head[2 * i + 1] = a * s + b * c;
        }
    }
}

/// The softmax's weights are fixed point with this many fraction bits.
pub const P_FRAC_BITS: u32 = 24;

/// The scores' scale folded with the change to base 2: `log2(e) / sqrt(head_dim)`, computed
/// in f64 and rounded to f32.
pub fn score_scale(head_dim: usize) -> f32 {
    (std::f64::consts::LOG2_E / (head_dim as f64).sqrt()) as f32
}

/// The attention's shape: query heads, KV heads, head size (a multiple of 32: whole blocks).
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// Causal attention of one token over `len` cached positions, every vector Q8_0, carried as
/// `terms` Q8_0 terms whose sum it stands for (1: plain Q8_0). `q`: the query's terms, each
/// `n_head * head_dim / 32` blocks; `k`, `v`: per position, its `terms` runs of
/// `n_kv_head * head_dim / 32` blocks, position after position. Query head h reads KV head
/// `h / (n_head / n_kv_head)`. Per head:
/// 1. `s_j = round_f32(sum of the block terms of (K_j, q))` over every pair of terms: the
///    GEMV's exact dot;
/// 2. `t_j = s_j * score_scale(head_dim)`;
/// 3. `M = max_j t_j` (exact: any order);
/// 4. `P_j = round_ties_even(exp2(t_j - M) * 2^24)`, an integer in [0, 2^24];
/// 5. `S = sum_j P_j` and, per output element, `A = sum_j P_j * v_j` over V's terms (the
///    value `q * d` of its block, `d = ±m 2^(E-25)`: the term `P * q * m << (E - 1)`, in units
///    of 2^-48), both exact integers;
/// 6. `o = round_f32(A * 2^-48) * (1 / round_f32(S * 2^-24))`.
///
/// Max and integer sums do not depend on the order: the positions may be spread over PEs,
/// each reducing its own, and the parts combined in any order (max first, then the sums).
pub fn attention(q: &[Vec<Block>], k: &[Block], v: &[Block], terms: usize, len: usize, h: Heads) -> Result<Vec<f32>> {
    let hb = h.head_dim / QK;
    let kvb = h.n_kv_head * hb;
    let row = terms * kvb; // blocks per position
    if h.head_dim % QK != 0 || h.n_kv_head == 0 || h.n_head % h.n_kv_head != 0 || terms == 0 {
        bail!("attention heads {h:?}: head size a multiple of {QK}, query heads a multiple of KV heads");
    }
    if q.len() != terms || q.iter().any(|q| q.len() != h.n_head * hb) || k.len() < len * row || v.len() < len * row || len == 0 {
        bail!("attention over {len} positions: {} query terms, {} key, {} value blocks", q.len(), k.len(), v.len());
    }
    let group = h.n_head / h.n_kv_head;
    let c = score_scale(h.head_dim);
    let mut out = Vec::with_capacity(h.n_head * h.head_dim);
    let mut t = vec![0f32; len];
    for head in 0..h.n_head {
        let kvo = (head / group) * hb;
        for (j, tj) in t.iter_mut().enumerate() {
            let mut acc = 0i128;
            for qt in q {
                for kt in 0..terms {
                    for (kb, qb) in k[j * row + kt * kvb + kvo..][..hb].iter().zip(&qt[head * hb..(head + 1) * hb]) {
                        acc += block_term(kb, qb)?;
                    }
                }
            }
            *tj = round_to_f32(acc) * c;
        }
        let m = t.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0i128;
        let mut a = vec![0i128; h.head_dim];
        for (j, &tj) in t.iter().enumerate() {
            let p = (exp2(tj - m) * (1u32 << P_FRAC_BITS) as f32).round_ties_even() as i128;
            s += p;
            if p == 0 {
                continue;
            }
            for vt in 0..terms {
                for (b, vb) in v[j * row + vt * kvb + kvo..][..hb].iter().enumerate() {
                    let (neg, mv, ev) = f16_parts(vb.d)?;
                    let pm = p * mv as i128;
                    for (i, &qv) in vb.qs.iter().enumerate() {
                        let term = (pm * qv as i128) << (ev - 1);
                        a[b * QK + i] += if neg { -term } else { term };
                    }
                }
            }
        }
        let inv = 1.0 / round_to_f32(s << (48 - P_FRAC_BITS));
        out.extend(a.iter().map(|&a| round_to_f32(a) * inv));
    }
    Ok(out)
}

/// The floating-point unit bench's cases (`fp.hex`): `(op, a, b, expected)` with op 0 for
/// `a * b`, 1 for `a + b`, 2 for `exp2(a)`, 3 for `a / b`, 4 for `sqrt(|a|)`, on the edges (signed zeros, subnormals in and
/// out, the largest finite values and overflow, exact cancellation, ties) and random values:
/// any finite bit pattern, and values of the layer's usual magnitudes.
pub fn fp_cases(seed: u64) -> Vec<[u32; 4]> {
    let mut next = super::xorshift(seed);
    let f = f32::from_bits;
    let edges: Vec<f32> = vec![
        0.0, -0.0, 1.0, -1.0, 1.5, 0.5, -0.5, 2.5, 3.0, f(1), f(2), f(0x007f_ffff), f(0x0080_0000), f(0x0080_0001), f32::MAX, -f32::MAX,
        f(0x3f80_0001), f(0x3f7f_ffff), 1e-20, -3e-39, 65504.0, 1.0 / 3.0, 16_777_216.0, 16_777_217.0, 8_388_608.5, -125.0, -125.5, 126.0, 127.0, 200.0,
    ];
    let mut out = Vec::new();
    let mut push = |op: u32, a: f32, b: f32| {
        let want = match op {
            0 => a * b,
            1 => a + b,
            2 => exp2(a),
            3 => a / b,
            _ => a.sqrt(),
        };
        out.push([op, a.to_bits(), b.to_bits(), want.to_bits()]);
    };
    for &a in &edges {
        for &b in &edges {
            push(0, a, b);
            push(1, a, b);
        }
        push(1, a, -a);
        push(2, a, 0.0);
        push(4, a.abs(), 0.0);
        for &b in edges.iter().filter(|b| **b != 0.0) {
            push(3, a, b);
        }
    }
    let finite = |x: u64| {
        let b = x as u32;
        if (b >> 23) & 255 == 255 { f(b & 0xff7f_ffff) } else { f(b) }
    };
    for _ in 0..2000 {
        let (a, b) = (finite(next()), finite(next()));
        push(0, a, b);
        push(1, a, b);
        // Nearby exponents: cancellation and carries.
        let c = f((a.to_bits() & 0xff80_0000) | (next() as u32 & 0x007f_ffff));
        push(1, a, -c);
        let u = |x: u64| (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        let (x, y) = (u(next()) * 64.0, u(next()) * 4.0);
        push(0, x, y);
        push(1, x, y);
        push(2, x * 2.2, 0.0);
        push(2, u(next()) * 0.5, 0.0);
        if b != 0.0 {
            push(3, a, b);
        }
        push(4, a.abs(), 0.0);
        push(3, 1.0, x.abs() + 1.0);
        push(4, x.abs(), 0.0);
    }
    out
}
