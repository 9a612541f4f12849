//! Block formats against hand-computed blocks, and the fast matmul kernels against f32 math.

mod common;

use common::assert_close;
use flint::backend::dot::{self, Isa, Q8Row};
use flint::backend::packed::{Packed, G};
use flint::quant::{dequantize, quantize, GgmlType, Q8Act};
use half::{bf16, f16};

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[test]
fn dequantize_hand_computed_blocks() {
    // Q4_0: d = 0.5; byte j holds value j (low nibble) and value j + 16 (high nibble).
    let mut b = h(0.5).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut x = [0f32; 32];
    dequantize(GgmlType::Q4_0, &b, &mut x).unwrap();
    for j in 0..16 {
        assert_eq!(x[j], 0.5 * (j as f32 - 8.0));
        assert_eq!(x[j + 16], 0.5 * (7.0 - j as f32));
    }
    // Q4_1: d = 0.25, m = -1: x = 0.25 q - 1.
    let mut b = h(0.25).to_vec();
    b.extend(h(-1.0));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    dequantize(GgmlType::Q4_1, &b, &mut x).unwrap();
    for j in 0..16 {
        assert_eq!(x[j], 0.25 * j as f32 - 1.0);
        assert_eq!(x[j + 16], 0.25 * (15 - j) as f32 - 1.0);
    }
    // Q8_0: d = 2, q = -16..16.
    let mut b = h(2.0).to_vec();
    b.extend((0..32i32).map(|j| (j - 16) as i8 as u8));
    dequantize(GgmlType::Q8_0, &b, &mut x).unwrap();
    for j in 0..32 {
        assert_eq!(x[j], 2.0 * (j as f32 - 16.0));
    }
    // F16, BF16, F32.
    let vals = [1.0f32, -2.5, 65504.0, 0.0];
    let mut y = [0f32; 4];
    let b: Vec<u8> = vals.iter().flat_map(|v| h(*v)).collect();
    dequantize(GgmlType::F16, &b, &mut y).unwrap();
    assert_eq!(y, vals);
    let b: Vec<u8> = [1.0f32, -2.5, 3.0e38, 0.0].iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
    dequantize(GgmlType::BF16, &b, &mut y).unwrap();
    assert_eq!(y, [1.0, -2.5, bf16::from_f32(3.0e38).to_f32(), 0.0]);
    let b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    dequantize(GgmlType::F32, &b, &mut y).unwrap();
    assert_eq!(y, vals);
}

#[test]
fn block_sizes_match_ggml() {
    for (ty, bs, ts, id) in [
        (GgmlType::F32, 1, 4, 0),
        (GgmlType::F16, 1, 2, 1),
        (GgmlType::Q4_0, 32, 18, 2),
        (GgmlType::Q4_1, 32, 20, 3),
        (GgmlType::Q8_0, 32, 34, 8),
        (GgmlType::BF16, 1, 2, 30),
    ] {
        assert_eq!((ty.block_size(), ty.type_size(), ty.id()), (bs, ts, id), "{ty}");
        assert_eq!(GgmlType::from_id(id), Some(ty));
    }
}

#[test]
fn bad_lengths_are_errors() {
    let mut x = [0f32; 31];
    assert!(dequantize(GgmlType::Q4_0, &[0; 18], &mut x).is_err());
    let mut x = [0f32; 64];
    assert!(dequantize(GgmlType::Q8_0, &[0; 34], &mut x).is_err(), "too few bytes");
    assert!(dequantize(GgmlType::Q6K, &[0; 210], &mut [0f32; 256]).is_err());
}

fn ramp(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919 + seed * 31) % 1000) as f32 / 500.0 - 1.0) * if i % 7 == 0 { 3.0 } else { 1.0 }).collect()
}

/// Quantize then dequantize: each value within half a quantization step of the original.
#[test]
fn quantize_round_trip_error_is_bounded() {
    let x = ramp(32 * 37, 1);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
        let mut b = Vec::new();
        quantize(ty, &x, &mut b).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize(ty, &b, &mut y).unwrap();
        for (blk, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let range = xb.iter().copied().fold(f32::MIN, f32::max) - xb.iter().copied().fold(f32::MAX, f32::min);
            // Half a step of each format, plus f16 rounding of the scale.
            let tol = match ty {
                // q spans -8..7: a value opposite in sign to the block's largest clamps at 7,
                // up to one whole step (amax / 8) away.
                GgmlType::Q4_0 => amax / 8.0 + amax * 2e-3,
                GgmlType::Q4_1 => range / 15.0 * 0.5 + amax * 2e-3,
                GgmlType::Q8_0 => amax / 127.0 * 0.5 + amax * 2e-3,
                GgmlType::F16 => amax * 1e-3,
                GgmlType::BF16 => amax * 8e-3,
                _ => 0.0,
            };
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= tol, "{ty} block {blk}: {a} -> {b} (tol {tol})");
            }
        }
    }
}

fn act(x: &[f32]) -> Q8Act {
    let mut a = Q8Act::default();
    a.quantize_into(x);
    a
}

fn q8row(a: &Q8Act) -> Q8Row<'_> {
    Q8Row { qs: &a.qs, d: &a.d, s: &a.s }
}

/// Every row of a packed matrix against one token, group by group.
fn packed_matvec(p: &Packed, a: Q8Row, isa: Isa) -> Vec<f32> {
    (0..p.groups()).flat_map(|g| p.dot_group(g, [a], isa)[0]).take(p.rows).collect()
}

/// The repacked matmul kernels of every instruction set match f64 math on the dequantized
/// weights and activations, and the SIMD levels agree to the bit. Row lengths of 1, 2, 3,
/// 18 (a SmolLM2 row), 37 and 48 blocks; row counts that leave the last group of eight
/// partly empty (1, 7, 13) or fill it (8, 24).
#[test]
fn packed_kernels_match_f32_reference() {
    let isas = Isa::available();
    eprintln!("kernels tested: {:?}", isas.iter().map(|i| i.name()).collect::<Vec<_>>());
    if isas.len() < 3 {
        eprintln!("SKIPPED (partly) packed_kernels_match_f32_reference: this processor lacks AVX2 or AVX-512 VNNI; those kernels are untested here");
    }
    for nb in [1usize, 2, 3, 18, 37, 48] {
        let k = nb * 32;
        let a = act(&ramp(k, nb + 100));
        let xq: Vec<f32> = a.qs.iter().enumerate().map(|(i, &q)| q as f32 * a.d[i / 32]).collect();
        for rows in [1usize, 7, 8, 13, 24] {
            let w = ramp(rows * k, nb * 10 + rows);
            for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
                let mut bytes = Vec::new();
                quantize(ty, &w, &mut bytes).unwrap();
                let mut wd = vec![0f32; rows * k];
                dequantize(ty, &bytes, &mut wd).unwrap();
                let p = Packed::new(ty, k, rows, &bytes);
                assert_eq!(p.groups(), rows.div_ceil(G));
                let scalar = packed_matvec(&p, q8row(&a), Isa::scalar());
                let mut simd_results = Vec::new();
                for &isa in &isas[1..] {
                    simd_results.push(packed_matvec(&p, q8row(&a), isa));
                }
                for r in 0..rows {
                    let wr = &wd[r * k..(r + 1) * k];
                    let reference = wr.iter().zip(&xq).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
                    let norm = wr.iter().zip(&xq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>() as f32;
                    // Integer block sums are exact; what differs is f32 rounding of the
                    // per-block scales and their accumulation: a few ulps of the sum of
                    // magnitudes.
                    let tol = 1e-5 * norm + 1e-6;
                    assert!((scalar[r] - reference).abs() <= tol, "{ty} {rows}x{nb} row {r}: scalar {} vs {reference}", scalar[r]);
                    for (isa, v) in isas[1..].iter().zip(&simd_results) {
                        assert!((v[r] - reference).abs() <= tol, "{ty} {rows}x{nb} row {r}: {} {} vs {reference}", isa.name(), v[r]);
                    }
                }
                // AVX2 and VNNI form the same exact integer sums, then the same float
                // operations: identical bits.
                assert!(simd_results.windows(2).all(|w| w[0] == w[1]), "{ty} {rows}x{nb}: SIMD levels differ");
            }
        }
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let w = ramp(k, nb);
            let x = ramp(k, nb + 100);
            let mut row = Vec::new();
            quantize(ty, &w, &mut row).unwrap();
            let mut wd = vec![0f32; k];
            dequantize(ty, &row, &mut wd).unwrap();
            let reference = wd.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
            let norm = wd.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>() as f32;
            let v = dot::dot_float(ty, &row, &x);
            assert!((v - reference).abs() <= 1e-5 * norm + 1e-6, "{ty} x{nb}: {v} vs {reference}");
        }
    }
}

/// The SIMD activation quantizer (and its parallel split of large batches) gives the
/// scalar one's bits, ties included: values at exactly half a step round away from zero.
#[test]
fn activation_quantizer_levels_agree() {
    // 300 blocks (the parallel path) with exact ties: block maxima of 127 make the scale 1.
    let mut x = ramp(32 * 300, 9);
    for (b, xb) in x.chunks_mut(32).enumerate() {
        xb[0] = 127.0;
        xb[1 + b % 31] = if b % 2 == 0 { 2.5 } else { -3.5 };
    }
    x[32 * 7..32 * 8].fill(0.0);
    let simd = act(&x);
    let mut scalar = Q8Act::default();
    scalar.quantize_reference(&x);
    assert_eq!(simd.qs, scalar.qs);
    assert_eq!(simd.d, scalar.d);
    assert_eq!(simd.s, scalar.s);
    assert_eq!(simd.qs[32 + 2], -4, "-3.5 rounds away from zero");
    assert_eq!(simd.qs[2 * 32 + 3], 3, "2.5 rounds away from zero");
}

/// The activation quantizer keeps each value within half a step of the block's scale.
#[test]
fn activation_quantizer_is_accurate() {
    let x = ramp(32 * 5, 3);
    let mut a = Q8Act::default();
    a.quantize_into(&x);
    let back: Vec<f32> = a.qs.iter().enumerate().map(|(i, &q)| q as f32 * a.d[i / 32]).collect();
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_close("q8 activations", &back, &x, amax / 127.0 * 0.5 + 1e-6, 0.0);
    for b in 0..5 {
        let s: i32 = a.qs[b * 32..(b + 1) * 32].iter().map(|&q| q as i32).sum();
        assert!((a.s[b] - a.d[b] * s as f32).abs() <= 1e-6 * a.s[b].abs().max(1.0));
    }
}

/// The multi-token kernels equal single-token ones to the bit (a token's logits do not
/// depend on its batch), and the attention helpers (f32 queries against the f16 KV cache)
/// equal f64 math, on lengths that are not multiples of the vector width.
#[test]
fn multi_token_and_attention_kernels_match() {
    for isa in Isa::available() {
        for nb in [1usize, 3, 18] {
            let k = nb * 32;
            let acts: Vec<Q8Act> = (0..4).map(|t| act(&ramp(k, 50 + t))).collect();
            let rows: Vec<Q8Row> = acts.iter().map(q8row).collect();
            for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
                let mut w = Vec::new();
                quantize(ty, &ramp(11 * k, nb), &mut w).unwrap();
                let p = Packed::new(ty, k, 11, &w);
                for g in 0..p.groups() {
                    let one: Vec<[f32; G]> = rows.iter().map(|&a| p.dot_group(g, [a], isa)[0]).collect();
                    assert_eq!(p.dot_group(g, [rows[0], rows[1], rows[2], rows[3]], isa).to_vec(), one, "{ty} x4 {} nb={nb}", isa.name());
                    assert_eq!(p.dot_group(g, [rows[1], rows[2], rows[3]], isa).to_vec(), one[1..], "{ty} x3 {} nb={nb}", isa.name());
                    assert_eq!(p.dot_group(g, [rows[2], rows[3]], isa).to_vec(), one[2..], "{ty} x2 {} nb={nb}", isa.name());
                }
            }
        }
        for n in [1usize, 7, 8, 17, 64, 100] {
            let a = ramp(n, 1);
            let b: Vec<half::f16> = ramp(n, 2).iter().map(|&x| half::f16::from_f32(x)).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * y.to_f64()).sum();
            let norm: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * y.to_f64()).abs()).sum();
            let got = dot::dot_f16(&a, &b, isa);
            // The f16 values are exact in f32; only f32 rounding of the sum remains.
            assert!((got as f64 - want).abs() <= 1e-6 * norm + 1e-7, "dot_f16 n={n} {}: {got} vs {want}", isa.name());
            let mut y = ramp(n, 3);
            let mut y2 = y.clone();
            dot::axpy_f16(&mut y, 0.37, &b, isa);
            y2.iter_mut().zip(&b).for_each(|(y, x)| *y += 0.37 * x.to_f32());
            // FMA rounds once, the plain loop twice: half an ulp apart at most.
            assert_close(&format!("axpy_f16 n={n} {}", isa.name()), &y, &y2, 1e-6, 1e-6);
            // Weighted sum of f16 rows a stride apart: equals an axpy per row, to the bit.
            for hd in [32usize, 64, 96] {
                let stride = hd + 40;
                let v: Vec<half::f16> = ramp(n * stride, 4).iter().map(|&x| half::f16::from_f32(x)).collect();
                let w = ramp(n, 5);
                let mut y = ramp(hd, 6);
                let mut y2 = y.clone();
                dot::weighted_sum_f16(&mut y, &w, &v, stride, isa);
                for (j, &wj) in w.iter().enumerate() {
                    dot::axpy_f16(&mut y2, wj, &v[j * stride..j * stride + hd], isa);
                }
                assert_eq!(y, y2, "weighted_sum_f16 n={n} hd={hd} {}", isa.name());
                // 1 to 5 heads of a GQA group at once: the bits of one call per head.
                for h in 1..=5usize {
                    let (ys, ws) = (hd + 2, n + 3);
                    let w = ramp(h * ws, 7);
                    let mut y = ramp(h * ys, 8);
                    let mut y2 = y.clone();
                    dot::weighted_sum_f16_heads(&mut y, ys, &w, ws, h, n, hd, &v, stride, isa);
                    for i in 0..h {
                        dot::weighted_sum_f16(&mut y2[i * ys..i * ys + hd], &w[i * ws..i * ws + n], &v, stride, isa);
                    }
                    assert_eq!(y, y2, "weighted_sum_f16_heads h={h} n={n} hd={hd} {}", isa.name());
                }
                // Scores of 1 to 5 heads against the same key rows: the bits of dot_f16.
                for h in 1..=5usize {
                    let q = ramp(h * hd, 9);
                    let os = n + 1;
                    let mut out = vec![0f32; h * os];
                    dot::scores_f16_heads(&mut out, os, &q, h, n, hd, &v, stride, 0.125, isa);
                    for i in 0..h {
                        for j in 0..n {
                            let want = dot::dot_f16(&q[i * hd..(i + 1) * hd], &v[j * stride..j * stride + hd], isa) * 0.125;
                            assert_eq!(out[i * os + j], want, "scores_f16_heads h={h} n={n} hd={hd} {}", isa.name());
                        }
                    }
                }
            }
        }
    }
}

/// The softmax's numerators: every SIMD level gives the scalar code's bits (the eight-lane
/// sum included) on lengths around the vector width, and each numerator is within 2 ulp of
/// libm's exp (Cephes's polynomial; measured worst 1 ulp here) over the softmax's range.
#[test]
fn softmax_numerators_match_libm_and_each_other() {
    for len in [1usize, 7, 8, 9, 31, 256] {
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 37 % 101) as f32 - 60.0) * 0.37)
            .collect();
        let (mut want, mut m_want, mut s_want) = (Vec::new(), 0f32, 0f32);
        for isa in Isa::available() {
            let mut y = x.clone();
            let (m, s) = dot::softmax_numerators(&mut y, isa);
            if isa == Isa::available()[0] {
                (want, m_want, s_want) = (y.clone(), m, s);
                let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                assert_eq!(m, max);
                for (&v, &xi) in y.iter().zip(&x) {
                    let e = (xi - max).exp();
                    let ulp = (v.to_bits() as i64 - e.to_bits() as i64).abs();
                    assert!(
                        ulp <= 2,
                        "exp({}) = {v} against libm's {e}: {ulp} ulp",
                        xi - max
                    );
                }
                let total: f64 = y.iter().map(|&v| v as f64).sum();
                assert!(
                    ((s as f64) - total).abs() <= 1e-6 * total,
                    "sum {s} against {total}"
                );
            } else {
                assert_eq!(
                    (y, m.to_bits(), s.to_bits()),
                    (want.clone(), m_want.to_bits(), s_want.to_bits()),
                    "{isa:?} len {len}"
                );
            }
        }
    }
    // The far tail clamps at exp(-87) instead of going to garbage.
    let mut y = vec![0.0, -200.0, -1e30, -88.0, -86.5, 0.0, 0.0, 0.0, -300.0];
    for isa in Isa::available() {
        let mut z = y.clone();
        dot::softmax_numerators(&mut z, isa);
        assert!(
            z.iter().all(|v| v.is_finite() && *v >= 0.0 && *v <= 1.0),
            "{isa:?}: {z:?}"
        );
        assert!(z[1] < 1e-37 && z[4] > 1e-38);
    }
    y.clear();
    assert_eq!(dot::softmax_numerators(&mut y, Isa::available()[0]).1, 0.0);
}
