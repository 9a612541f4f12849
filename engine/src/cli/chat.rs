//! `flint chat` in the terminal, on a model of its own (`--connect` uses a server instead).

use super::{model_path, out, report_timings, stream, ModelArgs, SamplingArgs};
use flint::generate::Request;
use anyhow::{Context, Result};
use flint::tokenizer::Message;
use flint::Loaded;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub fn chat(m: ModelArgs, s: SamplingArgs, system: Option<String>, max_tokens: usize) -> Result<()> {
    let l = Loaded::open(&model_path(&m.model)?)?;
    let mut engine = l.engine_on(m.backend, 4096.min(l.config.n_ctx), m.adapter.as_deref())?;
    let generating = Arc::new(AtomicBool::new(false));
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let (g, c) = (generating.clone(), cancel.clone());
        ctrlc::set_handler(move || {
            if g.load(Ordering::SeqCst) {
                c.store(true, Ordering::SeqCst);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let mut history: Vec<Message> = system.iter().map(|s| Message::new("system", s)).collect();
    eprintln!("flint chat ({}): type a message; /reset clears the history; Ctrl-C stops an answer; Ctrl-D quits.", engine.fwd.backend_name());
    let stdin = std::io::stdin();
    loop {
        out("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            out("\n");
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        if line.trim() == "/reset" {
            history.truncate(system.is_some() as usize);
            engine.reset();
            continue;
        }
        history.push(Message::new("user", line));
        let prompt = l.tokenizer.chat_tokens(&history)?;
        let mut req = Request::new(prompt, max_tokens, s.config());
        req.stop = s.stop.clone();
        cancel.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let result = stream(&mut engine, req, cancel.clone(), true);
        generating.store(false, Ordering::SeqCst);
        match result {
            Ok(o) => {
                out("\n");
                report_timings(&o);
                history.push(Message::new("assistant", &o.text));
            }
            Err(e) => {
                eprintln!("flint: error: {e:#}");
                history.pop();
            }
        }
    }
}
