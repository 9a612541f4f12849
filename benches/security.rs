//! What the security checks cost a request, side by side in one run:
//!
//!     cargo bench --bench security      (FLINT_MODEL, else the model `flint pull` fetched;
//!                                        FLINT_BENCH_TINY=1: the tiny synthetic model)
//!
//! Two in-process servers on loopback, one open and one with 64 API keys (the key sent is the
//! last one), per-key rate and parallel limits, and an `Origin` on every request (the
//! server's own). Requests alternate between the two, one by one (so drift in the machine's
//! speed falls on both alike), measuring the median latency of `GET /v1/models` over a
//! keep-alive connection (the checks and nothing else), of a WebSocket handshake, and the
//! time to first token of a one-token chat completion.

#[path = "common.rs"]
mod common;

use flint::server::guard::{keys::Limits, Settings};
use flint::server::{App, Options};
use flint::BackendKind;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

const GETS: usize = 5000;
const HANDSHAKES: usize = 400;
const CHATS: usize = 30;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One request on a keep-alive connection; the seconds it took.
fn exchange(r: &mut BufReader<TcpStream>, req: &str) -> f64 {
    let t = Instant::now();
    r.get_mut().write_all(req.as_bytes()).unwrap();
    let (mut line, mut len) = (String::new(), 0usize);
    r.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    t.elapsed().as_secs_f64()
}

struct Target {
    addr: String,
    headers: String,
}

impl Target {
    fn connection(&self) -> BufReader<TcpStream> {
        let r = BufReader::new(TcpStream::connect(&self.addr).unwrap());
        r.get_ref().set_nodelay(true).unwrap();
        r
    }

    fn get(&self) -> String {
        format!("GET /v1/models HTTP/1.1\r\nHost: {}\r\n{}\r\n", self.addr, self.headers)
    }

    fn chat(&self) -> String {
        let body = r#"{"messages":[{"role":"user","content":"Write a Python function that returns the square of a number."}],"max_tokens":1}"#;
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            self.headers,
            body.len()
        )
    }

    async fn handshake(&self) -> f64 {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}/v1/ws", self.addr).into_client_request().unwrap();
        for l in self.headers.lines() {
            let (k, v) = l.split_once(": ").unwrap();
            req.headers_mut().insert(tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.trim().parse().unwrap());
        }
        let t = Instant::now();
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let dt = t.elapsed().as_secs_f64();
        drop(ws);
        dt
    }
}

/// `n` exchanges on each target's keep-alive connection, alternating.
fn alternate(targets: &[Target], n: usize, req: impl Fn(&Target) -> String) -> [Vec<f64>; 2] {
    let mut conns: Vec<_> = targets.iter().map(|t| (t.connection(), req(t))).collect();
    let mut out = [Vec::new(), Vec::new()];
    for _ in 0..n {
        for (i, (c, r)) in conns.iter_mut().enumerate() {
            out[i].push(exchange(c, r));
        }
    }
    out
}

fn main() {
    let Some((path, l)) = common::model("security") else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let keys: Vec<String> = (0..64).map(|i| format!("sk-bench-{i:04}-{}", "x".repeat(32))).collect();
    let keyed = Settings {
        api_keys: keys.clone(),
        limits: Limits { per_minute: 1_000_000_000, parallel: 1000 },
        ..Settings::default()
    };
    let mut targets = Vec::new();
    for security in [Settings::default(), keyed] {
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let headers = if security.api_keys.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {}\r\nOrigin: http://{addr}\r\n", keys[63])
        };
        let opts = Options { port: 0, security, ..Options::default() };
        let app = App::new(l.engine(BackendKind::Cpu, 0).unwrap(), "bench".into(), opts, stop_rx.clone()).unwrap();
        rt.spawn(app.run(listener));
        targets.push(Target { addr, headers });
    }
    println!("model: {} (cpu); open server vs 64 keys + limits + Origin, requests alternating", path.display());
    let mut get = alternate(&targets, GETS, Target::get);
    let mut hs = [Vec::new(), Vec::new()];
    for _ in 0..HANDSHAKES {
        for (i, t) in targets.iter().enumerate() {
            hs[i].push(rt.block_on(t.handshake()));
        }
    }
    let mut chat = alternate(&targets, CHATS, Target::chat);
    println!("what                       open (median)   keyed (median)   keyed - open");
    for (what, v, unit, scale) in [("GET /v1/models", &mut get, "us", 1e6), ("WebSocket handshake", &mut hs, "us", 1e6), ("chat, 1 token (TTFT)", &mut chat, "ms", 1e3)] {
        let (a, b) = (median(&mut v[0]) * scale, median(&mut v[1]) * scale);
        println!("{what:<26} {a:>10.1} {unit}   {b:>11.1} {unit}   {:>+9.1} {unit} ({:.3}x)", b - a, b / a);
    }
}
