//! Quantized weights repacked at load for the fast CPU path, and their matmul kernels.
//!
//! Rows are taken eight at a time (a *group*). For each 32-value block, the eight rows'
//! blocks are stored together (a *record*): their f16 scales side by side, then their
//! quants arranged so that one 256-bit register holds four consecutive quants of each of the
//! eight rows (i32 lane r = row r). A broadcast of the four matching activation bytes and
//! one `vpdpbusd` (AVX-512 VNNI) or `vpmaddubsw` (AVX2) then advances all eight rows' dot
//! products at once, and the result lands with row r in lane r: no shuffles, no horizontal
//! sums, and the scales of eight rows convert in one `vcvtph2ps`. A record is exactly as
//! large as the eight GGUF blocks it came from, so decode reads no more bytes than before.
//!
//! Record layouts (`d`: scale, `m`: Q4_1's minimum; quants from byte 16 or 32):
//! - Q4_0 (144 bytes): `d[8]` f16, then four 32-byte registers P0..P3. Byte 4r+i of Pj holds
//!   row r's quant 8j+i in its low nibble and quant 8j+4+i in its high nibble.
//! - Q4_1 (160 bytes): `d[8]`, `m[8]`, then P0..P3 as Q4_0.
//! - Q8_0 (272 bytes): `d[8]`, then eight registers W0..W7; byte 4r+i of Wk is row r's
//!   quant 4k+i.
//!
//! Every output (row, token) goes through the same operations in the same order whatever
//! the batch, the group's other rows, or the SIMD level: a token's logits do not depend on
//! the batch it was computed in (speculative verification relies on this), and AVX2 and
//! VNNI give identical bits (the integer block sums are exact either way).

use super::dot::{Isa, Level, Q8Row};
use crate::quant::{f16_at, GgmlType, QK};
use rayon::prelude::*;

/// Rows per group.
pub const G: usize = 8;

pub struct Packed {
    pub ty: GgmlType,
    /// Values per row.
    pub k: usize,
    pub rows: usize,
    data: Vec<u8>,
}

/// Where a record's quants start.
fn quants_at(ty: GgmlType) -> usize {
    if ty == GgmlType::Q4_1 {
        32
    } else {
        16
    }
}

impl Packed {
    /// Whether this weight type is repacked.
    pub fn supports(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
    }

    pub fn groups(&self) -> usize {
        self.rows.div_ceil(G)
    }

    fn record(&self) -> usize {
        G * self.ty.type_size()
    }

    /// Repack `rows` GGUF rows of `k` values (`bytes`, row after row). The last group's
    /// missing rows are zeros (scale 0: their outputs are 0 and never stored).
    pub fn new(ty: GgmlType, k: usize, rows: usize, bytes: &[u8]) -> Packed {
        assert!(Self::supports(ty) && k % QK == 0);
        let (ts, nb) = (ty.type_size(), k / QK);
        let row_bytes = nb * ts;
        assert!(bytes.len() >= rows * row_bytes);
        let rec = G * ts;
        let mut data = vec![0u8; rows.div_ceil(G) * nb * rec];
        let q0 = quants_at(ty);
        data.par_chunks_mut(nb * rec).enumerate().for_each(|(g, grp)| {
            for (b, out) in grp.chunks_exact_mut(rec).enumerate() {
                for r in 0..G.min(rows - g * G) {
                    let src = &bytes[(g * G + r) * row_bytes + b * ts..][..ts];
                    out[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
                    match ty {
                        GgmlType::Q8_0 => {
                            let q = &mut out[q0..];
                            for k in 0..8 {
                                q[32 * k + 4 * r..32 * k + 4 * r + 4].copy_from_slice(&src[2 + 4 * k..6 + 4 * k]);
                            }
                        }
                        _ => {
                            let s = if ty == GgmlType::Q4_1 {
                                out[16 + 2 * r..18 + 2 * r].copy_from_slice(&src[2..4]);
                                &src[4..20]
                            } else {
                                &src[2..18]
                            };
                            let q = &mut out[q0..];
                            // GGUF: byte j holds quant j (low nibble) and quant j + 16 (high).
                            let quant = |v: usize| if v < 16 { s[v] & 15 } else { s[v - 16] >> 4 };
                            for j in 0..4 {
                                for i in 0..4 {
                                    q[32 * j + 4 * r + i] = quant(8 * j + i) | quant(8 * j + 4 + i) << 4;
                                }
                            }
                        }
                    }
                }
            }
        });
        Packed { ty, k, rows, data }
    }

    /// The group's records (`k / 32` of them).
    fn group(&self, g: usize) -> &[u8] {
        let len = self.k / QK * self.record();
        &self.data[g * len..(g + 1) * len]
    }

    /// Group `g`'s eight rows against N tokens: `out[t][r]` is row 8g+r's dot product with
    /// token t (0 for the padding rows of the last group).
    #[inline]
    pub fn dot_group<const N: usize>(&self, g: usize, a: [Q8Row; N], isa: Isa) -> [[f32; G]; N] {
        let rec = self.group(g);
        let nb = self.k / QK;
        for x in &a {
            assert!(x.qs.len() >= self.k && x.d.len() >= nb && x.s.len() >= nb);
        }
        match isa.0 {
            // SAFETY: an Isa of these levels exists only where detection found their
            // features; the records and activations were checked to hold nb blocks.
            #[cfg(target_arch = "x86_64")]
            Level::Vnni => unsafe { avx2::group_vnni::<N>(self.ty, rec, nb, &a) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { avx2::group::<N>(self.ty, rec, nb, &a) },
            _ => a.map(|a| scalar::group(self.ty, rec, nb, a)),
        }
    }
}

mod scalar {
    use super::*;

    /// The portable kernel (and the oracle of the SIMD ones' integer sums).
    pub fn group(ty: GgmlType, rec: &[u8], nb: usize, a: Q8Row) -> [f32; G] {
        let rs = G * ty.type_size();
        let q0 = quants_at(ty);
        let mut acc = [0f32; G];
        for (b, r) in rec.chunks_exact(rs).take(nb).enumerate() {
            let x = &a.qs[b * QK..(b + 1) * QK];
            let q = &r[q0..];
            for (row, acc) in acc.iter_mut().enumerate() {
                // Quant v of this row, and its value as the block dot product sees it.
                let w = |v: usize| -> i32 {
                    match ty {
                        GgmlType::Q8_0 => q[32 * (v / 4) + 4 * row + v % 4] as i8 as i32,
                        _ => {
                            let (j, i) = (v / 8, v % 8);
                            let byte = q[32 * j + 4 * row + i % 4];
                            (if i < 4 { byte & 15 } else { byte >> 4 }) as i32
                        }
                    }
                };
                let isum: i32 = (0..QK).map(|v| w(v) * x[v] as i32).sum();
                let d = f16_at(r, 2 * row);
                *acc += isum as f32 * (d * a.d[b]);
                match ty {
                    GgmlType::Q4_1 => *acc += f16_at(r, 16 + 2 * row) * a.s[b],
                    // (q - 8) . x = q . x - 8 sum(x)
                    GgmlType::Q4_0 => *acc += (d * -8.0) * a.s[b],
                    _ => {}
                }
            }
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q8_0: u8 = 2;
    /// How far ahead of the record in use decode prefetches, in bytes.
    const PREFETCH: usize = 2048;

    /// The four activation bytes 4k..4k+4 of block b, in every i32 lane.
    #[inline(always)]
    unsafe fn bcast(x: *const i8, off: usize) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(x.add(off) as *const i32))
    }

    #[inline(always)]
    unsafe fn kernel<const N: usize, const TY: u8, const VNNI: bool>(rec: &[u8], nb: usize, a: &[Q8Row; N]) -> [[f32; G]; N] {
        let rs = [144usize, 160, 272][TY as usize];
        let q0 = if TY == Q4_1 { 32 } else { 16 };
        let p = rec.as_ptr();
        let mask = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..nb {
            let r = p.add(b * rs);
            // Decode streams the weights from memory once: ask for them ahead of use.
            if N == 1 {
                for l in (0..rs).step_by(64) {
                    _mm_prefetch(r.add(PREFETCH + l) as *const i8, _MM_HINT_T0);
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(r as *const __m128i));
            let m = match TY {
                Q4_1 => _mm256_cvtph_ps(_mm_loadu_si128(r.add(16) as *const __m128i)),
                Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
                _ => _mm256_setzero_ps(),
            };
            let q = r.add(q0);
            let mut w = [_mm256_setzero_si256(); 8];
            if TY == Q8_0 {
                for (k, w) in w.iter_mut().enumerate() {
                    *w = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                }
            } else {
                for j in 0..4 {
                    let v = _mm256_loadu_si256(q.add(32 * j) as *const __m256i);
                    w[2 * j] = _mm256_and_si256(v, mask);
                    w[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                }
            }
            for t in 0..N {
                let x = a[t].qs.as_ptr().add(b * QK);
                // Quants v of block b: weight register k holds 4k..4k+4 for Q8_0; for Q4,
                // register 2j holds 8j..8j+4 and 2j+1 holds 8j+4..8j+8.
                let xb = |k: usize| bcast(x, 4 * k);
                let isum = if TY == Q8_0 {
                    // Unsigned left operands: |w| against x with w's sign.
                    if VNNI {
                        let mut s0 = _mm256_setzero_si256();
                        let mut s1 = _mm256_setzero_si256();
                        for k in (0..8).step_by(2) {
                            s0 = _mm256_dpbusd_epi32(s0, _mm256_sign_epi8(w[k], w[k]), _mm256_sign_epi8(xb(k), w[k]));
                            s1 = _mm256_dpbusd_epi32(s1, _mm256_sign_epi8(w[k + 1], w[k + 1]), _mm256_sign_epi8(xb(k + 1), w[k + 1]));
                        }
                        _mm256_add_epi32(s0, s1)
                    } else {
                        // Pairs of products fit i16 (2 * 128 * 127), not more: widen each.
                        let mut s = _mm256_setzero_si256();
                        for k in 0..8 {
                            let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w[k], w[k]), _mm256_sign_epi8(xb(k), w[k]));
                            s = _mm256_add_epi32(s, _mm256_madd_epi16(p16, ones));
                        }
                        s
                    }
                } else if VNNI {
                    let mut s0 = _mm256_setzero_si256();
                    let mut s1 = _mm256_setzero_si256();
                    for k in (0..8).step_by(2) {
                        s0 = _mm256_dpbusd_epi32(s0, w[k], xb(k));
                        s1 = _mm256_dpbusd_epi32(s1, w[k + 1], xb(k + 1));
                    }
                    _mm256_add_epi32(s0, s1)
                } else {
                    // Each i16 lane sums two products of 4-bit by 8-bit quants (<= 3810):
                    // eight of them still fit (<= 30480) before one widening.
                    let mut s = _mm256_maddubs_epi16(w[0], xb(0));
                    for k in 1..8 {
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[k], xb(k)));
                    }
                    _mm256_madd_epi16(s, ones)
                };
                let dd = _mm256_mul_ps(d, _mm256_set1_ps(*a[t].d.get_unchecked(b)));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dd, acc[t]);
                if TY != Q8_0 {
                    acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(*a[t].s.get_unchecked(b)), acc[t]);
                }
            }
        }
        let mut out = [[0f32; G]; N];
        for t in 0..N {
            _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group<const N: usize>(ty: GgmlType, rec: &[u8], nb: usize, a: &[Q8Row; N]) -> [[f32; G]; N] {
        match ty {
            GgmlType::Q4_0 => kernel::<N, Q4_0, false>(rec, nb, a),
            GgmlType::Q4_1 => kernel::<N, Q4_1, false>(rec, nb, a),
            _ => kernel::<N, Q8_0, false>(rec, nb, a),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn group_vnni<const N: usize>(ty: GgmlType, rec: &[u8], nb: usize, a: &[Q8Row; N]) -> [[f32; G]; N] {
        match ty {
            GgmlType::Q4_0 => kernel::<N, Q4_0, true>(rec, nb, a),
            GgmlType::Q4_1 => kernel::<N, Q4_1, true>(rec, nb, a),
            _ => kernel::<N, Q8_0, true>(rec, nb, a),
        }
    }
}
