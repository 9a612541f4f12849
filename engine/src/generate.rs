//! The decode loop. [`Engine::generate`] returns an iterator that runs one model step per
//! item and yields the text it produced, so callers stream as tokens arrive and cancel
//! between any two steps (stop iterating, or set the cancel flag from another thread).
//! The KV cache is kept across requests: a prompt that extends the previous context only
//! prefills the new tokens.

use crate::model::Forward;
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Render control tokens (`<|im_end|>`, ...) as text.
    pub special: bool,
}

impl Request {
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplerConfig) -> Self {
        Request { prompt, max_tokens, sampling, stop: Vec::new(), special: false }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End of generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Prefill of the prompt's uncached tokens.
    pub prompt_ms: f64,
    /// From the request to the first sampled token.
    pub ttft_ms: f64,
    /// Tokens after the first, per second of decoding.
    pub decode_tok_s: f64,
    /// Model forward passes (prefill counts as one).
    pub forward_passes: usize,
    /// Prompt tokens whose KV was reused from the previous request.
    pub cached_tokens: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// One step's output: the token sampled (None for the final flush) and the text that is
/// now safe to show (whole UTF-8 characters, nothing that may still become a stop string).
#[derive(Clone, Debug)]
pub struct Step {
    pub token: Option<u32>,
    pub text: String,
}

/// A model session plus its tokenizer, and the tokens whose KV the session holds.
pub struct Engine {
    pub fwd: Box<dyn Forward>,
    pub tokenizer: Arc<Tokenizer>,
    cached: Vec<u32>,
}

impl Engine {
    pub fn new(fwd: Box<dyn Forward>, tokenizer: Arc<Tokenizer>) -> Self {
        Engine { fwd, tokenizer, cached: Vec::new() }
    }

    /// Forget the cached context (the next request prefills everything).
    pub fn reset(&mut self) {
        self.cached.clear();
    }

    /// Start a generation. Errors at once for an empty prompt or one longer than the context.
    pub fn generate(&mut self, req: Request, cancel: Option<Arc<AtomicBool>>) -> Result<Generation<'_>> {
        let n_ctx = self.fwd.config().n_ctx;
        req.sampling.validate()?;
        if req.prompt.is_empty() {
            bail!("the prompt is empty");
        }
        if req.prompt.len() >= n_ctx {
            bail!("the prompt has {} tokens; the model's context is {n_ctx} tokens", req.prompt.len());
        }
        let vocab = self.fwd.config().n_vocab;
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {t} is outside the vocabulary of {vocab}");
        }
        // Size the KV cache to the request.
        self.fwd.reserve((req.prompt.len() + req.max_tokens).min(n_ctx))?;
        Ok(Generation {
            sampler: Sampler::new(req.sampling.clone()),
            context: req.prompt.clone(),
            req,
            engine: self,
            cancel,
            decoder: StreamDecoder::default(),
            text: String::new(),
            emitted: 0,
            generated: Vec::new(),
            logits: None,
            finish: None,
            flushed: false,
            start: Instant::now(),
            first_token_at: None,
            last_token_at: None,
            timings: Timings::default(),
        })
    }
}

pub struct Generation<'a> {
    engine: &'a mut Engine,
    req: Request,
    sampler: Sampler,
    cancel: Option<Arc<AtomicBool>>,
    context: Vec<u32>, // prompt + generated
    generated: Vec<u32>,
    decoder: StreamDecoder,
    text: String,   // all generated text so far
    emitted: usize, // bytes of `text` already handed out
    logits: Option<Vec<f32>>,
    finish: Option<FinishReason>,
    flushed: bool,
    start: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    timings: Timings,
}

impl Generation<'_> {
    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Run the model over whatever the KV cache lacks and keep the logits.
    fn step_model(&mut self) -> Result<()> {
        let e = &mut *self.engine;
        let common = e.cached.iter().zip(&self.context).take_while(|(a, b)| a == b).count();
        // At least one token must run to produce logits.
        let reuse = common.min(self.context.len() - 1);
        if self.timings.forward_passes == 0 {
            self.timings.cached_tokens = reuse;
        }
        e.cached.truncate(reuse);
        let t0 = Instant::now();
        let logits = e.fwd.forward(&self.context[reuse..], reuse, false);
        if logits.is_err() {
            e.cached.clear(); // the cache may be half-written
        }
        let logits = logits?;
        e.cached.extend_from_slice(&self.context[reuse..]);
        if self.timings.forward_passes == 0 {
            self.timings.prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
        }
        self.timings.forward_passes += 1;
        self.logits = Some(logits);
        Ok(())
    }

    /// Text up to which nothing can still turn into a stop string.
    fn safe_end(&self) -> usize {
        let t = &self.text;
        let mut end = t.len();
        for s in &self.req.stop {
            // Longest suffix of `t` that is a proper prefix of `s`.
            for (i, _) in t.char_indices().rev().take(s.chars().count()) {
                if s.starts_with(&t[i..]) && t.len() - i < s.len() {
                    end = end.min(i);
                }
            }
        }
        end.max(self.emitted)
    }

    fn find_stop(&self) -> Option<usize> {
        let longest = self.req.stop.iter().map(|s| s.len()).max()?;
        // Only the new text and a stop string's length before it can hold a new match.
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.req.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min()
    }

    fn take_text(&mut self, end: usize) -> String {
        let s = self.text[self.emitted..end].to_string();
        self.emitted = end;
        s
    }

    fn next_step(&mut self) -> Result<Option<Step>> {
        if self.finish.is_some() {
            if self.flushed {
                return Ok(None);
            }
            self.flushed = true;
            let rest = self.decoder.finish();
            self.text.push_str(&rest);
            if let Some(at) = self.find_stop() {
                self.text.truncate(at.max(self.emitted));
            }
            let text = self.take_text(self.text.len());
            return Ok((!text.is_empty()).then_some(Step { token: None, text }));
        }
        if self.cancelled() {
            self.finish = Some(FinishReason::Cancelled);
            return self.next_step();
        }
        let n_ctx = self.engine.fwd.config().n_ctx;
        if self.generated.len() >= self.req.max_tokens || self.context.len() >= n_ctx {
            self.finish = Some(FinishReason::Length);
            return self.next_step();
        }
        if self.logits.is_none() {
            self.step_model()?;
        }
        let mut logits = self.logits.take().expect("set by step_model");
        let tok = self.sampler.sample(&mut logits, &self.context);
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
            self.timings.ttft_ms = self.start.elapsed().as_secs_f64() * 1e3;
        }
        if self.engine.tokenizer.is_eog(tok) {
            self.finish = Some(FinishReason::Stop);
            return self.next_step();
        }
        self.context.push(tok);
        self.generated.push(tok);
        self.last_token_at = Some(Instant::now());
        let piece = self.decoder.push(self.engine.tokenizer.token_bytes(tok, self.req.special));
        self.text.push_str(&piece);
        if let Some(at) = self.find_stop() {
            self.text.truncate(at);
            let text = self.take_text(at);
            self.finish = Some(FinishReason::Stop);
            self.flushed = true;
            return Ok(Some(Step { token: Some(tok), text }));
        }
        let end = self.safe_end();
        let text = self.take_text(end);
        Ok(Some(Step { token: Some(tok), text }))
    }

    /// Drive the generation to its end, then report (also valid after a partial iteration).
    pub fn finish(mut self) -> Result<Outcome> {
        while self.next_step()?.is_some() {}
        Ok(self.outcome())
    }

    pub fn outcome(&self) -> Outcome {
        let mut timings = self.timings.clone();
        if let (Some(first), Some(last)) = (self.first_token_at, self.last_token_at) {
            let n = self.generated.len().saturating_sub(1);
            let dt = (last - first).as_secs_f64();
            timings.decode_tok_s = if n > 0 && dt > 0.0 { n as f64 / dt } else { 0.0 };
        }
        Outcome {
            prompt_tokens: self.req.prompt.clone(),
            tokens: self.generated.clone(),
            text: self.text.clone(),
            finish_reason: self.finish.unwrap_or(FinishReason::Cancelled),
            timings,
        }
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<Step>;
    fn next(&mut self) -> Option<Result<Step>> {
        match self.next_step() {
            Ok(Some(s)) => Some(Ok(s)),
            Ok(None) => None,
            Err(e) => {
                self.finish = Some(FinishReason::Cancelled);
                self.flushed = true;
                Some(Err(e))
            }
        }
    }
}
