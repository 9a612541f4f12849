//! The fast CPU path's instruction-set levels and its float dot products (attention over
//! the f16 KV cache, float weights). The quantized matmul kernels are in [`super::packed`].

use crate::quant::GgmlType;
use half::{bf16, f16};

/// One token's activations, quantized (see [`crate::quant::Q8Act`]).
#[derive(Clone, Copy)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8], // (k)
    pub d: &'a [f32], // (k / 32)
    pub s: &'a [f32], // (k / 32)
}

impl crate::quant::Q8Act {
    /// Row `t` of a batch quantized as rows of `k` values.
    pub fn row(&self, t: usize, k: usize) -> Q8Row<'_> {
        let nb = k / crate::quant::QK;
        Q8Row { qs: &self.qs[t * k..(t + 1) * k], d: &self.d[t * nb..(t + 1) * nb], s: &self.s[t * nb..(t + 1) * nb] }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Scalar,
    Avx2,
    /// AVX2 plus AVX-512 VNNI's 256-bit `vpdpbusd` (u8 x i8 dot products in one instruction).
    Vnni,
}

/// The instruction set the kernels use. Only detection makes one, so a safe call can never
/// run instructions the processor lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Isa(pub(crate) Level);

impl Isa {
    pub fn scalar() -> Isa {
        Isa(Level::Scalar)
    }
    /// The best this processor runs, capped by `FLINT_CPU_ISA` where set (`scalar`, `avx2`
    /// or `avx2+avx512vnni`: to measure a lower tier on a machine that has a higher one).
    pub fn detect() -> Isa {
        let all = Isa::available();
        let cap = std::env::var("FLINT_CPU_ISA").ok();
        let best = *all.last().expect("scalar is always available");
        match cap.as_deref().map(|c| all.iter().rev().find(|i| i.name() == c || (c == "vnni" && i.0 == Level::Vnni))) {
            Some(Some(isa)) => *isa,
            Some(None) => {
                eprintln!("FLINT_CPU_ISA={}: not one of this processor's levels ({}); using {}", cap.unwrap_or_default(), all.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "), best.name());
                best
            }
            None => best,
        }
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

/// exp(x) for the softmax, x <= 0: Cephes's expf (x = n ln2 + r, |r| <= ln2/2, a degree-7
/// polynomial; within 2 ulp of libm's over the softmax's range, 1 ulp in most places), in
/// separate multiplies and adds so that the AVX2 lanes give the same bits. Below -87 it
/// returns exp(-87), 1.6e-38: next to the maximum's 1, nothing.
#[inline(always)]
pub(crate) fn exp_softmax(x: f32) -> f32 {
    let x = x.max(EXP_MIN);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI;
    let r = r - n * LN2_LO;
    let mut y = EXP_P[0];
    for c in &EXP_P[1..] {
        y = y * r + c;
    }
    let y = y * (r * r) + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

const EXP_MIN: f32 = -87.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

/// A softmax's numerators in place, `x[i] = exp(x[i] - max)`, and (max, their sum). The sum
/// takes eight lanes (element i into lane i % 8), then ((l0 + l4) + (l1 + l5)) + ((l2 + l6)
/// + (l3 + l7)); `FMA` (AVX2) gives the same bits.
#[inline(always)]
pub(crate) fn softmax_numerators_h<const FMA: bool>(x: &mut [f32]) -> (f32, f32) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut lanes = [0f32; 8];
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA callers run with AVX2, FMA and F16C.
        unsafe {
            lanes = inline_avx2::exp_sub_sum(x, m);
        }
        i = x.len() / 8 * 8;
    }
    for (j, v) in x.iter_mut().enumerate().skip(i) {
        *v = exp_softmax(*v - m);
        lanes[j % 8] += *v;
    }
    let l = lanes;
    (m, ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])))
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

/// [`weighted_sum_h`] for the `h` heads of a GQA group at once: head i's output is
/// `y[i * ys..][..hd]`, its weights `w[i * ws..][..rows]`; the same bits as one call per head.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn weighted_sum_heads_h<const FMA: bool>(y: &mut [f32], ys: usize, w: &[f32], ws: usize, h: usize, rows: usize, hd: usize, v: &[f16], stride: usize) {
    assert!(h >= 1 && (h - 1) * ys + hd <= y.len() && (h - 1) * ws + rows <= w.len() && (rows == 0 || (rows - 1) * stride + hd <= v.len()));
    #[cfg(target_arch = "x86_64")]
    if FMA && hd % 32 == 0 && h <= 4 {
        let (py, pw) = (y.as_mut_ptr(), w.as_ptr());
        // SAFETY: FMA callers run with AVX2, FMA and F16C; the bounds were checked above.
        unsafe {
            match h {
                1 => inline_avx2::weighted_sum_heads::<1>(py, ys, pw, ws, rows, hd, v, stride),
                2 => inline_avx2::weighted_sum_heads::<2>(py, ys, pw, ws, rows, hd, v, stride),
                3 => inline_avx2::weighted_sum_heads::<3>(py, ys, pw, ws, rows, hd, v, stride),
                _ => inline_avx2::weighted_sum_heads::<4>(py, ys, pw, ws, rows, hd, v, stride),
            }
        }
        return;
    }
    for i in 0..h {
        weighted_sum_h::<FMA>(&mut y[i * ys..i * ys + hd], &w[i * ws..i * ws + rows], v, stride);
    }
}

/// Scores of `h` query heads (rows of `q`, `hd` apart) against `rows` f16 key rows
/// (`stride` apart): `out[i * os + j] = dot(q_i, k_j) * scale`, each dot the bits of
/// [`dot8_h`]; each key row is converted once for all heads. `FMA` as for [`dot8_h`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores_heads_h<const FMA: bool>(out: &mut [f32], os: usize, q: &[f32], h: usize, rows: usize, hd: usize, k: &[f16], stride: usize, scale: f32) {
    assert!(h >= 1 && (h - 1) * os + rows <= out.len() && h * hd <= q.len() && (rows == 0 || (rows - 1) * stride + hd <= k.len()));
    #[cfg(target_arch = "x86_64")]
    if FMA && hd % 16 == 0 && hd <= 256 && h <= 8 {
        // SAFETY: FMA callers run with AVX2, FMA and F16C; the bounds were checked above.
        unsafe { inline_avx2::scores_heads(out.as_mut_ptr(), os, q.as_ptr(), h, rows, hd, k, stride, scale) };
        return;
    }
    for j in 0..rows {
        let kr = &k[j * stride..][..hd];
        for i in 0..h {
            out[i * os + j] = dot8_h::<FMA>(&q[i * hd..(i + 1) * hd], kr) * scale;
        }
    }
}

/// [`scores_heads_h`] with checked dispatch (for tests).
#[allow(clippy::too_many_arguments)]
pub fn scores_f16_heads(out: &mut [f32], os: usize, q: &[f32], h: usize, rows: usize, hd: usize, k: &[f16], stride: usize, scale: f32, isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    if isa.simd() {
        // SAFETY: an Isa above scalar exists only where AVX2, FMA and F16C were detected.
        return unsafe { avx2::scores_heads(out, os, q, h, rows, hd, k, stride, scale) };
    }
    scores_heads_h::<false>(out, os, q, h, rows, hd, k, stride, scale)
}

/// [`softmax_numerators_h`] with checked dispatch (for tests).
pub fn softmax_numerators(x: &mut [f32], isa: Isa) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if isa.simd() {
        // SAFETY: an Isa above scalar exists only where AVX2, FMA and F16C were detected.
        return unsafe { avx2::softmax_numerators(x) };
    }
    softmax_numerators_h::<false>(x)
}

/// [`weighted_sum_heads_h`] with checked dispatch (for tests).
#[allow(clippy::too_many_arguments)]
pub fn weighted_sum_f16_heads(y: &mut [f32], ys: usize, w: &[f32], ws: usize, h: usize, rows: usize, hd: usize, v: &[f16], stride: usize, isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    if isa.simd() {
        // SAFETY: an Isa above scalar exists only where AVX2, FMA and F16C were detected.
        return unsafe { avx2::weighted_sum_heads(y, ys, w, ws, h, rows, hd, v, stride) };
    }
    weighted_sum_heads_h::<false>(y, ys, w, ws, h, rows, hd, v, stride)
}

/// [`weighted_sum_h`] with checked dispatch (for tests).
pub fn weighted_sum_f16(y: &mut [f32], w: &[f32], v: &[f16], stride: usize, isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    if isa.simd() {
        // SAFETY: as above.
        return unsafe { avx2::weighted_sum_h(y, w, v, stride) };
    }
    weighted_sum_h::<false>(y, w, v, stride)
}

/// `y += sum_j w[j] * v[j * stride..][..y.len()]` over the f16 rows of `v`, each element
/// one FMA per row in row order; `FMA` as for [`dot8_h`].
#[inline(always)]
pub(crate) fn weighted_sum_h<const FMA: bool>(y: &mut [f32], w: &[f32], v: &[f16], stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if FMA && y.len() % 32 == 0 {
        // SAFETY: as above; the rows are bounds-checked there.
        return unsafe { inline_avx2::weighted_sum_h(y, w, v, stride) };
    }
    for (j, &wj) in w.iter().enumerate() {
        axpy8_h::<FMA>(y, wj, &v[j * stride..][..y.len()]);
    }
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

    /// How many K/V rows ahead the attention loops prefetch.
    const PREFETCH_ROWS: usize = 16;

    /// Every cache line of the f16 row of `hd` values at `p` (a row of 64 spans two).
    #[inline(always)]
    unsafe fn prefetch_row(p: *const f16, hd: usize) {
        let mut b = 0;
        while b < hd * 2 {
            _mm_prefetch((p as *const i8).wrapping_add(b), _MM_HINT_T0);
            b += 64;
        }
        // A row that starts mid-line ends on one more.
        _mm_prefetch((p as *const i8).wrapping_add(hd * 2 - 1), _MM_HINT_T0);
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
    pub unsafe fn weighted_sum_h(y: &mut [f32], w: &[f32], v: &[f16], stride: usize) {
        weighted_sum_heads::<1>(y.as_mut_ptr(), 0, w.as_ptr(), 0, w.len(), y.len(), v, stride)
    }

    /// See [`super::scores_heads_h`]: per key row, its 16-value chunks converted once, then
    /// every head's two alternating FMA chains (as [`dot_h`]) and one horizontal sum.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores_heads(out: *mut f32, os: usize, q: *const f32, h: usize, rows: usize, hd: usize, k: &[f16], stride: usize, scale: f32) {
        let pk = k.as_ptr();
        let mut kr = [_mm256_setzero_ps(); 32];
        for j in 0..rows {
            let row = pk.add(j * stride);
            prefetch_row(row.wrapping_add(PREFETCH_ROWS * stride), hd);
            for (i, r) in kr[..hd / 8].iter_mut().enumerate() {
                *r = load_h(row.add(8 * i));
            }
            for i in 0..h {
                let qi = q.add(i * hd);
                let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for c in (0..hd / 8).step_by(2) {
                    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qi.add(8 * c)), kr[c], s0);
                    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qi.add(8 * c + 8)), kr[c + 1], s1);
                }
                *out.add(i * os + j) = hsum(_mm256_add_ps(s0, s1)) * scale;
            }
        }
    }

    /// H query heads at once over the same f16 value rows (GQA): head h's output at
    /// `y + h * ys`, its weights at `w + h * ws`. Each value row is converted once for all
    /// heads; each output element is one FMA per row, in row order.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn weighted_sum_heads<const H: usize>(y: *mut f32, ys: usize, w: *const f32, ws: usize, rows: usize, hd: usize, v: &[f16], stride: usize) {
        if rows == 0 {
            return;
        }
        assert!(hd % 32 == 0 && v.len() >= (rows - 1) * stride + hd);
        let pv = v.as_ptr();
        // 32 values a pass with up to 3 heads, 16 with more (the accumulators fill the registers).
        let ch = if H <= 3 { 32 } else { 16 };
        let regs = ch / 8;
        for c in (0..hd).step_by(ch) {
            let mut acc = [[_mm256_setzero_ps(); 4]; H];
            for (h, a) in acc.iter_mut().enumerate() {
                for (i, a) in a[..regs].iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(y.add(h * ys + c + 8 * i));
                }
            }
            for j in 0..rows {
                let row = pv.add(j * stride + c);
                if c == 0 {
                    prefetch_row(row.wrapping_add(PREFETCH_ROWS * stride), hd);
                }
                let mut vr = [_mm256_setzero_ps(); 4];
                for (i, r) in vr[..regs].iter_mut().enumerate() {
                    *r = load_h(row.add(8 * i));
                }
                for (h, a) in acc.iter_mut().enumerate() {
                    let wv = _mm256_set1_ps(*w.add(h * ws + j));
                    for i in 0..regs {
                        a[i] = _mm256_fmadd_ps(wv, vr[i], a[i]);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                for (i, a) in a[..regs].iter().enumerate() {
                    _mm256_storeu_ps(y.add(h * ys + c + 8 * i), *a);
                }
            }
        }
    }

    /// [`super::exp_softmax`] of `x[i] - m` in place over the whole 8-value chunks, summed
    /// per lane.
    #[inline(always)]
    pub unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> [f32; 8] {
        let p = x.as_mut_ptr();
        let mv = _mm256_set1_ps(m);
        let mut acc = _mm256_setzero_ps();
        for c in 0..x.len() / 8 {
            let v = _mm256_sub_ps(_mm256_loadu_ps(p.add(8 * c)), mv);
            let v = _mm256_max_ps(v, _mm256_set1_ps(super::EXP_MIN));
            let n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(std::f32::consts::LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            let r = _mm256_sub_ps(v, _mm256_mul_ps(n, _mm256_set1_ps(super::LN2_HI)));
            let r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(super::LN2_LO)));
            let mut y = _mm256_set1_ps(super::EXP_P[0]);
            for c in &super::EXP_P[1..] {
                y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(*c));
            }
            let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0));
            let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
            let y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
            _mm256_storeu_ps(p.add(8 * c), y);
            acc = _mm256_add_ps(acc, y);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
        out
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        dot8_h::<true>(a, b)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum_h(y: &mut [f32], w: &[f32], v: &[f16], stride: usize) {
        super::weighted_sum_h::<true>(y, w, v, stride)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn weighted_sum_heads(y: &mut [f32], ys: usize, w: &[f32], ws: usize, h: usize, rows: usize, hd: usize, v: &[f16], stride: usize) {
        super::weighted_sum_heads_h::<true>(y, ys, w, ws, h, rows, hd, v, stride)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores_heads(out: &mut [f32], os: usize, q: &[f32], h: usize, rows: usize, hd: usize, k: &[f16], stride: usize, scale: f32) {
        super::scores_heads_h::<true>(out, os, q, h, rows, hd, k, stride, scale)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn softmax_numerators(x: &mut [f32]) -> (f32, f32) {
        super::softmax_numerators_h::<true>(x)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(y: &mut [f32], alpha: f32, x: &[f16]) {
        axpy8_h::<true>(y, alpha, x)
    }
}
