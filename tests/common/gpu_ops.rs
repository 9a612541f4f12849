//! Op and model tests every GPU backend runs against the CPU reference (`cpu-ref`): awkward
//! shapes, every weight type, tolerances written with their reasons. `tests/wgpu.rs` and
//! `tests/cuda.rs` call them with their backends.
#![allow(dead_code)]

/// One `#[test]` per shared test that takes the backends: `$gpus(name)` gives them, empty
/// where there are none (it says that the test skipped).
#[macro_export]
macro_rules! gpu_op_tests {
    ($gpus:expr; $($name:ident $(, $arg:expr)?);* $(;)?) => {$(
        #[test]
        fn $name() {
            let gs = $gpus(stringify!($name));
            if !gs.is_empty() {
                common::gpu_ops::$name(gs $(, $arg)?);
            }
        }
    )*};
}

use super::{assert_close, real_model, tiny_model};
use flint::backend::cpu::{Cpu, CpuMode};
use flint::backend::{top_k_host, AttnShape, Backend, Rope};
use flint::generate::Request;
use flint::gguf::write::{write_gguf, TensorDecl};
use flint::gguf::Gguf;
use flint::quant::{quantize, GgmlType};
use flint::sampler::SamplerConfig;
use flint::tokenizer::Message;
use flint::{BackendKind, Loaded};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn cpu() -> Cpu {
    Cpu::new(CpuMode::Exact)
}

pub fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// A GGUF image holding tensors (name, rows, k, type) of random values.
pub fn tensors(specs: &[(&str, usize, usize, GgmlType)], seed: u64) -> Gguf {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let decls: Vec<TensorDecl> =
        specs.iter().map(|&(name, rows, k, ty)| TensorDecl { name: name.into(), dims: vec![k as u64, rows as u64], ty }).collect();
    let data: Vec<Vec<f32>> = specs.iter().map(|&(_, rows, k, _)| randn(&mut rng, rows * k, 1.0)).collect();
    let mut img = Vec::new();
    write_gguf(&mut img, &[], &decls, |i, out| quantize(specs[i].3, &data[i], out)).unwrap();
    Gguf::from_bytes(&img).unwrap()
}

pub fn upload<B: Backend>(b: &B, data: &[f32]) -> B::Buf {
    let mut buf = b.alloc(data.len()).unwrap();
    b.write(&mut buf, 0, data).unwrap();
    buf
}

pub const TYPES: [GgmlType; 6] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];

pub fn matmul_matches_reference_on_awkward_shapes<B: Backend>(gs: &[B]) {
    let c = cpu();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // (rows, k): rows not multiples of any tile; k of one block up to many, and for the float
    // types rows of 4k values that end mid-block.
    let mut shapes = vec![(1, 32), (3, 96), (67, 64), (130, 544)];
    for ty in TYPES {
        let mut sh = shapes.clone();
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            sh.extend([(5, 4), (33, 36), (70, 100)]);
        }
        for (i, &(m, k)) in sh.iter().enumerate() {
            let g0 = tensors(&[("w", m, k, ty)], 10 + i as u64);
            let t = g0.tensor("w").unwrap();
            let wc = c.load_weight(&g0, t).unwrap();
            // n: one token, GEMV batches, and the tiled paths (the edges of 64-token tiles).
            for n in [1, 2, 3, 5, 16, 17, 33, 70, 129] {
                let x = randn(&mut rng, n * k, 1.0);
                let (xc, mut yc) = (upload(&c, &x), c.alloc(n * m).unwrap());
                c.matmul(&wc, &xc, n, &mut yc).unwrap();
                let want = c.read(&yc, 0, n * m).unwrap();
                for gpu in gs {
                    let wg = gpu.load_weight(&g0, t).unwrap();
                    let (xg, mut yg) = (upload(gpu, &x), gpu.alloc(n * m).unwrap());
                    gpu.matmul(&wg, &xg, n, &mut yg).unwrap();
                    let got = gpu.read(&yg, 0, n * m).unwrap();
                    // Same products, summed in another order (and maybe fused): f32 rounding
                    // of a k-term sum of values of magnitude ~1 is within k * 2^-24 * sum|w x|.
                    let tol = k as f32 * 6e-8 * 4.0;
                    assert_close(&format!("{} {ty} m={m} k={k} n={n}", gpu.name()), &got, &want, tol, 1e-5);
                }
            }
        }
        shapes.truncate(4);
    }
}

pub fn embed_rmsnorm_and_elementwise_ops_match_reference<B: Backend>(gs: &[B]) {
    let c = cpu();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for ty in TYPES {
        for (vocab, dim) in [(7, 32), (50, 96)] {
            let g0 = tensors(&[("emb", vocab, dim, ty), ("norm", 1, dim, ty)], 3);
            let (te, tn) = (g0.tensor("emb").unwrap(), g0.tensor("norm").unwrap());
            let (ec, nc) = (c.load_weight(&g0, te).unwrap(), c.load_weight(&g0, tn).unwrap());
            let toks: Vec<u32> = (0..5).map(|i| (i * 3 % vocab) as u32).collect();
            let mut oc = c.alloc(toks.len() * dim).unwrap();
            c.embed(&ec, &toks, &mut oc).unwrap();
            let want_e = c.read(&oc, 0, toks.len() * dim).unwrap();
            let n = toks.len();
            let y = randn(&mut rng, n * dim, 2.0);
            let (mut xc, yc, mut outc) = (upload(&c, &want_e), upload(&c, &y), c.alloc(n * dim).unwrap());
            c.rmsnorm(&xc, &nc, 1e-5, n, dim, &mut outc).unwrap();
            let want_n = c.read(&outc, 0, n * dim).unwrap();
            c.add_rmsnorm(&mut xc, &yc, &nc, 1e-5, n, dim, &mut outc).unwrap();
            let (want_ax, want_an) = (c.read(&xc, 0, n * dim).unwrap(), c.read(&outc, 0, n * dim).unwrap());
            for gpu in gs {
                let name = format!("{} {ty} {vocab}x{dim}", gpu.name());
                let (eg, ng) = (gpu.load_weight(&g0, te).unwrap(), gpu.load_weight(&g0, tn).unwrap());
                let mut og = gpu.alloc(n * dim).unwrap();
                gpu.embed(&eg, &toks, &mut og).unwrap();
                // Dequantization is the same formula; a fused multiply-add rounds once.
                assert_close(&format!("embed {name}"), &gpu.read(&og, 0, n * dim).unwrap(), &want_e, 1e-7, 1e-6);
                let (mut xg, yg, mut outg) = (upload(gpu, &want_e), upload(gpu, &y), gpu.alloc(n * dim).unwrap());
                gpu.rmsnorm(&xg, &ng, 1e-5, n, dim, &mut outg).unwrap();
                // A sum of squares in another order, then a square root: a few ulps.
                assert_close(&format!("rmsnorm {name}"), &gpu.read(&outg, 0, n * dim).unwrap(), &want_n, 1e-6, 1e-5);
                gpu.add_rmsnorm(&mut xg, &yg, &ng, 1e-5, n, dim, &mut outg).unwrap();
                assert_eq!(gpu.read(&xg, 0, n * dim).unwrap(), want_ax, "add_rmsnorm's add {name}");
                assert_close(&format!("add_rmsnorm {name}"), &gpu.read(&outg, 0, n * dim).unwrap(), &want_an, 1e-6, 1e-5);
            }
        }
    }
    // A token outside the vocabulary is an error, not an out-of-bounds read.
    let g0 = tensors(&[("emb", 7, 32, GgmlType::Q4_1)], 3);
    for gpu in gs {
        let e = gpu.load_weight(&g0, g0.tensor("emb").unwrap()).unwrap();
        let mut o = gpu.alloc(32).unwrap();
        assert!(format!("{:#}", gpu.embed(&e, &[7], &mut o).unwrap_err()).contains("outside the vocabulary"));
    }

    // RoPE (partial rotary dims, long positions), SwiGLU, add, copy_rows.
    for (n, heads, hd, dims, pos0) in [(1, 9, 64, 64, 0), (3, 3, 64, 32, 7), (5, 2, 16, 16, 130_000)] {
        let rope = Rope::new(dims, 10_000.0, None);
        let x = randn(&mut rng, n * heads * hd, 3.0);
        let mut xc = upload(&c, &x);
        c.rope(&mut xc, n, heads, hd, pos0, &rope).unwrap();
        let want = c.read(&xc, 0, x.len()).unwrap();
        for gpu in gs {
            let mut xg = upload(gpu, &x);
            gpu.rope(&mut xg, n, heads, hd, pos0, &rope).unwrap();
            // The same f64 angles; only a*c - b*s may fuse.
            assert_close(&format!("rope {} n={n} pos0={pos0}", gpu.name()), &gpu.read(&xg, 0, x.len()).unwrap(), &want, 1e-6, 1e-6);
        }
    }
    for len in [1, 255, 257, 70_001] {
        let (a, b) = (randn(&mut rng, len, 6.0), randn(&mut rng, len, 2.0));
        let (mut ac, bc) = (upload(&c, &a), upload(&c, &b));
        c.swiglu(&mut ac, &bc, len).unwrap();
        let want_s = c.read(&ac, 0, len).unwrap();
        let mut ac = upload(&c, &a);
        c.add(&mut ac, &bc, len).unwrap();
        let want_a = c.read(&ac, 0, len).unwrap();
        for gpu in gs {
            let (mut ag, bg) = (upload(gpu, &a), upload(gpu, &b));
            gpu.swiglu(&mut ag, &bg, len).unwrap();
            // exp() is within a few ulps on every GPU (WGSL allows 3 + 2|x| ulps).
            assert_close(&format!("swiglu {} len={len}", gpu.name()), &gpu.read(&ag, 0, len).unwrap(), &want_s, 1e-6, 2e-5);
            let mut ag = upload(gpu, &a);
            gpu.add(&mut ag, &bg, len).unwrap();
            assert_eq!(gpu.read(&ag, 0, len).unwrap(), want_a, "add {} len={len}", gpu.name());
        }
    }
    let src: Vec<f32> = (0..40).map(|i| i as f32).collect();
    for gpu in gs {
        let s = upload(gpu, &src);
        let mut d = upload(gpu, &[0.5; 24]);
        gpu.copy_rows(&s, 3, &mut d, 1, 2, 8).unwrap();
        let got = gpu.read(&d, 0, 24).unwrap();
        let mut want = vec![0.5; 24];
        want[8..24].copy_from_slice(&src[24..40]);
        assert_eq!(got, want, "copy_rows {}", gpu.name());
    }
}

/// K/V of `len` rows rounded to f16 first, so that the reference's f32 cache and the GPU's
/// f16 cache hold the same values and only the attention arithmetic differs.
pub fn f16_rounded(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    randn(rng, n, 1.0).into_iter().map(|v| f16::from_f32(v).to_f32()).collect()
}

pub fn attention_matches_reference_decode_and_prefill<B: Backend>(gs: &[B], set_partials_cap: &dyn Fn(&B, usize)) {
    let c = cpu();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // (n_head, n_kv_head, head_dim) x (rows, pos0): one row (decode), a few (batched drafts),
    // more than 16 (the tiled prefill kernel) whose tile ends mid-way; positions from 0 to
    // several thousand (many key splits).
    let shapes = [(9, 3, 64), (4, 4, 16), (8, 1, 32), (6, 2, 128)];
    let cases = [(1, 0), (1, 37), (3, 300), (17, 0), (70, 5), (1, 4100), (20, 1500), (130, 700)];
    // The longest context (one decode row over 131,072 cached positions), and a prefill batch
    // whose partials are cut into blocks of rows (a small cap forces it).
    let long = [((9, 3, 64), (1, 131_071), usize::MAX), ((6, 2, 128), (150, 900), 1 << 16)];
    let all = shapes.iter().flat_map(|&sh| cases.iter().map(move |&c| (sh, c, usize::MAX))).chain(long);
    for ((nh, nkv, hd), (n, pos0), cap) in all {
        for g in gs {
            set_partials_cap(g, cap);
        }
        let s = AttnShape { n_head: nh, n_kv_head: nkv, head_dim: hd };
        {
            let len = pos0 + n;
            let q = randn(&mut rng, n * s.q_dim(), 2.0);
            let kv_rows = |rng: &mut ChaCha8Rng| f16_rounded(rng, len * s.kv_dim());
            let (k, v) = (kv_rows(&mut rng), kv_rows(&mut rng));
            let run = |b: &dyn Fn(&[f32], &[f32], &[f32]) -> Vec<f32>| b(&q, &k, &v);
            let want = run(&|q, k, v| attend(&c, q, k, v, n, pos0, s));
            for gpu in gs {
                let got = run(&|q, k, v| attend(gpu, q, k, v, n, pos0, s));
                // Outputs are convex combinations of V (|v| <= 1); the softmax differs by exp()
                // accuracy and summation order, a few ulps of each weight.
                assert_close(&format!("attention {} ({nh},{nkv},{hd}) n={n} pos0={pos0}", gpu.name()), &got, &want, 2e-5, 1e-4);
            }
        }
    }
}

/// Attention of `n` rows at `pos0` over K/V rows `0..pos0+n`, the caches filled through
/// `store_kv` in two steps (the prefix, then the rows themselves).
pub fn attend<B: Backend>(b: &B, q: &[f32], k: &[f32], v: &[f32], n: usize, pos0: usize, s: AttnShape) -> Vec<f32> {
    let (kvd, len) = (s.kv_dim(), pos0 + n);
    let (mut kc, mut vc) = (b.alloc_kv(len * kvd).unwrap(), b.alloc_kv(len * kvd).unwrap());
    let (kb, vb) = (upload(b, k), upload(b, v));
    let (kt, vt) = (upload(b, &k[pos0 * kvd..]), upload(b, &v[pos0 * kvd..]));
    if pos0 > 0 {
        b.store_kv(&kb, &mut kc, 0, pos0, kvd).unwrap();
        b.store_kv(&vb, &mut vc, 0, pos0, kvd).unwrap();
    }
    b.store_kv(&kt, &mut kc, pos0, n, kvd).unwrap();
    b.store_kv(&vt, &mut vc, pos0, n, kvd).unwrap();
    let qb = upload(b, q);
    let mut out = b.alloc(n * s.q_dim()).unwrap();
    b.attention(&qb, &kc, &vc, &mut out, n, pos0, s).unwrap();
    b.read(&out, 0, n * s.q_dim()).unwrap()
}

pub fn top_k_matches_host_order_with_ties_and_nan<B: Backend>(gs: &[B]) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (rows, width) in [(1, 1), (1, 7), (2, 2049), (3, 49_152), (1, 150_000)] {
        let mut x = randn(&mut rng, rows * width, 10.0);
        // Ties (quantized values) and NaN.
        for (i, v) in x.iter_mut().enumerate() {
            if i % 5 == 0 {
                *v = (*v).round();
            }
            if i % 97 == 3 {
                *v = f32::NAN;
            }
        }
        for k in [1, 2, 40, 64] {
            let want: Vec<Vec<(u32, f32)>> = x.chunks(width).map(|r| top_k_host(r, k)).collect();
            for gpu in gs {
                let got = gpu.top_k(&upload(gpu, &x), rows, width, k).unwrap();
                assert_eq!(got, want, "top_k {} rows={rows} width={width} k={k}", gpu.name());
            }
        }
    }
}

/// Whole models: the GPU's logits against the reference for every weight type (prefill of a
/// batch, then single-token steps), in every variant.
pub fn tiny_models_match_reference_for_every_type<B: Backend>(variants: usize, variant: &dyn Fn(usize) -> B) {
    let prompt = [1u32, 20, 300, 40, 5, 17, 99, 100, 3, 3, 3, 250, 60, 7, 8, 9, 10, 11, 12];
    for ty in TYPES {
        let g = Gguf::open(&tiny_model(ty, 64)).unwrap();
        let want = reference_logits(flint::model::Model::load(cpu(), &g).unwrap(), &prompt);
        for i in 0..variants {
            let gpu = variant(i);
            let got = reference_logits(flint::model::Model::load(gpu, &g).unwrap(), &prompt);
            // The KV cache is f16 on the GPU (f32 in the reference): relative error ~2^-11 in
            // K and V, through a few layers of random weights.
            let (a, b) = (&got[..], &want[..]);
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
            assert!(worst <= 0.01 * scale, "{ty} variant {i}: logits differ by {worst} (scale {scale})");
        }
    }
}

/// Prefill all but the last 3 tokens in one batch (all logits), then the last 3 one at a time.
pub fn reference_logits<B: Backend>(m: flint::model::Model<B>, prompt: &[u32]) -> Vec<f32> {
    let m = std::sync::Arc::new(m);
    let mut r = flint::model::Runner::new(m, 64).unwrap();
    use flint::model::Forward;
    let split = prompt.len() - 3;
    let mut out = r.forward(&prompt[..split], 0, true).unwrap();
    for (i, &t) in prompt[split..].iter().enumerate() {
        out.extend(r.forward(&[t], split + i, false).unwrap());
    }
    out
}

pub fn real_model_greedy_output_equals_reference(kind: BackendKind) {
    let Some(path) = real_model("real_model_greedy_output_equals_reference") else { return };
    let l = Loaded::open(&path).unwrap();
    // The test prompts of tests/real_model.rs.
    let prompts = ["Write a Python function that checks whether a number is prime.", "List three colors.", "Explain recursion in one sentence."];
    for p in prompts {
        let toks = l.tokenizer.chat_tokens(&[Message::new("user", p)]).unwrap();
        let greedy = |kind| {
            let mut e = l.engine(kind, toks.len() + 8).unwrap();
            e.generate(Request::new(toks.clone(), 8, SamplerConfig::greedy()), None).unwrap().finish().unwrap().tokens
        };
        let (a, b) = (greedy(kind), greedy(BackendKind::CpuRef));
        assert_eq!(a, b, "{p:?}: {kind:?} {:?} vs cpu-ref {:?}", l.tokenizer.decode(&a, false), l.tokenizer.decode(&b, false));
        eprintln!("{p:?}: {:?}", l.tokenizer.decode(&a, false));
    }
}

/// The fused paths: Q, K and V in one GEMV (three weights of one type; mixed types fall back),
/// and gate/up with SwiGLU in one GEMV, against the reference's separate ops.
pub fn fused_matmuls_match_reference<B: Backend>(gs: &[B]) {
    let c = cpu();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let k = 96;
    for (ta, tb) in [(GgmlType::Q4_1, GgmlType::Q4_1), (GgmlType::Q8_0, GgmlType::Q4_0), (GgmlType::F16, GgmlType::F16)] {
        let g0 = tensors(&[("a", 70, k, ta), ("b", 13, k, tb), ("c", 13, k, tb), ("d", 70, k, ta)], 8);
        let names = ["a", "b", "c", "d"];
        let wc: Vec<_> = names.iter().map(|n| c.load_weight(&g0, g0.tensor(n).unwrap()).unwrap()).collect();
        for n in [1, 3, 6, 20] {
            let x = randn(&mut rng, n * k, 1.0);
            let xc = upload(&c, &x);
            let rows = [70, 13, 13];
            let mut outs: Vec<_> = rows.iter().map(|&r| c.alloc(n * r).unwrap()).collect();
            {
                let mut o: Vec<&mut Vec<f32>> = outs.iter_mut().collect();
                c.matmul_many(&[&wc[0], &wc[1], &wc[2]], &xc, n, &mut o).unwrap();
            }
            let want: Vec<Vec<f32>> = outs.iter().zip(rows).map(|(o, r)| c.read(o, 0, n * r).unwrap()).collect();
            let (mut gate, mut up) = (c.alloc(n * 70).unwrap(), c.alloc(n * 70).unwrap());
            c.ffn_gate_up(&wc[0], &wc[3], &xc, n, &mut gate, &mut up, 70).unwrap();
            let want_ffn = c.read(&gate, 0, n * 70).unwrap();
            for gpu in gs {
                let wg: Vec<_> = names.iter().map(|nm| gpu.load_weight(&g0, g0.tensor(nm).unwrap()).unwrap()).collect();
                let xg = upload(gpu, &x);
                let mut outs: Vec<_> = rows.iter().map(|&r| gpu.alloc(n * r).unwrap()).collect();
                {
                    let mut o: Vec<_> = outs.iter_mut().collect();
                    gpu.matmul_many(&[&wg[0], &wg[1], &wg[2]], &xg, n, &mut o).unwrap();
                }
                for ((o, r), w) in outs.iter().zip(rows).zip(&want) {
                    // As the single matmul: another summation order.
                    assert_close(&format!("matmul_many {} {ta}/{tb} n={n}", gpu.name()), &gpu.read(o, 0, n * r).unwrap(), w, k as f32 * 2.4e-7, 1e-5);
                }
                let (mut gate, mut up) = (gpu.alloc(n * 70).unwrap(), gpu.alloc(n * 70).unwrap());
                gpu.ffn_gate_up(&wg[0], &wg[3], &xg, n, &mut gate, &mut up, 70).unwrap();
                // The products' rounding, then exp() within a few ulps.
                assert_close(&format!("ffn_gate_up {} {ta} n={n}", gpu.name()), &gpu.read(&gate, 0, n * 70).unwrap(), &want_ffn, k as f32 * 1e-6, 1e-4);
            }
        }
    }
}

/// RoPE on q and k and the K/V store in one pass, against the reference's separate ops:
/// q and k exactly as RoPE leaves them, and attention over the stored caches.
pub fn fused_rope_and_kv_store_match_reference<B: Backend>(gs: &[B]) {
    let c = cpu();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (nh, nkv, hd, dims, n, pos0) in [(9, 3, 64, 64, 1, 0), (9, 3, 64, 64, 5, 40), (4, 2, 32, 16, 20, 7)] {
        let s = AttnShape { n_head: nh, n_kv_head: nkv, head_dim: hd };
        let rope = Rope::new(dims, 10_000.0, None);
        let (q, k, v) = (randn(&mut rng, n * s.q_dim(), 2.0), randn(&mut rng, n * s.kv_dim(), 1.0), randn(&mut rng, n * s.kv_dim(), 1.0));
        fn run<B: Backend>(b: &B, q: &[f32], k: &[f32], v: &[f32], n: usize, pos0: usize, s: AttnShape, rope: &Rope) -> [Vec<f32>; 3] {
            let (mut qb, mut kb, vb) = (upload(b, q), upload(b, k), upload(b, v));
            let (mut kc, mut vc) = zero_prefix_caches(b, n, pos0, s);
            b.rope_store_kv(&mut qb, &mut kb, &vb, &mut kc, &mut vc, n, pos0, s, rope).unwrap();
            let mut out = b.alloc(n * s.q_dim()).unwrap();
            b.attention(&qb, &kc, &vc, &mut out, n, pos0, s).unwrap();
            [b.read(&qb, 0, q.len()).unwrap(), b.read(&kb, 0, k.len()).unwrap(), b.read(&out, 0, n * s.q_dim()).unwrap()]
        }
        let want = run(&c, &q, &k, &v, n, pos0, s, &rope);
        for gpu in gs {
            let got = run(gpu, &q, &k, &v, n, pos0, s, &rope);
            let name = format!("{} ({nh},{nkv},{hd}) dims={dims} n={n} pos0={pos0}", gpu.name());
            // The same f64 angles; only a*c - b*s may fuse.
            assert_close(&format!("q {name}"), &got[0], &want[0], 1e-6, 1e-6);
            assert_close(&format!("k {name}"), &got[1], &want[1], 1e-6, 1e-6);
            // The GPU cache holds K and V in f16 (relative rounding 2^-11), the reference's f32.
            assert_close(&format!("attention {name}"), &got[2], &want[2], 2e-3, 2e-3);
        }
    }
}

/// Speculative decoding on `kind`: greedy output identical to plain decoding on the same
/// backend, for every draft source (the verification batch runs the prefill path's ops).
pub fn speculative_greedy_output_equals_plain(kind: BackendKind) {
    use flint::speculative::SpecConfig;
    let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
    let prompt = l.tokenizer.encode("abc abd abc abd abc abd abc", false).unwrap();
    let mut e = l.engine(kind, 256).unwrap();
    let run = |e: &mut flint::generate::Engine, spec: Option<SpecConfig>| {
        let mut r = Request::new(prompt.clone(), 40, SamplerConfig::greedy());
        r.speculative = spec;
        e.generate(r, None).unwrap().finish().unwrap()
    };
    let plain = run(&mut e, None);
    let mut wrong = plain.tokens.clone();
    wrong[5] = 7;
    let cases = [
        ("ngram", SpecConfig::ngram()),
        ("exact prediction", SpecConfig::prediction(plain.tokens.clone())),
        ("wrong prediction", SpecConfig::prediction(wrong)),
        ("draft model = target", SpecConfig::model()),
    ];
    e.set_draft_model(l.runner(kind, 256).unwrap()).unwrap();
    for (name, spec) in cases {
        e.reset();
        let o = run(&mut e, Some(spec));
        assert_eq!(o.tokens, plain.tokens, "{kind:?} {name}");
        eprintln!("{kind:?} {name}: {} forward passes for 40 tokens, {}/{} accepted", o.timings.forward_passes, o.timings.accepted, o.timings.drafted);
    }
}

/// Q, K and V with RoPE and the K/V store in one pass ([`Backend::qkv_rope_store`]), against
/// the reference's separate ops: q and k as RoPE leaves them, v, and attention over the caches.
pub fn fused_qkv_rope_store_matches_reference<B: Backend>(gs: &[B]) {
    let c = cpu();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // (n_head, n_kv_head, head_dim, rope dims, weight type) x (rows, pos0).
    for (nh, nkv, hd, dims, ty) in [(9, 3, 64, 64, GgmlType::Q4_1), (4, 2, 32, 16, GgmlType::Q8_0), (2, 1, 16, 16, GgmlType::F16)] {
        let s = AttnShape { n_head: nh, n_kv_head: nkv, head_dim: hd };
        let k = 96;
        let g0 = tensors(&[("q", s.q_dim(), k, ty), ("k", s.kv_dim(), k, ty), ("v", s.kv_dim(), k, ty)], 12);
        let rope = Rope::new(dims, 10_000.0, None);
        for (n, pos0) in [(1, 0), (1, 300), (5, 40), (20, 7)] {
            // Small inputs keep q and k near 1, so that the f16 cache's rounding moves the
            // scores by a few 1e-3 at most (larger ones sharpen the softmax past the bound).
            let x = randn(&mut rng, n * k, 0.15);
            fn run<B: Backend>(b: &B, g0: &Gguf, x: &[f32], n: usize, pos0: usize, s: AttnShape, rope: &Rope) -> [Vec<f32>; 4] {
                let w: Vec<B::Weight> = ["q", "k", "v"].iter().map(|nm| b.load_weight(g0, g0.tensor(nm).unwrap()).unwrap()).collect();
                let xb = upload(b, x);
                let (mut q, mut kb, mut vb) = (b.alloc(n * s.q_dim()).unwrap(), b.alloc(n * s.kv_dim()).unwrap(), b.alloc(n * s.kv_dim()).unwrap());
                let (mut kc, mut vc) = zero_prefix_caches(b, n, pos0, s);
                b.qkv_rope_store([&w[0], &w[1], &w[2]], &xb, &mut q, &mut kb, &mut vb, &mut kc, &mut vc, n, pos0, s, rope).unwrap();
                let mut out = b.alloc(n * s.q_dim()).unwrap();
                b.attention(&q, &kc, &vc, &mut out, n, pos0, s).unwrap();
                let r = |buf: &B::Buf, len| b.read(buf, 0, len).unwrap();
                [r(&q, n * s.q_dim()), r(&kb, n * s.kv_dim()), r(&vb, n * s.kv_dim()), r(&out, n * s.q_dim())]
            }
            let want = run(&c, &g0, &x, n, pos0, s, &rope);
            for gpu in gs {
                let got = run(gpu, &g0, &x, n, pos0, s, &rope);
                let name = format!("{} {ty} ({nh},{nkv},{hd}) dims={dims} n={n} pos0={pos0}", gpu.name());
                // The matmul's summation order (as matmul_matches_reference), then the same f64 angles.
                let tol = k as f32 * 6e-8 * 4.0;
                for (i, what) in ["q", "k", "v"].iter().enumerate() {
                    assert_close(&format!("{what} {name}"), &got[i], &want[i], tol, 1e-5);
                }
                // The GPU cache holds K and V in f16 (relative rounding 2^-11), the reference's f32.
                assert_close(&format!("attention {name}"), &got[3], &want[3], 2e-3, 2e-3);
            }
        }
    }
}

/// K and V caches for positions `0..pos0+n`, the first `pos0` rows zeros: the rest is what
/// the op under test writes.
fn zero_prefix_caches<B: Backend>(b: &B, n: usize, pos0: usize, s: AttnShape) -> (B::Kv, B::Kv) {
    let len = (pos0 + n) * s.kv_dim();
    let (mut kc, mut vc) = (b.alloc_kv(len).unwrap(), b.alloc_kv(len).unwrap());
    let zeros = upload(b, &vec![0.0; len.max(1)]);
    if pos0 > 0 {
        b.store_kv(&zeros, &mut kc, 0, pos0, s.kv_dim()).unwrap();
        b.store_kv(&zeros, &mut vc, 0, pos0, s.kv_dim()).unwrap();
    }
    (kc, vc)
}

/// The server's batched decode step (`forward_multi`: one pass for several sessions at
/// different depths, the leader not the longest) gives each session what a pass of its own
/// gives on the same backend: the routing of rows to sessions, their caches and positions.
pub fn batched_decode_matches_single_sessions<B: Backend + 'static>(variants: usize, variant: &dyn Fn(usize) -> B) {
    use flint::model::{Forward, Model, Runner};
    let g = Gguf::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
    let prompts: [Vec<u32>; 5] = [vec![5], (1..40).collect(), (3..9).collect(), (7..120).collect(), vec![9, 8, 7]];
    for i in 0..variants {
        let m = std::sync::Arc::new(Model::load(variant(i), &g).unwrap());
        let gpu = &m.backend;
        let v = m.cfg.n_vocab;
        for count in [2, 5] {
            let prompts = &prompts[..count];
            let new = || -> Vec<Runner<B>> { prompts.iter().map(|_| Runner::new(m.clone(), 16).unwrap()).collect() };
            let (mut solo, mut many) = (new(), new());
            for ((p, a), b) in prompts.iter().zip(&mut solo).zip(&mut many) {
                a.forward(p, 0, false).unwrap();
                b.forward(p, 0, false).unwrap();
            }
            for step in 0..3u32 {
                let tokens: Vec<u32> = (0..count as u32).map(|i| 11 + 13 * i + step).collect();
                let pos: Vec<usize> = prompts.iter().map(|p| p.len() + step as usize).collect();
                let want: Vec<Vec<f32>> = solo.iter_mut().zip(&tokens).zip(&pos).map(|((f, &t), &p)| f.forward(&[t], p, false).unwrap()).collect();
                let (lead, rest) = many.split_first_mut().unwrap();
                let mut rest: Vec<&mut dyn Forward> = rest.iter_mut().map(|f| f as &mut dyn Forward).collect();
                let got = lead.forward_multi(&mut rest, &tokens, &pos).unwrap();
                for (i, w) in want.iter().enumerate() {
                    // The same kernels on the same rows; a GEMV that shares weight loads across
                    // rows may sum in another order (a few ulps of the logits' scale).
                    let scale = w.iter().map(|x| x.abs()).fold(0f32, f32::max);
                    assert_close(&format!("{}: session {i} of {count}, step {step}", gpu.name()), &got[i * v..(i + 1) * v], w, 1e-4 * scale, 0.0);
                }
            }
        }
    }
}
