//! `flint bench`: prefill and decode throughput, as llama-bench measures them.
//!
//! - `pp N`: one forward pass over N prompt tokens from an empty cache.
//! - `tg N @ dD`: D tokens prefilled (untimed), then N single-token decode steps
//!   (`tg N @ dD*`: the cache left as zeros instead of prefilled, see `skip_prefill`).
//! - `ttft pN`: a fresh N-token prompt to its first token (prefill and the sampled token).
//!
//! Every pass reads back what greedy decoding does: the sampled token, not the logits.
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
    /// KV-cache bytes read per second while decoding (f16 K and V of every cached position,
    /// every layer; decode tests only).
    pub kv_gb_s: Option<f64>,
    /// Time to the first token (ttft test only).
    pub ttft_ms: Option<f64>,
}

pub struct BenchSpec {
    pub prompt: Vec<usize>,
    /// Prompt length of the time-to-first-token test (0: none).
    pub ttft: usize,
    pub gen: usize,
    pub depths: Vec<usize>,
    pub reps: usize,
    /// Decode at depth D over a cache that was never prefilled (zeros): the same reads and
    /// arithmetic, without the prefill's time (for very long contexts).
    pub skip_prefill: bool,
}

/// Deterministic token ids spread over the vocabulary (not the special tokens at the start).
pub fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
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
        kv_gb_s: None,
        ttft_ms: None,
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
            fwd.forward_top(&toks, 0, false, 1)?;
            if r > 0 {
                rates.push(p as f64 / t.elapsed().as_secs_f64());
            }
        }
        let res = summarize(format!("pp{p}"), p, 0, rates, None);
        report(&res);
        out.push(res);
    }
    if spec.ttft > 0 {
        // Reported as tokens/s of the prompt like the rest; `ttft_ms` holds the time.
        let toks = tokens(spec.ttft, vocab, 4);
        let mut rates = Vec::new();
        for r in 0..=reps {
            let t = Instant::now();
            fwd.forward_top(&toks, 0, false, 1)?;
            if r > 0 {
                rates.push(1.0 / t.elapsed().as_secs_f64());
            }
        }
        let mut res = summarize(format!("ttft p{}", spec.ttft), spec.ttft, 0, rates, None);
        res.ttft_ms = Some(1e3 / res.tok_s_median);
        (res.tok_s_median, res.tok_s_min, res.tok_s_max) = (res.tok_s_median * spec.ttft as f64, res.tok_s_min * spec.ttft as f64, res.tok_s_max * spec.ttft as f64);
        report(&res);
        out.push(res);
    }
    for &d in &spec.depths {
        let n = spec.gen;
        fwd.reserve(d + n + 1)?;
        if d > 0 && !spec.skip_prefill {
            fwd.forward(&tokens(d, vocab, 2), 0, false)?;
        }
        let mut rates = Vec::new();
        for r in 0..=reps {
            let toks = tokens(n, vocab, 3 + r);
            let t = Instant::now();
            for (i, &tok) in toks.iter().enumerate() {
                fwd.forward_top(&[tok], d + i, false, 1)?;
            }
            if r > 0 {
                rates.push(n as f64 / t.elapsed().as_secs_f64());
            }
        }
        let name = match d {
            0 => format!("tg{n}"),
            _ if spec.skip_prefill => format!("tg{n} @ d{d}*"),
            _ => format!("tg{n} @ d{d}"),
        };
        let mut res = summarize(name, n, d, rates, Some(weight_bytes));
        // Each step reads the K and V rows of every position before it: on average d + n/2.
        let c = fwd.config();
        let kv_bytes = 2.0 * c.n_layer as f64 * (d as f64 + n as f64 / 2.0) * (c.n_kv_head * c.head_dim) as f64 * 2.0;
        res.kv_gb_s = Some(kv_bytes * res.tok_s_median / 1e9);
        report(&res);
        out.push(res);
    }
    Ok(out)
}

/// Per-kernel times of `n` greedy decode steps at depth `depth` (the backend waits for each
/// kernel, so short kernels count their launch and synchronisation too): (kernel, calls per
/// token, microseconds per call, share of the total). Empty where the backend keeps none.
pub fn profile(fwd: &mut dyn Forward, n: usize, depth: usize) -> Result<Vec<(crate::backend::KernelTime, f64)>> {
    let vocab = fwd.config().n_vocab;
    fwd.reserve(depth + n + 1)?;
    if depth > 0 {
        fwd.forward_top(&tokens(depth, vocab, 2), 0, false, 1)?;
    }
    fwd.profile(true);
    for (i, &t) in tokens(n, vocab, 5).iter().enumerate() {
        fwd.forward_top(&[t], depth + i, false, 1)?;
    }
    let times = fwd.profile(false);
    let total: f64 = times.iter().map(|k| k.ms).sum();
    Ok(times.into_iter().map(|k| { let share = k.ms / total; (k, share) }).collect())
}

/// The host's memory bandwidth as the CPU backend's threads see it (the calling rayon pool),
/// read as decode reads weights (in order, prefetched 2 KB ahead):
/// (read GB/s, copy GB/s counting bytes read plus bytes written), each the best of five
/// passes over 256 MB buffers, far larger than any cache.
pub fn host_bandwidth() -> (f64, f64) {
    use rayon::prelude::*;
    const WORDS: usize = 256 << 17; // 256 MB of u64
    const PART: usize = 1 << 17; // 1 MB per task
    let src: Vec<u64> = (0..WORDS as u64).into_par_iter().map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let mut dst = vec![0u64; WORDS];
    dst.par_chunks_mut(PART).for_each(|c| c.fill(1)); // fault the pages in
    let best = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let bytes = (WORDS * 8) as f64;
    let read = best(&mut || {
        let s: u64 = src.par_chunks(PART).map(sum_streamed).reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
    });
    let copy = best(&mut || dst.par_chunks_mut(PART).zip(src.par_chunks(PART)).for_each(|(d, s)| d.copy_from_slice(s)));
    (bytes / read / 1e9, 2.0 * bytes / copy / 1e9)
}

/// A wrapping sum of `c`, read in order with the lines 2 KB ahead prefetched.
fn sum_streamed(c: &[u64]) -> u64 {
    let mut a = [0u64; 8];
    for (i, x) in c.chunks_exact(8).enumerate() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint; it never faults, whatever the address.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch(c.as_ptr().wrapping_add(i * 8 + 256) as *const i8, _MM_HINT_T0);
        }
        for j in 0..8 {
            a[j] = a[j].wrapping_add(x[j]);
        }
    }
    a.iter().fold(0u64, |s, &v| s.wrapping_add(v))
}
