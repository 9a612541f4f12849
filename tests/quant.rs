//! Block formats against hand-computed blocks, and the fast dot kernels against f32 math.

mod common;

use common::assert_close;
use flint::backend::dot::{self, Isa, Q8Row};
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

/// Every instruction set's kernels agree, and match f32 math on the dequantized weights and
/// activations. Lengths: 1, 2, 3, 18 (a SmolLM2 row), 37 and 48 blocks.
#[test]
fn dot_kernels_match_f32_reference() {
    let isas = Isa::available();
    eprintln!("kernels tested: {:?}", isas.iter().map(|i| i.name()).collect::<Vec<_>>());
    if isas.len() < 3 {
        eprintln!("SKIPPED (partly) dot_kernels_match_f32_reference: this processor lacks AVX2 or AVX-512 VNNI; those kernels are untested here");
    }
    for nb in [1usize, 2, 3, 18, 37, 48] {
        let k = nb * 32;
        let w = ramp(k, nb);
        let x = ramp(k, nb + 100);
        let mut act = Q8Act::default();
        act.quantize_into(&x);
        let a = Q8Row { qs: &act.qs, d: &act.d, s: &act.s };
        let xq: Vec<f32> = act.qs.iter().enumerate().map(|(i, &q)| q as f32 * act.d[i / 32]).collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let mut row = Vec::new();
            quantize(ty, &w, &mut row).unwrap();
            let mut wd = vec![0f32; k];
            dequantize(ty, &row, &mut wd).unwrap();
            // Reference: f64 sum over the dequantized weights and the dequantized activations.
            let reference = wd.iter().zip(&xq).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
            let norm = wd.iter().zip(&xq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>() as f32;
            let scalar = dot::dot_q(ty, &row, a, Isa::scalar());
            // Integer block sums are exact; what differs is f32 rounding of the per-block
            // scales and their accumulation: a few ulps of the sum of magnitudes.
            let tol = 1e-5 * norm + 1e-6;
            assert!((scalar - reference).abs() <= tol, "{ty} x{nb}: scalar {scalar} vs {reference}");
            let mut simd_results = Vec::new();
            for &isa in &isas[1..] {
                let v = dot::dot_q(ty, &row, a, isa);
                assert!((v - scalar).abs() <= tol, "{ty} x{nb}: {} {v} vs scalar {scalar}", isa.name());
                simd_results.push(v);
            }
            // AVX2 and VNNI form the same integer sums in the same order: identical bits.
            assert!(simd_results.windows(2).all(|w| w[0] == w[1]), "{ty} x{nb}: SIMD levels differ {simd_results:?}");
        }
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
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

/// The four-token prefill kernel equals four single-token dot products, and the attention
/// helpers (f32 queries against the f16 KV cache) equal f64 math, on lengths that are not multiples of the vector width.
#[test]
fn multi_token_and_attention_kernels_match() {
    for isa in Isa::available() {
        for nb in [1usize, 3, 18] {
            let k = nb * 32;
            let acts: Vec<Q8Act> = (0..4)
                .map(|t| {
                    let mut a = Q8Act::default();
                    a.quantize_into(&ramp(k, 50 + t));
                    a
                })
                .collect();
            let rows: Vec<Q8Row> = acts.iter().map(|a| Q8Row { qs: &a.qs, d: &a.d, s: &a.s }).collect();
            for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
                let mut w = Vec::new();
                quantize(ty, &ramp(k, nb), &mut w).unwrap();
                let four = dot::dot_q_x4(ty, &w, [rows[0], rows[1], rows[2], rows[3]], isa);
                let one: Vec<f32> = rows.iter().map(|&a| dot::dot_q(ty, &w, a, isa)).collect();
                // The same operations in the same order for each token: identical bits.
                assert_eq!(four.to_vec(), one, "{ty} x4 {} nb={nb}", isa.name());
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
        }
    }
}
