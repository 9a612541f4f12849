//! A real `flint serve` process on loopback, and raw WebSocket and HTTP clients for it.

use super::tiny_model;
use flint::quant::GgmlType;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    pub fn start(model: &PathBuf, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flint"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start flint serve");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        let addr = line.split("http://").nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in err.lines() {});
        Server { child, addr }
    }

    pub fn tiny(extra: &[&str]) -> Server {
        Server::start(&tiny_model(GgmlType::Q8_0, 2048), extra)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn ws(&self) -> Ws {
        connect(&self.addr).await
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), "TERM");
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "the server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A `/v1/ws` session on the server at `addr`, its `session` message read.
pub async fn connect(addr: &str) -> Ws {
    let (s, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await.expect("connect");
    let mut ws = Ws(s);
    assert_eq!(ws.recv().await["type"], "session");
    ws
}

pub fn unsafe_kill(pid: u32, sig: &str) {
    Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Ws(pub WebSocketStream<MaybeTlsStream<TcpStream>>);

impl Ws {
    pub async fn send(&mut self, v: Value) {
        self.0.send(Message::text(v.to_string())).await.unwrap();
    }
    pub async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(60), self.0.next()).await.expect("no message within 60 s");
            match m.expect("connection closed").expect("connection broke") {
                Message::Text(s) => return serde_json::from_str(&s).unwrap(),
                Message::Close(f) => panic!("closed: {f:?}"),
                _ => {}
            }
        }
    }
    /// Messages up to and including the next `done` or `error`.
    pub async fn until_end(&mut self) -> (Vec<Value>, Value) {
        let mut deltas = Vec::new();
        loop {
            let v = self.recv().await;
            match v["type"].as_str().unwrap() {
                "delta" => deltas.push(v),
                "done" | "error" => return (deltas, v),
                other => panic!("unexpected {other}: {v}"),
            }
        }
    }
}

/// A minimal HTTP/1.1 exchange over a raw socket (the response, headers and body).
pub fn http(method: &str, url: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

