//! The `flint` binary end to end: commands, JSON output, and bad input.

mod common;

use common::{temp_dir, tiny_model};
use flint::quant::GgmlType;
use std::process::{Command, Output};

fn flint(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flint")).args(args).env("FLINT_HOME", temp_dir("home")).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A failure: exit code 1 and one line on stderr that says what is wrong, never a panic.
fn fails_with(args: &[&str], needle: &str) {
    let o = flint(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line, got {err:?}");
    assert!(err.starts_with("flint: error:") && err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

#[test]
fn generate_json_has_the_documented_fields() {
    let m = tiny_model(GgmlType::Q4_1, 512);
    let o = flint(&["generate", "--model", m.to_str().unwrap(), "--prompt", "hello there", "--max-tokens", "12", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["prompt_tokens"].as_array().unwrap().len() > 3);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 12);
    assert!(v["text"].is_string());
    assert_eq!(v["finish_reason"], "length");
    for k in ["prompt_ms", "ttft_ms", "decode_tok_s", "forward_passes", "drafted", "accepted"] {
        assert!(v["timings"][k].is_number(), "timings.{k}");
    }
    // --raw: no template, no BOS.
    let o = flint(&["generate", "--model", m.to_str().unwrap(), "--prompt", "hello", "--raw", "--max-tokens", "2", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let tok: serde_json::Value = serde_json::from_str(&stdout(&flint(&["tokenize", "--model", m.to_str().unwrap(), "hello"]))).unwrap();
    assert_eq!(v["prompt_tokens"], tok);
    assert_ne!(v["prompt_tokens"][0], 1, "no BOS");
}

#[test]
fn streaming_output_is_the_text() {
    let m = tiny_model(GgmlType::Q8_0, 512);
    let a = flint(&["generate", "--model", m.to_str().unwrap(), "--prompt", "abc", "--max-tokens", "20"]);
    let b = flint(&["generate", "--model", m.to_str().unwrap(), "--prompt", "abc", "--max-tokens", "20", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&b)).unwrap();
    assert_eq!(stdout(&a), format!("{}\n", v["text"].as_str().unwrap()));
    assert!(String::from_utf8_lossy(&a.stderr).contains("tok/s"));
}

#[test]
fn tokenize_info_synth_bench() {
    let m = tiny_model(GgmlType::Q4_1, 512);
    let ms = m.to_str().unwrap();
    let o = flint(&["tokenize", "--model", ms, "ab ab"]);
    let ids: Vec<u32> = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(!ids.is_empty());
    let o = flint(&["tokenize", "--model", ms, "--special", "<|im_start|>"]);
    assert_eq!(stdout(&o).trim(), "[1]");
    let o = flint(&["info", ms]);
    let s = stdout(&o);
    assert!(s.contains("llama.block_count") && s.contains("blk.0.attn_q.weight") && s.contains("Q4_1"), "{s}");
    let out = temp_dir("synth").join("s.gguf");
    let o = flint(&["synth", "--preset", "tiny", "--type", "q8_0", "--context", "131072", "--seed", "3", "--out", out.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).lines().last().unwrap(), out.to_str().unwrap());
    let s = stdout(&flint(&["info", out.to_str().unwrap()]));
    assert!(s.contains("131072") && s.contains("Q8_0"));
    let o = flint(&["bench", "--model", ms, "-p", "16", "-n", "4", "--reps", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let tests: Vec<&str> = v["results"].as_array().unwrap().iter().map(|r| r["test"].as_str().unwrap()).collect();
    assert_eq!(tests, ["pp16", "ttft p16", "tg4"]);
    assert!(v["start_to_first_token_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_model_files_are_one_line_errors() {
    let d = temp_dir("bad");
    let good = std::fs::read(tiny_model(GgmlType::Q4_1, 512)).unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, b).unwrap();
        p.to_str().unwrap().to_string()
    };
    let cases = [
        (d.join("missing.gguf").to_str().unwrap().to_string(), "cannot open"),
        (write("empty.gguf", b""), "empty"),
        (write("text.gguf", b"this is not a model at all"), "bad magic"),
        (write("trunc.gguf", &good[..good.len() / 2]), "outside the file"),
        (write("header.gguf", &good[..100]), "more than the file can hold"),
    ];
    for (path, needle) in &cases {
        fails_with(&["generate", "--model", path, "--prompt", "x"], needle);
        fails_with(&["info", path], needle);
    }
    let mut v = good.clone();
    v[4] = 9;
    let p = write("version.gguf", &v);
    fails_with(&["tokenize", "--model", &p, "x"], "unsupported GGUF version 9");
}

#[test]
fn bad_requests_are_one_line_errors() {
    let m = tiny_model(GgmlType::Q4_1, 512);
    let ms = m.to_str().unwrap();
    fails_with(&["generate", "--model", ms, "--prompt", "", "--raw"], "prompt is empty");
    let long = "ab ".repeat(600);
    fails_with(&["generate", "--model", ms, "--prompt", &long, "--raw"], "context is 512");
    fails_with(&["generate", "--model", ms, "--prompt", "x", "--top-p", "0"], "top_p");
    if !flint::backend::cuda::driver_available() {
        fails_with(&["generate", "--model", ms, "--prompt", "x", "--backend", "cuda"], "cuda backend needs an NVIDIA GPU");
    }
    fails_with(&["synth", "--preset", "huge", "--out", "/tmp/x.gguf"], "unknown preset");
    // No --model and nothing pulled.
    fails_with(&["generate", "--prompt", "x"], "flint pull");
    // Usage errors are clap's: exit code 2.
    assert_eq!(flint(&["generate", "--model", ms]).status.code(), Some(2));
    assert_eq!(flint(&["generate", "--model", ms, "--prompt", "x", "--backend", "tpu"]).status.code(), Some(2));
}

/// `flint pull` with the model already in place: verifies it and prints its path last.
#[test]
fn pull_is_idempotent() {
    let Some(path) = common::real_model("pull_is_idempotent") else { return };
    let dir = path.parent().unwrap();
    let o = flint(&["pull", "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o).lines().last().unwrap(), path.to_str().unwrap());
    assert!(String::from_utf8_lossy(&o.stderr).contains("verified"));
}

#[test]
fn speculative_flags() {
    let m = tiny_model(GgmlType::Q4_1, 512);
    let ms = m.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", ms, "--prompt", "ab ab ab ab ab", "--max-tokens", "24", "--json"];
        args.extend_from_slice(extra);
        let o = flint(&args);
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()
    };
    let plain = run(&[]);
    assert_eq!(plain["timings"]["forward_passes"], 24);
    // The prediction: the answer itself (the first token is never drafted after, so a
    // prediction that misses from the start is never drafted from).
    let pred = temp_dir("pred").join("p.txt");
    std::fs::write(&pred, plain["text"].as_str().unwrap()).unwrap();
    let p = pred.to_str().unwrap();
    for extra in [&["--speculative", "ngram", "--ngram-min", "1"][..], &["--speculative", "prediction", "--prediction-file", p], &["--speculative", "draft", "--draft", ms, "--draft-len", "3"]] {
        let v = run(extra);
        assert_eq!(v["tokens"], plain["tokens"], "{extra:?}");
        assert!(v["timings"]["drafted"].as_u64().unwrap() > 0, "{extra:?}: {v}");
        assert!(v["timings"]["accepted"].as_u64().unwrap() <= v["timings"]["drafted"].as_u64().unwrap());
    }
    fails_with(&["generate", "--model", ms, "--prompt", "x", "--speculative", "prediction"], "--prediction-file");
    fails_with(&["generate", "--model", ms, "--prompt", "x", "--speculative", "draft"], "--draft");
    fails_with(&["generate", "--model", ms, "--prompt", "x", "--speculative", "ngram", "--draft-len", "0"], "--draft-len");
    fails_with(&["generate", "--model", ms, "--prompt", "x", "--speculative", "prediction", "--prediction-file", "/nonexistent"], "cannot read");
}

/// `flint generate --backend cuda` on the CUDA simulator (FLINT_CUDA_SIM=1): the whole CUDA
/// path through the CLI, greedy output equal to the CPU reference's; and without the
/// simulator's libraries, a one-line reason.
#[test]
fn generate_on_the_cuda_simulator() {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_flint"));
    if !exe.with_file_name("libflint_cudasim.so").is_file() {
        assert!(std::env::var_os("FLINT_REQUIRE_CUDA").is_none(), "the CUDA simulator's libraries are required (FLINT_REQUIRE_CUDA)");
        eprintln!("SKIPPED generate_on_the_cuda_simulator: the simulator's libraries are not next to flint (cargo build --release)");
        return;
    }
    let m = tiny_model(GgmlType::Q4_1, 512);
    let run = |backend: &str| {
        // The default FLINT_HOME: the simulator's compiled units are cached there.
        let o = Command::new(exe)
            .args(["generate", "--model", m.to_str().unwrap(), "--prompt", "hello there", "--max-tokens", "6", "--json", "--backend", backend])
            .env("FLINT_CUDA_SIM", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{backend}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["tokens"].clone()
    };
    assert_eq!(run("cuda"), run("cpu-ref"));
    let o = Command::new(exe)
        .args(["generate", "--model", m.to_str().unwrap(), "--prompt", "hi", "--backend", "cuda"])
        .env("FLINT_CUDA_SIM", "1")
        .env("FLINT_CUDA_SIM_LIB", temp_dir("no-sim"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("libflint_cudasim.so is not in FLINT_CUDA_SIM_LIB") && !err.contains("panicked"), "{err}");
}
