//! The decoder layer's numeric contract (flint::hdl::numerics, flint::hdl::layer): each
//! operation against f64 arithmetic with a stated bound, its edge cases, and the whole
//! default model under the contract against the exact CPU reference.

mod common;

use flint::generate::Request;
use flint::hdl::layer::{gemv_w, quantize_terms, Golden, WBlock, WMatrix};
use flint::hdl::numerics::{self, Heads, EXP2_P};
use flint::hdl::{self, Block, Matrix, QK};
use flint::quant::{dequantize, quantize, GgmlType};
use flint::sampler::SamplerConfig;
use flint::tokenizer::Message;
use flint::{BackendKind, Loaded};

fn rng(seed: u64) -> impl FnMut() -> f32 {
    let v = hdl::uniform(1 << 16, seed);
    let mut i = 0;
    move || {
        i += 1;
        v[i % v.len()]
    }
}

fn deq(b: &Block) -> Vec<f64> {
    let d = half::f16::from_bits(b.d).to_f64();
    b.qs.iter().map(|&q| d * q as f64).collect()
}

/// 2^f's polynomial, evaluated in f32, against f64 on 2^22 points of [-1/2, 1/2]: the
/// bound the contract states (1.1e-7 relative, 1.7 units of 2^-24; the fit's own error is
/// about 2e-9, the rest is f32 rounding in Horner's rule).
#[test]
fn exp2_is_within_its_stated_error() {
    let n = 1 << 22;
    let mut worst = 0f64;
    for i in 0..=n {
        let t = -0.5 + i as f32 / n as f32;
        let want = (t as f64).exp2();
        worst = worst.max((numerics::exp2(t) as f64 - want).abs() / want);
    }
    eprintln!("exp2 on [-1/2, 1/2]: max relative error {worst:.3e}");
    assert!(worst < 1.1e-7, "{worst}");
    // Whole numbers are exact; the range's ends are defined.
    assert_eq!(EXP2_P[0], 1.0);
    for k in -125..=126 {
        assert_eq!(numerics::exp2(k as f32), (k as f64).exp2() as f32, "2^{k}");
    }
    assert_eq!(numerics::exp2(-125.5), 0.0, "below -125: 0, no subnormals");
    assert_eq!(numerics::exp2(-1e30), 0.0);
    assert_eq!(numerics::exp2(1e30), numerics::exp2(126.0), "clamped at 126");
    // Anywhere in range: the same relative bound (the power of two is exact).
    let mut r = rng(3);
    for _ in 0..100_000 {
        let t = r() * 120.0;
        let want = (t as f64).exp2();
        assert!((numerics::exp2(t) as f64 - want).abs() / want < 1.1e-7, "2^{t}");
    }
}

/// Sigmoid and SwiGLU: within a few f32 roundings of f64 (2^x's 1.1e-7, then an add, a
/// division and two products: 6e-7 relative), exact at the edges.
#[test]
fn sigmoid_and_swiglu_against_f64() {
    let mut r = rng(4);
    let (g, u): (Vec<f32>, Vec<f32>) = (0..4096).map(|_| (r() * 40.0, r() * 8.0)).unzip();
    let h = numerics::swiglu(&g, &u);
    for ((&g, &u), &h) in g.iter().zip(&u).zip(&h) {
        let s = 1.0 / (1.0 + (-g as f64).exp());
        let want = g as f64 * s * u as f64;
        // The rounding of -g * log2(e) moves 2^x by up to |g| 2^-24 ln 2 relative.
        assert!((h as f64 - want).abs() <= (6e-7 + 6e-8 * g.abs() as f64) * want.abs() + 1e-30, "swiglu({g}, {u}) = {h}, f64 {want}");
    }
    assert_eq!(numerics::sigmoid(0.0), 0.5);
    assert_eq!(numerics::sigmoid(200.0), 1.0);
    assert_eq!(numerics::sigmoid(-200.0), 1.0 / (1.0 + numerics::exp2(126.0)), "clamped: tiny, not zero");
    let h = numerics::swiglu(&[0.0, -1e6], &[5.0, 5.0]);
    assert!(h[0] == 0.0 && h[1] < 0.0 && h[1] > -1e-30, "{h:?}: 2^x clamped at 126 leaves g * 2^-126");
}

/// RMSNorm: the sum of squares is exact (any order gives the same bits), the rest is seven
/// f32 roundings: within 5e-7 relative of f64; subnormal, zero and out-of-range inputs.
#[test]
fn rmsnorm_against_f64_and_its_range() {
    let mut r = rng(5);
    for (n, scale) in [(576, 1.0f32), (32, 300.0), (2048, 1e-3), (1, 7.0), (577, 1e4)] {
        let x: Vec<f32> = (0..n).map(|_| r() * scale).collect();
        let w: Vec<f32> = (0..n).map(|_| 0.5 + r()).collect();
        let eps = 1e-5f32;
        let y = numerics::rmsnorm(&x, &w, eps).unwrap();
        let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
        let rr = 1.0 / (ms + eps as f64).sqrt();
        for ((&x, &w), &y) in x.iter().zip(&w).zip(&y) {
            let want = x as f64 * rr * w as f64;
            assert!((y as f64 - want).abs() <= 5e-7 * want.abs(), "n {n}: {y} vs {want}");
        }
        // The exact sum: reversed input, reversed output.
        let (xr, wr): (Vec<f32>, Vec<f32>) = (x.iter().rev().copied().collect(), w.iter().rev().copied().collect());
        let yr = numerics::rmsnorm(&xr, &wr, eps).unwrap();
        assert!(y.iter().rev().zip(&yr).all(|(a, b)| a.to_bits() == b.to_bits()), "n {n}: order changed the bits");
    }
    // Squares: exact where representable, rounded to nearest even below 2^-48.
    assert_eq!(numerics::square_units(1.0).unwrap(), 1 << 48);
    assert_eq!(numerics::square_units(-3.0).unwrap(), 9 << 48);
    assert_eq!(numerics::square_units(2f32.powi(-24)).unwrap(), 1);
    assert_eq!(numerics::square_units(2f32.powi(-25)).unwrap(), 0, "a quarter unit: down");
    assert_eq!(numerics::square_units(1.5 * 2f32.powi(-24)).unwrap(), 2, "2.25 units: 2");
    assert_eq!(numerics::square_units(f32::from_bits(1)).unwrap(), 0, "subnormal");
    assert!(numerics::square_units(4.3e9).is_err() && numerics::square_units(f32::NAN).is_err());
    // All zeros: 1/sqrt(eps), times zero.
    assert_eq!(numerics::rmsnorm(&[0.0; 64], &[1.0; 64], 1e-5).unwrap(), [0.0; 64]);
    assert!(numerics::rmsnorm(&[1.0; 3], &[1.0; 2], 1e-5).is_err());
}

/// RoPE: each output two products and a sum, against f64 on the same table (3 roundings:
/// 2e-7 of the pair's magnitude); the table against f64 (its entries rounded once);
/// partial rotary leaves the rest.
#[test]
fn rope_against_f64() {
    let inv: Vec<f32> = (0..32).map(|i| 1e4f64.powf(-2.0 * i as f64 / 64.0) as f32).collect();
    let mut r = rng(6);
    for pos in [0, 1, 17, 8191, 131_071] {
        let cs = numerics::rope_table(&inv, pos);
        for (&(c, s), &f) in cs.iter().zip(&inv) {
            let a = pos as f64 * f as f64;
            assert_eq!((c, s), (a.cos() as f32, a.sin() as f32));
        }
        let x: Vec<f32> = (0..192).map(|_| r() * 4.0).collect();
        let mut y = x.clone();
        numerics::rope(&mut y, 64, &cs);
        for (hx, hy) in x.chunks(64).zip(y.chunks(64)) {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b, c, s) = (hx[2 * i] as f64, hx[2 * i + 1] as f64, c as f64, s as f64);
                let mag = a.hypot(b);
                assert!((hy[2 * i] as f64 - (a * c - b * s)).abs() <= 2e-7 * mag + 1e-30);
                assert!((hy[2 * i + 1] as f64 - (a * s + b * c)).abs() <= 2e-7 * mag + 1e-30);
            }
        }
    }
    let mut y = vec![1.0f32; 64];
    numerics::rope(&mut y, 64, &numerics::rope_table(&inv[..8], 5));
    assert!(y[16..].iter().all(|&v| v == 1.0), "partial rotary: dimensions 16.. untouched");
}

/// The GEMV over the model's weight types (Q8_0, Q4_0, Q4_1) against f64 on the dequantized
/// values: correctly rounded, so within half an f32 ulp plus f64's own rounding (we allow
/// one ulp); Q8_0 weights give exactly the mesh's `hdl::gemv`.
#[test]
fn weight_gemv_is_correctly_rounded_for_every_type() {
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
        for (rows, nb) in [(1, 1), (7, 3), (45, 11), (64, 48)] {
            let mut bytes = Vec::new();
            let w = hdl::uniform(rows * nb * QK, rows as u64 * 31 + nb as u64);
            quantize(ty, &w, &mut bytes).unwrap();
            let g = WMatrix::from_bytes(ty, rows, nb, &bytes).unwrap();
            let x = hdl::quantize_q8(&hdl::uniform(nb * QK, 9)).unwrap();
            let y = gemv_w(&g, &x).unwrap();
            let mut wd = vec![0f32; rows * nb * QK];
            dequantize(ty, &bytes, &mut wd).unwrap();
            let xd: Vec<f64> = x.iter().flat_map(deq).collect();
            for (r, &y) in y.iter().enumerate() {
                let want: f64 = wd[r * nb * QK..(r + 1) * nb * QK].iter().zip(&xd).map(|(&a, &b)| a as f64 * b).sum();
                let ulp = (y.abs().max(f32::MIN_POSITIVE) as f64) * 2f64.powi(-23);
                assert!((y as f64 - want).abs() <= ulp, "{ty} {rows}x{nb} row {r}: {y} vs {want}");
            }
            if ty == GgmlType::Q8_0 {
                let m = Matrix { rows, nb, blocks: bytes.chunks_exact(34).map(Block::from_bytes).collect() };
                let want = hdl::gemv(&m, &x).unwrap();
                assert!(y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "Q8_0 as the mesh's GEMV");
            }
        }
    }
}

/// Attention against f64 on the dequantized vectors (scores scaled by 1/sqrt(64), an exact
/// softmax): the contract's roundings (scores, 2^x, the 24-bit weights, the final division)
/// keep each output within 2e-6 of the values' largest magnitude. Edge cases: one
/// position gives its value exactly; zero queries average uniformly; the largest scores
/// pick out their position; the positions' order does not change the bits.
#[test]
fn attention_against_f64_and_its_edges() {
    let h = Heads { n_head: 9, n_kv_head: 3, head_dim: 64 };
    let (qb, kvb) = (h.n_head * 2, h.n_kv_head * 2);
    for (len, scale) in [(1usize, 1.0f32), (2, 3.0), (17, 1.0), (300, 4.0), (1000, 0.5)] {
        let q = hdl::quantize_q8(&hdl::uniform(qb * QK, len as u64).iter().map(|v| v * scale).collect::<Vec<_>>()).unwrap();
        let k = hdl::quantize_q8(&hdl::uniform(len * kvb * QK, 2 + len as u64).iter().map(|v| v * scale).collect::<Vec<_>>()).unwrap();
        let v = hdl::quantize_q8(&hdl::uniform(len * kvb * QK, 3 + len as u64)).unwrap();
        let o = numerics::attention(&[q.clone()], &k, &v, 1, len, h).unwrap();
        let (qd, kd, vd): (Vec<f64>, Vec<f64>, Vec<f64>) = (q.iter().flat_map(deq).collect(), k.iter().flat_map(deq).collect(), v.iter().flat_map(deq).collect());
        let vmax = vd.iter().fold(0f64, |a, b| a.max(b.abs()));
        for head in 0..h.n_head {
            let g = head / 3;
            let s: Vec<f64> = (0..len).map(|j| (0..64).map(|i| qd[head * 64 + i] * kd[j * 192 + g * 64 + i]).sum::<f64>() / 8.0).collect();
            let m = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let p: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
            let sum: f64 = p.iter().sum();
            for i in 0..64 {
                let want: f64 = (0..len).map(|j| p[j] * vd[j * 192 + g * 64 + i]).sum::<f64>() / sum;
                let got = o[head * 64 + i] as f64;
                assert!((got - want).abs() <= 2e-6 * vmax, "len {len} head {head} dim {i}: {got} vs {want}");
            }
        }
        if len == 1 {
            let want: Vec<f32> = (0..h.n_head).flat_map(|hh| vd[(hh / 3) * 64..][..64].iter().map(|&x| x as f32).collect::<Vec<_>>()).collect();
            assert_eq!(o, want, "one position: its value, exactly");
        }
        // Positions in reverse: the same bits (max and exact sums).
        let rev = |x: &[Block]| x.chunks(kvb).rev().flatten().copied().collect::<Vec<_>>();
        let orev = numerics::attention(&[q.clone()], &rev(&k), &rev(&v), 1, len, h).unwrap();
        assert!(o.iter().zip(&orev).all(|(a, b)| a.to_bits() == b.to_bits()), "len {len}: order changed the bits");
    }
    // Zero queries: every score 0, the plain mean of the values.
    let len = 5;
    let zero = hdl::quantize_q8(&vec![0.0; 18 * QK]).unwrap();
    let k = hdl::quantize_q8(&hdl::uniform(len * kvb * QK, 1)).unwrap();
    let v = hdl::quantize_q8(&hdl::uniform(len * kvb * QK, 2)).unwrap();
    let o = numerics::attention(&[zero], &k, &v, 1, len, h).unwrap();
    let vd: Vec<f64> = v.iter().flat_map(deq).collect();
    for i in 0..64 {
        let mean = (0..len).map(|j| vd[j * 192 + i]).sum::<f64>() / len as f64;
        assert!((o[i] as f64 - mean).abs() < 1e-6, "dim {i}: {} vs mean {mean}", o[i]);
    }
    // The largest values: int8 extremes with the largest f16 scale; one key far ahead.
    let big = |q: i8| Block { d: 0x7bff, qs: [q; QK] };
    let q: Vec<Block> = vec![big(127); qb];
    let mut k: Vec<Block> = vec![big(-128); len * kvb];
    k[3 * kvb..4 * kvb].fill(big(127));
    let o = numerics::attention(&[q.clone()], &k, &v, 1, len, h).unwrap();
    let v3: Vec<f32> = vd[3 * 192..][..64].iter().map(|&x| x as f32).collect();
    assert_eq!(&o[..64], &v3[..], "the one key with the largest score takes all the weight");
    assert!(numerics::attention(&[q.clone()], &k, &v, 1, 0, h).is_err() && numerics::attention(&[q[1..].to_vec()], &k, &v, 1, len, h).is_err());
    assert!(numerics::attention(&[q.clone()], &k, &v, 2, len, h).is_err(), "a query of one term with a cache of two");
}

/// Two terms (value and residual, each Q8_0) against f64 on the unquantized vectors: what
/// is left of the 8-bit rounding (1/254^2 of a block's largest value per element, about
/// 1e-5 on a score of 64 products) bounds each output at 1e-5 here.
#[test]
fn attention_in_two_terms_against_f64() {
    let h = Heads { n_head: 4, n_kv_head: 2, head_dim: 64 };
    let len = 200;
    let (q, k, v) = (hdl::uniform(4 * 64, 1), hdl::uniform(len * 128, 2), hdl::uniform(len * 128, 3));
    let q2 = quantize_terms(&q, 2).unwrap();
    let per_pos = |x: &[f32]| -> Vec<Block> { x.chunks(128).flat_map(|r| quantize_terms(r, 2).unwrap().concat()).collect() };
    let o = numerics::attention(&q2, &per_pos(&k), &per_pos(&v), 2, len, h).unwrap();
    for head in 0..4 {
        let g = head / 2;
        let s: Vec<f64> = (0..len).map(|j| (0..64).map(|i| q[head * 64 + i] as f64 * k[j * 128 + g * 64 + i] as f64).sum::<f64>() / 8.0).collect();
        let m = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let p: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
        let sum: f64 = p.iter().sum();
        for i in 0..64 {
            let want = (0..len).map(|j| p[j] * v[j * 128 + g * 64 + i] as f64).sum::<f64>() / sum;
            assert!((o[head * 64 + i] as f64 - want).abs() < 1e-5, "head {head} dim {i}: {} vs {want}", o[head * 64 + i]);
        }
    }
}

const PROMPTS: [&str; 3] = ["Write a Python function that checks whether a number is prime.", "List three colors.", "Explain recursion in one sentence."];

/// Greedy tokens of the exact CPU reference and its logits after the prompt.
fn reference(l: &Loaded, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut e = l.engine(BackendKind::CpuRef, prompt.len() + n).unwrap();
    let tokens = e.generate(Request::new(prompt.to_vec(), n, SamplerConfig::greedy()), None).unwrap().finish().unwrap().tokens;
    let logits = l.runner(BackendKind::CpuRef, prompt.len()).unwrap().forward(prompt, 0, false).unwrap();
    (tokens, logits)
}

/// The whole default model under the contract (Q4_1 weights as they are, Q8_0 vectors
/// between ops and in the KV cache, the defined norm, RoPE, softmax and SwiGLU), against the
/// exact CPU reference on the test prompts, 16 greedy tokens each.
/// - Two terms (value and residual): the same 16 tokens on every prompt; logits within
///   1e-4 NMSE.
/// - One term (plain Q8_0, as llama.cpp and the `cpu` backend): the same first 8 tokens, as
///   the `cpu` backend's test asks (`real_model.rs`), and logits within the 8-bit bound
///   (5e-3 NMSE). Its 13th token on the first prompt departs: the reference's top two
///   logits there are 0.022 apart (18.388 and 18.366) and 8-bit activations move logits
///   by about 0.1-0.5; the `cpu` backend happens to keep it.
#[test]
fn golden_model_decodes_as_the_cpu_reference() {
    let Some(path) = common::real_model("golden_model_decodes_as_the_cpu_reference") else { return };
    let l = Loaded::open(&path).unwrap();
    let n = 16;
    for (terms, same, bound) in [(2, 16, 1e-4), (1, 8, 5e-3)] {
        let golden = Golden::load(&l.gguf, terms).unwrap();
        for p in PROMPTS {
            let prompt = l.tokenizer.chat_tokens(&[Message::new("user", p)]).unwrap();
            let (tokens, logits) = golden.greedy(&prompt, n).unwrap();
            let (want, r) = reference(&l, &prompt, n);
            let nmse = logits.iter().zip(&r).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / r.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
            let max = logits.iter().zip(&r).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let agree = tokens.iter().zip(&want).take_while(|(a, b)| a == b).count();
            eprintln!("golden ({terms} term(s)) vs cpu-ref, {p:?}: logits NMSE {nmse:.2e}, max |diff| {max:.4}; the first {agree} of {n} tokens equal");
            assert!(agree >= same, "{terms} term(s), {p:?}: {:?} vs {:?}", l.tokenizer.decode(&tokens, false), l.tokenizer.decode(&want, false));
            assert!(nmse < bound, "{terms} term(s), {p:?}: NMSE {nmse}");
        }
    }
}

/// `flint hdl layer` writes one layer's vectors: here blk.1 for the token at position 5 in
/// two terms, each file the library's trace (the same golden model, run here on the same
/// context); bad requests are one-line errors.
#[test]
fn layer_vectors_from_the_command_line() {
    let Some(path) = common::real_model("layer_vectors_from_the_command_line") else { return };
    let dir = common::temp_dir("hdl-layer-cli");
    let flint = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_flint")).args(["hdl", "layer", "--model", path.to_str().unwrap()]).args(args).output().unwrap();
    let o = flint(&["--layer", "1", "--position", "5", "--terms", "2", "--text", "fn main() {}", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let words = |name: &str| -> Vec<u32> { std::fs::read_to_string(dir.join(name)).unwrap().lines().map(|l| u32::from_str_radix(l, 16).unwrap()).collect() };
    let l = Loaded::open(&path).unwrap();
    let golden = Golden::load(&l.gguf, 2).unwrap();
    let toks = l.tokenizer.encode("fn main() {}", false).unwrap();
    let (t, _) = golden.trace_at(1, &toks, 5).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(words("x_in.hex"), bits(&t.x_in));
    assert_eq!(words("attn.hex"), bits(&t.attn));
    assert_eq!(words("x_out.hex"), bits(&t.x_out));
    assert_eq!(words("h.hex"), t.h.concat().iter().flat_map(|b| b.words()).collect::<Vec<_>>());
    assert_eq!(words("k_cache.hex").len(), 6 * 2 * 6 * 9, "6 positions, 2 terms, 6 blocks of 9 words");
    assert_eq!(words("meta.hex")[..9], [576, 9, 3, 64, 1536, 32, 1, 5, 2]);
    let attn_q8 = flint::hdl::layer::quantize_terms(&t.attn, 2).unwrap();
    assert_eq!(words("attn_q8.hex"), attn_q8.concat().iter().flat_map(|b| b.words()).collect::<Vec<_>>(), "the O GEMV's input");
    // The edge-case inputs: a zero vector (every 8-bit vector after the norm is zero blocks),
    // and the model's input scaled to just under 2^31.
    let o = flint(&["--layer", "1", "--position", "2", "--input", "zero", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(words("x_in.hex").iter().all(|&w| w == 0) && words("attn_in.hex").iter().all(|&w| w == 0));
    let o = flint(&["--layer", "1", "--position", "2", "--input", "large", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let max = words("x_in.hex").iter().map(|&w| f32::from_bits(w).abs()).fold(0f32, f32::max);
    assert!((2f32.powi(30)..2f32.powi(31)).contains(&max), "largest input {max}");
    for (args, needle) in [
        (&["--layer", "30"][..], "the model has 30 layers"),
        (&["--terms", "3"][..], "1 or 2 Q8_0 terms"),
        (&["--position", "9000"][..], "--position 9000"),
        (&["--text", ""][..], "no tokens"),
    ] {
        let o = flint(&[args, &["--out", dir.to_str().unwrap()]].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.trim_end().lines().count() == 1 && err.contains(needle) && !err.contains("panicked"), "{args:?}: {err:?}");
    }
    // A model whose heads are not whole blocks is refused, saying why.
    let tiny = common::tiny_model(GgmlType::Q4_1, 512);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_flint")).args(["hdl", "generate", "--model", tiny.to_str().unwrap(), "--prompt", "hi"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && err.contains("multiples of 32"), "{err}");
}

/// `flint hdl vectors --as-stored` writes the model's Q4_1 weights in the mesh's 5-word
/// format (type word 1 in meta.hex) and the layer contract's GEMV as the expected outputs:
/// decoding the words gives back the tensor's blocks, and their GEMV the expected bits.
#[test]
fn stored_q4_1_vectors_for_the_mesh() {
    let Some(path) = common::real_model("stored_q4_1_vectors_for_the_mesh") else { return };
    let dir = common::temp_dir("hdl-q41-vec");
    let flint = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_flint")).args(["hdl", "vectors", "--model", path.to_str().unwrap()]).args(args).output().unwrap();
    let o = flint(&["--tensor", "blk.2.attn_k.weight", "--as-stored", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let words = |name: &str| -> Vec<u32> { std::fs::read_to_string(dir.join(name)).unwrap().lines().map(|l| u32::from_str_radix(l, 16).unwrap()).collect() };
    let meta = words("meta.hex");
    assert_eq!((meta[0], meta[1], meta[4]), (192, 18, 1), "192 rows of 18 Q4_1 blocks");
    let blocks: Vec<WBlock> = words("weights.hex")
        .chunks_exact(5)
        .map(|c| {
            let mut qs = [0i8; 32];
            for (i, q) in qs.iter_mut().enumerate() {
                *q = ((c[i / 8] >> (4 * (i % 8))) & 15) as i8;
            }
            WBlock { d: c[4] as u16, m: (c[4] >> 16) as u16, qs }
        })
        .collect();
    let l = Loaded::open(&path).unwrap();
    let stored = WMatrix::from_tensor(&l.gguf, l.gguf.tensor("blk.2.attn_k.weight").unwrap()).unwrap();
    assert!(blocks == stored.blocks, "the words decode to the tensor's own blocks");
    let acts: Vec<Block> = words("acts.hex")
        .chunks_exact(9)
        .map(|c| {
            let mut qs = [0i8; 32];
            for (i, q) in qs.iter_mut().enumerate() {
                *q = (c[i / 4] >> (8 * (i % 4))) as u8 as i8;
            }
            Block { d: c[8] as u16, qs }
        })
        .collect();
    let y: Vec<u32> = gemv_w(&stored, &acts).unwrap().iter().map(|v| v.to_bits()).collect();
    assert_eq!(y, words("expected.hex"));
    let o = flint(&["--tensor", "blk.2.nope.weight", "--as-stored", "--out", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && err.contains("is not in") && !err.contains("panicked"), "{err}");
}
