//! The CPU backend, in two modes sharing everything but the matmul:
//! - [`CpuMode::Exact`], the reference: every weight row is dequantized to f32 and
//!   multiplied in f32, one plain loop per output value. Every GPU kernel is tested against it.
//! - [`CpuMode::Fast`]: quantized weights are repacked at load, eight rows interleaved
//!   (see [`super::packed`]); activations are quantized per 32-value block once per matmul
//!   and multiplied against them with integer SIMD dot products, up to four tokens per
//!   pass over a group's weights, multi-threaded over groups of rows. No dequantized copy
//!   of the model exists.

use super::dot::{self, Isa};
use super::hot::HotPool;
use super::packed::{Packed, G};
use super::{AttnShape, Backend, Rope};
use crate::gguf::{Gguf, MappedBytes, TensorInfo};
use crate::quant::{dequantize, GgmlType, Q8Act};
use anyhow::{bail, Result};
use half::f16;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    Exact,
    Fast,
}

pub struct Cpu {
    pub mode: CpuMode,
    isa: Isa,
    /// The backend's own threads. A forward pass runs inside the pool, so the calling
    /// thread works as one of them instead of sleeping through each of the ~150 parallel
    /// regions of a decode step.
    pool: rayon::ThreadPool,
    /// The same number of threads, kept spinning between the regions of a forward pass:
    /// the matmuls and attention run on these.
    hot: HotPool,
}

impl Cpu {
    pub fn new(mode: CpuMode) -> Self {
        Self::with_isa(mode, Isa::detect())
    }
    /// A given instruction set (to test the kernels against each other).
    pub fn with_isa(mode: CpuMode, isa: Isa) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("flint-cpu-{i}"))
            .build()
            .expect("cannot start the CPU backend's threads");
        let hot = HotPool::new(pool.current_num_threads());
        Cpu { mode, isa, pool, hot }
    }
}

impl Cpu {
    /// Every matmul: `ws` share their input `x` (`n` rows), quantized once; `precise` (the
    /// logits) adds the products of the quantization's residual.
    fn matmul_q(&self, ws: &[&CpuWeight], x: &[f32], n: usize, outs: &mut [&mut Vec<f32>], precise: bool) -> Result<()> {
        let k = ws[0].k;
        if ws.iter().any(|w| w.k != k) || ws.len() != outs.len() {
            bail!("matmul_many: weights of different row lengths");
        }
        for (w, o) in ws.iter().zip(outs.iter()) {
            debug_assert!(x.len() >= n * k && o.len() >= n * w.rows);
        }
        let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
        let (mut act, mut lo) = (Q8Act::default(), Q8Act::default());
        if ws.iter().any(|w| w.packed.is_some()) {
            act.quantize_into(&x[..n * k]);
            if precise {
                lo.quantize_into(&act.residual(&x[..n * k]));
            }
        }
        // Tasks of `chunk` groups of eight rows over all the weights: enough work each to
        // amortise the scheduling, enough tasks to balance the threads.
        let total: usize = ws.iter().map(|w| w.rows.div_ceil(G)).sum();
        let chunk = (total / (self.pool.current_num_threads() * 8)).clamp(1, 32);
        let tasks: Vec<(usize, usize)> = ws
            .iter()
            .enumerate()
            .flat_map(|(i, w)| (0..w.rows.div_ceil(G)).step_by(chunk).map(move |g| (i, g)))
            .collect();
        let isa = self.isa;
        let exact = self.mode == CpuMode::Exact;
        self.hot.run(tasks.len(), &|ti| {
            let (i, g0) = tasks[ti];
            let mut row = if exact { vec![0f32; k] } else { Vec::new() };
            let w = ws[i];
            let (m, o) = (w.rows, ptrs[i]);
            let rows = g0 * G..((g0 + chunk) * G).min(m);
            // SAFETY (every write below): (t, r) with r in this task's rows is written by
            // this task alone, and lies inside out[i]'s n * m values.
            let put = |t: usize, r: usize, v: f32| unsafe { *{ o }.0.add(t * m + r) = v };
            if let Some(p) = &w.packed {
                let act_row = |t: usize| act.row(t, k);
                for g in rows.start / G..rows.end.div_ceil(G) {
                    let live = G.min(m - g * G);
                    let store = |t0: usize, v: &[[f32; G]]| {
                        for (j, v) in v.iter().enumerate() {
                            // The residual's products, in the same order for every token.
                            let low = precise.then(|| p.dot_group(g, [lo.row(t0 + j, k)], isa)[0]);
                            for (r, &v) in v[..live].iter().enumerate() {
                                put(t0 + j, g * G + r, low.map_or(v, |l| v + l[r]));
                            }
                        }
                    };
                    // Four tokens at a time share each unpacked weight register; the
                    // group's weights stay in L1 across the batch.
                    let n4 = n / 4 * 4;
                    for t in (0..n4).step_by(4) {
                        store(t, &p.dot_group(g, [act_row(t), act_row(t + 1), act_row(t + 2), act_row(t + 3)], isa));
                    }
                    match n - n4 {
                        0 => {}
                        1 => store(n4, &p.dot_group(g, [act_row(n4)], isa)),
                        2 => store(n4, &p.dot_group(g, [act_row(n4), act_row(n4 + 1)], isa)),
                        _ => store(n4, &p.dot_group(g, [act_row(n4), act_row(n4 + 1), act_row(n4 + 2)], isa)),
                    }
                }
            } else if exact {
                // Reference: dequantize the row, then a plain f32 dot product per token.
                for r in rows {
                    w.dequant_row(r, &mut row);
                    for t in 0..n {
                        let mut s = 0f32;
                        for (a, b) in row.iter().zip(&x[t * k..(t + 1) * k]) {
                            s += a * b;
                        }
                        put(t, r, s);
                    }
                }
            } else {
                for r in rows {
                    for t in 0..n {
                        put(t, r, dot::dot_float(w.ty, w.row(r), &x[t * k..(t + 1) * k]));
                    }
                }
            }
        });
        Ok(())
    }
}

/// A weight tensor left in the model file's memory map.
pub struct CpuWeight {
    pub bytes: MappedBytes,
    pub ty: GgmlType,
    pub k: usize,    // values per row
    pub rows: usize, // number of rows
    /// The fast mode's copy of a quantized matrix, repacked for its kernels.
    pub packed: Option<Packed>,
}

impl CpuWeight {
    #[inline]
    pub fn row_bytes(&self) -> usize {
        self.k / self.ty.block_size() * self.ty.type_size()
    }
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes[r * rb..(r + 1) * rb]
    }
    fn dequant_row(&self, r: usize, out: &mut [f32]) {
        dequantize(self.ty, self.row(r), out).expect("row length checked at load");
    }
}

/// Raw output pointer shared by the threads of one matmul; each writes disjoint indices.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the matmul threads write disjoint elements and the owner waits for them all.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// The CPU KV cache: f32 in the exact mode (the reference keeps every bit), f16 in the fast
/// mode (half the memory traffic, which dominates decode at long contexts).
pub enum CpuKv {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Backend for Cpu {
    type Weight = CpuWeight;
    type Buf = Vec<f32>;
    type Kv = CpuKv;

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn name(&self) -> String {
        match self.mode {
            CpuMode::Exact => "cpu-ref (exact f32)".into(),
            CpuMode::Fast => format!(
                "cpu ({} threads, {})",
                self.pool.current_num_threads(),
                self.isa.name()
            ),
        }
    }

    fn load_weight(&self, file: &Gguf, t: &TensorInfo) -> Result<CpuWeight> {
        if !t.ty.is_supported() {
            bail!("tensor {:?} has type {}, which Flint does not support (F32, F16, BF16, Q8_0, Q4_0, Q4_1)", t.name, t.ty);
        }
        let (k, rows) = t.rows_cols();
        let bytes = file.tensor_bytes(t);
        // One-row weights are norms' gains, read as floats.
        let packed = (self.mode == CpuMode::Fast && Packed::supports(t.ty) && rows > 1).then(|| Packed::new(t.ty, k, rows, &bytes));
        Ok(CpuWeight { bytes, ty: t.ty, k, rows, packed })
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn grow(&self, buf: &mut Vec<f32>, len: usize) -> Result<()> {
        if len > buf.len() {
            buf.resize(len, 0.0);
        }
        Ok(())
    }

    fn alloc_kv(&self, len: usize) -> Result<CpuKv> {
        Ok(match self.mode {
            CpuMode::Exact => CpuKv::F32(vec![0.0; len]),
            CpuMode::Fast => CpuKv::F16(vec![f16::ZERO; len]),
        })
    }

    fn grow_kv(&self, kv: &mut CpuKv, len: usize) -> Result<()> {
        match kv {
            CpuKv::F32(v) if len > v.len() => v.resize(len, 0.0),
            CpuKv::F16(v) if len > v.len() => v.resize(len, f16::ZERO),
            _ => {}
        }
        Ok(())
    }

    fn store_kv(&self, src: &Vec<f32>, kv: &mut CpuKv, pos0: usize, n: usize, width: usize) -> Result<()> {
        let (from, range) = (&src[..n * width], pos0 * width..(pos0 + n) * width);
        match kv {
            CpuKv::F32(v) => v[range].copy_from_slice(from),
            CpuKv::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[range].convert_from_f32_slice(from);
            }
        }
        Ok(())
    }

    fn embed(&self, table: &CpuWeight, tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
        for (t, &id) in tokens.iter().enumerate() {
            if id as usize >= table.rows {
                bail!("token id {id} is outside the vocabulary of {}", table.rows);
            }
            table.dequant_row(id as usize, &mut out[t * table.k..(t + 1) * table.k]);
        }
        Ok(())
    }

    fn rmsnorm(&self, x: &Vec<f32>, w: &CpuWeight, eps: f32, n: usize, dim: usize, out: &mut Vec<f32>) -> Result<()> {
        let mut wf = vec![0f32; dim];
        w.dequant_row(0, &mut wf);
        for (xr, or) in x[..n * dim].chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let scale = 1.0 / (ss + eps).sqrt();
            for ((o, v), g) in or.iter_mut().zip(xr).zip(&wf) {
                *o = v * scale * g;
            }
        }
        Ok(())
    }

    fn matmul(&self, w: &CpuWeight, x: &Vec<f32>, n: usize, out: &mut Vec<f32>) -> Result<()> {
        self.matmul_many(&[w], x, n, &mut [out])
    }

    fn matmul_many(&self, ws: &[&CpuWeight], x: &Vec<f32>, n: usize, outs: &mut [&mut Vec<f32>]) -> Result<()> {
        self.matmul_q(ws, x, n, outs, false)
    }

    /// The logits: where the activations are quantized, their 8-bit rounding error is
    /// quantized again and multiplied too (twice the integer work, on a matmul that decode
    /// reads from memory anyway). Each logit then carries the rounding of the hidden layers
    /// only, not one more 0.4% per value right at the output, where greedy decoding
    /// compares logits a few hundredths apart.
    fn matmul_logits(&self, w: &CpuWeight, x: &Vec<f32>, n: usize, out: &mut Vec<f32>) -> Result<()> {
        self.matmul_q(&[w], x, n, &mut [out], true)
    }

    fn rope(&self, x: &mut Vec<f32>, n: usize, n_heads: usize, head_dim: usize, pos0: usize, rope: &Rope) -> Result<()> {
        let half = rope.dims / 2;
        let mut cs = vec![(0f32, 0f32); half];
        for t in 0..n {
            let p = (pos0 + t) as f64;
            for (c, f) in cs.iter_mut().zip(&rope.inv_freq) {
                let (s, co) = (p * *f as f64).sin_cos();
                *c = (co as f32, s as f32);
            }
            let row = &mut x[t * n_heads * head_dim..(t + 1) * n_heads * head_dim];
            for head in row.chunks_exact_mut(head_dim) {
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * c - b * s;
                    head[2 * i + 1] = a * s + b * c;
                }
            }
        }
        Ok(())
    }

    fn copy_rows(&self, src: &Vec<f32>, src_row: usize, dst: &mut Vec<f32>, dst_row: usize, n: usize, width: usize) -> Result<()> {
        dst[dst_row * width..(dst_row + n) * width].copy_from_slice(&src[src_row * width..(src_row + n) * width]);
        Ok(())
    }

    fn attention(&self, q: &Vec<f32>, k: &CpuKv, v: &CpuKv, out: &mut Vec<f32>, n: usize, pos0: usize, s: AttnShape) -> Result<()> {
        let (k, v) = match (k, v) {
            (CpuKv::F16(k), CpuKv::F16(v)) => {
                attention_split(&self.hot, q, k, v, out, n, pos0, s, self.isa.simd());
                return Ok(());
            }
            (CpuKv::F32(k), CpuKv::F32(v)) => (k, v),
            _ => bail!("K and V caches of different types"),
        };
        // The reference: one (token, head) row at a time, plain softmax over all its keys.
        let (hd, kvd) = (s.head_dim, s.kv_dim());
        let group = s.n_head / s.n_kv_head;
        let scale = 1.0 / (hd as f32).sqrt();
        out[..n * s.q_dim()].par_chunks_mut(hd).enumerate().for_each_init(
            || Vec::with_capacity(pos0 + n),
            |scores: &mut Vec<f32>, (i, o)| {
                let (t, h) = (i / s.n_head, i % s.n_head);
                let qh = &q[i * hd..(i + 1) * hd];
                let kvo = (h / group) * hd;
                let len = pos0 + t + 1; // causal: this row sees positions 0..=pos0+t
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for j in 0..len {
                    let kr = &k[j * kvd + kvo..j * kvd + kvo + hd];
                    let d = dot::dot_f32(qh, kr) * scale;
                    max = max.max(d);
                    scores.push(d);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                o.fill(0.0);
                for (j, p) in scores.iter().enumerate() {
                    let vr = &v[j * kvd + kvo..j * kvd + kvo + hd];
                    dot::axpy(o, p / sum, vr);
                }
            },
        );
        Ok(())
    }

    fn swiglu(&self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) -> Result<()> {
        for (g, u) in gate[..len].iter_mut().zip(&up[..len]) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) -> Result<()> {
        x[..len].iter_mut().zip(&y[..len]).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn write(&self, buf: &mut Vec<f32>, offset: usize, data: &[f32]) -> Result<()> {
        let Some(dst) = buf.get_mut(offset..offset + data.len()) else {
            bail!("write: {offset}+{} of {} values", data.len(), buf.len());
        };
        dst.copy_from_slice(data);
        Ok(())
    }

    fn read(&self, x: &Vec<f32>, offset: usize, len: usize) -> Result<Vec<f32>> {
        Ok(x[offset..offset + len].to_vec())
    }
}

thread_local! {
    /// An attention task's scores, one buffer per thread.
    static ATT_SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tokens per attention task: their query rows share each K/V row load.
const ATT_TOKENS: usize = 4;
/// Keys per attention task (split-KV): long contexts spread over all threads.
const ATT_KEYS: usize = 256;

/// Fast causal attention. One task per (tile of tokens, chunk of keys), its KV heads one after
/// another (the chunk's K and V rows then stream from memory in order, every head's part of a
/// line read once; the later heads find them in L2). Each K and V row is loaded once for
/// every query head that shares it (GQA) and every token of the tile, and gives a partial
/// softmax (max, sum, weighted values) that a second pass merges.
/// Chunk boundaries are fixed positions and each query row's arithmetic does not depend on
/// the other rows of its tile, so a token's result is the same in any batch.
#[allow(clippy::too_many_arguments)]
fn attention_split(hot: &HotPool, q: &[f32], k: &[f16], v: &[f16], out: &mut [f32], n: usize, pos0: usize, s: AttnShape, simd: bool) {
    let (hd, nh, nkv) = (s.head_dim, s.n_head, s.n_kv_head);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_tiles = n.div_ceil(ATT_TOKENS);
    let n_chunks = (pos0 + n).div_ceil(ATT_KEYS);
    let rows = ATT_TOKENS * group; // query rows per task: (token in tile, head in group)
    let stride = hd + 2; // per row: max, sum, weighted values (hd)
    let mut part = vec![0f32; n_tiles * nkv * n_chunks * rows * stride];
    let ctx = AttnTask { q, k, v, pos0, n, s, n_chunks, scale };
    let task_len = nkv * rows * stride;
    let parts = OutPtr(part.as_mut_ptr());
    hot.run(part.len() / task_len, &|task| {
        // SAFETY: task `task` alone writes its `task_len` values of `part`.
        let p = unsafe { std::slice::from_raw_parts_mut({ parts }.0.add(task * task_len), task_len) };
        ATT_SCORES.with_borrow_mut(|scores| {
            scores.resize(rows * ATT_KEYS, 0.0);
            for (g, p) in p.chunks_mut(rows * stride).enumerate() {
                let task = task * nkv + g;
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` is Isa::simd(): AVX2, FMA and F16C were detected.
                    unsafe { attention_task_avx2(&ctx, task, p, scores) };
                    continue;
                }
                attention_task::<false>(&ctx, task, p, scores)
            }
        })
    });
    // Merge each row's partials: rescale to the common max, then normalise.
    let merge = |(i, o): (usize, &mut [f32])| {
        let (t, h) = (i / nh, i % nh);
        let (g, hh) = (h / group, h % group);
        let tile = t / ATT_TOKENS;
        let r = (t - tile * ATT_TOKENS) * group + hh;
        let at = |c: usize| ((((tile * n_chunks) + c) * nkv + g) * rows + r) * stride;
        let m = (0..n_chunks).map(|c| part[at(c)]).fold(f32::NEG_INFINITY, f32::max);
        o.fill(0.0);
        let mut sum = 0f32;
        for c in 0..n_chunks {
            let pr = &part[at(c)..at(c) + stride];
            if pr[0] == f32::NEG_INFINITY {
                continue;
            }
            let w = (pr[0] - m).exp();
            sum += pr[1] * w;
            dot::axpy(o, w, &pr[2..]);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    };
    // A decode step's few rows merge faster here than the threads can be woken for them.
    if n * nh * n_chunks <= 256 {
        out[..n * nh * hd].chunks_mut(hd).enumerate().for_each(merge);
    } else {
        out[..n * nh * hd].par_chunks_mut(hd).enumerate().for_each(merge);
    }
}

struct AttnTask<'a> {
    q: &'a [f32],
    k: &'a [f16], // (positions, kv_dim)
    v: &'a [f16], // (positions, kv_dim)
    pos0: usize,
    n: usize,
    s: AttnShape,
    n_chunks: usize,
    scale: f32,
}

/// The attention task compiled for AVX2 and FMA, with its inner loops inlined.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attention_task_avx2(c: &AttnTask, task: usize, p: &mut [f32], scores: &mut [f32]) {
    attention_task::<true>(c, task, p, scores)
}

/// One (token tile, key chunk, KV head) task of [`attention_split`]: fills `p` with each
/// query row's (max, sum, weighted values) over the chunk's visible keys.
#[inline(always)]
fn attention_task<const FMA: bool>(c: &AttnTask, task: usize, p: &mut [f32], scores: &mut [f32]) {
    let (q, k, v, pos0, s) = (c.q, c.k, c.v, c.pos0, c.s);
    let (hd, kvd, nh, nkv) = (s.head_dim, s.kv_dim(), s.n_head, s.n_kv_head);
    let group = nh / nkv;
    let stride = hd + 2;
    let g = task % nkv;
    let ch = (task / nkv) % c.n_chunks;
    let t0 = task / (c.n_chunks * nkv) * ATT_TOKENS;
    let t1 = (t0 + ATT_TOKENS).min(c.n);
    for r in 0..ATT_TOKENS * group {
        p[r * stride] = f32::NEG_INFINITY;
        p[r * stride + 1] = 0.0;
        p[r * stride + 2..(r + 1) * stride].fill(0.0);
    }
    let k0 = ch * ATT_KEYS;
    // Keys this chunk holds that the tile's last token can see.
    let k1 = (k0 + ATT_KEYS).min(pos0 + t1);
    if k0 >= k1 {
        return;
    }
    let row_of = |t: usize, hh: usize| (t - t0) * group + hh;
    // The group's query heads of token t, one after another.
    let q_of = |t: usize| &q[(t * nh + g * group) * hd..][..group * hd];
    // Token t sees keys 0..=pos0+t: here, k0..end(t).
    let end = |t: usize| (pos0 + t + 1).min(k1);
    // Each token's scores for all the group's heads, each key row converted once.
    for t in (t0..t1).filter(|&t| k0 < end(t)) {
        let r0 = row_of(t, 0);
        dot::scores_heads_h::<FMA>(&mut scores[r0 * ATT_KEYS..], ATT_KEYS, q_of(t), group, end(t) - k0, hd, &k[k0 * kvd + g * hd..], kvd, c.scale);
    }
    // Per query row: softmax numerators over its visible keys, then their weighted sum of
    // the value rows, accumulated in registers (each value is the same chain of FMAs, key
    // after key, as an axpy per key would make).
    for t in (t0..t1).filter(|&t| k0 < end(t)) {
        let len = end(t) - k0;
        for hh in 0..group {
            let r = row_of(t, hh);
            let (m, sum) = dot::softmax_numerators_h::<FMA>(&mut scores[r * ATT_KEYS..r * ATT_KEYS + len]);
            p[r * stride] = m;
            p[r * stride + 1] = sum;
        }
        // The group's heads share each value row.
        let r0 = row_of(t, 0);
        dot::weighted_sum_heads_h::<FMA>(&mut p[r0 * stride + 2..], stride, &scores[r0 * ATT_KEYS..], ATT_KEYS, group, len, hd, &v[k0 * kvd + g * hd..], kvd);
    }
}
