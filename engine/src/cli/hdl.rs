//! `flint hdl`: the HDL reference design's golden model (docs/hdl.md). `vectors` writes a
//! GEMV's memory files for the mesh benches; `layer` writes one decoder layer's vectors, op
//! by op, for a token at a chosen position; `generate` decodes under the layer contract and
//! compares with the exact CPU reference.

use super::model_path;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use flint::generate::Request;
use flint::hdl::layer::{Golden, GoldenCache, LayerTrace, WMatrix};
use flint::hdl::{self, Block};
use flint::sampler::SamplerConfig;
use flint::tokenizer::Message;
use flint::{BackendKind, Loaded};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum HdlCmd {
    /// Write a Q8_0 GEMV's memory files (weights, activations, expected outputs) and the unit
    /// benches' cases for the HDL benches.
    Vectors {
        /// Take the weights from this GGUF (with --tensor; re-quantized to Q8_0 if needed).
        #[arg(long, requires = "tensor")]
        model: Option<PathBuf>,
        /// A 2D tensor of --model, e.g. blk.0.attn_q.weight.
        #[arg(long)]
        tensor: Option<String>,
        /// Random weights of ROWSxCOLS (COLS a multiple of 32) instead of a model's.
        #[arg(long, conflicts_with = "tensor")]
        synthetic: Option<String>,
        /// Activations: this token's RMS-normalised embedding (needs --model); default random.
        #[arg(long, requires = "model")]
        token: Option<usize>,
        /// Keep --tensor's weights as the model stores them (Q8_0 or Q4_1) instead of
        /// re-quantizing them to Q8_0; the expected outputs are then the layer contract's GEMV.
        #[arg(long, requires = "tensor")]
        as_stored: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write one decoder layer's vectors under the layer contract: its input, every op's
    /// output and the KV cache, for the token at --position (the positions before it hold
    /// --text's tokens, repeated as needed).
    Layer {
        /// GGUF model (default: the one `flint pull` fetched).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The layer (0-based).
        #[arg(long, default_value_t = 0)]
        layer: usize,
        /// The token's position: the cache then holds this many earlier positions.
        #[arg(long, default_value_t = 0)]
        position: usize,
        /// Q8_0 terms per 8-bit vector: 1 (plain Q8_0) or 2 (value and residual).
        #[arg(long, default_value_t = 1)]
        terms: usize,
        /// The context's text (tokenized without a template; cycled to fill the positions).
        /// The layer's input at --position: the model's (real), a zero vector (zero), or the
        /// model's scaled by a power of two to just under 2^31 in magnitude (large).
        #[arg(long, value_enum, default_value_t = LayerInput::Real)]
        input: LayerInput,
        #[arg(long, default_value = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n")]
        text: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Greedy decoding under the layer contract, next to the exact CPU reference: the tokens,
    /// how many agree, and the logits' error after the prompt.
    Generate {
        /// GGUF model (default: the one `flint pull` fetched).
        #[arg(long)]
        model: Option<PathBuf>,
        /// A user message (the chat template is applied).
        #[arg(long)]
        prompt: String,
        #[arg(long, short = 'n', default_value_t = 16)]
        max_tokens: usize,
        /// Q8_0 terms per 8-bit vector: 1 (plain Q8_0) or 2 (value and residual).
        #[arg(long, default_value_t = 1)]
        terms: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayerInput {
    Real,
    Zero,
    Large,
}

pub fn run(cmd: HdlCmd) -> Result<()> {
    match cmd {
        HdlCmd::Vectors { model, tensor, synthetic, token, as_stored, seed, out } => {
            if as_stored {
                stored_vectors(&model.context("--as-stored needs --model")?, &tensor.context("--as-stored needs --tensor")?, token, seed, &out)
            } else {
                vectors(model, tensor, synthetic, token, seed, &out)
            }
        }
        HdlCmd::Layer { model, layer, position, terms, input, text, out } => layer_vectors(&model_path(&model)?, layer, position, terms, input, &text, &out),
        HdlCmd::Generate { model, prompt, max_tokens, terms } => generate(&model_path(&model)?, &prompt, max_tokens, terms),
    }
}

fn vectors(model: Option<PathBuf>, tensor: Option<String>, synthetic: Option<String>, token: Option<usize>, seed: u64, out: &Path) -> Result<()> {
    let g = model.as_ref().map(|p| flint::gguf::Gguf::open(p)).transpose()?;
    let w = match (&g, tensor, synthetic) {
        (Some(g), Some(t), None) => hdl::Matrix::from_gguf(g, &t)?,
        (None, None, Some(shape)) => {
            let parse = || -> Option<(usize, usize)> {
                let (r, c) = shape.split_once('x')?;
                Some((r.parse().ok()?, c.parse().ok()?))
            };
            let (rows, cols) = parse().filter(|&(r, c)| r > 0 && c > 0 && c % hdl::QK == 0).context("--synthetic ROWSxCOLS: COLS a multiple of 32")?;
            hdl::Matrix::random(rows, cols / hdl::QK, seed)?
        }
        _ => bail!("give --model PATH --tensor NAME, or --synthetic ROWSxCOLS"),
    };
    let x = match (&g, token) {
        (Some(g), Some(t)) => hdl::embedding_activation(g, t)?,
        _ => hdl::quantize_q8(&hdl::uniform(w.nb * hdl::QK, seed ^ 0x5eed))?,
    };
    if x.len() != w.nb {
        bail!("the activation has {} blocks; the matrix rows have {}", x.len(), w.nb);
    }
    let y = hdl::write_vectors(out, &w, &x, seed)?;
    println!("{} rows x {} blocks ({} values per row) -> {} (first outputs: {:?})", w.rows, w.nb, w.nb * hdl::QK, out.display(), &y[..y.len().min(4)]);
    Ok(())
}

/// A GEMV's vectors with the tensor's weights as stored: the mesh's Q8_0 or Q4_1 words and
/// the layer contract's GEMV (`gemv_w`) as the expected outputs.
fn stored_vectors(model: &Path, tensor: &str, token: Option<usize>, seed: u64, out: &Path) -> Result<()> {
    let g = flint::gguf::Gguf::open(model)?;
    let t = g.tensor(tensor).with_context(|| format!("tensor {tensor} is not in {}", model.display()))?;
    let w = WMatrix::from_tensor(&g, t)?;
    let (ty, words) = w.mesh_words()?;
    let x = match token {
        Some(tok) => hdl::embedding_activation(&g, tok)?,
        None => hdl::quantize_q8(&hdl::uniform(w.nb * hdl::QK, seed ^ 0x5eed))?,
    };
    if x.len() != w.nb {
        bail!("the activation has {} blocks; the matrix rows have {}", x.len(), w.nb);
    }
    let y = flint::hdl::layer::gemv_w(&w, &x)?;
    hdl::write_gemv(out, (w.rows, w.nb, ty), words.into_iter(), &x, &y, seed)?;
    println!("{} rows x {} {} blocks -> {} (first outputs: {:?})", w.rows, w.nb, w.ty, out.display(), &y[..y.len().min(4)]);
    Ok(())
}

/// The most positions `flint hdl layer` fills (each runs the whole model up to the layer).
const MAX_POSITION: usize = 1 << 16;

fn layer_vectors(model: &Path, layer: usize, position: usize, terms: usize, input: LayerInput, text: &str, out: &Path) -> Result<()> {
    let l = Loaded::open(model)?;
    let golden = Golden::load(&l.gguf, terms)?;
    let c = &golden.cfg;
    if layer >= c.n_layer {
        bail!("--layer {layer}: the model has {} layers (0 to {})", c.n_layer, c.n_layer - 1);
    }
    if position >= c.n_ctx.min(MAX_POSITION) {
        bail!("--position {position}: at most {} here (the model's context is {})", c.n_ctx.min(MAX_POSITION) - 1, c.n_ctx);
    }
    let tokens = l.tokenizer.encode(text, false)?;
    if tokens.is_empty() {
        bail!("--text has no tokens");
    }
    let (trace, cache) = golden.trace_at_input(layer, &tokens, position, |x| match input {
        LayerInput::Real => x,
        LayerInput::Zero => vec![0.0; x.len()],
        LayerInput::Large => {
            // 2^k * x with max |x| in [2^30, 2^31): the norm's squares near its 2^32 limit.
            let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let k = if max > 0.0 { 30 - max.log2().floor() as i32 } else { 0 };
            x.iter().map(|v| v * 2f32.powi(k)).collect()
        }
    })?;
    write_layer(out, &golden, layer, position, &cache, &trace)?;
    println!(
        "layer {layer}, position {position} ({} cached), {terms} term(s) -> {} (first outputs: {:?})",
        position,
        out.display(),
        &trace.x_out[..4.min(trace.x_out.len())]
    );
    Ok(())
}

/// One word per line, as `$readmemh` reads it (docs/hdl.md, "Layer vectors").
fn write_layer(dir: &Path, golden: &Golden, layer: usize, position: usize, cache: &GoldenCache, t: &LayerTrace) -> Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let hex = |name: &str, words: &mut dyn Iterator<Item = u32>| -> Result<()> {
        let path = dir.join(name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?);
        for w in words {
            writeln!(f, "{w:08x}")?;
        }
        Ok(f.flush()?)
    };
    let f32s = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let blocks = |v: &[Block]| v.iter().flat_map(|b| b.words()).collect::<Vec<_>>();
    let terms = |v: &[Vec<Block>]| v.iter().flat_map(|t| blocks(t)).collect::<Vec<_>>();
    let c = &golden.cfg;
    let meta = [c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.n_ff, golden.inv_freq.len(), layer, position, golden.terms];
    let mut meta: Vec<u32> = meta.iter().map(|&v| v as u32).collect();
    meta.push(c.eps.to_bits());
    meta.push(hdl::numerics::score_scale(c.head_dim).to_bits());
    hex("meta.hex", &mut meta.into_iter())?;
    let l = &golden.layers[layer];
    hex("attn_norm.hex", &mut f32s(&l.attn_norm).into_iter())?;
    hex("ffn_norm.hex", &mut f32s(&l.ffn_norm).into_iter())?;
    let cs = hdl::numerics::rope_table(&golden.inv_freq, position);
    hex("rope.hex", &mut cs.iter().flat_map(|&(c, s)| [c.to_bits(), s.to_bits()]))?;
    for (name, v) in [("x_in", &t.x_in), ("q", &t.q), ("k", &t.k), ("v", &t.v), ("attn", &t.attn), ("o", &t.o), ("x_mid", &t.x_mid), ("gate", &t.gate), ("up", &t.up), ("down", &t.down), ("x_out", &t.x_out)] {
        hex(&format!("{name}.hex"), &mut f32s(v).into_iter())?;
    }
    let attn_q8 = flint::hdl::layer::quantize_terms(&t.attn, golden.terms)?;
    for (name, v) in [("attn_q8", &attn_q8), ("attn_in", &t.attn_in), ("q_rope", &t.q_rope), ("k_rope", &t.k_rope), ("v_q8", &t.v_q8), ("ffn_in", &t.ffn_in), ("h", &t.h)] {
        hex(&format!("{name}.hex"), &mut terms(v).into_iter())?;
    }
    hex("k_cache.hex", &mut blocks(&cache.k[layer]).into_iter())?;
    hex("v_cache.hex", &mut blocks(&cache.v[layer]).into_iter())?;
    // The layer's seven weight matrices as the mesh stores them, one after the other, and
    // (rows, blocks a row, type: 0 Q8_0, 1 Q4_1) for each, for the whole-layer bench.
    let mut wmeta = Vec::new();
    let mut words = Vec::new();
    for w in [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down] {
        let (ty, mw) = w.mesh_words()?;
        wmeta.extend([w.rows as u32, w.nb as u32, ty]);
        words.extend(mw);
    }
    hex("layer_wmeta.hex", &mut wmeta.into_iter())?;
    hex("layer_w.hex", &mut words.into_iter())?;
    Ok(())
}

fn generate(model: &Path, prompt: &str, n: usize, terms: usize) -> Result<()> {
    let l = Loaded::open(model)?;
    let golden = Golden::load(&l.gguf, terms)?;
    let p = l.tokenizer.chat_tokens(&[Message::new("user", prompt)])?;
    if p.len() + n > golden.cfg.n_ctx {
        bail!("{} prompt tokens and {n} more exceed the model's context of {}", p.len(), golden.cfg.n_ctx);
    }
    let t0 = std::time::Instant::now();
    let (tokens, logits) = golden.greedy(&p, n)?;
    let secs = t0.elapsed().as_secs_f64();
    let mut e = l.engine(BackendKind::CpuRef, p.len() + n)?;
    let want = e.generate(Request::new(p.clone(), n, SamplerConfig::greedy()), None)?.finish()?.tokens;
    let r = l.runner(BackendKind::CpuRef, p.len())?.forward(&p, 0, false)?;
    let nmse = logits.iter().zip(&r).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / r.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
    let max = logits.iter().zip(&r).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let agree = tokens.iter().zip(&want).take_while(|(a, b)| a == b).count();
    println!("golden ({terms} term(s)): {:?}", l.tokenizer.decode(&tokens, false));
    println!("cpu-ref:          {:?}", l.tokenizer.decode(&want, false));
    println!(
        "the first {agree} of {} tokens agree; logits after the prompt: NMSE {nmse:.2e}, max |diff| {max:.4}; {:.1} s for {} positions under the contract",
        tokens.len(),
        secs,
        p.len() + tokens.len().saturating_sub(1)
    );
    Ok(())
}
