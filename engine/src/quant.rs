//! GGML tensor types: block layouts, dequantization and quantization, exactly as in GGUF.
//!
//! Block layouts (little endian, `d`/`m` are IEEE f16):
//! - `Q4_0`: 32 values in 18 bytes: `d`, `qs[16]`. Value `j` (0..16) is `(qs[j] & 15) - 8`,
//!   value `j + 16` is `(qs[j] >> 4) - 8`; `x = d * q`.
//! - `Q4_1`: 32 values in 20 bytes: `d`, `m`, `qs[16]`, nibbles as Q4_0 but unsigned; `x = d * q + m`.
//! - `Q8_0`: 32 values in 34 bytes: `d`, `qs[32]` (i8); `x = d * q`.
//! - `F32`, `F16`, `BF16`: one value per element.

use anyhow::{bail, Result};
use half::{bf16, f16};

/// Values per block of every quantized type Flint computes with.
pub const QK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

/// (type, ggml id, name, values per block, bytes per block)
const TYPES: &[(GgmlType, u32, &str, usize, usize)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8K, 15, "Q8_K", 256, 292),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::BF16, 30, "BF16", 1, 2),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        TYPES.iter().find(|t| t.0 == self).expect("every variant is in TYPES")
    }
    pub fn from_id(id: u32) -> Option<Self> {
        TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }
    pub fn from_name(name: &str) -> Option<Self> {
        TYPES.iter().find(|t| t.2.eq_ignore_ascii_case(name)).map(|t| t.0)
    }
    pub fn id(self) -> u32 {
        self.row().1
    }
    pub fn name(self) -> &'static str {
        self.row().2
    }
    pub fn block_size(self) -> usize {
        self.row().3
    }
    pub fn type_size(self) -> usize {
        self.row().4
    }
    /// Types Flint can dequantize and multiply with.
    pub fn is_supported(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16 | Self::Q4_0 | Self::Q4_1 | Self::Q8_0)
    }
    /// Bytes taken by `n` values, or None when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if n % bs != 0 {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The little-endian f16 at byte `i` of `b`, as f32.
#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantize `out.len()` values from `data`, which starts on a block boundary.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    let need = ty.bytes_for(n as u64).ok_or_else(|| {
        anyhow::anyhow!("{n} values are not a whole number of {ty} blocks")
    })? as usize;
    if data.len() < need {
        bail!("{ty}: {n} values need {need} bytes, have {}", data.len());
    }
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(data.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = d * ((b[2 + j] & 15) as i32 - 8) as f32;
                    o[j + 16] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(data.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    o[j] = d * (b[4 + j] & 15) as f32 + m;
                    o[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(data.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for j in 0..QK {
                    o[j] = d * (b[2 + j] as i8) as f32;
                }
            }
        }
        other => bail!("tensor type {other} is not supported (Flint computes with F32, F16, BF16, Q8_0, Q4_0, Q4_1)"),
    }
    Ok(())
}

/// Quantize `x` (a whole number of blocks) into `ty`, appending to `out`.
/// Rounding follows ggml's reference quantizers (`quantize_row_*_ref`).
pub fn quantize(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    if ty.bytes_for(x.len() as u64).is_none() {
        bail!("{} values are not a whole number of {ty} blocks", x.len());
    }
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => x.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => x.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in x.chunks_exact(QK) {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_0 => {
            for b in x.chunks_exact(QK) {
                // The value of largest magnitude maps to -8, keeping its sign.
                let max = b.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).min(15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for b in x.chunks_exact(QK) {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i32).min(15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
        }
        other => bail!("Flint cannot write tensors of type {other}"),
    }
    Ok(())
}

/// Activations quantized to 8 bits per 32-value block, the right-hand side of the fast
/// integer dot products (the same scheme as ggml's Q8_1: `x ~= d * q`, plus `s = d * sum(q)`).
#[derive(Default, Clone)]
pub struct Q8Act {
    pub qs: Vec<i8>,  // (n)
    pub d: Vec<f32>,  // (n / 32)
    pub s: Vec<f32>,  // (n / 32): d * sum(qs of the block)
}

impl Q8Act {
    /// Quantize `x` (a multiple of 32 values), in parallel over the calling thread pool for
    /// large batches. The AVX2 path gives the same bits as the scalar one (round half away
    /// from zero, as `f32::round`).
    pub fn quantize_into(&mut self, x: &[f32]) {
        use rayon::prelude::*;
        debug_assert!(x.len() % QK == 0);
        let nb = x.len() / QK;
        self.qs.resize(x.len(), 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        const CHUNK: usize = 64; // blocks per task
        let work = |((xc, qc), (dc, sc)): ((&[f32], &mut [i8]), (&mut [f32], &mut [f32]))| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was detected.
                return unsafe { q8_avx2(xc, qc, dc, sc) };
            }
            q8_scalar(xc, qc, dc, sc)
        };
        let parts = x.chunks(CHUNK * QK).zip(self.qs.chunks_mut(CHUNK * QK)).zip(self.d.chunks_mut(CHUNK).zip(self.s.chunks_mut(CHUNK)));
        if nb >= 4 * CHUNK {
            parts.collect::<Vec<_>>().into_par_iter().for_each(work);
        } else {
            parts.for_each(work);
        }
    }
}

impl Q8Act {
    /// What quantizing lost: `x - d * q`, value by value (to quantize again where the
    /// 8-bit rounding matters).
    pub fn residual(&self, x: &[f32]) -> Vec<f32> {
        x.iter().zip(&self.qs).enumerate().map(|(i, (v, &q))| v - self.d[i / QK] * q as f32).collect()
    }

    /// The portable quantizer alone (to test the SIMD one against).
    pub fn quantize_reference(&mut self, x: &[f32]) {
        let nb = x.len() / QK;
        self.qs.resize(x.len(), 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        q8_scalar(x, &mut self.qs, &mut self.d, &mut self.s);
    }
}

fn q8_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let db = amax / 127.0;
        let id = if db != 0.0 { 1.0 / db } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        d[b] = db;
        s[b] = db * sum as f32;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn q8_avx2(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / QK;
    assert!(qs.len() >= nb * QK && d.len() >= nb && s.len() >= nb);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    for b in 0..nb {
        let p = x.as_ptr().add(b * QK);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
        let m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)), _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)));
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let db = amax / 127.0;
        let id = _mm256_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|i| {
            let y = _mm256_mul_ps(v[i], id);
            // Round half away from zero: truncate, then step away where |fraction| >= 1/2
            // (the fraction y - trunc(y) is exact).
            let t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let big = _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(y, t), abs), half, _CMP_GE_OQ);
            let step = _mm256_and_ps(big, _mm256_or_ps(one, _mm256_and_ps(y, sign)));
            _mm256_cvttps_epi32(_mm256_add_ps(t, step))
        });
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01)));
        // i32 -> i16 -> i8 packs work within 128-bit lanes: put the values back in order.
        let w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs.as_mut_ptr().add(b * QK) as *mut __m256i, w);
        d[b] = db;
        s[b] = db * total as f32;
    }
}
