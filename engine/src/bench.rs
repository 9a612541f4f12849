//! `flint bench`: prefill and decode throughput, as llama-bench measures them.
//!
//! - `pp N`: one forward pass over N prompt tokens from an empty cache.
//! - `tg N @ dD`: D tokens prefilled (untimed), then N single-token decode steps.
//! Each test runs `reps` times after one warm-up; the median is reported with min and max.
//! Decode bandwidth counts every weight byte once per token (tied embeddings are read
//! whole for the logits).

use crate::model::Forward;
use anyhow::Result;
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub test: String,
    pub n_tokens: usize,
    pub depth: usize,
    pub tok_s_median: f64,
    pub tok_s_min: f64,
    pub tok_s_max: f64,
    /// Weight bytes read per second while decoding (decode tests only).
    pub weight_gb_s: Option<f64>,
}

pub struct BenchSpec {
    pub prompt: Vec<usize>,
    pub gen: usize,
    pub depths: Vec<usize>,
    pub reps: usize,
}

/// Deterministic token ids spread over the vocabulary (not the special tokens at the start).
fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| (300 + (i * 7919 + salt * 104_729) % (vocab.max(301) - 300)) as u32).collect()
}

fn summarize(test: String, n: usize, depth: usize, mut rates: Vec<f64>, weight_bytes: Option<u64>) -> BenchResult {
    rates.sort_by(f64::total_cmp);
    let med = rates[rates.len() / 2];
    BenchResult {
        test,
        n_tokens: n,
        depth,
        tok_s_median: med,
        tok_s_min: rates[0],
        tok_s_max: *rates.last().expect("reps >= 1"),
        weight_gb_s: weight_bytes.map(|b| b as f64 * med / 1e9),
    }
}

pub fn run(fwd: &mut dyn Forward, spec: &BenchSpec, weight_bytes: u64, mut report: impl FnMut(&BenchResult)) -> Result<Vec<BenchResult>> {
    let vocab = fwd.config().n_vocab;
    let reps = spec.reps.max(1);
    let mut out = Vec::new();
    for &p in &spec.prompt {
        let toks = tokens(p, vocab, 1);
        let mut rates = Vec::new();
        for r in 0..=reps {
            let t = Instant::now();
            fwd.forward(&toks, 0, false)?;
            if r > 0 {
                rates.push(p as f64 / t.elapsed().as_secs_f64());
            }
        }
        let res = summarize(format!("pp{p}"), p, 0, rates, None);
        report(&res);
        out.push(res);
    }
    for &d in &spec.depths {
        let n = spec.gen;
        fwd.reserve(d + n + 1)?;
        if d > 0 {
            fwd.forward(&tokens(d, vocab, 2), 0, false)?;
        }
        let mut rates = Vec::new();
        for r in 0..=reps {
            let toks = tokens(n, vocab, 3 + r);
            let t = Instant::now();
            for (i, &tok) in toks.iter().enumerate() {
                fwd.forward(&[tok], d + i, false)?;
            }
            if r > 0 {
                rates.push(n as f64 / t.elapsed().as_secs_f64());
            }
        }
        let name = if d == 0 { format!("tg{n}") } else { format!("tg{n} @ d{d}") };
        let res = summarize(name, n, d, rates, Some(weight_bytes));
        report(&res);
        out.push(res);
    }
    Ok(out)
}
