//! Sampler properties.

use flint::sampler::{argmax, Sampler, SamplerConfig};

fn cfg(t: f32) -> SamplerConfig {
    SamplerConfig { temperature: t, top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0, repeat_last_n: 64, seed: 1 }
}

fn logits() -> Vec<f32> {
    vec![1.0, 3.0, 0.5, 2.0, -1.0, 2.9]
}

#[test]
fn greedy_is_argmax() {
    let mut s = Sampler::new(SamplerConfig::greedy());
    assert_eq!(s.sample(&mut logits(), &[]), 1);
    assert_eq!(argmax(&[0.0, 5.0, 5.0]), Some(1), "first of equal maxima");
    assert_eq!(argmax(&[]), None);
}

#[test]
fn same_seed_same_tokens_other_seed_others() {
    let run = |seed| {
        let mut s = Sampler::new(SamplerConfig { seed, ..cfg(1.5) });
        (0..200).map(|_| s.sample(&mut logits(), &[])).collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn filters_that_leave_one_token_are_greedy() {
    for c in [
        SamplerConfig { top_k: 1, ..cfg(1.0) },
        SamplerConfig { top_p: 1e-6, ..cfg(1.0) },
        SamplerConfig { min_p: 1.0, ..cfg(1.0) },
    ] {
        let mut s = Sampler::new(c.clone());
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits(), &[]), 1, "{c:?}");
        }
    }
}

#[test]
fn top_k_and_top_p_never_pick_outside_their_set() {
    let mut s = Sampler::new(SamplerConfig { top_k: 3, ..cfg(5.0) });
    for _ in 0..500 {
        assert!([1, 5, 3].contains(&s.sample(&mut logits(), &[])));
    }
    // Probabilities at T=1: token 1 and 5 carry ~0.71 together; top_p 0.7 keeps exactly them.
    let mut s = Sampler::new(SamplerConfig { top_p: 0.7, ..cfg(1.0) });
    for _ in 0..500 {
        assert!([1, 5].contains(&s.sample(&mut logits(), &[])));
    }
}

/// Chi-square goodness of fit of 20,000 draws against softmax(logits / T).
#[test]
fn temperature_sampling_follows_the_softmax() {
    let l = logits();
    for t in [0.7f32, 1.0, 2.0] {
        let z: f64 = l.iter().map(|x| ((x / t) as f64).exp()).sum();
        let p: Vec<f64> = l.iter().map(|x| ((x / t) as f64).exp() / z).collect();
        let mut s = Sampler::new(SamplerConfig { seed: 99, ..cfg(t) });
        let n = 20_000;
        let mut counts = vec![0f64; l.len()];
        for _ in 0..n {
            counts[s.sample(&mut l.clone(), &[]) as usize] += 1.0;
        }
        let chi2: f64 = counts.iter().zip(&p).map(|(c, p)| (c - n as f64 * p).powi(2) / (n as f64 * p)).sum();
        // 5 degrees of freedom: P(chi2 > 20.5) = 0.001.
        assert!(chi2 < 20.5, "T={t}: chi2 {chi2:.1}, counts {counts:?}, p {p:?}");
    }
}

#[test]
fn repetition_penalty_discourages_recent_tokens() {
    let mut s = Sampler::new(SamplerConfig { repeat_penalty: 2.0, ..SamplerConfig::greedy() });
    // Token 1 (3.0) was just used: 3.0 / 2 = 1.5 < 2.9, so token 5 wins.
    assert_eq!(s.sample(&mut logits(), &[1]), 5);
    // Negative logits are multiplied (made less likely), not divided.
    let mut l = vec![-1.0f32, -1.5];
    let mut s = Sampler::new(SamplerConfig { repeat_penalty: 2.0, ..SamplerConfig::greedy() });
    assert_eq!(s.sample(&mut l, &[0]), 1);
}

#[test]
fn invalid_parameters_are_rejected() {
    for c in [
        SamplerConfig { temperature: -1.0, ..cfg(1.0) },
        SamplerConfig { temperature: f32::NAN, ..cfg(1.0) },
        SamplerConfig { top_p: 0.0, ..cfg(1.0) },
        SamplerConfig { top_p: 1.5, ..cfg(1.0) },
        SamplerConfig { min_p: -0.1, ..cfg(1.0) },
        SamplerConfig { repeat_penalty: 0.0, ..cfg(1.0) },
    ] {
        assert!(c.validate().is_err(), "{c:?}");
    }
    assert!(cfg(0.8).validate().is_ok());
}

#[test]
fn nan_logits_do_not_break_sampling() {
    let mut s = Sampler::new(cfg(1.0));
    let t = s.sample(&mut [f32::NAN, 1.0, f32::NAN], &[]);
    assert_eq!(t, 1);
}

/// Sampling from each row's largest logits alone (what a GPU backend reads back) gives the
/// same distribution, bit for bit, and the same draws as sampling from every logit, with
/// ties (rounded logits) and NaN in the row.
#[test]
fn top_candidates_give_the_same_distribution_as_all_logits() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let configs = [
        SamplerConfig::greedy(),
        SamplerConfig { temperature: 0.8, ..Default::default() },
        SamplerConfig { temperature: 1.3, top_k: 5, top_p: 0.7, min_p: 0.0, ..Default::default() },
        SamplerConfig { temperature: 0.5, top_k: 256, top_p: 1.0, min_p: 0.2, ..Default::default() },
    ];
    for c in configs {
        let k = Sampler::new(c.clone()).candidates().expect("top-k or greedy needs few candidates");
        let (mut dense, mut top) = (Sampler::new(c.clone()), Sampler::new(c.clone()));
        for round in 0..50 {
            let mut row: Vec<f32> = (0..5000).map(|_| (rng.random::<f32>() * 20.0).round() / 2.0).collect();
            row[round * 7] = f32::NAN;
            let cand = flint::backend::top_k_host(&row, k);
            let a = dense.distribution(&mut row.clone(), &[]).to_vec();
            let b = top.distribution_top(&cand).to_vec();
            assert_eq!(a, b, "{c:?}");
            assert_eq!(dense.draw(), top.draw());
        }
    }
    // Needs every logit: a repetition penalty, or sampling without top-k.
    assert_eq!(Sampler::new(SamplerConfig { repeat_penalty: 1.1, ..SamplerConfig::greedy() }).candidates(), None);
    assert_eq!(Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, ..Default::default() }).candidates(), None);
}
