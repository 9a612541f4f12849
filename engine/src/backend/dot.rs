//! Dot products straight from quantized weight blocks (the fast CPU path).
//!
//! Weights stay in their GGUF blocks; activations are quantized once per matmul to
//! [`Q8Act`] blocks, so a Q4/Q8 block dot product is an exact integer sum scaled once.
//! Each kernel has a scalar version (portable, and the oracle for the SIMD one) and an
//! AVX2 version picked at run time.

use crate::quant::{f16_at, GgmlType, QK};
use half::{bf16, f16};

/// One token's activations, quantized (see [`crate::quant::Q8Act`]).
#[derive(Clone, Copy)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8], // (k)
    pub d: &'a [f32], // (k / 32)
    pub s: &'a [f32], // (k / 32)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Scalar,
    Avx2,
    /// AVX2 plus AVX-512 VNNI's 256-bit `vpdpbusd` (u8 x i8 dot products in one instruction).
    Vnni,
}

/// The instruction set the kernels use. Only detection makes one, so a safe call can never
/// run instructions the processor lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Isa(Level);

impl Isa {
    pub fn scalar() -> Isa {
        Isa(Level::Scalar)
    }
    /// The best this processor runs.
    pub fn detect() -> Isa {
        *Isa::available().last().expect("scalar is always available")
    }
    /// Every level this processor runs, scalar first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa(Level::Scalar)];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                v.push(Isa(Level::Avx2));
                if has!("avx512vnni") && has!("avx512vl") {
                    v.push(Isa(Level::Vnni));
                }
            }
        }
        v
    }
    pub fn simd(self) -> bool {
        self.0 != Level::Scalar
    }
    pub fn name(self) -> &'static str {
        match self.0 {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Vnni => "avx2+avx512vnni",
        }
    }
}

/// Dot product of one quantized weight row (`Q4_0`, `Q4_1` or `Q8_0`) with quantized activations.
#[inline]
pub fn dot_q(ty: GgmlType, row: &[u8], a: Q8Row, isa: Isa) -> f32 {
    dot_q_n(ty, row, [a], isa)[0]
}

/// Four tokens at once against one quantized weight row (prefill): each weight block is
/// unpacked once and used four times.
#[inline]
pub fn dot_q_x4(ty: GgmlType, row: &[u8], a: [Q8Row; 4], isa: Isa) -> [f32; 4] {
    dot_q_n(ty, row, a, isa)
}

/// N tokens at once (N = 2, 3 for the rest of a batch after its groups of four): the same
/// bits per token as [`dot_q`].
#[inline]
pub fn dot_q_n<const N: usize>(ty: GgmlType, row: &[u8], a: [Q8Row; N], isa: Isa) -> [f32; N] {
    match isa.0 {
        // SAFETY: an Isa of these levels exists only where detection found their features.
        #[cfg(target_arch = "x86_64")]
        Level::Vnni => unsafe { avx2::dot_vnni::<N>(ty, row, a) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { avx2::dot::<N>(ty, row, a) },
        _ => a.map(|a| match ty {
            GgmlType::Q4_0 => scalar::dot_q4_0(row, a),
            GgmlType::Q4_1 => scalar::dot_q4_1(row, a),
            _ => scalar::dot_q8_0(row, a),
        }),
    }
}

/// f32 dot product over 8 lanes (the reference attention's scores).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        acc[i & 7] += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// y += alpha * x (the reference attention's weighted sum of values).
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// f32 against f16 dot product (attention over the fast path's f16 KV cache), checked
/// dispatch to the AVX2 code.
pub fn dot_f16(a: &[f32], b: &[f16], isa: Isa) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.simd() {
        // SAFETY: an Isa above scalar exists only where AVX2, FMA and F16C were detected.
        return unsafe { avx2::dot_f16(a, b) };
    }
    dot8_h::<false>(a, b)
}

/// y += alpha * x with f16 `x`, checked dispatch as [`dot_f16`].
pub fn axpy_f16(y: &mut [f32], alpha: f32, x: &[f16], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    if isa.simd() {
        // SAFETY: as above.
        return unsafe { avx2::axpy_f16(y, alpha, x) };
    }
    axpy8_h::<false>(y, alpha, x)
}

/// f32 against f16 dot product, inlined into the attention kernel. With `FMA` it is explicit
/// AVX2, FMA and F16C code: only for callers that run with those features.
#[inline(always)]
pub(crate) fn dot8_h<const FMA: bool>(a: &[f32], b: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA callers run with AVX2, FMA and F16C.
        return unsafe { inline_avx2::dot_h(a, b) };
    }
    let mut acc = [0f32; 8];
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        acc[i & 7] += x * y.to_f32();
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// y += alpha * x with f16 `x`, inlined; `FMA` as for [`dot8_h`].
#[inline(always)]
pub(crate) fn axpy8_h<const FMA: bool>(y: &mut [f32], alpha: f32, x: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as above.
        return unsafe { inline_avx2::axpy_h(y, alpha, x) };
    }
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x.to_f32());
}

/// Intrinsics without a target_feature attribute of their own: they are inlined into the
/// AVX2-compiled kernels that call them, and must only be reached from those.
#[cfg(target_arch = "x86_64")]
mod inline_avx2 {
    use half::f16;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[inline(always)]
    unsafe fn load_h(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[inline(always)]
    pub unsafe fn dot_h(a: &[f32], b: &[f16]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load_h(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), load_h(pb.add(i + 8)), s1);
            i += 16;
        }
        if i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load_h(pb.add(i)), s0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        while i < n {
            s += a[i] * b[i].to_f32();
            i += 1;
        }
        s
    }

    #[inline(always)]
    pub unsafe fn axpy_h(y: &mut [f32], alpha: f32, x: &[f16]) {
        let n = y.len().min(x.len());
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let av = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(av, load_h(px.add(i)), _mm256_loadu_ps(py.add(i))));
            i += 8;
        }
        while i < n {
            y[i] += alpha * x[i].to_f32();
            i += 1;
        }
    }
}

/// Dot product of a float weight row (`F32`, `F16`, `BF16`) with f32 activations.
pub fn dot_float(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    // Chunks of 8 independent lanes so the compiler can keep them in one vector register.
    let mut acc = [0f32; 8];
    let mut buf = [0f32; 64];
    let es = ty.type_size();
    for (xc, rc) in x.chunks(64).zip(row.chunks(64 * es)) {
        let n = xc.len();
        let w = &mut buf[..n];
        match ty {
            GgmlType::F32 => w.copy_from_slice(bytemuck::cast_slice(rc)),
            GgmlType::F16 => {
                use half::slice::HalfFloatSliceExt;
                let h: &[f16] = bytemuck::cast_slice(rc);
                h.convert_to_f32_slice(w);
            }
            _ => {
                for (o, c) in w.iter_mut().zip(rc.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
        for (i, (a, b)) in w.iter().zip(xc).enumerate() {
            acc[i & 7] += a * b;
        }
    }
    acc.iter().sum()
}

pub mod scalar {
    use super::*;

    pub fn dot_q4_0(row: &[u8], a: Q8Row) -> f32 {
        let mut sum = 0f32;
        for (i, b) in row.chunks_exact(18).enumerate() {
            let q8 = &a.qs[i * QK..(i + 1) * QK];
            let mut isum = 0i32;
            for j in 0..16 {
                isum += ((b[2 + j] & 15) as i32 - 8) * q8[j] as i32;
                isum += ((b[2 + j] >> 4) as i32 - 8) * q8[j + 16] as i32;
            }
            sum += f16_at(b, 0) * a.d[i] * isum as f32;
        }
        sum
    }

    pub fn dot_q4_1(row: &[u8], a: Q8Row) -> f32 {
        let mut sum = 0f32;
        for (i, b) in row.chunks_exact(20).enumerate() {
            let q8 = &a.qs[i * QK..(i + 1) * QK];
            let mut isum = 0i32;
            for j in 0..16 {
                isum += (b[4 + j] & 15) as i32 * q8[j] as i32;
                isum += (b[4 + j] >> 4) as i32 * q8[j + 16] as i32;
            }
            sum += f16_at(b, 0) * a.d[i] * isum as f32 + f16_at(b, 2) * a.s[i];
        }
        sum
    }

    pub fn dot_q8_0(row: &[u8], a: Q8Row) -> f32 {
        let mut sum = 0f32;
        for (i, b) in row.chunks_exact(34).enumerate() {
            let q8 = &a.qs[i * QK..(i + 1) * QK];
            let isum: i32 = (0..QK).map(|j| (b[2 + j] as i8) as i32 * q8[j] as i32).sum();
            sum += f16_at(b, 0) * a.d[i] * isum as f32;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// The f16 at byte `i` of `b`, converted by the F16C instruction.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn h(b: *const u8, i: usize) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(b.add(i) as *const u16) as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 16 packed bytes -> 32 nibbles: low nibbles in lanes 0..16, high nibbles in 16..32,
    /// matching the GGUF order of values within a block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let b = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(15);
        let lo = _mm_and_si128(b, m);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        _mm256_set_m128i(hi, lo)
    }

    /// Sum of u8 x i8 products over 32 lanes, as 8 f32 partial sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        // maddubs: pairs of u8*i8 summed to i16; |15*127*2| and |127*128*2| fit in i16.
        let p16 = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q8_0: u8 = 2;

    /// N tokens against one weight row of type `TY`. Every token's result goes through the
    /// same operations in the same order whatever N is, so a token's logits do not depend
    /// on the batch it was computed in (speculative verification relies on this: greedy
    /// output with and without it must be identical to the bit).
    #[inline(always)]
    unsafe fn dot_n<const N: usize, const TY: u8, const VNNI: bool>(row: &[u8], a: [Q8Row; N]) -> [f32; N] {
        let bs = [18, 20, 34][TY as usize];
        let nb = row.len() / bs;
        for x in &a {
            debug_assert!(x.qs.len() >= nb * QK && x.d.len() >= nb && x.s.len() >= nb);
        }
        let p = row.as_ptr();
        // Two accumulator chains per token, so consecutive blocks' FMAs overlap.
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        let mut off = [[0f32; 2]; N];
        for i in 0..nb {
            // The block's 32 weights as maddubs operands, its scale d, and the factor m of
            // s8 = d8 * sum(q8) in its dot product: d * d8 * (w . q8) + m * s8.
            let (w, d, m) = match TY {
                Q4_1 => (nibbles(p.add(i * 20 + 4)), h(p, i * 20), h(p, i * 20 + 2)),
                // (q - 8) . q8 = q . q8 - 8 sum(q8).
                Q4_0 => {
                    let d = h(p, i * 18);
                    (nibbles(p.add(i * 18 + 2)), d, -8.0 * d)
                }
                _ => (_mm256_loadu_si256(p.add(i * 34 + 2) as *const __m256i), h(p, i * 34), 0.0),
            };
            // maddubs wants an unsigned left operand: Q8_0 uses |w| and moves w's sign to x.
            let wu = if TY == Q8_0 { _mm256_sign_epi8(w, w) } else { w };
            for t in 0..N {
                let x = _mm256_loadu_si256(a[t].qs.as_ptr().add(i * QK) as *const __m256i);
                let x = if TY == Q8_0 { _mm256_sign_epi8(x, w) } else { x };
                // Both sum the same four adjacent u8 x i8 products into each i32 lane, without
                // saturation at these ranges: bit-identical results.
                let prod = if VNNI { _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, x)) } else { dot_u8_i8(wu, x) };
                let c = i & 1;
                acc[t][c] = _mm256_fmadd_ps(_mm256_set1_ps(d * *a[t].d.get_unchecked(i)), prod, acc[t][c]);
                if TY != Q8_0 {
                    off[t][c] += m * *a[t].s.get_unchecked(i);
                }
            }
        }
        let mut out = [0f32; N];
        for t in 0..N {
            out[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1])) + off[t][0] + off[t][1];
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<const N: usize>(ty: GgmlType, row: &[u8], a: [Q8Row; N]) -> [f32; N] {
        match ty {
            GgmlType::Q4_0 => dot_n::<N, Q4_0, false>(row, a),
            GgmlType::Q4_1 => dot_n::<N, Q4_1, false>(row, a),
            _ => dot_n::<N, Q8_0, false>(row, a),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn dot_vnni<const N: usize>(ty: GgmlType, row: &[u8], a: [Q8Row; N]) -> [f32; N] {
        match ty {
            GgmlType::Q4_0 => dot_n::<N, Q4_0, true>(row, a),
            GgmlType::Q4_1 => dot_n::<N, Q4_1, true>(row, a),
            _ => dot_n::<N, Q8_0, true>(row, a),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        dot8_h::<true>(a, b)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(y: &mut [f32], alpha: f32, x: &[f16]) {
        axpy8_h::<true>(y, alpha, x)
    }
}
