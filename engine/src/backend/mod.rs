//! The backend trait: the ops a Llama forward pass needs. The model ([`crate::model`]) is
//! written once against it; the CPU backends here, and the CUDA and wgpu backends, only
//! implement the ops. Activations are row-major `(n_tokens, width)` buffers.

pub mod cpu;
pub mod cuda;
pub mod dot;
mod hot;
pub mod packed;
pub mod wgpu;

use crate::gguf::{Gguf, TensorInfo};
use crate::quant::{GgmlType, QK};
use anyhow::{bail, Result};

/// Shapes the attention op needs.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl AttnShape {
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

pub trait Backend: Send + Sync + 'static {
    /// A weight tensor as the backend keeps it (quantized blocks stay quantized).
    type Weight: Send + Sync;
    /// An f32 activation buffer.
    type Buf: Send;
    /// A KV-cache buffer (rows of `kv_dim` values, one per position), in the backend's
    /// storage type.
    type Kv: Send;

    fn name(&self) -> String;
    /// Run a whole forward pass (the backend may set up threads or a stream around it).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }
    fn load_weight(&self, file: &Gguf, t: &TensorInfo) -> Result<Self::Weight>;
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// Grow `buf` to `len` values, keeping its contents.
    fn grow(&self, buf: &mut Self::Buf, len: usize) -> Result<()>;
    /// A KV cache of `len` values.
    fn alloc_kv(&self, len: usize) -> Result<Self::Kv>;
    /// Grow a KV cache to `len` values, keeping its contents (caches grow with the request).
    fn grow_kv(&self, kv: &mut Self::Kv, len: usize) -> Result<()>;
    /// Cache rows `pos0..pos0+n` = rows `0..n` of `src` (width `width`).
    fn store_kv(&self, src: &Self::Buf, kv: &mut Self::Kv, pos0: usize, n: usize, width: usize) -> Result<()>;

    /// out(t, :) = table row `tokens[t]`, dequantized. table: (vocab, dim).
    fn embed(&self, table: &Self::Weight, tokens: &[u32], out: &mut Self::Buf) -> Result<()>;
    /// out(t, :) = x(t, :) / rms(x(t, :)) * w, for `n` rows of width `dim`.
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Weight, eps: f32, n: usize, dim: usize, out: &mut Self::Buf) -> Result<()>;
    /// x += y, then out = rmsnorm(x): the residual add and the next norm, which a backend
    /// may fuse into one pass over x.
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm(&self, x: &mut Self::Buf, y: &Self::Buf, w: &Self::Weight, eps: f32, n: usize, dim: usize, out: &mut Self::Buf) -> Result<()> {
        self.add(x, y, n * dim)?;
        self.rmsnorm(x, w, eps, n, dim, out)
    }
    /// out(t, :) = W x(t, :) for `n` rows; W: (rows, k) stored as `rows` rows of `k` values.
    fn matmul(&self, w: &Self::Weight, x: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()>;
    /// Several matmuls of the same input (Q/K/V, gate/up), which a backend may fuse.
    /// The output projection (the logits). A backend whose matmul rounds its inputs may
    /// compute this one more precisely: greedy decoding compares its results.
    fn matmul_logits(&self, w: &Self::Weight, x: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()> {
        self.matmul(w, x, n, out)
    }
    fn matmul_many(&self, ws: &[&Self::Weight], x: &Self::Buf, n: usize, outs: &mut [&mut Self::Buf]) -> Result<()> {
        for (w, o) in ws.iter().zip(outs.iter_mut()) {
            self.matmul(w, x, n, o)?;
        }
        Ok(())
    }
    /// The feed-forward's first half: gate = silu(gate_w x) * (up_w x) for `n` rows (`up`
    /// is scratch), which a backend may run as one pass.
    #[allow(clippy::too_many_arguments)]
    fn ffn_gate_up(&self, gate_w: &Self::Weight, up_w: &Self::Weight, x: &Self::Buf, n: usize, gate: &mut Self::Buf, up: &mut Self::Buf, ff: usize) -> Result<()> {
        self.matmul_many(&[gate_w, up_w], x, n, &mut [&mut *gate, &mut *up])?;
        self.swiglu(gate, up, n * ff)
    }
    /// Rotate adjacent pairs of the first `rope.dims` values of each head of each row,
    /// row `t` being at position `pos0 + t`.
    fn rope(&self, x: &mut Self::Buf, n: usize, n_heads: usize, head_dim: usize, pos0: usize, rope: &Rope) -> Result<()>;
    /// RoPE on `n` rows of q and k at positions `pos0..`, then k and v into the caches' rows
    /// `pos0..pos0+n`: the attention block's steps between the projections and attention,
    /// which a backend may run as one pass.
    #[allow(clippy::too_many_arguments)]
    fn rope_store_kv(&self, q: &mut Self::Buf, k: &mut Self::Buf, v: &Self::Buf, kc: &mut Self::Kv, vc: &mut Self::Kv, n: usize, pos0: usize, s: AttnShape, rope: &Rope) -> Result<()> {
        self.rope(q, n, s.n_head, s.head_dim, pos0, rope)?;
        self.rope(k, n, s.n_kv_head, s.head_dim, pos0, rope)?;
        self.store_kv(k, kc, pos0, n, s.kv_dim())?;
        self.store_kv(v, vc, pos0, n, s.kv_dim())
    }
    /// The attention block's first steps: q, k, v = Wq, Wk, Wv times `n` rows of x
    /// ([`Backend::matmul_many`]), then RoPE and the K/V store ([`Backend::rope_store_kv`]),
    /// which a backend may run as one pass.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_store(&self, w: [&Self::Weight; 3], x: &Self::Buf, q: &mut Self::Buf, k: &mut Self::Buf, v: &mut Self::Buf, kc: &mut Self::Kv, vc: &mut Self::Kv, n: usize, pos0: usize, s: AttnShape, rope: &Rope) -> Result<()> {
        self.matmul_many(&w, x, n, &mut [&mut *q, &mut *k, &mut *v])?;
        self.rope_store_kv(q, k, v, kc, vc, n, pos0, s, rope)
    }
    /// dst rows `dst_row..dst_row+n` = src rows `src_row..src_row+n`, rows of `width` values.
    fn copy_rows(&self, src: &Self::Buf, src_row: usize, dst: &mut Self::Buf, dst_row: usize, n: usize, width: usize) -> Result<()>;
    /// Causal attention of `n` query rows at positions `pos0..pos0+n` over cache rows `0..pos0+n`.
    /// q: (n, q_dim), caches: (capacity, kv_dim), out: (n, q_dim).
    fn attention(&self, q: &Self::Buf, k: &Self::Kv, v: &Self::Kv, out: &mut Self::Buf, n: usize, pos0: usize, s: AttnShape) -> Result<()>;
    /// gate = silu(gate) * up, elementwise over `len` values.
    fn swiglu(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize) -> Result<()>;
    /// x += y over `len` values.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<()>;
    /// Write `data` into `buf` from value `offset` (after everything recorded before).
    fn write(&self, buf: &mut Self::Buf, offset: usize, data: &[f32]) -> Result<()>;
    /// Copy `len` values starting at `offset` to the host.
    fn read(&self, x: &Self::Buf, offset: usize, len: usize) -> Result<Vec<f32>>;
    /// Time every kernel from here on (each waits for the device), or stop.
    fn set_profiling(&self, _on: bool) {}
    /// The kernel times gathered since profiling started, and reset them; empty where the
    /// backend keeps none.
    fn take_profile(&self) -> Vec<KernelTime> {
        Vec::new()
    }
    /// The `k` largest values of each of `rows` rows of `width` (see [`top_k_host`]): what a
    /// sampler needs of the logits, without copying them all to the host.
    fn top_k(&self, x: &Self::Buf, rows: usize, width: usize, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let v = self.read(x, 0, rows * width)?;
        Ok(v.chunks_exact(width).map(|r| top_k_host(r, k)).collect())
    }
}

/// The `k` largest values of `row` as (index, value), largest first, the smaller index first
/// among equal values; NaN counts as -inf. The order every backend's top-k follows.
pub fn top_k_host(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let clean = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let mut all: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, &v)| (i as u32, clean(v))).collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.partial_cmp(&a.1).expect("no NaN left").then(a.0.cmp(&b.0));
    let k = k.min(all.len());
    if k > 0 && k < all.len() {
        all.select_nth_unstable_by(k - 1, order);
    }
    all.truncate(k);
    all.sort_unstable_by(order);
    all
}

/// One kernel's share of a profiled run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelTime {
    pub kernel: String,
    pub calls: u64,
    pub ms: f64,
}

/// RoPE frequencies, precomputed once per model: `inv_freq[i] = base^(-2i/dims) / factor[i]`.
#[derive(Clone, Debug)]
pub struct Rope {
    pub dims: usize,
    pub inv_freq: Vec<f32>, // (dims / 2)
}

impl Rope {
    pub fn new(dims: usize, base: f32, factors: Option<&[f32]>) -> Self {
        let inv_freq = (0..dims / 2)
            .map(|i| {
                let f = (base as f64).powf(-2.0 * i as f64 / dims as f64);
                (f / factors.map_or(1.0, |fs| fs[i] as f64)) as f32
            })
            .collect();
        Rope { dims, inv_freq }
    }
}

/// A tensor of `rows` rows of `k` values repacked for the GPU backends, as aligned words:
/// the type the kernels see (BF16 becomes F32), the words, blocks of 32 values a row, and
/// the word offset of the scales.
/// - F32, F16: the values, each row padded with zeros to whole blocks of 32.
/// - Q4_0, Q4_1, Q8_0: every block's quants (16 or 32 bytes), then every block's scales:
///   one f16 `d` a block (two a word), or for Q4_1 a word of `d | m << 16`.
///
/// The values are the file's, bit for bit.
pub(crate) fn repack(ty: GgmlType, data: &[u8], k: usize, rows: usize) -> Result<(GgmlType, Vec<u32>, u32, u32)> {
    let nb = k.div_ceil(QK);
    let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let half = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as u32;
    Ok(match ty {
        GgmlType::F32 | GgmlType::BF16 => {
            let mut w = vec![0u32; rows * nb * QK];
            for r in 0..rows {
                for i in 0..k {
                    w[r * nb * QK + i] = if ty == GgmlType::F32 {
                        word(data, (r * k + i) * 4)
                    } else {
                        half(data, (r * k + i) * 2) << 16 // bf16 is the top half of an f32
                    };
                }
            }
            (GgmlType::F32, w, nb as u32, 0)
        }
        GgmlType::F16 => {
            let mut w = vec![0u32; rows * nb * QK / 2];
            for r in 0..rows {
                for i in 0..k {
                    w[(r * nb * QK + i) / 2] |= half(data, (r * k + i) * 2) << (16 * (i % 2));
                }
            }
            (ty, w, nb as u32, 0)
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            let blocks = rows * nb;
            let (bs, head, qwords) = match ty {
                GgmlType::Q4_0 => (18, 2, 4),
                GgmlType::Q4_1 => (20, 4, 4),
                _ => (34, 2, 8),
            };
            let sc_words = if ty == GgmlType::Q4_1 { blocks } else { blocks.div_ceil(2) };
            let mut w = vec![0u32; blocks * qwords + sc_words];
            let sc_off = blocks * qwords;
            for b in 0..blocks {
                let blk = &data[b * bs..(b + 1) * bs];
                for q in 0..qwords {
                    let o = head + 4 * q;
                    w[b * qwords + q] = u32::from_le_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]]);
                }
                if ty == GgmlType::Q4_1 {
                    w[sc_off + b] = half(blk, 0) | half(blk, 2) << 16;
                } else {
                    w[sc_off + b / 2] |= half(blk, 0) << (16 * (b % 2));
                }
            }
            (ty, w, nb as u32, sc_off as u32)
        }
        other => bail!("type {other} is not supported by the GPU backends (F32, F16, BF16, Q8_0, Q4_0, Q4_1)"),
    })
}
