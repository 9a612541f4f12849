//! The golden model of a whole Llama decoder (docs/hdl.md, "The decoder layer"): the
//! model's own weights, the GEMVs of the mesh's contract, the operations between them as
//! `numerics` defines them, and a KV cache of Q8_0 blocks.

use super::numerics::{self, Heads};
use super::{quantize_q8, round_to_f32, scaled_term, Block, QK};
use crate::gguf::{Gguf, TensorInfo};
use crate::model::Config;
use crate::quant::{dequantize, quantize, GgmlType};
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

/// A weight block of the types the contract takes as they are: the value of element i is
/// `d * qs[i] + m` (Q8_0: `qs` the int8 values, `m` = 0; Q4_0: `qs` = the nibble - 8, `m` = 0;
/// Q4_1: `qs` the nibble, `m` its f16 minimum). Its product with an activation block
/// `(d_a, q_a)` is `T(sum qs_i q_a_i; d, d_a) + T(sum q_a_i; m, d_a)`, each the GEMV's exact
/// term (so Q8_0 and Q4_0 weights are the plain GEMV).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WBlock {
    pub d: u16,
    pub m: u16,
    pub qs: [i8; QK],
}

/// A weight matrix: `rows` rows of `nb` blocks, in the model's own type where the contract
/// takes it (Q8_0, Q4_0, Q4_1); any other type is dequantized and re-quantized to Q8_0.
#[derive(Clone, Debug)]
pub struct WMatrix {
    pub rows: usize,
    pub nb: usize,
    pub ty: GgmlType,
    pub blocks: Vec<WBlock>,
}

impl WMatrix {
    pub fn from_tensor(g: &Gguf, t: &TensorInfo) -> Result<WMatrix> {
        if t.dims.len() != 2 || t.dims[0] % QK as u64 != 0 {
            bail!("tensor {} has shape {:?}; a 2D tensor with rows a multiple of {QK} is needed", t.name, t.dims);
        }
        let (k, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        let data = g.tensor_data(t);
        let (ty, data) = match t.ty {
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => (t.ty, data.to_vec()),
            _ => {
                let mut x = vec![0f32; k * rows];
                dequantize(t.ty, data, &mut x)?;
                let mut out = Vec::new();
                quantize(GgmlType::Q8_0, &x, &mut out)?;
                (GgmlType::Q8_0, out)
            }
        };
        WMatrix::from_bytes(ty, rows, k / QK, &data)
    }

    /// `rows` rows of `nb` blocks of type `ty` (Q8_0, Q4_0 or Q4_1), as GGUF stores them.
    pub fn from_bytes(ty: GgmlType, rows: usize, nb: usize, data: &[u8]) -> Result<WMatrix> {
        let size = match ty {
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            _ => bail!("the contract takes Q8_0, Q4_0 and Q4_1 weights as they are, not {ty}"),
        };
        if data.len() != rows * nb * size {
            bail!("{rows} x {nb} {ty} blocks need {} bytes, have {}", rows * nb * size, data.len());
        }
        let f16 = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let blocks = data
            .chunks_exact(size)
            .map(|b| match ty {
                GgmlType::Q8_0 => WBlock { d: f16(b, 0), m: 0, qs: Block::from_bytes(b).qs },
                GgmlType::Q4_0 => WBlock { d: f16(b, 0), m: 0, qs: nibbles(&b[2..], -8) },
                _ => WBlock { d: f16(b, 0), m: f16(b, 2), qs: nibbles(&b[4..], 0) },
            })
            .collect();
        Ok(WMatrix { rows, nb, ty, blocks })
    }
}

impl WMatrix {
    /// The blocks as the mesh's PEs hold them, with the `meta.hex` type word: Q8_0 in 9 words
    /// (type 0); Q4_1 in 5 (type 1): 4 words of eight nibbles (element 8i + j at bits 4j of
    /// word i), then `m << 16 | d`. Q4_0 is not a mesh type.
    pub fn mesh_words(&self) -> Result<(u32, Vec<u32>)> {
        match self.ty {
            GgmlType::Q8_0 => Ok((0, self.blocks.iter().flat_map(|b| Block { d: b.d, qs: b.qs }.words()).collect())),
            GgmlType::Q4_1 => Ok((
                1,
                self.blocks
                    .iter()
                    .flat_map(|b| {
                        let nib = |i: usize| (0..8).fold(0u32, |w, j| w | ((b.qs[8 * i + j] as u32 & 15) << (4 * j)));
                        [nib(0), nib(1), nib(2), nib(3), (b.m as u32) << 16 | b.d as u32]
                    })
                    .collect(),
            )),
            ty => bail!("the mesh's PEs take Q8_0 and Q4_1 weights, not {ty}"),
        }
    }
}

/// GGML's nibble order: element j in the low nibble of byte j, element j + 16 in the high.
fn nibbles(b: &[u8], offset: i8) -> [i8; QK] {
    let mut qs = [0i8; QK];
    for j in 0..16 {
        qs[j] = (b[j] & 15) as i8 + offset;
        qs[j + 16] = (b[j] >> 4) as i8 + offset;
    }
    qs
}

/// The golden GEMV over weights of any [`WBlock`] type: `y[r] = round_f32(sum of terms)`.
pub fn gemv_w(w: &WMatrix, x: &[Block]) -> Result<Vec<f32>> {
    gemv_sum(w, &[x])
}

/// The GEMV of the sum of several activation vectors (a value and its rounding residual):
/// all their terms in one exact accumulator, rounded once.
pub fn gemv_sum(w: &WMatrix, xs: &[&[Block]]) -> Result<Vec<f32>> {
    if let Some(x) = xs.iter().find(|x| x.len() != w.nb) {
        bail!("the activation vector has {} blocks; the matrix rows have {}", x.len(), w.nb);
    }
    let sums: Vec<Vec<i64>> = xs.iter().map(|x| x.iter().map(|a| a.qs.iter().map(|&q| q as i64).sum()).collect()).collect();
    w.blocks
        .par_chunks_exact(w.nb)
        .map(|row| {
            let mut acc = 0i128;
            for (x, sums) in xs.iter().zip(&sums) {
                for ((b, a), &sa) in row.iter().zip(x.iter()).zip(sums) {
                    let p: i32 = b.qs.iter().zip(&a.qs).map(|(&x, &y)| x as i32 * y as i32).sum();
                    acc += scaled_term(p as i64, b.d, a.d)?;
                    if b.m & 0x7fff != 0 {
                        acc += scaled_term(sa, b.m, a.d)?;
                    }
                }
            }
            Ok(round_to_f32(acc))
        })
        .collect()
}

/// `x` as `terms` Q8_0 vectors whose sum approximates it: the first `Q8(x)`, each next one
/// the Q8_0 of what the terms so far left out (`x_i - sum d q_i`, each `d q` exact in f32,
/// the subtractions in term order). Two terms carry about 16 bits per value.
pub fn quantize_terms(x: &[f32], terms: usize) -> Result<Vec<Vec<Block>>> {
    let mut rest = x.to_vec();
    let mut out = Vec::with_capacity(terms);
    for _ in 0..terms {
        let a = quantize_q8(&rest)?;
        for (r, b) in rest.chunks_exact_mut(QK).zip(&a) {
            let d = half::f16::from_bits(b.d).to_f32();
            r.iter_mut().zip(b.qs).for_each(|(v, q)| *v -= d * q as f32);
        }
        out.push(a);
    }
    Ok(out)
}

/// The GEMV of a vector carried as terms.
pub fn gemv_terms(w: &WMatrix, x: &[Vec<Block>]) -> Result<Vec<f32>> {
    gemv_sum(w, &x.iter().map(|t| &t[..]).collect::<Vec<_>>())
}

/// A norm's weights (any float type), as f32.
fn vector(g: &Gguf, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = g.tensor(name).ok_or_else(|| anyhow!("tensor {name} is missing"))?;
    if t.dims != [len as u64] {
        bail!("tensor {name} has shape {:?}, expected [{len}]", t.dims);
    }
    let mut v = vec![0f32; len];
    dequantize(t.ty, g.tensor_data(t), &mut v)?;
    Ok(v)
}

pub struct GoldenLayer {
    pub attn_norm: Vec<f32>,
    pub wq: WMatrix,
    pub wk: WMatrix,
    pub wv: WMatrix,
    pub wo: WMatrix,
    pub ffn_norm: Vec<f32>,
    pub gate: WMatrix,
    pub up: WMatrix,
    pub down: WMatrix,
}

/// The whole model under the contract.
pub struct Golden {
    pub cfg: Config,
    pub layers: Vec<GoldenLayer>,
    /// The token embeddings, as the GGUF stores them, and their type.
    embd: (GgmlType, Vec<u8>),
    pub output_norm: Vec<f32>,
    pub output: WMatrix,
    pub inv_freq: Vec<f32>,
    /// Q8_0 terms per 8-bit vector (activations into every GEMV, the query, the KV cache):
    /// 1 is the plain Q8_0 of llama.cpp and the engine's `cpu` backend; 2 adds the residual's
    /// Q8_0 (about 16 bits per value, twice the MACs, the same units).
    pub terms: usize,
}

/// One sequence's KV cache: per layer, per position, its K and V as `terms` runs of
/// `n_kv_head * head_dim / 32` blocks.
#[derive(Default, Clone)]
pub struct GoldenCache {
    pub k: Vec<Vec<Block>>,
    pub v: Vec<Vec<Block>>,
    pub len: usize,
}

/// A layer's intermediate values for one token (the vectors a bench checks unit by unit);
/// 8-bit vectors as their terms.
#[derive(Clone, Debug, Default)]
pub struct LayerTrace {
    pub x_in: Vec<f32>,
    pub attn_in: Vec<Vec<Block>>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub q_rope: Vec<Vec<Block>>,
    pub k_rope: Vec<Vec<Block>>,
    pub v_q8: Vec<Vec<Block>>,
    pub attn: Vec<f32>,
    pub o: Vec<f32>,
    pub x_mid: Vec<f32>,
    pub ffn_in: Vec<Vec<Block>>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub h: Vec<Vec<Block>>,
    pub down: Vec<f32>,
    pub x_out: Vec<f32>,
}

impl Golden {
    /// The model under the contract, its 8-bit vectors carried as `terms` Q8_0 terms (1 or 2).
    pub fn load(g: &Gguf, terms: usize) -> Result<Golden> {
        if !(1..=2).contains(&terms) {
            bail!("the contract carries 8-bit vectors as 1 or 2 Q8_0 terms, not {terms}");
        }
        let cfg = Config::from_gguf(g)?;
        let c = &cfg;
        if c.head_dim % QK != 0 || c.n_embd % QK != 0 || c.n_ff % QK != 0 {
            bail!("the contract needs whole blocks: head size {}, width {}, FFN {} must be multiples of {QK}", c.head_dim, c.n_embd, c.n_ff);
        }
        let (qd, kvd) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let mat = |name: &str, cols: usize, rows: usize| -> Result<WMatrix> {
            let t = g.tensor(name).ok_or_else(|| anyhow!("tensor {name} is missing"))?;
            if t.dims != [cols as u64, rows as u64] {
                bail!("tensor {name} has shape {:?}, the metadata implies [{cols}, {rows}]", t.dims);
            }
            WMatrix::from_tensor(g, t).with_context(|| format!("loading {name}"))
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(GoldenLayer {
                attn_norm: vector(g, &n("attn_norm"), c.n_embd)?,
                wq: mat(&n("attn_q"), c.n_embd, qd)?,
                wk: mat(&n("attn_k"), c.n_embd, kvd)?,
                wv: mat(&n("attn_v"), c.n_embd, kvd)?,
                wo: mat(&n("attn_output"), qd, c.n_embd)?,
                ffn_norm: vector(g, &n("ffn_norm"), c.n_embd)?,
                gate: mat(&n("ffn_gate"), c.n_embd, c.n_ff)?,
                up: mat(&n("ffn_up"), c.n_embd, c.n_ff)?,
                down: mat(&n("ffn_down"), c.n_ff, c.n_embd)?,
            });
        }
        let te = g.tensor("token_embd.weight").ok_or_else(|| anyhow!("tensor token_embd.weight is missing"))?;
        if te.dims != [c.n_embd as u64, c.n_vocab as u64] {
            bail!("token_embd.weight has shape {:?}", te.dims);
        }
        let output = if c.tied_embeddings { WMatrix::from_tensor(g, te)? } else { mat("output.weight", c.n_embd, c.n_vocab)? };
        Ok(Golden {
            embd: (te.ty, g.tensor_data(te).to_vec()),
            output_norm: vector(g, "output_norm.weight", c.n_embd)?,
            output,
            inv_freq: crate::model::rope_of(g, c)?.inv_freq,
            layers,
            cfg,
            terms,
        })
    }

    pub fn heads(&self) -> Heads {
        Heads { n_head: self.cfg.n_head, n_kv_head: self.cfg.n_kv_head, head_dim: self.cfg.head_dim }
    }

    pub fn new_cache(&self) -> GoldenCache {
        GoldenCache { k: vec![Vec::new(); self.cfg.n_layer], v: vec![Vec::new(); self.cfg.n_layer], len: 0 }
    }

    /// Token `token`'s embedding: a Q8_0 row is `d * q` per element (exact in f32); a row of
    /// any other type is the model's dequantized row.
    pub fn embed(&self, token: u32) -> Result<Vec<f32>> {
        let (ty, data) = (&self.embd.0, &self.embd.1);
        let n = self.cfg.n_embd;
        if token as usize >= self.cfg.n_vocab {
            bail!("token {token} is outside the vocabulary of {}", self.cfg.n_vocab);
        }
        let rb = ty.bytes_for(n as u64).context("embedding rows are not whole blocks")? as usize;
        let mut x = vec![0f32; n];
        dequantize(*ty, &data[token as usize * rb..][..rb], &mut x)?;
        Ok(x)
    }

    /// Layer `li` for the token at position `cache.len` (its K and V appended to the cache):
    /// `x` in, `x` out.
    pub fn layer(&self, li: usize, x: &[f32], cache: &mut GoldenCache) -> Result<LayerTrace> {
        let (c, l, n) = (&self.cfg, &self.layers[li], self.terms);
        let mut t = LayerTrace { x_in: x.to_vec(), ..Default::default() };
        t.attn_in = quantize_terms(&numerics::rmsnorm(x, &l.attn_norm, c.eps)?, n)?;
        t.q = gemv_terms(&l.wq, &t.attn_in)?;
        t.k = gemv_terms(&l.wk, &t.attn_in)?;
        t.v = gemv_terms(&l.wv, &t.attn_in)?;
        let cs = numerics::rope_table(&self.inv_freq, cache.len);
        let (mut q, mut k) = (t.q.clone(), t.k.clone());
        numerics::rope(&mut q, c.head_dim, &cs);
        numerics::rope(&mut k, c.head_dim, &cs);
        t.q_rope = quantize_terms(&q, n)?;
        t.k_rope = quantize_terms(&k, n)?;
        t.v_q8 = quantize_terms(&t.v, n)?;
        t.k_rope.iter().for_each(|b| cache.k[li].extend_from_slice(b));
        t.v_q8.iter().for_each(|b| cache.v[li].extend_from_slice(b));
        t.attn = numerics::attention(&t.q_rope, &cache.k[li], &cache.v[li], n, cache.len + 1, self.heads())?;
        t.o = gemv_terms(&l.wo, &quantize_terms(&t.attn, n)?)?;
        t.x_mid = x.to_vec();
        numerics::add(&mut t.x_mid, &t.o);
        t.ffn_in = quantize_terms(&numerics::rmsnorm(&t.x_mid, &l.ffn_norm, c.eps)?, n)?;
        t.gate = gemv_terms(&l.gate, &t.ffn_in)?;
        t.up = gemv_terms(&l.up, &t.ffn_in)?;
        t.h = quantize_terms(&numerics::swiglu(&t.gate, &t.up), n)?;
        t.down = gemv_terms(&l.down, &t.h)?;
        t.x_out = t.x_mid.clone();
        numerics::add(&mut t.x_out, &t.down);
        Ok(t)
    }

    /// Layer `layer`'s trace for the token at `position`, the positions before it holding
    /// `tokens` in a cycle. Only the layers up to `layer` run (later ones never feed it).
    /// Returns the trace and that layer's cache after the token.
    pub fn trace_at(&self, layer: usize, tokens: &[u32], position: usize) -> Result<(LayerTrace, GoldenCache)> {
        self.trace_at_input(layer, tokens, position, |x| x)
    }

    /// `trace_at`, with the layer's input at `position` replaced by `input(x)` (the benches'
    /// edge cases: a zero vector, values at the contract's limit).
    pub fn trace_at_input(&self, layer: usize, tokens: &[u32], position: usize, input: impl Fn(Vec<f32>) -> Vec<f32>) -> Result<(LayerTrace, GoldenCache)> {
        if layer >= self.cfg.n_layer || tokens.is_empty() {
            bail!("layer {layer} of {} over {} tokens", self.cfg.n_layer, tokens.len());
        }
        let mut cache = self.new_cache();
        for p in 0..=position {
            let mut x = self.embed(tokens[p % tokens.len()])?;
            for li in 0..=layer {
                if p == position && li == layer {
                    x = input(x);
                }
                let t = self.layer(li, &x, &mut cache)?;
                if p == position && li == layer {
                    cache.len += 1;
                    return Ok((t, cache));
                }
                x = t.x_out;
            }
            cache.len += 1;
        }
        unreachable!("the loop returns at its last position")
    }

    /// One decode step: the token at position `cache.len` through every layer, then the
    /// output norm and the logits GEMV.
    pub fn step(&self, cache: &mut GoldenCache, token: u32) -> Result<Vec<f32>> {
        let mut x = self.embed(token)?;
        for li in 0..self.cfg.n_layer {
            x = self.layer(li, &x, cache)?.x_out;
        }
        cache.len += 1;
        self.logits(&x)
    }

    /// The output norm, 8-bit activations, and the logits GEMV.
    pub fn logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        gemv_terms(&self.output, &quantize_terms(&numerics::rmsnorm(x, &self.output_norm, self.cfg.eps)?, self.terms)?)
    }

    /// Greedy decoding: the prompt one token at a time, then `n` tokens, each the first
    /// index of the largest logit. Returns the tokens and the logits after the prompt.
    pub fn greedy(&self, prompt: &[u32], n: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let mut cache = self.new_cache();
        let mut logits = Vec::new();
        for &t in prompt {
            logits = self.step(&mut cache, t)?;
        }
        let first = logits.clone();
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let best = argmax(&logits);
            out.push(best);
            if i + 1 < n {
                logits = self.step(&mut cache, best)?;
            }
        }
        Ok((out, first))
    }
}

/// The first index of the largest value.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

