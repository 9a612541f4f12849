//! Speculative decoding is lossless: greedy output identical to plain decoding, sampled
//! output distributed as plain sampling (chi-square), and the draft sources behave.

mod common;

use common::tiny_model;
use flint::generate::{Engine, Outcome, Request};
use flint::quant::GgmlType;
use flint::sampler::{Sampler, SamplerConfig};
use flint::speculative::{lookup, DraftLength, PredictionCursor, SpecConfig};
use flint::{BackendKind, Loaded};

fn run(e: &mut Engine, prompt: &[u32], n: usize, sampling: SamplerConfig, spec: Option<SpecConfig>) -> Outcome {
    let mut r = Request::new(prompt.to_vec(), n, sampling);
    r.speculative = spec;
    e.generate(r, None).unwrap().finish().unwrap()
}

/// A second, different tiny model: same vocabulary, other weights.
fn other_tiny() -> Loaded {
    let p = common::temp_dir("draft").join("tiny-seed8.gguf");
    if !p.exists() {
        let mut s = flint::synth::Spec::preset("tiny").unwrap();
        s.seed = 8;
        s.write(&p).unwrap();
    }
    Loaded::open(&p).unwrap()
}

#[test]
fn greedy_output_is_identical_in_every_mode() {
    let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
    // A repetitive prompt, so that prompt lookup finds drafts.
    let prompt = l.tokenizer.encode("abc abd abc abd abc abd abc", false).unwrap();
    let mut e = l.engine(BackendKind::Cpu, 256).unwrap();
    let plain = run(&mut e, &prompt, 60, SamplerConfig::greedy(), None);
    let mut bad_prediction = plain.tokens.clone();
    bad_prediction[5] = 7;
    bad_prediction.remove(20);
    let cases = [
        ("ngram", SpecConfig::ngram()),
        ("exact prediction", SpecConfig::prediction(plain.tokens.clone())),
        ("wrong prediction", SpecConfig::prediction(bad_prediction)),
        ("unrelated prediction", SpecConfig::prediction(vec![9, 10, 11, 12])),
        ("other draft model", SpecConfig::model()),
    ];
    e.set_draft_model(other_tiny().runner(BackendKind::Cpu, 256).unwrap()).unwrap();
    for (name, spec) in cases {
        e.reset();
        let o = run(&mut e, &prompt, 60, SamplerConfig::greedy(), Some(spec));
        assert_eq!(o.tokens, plain.tokens, "{name}");
        assert_eq!(o.text, plain.text, "{name}");
        assert!(o.timings.accepted <= o.timings.drafted);
        eprintln!("{name}: {} forward passes for 60 tokens, {}/{} accepted", o.timings.forward_passes, o.timings.accepted, o.timings.drafted);
        if name == "exact prediction" {
            assert_eq!(o.timings.accepted, o.timings.drafted);
            assert!(o.timings.forward_passes <= 8, "{} passes", o.timings.forward_passes);
        }
    }
}

#[test]
fn a_draft_equal_to_the_target_is_always_accepted() {
    let l = Loaded::open(&tiny_model(GgmlType::Q8_0, 512)).unwrap();
    let prompt = l.tokenizer.encode("hello world", false).unwrap();
    for sampling in [SamplerConfig::greedy(), SamplerConfig { temperature: 0.9, seed: 3, ..Default::default() }] {
        let mut e = l.engine(BackendKind::Cpu, 128).unwrap();
        e.set_draft_model(l.runner(BackendKind::Cpu, 128).unwrap()).unwrap();
        let o = run(&mut e, &prompt, 40, sampling.clone(), Some(SpecConfig::model()));
        assert!(o.timings.drafted >= 30, "drafted {}", o.timings.drafted);
        assert_eq!(o.timings.accepted, o.timings.drafted, "temperature {}", sampling.temperature);
    }
}

/// The same logits whatever batch a token is computed in (verification relies on it).
#[test]
fn logits_do_not_depend_on_the_batch() {
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::F16] {
        let l = Loaded::open(&tiny_model(ty, 512)).unwrap();
        let toks = [5u32, 80, 81, 300, 7, 9, 200, 42, 17];
        let all = l.runner(BackendKind::Cpu, 16).unwrap().forward(&toks, 0, true).unwrap();
        let mut f = l.runner(BackendKind::Cpu, 16).unwrap();
        let v = l.config.n_vocab;
        for (i, &t) in toks.iter().enumerate() {
            let one = f.forward(&[t], i, false).unwrap();
            assert!(one == all[i * v..(i + 1) * v], "{ty}: row {i} differs between batch and single");
        }
    }
}

/// Exact next-token distributions of the tiny model under `cfg`, with the end-of-generation
/// tokens pooled into category 0 (a run stops there): the first token's, and the second's
/// given that the first did not end the run.
fn exact_distributions(l: &Loaded, prompt: &[u32], cfg: &SamplerConfig) -> (Vec<f64>, Vec<f64>) {
    let v = l.config.n_vocab;
    let cat = |t: u32| if l.tokenizer.is_eog(t) { 0 } else { t as usize };
    let mut f = l.runner(BackendKind::Cpu, 64).unwrap();
    let mut s = Sampler::new(cfg.clone());
    let dist = |s: &mut Sampler, logits: &mut Vec<f32>, hist: &[u32]| {
        let mut p = vec![0f64; v];
        for &(t, q) in s.distribution(logits, hist) {
            p[cat(t)] += q as f64;
        }
        p
    };
    let mut logits = f.forward(prompt, 0, false).unwrap();
    let p1 = dist(&mut s, &mut logits, prompt);
    let mut p2 = vec![0f64; v];
    let go_on: f64 = 1.0 - p1[0];
    for x in 1..v {
        if p1[x] > 0.0 {
            let mut lx = f.forward(&[x as u32], prompt.len(), false).unwrap();
            let mut hist = prompt.to_vec();
            hist.push(x as u32);
            for (y, q) in dist(&mut s, &mut lx, &hist).iter().enumerate() {
                p2[y] += p1[x] / go_on * q;
            }
        }
    }
    (p1, p2)
}

/// Pearson chi-square of `counts` against `p`, pooling categories expected fewer than 5
/// times; returns (statistic, critical value at significance 0.001).
fn chi_square(counts: &[f64], p: &[f64]) -> (f64, f64) {
    let n: f64 = counts.iter().sum();
    let (mut chi, mut bins, mut pool_c, mut pool_e) = (0.0, 0usize, 0.0, 0.0);
    for (c, p) in counts.iter().zip(p) {
        let e = n * p;
        if e >= 5.0 {
            chi += (c - e).powi(2) / e;
            bins += 1;
        } else {
            pool_c += c;
            pool_e += e;
        }
    }
    if pool_e > 0.0 {
        chi += (pool_c - pool_e).powi(2) / pool_e.max(1e-9);
        bins += 1;
    }
    let df = (bins - 1) as f64;
    // Wilson-Hilferty approximation of the chi-square quantile, z(0.999) = 3.09.
    let crit = df * (1.0 - 2.0 / (9.0 * df) + 3.09 * (2.0 / (9.0 * df)).sqrt()).powi(3);
    (chi, crit)
}

/// Speculative sampling leaves the output distribution that of plain sampling: first- and
/// second-token frequencies over 3,000 seeds against the exact distributions, the second token
/// decided by a draft
/// from a different model (q != p) and from a fixed prediction (certain drafts).
#[test]
fn speculative_sampling_preserves_the_distribution() {
    let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
    let prompt = l.tokenizer.encode("the cat", false).unwrap();
    // Temperature 1.5 spreads probability over many tokens, so rejections happen often.
    let base = SamplerConfig { temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() };
    let (p1, p2) = exact_distributions(&l, &prompt, &base);
    let likely = p1.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
    let v = l.config.n_vocab;
    let n = 3000;
    for (name, spec) in [("draft model", SpecConfig::model()), ("prediction", SpecConfig::prediction(vec![likely, likely]))] {
        let mut e = l.engine(BackendKind::Cpu, 64).unwrap();
        let draft = other_tiny();
        e.set_draft_model(draft.runner(BackendKind::Cpu, 64).unwrap()).unwrap();
        let (mut c1, mut c2) = (vec![0f64; v], vec![0f64; v]);
        let mut drafted = 0;
        for seed in 0..n {
            // Three tokens: the first is never drafted after, so the second is the one a
            // draft (of one token) decides.
            let o = run(&mut e, &prompt, 3, SamplerConfig { seed, ..base.clone() }, Some(spec.clone()));
            // An end-of-generation token ends the run and is not in `tokens`: category 0.
            let t = |i: usize| o.tokens.get(i).map_or(0, |&t| t as usize);
            c1[t(0)] += 1.0;
            if !o.tokens.is_empty() {
                c2[t(1)] += 1.0;
            }
            drafted += o.timings.drafted;
        }
        // The prediction drafts only after a first token that matches it (`likely`).
        let want = if name == "prediction" { (n as f64 * p1[likely as usize] * 0.5) as usize } else { n as usize / 2 };
        assert!(drafted >= want, "{name}: drafts were made ({drafted}, at least {want})");
        let (x1, k1) = chi_square(&c1, &p1);
        let (x2, k2) = chi_square(&c2, &p2);
        eprintln!("{name}: first token chi2 {x1:.1} (critical {k1:.1}), second {x2:.1} (critical {k2:.1})");
        assert!(x1 < k1, "{name}: first-token frequencies are not the target's distribution");
        assert!(x2 < k2, "{name}: second-token frequencies are not the target's distribution");
        if name == "draft model" {
            // Power check: the same test rejects the draft model's own distribution.
            let (q1, _) = exact_distributions(&draft, &prompt, &base);
            let (xq, kq) = chi_square(&c1, &q1);
            assert!(xq > kq, "the test cannot tell the draft's distribution from the target's");
        }
    }
}

#[test]
fn lookup_finds_the_longest_most_recent_ngram() {
    //           0  1  2  3  4  5  6  7  8  9
    let ctx = [1, 2, 3, 9, 1, 2, 4, 5, 1, 2];
    // Suffix [1, 2]: most recent earlier occurrence at 4..6, continuation starts at 6.
    assert_eq!(lookup(&ctx, &ctx, 1, 3, ctx.len()), Some(6));
    let ctx2 = [7, 1, 2, 3, 8, 1, 2, 9, 7, 1, 2];
    // [7, 1, 2] occurs at 0..3: the 3-gram wins over the more recent 2-gram at 5..7.
    assert_eq!(lookup(&ctx2, &ctx2, 1, 3, ctx2.len()), Some(3));
    assert_eq!(lookup(&[1, 2, 3], &[1, 2, 3], 2, 3, 3), None);
}

#[test]
fn prediction_cursor_follows_and_resynchronises() {
    let pred: Vec<u32> = (100..140).collect();
    let mut c = PredictionCursor::new();
    assert_eq!(c.draft(&pred, &[], 3), [100, 101, 102]);
    assert_eq!(c.draft(&pred, &[100, 101], 3), [102, 103, 104]);
    // The output inserts a token: no draft until two tokens match the prediction again.
    assert_eq!(c.draft(&pred, &[100, 101, 7], 3), Vec::<u32>::new());
    assert_eq!(c.draft(&pred, &[100, 101, 7, 102, 103], 3), [104, 105, 106]);
    // The output skips ahead: re-synchronise further on.
    assert_eq!(c.draft(&pred, &[100, 101, 7, 102, 103, 120, 121], 2), [122, 123]);
    // A single matching token is not enough to re-synchronise on; two are.
    assert_eq!(c.draft(&pred, &[100, 101, 7, 102, 103, 120, 121, 5, 137], 5), Vec::<u32>::new());
    // Near the end the draft is shorter.
    assert_eq!(c.draft(&pred, &[100, 101, 7, 102, 103, 120, 121, 5, 137, 138], 5), [139]);
}

#[test]
fn draft_length_backs_off_and_recovers() {
    let mut d = DraftLength::new(8);
    assert_eq!(d.next(), 8);
    d.feedback(8, 8);
    assert_eq!(d.next(), 8);
    d.feedback(8, 2);
    assert_eq!(d.next(), 3);
    // Misses pause drafting for 1, 2, 4 ... steps.
    d.feedback(3, 0);
    assert_eq!((d.next(), d.next()), (0, 1));
    d.feedback(1, 0);
    assert_eq!((d.next(), d.next(), d.next()), (0, 0, 1));
    d.feedback(1, 1);
    assert_eq!(d.next(), 2);
}

#[test]
fn a_draft_model_is_required_for_draft_mode() {
    let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
    let mut e = l.engine(BackendKind::Cpu, 64).unwrap();
    let mut r = Request::new(vec![5, 6], 4, SamplerConfig::greedy());
    r.speculative = Some(SpecConfig::model());
    let err = e.generate(r, None).err().unwrap().to_string();
    assert!(err.contains("draft model"), "{err}");
}

/// The repetition penalty sees accepted draft tokens as history, exactly as plain decoding
/// sees its own output.
#[test]
fn repetition_penalty_is_applied_the_same_way() {
    let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
    let prompt = l.tokenizer.encode("abc abd abc abd abc abd abc", false).unwrap();
    let pen = SamplerConfig { repeat_penalty: 1.3, repeat_last_n: 16, ..SamplerConfig::greedy() };
    let mut e = l.engine(BackendKind::Cpu, 256).unwrap();
    let plain = run(&mut e, &prompt, 40, pen.clone(), None);
    let unpenalised = run(&mut e, &prompt, 40, SamplerConfig::greedy(), None);
    assert_ne!(plain.tokens, unpenalised.tokens, "the penalty must matter for this test to mean anything");
    for spec in [SpecConfig::ngram(), SpecConfig::prediction(plain.tokens.clone())] {
        e.reset();
        let o = run(&mut e, &prompt, 40, pen.clone(), Some(spec));
        assert_eq!(o.tokens, plain.tokens);
        assert!(o.timings.accepted > 0);
    }
}
