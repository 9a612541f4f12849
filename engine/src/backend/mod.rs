//! The backend trait: the ops a Llama forward pass needs. The model ([`crate::model`]) is
//! written once against it; the CPU backends here, and the CUDA and wgpu backends, only
//! implement the ops. Activations are row-major `(n_tokens, width)` buffers.

pub mod cpu;
pub mod dot;

use crate::gguf::{Gguf, TensorInfo};
use anyhow::Result;

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
    /// out(t, :) = W x(t, :) for `n` rows; W: (rows, k) stored as `rows` rows of `k` values.
    fn matmul(&self, w: &Self::Weight, x: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()>;
    /// Several matmuls of the same input (Q/K/V, gate/up), which a backend may fuse.
    fn matmul_many(&self, ws: &[&Self::Weight], x: &Self::Buf, n: usize, outs: &mut [&mut Self::Buf]) -> Result<()> {
        for (w, o) in ws.iter().zip(outs.iter_mut()) {
            self.matmul(w, x, n, o)?;
        }
        Ok(())
    }
    /// Rotate adjacent pairs of the first `rope.dims` values of each head of each row,
    /// row `t` being at position `pos0 + t`.
    fn rope(&self, x: &mut Self::Buf, n: usize, n_heads: usize, head_dim: usize, pos0: usize, rope: &Rope) -> Result<()>;
    /// dst rows `dst_row..dst_row+n` = src rows `src_row..src_row+n`, rows of `width` values.
    fn copy_rows(&self, src: &Self::Buf, src_row: usize, dst: &mut Self::Buf, dst_row: usize, n: usize, width: usize) -> Result<()>;
    /// Causal attention of `n` query rows at positions `pos0..pos0+n` over cache rows `0..pos0+n`.
    /// q: (n, q_dim), caches: (capacity, kv_dim), out: (n, q_dim).
    fn attention(&self, q: &Self::Buf, k: &Self::Kv, v: &Self::Kv, out: &mut Self::Buf, n: usize, pos0: usize, s: AttnShape) -> Result<()>;
    /// gate = silu(gate) * up, elementwise over `len` values.
    fn swiglu(&self, gate: &mut Self::Buf, up: &Self::Buf, len: usize) -> Result<()>;
    /// x += y over `len` values.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<()>;
    /// Copy `len` values starting at `offset` to the host.
    fn read(&self, x: &Self::Buf, offset: usize, len: usize) -> Result<Vec<f32>>;
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
