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
        Server::start_env(model, extra, &[])
    }

    /// As [`Server::start`], with these environment variables.
    pub fn start_env(model: &PathBuf, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flint"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            // A key in the test's own environment must not change what a test serves.
            .env_remove("FLINT_API_KEY")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start flint serve");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("http://") {
            line.clear();
            assert!(err.read_line(&mut line).unwrap() > 0, "flint serve ended before it served");
        }
        let addr = line.split("http://").nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in err.lines() {});
        Server { child, addr }
    }

    pub fn tiny(extra: &[&str]) -> Server {
        Server::start(&tiny_model(GgmlType::Q8_0, 2048), extra)
    }

    /// The tiny model with room for a generation that outlasts what a test does meanwhile.
    pub fn tiny_long(extra: &[&str]) -> Server {
        Server::start(&tiny_model(GgmlType::Q8_0, 65536), extra)
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

/// A WebSocket handshake at `ws://{addr}{path}` with these headers: the socket and the
/// response's headers, or the refusal's HTTP status.
pub async fn handshake(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<(Ws, Vec<(String, String)>), u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((s, r)) => Ok((Ws(s), r.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect())),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("the handshake failed without an HTTP status: {e}"),
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
    http_with(method, url, &[("Content-Type", "application/json")], body)
}

/// As [`http`], with these headers (a `Host` among them replaces the URL's).
pub fn http_with(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = std::net::TcpStream::connect(host).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head += &format!("Host: {host}\r\n");
    }
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    write!(s, "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// An HTTP response's status code.
pub fn status(r: &str) -> u16 {
    r.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// An HTTP response's body as JSON (Null when it is not).
pub fn body(r: &str) -> Value {
    serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap_or_default()).unwrap_or(Value::Null)
}

/// A counter's or gauge's value in `/metrics` text (0 when absent).
pub fn counter(metrics: &str, name: &str) -> u64 {
    metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

