//! The model forward: backends against an independent straight-line reference, KV-cache
//! consistency, chunked prefill, and the limits.

mod common;

use common::{assert_close, tiny_model};
use flint::backend::cpu::Cpu;
use flint::gguf::Gguf;
use flint::model::{Forward, Model, Runner, MAX_BATCH};
use flint::quant::{dequantize, GgmlType};
use flint::{BackendKind, Loaded};
use std::sync::Arc;

const TYPES: [GgmlType; 6] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];

/// A Llama forward written out plainly (f64 accumulation), sharing no code with the model
/// or the backends. Returns the logits after each token of `tokens`.
fn reference_forward(g: &Gguf, tokens: &[u32]) -> Vec<Vec<f32>> {
    let u = |k: &str| g.get(&format!("llama.{k}")).unwrap().as_u64().unwrap() as usize;
    let (n_layer, d, nh, nkv) = (u("block_count"), u("embedding_length"), u("attention.head_count"), u("attention.head_count_kv"));
    let hd = d / nh;
    let base = g.get("llama.rope.freq_base").unwrap().as_f32().unwrap() as f64;
    let eps = g.get("llama.attention.layer_norm_rms_epsilon").unwrap().as_f32().unwrap() as f64;
    let w = |name: &str| -> (Vec<f64>, usize) {
        let t = g.tensor(name).unwrap();
        let mut x = vec![0f32; t.n_elements() as usize];
        dequantize(t.ty, g.tensor_data(t), &mut x).unwrap();
        (x.into_iter().map(|v| v as f64).collect(), t.dims[0] as usize)
    };
    let mv = |(m, k): &(Vec<f64>, usize), x: &[f64]| -> Vec<f64> { m.chunks(*k).map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum()).collect() };
    let norm = |x: &[f64], g: &(Vec<f64>, usize)| -> Vec<f64> {
        let r = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
        x.iter().zip(&g.0).map(|(v, g)| v / r * g).collect()
    };
    let rope = |x: &mut [f64], pos: usize| {
        for head in x.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let a = pos as f64 * base.powf(-2.0 * i as f64 / hd as f64);
                let (s, c) = a.sin_cos();
                let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = x0 * c - x1 * s;
                head[2 * i + 1] = x0 * s + x1 * c;
            }
        }
    };
    let emb = w("token_embd.weight");
    let mut kc: Vec<Vec<Vec<f64>>> = vec![vec![]; n_layer];
    let mut vc: Vec<Vec<Vec<f64>>> = vec![vec![]; n_layer];
    let mut out = Vec::new();
    for (pos, &t) in tokens.iter().enumerate() {
        let mut x: Vec<f64> = emb.0[t as usize * d..(t as usize + 1) * d].to_vec();
        for l in 0..n_layer {
            let lw = |s: &str| w(&format!("blk.{l}.{s}.weight"));
            let h = norm(&x, &lw("attn_norm"));
            let mut q = mv(&lw("attn_q"), &h);
            let mut k = mv(&lw("attn_k"), &h);
            rope(&mut q, pos);
            rope(&mut k, pos);
            kc[l].push(k);
            vc[l].push(mv(&lw("attn_v"), &h));
            let mut att = vec![0f64; d];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let qh = &q[head * hd..(head + 1) * hd];
                let sc: Vec<f64> = kc[l].iter().map(|k| k[kvh * hd..(kvh + 1) * hd].iter().zip(qh).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()).collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let p: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = p.iter().sum();
                for (j, v) in vc[l].iter().enumerate() {
                    for i in 0..hd {
                        att[head * hd + i] += p[j] / z * v[kvh * hd + i];
                    }
                }
            }
            let o = mv(&lw("attn_output"), &att);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = norm(&x, &lw("ffn_norm"));
            let (gt, up) = (mv(&lw("ffn_gate"), &h), mv(&lw("ffn_up"), &h));
            let act: Vec<f64> = gt.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let o = mv(&lw("ffn_down"), &act);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        let h = norm(&x, &w("output_norm.weight"));
        out.push(mv(&emb, &h).into_iter().map(|v| v as f32).collect());
    }
    out
}

/// Normalised mean squared error, mse(a, b) / mse(b, 0), as llama.cpp's test-backend-ops.
fn nmse(a: &[f32], b: &[f32]) -> f64 {
    let e: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    e / n
}

const PROMPT: [u32; 7] = [1, 80, 300, 5, 319, 42, 200];

#[test]
fn exact_backend_matches_independent_reference_for_every_type() {
    for ty in TYPES {
        let l = Loaded::open(&tiny_model(ty, 512)).unwrap();
        let want = reference_forward(&l.gguf, &PROMPT);
        let mut f = l.runner(BackendKind::CpuRef, 16).unwrap();
        let all = f.forward(&PROMPT, 0, true).unwrap();
        let v = l.config.n_vocab;
        for (t, w) in want.iter().enumerate() {
            // Both compute with the same dequantized weights; the only difference is f32
            // against f64 accumulation over rows of 64-96 values: ~1e-6 relative per op.
            assert_close(&format!("{ty} logits at {t}"), &all[t * v..(t + 1) * v], w, 2e-4, 2e-4);
        }
    }
}

#[test]
fn fast_backend_is_close_to_exact_for_every_type() {
    for ty in TYPES {
        let l = Loaded::open(&tiny_model(ty, 512)).unwrap();
        let exact = l.runner(BackendKind::CpuRef, 16).unwrap().forward(&PROMPT, 0, true).unwrap();
        let fast = l.runner(BackendKind::Cpu, 16).unwrap().forward(&PROMPT, 0, true).unwrap();
        // The fast path rounds activations to 8 bits per 32-value block before each
        // quantized matmul (relative error ~0.4% per value, 14 matmuls deep); float
        // weights take the f32 path, and only the f16 KV cache (2^-11 relative per value)
        // separates them from the reference.
        let bound = if ty.block_size() > 1 { 1e-3 } else { 1e-6 };
        let e = nmse(&fast, &exact);
        eprintln!("{ty}: fast vs exact NMSE {e:.2e}");
        assert!(e < bound, "{ty}: NMSE {e:e} >= {bound:e}");
    }
}

#[test]
fn simd_and_scalar_fast_paths_agree() {
    use flint::backend::cpu::CpuMode;
    use flint::backend::dot::Isa;
    if Isa::available().len() == 1 {
        eprintln!("SKIPPED simd_and_scalar_fast_paths_agree: no AVX2 on this machine");
        return;
    }
    for ty in TYPES {
        let l = Loaded::open(&tiny_model(ty, 512)).unwrap();
        let simd = l.runner(BackendKind::Cpu, 16).unwrap().forward(&PROMPT, 0, true).unwrap();
        let m = Arc::new(Model::load(Cpu::with_isa(CpuMode::Fast, Isa::scalar()), &l.gguf).unwrap());
        let scalar = Runner::new(m, 16).unwrap().forward(&PROMPT, 0, true).unwrap();
        // Every SIMD level gives the same bits as the best one.
        for isa in &Isa::available()[1..] {
            let m = Arc::new(Model::load(Cpu::with_isa(CpuMode::Fast, *isa), &l.gguf).unwrap());
            let other = Runner::new(m, 16).unwrap().forward(&PROMPT, 0, true).unwrap();
            assert!(other == simd, "{ty}: {} differs from the detected level", isa.name());
        }
        let e = nmse(&simd, &scalar);
        eprintln!("{ty}: simd vs scalar NMSE {e:.2e}");
        // Same integer block sums; the f32 accumulation order differs, which usually stays at
        // rounding level (~1e-13), but can move an activation across a rounding boundary of
        // the 8-bit activation quantizer (one step: 1/127 of its block's largest value),
        // which later layers carry on. The kernels themselves are compared in tests/quant.rs.
        assert!(e < 1e-4, "{ty}: NMSE {e:e}");
    }
}

/// Prefill in one batch, token by token, or in uneven pieces: the same KV cache and logits.
#[test]
fn batched_and_incremental_forward_agree() {
    let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
    for kind in [BackendKind::CpuRef, BackendKind::Cpu] {
        let batch = l.runner(kind, 4).unwrap().forward(&PROMPT, 0, false).unwrap();
        let mut f = l.runner(kind, 1).unwrap(); // grows on demand
        let mut last = Vec::new();
        for (i, &t) in PROMPT.iter().enumerate() {
            last = f.forward(&[t], i, false).unwrap();
        }
        let mut g = l.runner(kind, 8).unwrap();
        g.forward(&PROMPT[..3], 0, false).unwrap();
        let split = g.forward(&PROMPT[3..], 3, false).unwrap();
        // Activation rounding in the fast path depends on the batch only through row
        // order, which it does not change: agreement is to f32 rounding.
        assert_close(&format!("{kind:?} one by one"), &last, &batch, 1e-4, 1e-4);
        assert_close(&format!("{kind:?} split"), &split, &batch, 1e-4, 1e-4);
    }
}

/// Rewinding: overwriting positions (a rejected draft) gives what a fresh run gives.
#[test]
fn rewriting_positions_matches_a_fresh_run() {
    let l = Loaded::open(&tiny_model(GgmlType::Q8_0, 512)).unwrap();
    let mut f = l.runner(BackendKind::Cpu, 16).unwrap();
    f.forward(&PROMPT, 0, false).unwrap();
    let rewound = f.forward(&[9, 10], 4, false).unwrap();
    let fresh = l.runner(BackendKind::Cpu, 16).unwrap().forward(&[PROMPT[0], PROMPT[1], PROMPT[2], PROMPT[3], 9, 10], 0, false).unwrap();
    assert_close("rewound", &rewound, &fresh, 1e-4, 1e-4);
}

#[test]
fn prompts_longer_than_a_batch_run_in_chunks() {
    let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 2048)).unwrap();
    let n = MAX_BATCH + 77;
    let toks: Vec<u32> = (0..n as u32).map(|i| 3 + (i * 31) % 317).collect();
    let whole = l.runner(BackendKind::Cpu, 16).unwrap().forward(&toks, 0, false).unwrap();
    let mut f = l.runner(BackendKind::Cpu, 16).unwrap();
    f.forward(&toks[..100], 0, false).unwrap();
    let parts = f.forward(&toks[100..], 100, false).unwrap();
    assert_eq!(whole.len(), l.config.n_vocab);
    assert_close("chunked", &whole, &parts, 1e-4, 1e-4);
    let all = l.runner(BackendKind::Cpu, 16).unwrap().forward(&toks, 0, true).unwrap();
    assert_eq!(all.len(), n * l.config.n_vocab);
    assert_close("last row of all", &all[(n - 1) * l.config.n_vocab..], &whole, 1e-4, 1e-4);
}

#[test]
fn context_limits_are_clear_errors() {
    let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
    let mut f = l.runner(BackendKind::Cpu, 16).unwrap();
    let e = f.forward(&[1, 2, 3], 510, false).unwrap_err().to_string();
    assert!(e.contains("context full") && e.contains("512"), "{e}");
    assert!(f.forward(&[], 0, false).is_err());
    let e = f.forward(&[100_000], 0, false).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    // The session still works after the errors.
    assert_eq!(f.forward(&[1, 2], 0, false).unwrap().len(), 320);
}

#[test]
fn config_comes_from_metadata() {
    let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
    let c = &l.config;
    assert_eq!((c.n_layer, c.n_embd, c.n_ff, c.n_head, c.n_kv_head, c.head_dim, c.n_ctx), (2, 64, 96, 4, 2, 16, 512));
    assert!(c.tied_embeddings);
    // An untied model loads its own output matrix.
    let p = common::temp_dir("untied").join("u.gguf");
    let mut s = flint::synth::Spec::preset("tiny").unwrap();
    s.untied = true;
    s.write(&p).unwrap();
    let u = Loaded::open(&p).unwrap();
    assert!(!u.config.tied_embeddings);
    let want = reference_forward(&u.gguf, &PROMPT[..2]);
    let got = u.runner(BackendKind::CpuRef, 4).unwrap().forward(&PROMPT[..2], 0, false).unwrap();
    // The test reference always multiplies by the embeddings; an untied model must differ.
    assert!(nmse(&got, &want[1]) > 1e-2, "output.weight was ignored");
}

/// Past several 256-key chunks (split-KV attention on the fast path): fast against exact, and
/// a token's logits bit-identical whether computed alone or in a batch.
#[test]
fn long_context_attention_matches_and_is_batch_invariant() {
    let l = Loaded::open(&tiny_model(GgmlType::Q8_0, 2048)).unwrap();
    let toks: Vec<u32> = (0..700u32).map(|i| 3 + (i * 37) % 317).collect();
    let exact = l.runner(BackendKind::CpuRef, 800).unwrap().forward(&toks, 0, true).unwrap();
    let fast = l.runner(BackendKind::Cpu, 800).unwrap().forward(&toks, 0, true).unwrap();
    let v = l.config.n_vocab;
    for t in [0, 255, 256, 511, 699] {
        let e = nmse(&fast[t * v..(t + 1) * v], &exact[t * v..(t + 1) * v]);
        // As in fast_backend_is_close_to_exact: 8-bit activation rounding.
        assert!(e < 1e-3, "position {t}: NMSE {e:e}");
    }
    let mut f = l.runner(BackendKind::Cpu, 800).unwrap();
    f.forward(&toks[..690], 0, false).unwrap();
    let batch = f.forward(&toks[690..], 690, true).unwrap();
    for (i, &t) in toks[690..].iter().enumerate() {
        let one = f.forward(&[t], 690 + i, false).unwrap();
        assert!(one == batch[i * v..(i + 1) * v], "position {}: batch and single differ", 690 + i);
    }
}

/// Decode steps of several sessions batched into one pass give each session the logits a
/// pass of its own gives, bit for bit (the server batches its sessions' steps this way), on
/// both CPU backends, with sessions at different depths and the leader not the longest.
#[test]
fn multi_session_decode_equals_separate_passes() {
    for kind in [BackendKind::Cpu, BackendKind::CpuRef] {
        let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
        let base = l.runner(kind, 0).unwrap();
        let prompts: [Vec<u32>; 5] = [vec![5], (1..40).collect(), (3..9).collect(), (7..300).map(|t| t % 300).collect(), vec![9, 8, 7]];
        // 2 and 3 sessions take the matmul's 2- and 3-row kernels, 5 its 4-row one and one row.
        for count in [2, 3, 5] {
            let prompts = &prompts[..count];
            let mut solo: Vec<Box<dyn Forward>> = prompts.iter().map(|_| base.fork(0).unwrap()).collect();
            let mut many: Vec<Box<dyn Forward>> = prompts.iter().map(|_| base.fork(0).unwrap()).collect();
            for ((p, a), b) in prompts.iter().zip(&mut solo).zip(&mut many) {
                a.forward(p, 0, false).unwrap();
                b.forward(p, 0, false).unwrap();
            }
            let v = l.config.n_vocab;
            for step in 0..3u32 {
                let tokens: Vec<u32> = (0..prompts.len() as u32).map(|i| 11 + 13 * i + step).collect();
                let pos: Vec<usize> = prompts.iter().map(|p| p.len() + step as usize).collect();
                let want: Vec<Vec<f32>> = solo.iter_mut().zip(&tokens).zip(&pos).map(|((f, &t), &p)| f.forward(&[t], p, false).unwrap()).collect();
                let (lead, rest) = many.split_first_mut().unwrap();
                let mut rest: Vec<&mut dyn Forward> = rest.iter_mut().map(|f| f.as_mut() as &mut dyn Forward).collect();
                let got = lead.forward_multi(&mut rest, &tokens, &pos).unwrap();
                for (i, w) in want.iter().enumerate() {
                    assert!(got[i * v..(i + 1) * v] == w[..], "{kind:?}: session {i} of {count} differs at step {step}");
                }
            }
        }
        // Sessions of another model are refused, not mixed.
        let mut lead = base.fork(0).unwrap();
        let mut other = Loaded::open(&tiny_model(GgmlType::Q8_0, 512)).unwrap().runner(kind, 0).unwrap();
        let err = lead.forward_multi(&mut [other.as_mut()], &[1, 2], &[400, 0]).unwrap_err();
        assert!(err.to_string().contains("same model"), "{err}");
    }
}
