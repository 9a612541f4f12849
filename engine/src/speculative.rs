//! Draft sources for speculative decoding. The target model verifies a draft of k tokens in
//! one batched forward pass (see [`crate::generate`]); these propose the drafts:
//! - [`DraftSource::Ngram`]: prompt lookup: the longest recent n-gram of the context that
//!   occurred before, and what followed it there;
//! - [`DraftSource::Prediction`]: the expected output (e.g. the file being edited), followed
//!   while the output agrees and re-synchronised after a mismatch;
//! - [`DraftSource::Model`]: a smaller model sharing the vocabulary.
//!
//! [`DraftLength`] adapts k to recent acceptance and stops drafting while drafts keep
//! failing, so a workload where nothing matches runs at plain decoding speed.

use crate::model::Forward;
use crate::sampler::{Sampler, SamplerConfig};
use anyhow::Result;

#[derive(Clone, Debug)]
pub enum DraftSource {
    Ngram { min_n: usize, max_n: usize },
    /// Token ids of the expected output.
    Prediction(Vec<u32>),
    /// The engine's draft model ([`crate::generate::Engine::set_draft_model`]).
    Model,
}

#[derive(Clone, Debug)]
pub struct SpecConfig {
    pub source: DraftSource,
    /// Longest draft.
    pub max_draft: usize,
}

impl SpecConfig {
    pub fn ngram() -> Self {
        SpecConfig { source: DraftSource::Ngram { min_n: 2, max_n: 4 }, max_draft: 8 }
    }
    pub fn prediction(tokens: Vec<u32>) -> Self {
        SpecConfig { source: DraftSource::Prediction(tokens), max_draft: 16 }
    }
    pub fn model() -> Self {
        SpecConfig { source: DraftSource::Model, max_draft: 5 }
    }
}

/// A proposal: tokens, and for a sampled draft the distribution each was drawn from
/// (`None`: each token was certain, as lookups and greedy drafts are).
#[derive(Default, Debug)]
pub struct Draft {
    pub tokens: Vec<u32>,
    pub probs: Option<Vec<Vec<(u32, f32)>>>,
}

/// Draft length control: doubles after a fully accepted draft, shrinks to what was accepted
/// plus one after a partial one, and after drafts of which nothing was accepted pauses
/// drafting for 1, 2, 4, … 16 steps.
#[derive(Clone, Debug)]
pub struct DraftLength {
    pub max: usize,
    k: usize,
    misses: u32,
    pause: u32,
}

impl DraftLength {
    pub fn new(max: usize) -> Self {
        DraftLength { max: max.max(1), k: max.max(1), misses: 0, pause: 0 }
    }
    /// How many tokens to draft now (0: decode plainly this step).
    pub fn next(&mut self) -> usize {
        if self.pause > 0 {
            self.pause -= 1;
            return 0;
        }
        self.k
    }
    pub fn feedback(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        if accepted == drafted {
            self.k = (self.k * 2).min(self.max);
            self.misses = 0;
        } else if accepted > 0 {
            self.k = (accepted + 1).min(self.max);
            self.misses = 0;
        } else {
            self.k = 1;
            self.misses += 1;
            self.pause = (1u32 << (self.misses - 1).min(4)).min(16);
        }
    }
}

/// Where in `source` the longest suffix of `key` (between `min_n` and `max_n` tokens) last
/// occurred with at least one token after it; returns the index just after the occurrence.
/// `limit`: occurrences must end before this index (excludes the key itself).
pub fn lookup(source: &[u32], key: &[u32], min_n: usize, max_n: usize, limit: usize) -> Option<usize> {
    let limit = limit.min(source.len());
    for n in (min_n.max(1)..=max_n.min(key.len())).rev() {
        let pat = &key[key.len() - n..];
        // Most recent first: the nearest context is the best predictor.
        let found = (0..limit.saturating_sub(n)).rev().find(|&s| &source[s..s + n] == pat);
        if let Some(s) = found {
            return Some(s + n);
        }
    }
    None
}

/// Following a prediction: `next` is where in the prediction the next output token is
/// expected; `seen` how many output tokens have been checked against it.
#[derive(Clone, Debug, Default)]
pub struct PredictionCursor {
    next: usize,
    seen: usize,
    synced: bool,
}

impl PredictionCursor {
    pub fn new() -> Self {
        PredictionCursor { next: 0, seen: 0, synced: true }
    }

    /// Up to `k` tokens of `pred` expected after `output`.
    pub fn draft(&mut self, pred: &[u32], output: &[u32], k: usize) -> Vec<u32> {
        if output.len() < self.seen {
            // The output was rewound: start over.
            *self = PredictionCursor::new();
        }
        for &t in &output[self.seen..] {
            if self.synced && pred.get(self.next) == Some(&t) {
                self.next += 1;
            } else {
                self.synced = false;
            }
        }
        self.seen = output.len();
        if !self.synced {
            // Re-synchronise on the longest recent run of output (2 to 8 tokens) found in
            // the prediction, preferring the first occurrence at or after the old position.
            for n in (2..=8.min(output.len())).rev() {
                let pat = &output[output.len() - n..];
                let starts: Vec<usize> = (0..pred.len().saturating_sub(n - 1)).filter(|&s| &pred[s..s + n] == pat).collect();
                let pick = starts.iter().find(|&&s| s + n >= self.next).or(starts.last());
                if let Some(&s) = pick {
                    self.next = s + n;
                    self.synced = true;
                    break;
                }
            }
        }
        if !self.synced {
            return Vec::new();
        }
        pred[self.next.min(pred.len())..(self.next + k).min(pred.len())].to_vec()
    }
}

/// A draft model with its own KV cache, which it keeps in step with the context.
pub struct DraftModel {
    pub fwd: Box<dyn Forward>,
    cached: Vec<u32>,
}

impl DraftModel {
    pub fn new(fwd: Box<dyn Forward>) -> Self {
        DraftModel { fwd, cached: Vec::new() }
    }

    /// Draft `k` tokens after `context`, sampling with `sampler` (greedy when it is).
    pub fn draft(&mut self, context: &[u32], k: usize, sampler: &mut Sampler) -> Result<Draft> {
        let common = self.cached.iter().zip(context).take_while(|(a, b)| a == b).count();
        let reuse = common.min(context.len() - 1);
        self.cached.truncate(reuse);
        let n_ctx = self.fwd.config().n_ctx;
        let k = k.min(n_ctx.saturating_sub(context.len()));
        let mut draft = Draft::default();
        if k == 0 {
            return Ok(draft);
        }
        let mut logits = match self.fwd.forward(&context[reuse..], reuse, false) {
            Ok(l) => l,
            Err(e) => {
                self.cached.clear();
                return Err(e);
            }
        };
        self.cached.extend_from_slice(&context[reuse..]);
        let greedy = sampler.cfg.temperature <= 0.0;
        let mut probs = Vec::new();
        let mut history = context.to_vec();
        for i in 0..k {
            let dist = sampler.distribution(&mut logits, &history).to_vec();
            let t = if greedy { dist[0].0 } else { sampler.draw_from(&dist) };
            probs.push(dist);
            draft.tokens.push(t);
            history.push(t);
            if i + 1 < k {
                logits = self.fwd.forward(&[t], history.len() - 1, false)?;
                self.cached.push(t);
            }
        }
        if !greedy {
            draft.probs = Some(probs);
        }
        Ok(draft)
    }
}

/// The per-request drafter the decode loop asks each step.
pub(crate) struct Drafter {
    pub config: SpecConfig,
    pub length: DraftLength,
    cursor: PredictionCursor,
    /// Samples the draft model's proposals (its own random stream).
    sampler: Sampler,
}

impl Drafter {
    pub fn new(config: SpecConfig, sampling: &SamplerConfig) -> Self {
        let draft_sampling = SamplerConfig { seed: sampling.seed ^ 0x5eed_d4af, ..sampling.clone() };
        Drafter { length: DraftLength::new(config.max_draft), config, cursor: PredictionCursor::new(), sampler: Sampler::new(draft_sampling) }
    }

    /// A draft to follow `context`, whose last `n_output` tokens are this request's output.
    pub fn draft(&mut self, context: &[u32], n_output: usize, room: usize, model: Option<&mut DraftModel>) -> Result<Draft> {
        let k = self.length.next().min(room);
        if k == 0 {
            return Ok(Draft::default());
        }
        match &self.config.source {
            DraftSource::Ngram { min_n, max_n } => {
                let Some(at) = lookup(context, context, *min_n, *max_n, context.len()) else { return Ok(Draft::default()) };
                Ok(Draft { tokens: context[at..(at + k).min(context.len())].to_vec(), probs: None })
            }
            DraftSource::Prediction(pred) => {
                let output = &context[context.len() - n_output..];
                Ok(Draft { tokens: self.cursor.draft(pred, output, k), probs: None })
            }
            DraftSource::Model => match model {
                Some(m) => m.draft(context, k, &mut self.sampler),
                None => anyhow::bail!("speculative decoding with a draft model needs one (--draft PATH)"),
            },
        }
    }
}
