//! Sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.
//!
//! Order, as in llama.cpp's default chain: repetition penalty, then (unless greedy)
//! top-k, top-p, min-p on the temperature-scaled distribution, then one draw.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplerConfig {
    /// 0 (or below): greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// 1: off.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { temperature: 0.0, top_k: 40, top_p: 0.95, min_p: 0.05, repeat_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig { temperature: 0.0, ..Default::default() }
    }
    pub fn validate(&self) -> anyhow::Result<()> {
        let bad = |what: &str| Err(anyhow::anyhow!("invalid sampling parameter: {what}"));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature must be a number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad("repeat_penalty must be > 0");
        }
        Ok(())
    }
}

pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: ChaCha8Rng,
    cand: Vec<(u32, f32)>,
}

/// Index of the largest value (the first one on ties, NaN skipped); `None` for an empty
/// slice, or one of NaN alone.
pub fn argmax(x: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32)
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        Sampler { cfg, rng, cand: Vec::new() }
    }

    /// Pick the next token from `logits` (modified in place by the penalty); `history`
    /// is the context so far, for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.distribution(logits, history);
        self.draw()
    }

    /// The distribution `sample` draws from, after every transform: (token, probability)
    /// pairs, most likely first, summing to 1. Greedy is a single token with probability 1.
    /// Speculative decoding reads it to accept or reject drafted tokens.
    pub fn distribution(&mut self, logits: &mut [f32], history: &[u32]) -> &[(u32, f32)] {
        let c = &self.cfg;
        if c.repeat_penalty != 1.0 {
            let recent = &history[history.len().saturating_sub(c.repeat_last_n)..];
            let mut seen = std::collections::HashSet::new();
            for &t in recent {
                if let Some(l) = logits.get_mut(t as usize) {
                    if seen.insert(t) {
                        *l = if *l > 0.0 { *l / c.repeat_penalty } else { *l * c.repeat_penalty };
                    }
                }
            }
        }
        let cand = &mut self.cand;
        cand.clear();
        if c.temperature <= 0.0 {
            cand.push((argmax(logits).unwrap_or(0), 1.0));
            return cand;
        }
        cand.extend(logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (i as u32, l)));
        if cand.is_empty() {
            cand.push((0, 1.0));
            return cand;
        }
        // Larger first, the smaller id among equals (-0 equals 0, as on a GPU); NaN is gone.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.partial_cmp(&a.1).expect("no NaN").then(a.0.cmp(&b.0));
        if c.top_k > 0 && c.top_k < cand.len() {
            cand.select_nth_unstable_by(c.top_k - 1, by_logit);
            cand.truncate(c.top_k);
        }
        cand.sort_unstable_by(by_logit);
        Self::shape(c, cand)
    }

    /// How many of each row's largest logits [`Sampler::distribution_top`] needs: 1 for
    /// greedy, `top_k` with top-k on (up to 256). None: it needs every logit (a repetition
    /// penalty reorders them; sampling without top-k sees the whole vocabulary).
    pub fn candidates(&self) -> Option<usize> {
        let c = &self.cfg;
        if c.repeat_penalty != 1.0 {
            return None;
        }
        if c.temperature <= 0.0 {
            return Some(1);
        }
        (1..=256).contains(&c.top_k).then_some(c.top_k)
    }

    /// [`Sampler::distribution`] from a row's largest logits alone, largest first, the smaller
    /// token first among equals (as [`crate::backend::top_k_host`] and the GPU backends give
    /// them), at least [`Sampler::candidates`] of them: the same distribution, bit for bit.
    pub fn distribution_top(&mut self, top: &[(u32, f32)]) -> &[(u32, f32)] {
        let c = &self.cfg;
        self.cand.clear();
        let Some(&first) = top.first() else {
            self.cand.push((0, 1.0));
            return &self.cand;
        };
        if c.temperature <= 0.0 {
            self.cand.push((first.0, 1.0));
            return &self.cand;
        }
        self.cand.extend(top.iter().take(c.top_k.max(1)).copied());
        Self::shape(c, &mut self.cand)
    }

    /// Temperature softmax, top-p and min-p over the candidates, sorted largest first.
    fn shape<'a>(c: &SamplerConfig, cand: &'a mut Vec<(u32, f32)>) -> &'a [(u32, f32)] {
        // Softmax of logits / temperature, largest first.
        let max = cand[0].1;
        let mut sum = 0f32;
        for x in cand.iter_mut() {
            x.1 = ((x.1 - max) / c.temperature).exp();
            sum += x.1;
        }
        cand.iter_mut().for_each(|x| x.1 /= sum);
        if c.top_p < 1.0 {
            let mut acc = 0f32;
            let keep = cand.iter().position(|x| {
                acc += x.1;
                acc >= c.top_p
            });
            cand.truncate(keep.map_or(cand.len(), |k| k + 1));
        }
        if c.min_p > 0.0 {
            let floor = cand[0].1 * c.min_p;
            let keep = cand.iter().take_while(|x| x.1 >= floor).count().max(1);
            cand.truncate(keep);
        }
        let total: f32 = cand.iter().map(|x| x.1).sum();
        cand.iter_mut().for_each(|x| x.1 /= total);
        cand
    }

    /// Draw from the last computed distribution.
    pub fn draw(&mut self) -> u32 {
        let cand = &self.cand;
        if cand.len() == 1 {
            return cand[0].0;
        }
        let mut r = self.rng.random::<f32>();
        for x in cand.iter() {
            r -= x.1;
            if r <= 0.0 {
                return x.0;
            }
        }
        cand.last().expect("non-empty").0
    }

    /// A uniform number in [0, 1) from the sampler's own stream (acceptance tests).
    pub fn uniform(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    /// Draw from `dist` (token, weight) pairs; weights need not sum to 1.
    pub fn draw_from(&mut self, dist: &[(u32, f32)]) -> u32 {
        let total: f32 = dist.iter().map(|x| x.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for x in dist {
            r -= x.1;
            if r <= 0.0 && x.1 > 0.0 {
                return x.0;
            }
        }
        dist.iter().rev().find(|x| x.1 > 0.0).or(dist.last()).map_or(0, |x| x.0)
    }
}
