//! The Responses API's persistent socket against resending the conversation, over loopback:
//!
//!     cargo bench --bench responses     (FLINT_MODEL, else the model `flint pull` fetched)
//!
//! - a 20-turn conversation, each turn a short new input and a short answer: per-turn time
//!   to first token in WebSocket mode (`response.create` with `previous_response_id` and only
//!   the new input) against `POST /v1/responses` streamed, resending the whole history each
//!   turn (as a stateless client does, e.g. Codex over HTTP), the two conversations alternated
//!   turn by turn in one run;
//! - the server's overhead on time to first token: the client's minus the engine's own;
//! - steer to first token: from `response.steer` to the successor's first delta.

use flint::server::{App, Options};
use flint::Loaded;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

const TURNS: usize = 20;
const ANSWER: usize = 16;
const STEERS: usize = 7;
/// Conversations at once in the contended round: more than the HTTP pool's caches
/// (`--parallel`, 8).
const CONVERSATIONS: usize = 12;
const CONTENDED_TURNS: usize = 4;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn question(i: usize) -> String {
    format!("Question {i}: what does line {i} of the parser do? Answer briefly.")
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        if let Message::Text(s) = ws.next().await.unwrap().unwrap() {
            return serde_json::from_str(&s).unwrap();
        }
    }
}

/// One response over the socket: (client TTFT, the final response).
async fn ws_turn(ws: &mut Ws, create: Value) -> (f64, Value) {
    let t0 = Instant::now();
    ws.send(Message::text(create.to_string())).await.unwrap();
    let mut first = None;
    loop {
        let v = recv(ws).await;
        match v["type"].as_str().unwrap() {
            "response.output_text.delta" => {
                first.get_or_insert(t0.elapsed().as_secs_f64());
            }
            "response.completed" | "response.incomplete" => return (first.unwrap_or(f64::NAN), v["response"].clone()),
            "error" | "response.failed" => panic!("{v}"),
            _ => {}
        }
    }
}

/// One streamed `POST /v1/responses`: (client TTFT, the final response).
async fn http_turn(addr: &str, body: Value) -> (f64, Value) {
    let body = body.to_string();
    let t0 = Instant::now();
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let head = format!("POST /v1/responses HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(body.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(c).lines();
    let mut first = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        let Some(data) = line.strip_prefix("data: ") else { continue };
        let v: Value = serde_json::from_str(data).unwrap();
        match v["type"].as_str().unwrap_or_default() {
            "response.output_text.delta" => {
                first.get_or_insert(t0.elapsed().as_secs_f64());
            }
            "response.completed" | "response.incomplete" => return (first.unwrap_or(f64::NAN), v["response"].clone()),
            _ => {}
        }
    }
    panic!("the stream ended without a final event")
}

fn engine_ttft(r: &Value) -> f64 {
    r["timings"]["ttft_ms"].as_f64().unwrap() / 1e3
}

fn main() {
    let path = std::env::var_os("FLINT_MODEL").map(std::path::PathBuf::from).unwrap_or_else(flint::pull::default_model_path);
    let l = match Loaded::open(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED responses benchmark: {e:#} (run `flint pull` or set FLINT_MODEL)");
            return;
        }
    };
    let base = l.engine(flint::BackendKind::Cpu, 0).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let app = App::new(base, "bench".into(), Options { port: 0, ..Options::default() }, stop_rx).unwrap();
    rt.spawn(app.run(listener));
    println!("model: {} (cpu), {TURNS} turns of {ANSWER}-token answers", path.display());

    rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/responses")).await.unwrap();
        let system = "You are a helpful coding assistant. The user is reading a parser written in Rust.";
        let (mut prev, mut history): (Option<String>, Vec<Value>) = (None, vec![json!({"role": "developer", "content": system})]);
        let (mut ws_ttft, mut http_ttft, mut overhead, mut cached) = (Vec::new(), Vec::new(), Vec::new(), (0, 0));
        println!("turn  ws_ttft_ms  http_ttft_ms  ws_cached/input  http_cached/input");
        for i in 0..TURNS {
            let user = json!({"role": "user", "content": question(i)});
            // WebSocket mode: only the new input.
            let mut create = json!({"type": "response.create", "input": [user], "instructions": system, "max_output_tokens": ANSWER, "temperature": 0});
            if let Some(p) = &prev {
                create["previous_response_id"] = json!(p);
            }
            let (t_ws, r_ws) = ws_turn(&mut ws, create).await;
            prev = r_ws["id"].as_str().map(str::to_string);
            // HTTP: the whole history again, as a stateless client sends it.
            history.push(user);
            let (t_http, r_http) = http_turn(&addr, json!({"input": history, "max_output_tokens": ANSWER, "temperature": 0, "stream": true, "store": false})).await;
            history.push(json!({"role": "assistant", "content": r_http["output_text"]}));
            let (u_ws, u_http) = (&r_ws["usage"], &r_http["usage"]);
            println!(
                "{i:>4}  {:>10.1}  {:>12.1}  {:>7}/{:<7}  {:>7}/{:<7}",
                t_ws * 1e3,
                t_http * 1e3,
                u_ws["input_tokens_details"]["cached_tokens"],
                u_ws["input_tokens"],
                u_http["input_tokens_details"]["cached_tokens"],
                u_http["input_tokens"]
            );
            ws_ttft.push(t_ws);
            http_ttft.push(t_http);
            overhead.push(t_ws - engine_ttft(&r_ws));
            cached.0 += u_ws["input_tokens_details"]["cached_tokens"].as_u64().unwrap();
            cached.1 += u_http["input_tokens_details"]["cached_tokens"].as_u64().unwrap();
        }
        let (mw, mh) = (median(&ws_ttft), median(&http_ttft));
        println!("time to first token, median of {TURNS} turns: WebSocket mode {:.1} ms, HTTP resending the history {:.1} ms ({:.2}x)", mw * 1e3, mh * 1e3, mh / mw);
        println!("last turn: WebSocket mode {:.1} ms, HTTP {:.1} ms", ws_ttft[TURNS - 1] * 1e3, http_ttft[TURNS - 1] * 1e3);
        println!("server overhead on time to first token (client minus engine), median: {:.2} ms", median(&overhead) * 1e3);

        // Steer to the successor's first token.
        let mut steer = Vec::new();
        for _ in 0..STEERS {
            let create = json!({"type": "response.create", "input": "Count from 1 to 500, one number a line.", "max_output_tokens": 400, "temperature": 0});
            ws.send(Message::text(create.to_string())).await.unwrap();
            let (mut id, mut deltas, mut sent, mut steered, mut measured) = (String::new(), 0, None::<Instant>, false, false);
            loop {
                let v = recv(&mut ws).await;
                match v["type"].as_str().unwrap() {
                    "response.created" if id.is_empty() => id = v["response"]["id"].as_str().unwrap().to_string(),
                    "response.output_text.delta" if !steered => {
                        deltas += 1;
                        if deltas == 8 && sent.is_none() {
                            let s = json!({"type": "response.steer", "previous_response_id": id, "input": "Stop. Say done."});
                            ws.send(Message::text(s.to_string())).await.unwrap();
                            sent = Some(Instant::now());
                        }
                    }
                    "response.incomplete" if !steered => steered = true,
                    "response.output_text.delta" if !measured => {
                        steer.push(sent.unwrap().elapsed().as_secs_f64());
                        measured = true;
                    }
                    "response.completed" | "response.incomplete" => break,
                    "error" | "response.failed" | "response.steer.failed" => panic!("{v}"),
                    _ => {}
                }
            }
        }
        println!("steer to the successor's first token, median of {STEERS}: {:.1} ms", median(&steer) * 1e3);
        println!("cached prompt tokens over the conversation: WebSocket mode {}, HTTP {}", cached.0, cached.1);

        // Contended: more conversations than the HTTP pool has caches, taking turns.
        let mut sockets = Vec::new();
        for _ in 0..CONVERSATIONS {
            sockets.push(tokio_tungstenite::connect_async(format!("ws://{addr}/v1/responses")).await.unwrap().0);
        }
        let mut prevs: Vec<Option<String>> = vec![None; CONVERSATIONS];
        let mut histories: Vec<Vec<Value>> = vec![vec![json!({"role": "developer", "content": system})]; CONVERSATIONS];
        let (mut ws_t, mut http_t, mut ws_c, mut http_c) = (Vec::new(), Vec::new(), (0, 0), (0, 0));
        for turn in 0..CONTENDED_TURNS {
            for c in 0..CONVERSATIONS {
                let user = json!({"role": "user", "content": format!("Conversation {c}: {}", question(turn))});
                let mut create = json!({"type": "response.create", "input": [user], "instructions": system, "max_output_tokens": ANSWER, "temperature": 0});
                if let Some(p) = &prevs[c] {
                    create["previous_response_id"] = json!(p);
                }
                let (t, r) = ws_turn(&mut sockets[c], create).await;
                prevs[c] = r["id"].as_str().map(str::to_string);
                histories[c].push(user);
                let (th, rh) = http_turn(&addr, json!({"input": histories[c], "max_output_tokens": ANSWER, "temperature": 0, "stream": true, "store": false})).await;
                histories[c].push(json!({"role": "assistant", "content": rh["output_text"]}));
                if turn > 0 {
                    ws_t.push(t);
                    http_t.push(th);
                    let u = |r: &Value, k: &str| r["usage"][k].as_u64().unwrap_or(0);
                    ws_c = (ws_c.0 + r["usage"]["input_tokens_details"]["cached_tokens"].as_u64().unwrap(), ws_c.1 + u(&r, "input_tokens"));
                    http_c = (http_c.0 + rh["usage"]["input_tokens_details"]["cached_tokens"].as_u64().unwrap(), http_c.1 + u(&rh, "input_tokens"));
                }
            }
        }
        let (mw, mh) = (median(&ws_t), median(&http_t));
        println!(
            "{CONVERSATIONS} conversations taking turns (turns 2-{CONTENDED_TURNS}): time to first token, median: WebSocket mode {:.1} ms, HTTP {:.1} ms ({:.2}x); prompt tokens cached: {}/{} and {}/{}",
            mw * 1e3, mh * 1e3, mh / mw, ws_c.0, ws_c.1, http_c.0, http_c.1
        );
    });
}
