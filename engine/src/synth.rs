//! Random-weight Llama models written as GGUF (`flint synth`): the shapes and tensor types of
//! real models at the same speed, with no download. Each carries a byte-level BPE tokenizer
//! (3 control tokens, the 256 bytes, letter-pair merges, filler up to the vocabulary size)
//! and a ChatML template, so every command runs on them.

use crate::gguf::write::{write_gguf, TensorDecl};
use crate::gguf::Value;
use crate::quant::{quantize, GgmlType};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_base: f32,
    pub weight_type: GgmlType,
    pub embd_type: GgmlType,
    /// Write a separate `output.weight` instead of tying it to the embeddings.
    pub untied: bool,
    pub seed: u64,
}

pub const PRESETS: &[&str] = &["tiny", "smollm2-135m", "llama-1b"];

impl Spec {
    pub fn preset(name: &str) -> Result<Spec> {
        let base = |n_layer, n_embd, n_ff, n_head, n_kv_head, n_vocab, n_ctx, rope_base| Spec {
            name: name.to_string(),
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_kv_head,
            n_vocab,
            n_ctx,
            rope_base,
            weight_type: GgmlType::Q4_1,
            embd_type: GgmlType::Q8_0,
            untied: false,
            seed: 0,
        };
        Ok(match name {
            // Small enough for the exact reference in tests; head_dim 16, GQA groups of 2.
            "tiny" => base(2, 64, 96, 4, 2, 320, 512, 10_000.0),
            // SmolLM2-135M: the default model's shapes and types.
            "smollm2-135m" => base(30, 576, 1536, 9, 3, 49152, 8192, 100_000.0),
            // Llama-3.2-1B.
            "llama-1b" => base(16, 2048, 8192, 32, 8, 128_256, 131_072, 500_000.0),
            other => bail!("unknown preset {other:?} (presets: {})", PRESETS.join(", ")),
        })
    }

    /// Set the weight type; embeddings follow (Q8_0 under a quantized type, as in the default model).
    pub fn with_type(mut self, ty: GgmlType) -> Result<Self> {
        if !ty.is_supported() {
            bail!("Flint cannot write {ty} tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
        }
        self.weight_type = ty;
        self.embd_type = if ty.block_size() > 1 { GgmlType::Q8_0 } else { ty };
        Ok(self)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    fn tensors(&self) -> Vec<TensorDecl> {
        let (d, f, kvd) = (self.n_embd as u64, self.n_ff as u64, (self.n_kv_head * self.head_dim()) as u64);
        let t = |name: String, dims: Vec<u64>, ty| TensorDecl { name, dims, ty };
        let mut v = vec![t("token_embd.weight".into(), vec![d, self.n_vocab as u64], self.embd_type)];
        for i in 0..self.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let w = self.weight_type;
            v.push(t(n("attn_norm"), vec![d], GgmlType::F32));
            v.push(t(n("attn_q"), vec![d, d], w));
            v.push(t(n("attn_k"), vec![d, kvd], w));
            v.push(t(n("attn_v"), vec![d, kvd], w));
            v.push(t(n("attn_output"), vec![d, d], w));
            v.push(t(n("ffn_norm"), vec![d], GgmlType::F32));
            v.push(t(n("ffn_gate"), vec![d, f], w));
            v.push(t(n("ffn_up"), vec![d, f], w));
            v.push(t(n("ffn_down"), vec![f, d], w));
        }
        v.push(t("output_norm.weight".into(), vec![d], GgmlType::F32));
        if self.untied {
            v.push(t("output.weight".into(), vec![d, self.n_vocab as u64], self.embd_type));
        }
        v
    }

    fn metadata(&self) -> Result<Vec<(String, Value)>> {
        let (tokens, types, merges) = vocabulary(self.n_vocab)?;
        let s = |x: &str| Value::Str(x.to_string());
        let u = |x: usize| Value::U32(x as u32);
        let arr_s = |v: Vec<String>| Value::Array(8, v.into_iter().map(Value::Str).collect());
        let file_type = match self.weight_type {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 7,
            _ => 32, // BF16
        };
        Ok(vec![
            ("general.architecture".into(), s("llama")),
            ("general.name".into(), s(&format!("flint synthetic {} (seed {})", self.name, self.seed))),
            ("general.file_type".into(), u(file_type)),
            ("general.quantization_version".into(), u(2)),
            ("llama.block_count".into(), u(self.n_layer)),
            ("llama.context_length".into(), u(self.n_ctx)),
            ("llama.embedding_length".into(), u(self.n_embd)),
            ("llama.feed_forward_length".into(), u(self.n_ff)),
            ("llama.attention.head_count".into(), u(self.n_head)),
            ("llama.attention.head_count_kv".into(), u(self.n_kv_head)),
            ("llama.rope.freq_base".into(), Value::F32(self.rope_base)),
            ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
            ("llama.vocab_size".into(), u(self.n_vocab)),
            ("llama.rope.dimension_count".into(), u(self.head_dim())),
            ("tokenizer.ggml.model".into(), s("gpt2")),
            ("tokenizer.ggml.pre".into(), s("smollm")),
            ("tokenizer.ggml.tokens".into(), arr_s(tokens)),
            ("tokenizer.ggml.token_type".into(), Value::Array(5, types.into_iter().map(Value::I32).collect())),
            ("tokenizer.ggml.merges".into(), arr_s(merges)),
            ("tokenizer.ggml.bos_token_id".into(), u(1)),
            ("tokenizer.ggml.eos_token_id".into(), u(2)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
            ("tokenizer.chat_template".into(), s(CHATML)),
        ])
    }

    /// Write the model to `path` (through a temporary file, renamed when complete).
    pub fn write(&self, path: &Path) -> Result<()> {
        if self.n_embd % self.n_head != 0 || self.n_head % self.n_kv_head != 0 {
            bail!("n_embd must divide into heads and heads into KV heads");
        }
        if self.n_ctx == 0 || self.n_ctx > 1 << 20 {
            bail!("context {} is out of range (1 to 1048576)", self.n_ctx);
        }
        let tensors = self.tensors();
        let meta = self.metadata()?;
        // A temporary name of this writer's own, so concurrent writers never collide.
        static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nth = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("part-{}-{nth}", std::process::id()));
        let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let w = std::io::BufWriter::with_capacity(1 << 22, file);
        write_gguf(w, &meta, &tensors, |i, out| {
            let t = &tensors[i];
            let k = t.dims[0] as usize;
            let rows = t.dims.iter().skip(1).product::<u64>() as usize;
            if t.name.ends_with("_norm.weight") {
                // Norm gains near 1, so activations stay in a sane range.
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ (i as u64) << 32);
                let v: Vec<f32> = (0..k).map(|_| 1.0 + rng.random_range(-0.1..0.1)).collect();
                return quantize(t.ty, &v, out);
            }
            // Uniform with unit-variance outputs for unit-variance inputs (embeddings: 1).
            let a = if t.name == "token_embd.weight" { 1.0 } else { (3.0 / k as f32).sqrt() };
            let rows_per = (1 << 16) / k + 1;
            let parts: Vec<Result<Vec<u8>>> = (0..rows.div_ceil(rows_per))
                .into_par_iter()
                .map(|c| {
                    let seed = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((i as u64) << 40) ^ c as u64;
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    let n = (rows - c * rows_per).min(rows_per) * k;
                    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-a..a)).collect();
                    let mut b = Vec::new();
                    quantize(t.ty, &v, &mut b)?;
                    Ok(b)
                })
                .collect();
            for p in parts {
                out.extend_from_slice(&p?);
            }
            Ok(())
        })?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Tokens (byte-level strings), token types and merges of the synthetic vocabulary.
fn vocabulary(n_vocab: usize) -> Result<(Vec<String>, Vec<i32>, Vec<String>)> {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    if n_vocab < specials.len() + 256 {
        bail!("vocabulary of {n_vocab} is too small (at least {})", specials.len() + 256);
    }
    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; specials.len()];
    let byte_char = crate::tokenizer::byte_to_unicode();
    tokens.extend(byte_char.iter().map(|c| c.to_string()));
    types.extend([1; 256]);
    // Merges: a space before a letter, then letter pairs, while the vocabulary has room.
    let mut merges = Vec::new();
    let letters: Vec<char> = ('a'..='z').collect();
    let mut pairs: Vec<(String, String)> = letters.iter().map(|c| ("Ġ".to_string(), c.to_string())).collect();
    for a in &letters {
        for b in &letters {
            pairs.push((a.to_string(), b.to_string()));
        }
    }
    for (a, b) in pairs {
        if tokens.len() >= n_vocab {
            break;
        }
        tokens.push(format!("{a}{b}"));
        types.push(1);
        merges.push(format!("{a} {b}"));
    }
    while tokens.len() < n_vocab {
        tokens.push(format!("<synth_{}>", tokens.len()));
        types.push(1);
    }
    Ok((tokens, types, merges))
}

