//! The real default model (SmolLM2-135M-Instruct Q4_1): tokenizer and greedy decoding.
//! Skips, saying so, where the model is absent; CI sets FLINT_REQUIRE_MODEL so it runs there.

mod common;

use common::real_model;
use flint::generate::Request;
use flint::sampler::SamplerConfig;
use flint::tokenizer::Message;
use flint::{BackendKind, Loaded};

fn load(test: &str) -> Option<Loaded> {
    real_model(test).map(|p| Loaded::open(&p).unwrap())
}

#[test]
fn tokenizer_known_ids() {
    let Some(l) = load("tokenizer_known_ids") else { return };
    let t = &l.tokenizer;
    assert_eq!(t.encode("def fibonacci(n):", false).unwrap(), [1604, 3987, 46477, 24, 94, 727]);
    // The smollm pre-tokenizer splits digits one by one.
    let digits = t.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5);
    assert_eq!(t.decode(&digits[..1], false), "1");
    // Special tokens only when asked.
    assert_eq!(t.encode("<|im_start|>", true).unwrap(), [1]);
    assert!(t.encode("<|im_start|>", false).unwrap().len() > 1);
    assert_eq!((t.bos, t.eos, t.add_bos), (Some(1), Some(2), false));
    assert!(t.is_eog(2) && t.is_eog(0));
}

/// Checked against llama.cpp's tokenizer for this model when written (all 60 cases of this
/// list, with and without special-token parsing, agreed), here as exact round trips.
#[test]
fn tokenizer_round_trips_awkward_text() {
    let Some(l) = load("tokenizer_round_trips_awkward_text") else { return };
    let t = &l.tokenizer;
    for s in [
        "héllo wörld ñandú", "🦀 Rust 🚀🔥 emoji👍🏽", "    indented\n\tTabbed\r\nCRLF  ", "a  b   c    d", "   ",
        "\n\n\n", "don't I'll we've THEY'RE", "日本語のテキスト、中文文本", "🇫🇷🇩🇪", "\u{200b} zero width", "a\u{301} combining",
        "مرحبا بالعالم", "0x1F 3.14159 1e-10", "<|im_end|> as text",
    ] {
        let ids = t.encode(s, false).unwrap();
        assert_eq!(t.decode(&ids, false), s, "{s:?} -> {ids:?}");
    }
    assert_eq!(t.encode("", false).unwrap(), Vec::<u32>::new());
}

#[test]
fn chat_template_is_chatml_with_default_system() {
    let Some(l) = load("chat_template_is_chatml_with_default_system") else { return };
    let t = &l.tokenizer;
    let ids = t.chat_tokens(&[Message::new("user", "Hi")]).unwrap();
    let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(ids, t.encode(want, true).unwrap());
    // A system message replaces the default one; special tokens in content stay text.
    let ids = t.chat_tokens(&[Message::new("system", "S"), Message::new("user", "<|im_end|>")]).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2, "only the template's <|im_end|> tokens");
    assert!(!t.decode(&ids, true).contains("SmolLM"));
}

const PROMPTS: [&str; 3] = ["Write a Python function that checks whether a number is prime.", "List three colors.", "Explain recursion in one sentence."];

fn greedy(l: &Loaded, kind: BackendKind, prompt: &str, n: usize) -> (Vec<u32>, Vec<u32>) {
    let p = l.tokenizer.chat_tokens(&[Message::new("user", prompt)]).unwrap();
    let mut e = l.engine(kind, p.len() + n).unwrap();
    let o = e.generate(Request::new(p.clone(), n, SamplerConfig::greedy()), None).unwrap().finish().unwrap();
    (p, o.tokens)
}

/// The fast path's greedy tokens equal the exact reference's on the test prompts, and its
/// logits stay within the bound that 8-bit activation rounding explains.
#[test]
fn fast_and_exact_backends_agree() {
    let Some(l) = load("fast_and_exact_backends_agree") else { return };
    for p in PROMPTS {
        let (_, exact) = greedy(&l, BackendKind::CpuRef, p, 8);
        let (_, fast) = greedy(&l, BackendKind::Cpu, p, 8);
        assert_eq!(fast, exact, "{p:?}");
    }
    let toks = l.tokenizer.encode("fn main() { println!(\"hello\"); }", false).unwrap();
    let a = l.runner(BackendKind::CpuRef, 32).unwrap().forward(&toks, 0, true).unwrap();
    let b = l.runner(BackendKind::Cpu, 32).unwrap().forward(&toks, 0, true).unwrap();
    let e: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
    eprintln!("real model, fast vs exact logits NMSE {e:.2e}");
    // 30 layers of 8-bit activation rounding (one ~0.4% error per value per matmul).
    assert!(e < 5e-3, "NMSE {e}");
}

/// Greedy tokens of the exact backend against tests/reference.py: numpy, float64, weights
/// dequantized by the `gguf` package. Needs python3 with numpy and gguf (FLINT_REQUIRE_PY in CI).
#[test]
fn exact_backend_matches_numpy_reference() {
    let Some(path) = real_model("exact_backend_matches_numpy_reference") else { return };
    if !common::python_refs("exact_backend_matches_numpy_reference") {
        return;
    }
    let l = Loaded::open(&path).unwrap();
    let n = 8;
    let runs: Vec<(Vec<u32>, Vec<u32>)> = PROMPTS.iter().map(|p| greedy(&l, BackendKind::CpuRef, p, n)).collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/reference.py");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(script).arg(&path).args(["--n", &n.to_string()]);
    for (p, _) in &runs {
        cmd.arg("--tokens").arg(p.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","));
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "reference.py: {}", String::from_utf8_lossy(&o.stderr));
    let refs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for (i, (p, got)) in runs.iter().enumerate() {
        let want: Vec<u32> = refs[i]["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(got, &want, "prompt {}", PROMPTS[i]);
        // Logits after the prompt: f32 against f64 over 30 layers.
        let rl: Vec<f32> = refs[i]["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let fl = l.runner(BackendKind::CpuRef, p.len()).unwrap().forward(p, 0, false).unwrap();
        common::assert_close("logits vs numpy", &fl, &rl, 2e-3, 2e-3);
    }
}

#[test]
fn generates_sensible_code() {
    let Some(l) = load("generates_sensible_code") else { return };
    let p = l.tokenizer.chat_tokens(&[Message::new("user", "Write a Python function that returns the nth Fibonacci number.")]).unwrap();
    let mut e = l.engine(BackendKind::Cpu, 256).unwrap();
    let o = e.generate(Request::new(p, 48, SamplerConfig::greedy()), None).unwrap().finish().unwrap();
    assert!(o.text.contains("def fibonacci(n)"), "{:?}", o.text);
}

/// Speculative decoding on the real model: the same greedy tokens as plain decoding with
/// every draft source (a draft model equal to the target accepts everything).
#[test]
fn speculative_greedy_output_is_identical() {
    let Some(l) = load("speculative_greedy_output_is_identical") else { return };
    use flint::speculative::SpecConfig;
    let file = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n";
    let ask = format!("Rename the parameter w to width in this code and output the whole file:\n{file}");
    let prompt = l.tokenizer.chat_tokens(&[Message::new("user", &ask)]).unwrap();
    let mut e = l.engine(BackendKind::Cpu, 512).unwrap();
    let n = 48;
    let plain = e.generate(Request::new(prompt.clone(), n, SamplerConfig::greedy()), None).unwrap().finish().unwrap();
    e.set_draft_model(l.runner(BackendKind::Cpu, 512).unwrap()).unwrap();
    for (name, spec) in [
        ("ngram", SpecConfig::ngram()),
        ("prediction", SpecConfig::prediction(l.tokenizer.encode(file, false).unwrap())),
        ("draft", SpecConfig::model()),
    ] {
        e.reset();
        let mut r = Request::new(prompt.clone(), n, SamplerConfig::greedy());
        r.speculative = Some(spec);
        let o = e.generate(r, None).unwrap().finish().unwrap();
        assert_eq!(o.tokens, plain.tokens, "{name}");
        eprintln!("{name}: {} forward passes for {} tokens, {}/{} accepted", o.timings.forward_passes, o.tokens.len(), o.timings.accepted, o.timings.drafted);
        if name == "draft" {
            assert_eq!(o.timings.accepted, o.timings.drafted);
        }
    }
}
