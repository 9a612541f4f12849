//! The Llama architecture, written once against [`Backend`]: RMSNorm, RoPE (GGUF "normal"
//! layout: adjacent pairs), grouped-query attention, SwiGLU, tied output embeddings when
//! `output.weight` is absent. Every shape and hyper-parameter comes from the GGUF metadata.

use crate::backend::{AttnShape, Backend, Rope};
use crate::gguf::{Gguf, TensorInfo};
use anyhow::{anyhow, bail, Context, Result};
use std::sync::Arc;

/// Largest number of tokens run through the model at once; longer prompts go in chunks,
/// which bounds the scratch memory.
pub const MAX_BATCH: usize = 512;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    /// The model's context length (`{arch}.context_length`).
    pub n_ctx: usize,
    pub rope_base: f32,
    pub rope_dims: usize,
    pub eps: f32,
    pub tied_embeddings: bool,
}

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("general.architecture is missing"))?
            .to_string();
        if arch != "llama" {
            bail!("architecture {arch:?} is not supported (Flint runs \"llama\" models)");
        }
        let int = |key: &str, max: u64| -> Result<Option<usize>> {
            let full = format!("{arch}.{key}");
            match g.get(&full) {
                None => Ok(None),
                Some(v) => {
                    let x = v.as_u64().ok_or_else(|| anyhow!("{full} is not a non-negative integer"))?;
                    if x == 0 || x > max {
                        bail!("{full} = {x} is out of range (1 to {max})");
                    }
                    Ok(Some(x as usize))
                }
            }
        };
        let need = |key: &str, max: u64| -> Result<usize> {
            int(key, max)?.ok_or_else(|| anyhow!("{arch}.{key} is missing"))
        };
        let float = |key: &str, default: f32| -> Result<f32> {
            match g.get(&format!("{arch}.{key}")) {
                None => Ok(default),
                Some(v) => v
                    .as_f32()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| anyhow!("{arch}.{key} is not a positive number")),
            }
        };
        let n_embd = need("embedding_length", 1 << 16)?;
        let n_head = need("attention.head_count", 1 << 10)?;
        let n_kv_head = int("attention.head_count_kv", 1 << 10)?.unwrap_or(n_head);
        if n_embd % n_head != 0 && int("attention.key_length", 1 << 12)?.is_none() {
            bail!("embedding_length {n_embd} is not a multiple of head_count {n_head}");
        }
        let head_dim = int("attention.key_length", 1 << 12)?.unwrap_or(n_embd / n_head);
        if n_head % n_kv_head != 0 {
            bail!("head_count {n_head} is not a multiple of head_count_kv {n_kv_head}");
        }
        let rope_dims = int("rope.dimension_count", 1 << 12)?.unwrap_or(head_dim);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            bail!("rope.dimension_count {rope_dims} must be even and at most the head size {head_dim}");
        }
        let emb = g.tensor("token_embd.weight").ok_or_else(|| anyhow!("tensor token_embd.weight is missing"))?;
        let n_vocab = match int("vocab_size", 1 << 22)? {
            Some(v) => v,
            None => emb.dims.get(1).copied().unwrap_or(0) as usize,
        };
        Ok(Config {
            n_layer: need("block_count", 1 << 12)?,
            n_ff: need("feed_forward_length", 1 << 20)?,
            n_ctx: need("context_length", 1 << 24)?,
            rope_base: float("rope.freq_base", 10_000.0)?,
            eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
            tied_embeddings: g.tensor("output.weight").is_none(),
            arch,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            n_vocab,
            rope_dims,
        })
    }

    pub fn attn(&self) -> AttnShape {
        AttnShape { n_head: self.n_head, n_kv_head: self.n_kv_head, head_dim: self.head_dim }
    }
}

pub struct Layer<B: Backend> {
    pub attn_norm: B::Weight, // (n_embd)
    pub wq: B::Weight,        // (n_head * head_dim, n_embd)
    pub wk: B::Weight,        // (n_kv_head * head_dim, n_embd)
    pub wv: B::Weight,        // (n_kv_head * head_dim, n_embd)
    pub wo: B::Weight,        // (n_embd, n_head * head_dim)
    pub ffn_norm: B::Weight,  // (n_embd)
    pub w_gate: B::Weight,    // (n_ff, n_embd)
    pub w_up: B::Weight,      // (n_ff, n_embd)
    pub w_down: B::Weight,    // (n_embd, n_ff)
}

/// Weights, shared by every session of a model.
pub struct Model<B: Backend> {
    pub backend: B,
    pub cfg: Config,
    pub tok_embd: B::Weight,    // (n_vocab, n_embd)
    pub output: Option<B::Weight>, // (n_vocab, n_embd); None: tied to tok_embd
    pub output_norm: B::Weight, // (n_embd)
    pub layers: Vec<Layer<B>>,
    pub rope: Rope,
}

impl<B: Backend> Model<B> {
    pub fn load(backend: B, g: &Gguf) -> Result<Self> {
        let cfg = Config::from_gguf(g)?;
        let c = &cfg;
        let (qd, kvd) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let get = |name: &str, dims: &[usize]| -> Result<B::Weight> {
            let t: &TensorInfo = g.tensor(name).ok_or_else(|| anyhow!("tensor {name} is missing"))?;
            let want: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
            if t.dims != want {
                bail!("tensor {name} has shape {:?}, the metadata implies {:?}", t.dims, want);
            }
            backend.load_weight(g, t).with_context(|| format!("loading {name}"))
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: get(&n("attn_norm"), &[c.n_embd])?,
                wq: get(&n("attn_q"), &[c.n_embd, qd])?,
                wk: get(&n("attn_k"), &[c.n_embd, kvd])?,
                wv: get(&n("attn_v"), &[c.n_embd, kvd])?,
                wo: get(&n("attn_output"), &[qd, c.n_embd])?,
                ffn_norm: get(&n("ffn_norm"), &[c.n_embd])?,
                w_gate: get(&n("ffn_gate"), &[c.n_embd, c.n_ff])?,
                w_up: get(&n("ffn_up"), &[c.n_embd, c.n_ff])?,
                w_down: get(&n("ffn_down"), &[c.n_ff, c.n_embd])?,
            });
        }
        Ok(Model {
            tok_embd: get("token_embd.weight", &[c.n_embd, c.n_vocab])?,
            output: if c.tied_embeddings { None } else { Some(get("output.weight", &[c.n_embd, c.n_vocab])?) },
            output_norm: get("output_norm.weight", &[c.n_embd])?,
            rope: rope_of(g, c)?,
            layers,
            backend,
            cfg,
        })
    }
}

/// The model's RoPE frequencies: the base and dimensions of its metadata, divided by
/// `rope_freqs.weight` where the model has one (Llama 3's long-context scaling).
pub fn rope_of(g: &Gguf, c: &Config) -> Result<Rope> {
    let factors = match g.tensor("rope_freqs.weight") {
        None => None,
        Some(t) => {
            if t.dims != [c.rope_dims as u64 / 2] {
                bail!("rope_freqs.weight has shape {:?}, expected [{}]", t.dims, c.rope_dims / 2);
            }
            let mut f = vec![0f32; c.rope_dims / 2];
            crate::quant::dequantize(t.ty, g.tensor_data(t), &mut f)?;
            Some(f)
        }
    };
    Ok(Rope::new(c.rope_dims, c.rope_base, factors.as_deref()))
}

/// One conversation's state: the KV cache, indexed by position, and scratch buffers.
/// Rewinding (a rejected draft, an edited prompt) needs no copy: later writes overwrite.
pub struct Session<B: Backend> {
    k_cache: Vec<B::Kv>, // per layer: (capacity, kv_dim)
    v_cache: Vec<B::Kv>, // per layer: (capacity, kv_dim)
    capacity: usize,
    batch: usize,
    x: B::Buf,      // (batch, n_embd) residual stream
    xn: B::Buf,     // (batch, n_embd) normalised x, the input of the next matmuls
    xb: B::Buf,     // (batch, n_embd)
    q: B::Buf,      // (batch, q_dim)
    k: B::Buf,      // (batch, kv_dim)
    v: B::Buf,      // (batch, kv_dim)
    att: B::Buf,    // (batch, q_dim)
    gate: B::Buf,   // (batch, n_ff)
    up: B::Buf,     // (batch, n_ff)
    logits: B::Buf, // (batch, n_vocab)
}

impl<B: Backend> Session<B> {
    pub fn new(m: &Model<B>, capacity: usize) -> Result<Self> {
        let c = &m.cfg;
        let b = &m.backend;
        let cap = capacity.clamp(1, c.n_ctx);
        let kvd = c.n_kv_head * c.head_dim;
        let mut s = Session {
            k_cache: (0..c.n_layer).map(|_| b.alloc_kv(cap * kvd)).collect::<Result<_>>()?,
            v_cache: (0..c.n_layer).map(|_| b.alloc_kv(cap * kvd)).collect::<Result<_>>()?,
            capacity: cap,
            batch: 0,
            x: b.alloc(0)?,
            xn: b.alloc(0)?,
            xb: b.alloc(0)?,
            q: b.alloc(0)?,
            k: b.alloc(0)?,
            v: b.alloc(0)?,
            att: b.alloc(0)?,
            gate: b.alloc(0)?,
            up: b.alloc(0)?,
            logits: b.alloc(0)?,
        };
        s.ensure_batch(m, 1)?;
        Ok(s)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn ensure_batch(&mut self, m: &Model<B>, n: usize) -> Result<()> {
        if n <= self.batch {
            return Ok(());
        }
        let (c, b) = (&m.cfg, &m.backend);
        let (qd, kvd) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        for (buf, w) in [
            (&mut self.x, c.n_embd),
            (&mut self.xn, c.n_embd),
            (&mut self.xb, c.n_embd.max(qd)),
            (&mut self.q, qd),
            (&mut self.k, kvd),
            (&mut self.v, kvd),
            (&mut self.att, qd),
            (&mut self.gate, c.n_ff),
            (&mut self.up, c.n_ff),
            (&mut self.logits, c.n_vocab),
        ] {
            b.grow(buf, n * w)?;
        }
        self.batch = n;
        Ok(())
    }

    /// Make room for positions `0..need`, growing the cache (up to the model's context).
    pub fn reserve(&mut self, m: &Model<B>, need: usize) -> Result<()> {
        let c = &m.cfg;
        if need > c.n_ctx {
            bail!("context full: {need} tokens do not fit the model's context of {} tokens", c.n_ctx);
        }
        if need <= self.capacity {
            return Ok(());
        }
        let cap = need.max(self.capacity.saturating_mul(2)).min(c.n_ctx);
        let kvd = c.n_kv_head * c.head_dim;
        for buf in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            m.backend.grow_kv(buf, cap * kvd)?;
        }
        self.capacity = cap;
        Ok(())
    }

    /// Run `tokens` at positions `pos0..`, filling the KV cache. Returns the logits of the
    /// last token, or of every token when `all` (speculative verification).
    pub fn forward(&mut self, m: &Model<B>, tokens: &[u32], pos0: usize, all: bool) -> Result<Vec<f32>> {
        match m.backend.run(|| self.forward_chunks(m, tokens, pos0, all, None))? {
            Output::Logits(l) => Ok(l),
            Output::Top(_) => unreachable!("asked for logits"),
        }
    }

    /// As [`Session::forward`], but only each row's `k` largest logits come back (see
    /// [`Backend::top_k`]): all a sampler with top-k (or greedy) needs, and on a GPU the only
    /// readback of a step.
    pub fn forward_top(&mut self, m: &Model<B>, tokens: &[u32], pos0: usize, all: bool, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        match m.backend.run(|| self.forward_chunks(m, tokens, pos0, all, Some(k)))? {
            Output::Top(t) => Ok(t),
            Output::Logits(_) => unreachable!("asked for the top k"),
        }
    }

    fn forward_chunks(&mut self, m: &Model<B>, tokens: &[u32], pos0: usize, all: bool, top: Option<usize>) -> Result<Output> {
        if tokens.is_empty() {
            bail!("forward needs at least one token");
        }
        self.reserve(m, pos0 + tokens.len())?;
        let mut out = match top {
            None => Output::Logits(Vec::new()),
            Some(_) => Output::Top(Vec::new()),
        };
        let mut pos = pos0;
        for chunk in tokens.chunks(MAX_BATCH) {
            let last = pos + chunk.len() == pos0 + tokens.len();
            let l = self.forward_batch(m, chunk, pos, all, all || last, top)?;
            match (&mut out, l) {
                (Output::Logits(o), Some(Output::Logits(l))) => o.extend(l),
                (Output::Top(o), Some(Output::Top(l))) => o.extend(l),
                _ => {}
            }
            pos += chunk.len();
        }
        Ok(out)
    }

    fn forward_batch(&mut self, m: &Model<B>, tokens: &[u32], pos0: usize, all: bool, logits: bool, top: Option<usize>) -> Result<Option<Output>> {
        let rows = if !logits {
            Rows::None
        } else if all {
            Rows::All
        } else {
            Rows::Last
        };
        self.forward_rows(m, &mut [], tokens, &[pos0], rows, top)
    }

    /// The forward pass, written once: `tokens` are the rows of one batch, `self`'s at
    /// positions `pos[0]..` (all of them when `others` is empty: prefill, a decode step,
    /// a speculative verification), else one row a session (a batched decode step of
    /// several sessions: row 0 is `self`, row `i` is `others[i - 1]` at `pos[i]`). The
    /// matmuls run once over all rows; RoPE, the K/V store and attention run per session
    /// on its own cache (one session: the fused Q/K/V + RoPE + store op).
    fn forward_rows(&mut self, m: &Model<B>, others: &mut [&mut Session<B>], tokens: &[u32], pos: &[usize], rows: Rows, top: Option<usize>) -> Result<Option<Output>> {
        let n = tokens.len();
        self.ensure_batch(m, n)?;
        let (c, b) = (&m.cfg, &m.backend);
        let s = c.attn();
        let (d, qd, kvd) = (c.n_embd, c.n_head * c.head_dim, s.kv_dim());
        // Rows of `self`: all, or the first.
        let own = if others.is_empty() { n } else { 1 };
        b.embed(&m.tok_embd, tokens, &mut self.x)?;
        b.rmsnorm(&self.x, &m.layers[0].attn_norm, c.eps, n, d, &mut self.xn)?;
        for (li, l) in m.layers.iter().enumerate() {
            // Attention block; xn holds the normalised input.
            if others.is_empty() {
                b.qkv_rope_store([&l.wq, &l.wk, &l.wv], &self.xn, &mut self.q, &mut self.k, &mut self.v, &mut self.k_cache[li], &mut self.v_cache[li], n, pos[0], s, &m.rope)?;
            } else {
                b.matmul_many(&[&l.wq, &l.wk, &l.wv], &self.xn, n, &mut [&mut self.q, &mut self.k, &mut self.v])?;
                b.rope_store_kv(&mut self.q, &mut self.k, &self.v, &mut self.k_cache[li], &mut self.v_cache[li], own, pos[0], s, &m.rope)?;
            }
            b.attention(&self.q, &self.k_cache[li], &self.v_cache[li], &mut self.att, own, pos[0], s)?;
            // Other sessions' rows through their own row-0 buffers.
            for (i, o) in others.iter_mut().enumerate() {
                let (r, p) = (i + 1, pos[i + 1]);
                b.copy_rows(&self.q, r, &mut o.q, 0, 1, qd)?;
                b.copy_rows(&self.k, r, &mut o.k, 0, 1, kvd)?;
                b.copy_rows(&self.v, r, &mut o.v, 0, 1, kvd)?;
                b.rope_store_kv(&mut o.q, &mut o.k, &o.v, &mut o.k_cache[li], &mut o.v_cache[li], 1, p, s, &m.rope)?;
                b.attention(&o.q, &o.k_cache[li], &o.v_cache[li], &mut o.att, 1, p, s)?;
                b.copy_rows(&o.att, 0, &mut self.att, r, 1, qd)?;
            }
            self.finish_layer(m, li, n)?;
        }
        // xn holds the output norm of every row.
        let out_w = m.output.as_ref().unwrap_or(&m.tok_embd);
        let rows = match rows {
            Rows::None => return Ok(None),
            Rows::All => {
                b.matmul_logits(out_w, &self.xn, n, &mut self.logits)?;
                n
            }
            Rows::Last => {
                // Only the last row's logits are wanted.
                b.copy_rows(&self.xn, n - 1, &mut self.xb, 0, 1, d)?;
                b.matmul_logits(out_w, &self.xb, 1, &mut self.logits)?;
                1
            }
        };
        Ok(Some(match top {
            None => Output::Logits(b.read(&self.logits, 0, rows * c.n_vocab)?),
            Some(k) => Output::Top(b.top_k(&self.logits, rows, c.n_vocab, k)?),
        }))
    }

    /// The rest of layer `li` once `att` holds the attention output of `n` rows: the output
    /// projection and residual, then the feed-forward block and its residual, each residual
    /// add fused with the norm that follows it (the next layer's, or the output norm), into xn.
    fn finish_layer(&mut self, m: &Model<B>, li: usize, n: usize) -> Result<()> {
        let (c, b, d) = (&m.cfg, &m.backend, m.cfg.n_embd);
        let l = &m.layers[li];
        b.matmul(&l.wo, &self.att, n, &mut self.xb)?;
        b.add_rmsnorm(&mut self.x, &self.xb, &l.ffn_norm, c.eps, n, d, &mut self.xn)?;
        b.ffn_gate_up(&l.w_gate, &l.w_up, &self.xn, n, &mut self.gate, &mut self.up, c.n_ff)?;
        b.matmul(&l.w_down, &self.gate, n, &mut self.xb)?;
        let next = m.layers.get(li + 1).map_or(&m.output_norm, |l| &l.attn_norm);
        b.add_rmsnorm(&mut self.x, &self.xb, next, c.eps, n, d, &mut self.xn)
    }

    /// One decode step for several sessions on the same weights in one pass: row 0 is
    /// `self` (whose buffers hold the batch), row `i` is `others[i - 1]`; token `tokens[i]`
    /// at position `pos[i]`. The matmuls run once over all rows, which costs little more
    /// than one row where they are bound by reading the weights; attention runs per session
    /// on its own KV cache. Returns every row's logits. Each row's logits are what a pass
    /// of that session alone gives, bit for bit, where the backend's matmul is
    /// batch-invariant (the CPU backends' are).
    pub fn forward_multi(&mut self, m: &Model<B>, others: &mut [&mut Session<B>], tokens: &[u32], pos: &[usize]) -> Result<Vec<f32>> {
        match self.forward_multi_with(m, others, tokens, pos, None)? {
            Output::Logits(l) => Ok(l),
            Output::Top(_) => unreachable!("asked for logits"),
        }
    }

    /// As [`Session::forward_multi`], but only each row's `k` largest logits come back (see
    /// [`Backend::top_k`]).
    pub fn forward_multi_top(&mut self, m: &Model<B>, others: &mut [&mut Session<B>], tokens: &[u32], pos: &[usize], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        match self.forward_multi_with(m, others, tokens, pos, Some(k))? {
            Output::Top(t) => Ok(t),
            Output::Logits(_) => unreachable!("asked for the top k"),
        }
    }

    fn forward_multi_with(&mut self, m: &Model<B>, others: &mut [&mut Session<B>], tokens: &[u32], pos: &[usize], top: Option<usize>) -> Result<Output> {
        let n = tokens.len();
        if n != others.len() + 1 || pos.len() != n {
            bail!("forward_multi: {n} tokens and {} positions for {} sessions", pos.len(), others.len() + 1);
        }
        self.reserve(m, pos[0] + 1)?;
        for (o, &p) in others.iter_mut().zip(&pos[1..]) {
            o.reserve(m, p + 1)?;
        }
        let out = m.backend.run(|| self.forward_rows(m, others, tokens, pos, Rows::All, top))?;
        out.ok_or_else(|| anyhow::anyhow!("forward_multi: no logits"))
    }
}

/// Which rows' logits a pass computes.
#[derive(Clone, Copy)]
enum Rows {
    None,
    Last,
    All,
}

/// What a forward pass hands back: every logit, or each row's top k.
enum Output {
    Logits(Vec<f32>),
    Top(Vec<Vec<(u32, f32)>>),
}

/// An object-safe handle on a model and one session, so callers choose a backend at run time.
pub trait Forward: Send {
    fn config(&self) -> &Config;
    fn backend_name(&self) -> String;
    /// See [`Session::forward`].
    fn forward(&mut self, tokens: &[u32], pos0: usize, all: bool) -> Result<Vec<f32>>;
    /// See [`Session::forward_top`]: each row's `k` largest (token, logit) pairs.
    fn forward_top(&mut self, tokens: &[u32], pos0: usize, all: bool, k: usize) -> Result<Vec<Vec<(u32, f32)>>>;
    /// Make room for `n` positions in the KV cache (errors beyond the model's context).
    fn reserve(&mut self, n: usize) -> Result<()>;
    /// A new session on the same weights, its KV cache sized for `capacity` positions.
    fn fork(&self, capacity: usize) -> Result<Box<dyn Forward>>;
    /// One decode step for `self` and `others` (forks of the same model) in one batched
    /// pass: token `tokens[i]` at position `pos[i]`, row 0 being `self`. Returns the rows'
    /// logits. See [`Session::forward_multi`].
    fn forward_multi(&mut self, others: &mut [&mut dyn Forward], tokens: &[u32], pos: &[usize]) -> Result<Vec<f32>>;
    /// As [`Forward::forward_multi`], each row's `k` largest (token, logit) pairs only.
    fn forward_multi_top(&mut self, others: &mut [&mut dyn Forward], tokens: &[u32], pos: &[usize], k: usize) -> Result<Vec<Vec<(u32, f32)>>>;
    fn as_any(&mut self) -> &mut dyn std::any::Any;
    /// Start (`true`) or stop timing every kernel; returns the times gathered so far and
    /// resets them (empty where the backend keeps none).
    fn profile(&mut self, on: bool) -> Vec<crate::backend::KernelTime>;
}

pub struct Runner<B: Backend> {
    pub model: Arc<Model<B>>,
    pub session: Session<B>,
}

impl<B: Backend> Runner<B> {
    pub fn new(model: Arc<Model<B>>, capacity: usize) -> Result<Self> {
        let session = Session::new(&model, capacity)?;
        Ok(Runner { model, session })
    }
}

impl<B: Backend + 'static> Forward for Runner<B> {
    fn config(&self) -> &Config {
        &self.model.cfg
    }
    fn backend_name(&self) -> String {
        self.model.backend.name()
    }
    fn forward(&mut self, tokens: &[u32], pos0: usize, all: bool) -> Result<Vec<f32>> {
        self.session.forward(&self.model, tokens, pos0, all)
    }
    fn forward_top(&mut self, tokens: &[u32], pos0: usize, all: bool, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        self.session.forward_top(&self.model, tokens, pos0, all, k)
    }
    fn reserve(&mut self, n: usize) -> Result<()> {
        self.session.reserve(&self.model, n)
    }
    fn fork(&self, capacity: usize) -> Result<Box<dyn Forward>> {
        Ok(Box::new(Runner::new(self.model.clone(), capacity)?))
    }
    fn forward_multi(&mut self, others: &mut [&mut dyn Forward], tokens: &[u32], pos: &[usize]) -> Result<Vec<f32>> {
        let model = self.model.clone();
        self.session.forward_multi(&model, &mut sessions_of(&model, others)?, tokens, pos)
    }
    fn forward_multi_top(&mut self, others: &mut [&mut dyn Forward], tokens: &[u32], pos: &[usize], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let model = self.model.clone();
        self.session.forward_multi_top(&model, &mut sessions_of(&model, others)?, tokens, pos, k)
    }
    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn profile(&mut self, on: bool) -> Vec<crate::backend::KernelTime> {
        let t = self.model.backend.take_profile();
        self.model.backend.set_profiling(on);
        t
    }
}

/// The sessions of `others`, each a fork of `model`.
fn sessions_of<'a, B: Backend>(model: &Arc<Model<B>>, others: &'a mut [&mut dyn Forward]) -> Result<Vec<&'a mut Session<B>>> {
    let mut sessions = Vec::with_capacity(others.len());
    for o in others.iter_mut() {
        match o.as_any().downcast_mut::<Runner<B>>() {
            Some(r) if Arc::ptr_eq(&r.model, model) => sessions.push(&mut r.session),
            _ => bail!("forward_multi: every session must be a fork of the same model"),
        }
    }
    Ok(sessions)
}
