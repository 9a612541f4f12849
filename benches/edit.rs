//! The code-edit workload for speculative decoding: the default model is asked to change a
//! 140-150 line source file (rename, fix a bug, add a parameter) and to print the whole file;
//! the original file is the prediction (or the prompt-lookup source). Plus a prompt where
//! nothing matches, to show what speculation costs when it cannot help.
//!
//!     cargo bench --bench edit            (FLINT_MODEL, else the model `flint pull` fetched)
//!
//! Each task runs in two prompt formats: `chat` (the file in a user message; the model tends to
//! explain instead of rewriting) and `edit` (`flint::edit`, what `flint edit`, the server's
//! edit turns and the VS Code extension send: the assistant turn opened with the code fence,
//! the closing fence as the stop string, the original code and fence as the prediction).
//! For each task, format and mode: tokens, forward passes per token, accepted/drafted, decode
//! tok/s (after the prompt's prefill; median of ROUNDS rounds in which the modes alternate), and
//! the speed-up over plain decoding measured in the same run. Every mode's output is checked
//! to equal plain decoding's.

use flint::edit::Edit;
use flint::generate::{Engine, Outcome, Request};
use flint::sampler::SamplerConfig;
use flint::speculative::SpecConfig;
use flint::tokenizer::Message;
use flint::{BackendKind, Loaded};
use std::time::Instant;

const MAX_TOKENS: usize = 384;
const ROUNDS: usize = 3;

struct Task {
    name: &'static str,
    file: &'static str,
    ask: &'static str,
}

const TASKS: &[Task] = &[
    Task { name: "copy (py)", file: include_str!("edit/inventory.py"), ask: "Output the following file exactly as it is, with no comment." },
    Task { name: "rename (py)", file: include_str!("edit/inventory.py"), ask: "Rename the method `restock` to `replenish`. Output the complete updated file." },
    Task { name: "fix bug (py)", file: include_str!("edit/inventory.py"), ask: "Fix the bug: `ship_order` must raise InventoryError when the order was already shipped. Output the complete updated file." },
    Task { name: "add param (rs)", file: include_str!("edit/lexer.rs"), ask: "Add a parameter `allow_comments: bool` to `Lexer::new`, store it in the struct, and only skip `#` comments when it is true. Output the complete updated file." },
    Task { name: "no match", file: "", ask: "Write a short story about a dragon who learns to cook." },
];

fn timed(e: &mut Engine, prompt: &[u32], stop: &[String], spec: Option<SpecConfig>) -> (Outcome, f64) {
    e.reset();
    let mut r = Request::new(prompt.to_vec(), MAX_TOKENS, SamplerConfig::greedy());
    r.speculative = spec;
    r.stop = stop.to_vec();
    let t = Instant::now();
    let o = e.generate(r, None).unwrap().finish().unwrap();
    // Decode time: everything after the prompt's prefill.
    let secs = t.elapsed().as_secs_f64() - o.timings.prompt_ms / 1e3;
    (o, secs)
}

fn main() {
    let path = std::env::var_os("FLINT_MODEL").map(std::path::PathBuf::from).unwrap_or_else(flint::pull::default_model_path);
    let l = match Loaded::open(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED edit benchmark: {e:#} (run `flint pull` or set FLINT_MODEL)");
            return;
        }
    };
    let backend = match std::env::var("FLINT_BACKEND").as_deref() {
        Ok(b) => b.parse().unwrap(),
        Err(_) => BackendKind::Cpu,
    };
    let mut e = l.engine(backend, 4096).unwrap();
    println!("edit workload on {} ({}), greedy, up to {MAX_TOKENS} tokens", path.display(), e.fwd.backend_name());
    println!("| task           | format | mode       | tokens | passes/token | accepted/drafted | tok/s  | speed-up |");
    let formats: &[&str] = if std::env::var_os("FLINT_EDIT_FORMAT_ONLY").is_some() { &["edit"] } else { &["chat", "edit"] };
    for (task, format) in TASKS.iter().flat_map(|t| formats.iter().map(move |f| (t, *f))) {
        if task.file.is_empty() && format == "edit" {
            continue;
        }
        let (prompt, pred, stop) = if format == "edit" {
            let e = Edit { code: task.file.into(), instruction: task.ask.replace(" Output the complete updated file.", ""), language: if task.name.contains("(rs)") { "rust" } else { "python" }.into() };
            let r = e.request(&l.tokenizer, e.prompt(&l.tokenizer).unwrap(), MAX_TOKENS, SamplerConfig::greedy()).unwrap();
            (r.prompt, r.speculative, r.stop)
        } else {
            let content = if task.file.is_empty() { task.ask.to_string() } else { format!("{}\n\n```\n{}```", task.ask, task.file) };
            let prompt = l.tokenizer.chat_tokens(&[Message::new("user", &content)]).unwrap();
            (prompt, Some(SpecConfig::prediction(l.tokenizer.encode(task.file, false).unwrap())), Vec::new())
        };
        let mut modes = vec![("plain", None), ("ngram", Some(SpecConfig::ngram()))];
        if !task.file.is_empty() {
            modes.push(("prediction", pred));
        }
        let mut runs: Vec<(Option<Outcome>, Vec<f64>)> = modes.iter().map(|_| (None, Vec::new())).collect();
        for _ in 0..ROUNDS {
            for (i, (_, spec)) in modes.iter().enumerate() {
                let (o, secs) = timed(&mut e, &prompt, &stop, spec.clone());
                runs[i].1.push(o.tokens.len() as f64 / secs);
                runs[i].0 = Some(o);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let plain_rate = median(&mut runs[0].1.clone());
        let plain_tokens = runs[0].0.as_ref().unwrap().tokens.clone();
        for ((mode, _), (o, rates)) in modes.iter().zip(runs.iter_mut()) {
            let o = o.as_ref().unwrap();
            assert_eq!(o.tokens, plain_tokens, "{} / {mode}: output differs from plain decoding", task.name);
            let t = &o.timings;
            let rate = median(rates);
            println!(
                "| {:<14} | {format:<6} | {:<10} | {:>6} | {:>12.3} | {:>16} | {:>6.1} | {:>7.2}x |",
                task.name, mode, o.tokens.len(), t.forward_passes as f64 / o.tokens.len() as f64,
                format!("{}/{}", t.accepted, t.drafted), rate, rate / plain_rate
            );
        }
    }
}
