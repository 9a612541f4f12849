//! Device memory a buffer owns, weights, activations and KV caches.

use super::*;

/// Device memory owned by a buffer, freed (after pending work) when dropped.
pub(super) struct Owned {
    pub(super) mem: Mem,
    pub(super) inner: Arc<Inner>,
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.inner.defer_free(self.mem.ptr);
    }
}

impl Owned {
    pub(super) fn new(inner: &Arc<Inner>, bytes: usize) -> Result<Self> {
        inner.bind()?;
        Ok(Owned { mem: alloc_raw(bytes, inner.stream)?, inner: inner.clone() })
    }
    pub(super) fn ptr(&self) -> u64 {
        self.mem.ptr
    }
}

/// A weight tensor, repacked (see `kernels/common.cuh`).
pub struct CudaWeight {
    pub(super) mem: Owned,
    /// The scales' address (quantized types), else 0.
    pub(super) s: u64,
    pub(super) ty: GgmlType,
    /// None for vectors (norm weights), which no matmul reads.
    pub(super) fns: Option<TypeFns>,
    /// A one-row tensor's values as f32 (what rmsnorm reads): `mem` itself for F32, else a
    /// dequantized copy; 0 for matrices.
    pub(super) f32v: u64,
    pub(super) _f32_copy: Option<Owned>,
    pub(super) k: usize,
    pub(super) rows: usize,
    /// Row stride in 16-byte chunks (a chunk is a whole block for the quantized types).
    pub(super) ld: usize,
}

/// An f32 activation buffer of `len` values.
pub struct CudaBuf {
    pub(super) mem: Owned,
    pub(super) len: usize,
}

/// A KV cache of `len` f16 values.
pub struct CudaKv {
    pub(super) mem: Owned,
    pub(super) len: usize,
}

impl CudaWeight {
    pub(super) fn fns(&self) -> Result<TypeFns> {
        self.fns.ok_or_else(|| anyhow!("a {}-value vector is not a matrix", self.k))
    }
    /// The values of a one-row weight, as rmsnorm reads them.
    pub(super) fn vector(&self, dim: usize) -> Result<u64> {
        if self.f32v == 0 || self.k < dim {
            bail!("a norm weight must be one row of at least {dim} values, not {}x{}", self.rows, self.k);
        }
        Ok(self.f32v)
    }
}

pub(super) fn blocks(n: usize, per: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per)).map_err(|_| anyhow!("CUDA grid of {n} items is too large"))
}

impl Cuda {
    pub(super) fn gemv(&self, ws: &[&CudaWeight], x: &CudaBuf, n: usize, outs: &[u64], swiglu: bool) -> Result<()> {
        let w0 = ws[0];
        let f = if n == 1 { w0.fns()?.gemv1 } else { w0.fns()?.gemv8 };
        let mut a: Vec<u64> = Vec::with_capacity(17);
        let mut total = 0;
        for i in 0..3 {
            match ws.get(i) {
                Some(w) => {
                    a.extend(args![w.mem.ptr(), w.s, outs[i], w.rows]);
                    total += w.rows;
                }
                None => a.extend(args![0u64, 0u64, 0u64, 0i32]),
            }
        }
        a.extend(args![w0.ld, w0.k, x.mem.ptr(), n, swiglu as i32]);
        let rows = if swiglu { w0.rows } else { total };
        self.inner.launch(f, (blocks(rows, 4)?, 1, 1), 128, a)
    }

    pub(super) fn check_matmul(&self, w: &CudaWeight, x: &CudaBuf, n: usize, out: &CudaBuf) -> Result<()> {
        if x.len < n * w.k || out.len < n * w.rows {
            bail!("matmul of {n} rows: buffers of {} and {} values are too small for a {}x{} weight", x.len, out.len, w.rows, w.k);
        }
        Ok(())
    }
}
