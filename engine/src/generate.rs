//! The decode loop. [`Engine::generate`] returns an iterator that runs one model step per
//! item and yields the text it produced, so callers stream as tokens arrive and cancel
//! between any two steps (stop iterating, or set the cancel flag from another thread).
//! The KV cache is kept across requests: a prompt that extends the previous context only
//! prefills the new tokens.

use crate::model::Forward;
use crate::sampler::{Sampler, SamplerConfig};
use crate::speculative::{DraftModel, Drafter, SpecConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use anyhow::{bail, Result};
use std::borrow::BorrowMut;
use std::collections::VecDeque;
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
    /// Speculative decoding: where drafts come from. The output is the same as without.
    pub speculative: Option<SpecConfig>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplerConfig) -> Self {
        Request { prompt, max_tokens, sampling, stop: Vec::new(), special: false, speculative: None }
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
    /// Speculative decoding: tokens proposed, and how many of them the model accepted.
    pub drafted: usize,
    pub accepted: usize,
}

impl Timings {
    pub fn rejected(&self) -> usize {
        self.drafted - self.accepted
    }
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
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
    draft: Option<DraftModel>,
}

impl Engine {
    pub fn new(fwd: Box<dyn Forward>, tokenizer: Arc<Tokenizer>) -> Self {
        Engine { fwd, tokenizer, cached: Vec::new(), draft: None }
    }

    /// A draft model for [`crate::speculative::DraftSource::Model`]; it must share the vocabulary.
    pub fn set_draft_model(&mut self, fwd: Box<dyn Forward>) -> Result<()> {
        let (a, b) = (fwd.config().n_vocab, self.fwd.config().n_vocab);
        if a != b {
            bail!("the draft model's vocabulary ({a}) differs from the model's ({b})");
        }
        self.draft = Some(DraftModel::new(fwd));
        Ok(())
    }

    /// Forget the cached context (the next request prefills everything).
    pub fn reset(&mut self) {
        self.cached.clear();
    }

    /// A second engine on the same weights (and draft model) with its own, empty KV cache.
    pub fn fork(&self) -> Result<Engine> {
        let draft = match &self.draft {
            Some(d) => Some(DraftModel::new(d.fwd.fork(0)?)),
            None => None,
        };
        Ok(Engine { fwd: self.fwd.fork(0)?, tokenizer: self.tokenizer.clone(), cached: Vec::new(), draft })
    }

    /// The tokens whose KV this engine holds.
    pub fn cached(&self) -> &[u32] {
        &self.cached
    }

    /// Start a generation. Errors at once for an empty prompt or one longer than the context.
    pub fn generate(&mut self, req: Request, cancel: Option<Arc<AtomicBool>>) -> Result<Generation<&mut Engine>> {
        self.prepare(&req)?;
        Ok(Generation::new(self, req, cancel))
    }

    /// Check a request and size the KV cache for it; [`Generation::new`] may follow.
    pub fn prepare(&mut self, req: &Request) -> Result<()> {
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
        if let Some(sc) = &req.speculative {
            if matches!(sc.source, crate::speculative::DraftSource::Model) && self.draft.is_none() {
                bail!("speculative decoding with a draft model needs one (--draft PATH)");
            }
        }
        // Size the KV cache to the request.
        self.fwd.reserve((req.prompt.len() + req.max_tokens).min(n_ctx))
    }
}

/// The logits of a model step's rows: every value, or each row's largest (see
/// [`Sampler::candidates`]).
enum Rows {
    Dense(Vec<f32>),
    Top(Vec<Vec<(u32, f32)>>),
}

/// A generation in progress. `E` is `&mut Engine` when the caller keeps the engine, or an
/// owned `Engine` when generations outlive a borrow (the server's scheduler interleaves
/// many); [`Generation::into_engine`] gives it back.
pub struct Generation<E: BorrowMut<Engine>> {
    engine: E,
    tokenizer: Arc<Tokenizer>,
    n_ctx: usize,
    n_vocab: usize,
    req: Request,
    sampler: Sampler,
    drafter: Option<Drafter>,
    /// Tokens decided by the last model step, not yet emitted.
    queue: VecDeque<u32>,
    cancel: Option<Arc<AtomicBool>>,
    context: Vec<u32>, // prompt + generated
    generated: Vec<u32>,
    decoder: StreamDecoder,
    text: String,   // all generated text so far
    emitted: usize, // bytes of `text` already handed out
    finish: Option<FinishReason>,
    flushed: bool,
    start: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    timings: Timings,
    /// Part of the prompt ran in [`Generation::prefill_chunk`].
    prefilled: bool,
}

impl<E: BorrowMut<Engine>> Generation<E> {
    /// Start a generation on a request that [`Engine::prepare`] accepted.
    pub fn new(mut engine: E, req: Request, cancel: Option<Arc<AtomicBool>>) -> Self {
        let e: &mut Engine = engine.borrow_mut();
        let (tokenizer, n_ctx, n_vocab) = (e.tokenizer.clone(), e.fwd.config().n_ctx, e.fwd.config().n_vocab);
        Generation {
            tokenizer,
            n_ctx,
            n_vocab,
            drafter: req.speculative.clone().map(|c| Drafter::new(c, &req.sampling)),
            queue: VecDeque::new(),
            sampler: Sampler::new(req.sampling.clone()),
            context: req.prompt.clone(),
            req,
            engine,
            cancel,
            decoder: StreamDecoder::default(),
            text: String::new(),
            emitted: 0,
            generated: Vec::new(),
            finish: None,
            flushed: false,
            start: Instant::now(),
            first_token_at: None,
            last_token_at: None,
            timings: Timings::default(),
            prefilled: false,
        }
    }

    pub fn into_engine(self) -> E {
        self.engine
    }

    /// The prompt followed by the tokens generated so far.
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some() && self.flushed
    }

    /// Prefill at most `max` uncached prompt tokens, keeping the last one for the first
    /// decode step. Returns whether prompt tokens remain beyond it. A scheduler calls this
    /// until it returns false so a long prompt does not hold the model for one long pass.
    pub fn prefill_chunk(&mut self, max: usize) -> Result<bool> {
        if self.timings.forward_passes > 0 || self.finish.is_some() {
            return Ok(false);
        }
        let e: &mut Engine = self.engine.borrow_mut();
        let common = e.cached.iter().zip(&self.context).take_while(|(a, b)| a == b).count();
        let todo = (self.context.len() - 1).saturating_sub(common);
        if todo == 0 {
            return Ok(false);
        }
        let n = todo.min(max.max(1));
        let t0 = Instant::now();
        e.cached.truncate(common);
        if self.timings.prompt_ms == 0.0 && self.timings.cached_tokens == 0 {
            self.timings.cached_tokens = common;
        }
        let run = &self.context[common..common + n];
        if let Err(err) = e.fwd.forward(run, common, false) {
            e.cached.clear();
            return Err(err);
        }
        e.cached.extend_from_slice(run);
        self.timings.prompt_ms += t0.elapsed().as_secs_f64() * 1e3;
        self.prefilled = true;
        Ok(n < todo)
    }
    /// End the generation here, as cancelled (unless it already ended): the next
    /// [`Iterator::next`] only flushes the held-back text, with no model work.
    pub fn stop(&mut self) {
        if self.finish.is_none() {
            self.finish = Some(FinishReason::Cancelled);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// The engine this generation runs on.
    pub fn engine_mut(&mut self) -> &mut Engine {
        self.engine.borrow_mut()
    }

    /// Where the next step is a plain decode step (one token whose predecessors are all in
    /// the KV cache, no speculation), the token and its position, so a scheduler can run it
    /// batched with other generations' steps ([`crate::model::Forward::forward_multi`]) and
    /// hand the logits to [`Generation::next_with_logits`]. None: call `next` instead.
    pub fn batch_token(&self) -> Option<(u32, usize)> {
        if self.finish.is_some() || self.drafter.is_some() || !self.queue.is_empty() || self.cancelled() {
            return None;
        }
        let n = self.context.len();
        if self.generated.len() >= self.req.max_tokens || n >= self.n_ctx {
            return None;
        }
        let cached = &self.engine.borrow().cached;
        // Once this generation has run the model (no drafts), the cache is exactly the context
        // but its last token whenever the lengths say so: compare the tokens only before that.
        let in_sync = cached.len() == n - 1 && (self.timings.forward_passes > 0 || cached[..] == self.context[..n - 1]);
        in_sync.then(|| (self.context[n - 1], n - 1))
    }

    /// How many of a batched step's largest logits this generation's sampler needs (see
    /// [`crate::sampler::Sampler::candidates`]); None: all of them.
    pub fn batch_candidates(&self) -> Option<usize> {
        self.sampler.candidates()
    }

    /// The step [`Generation::batch_token`] announced, with the logits its token produced.
    pub fn next_with_logits(&mut self, logits: Vec<f32>) -> Option<Result<Step>> {
        self.next_with_rows(Rows::Dense(logits))
    }

    /// As [`Generation::next_with_logits`], with the row's largest logits only (at least
    /// [`Generation::batch_candidates`] of them, largest first).
    pub fn next_with_top(&mut self, top: Vec<(u32, f32)>) -> Option<Result<Step>> {
        self.next_with_rows(Rows::Top(vec![top]))
    }

    fn next_with_rows(&mut self, rows: Rows) -> Option<Result<Step>> {
        let last = *self.context.last().expect("the context is never empty");
        self.engine.borrow_mut().cached.push(last);
        if self.timings.forward_passes == 0 && !self.prefilled {
            self.timings.cached_tokens = self.context.len() - 1;
        }
        self.timings.forward_passes += 1;
        if let Err(e) = self.decide(Default::default(), rows) {
            self.finish = Some(FinishReason::Cancelled);
            self.flushed = true;
            return Some(Err(e));
        }
        self.next()
    }

    /// A batched pass failed: the KV cache may be half-written.
    pub fn fail_batched(&mut self) {
        self.engine.borrow_mut().cached.clear();
    }

    /// Run the model over whatever the KV cache lacks, plus `draft`. Returns the logits of
    /// the last context token followed by one row per draft token: only each row's largest
    /// where the sampler needs no more ([`Sampler::candidates`]), which spares a GPU backend
    /// reading back the whole vocabulary.
    fn run_model(&mut self, draft: &[u32]) -> Result<Rows> {
        let e: &mut Engine = self.engine.borrow_mut();
        let common = e.cached.iter().zip(&self.context).take_while(|(a, b)| a == b).count();
        // At least one token must run to produce logits.
        let reuse = common.min(self.context.len() - 1);
        if self.timings.forward_passes == 0 && !self.prefilled {
            self.timings.cached_tokens = reuse;
        }
        let mut run = self.context[reuse..].to_vec();
        run.extend_from_slice(draft);
        let t0 = Instant::now();
        let all = !draft.is_empty();
        let logits = match self.sampler.candidates() {
            Some(k) => e.fwd.forward_top(&run, reuse, all, k).map(Rows::Top),
            None => e.fwd.forward(&run, reuse, all).map(Rows::Dense),
        };
        e.cached.truncate(reuse);
        let mut logits = match logits {
            Ok(l) => l,
            Err(err) => {
                e.cached.clear(); // the cache may be half-written
                return Err(err);
            }
        };
        // Rejected draft tokens stay here; the common-prefix check above drops them.
        e.cached.extend_from_slice(&run);
        if self.timings.forward_passes == 0 {
            self.timings.prompt_ms += t0.elapsed().as_secs_f64() * 1e3;
        }
        self.timings.forward_passes += 1;
        if !draft.is_empty() {
            // Keep the rows from the last context token on.
            let skip = self.context.len() - 1 - reuse;
            match &mut logits {
                Rows::Dense(l) => drop(l.drain(..skip * e.fwd.config().n_vocab)),
                Rows::Top(t) => drop(t.drain(..skip)),
            }
        }
        Ok(logits)
    }

    /// One model step: decide the next token, or with a draft, verify it and decide up to
    /// `k + 1` tokens. Accepting draft token `d` (drawn with probability q(d), or certain) with
    /// probability min(1, p(d) / q(d)) and resampling a rejection from max(p - q, 0) leaves
    /// the output distribution that of plain sampling; greedy accepts exactly the tokens
    /// plain greedy decoding would produce.
    fn advance(&mut self) -> Result<()> {
        let room = self.req.max_tokens.saturating_sub(self.generated.len() + 1).min(
            self.n_ctx.saturating_sub(self.context.len() + 1),
        );
        // The first token is never drafted after: it would wait for the whole draft's
        // verification (a 17-token step costs ~17 decode steps' time on a CPU), and an editor
        // that prefilled the code waits for the first token alone.
        let draft = match &mut self.drafter {
            Some(d) if room > 0 && !self.generated.is_empty() => d.draft(&self.context, self.generated.len(), room, self.engine.borrow_mut().draft.as_mut())?,
            _ => Default::default(),
        };
        let logits = self.run_model(&draft.tokens)?;
        self.decide(draft, logits)
    }

    /// Sample (or verify `draft` and sample) from the logits of a model step.
    fn decide(&mut self, draft: crate::speculative::Draft, mut logits: Rows) -> Result<()> {
        let v = self.n_vocab;
        let n_rows = match &logits {
            Rows::Dense(l) => l.len() / v,
            Rows::Top(t) => t.len(),
        };
        // Row i's history (for the repetition penalty) is the context plus draft[..i]; only
        // a repetition penalty needs it built.
        let mut history = if self.sampler.cfg.repeat_penalty != 1.0 && !draft.tokens.is_empty() {
            self.context.clone()
        } else {
            Vec::new()
        };
        let mut accepted = 0;
        for i in 0..n_rows {
            let hist = if history.is_empty() { &self.context[..] } else { &history[..] };
            let dist = match &mut logits {
                Rows::Dense(l) => self.sampler.distribution(&mut l[i * v..(i + 1) * v], hist).to_vec(),
                Rows::Top(t) => self.sampler.distribution_top(&t[i]).to_vec(),
            };
            let Some(&d) = draft.tokens.get(i) else {
                let t = self.sampler.draw();
                self.queue.push_back(t);
                break;
            };
            let p = dist.iter().find(|x| x.0 == d).map_or(0.0, |x| x.1);
            let q_of = |t: u32| match &draft.probs {
                None => (t == d) as u32 as f32,
                Some(qs) => qs[i].iter().find(|x| x.0 == t).map_or(0.0, |x| x.1),
            };
            let q = q_of(d);
            let accept = q > 0.0 && (p >= q || (p > 0.0 && self.sampler.uniform() < p / q));
            if accept {
                accepted += 1;
                self.queue.push_back(d);
                if !history.is_empty() {
                    history.push(d);
                }
                if self.tokenizer.is_eog(d) {
                    break;
                }
                continue;
            }
            let residual: Vec<(u32, f32)> = dist.iter().map(|&(t, pt)| (t, (pt - q_of(t)).max(0.0))).collect();
            let t = if residual.iter().any(|x| x.1 > 0.0) { self.sampler.draw_from(&residual) } else { self.sampler.draw_from(&dist) };
            self.queue.push_back(t);
            break;
        }
        self.timings.drafted += draft.tokens.len();
        self.timings.accepted += accepted;
        if let Some(d) = &mut self.drafter {
            d.length.feedback(draft.tokens.len(), accepted);
        }
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
        let n_ctx = self.n_ctx;
        if self.generated.len() >= self.req.max_tokens || self.context.len() >= n_ctx {
            self.finish = Some(FinishReason::Length);
            return self.next_step();
        }
        if self.queue.is_empty() {
            self.advance()?;
        }
        let tok = self.queue.pop_front().expect("advance decides at least one token");
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
            self.timings.ttft_ms = self.start.elapsed().as_secs_f64() * 1e3;
        }
        if self.tokenizer.is_eog(tok) {
            self.finish = Some(FinishReason::Stop);
            return self.next_step();
        }
        self.context.push(tok);
        self.generated.push(tok);
        self.last_token_at = Some(Instant::now());
        let piece = self.decoder.push(self.tokenizer.token_bytes(tok, self.req.special));
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

impl<E: BorrowMut<Engine>> Iterator for Generation<E> {
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
