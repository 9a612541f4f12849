//! The backend's ops: each records its launches (see `record`).

use super::*;

impl Backend for Cuda {
    type Weight = CudaWeight;
    type Buf = CudaBuf;
    type Kv = CudaKv;

    fn name(&self) -> String {
        self.inner.name.clone()
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let _one = self.inner.serial();
        let _ = self.inner.bind();
        f()
    }

    fn load_weight(&self, file: &Gguf, t: &TensorInfo) -> Result<CudaWeight> {
        let (k, rows) = t.rows_cols();
        let data = file.tensor_data(t);
        // Norm vectors are read as plain f32; types the kernels do not read are
        // dequantized to f32 (exact) and run as F32.
        let one_d = t.dims.len() == 1;
        let direct = !one_d && TYPES.iter().any(|x| x.0 == t.ty) || t.ty == GgmlType::BF16 && !one_d;
        let (ty, words, nb, sc_off) = if direct {
            repack(t.ty, data, k, rows)?
        } else {
            let mut f = vec![0f32; k * rows];
            crate::quant::dequantize(t.ty, data, &mut f).with_context(|| format!("tensor {:?}", t.name))?;
            repack(GgmlType::F32, bytemuck::cast_slice(&f), k, rows)?
        };
        let inner = &self.inner;
        let fns = if one_d { None } else { Some(inner.type_fns(ty)?) };
        let mem = Owned::new(inner, words.len() * 4)?;
        if !words.is_empty() {
            drv(unsafe { cu::memcpy_htod_async(mem.ptr(), &words, inner.stream) }, "weight upload")?;
            drv(unsafe { cu::stream::synchronize(inner.stream) }, "weight upload")?;
        }
        let nb = nb as usize;
        let ld = match ty {
            GgmlType::F32 => nb * QK / 4,
            GgmlType::F16 => nb * QK / 8,
            _ => nb,
        };
        let s = if sc_off > 0 { mem.ptr() + sc_off as u64 * 4 } else { 0 };
        let (f32v, copy) = match (rows, ty) {
            (1, GgmlType::F32) => (mem.ptr(), None),
            (1, _) => {
                let mut f = vec![0f32; k];
                crate::quant::dequantize(t.ty, data, &mut f).with_context(|| format!("tensor {:?}", t.name))?;
                let c = Owned::new(inner, k * 4)?;
                drv(unsafe { cu::memcpy_htod_async(c.ptr(), &f, inner.stream) }, "weight upload")?;
                drv(unsafe { cu::stream::synchronize(inner.stream) }, "weight upload")?;
                (c.ptr(), Some(c))
            }
            _ => (0, None),
        };
        Ok(CudaWeight { mem, s, ty, fns, f32v, _f32_copy: copy, k, rows, ld })
    }

    fn alloc(&self, len: usize) -> Result<CudaBuf> {
        Ok(CudaBuf { mem: Owned::new(&self.inner, len * 4)?, len })
    }

    fn grow(&self, buf: &mut CudaBuf, len: usize) -> Result<()> {
        if len > buf.len {
            let new = self.alloc(len)?;
            self.inner.copy_after_recorded(&new.mem, &buf.mem, buf.len * 4)?;
            *buf = new;
        }
        Ok(())
    }

    fn alloc_kv(&self, len: usize) -> Result<CudaKv> {
        // Rows are read 16 bytes at a time; round up so the last row's read stays inside.
        Ok(CudaKv { mem: Owned::new(&self.inner, len.div_ceil(8) * 16)?, len })
    }

    fn grow_kv(&self, kv: &mut CudaKv, len: usize) -> Result<()> {
        if len > kv.len {
            let new = self.alloc_kv(len)?;
            self.inner.copy_after_recorded(&new.mem, &kv.mem, kv.len * 2)?;
            *kv = new;
        }
        Ok(())
    }

    fn store_kv(&self, src: &CudaBuf, kv: &mut CudaKv, pos0: usize, n: usize, width: usize) -> Result<()> {
        let _one = self.inner.serial();
        if (pos0 + n) * width > kv.len {
            bail!("store_kv: rows {pos0}..{} do not fit a cache of {} rows", pos0 + n, kv.len / width.max(1));
        }
        let p = self.inner.pos(pos0)?;
        let f = self.inner.fns.store_kv;
        self.inner.launch(f, (blocks(n * width, 256)?, 1, 1), 256, args![src.mem.ptr(), kv.mem.ptr(), p, 0i32, n, width])
    }

    fn embed(&self, table: &CudaWeight, tokens: &[u32], out: &mut CudaBuf) -> Result<()> {
        let _one = self.inner.serial();
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= table.rows) {
            bail!("token id {id} is outside the vocabulary of {}", table.rows);
        }
        if out.len < tokens.len() * table.k {
            bail!("embed: the output buffer is too small");
        }
        let t = self.inner.stage(tokens)?;
        self.inner.launch(table.fns()?.embed, (tokens.len() as u32, 1, 1), 128, args![table.mem.ptr(), table.s, table.ld, table.k, t, out.mem.ptr()])
    }

    fn rmsnorm(&self, x: &CudaBuf, w: &CudaWeight, eps: f32, n: usize, dim: usize, out: &mut CudaBuf) -> Result<()> {
        let f = self.inner.fns.rmsnorm;
        self.inner.launch(f, (n as u32, 1, 1), 256, args![x.mem.ptr(), 0u64, w.vector(dim)?, eps, dim, out.mem.ptr()])
    }

    fn add_rmsnorm(&self, x: &mut CudaBuf, y: &CudaBuf, w: &CudaWeight, eps: f32, n: usize, dim: usize, out: &mut CudaBuf) -> Result<()> {
        let f = self.inner.fns.rmsnorm;
        self.inner.launch(f, (n as u32, 1, 1), 256, args![x.mem.ptr(), y.mem.ptr(), w.vector(dim)?, eps, dim, out.mem.ptr()])
    }

    fn matmul(&self, w: &CudaWeight, x: &CudaBuf, n: usize, out: &mut CudaBuf) -> Result<()> {
        self.check_matmul(w, x, n, out)?;
        if n <= GEMV_MAX {
            return self.gemv(&[w], x, n, &[out.mem.ptr()], false);
        }
        let fns = w.fns()?;
        let (f, threads) = match fns.mma {
            Some(mma) => (mma, 128),
            None => (fns.matmul, 256),
        };
        self.inner.launch(f, (blocks(w.rows, 64)?, blocks(n, 64)?, 1), threads, args![w.mem.ptr(), w.s, w.ld, w.k, x.mem.ptr(), n, out.mem.ptr(), w.rows])
    }

    fn matmul_many(&self, ws: &[&CudaWeight], x: &CudaBuf, n: usize, outs: &mut [&mut CudaBuf]) -> Result<()> {
        let same = ws.iter().all(|w| w.ty == ws[0].ty && w.k == ws[0].k);
        if n <= GEMV_MAX && !ws.is_empty() && ws.len() <= 3 && same && ws.len() == outs.len() {
            for (w, o) in ws.iter().zip(outs.iter()) {
                self.check_matmul(w, x, n, o)?;
            }
            let ptrs: Vec<u64> = outs.iter().map(|o| o.mem.ptr()).collect();
            return self.gemv(ws, x, n, &ptrs, false);
        }
        for (w, o) in ws.iter().zip(outs.iter_mut()) {
            self.matmul(w, x, n, o)?;
        }
        Ok(())
    }

    fn ffn_gate_up(&self, gate_w: &CudaWeight, up_w: &CudaWeight, x: &CudaBuf, n: usize, gate: &mut CudaBuf, up: &mut CudaBuf, ff: usize) -> Result<()> {
        if n <= GEMV_MAX && gate_w.ty == up_w.ty && gate_w.k == up_w.k && gate_w.rows == up_w.rows {
            self.check_matmul(gate_w, x, n, gate)?;
            return self.gemv(&[gate_w, up_w], x, n, &[gate.mem.ptr(), up.mem.ptr()], true);
        }
        self.matmul(gate_w, x, n, gate)?;
        self.matmul(up_w, x, n, up)?;
        self.swiglu(gate, up, n * ff)
    }

    fn rope(&self, x: &mut CudaBuf, n: usize, n_heads: usize, head_dim: usize, pos0: usize, rope: &Rope) -> Result<()> {
        let _one = self.inner.serial();
        let (fr, p) = (self.inner.rope_freq(rope)?, self.inner.pos(pos0)?);
        let f = self.inner.fns.rope;
        self.inner.launch(f, (n as u32, n_heads as u32, 1), 64, args![x.mem.ptr(), fr, p, 0i32, n_heads, head_dim, rope.dims])
    }

    fn rope_store_kv(&self, q: &mut CudaBuf, k: &mut CudaBuf, v: &CudaBuf, kc: &mut CudaKv, vc: &mut CudaKv, n: usize, pos0: usize, s: AttnShape, rope: &Rope) -> Result<()> {
        let _one = self.inner.serial();
        if (pos0 + n) * s.kv_dim() > kc.len.min(vc.len) {
            bail!("rope_store_kv: positions {pos0}..{} do not fit the cache", pos0 + n);
        }
        let (fr, p) = (self.inner.rope_freq(rope)?, self.inner.pos(pos0)?);
        let f = self.inner.fns.rope_store;
        let heads = (s.n_head + 2 * s.n_kv_head) as u32;
        self.inner.launch(
            f,
            (n as u32, heads, 1),
            64,
            args![q.mem.ptr(), k.mem.ptr(), v.mem.ptr(), kc.mem.ptr(), vc.mem.ptr(), fr, p, 0i32, s.n_head, s.n_kv_head, s.head_dim, rope.dims],
        )
    }

    fn qkv_rope_store(&self, w: [&CudaWeight; 3], x: &CudaBuf, q: &mut CudaBuf, k: &mut CudaBuf, v: &mut CudaBuf, kc: &mut CudaKv, vc: &mut CudaKv, n: usize, pos0: usize, s: AttnShape, rope: &Rope) -> Result<()> {
        let _one = self.inner.serial();
        let same = w.iter().all(|m| m.ty == w[0].ty && m.k == w[0].k);
        let shapes = w[0].rows == s.q_dim() && w[1].rows == s.kv_dim() && w[2].rows == s.kv_dim();
        if n > GEMV_MAX || !same || !shapes || s.head_dim % 2 != 0 || w[0].fns.is_none() {
            self.matmul_many(&w, x, n, &mut [&mut *q, &mut *k, &mut *v])?;
            return self.rope_store_kv(q, k, v, kc, vc, n, pos0, s, rope);
        }
        for (m, o) in w.iter().zip([&*q, &*k, &*v]) {
            self.check_matmul(m, x, n, o)?;
        }
        if (pos0 + n) * s.kv_dim() > kc.len.min(vc.len) {
            bail!("qkv_rope_store: positions {pos0}..{} do not fit the cache", pos0 + n);
        }
        let (fr, p) = (self.inner.rope_freq(rope)?, self.inner.pos(pos0)?);
        let fns = w[0].fns()?;
        let f = if n == 1 { fns.qkv_rope1 } else { fns.qkv_rope8 };
        let pairs = (s.q_dim() + 2 * s.kv_dim()) / 2;
        let (w0, ld, kk) = (w[0], w[0].ld, w[0].k);
        self.inner.launch(
            f,
            (blocks(pairs, 4)?, 1, 1),
            128,
            args![
                w0.mem.ptr(), w0.s, w[1].mem.ptr(), w[1].s, w[2].mem.ptr(), w[2].s, ld, kk, x.mem.ptr(), n,
                q.mem.ptr(), k.mem.ptr(), v.mem.ptr(), kc.mem.ptr(), vc.mem.ptr(), fr, p, 0i32, s.n_head, s.n_kv_head, s.head_dim, rope.dims
            ],
        )
    }

    fn copy_rows(&self, src: &CudaBuf, src_row: usize, dst: &mut CudaBuf, dst_row: usize, n: usize, width: usize) -> Result<()> {
        if (src_row + n) * width > src.len || (dst_row + n) * width > dst.len {
            bail!("copy_rows: rows out of range");
        }
        let f = self.inner.fns.copy;
        let (s, d) = (src.mem.ptr() + (src_row * width * 4) as u64, dst.mem.ptr() + (dst_row * width * 4) as u64);
        self.inner.launch(f, (blocks(n * width, 256)?, 1, 1), 256, args![s, d, n * width])
    }

    fn attention(&self, q: &CudaBuf, k: &CudaKv, v: &CudaKv, out: &mut CudaBuf, n: usize, pos0: usize, s: AttnShape) -> Result<()> {
        let _one = self.inner.serial();
        let hd = s.head_dim;
        let fns = self.inner.attn_fns(hd)?;
        let cap = k.len.min(v.len) / s.kv_dim();
        if pos0 + n > cap {
            bail!("attention: positions {pos0}..{} are past the cache of {cap}", pos0 + n);
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let p = self.inner.pos(pos0)?;
        if n > DECODE_ATTN_MAX {
            return self.inner.launch(
                fns.prefill,
                (blocks(n, 16)?, s.n_head as u32, 1),
                128,
                args![q.mem.ptr(), k.mem.ptr(), v.mem.ptr(), out.mem.ptr(), p, 0i32, n, s.n_head, s.n_kv_head, scale],
            );
        }
        // The grid depends on the capacity only, so every step of a session records the
        // same launch.
        let mut split_len = if cap <= 16_384 { 128 } else { MAX_SPLIT_LEN };
        split_len = split_len.max(cap.div_ceil(MAX_SPLITS));
        if split_len > MAX_SPLIT_LEN {
            bail!("a KV cache of {cap} positions is past the decode attention kernel's {} positions", MAX_SPLITS * MAX_SPLIT_LEN);
        }
        let n_split = cap.div_ceil(split_len);
        let g = s.n_head / s.n_kv_head;
        let n_sub = g.div_ceil(4); // AT_MAXG query heads a block
        // Up to 64 splits the last block of each group merges them; past that one launch
        // merges every head's in parallel.
        let fused = n_split <= 64;
        let (po, pml, counters) = if n_split > 1 {
            let rows = n * s.n_head * n_split;
            let groups = n * s.n_kv_head * n_sub;
            (
                self.inner.scratch(|r| &mut r.part_o, rows * hd * 4)?,
                self.inner.scratch(|r| &mut r.part_ml, rows * 8)?,
                if fused { self.inner.scratch(|r| &mut r.counters, groups * 4)? } else { 0 },
            )
        } else {
            (0, 0, 0)
        };
        self.inner.launch(
            fns.decode,
            (n_split as u32, (s.n_kv_head * n_sub) as u32, n as u32),
            128,
            args![q.mem.ptr(), k.mem.ptr(), v.mem.ptr(), out.mem.ptr(), po, pml, counters, p, 0i32, s.n_head, s.n_kv_head, n_split, split_len, scale],
        )?;
        if n_split > 1 && !fused {
            self.inner.launch(fns.combine, ((n * s.n_head) as u32, 1, 1), 128, args![po, pml, out.mem.ptr(), n_split, hd])?;
        }
        Ok(())
    }

    fn swiglu(&self, gate: &mut CudaBuf, up: &CudaBuf, len: usize) -> Result<()> {
        let f = self.inner.fns.swiglu;
        self.inner.launch(f, (blocks(len, 256)?, 1, 1), 256, args![gate.mem.ptr(), up.mem.ptr(), len])
    }

    fn add(&self, x: &mut CudaBuf, y: &CudaBuf, len: usize) -> Result<()> {
        let f = self.inner.fns.add;
        self.inner.launch(f, (blocks(len, 256)?, 1, 1), 256, args![x.mem.ptr(), y.mem.ptr(), len])
    }

    fn write(&self, buf: &mut CudaBuf, offset: usize, data: &[f32]) -> Result<()> {
        if offset + data.len() > buf.len {
            bail!("write of {} values at {offset} past a buffer of {}", data.len(), buf.len);
        }
        self.inner.bind()?;
        let mut rec = self.inner.rec();
        self.inner.flush(&mut rec)?;
        if !data.is_empty() {
            drv(unsafe { cu::memcpy_htod_async(buf.mem.ptr() + offset as u64 * 4, data, self.inner.stream) }, "upload")?;
        }
        Ok(())
    }

    fn read(&self, x: &CudaBuf, offset: usize, len: usize) -> Result<Vec<f32>> {
        if offset + len > x.len {
            bail!("read of {len} values at {offset} past a buffer of {}", x.len);
        }
        self.inner.bind()?;
        let mut rec = self.inner.rec();
        self.inner.flush(&mut rec)?;
        let mut v = vec![0f32; len];
        if len > 0 {
            drv(unsafe { cu::memcpy_dtoh_async(&mut v, x.mem.ptr() + offset as u64 * 4, self.inner.stream) }, "download")?;
        }
        self.inner.sync(&mut rec)?;
        Ok(v)
    }

    fn top_k(&self, x: &CudaBuf, rows: usize, width: usize, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let _one = self.inner.serial();
        if k == 0 || rows == 0 {
            return Ok(vec![Vec::new(); rows]);
        }
        if k > TOPK_CHUNK || rows > 65_535 {
            let v = self.read(x, 0, rows * width)?;
            return Ok(v.chunks_exact(width).map(|r| super::super::top_k_host(r, k)).collect());
        }
        let (chunks, per) = if k == 1 { (width.div_ceil(ARGMAX_CHUNK), 1) } else { (width.div_ceil(TOPK_CHUNK), k) };
        let words = rows * chunks * per * 2;
        let cand = self.inner.scratch(|r| &mut r.cand, words * 4)?;
        let fns = &self.inner.fns;
        if k == 1 {
            self.inner.launch(fns.argmax_part, (chunks as u32, rows as u32, 1), 256, args![x.mem.ptr(), width, ARGMAX_CHUNK, cand])?;
        } else {
            self.inner.launch(fns.topk_part, (chunks as u32, rows as u32, 1), 1024, args![x.mem.ptr(), width, k, cand])?;
        }
        self.inner.bind()?;
        let mut rec = self.inner.rec();
        self.inner.flush(&mut rec)?;
        let mut raw = vec![0u32; words];
        drv(unsafe { cu::memcpy_dtoh_async(&mut raw, cand, self.inner.stream) }, "download")?;
        self.inner.sync(&mut rec)?;
        drop(rec);
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0));
        Ok(raw
            .chunks_exact(chunks * per * 2)
            .map(|row| {
                let mut c: Vec<(u32, f32)> =
                    row.chunks_exact(2).map(|p| (p[0], f32::from_bits(p[1]))).filter(|p| (p.0 as usize) < width).collect();
                c.sort_unstable_by(order);
                c.truncate(k);
                c
            })
            .collect())
    }

    fn set_profiling(&self, on: bool) {
        let _ = self.inner.bind();
        let mut rec = self.inner.rec();
        let _ = self.inner.flush(&mut rec);
        rec.profiling = on;
    }

    fn take_profile(&self) -> Vec<KernelTime> {
        let mut rec = self.inner.rec();
        let mut v: Vec<KernelTime> = rec.profile.drain().map(|(k, (calls, s))| KernelTime { kernel: k.to_string(), calls, ms: s * 1e3 }).collect();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        v
    }
}
