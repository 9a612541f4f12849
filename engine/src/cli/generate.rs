//! `flint generate`: one prompt, streamed to stdout (or one JSON object), with speculative
//! decoding on request; and the streaming and timing report `flint chat` shares.

use super::{model_path, out, ModelArgs, SamplingArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use flint::generate::{Engine, Outcome, Request};
use flint::speculative::{DraftSource, SpecConfig};
use flint::tokenizer::Message;
use flint::{BackendKind, Loaded};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// No chat template and no BOS: the prompt is tokenized as it is.
    #[arg(long)]
    raw: bool,
    /// Recognise special tokens in a raw prompt and print them in the output.
    #[arg(long)]
    special: bool,
    /// System prompt for the chat template.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    spec: SpecArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SpecArgs {
    /// Speculative decoding: ngram (prompt lookup), prediction (--prediction-file), draft (--draft).
    /// The output is the same as without it.
    #[arg(long, value_parser = ["ngram", "prediction", "draft"])]
    speculative: Option<String>,
    /// The expected output (e.g. the file being edited), for --speculative prediction.
    #[arg(long)]
    prediction_file: Option<PathBuf>,
    /// A draft model sharing the vocabulary, for --speculative draft.
    #[arg(long)]
    draft: Option<PathBuf>,
    /// Longest draft (default: 8 for ngram, 16 for prediction, 5 for draft).
    #[arg(long)]
    draft_len: Option<usize>,
    /// Shortest and longest n-gram prompt lookup matches on (default 2 and 4).
    #[arg(long, default_value_t = 2)]
    ngram_min: usize,
    #[arg(long, default_value_t = 4)]
    ngram_max: usize,
}

impl SpecArgs {
    /// The request's speculative configuration; loads the draft model into `engine`.
    fn apply(&self, l: &Loaded, engine: &mut Engine, backend: BackendKind) -> Result<Option<SpecConfig>> {
        let Some(mode) = &self.speculative else {
            if self.prediction_file.is_some() || self.draft.is_some() {
                bail!("--prediction-file and --draft need --speculative prediction or draft");
            }
            return Ok(None);
        };
        let mut c = match mode.as_str() {
            "ngram" => {
                if self.ngram_min == 0 || self.ngram_min > self.ngram_max || self.ngram_max > 64 {
                    bail!("--ngram-min and --ngram-max need 1 <= min <= max <= 64");
                }
                SpecConfig { source: DraftSource::Ngram { min_n: self.ngram_min, max_n: self.ngram_max }, ..SpecConfig::ngram() }
            }
            "prediction" => {
                let f = self.prediction_file.as_ref().context("--speculative prediction needs --prediction-file F")?;
                let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
                SpecConfig::prediction(l.tokenizer.encode(&text, false)?)
            }
            _ => {
                let p = self.draft.as_ref().context("--speculative draft needs --draft PATH")?;
                let d = Loaded::open(p).with_context(|| format!("draft model {}", p.display()))?;
                engine.set_draft_model(d.runner(backend, 256)?)?;
                SpecConfig::model()
            }
        };
        if let Some(k) = self.draft_len {
            if k == 0 || k > 64 {
                bail!("--draft-len must be between 1 and 64");
            }
            c.max_draft = k;
        }
        Ok(Some(c))
    }
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let l = Loaded::open(&model_path(&a.model.model)?)?;
    let tok = &l.tokenizer;
    let prompt = if a.raw {
        tok.encode(&a.prompt, a.special)?
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &a.prompt));
        tok.chat_tokens(&msgs)?
    };
    let cap = (prompt.len() + a.max_tokens).min(l.config.n_ctx);
    let mut engine = l.engine_on(a.model.backend, cap, a.model.adapter.as_deref())?;
    let mut req = Request::new(prompt, a.max_tokens, a.sampling.config());
    req.stop = a.sampling.stop.clone();
    req.special = a.special;
    req.speculative = a.spec.apply(&l, &mut engine, a.model.backend)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let _ = ctrlc::set_handler(move || c.store(true, Ordering::Relaxed));
    let outcome = stream(&mut engine, req, cancel, !a.json)?;
    if a.json {
        let t = &outcome.timings;
        let v = serde_json::json!({
            "prompt_tokens": outcome.prompt_tokens,
            "tokens": outcome.tokens,
            "text": outcome.text,
            "finish_reason": outcome.finish_reason.as_str(),
            "timings": {
                "prompt_ms": t.prompt_ms, "ttft_ms": t.ttft_ms, "decode_tok_s": t.decode_tok_s,
                "forward_passes": t.forward_passes, "drafted": t.drafted, "accepted": t.accepted,
                "rejected": t.rejected(), "acceptance_rate": t.acceptance_rate(),
            },
        });
        out(&format!("{v}\n"));
    } else {
        out("\n");
        report_timings(&outcome);
    }
    Ok(())
}

pub fn stream(engine: &mut Engine, req: Request, cancel: Arc<AtomicBool>, print: bool) -> Result<Outcome> {
    let mut g = engine.generate(req, Some(cancel))?;
    for step in g.by_ref() {
        let step = step?;
        if print {
            out(&step.text);
        }
    }
    Ok(g.outcome())
}

pub fn report_timings(o: &Outcome) {
    let t = &o.timings;
    let spec = if t.drafted > 0 {
        format!("; {} forward passes, {}/{} drafted tokens accepted", t.forward_passes, t.accepted, t.drafted)
    } else {
        String::new()
    };
    eprintln!(
        "[{} prompt tokens ({} cached) in {:.1} ms; {} tokens at {:.1} tok/s; first token after {:.1} ms; {}{spec}]",
        o.prompt_tokens.len(), t.cached_tokens, t.prompt_ms, o.tokens.len(), t.decode_tok_s, t.ttft_ms, o.finish_reason.as_str()
    );
}
