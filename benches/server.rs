//! What the streaming front end costs on top of the engine, over loopback:
//!
//!     cargo bench --bench server        (FLINT_MODEL, else the model `flint pull` fetched;
//!                                        FLINT_BENCH_TINY=1: the tiny synthetic model)
//!
//! - per-token overhead: median interval between streamed tokens at a WebSocket client
//!   vs between the engine's own steps in process, alternating rounds in one run;
//! - time to first token at the client minus the engine's own (target < 1 ms);
//! - cancel latency: cancel sent to `done` received, against one decode step;
//! - load: N sessions generating at once: aggregate tok/s, per-session tok/s and the
//!   p50/p99 interval between a session's tokens.

#[path = "common.rs"]
mod common;

use flint::generate::{Engine, Request};
use flint::sampler::SamplerConfig;
use flint::server::{App, Options};
use flint::BackendKind;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const ROUNDS: usize = 7;
const TOKENS: usize = 128;
const PROMPT: &str = "def quicksort(items):\n    \"\"\"Sort a list with quicksort.\"\"\"\n";

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Intervals between the engine's steps, in process (the baseline).
fn in_process(e: &mut Engine, prompt: &[u32]) -> Vec<f64> {
    e.reset();
    let req = Request::new(prompt.to_vec(), TOKENS, SamplerConfig::greedy());
    let mut last: Option<Instant> = None;
    let mut gaps = Vec::new();
    for s in e.generate(req, None).unwrap() {
        if s.unwrap().token.is_some() {
            let now = Instant::now();
            if let Some(l) = last {
                gaps.push((now - l).as_secs_f64());
            }
            last = Some(now);
        }
    }
    gaps
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/v1/ws"), None, true).await.unwrap();
    recv(&mut ws).await;
    ws
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        if let Message::Text(s) = ws.next().await.unwrap().unwrap() {
            return serde_json::from_str(&s).unwrap();
        }
    }
}

struct Turn {
    /// Client-side: send to first token, and the intervals between tokens.
    ttft: f64,
    gaps: Vec<f64>,
    done: Value,
}

/// One generation over the WebSocket; with `cancel_after`, a cancel after that many tokens,
/// returning also the time from the cancel to `done`.
async fn turn(ws: &mut Ws, max_tokens: usize, cancel_after: Option<usize>) -> (Turn, Option<f64>) {
    // A fresh context each time, so every turn prefills the same prompt.
    ws.send(Message::text(json!({"type": "session.update", "reset": true}).to_string())).await.unwrap();
    recv(ws).await;
    let t0 = Instant::now();
    let req = json!({"type": "generate", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0});
    ws.send(Message::text(req.to_string())).await.unwrap();
    let (mut first, mut last, mut gaps, mut n, mut cancelled_at) = (None, None, Vec::new(), 0, None);
    loop {
        let v = recv(ws).await;
        let now = Instant::now();
        match v["type"].as_str().unwrap() {
            "delta" => {
                let k = v["tokens"].as_array().unwrap().len();
                if k == 0 {
                    continue;
                }
                first.get_or_insert(now - t0);
                if let Some(l) = last {
                    // Merged deltas (the client fell behind) count as k intervals.
                    let g: Duration = now - l;
                    gaps.extend(std::iter::repeat(g.as_secs_f64() / k as f64).take(k));
                }
                last = Some(now);
                n += k;
                if cancel_after == Some(n) {
                    ws.send(Message::text(json!({"type": "cancel"}).to_string())).await.unwrap();
                    cancelled_at = Some(Instant::now());
                }
            }
            "done" => {
                let cancel = cancelled_at.map(|c| (now - c).as_secs_f64());
                return (Turn { ttft: first.unwrap().as_secs_f64(), gaps, done: v }, cancel);
            }
            _ => panic!("{v}"),
        }
    }
}

fn main() {
    let Some((path, l)) = common::model("server") else { return };
    let base = l.engine(BackendKind::Cpu, 0).unwrap();
    let mut local = base.fork().unwrap();
    let prompt = l.tokenizer.encode(PROMPT, false).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let opts = Options { port: 0, parallel: 16, max_sessions: 64, ..Options::default() };
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let app = App::new(base, "bench".into(), opts, stop_rx).unwrap();
    let server = rt.spawn(app.run(listener));
    println!("model: {} ({} backend), {TOKENS} tokens, {ROUNDS} rounds", path.display(), local.fwd.backend_name());

    // Per-token overhead and TTFT, alternating in-process and WebSocket rounds.
    let (mut inproc, mut over_ws, mut ttft_gap, mut ttft_client) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ws = rt.block_on(connect(&addr));
    in_process(&mut local, &prompt); // warm-up
    rt.block_on(turn(&mut ws, TOKENS, None));
    for _ in 0..ROUNDS {
        inproc.push(median(&mut in_process(&mut local, &prompt)));
        let (t, _) = rt.block_on(turn(&mut ws, TOKENS, None));
        let mut g = t.gaps;
        over_ws.push(median(&mut g));
        let engine_ttft = t.done["timings"]["ttft_ms"].as_f64().unwrap() / 1e3;
        ttft_client.push(t.ttft);
        ttft_gap.push(t.ttft - engine_ttft);
    }
    let (a, b) = (median(&mut inproc), median(&mut over_ws));
    println!("per-token interval: in-process {:.3} ms, WebSocket {:.3} ms, overhead {:+.1} us/token ({:.2}x)", a * 1e3, b * 1e3, (b - a) * 1e6, b / a);
    println!(
        "time to first token: client {:.2} ms, minus the engine's own: {:.3} ms (target < 1 ms)",
        median(&mut ttft_client) * 1e3,
        median(&mut ttft_gap) * 1e3
    );

    // Cancel latency against one decode step.
    let mut cancel = Vec::new();
    for _ in 0..ROUNDS {
        let (t, c) = rt.block_on(turn(&mut ws, 100_000, Some(16)));
        assert_eq!(t.done["finish_reason"], "cancelled");
        cancel.push(c.unwrap());
    }
    let c = median(&mut cancel);
    println!("cancel latency: {:.3} ms = {:.2} decode steps (target <= 1)", c * 1e3, c / b);

    // Load.
    for n in [1usize, 2, 4, 8, 16] {
        let addr = addr.clone();
        let (wall, mut gaps, tokens) = rt.block_on(async move {
            let mut conns = Vec::new();
            for _ in 0..n {
                conns.push(connect(&addr).await);
            }
            let t0 = Instant::now();
            let runs: Vec<_> = conns.into_iter().map(|mut ws| tokio::spawn(async move { turn(&mut ws, 64, None).await.0 })).collect();
            let (mut gaps, mut tokens) = (Vec::new(), 0);
            for r in runs {
                let t = r.await.unwrap();
                tokens += t.done["usage"]["completion_tokens"].as_u64().unwrap() as usize;
                gaps.extend(t.gaps);
            }
            (t0.elapsed().as_secs_f64(), gaps, tokens)
        });
        println!(
            "load: {n:>2} sessions: {:>7.1} tok/s in all, {:>6.1} per session; token interval p50 {:.2} ms, p99 {:.2} ms",
            tokens as f64 / wall,
            tokens as f64 / wall / n as f64,
            pct(&mut gaps, 0.5) * 1e3,
            pct(&mut gaps, 0.99) * 1e3
        );
    }
    let _ = stop_tx.send(true);
    drop(ws);
    rt.block_on(server).unwrap().unwrap();
}
