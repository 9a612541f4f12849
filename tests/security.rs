//! Who may use a real `flint serve` on loopback: API keys on every route and both WebSockets,
//! the Host (DNS-rebinding) and Origin (cross-site) checks, JSON-only bodies, per-key rate
//! and parallel limits, the key file's reload on SIGHUP, and the refusal to serve the network
//! without a key; with raw requests, the terminal client, the `openai` SDK
//! (`tests/server/security.py`), the Codex CLI, and headless Chromium
//! (`tests/server/security_browser.py`).

mod common;

use base64::Engine as _;
use common::codex::{codex, codex_exec, Keys};
use common::server::{body, counter, handshake, http_with, status, unsafe_kill, Server};
use common::{python_with, tiny_model};
use flint::quant::GgmlType;
use serde_json::json;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "sk-flint-test-0123456789";
const CHAT: &str = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bearer(k: &str) -> String {
    format!("Bearer {k}")
}

fn header<'a>(r: &'a str, name: &str) -> Option<&'a str> {
    let head = r.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| l.split_once(": ").filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
}

fn metrics(s: &Server, key: Option<&str>) -> String {
    let auth = key.map(bearer);
    let h: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let r = http_with("GET", &s.url("/metrics"), &h, "");
    assert_eq!(status(&r), 200, "{r}");
    r
}

fn refused(m: &str, reason: &str) -> u64 {
    counter(m, &format!("flint_refused_total{{reason=\"{reason}\"}}"))
}

fn json_with(key: &str) -> Vec<(&'static str, String)> {
    vec![("Content-Type", "application/json".into()), ("Authorization", bearer(key))]
}

fn send(method: &str, url: &str, h: &[(&'static str, String)], body: &str) -> String {
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    http_with(method, url, &h, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_and_websocket_needs_the_key_but_health() {
    let s = Server::tiny(&["--api-key", KEY, "--api-key", "sk-second-key"]);
    let h = http_with("GET", &s.url("/health"), &[], "");
    assert_eq!(status(&h), 200);
    assert_eq!(body(&h)["api_key_required"], true, "/health tells the page to ask for a key");
    let page = http_with("GET", &s.url("/"), &[], "");
    assert_eq!(status(&page), 200, "the page loads without a key (it asks for one)");
    assert_eq!(header(&page, "x-frame-options"), Some("DENY"), "and no other page may frame it");
    let routes = [
        ("GET", "/v1/models", ""),
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", r#"{"prompt":"hi","max_tokens":2}"#),
        ("POST", "/v1/responses", r#"{"input":"hi","max_output_tokens":2}"#),
        ("GET", "/v1/responses/resp_x", ""),
        ("DELETE", "/v1/responses/resp_x", ""),
        ("GET", "/metrics", ""),
        ("GET", "/v1/no-such-route", ""),
    ];
    for (method, path, b) in routes {
        for (what, auth) in [("no key", None), ("a wrong key", Some(bearer("sk-wrong-key-00000"))), ("a key's prefix", Some(bearer(&KEY[..10]))), ("Basic auth", Some("Basic dTpw".into()))] {
            let mut hd = vec![("Content-Type", "application/json".to_string())];
            hd.extend(auth.map(|a| ("Authorization", a)));
            let r = send(method, &s.url(path), &hd, b);
            assert_eq!(status(&r), 401, "{method} {path} with {what}: {r}");
            let e = &body(&r)["error"];
            assert_eq!((e["code"].as_str(), e["type"].as_str()), (Some("invalid_api_key"), Some("invalid_request_error")), "OpenAI's shape: {r}");
            assert_eq!(header(&r, "www-authenticate"), Some("Bearer realm=\"flint\""));
        }
    }
    let m = metrics(&s, Some(KEY));
    assert_eq!(counter(&m, "flint_prompt_tokens_total"), 0, "no refused request reached the engine");
    assert_eq!(refused(&m, "unauthorized"), 4 * routes.len() as u64);
    for key in [KEY, "sk-second-key"] {
        let r = send("POST", &s.url("/v1/chat/completions"), &json_with(key), CHAT);
        assert_eq!(status(&r), 200, "served with either key: {r}");
    }
    // Both WebSockets: the header, or (for browsers) the bearer subprotocol, which is not echoed.
    for path in ["/v1/ws", "/v1/responses"] {
        assert_eq!(handshake(&s.addr, path, &[]).await.err(), Some(401), "{path} without a key");
        assert_eq!(handshake(&s.addr, path, &[("Authorization", "Bearer nope")]).await.err(), Some(401));
        assert!(handshake(&s.addr, path, &[("Authorization", &bearer(KEY))]).await.is_ok(), "{path} with the key");
        let proto = format!("flint, flint.bearer.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(KEY));
        let (_, resp) = handshake(&s.addr, path, &[("Sec-WebSocket-Protocol", &proto)]).await.expect("the key as a subprotocol");
        let selected = resp.iter().find(|(k, _)| k == "sec-websocket-protocol").map(|(_, v)| v.as_str());
        assert_eq!(selected, Some("flint"), "{path}: the plain subprotocol is selected");
        let wrong = format!("flint, flint.bearer.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("sk-guess"));
        assert_eq!(handshake(&s.addr, path, &[("Sec-WebSocket-Protocol", &wrong)]).await.err(), Some(401));
    }
    let (mut ws, _) = handshake(&s.addr, "/v1/ws", &[("Authorization", &bearer(KEY))]).await.unwrap();
    assert_eq!(ws.recv().await["type"], "session");
    ws.send(json!({"type": "generate", "content": "hi", "max_tokens": 3})).await;
    assert_eq!(ws.until_end().await.1["type"], "done", "a keyed session generates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_host_foreign_origin_and_non_json_bodies_are_refused() {
    let s = Server::tiny(&["--allow-origin", "http://localhost:3000", "--allow-host", "flint.test"]);
    let port = s.addr.rsplit(':').next().unwrap().to_string();
    let json_ct = ("Content-Type", "application/json");
    // DNS rebinding: a name that is not loopback's.
    let evil_host = format!("evil.example:{port}");
    for (method, path, b) in [("GET", "/v1/models", ""), ("POST", "/v1/chat/completions", CHAT), ("GET", "/", ""), ("GET", "/health", "")] {
        let r = http_with(method, &s.url(path), &[("Host", &evil_host), json_ct], b);
        assert_eq!(status(&r), 403, "{method} {path} with Host {evil_host}: {r}");
        assert!(body(&r)["error"]["message"].as_str().unwrap().contains("--allow-host"), "the refusal names the flag: {r}");
    }
    assert_eq!(handshake(&s.addr, "/v1/ws", &[("Host", &evil_host)]).await.err(), Some(403));
    // Cross-site: a page elsewhere, "simple" (text/plain, no preflight) or not, and `null`.
    for origin in ["http://evil.example", "http://127.0.0.1:1", "null", "http://localhost:3001"] {
        for ct in ["text/plain", "application/json"] {
            let r = http_with("POST", &s.url("/v1/chat/completions"), &[("Origin", origin), ("Content-Type", ct)], CHAT);
            assert_eq!(status(&r), 403, "POST from {origin} ({ct}): {r}");
            assert_eq!(header(&r, "access-control-allow-origin"), None, "no CORS for {origin}");
        }
        for path in ["/v1/ws", "/v1/responses"] {
            assert_eq!(handshake(&s.addr, path, &[("Origin", origin)]).await.err(), Some(403), "{path} from {origin}");
        }
    }
    // Bodies that are not JSON, from a client without an Origin.
    for ct in [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data; boundary=x"), None] {
        let h: Vec<(&str, &str)> = ct.iter().map(|c| ("Content-Type", *c)).collect();
        let r = http_with("POST", &s.url("/v1/chat/completions"), &h, CHAT);
        assert_eq!(status(&r), 415, "Content-Type {ct:?}: {r}");
        assert_eq!(body(&r)["error"]["code"], "unsupported_media_type");
    }
    let m = metrics(&s, None);
    assert_eq!(counter(&m, "flint_prompt_tokens_total"), 0, "no refused request started a generation:\n{m}");
    assert_eq!(refused(&m, "forbidden_host"), 5);
    assert_eq!(refused(&m, "forbidden_origin"), 16);
    assert_eq!(refused(&m, "unsupported_media_type"), 4);
    // What is allowed: loopback names, the allowed host, the server's own page, the allowed
    // origin (with CORS, its preflight answered), and JSON with a charset.
    for host in [format!("localhost:{port}"), format!("[::1]:{port}"), "flint.test".into(), format!("127.0.0.1:{port}")] {
        let r = http_with("GET", &s.url("/v1/models"), &[("Host", &host)], "");
        assert_eq!(status(&r), 200, "Host {host}: {r}");
    }
    let own = format!("http://127.0.0.1:{port}");
    let r = http_with("POST", &s.url("/v1/chat/completions"), &[("Origin", &own), ("Content-Type", "application/json; charset=utf-8")], CHAT);
    assert_eq!(status(&r), 200, "the server's own page: {r}");
    assert!(handshake(&s.addr, "/v1/ws", &[("Origin", &own)]).await.is_ok(), "the page's WebSocket");
    let pre = http_with(
        "OPTIONS",
        &s.url("/v1/chat/completions"),
        &[("Origin", "http://localhost:3000"), ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "authorization, content-type")],
        "",
    );
    assert!(status(&pre) < 300, "the allowed origin's preflight: {pre}");
    assert_eq!(header(&pre, "access-control-allow-origin"), Some("http://localhost:3000"));
    let r = http_with("POST", &s.url("/v1/chat/completions"), &[("Origin", "http://localhost:3000"), json_ct], CHAT);
    assert_eq!((status(&r), header(&r, "access-control-allow-origin")), (200, Some("http://localhost:3000")), "{r}");
    let pre = http_with("OPTIONS", &s.url("/v1/chat/completions"), &[("Origin", "http://evil.example"), ("Access-Control-Request-Method", "POST")], "");
    assert_eq!(header(&pre, "access-control-allow-origin"), None, "another origin's preflight allows nothing: {pre}");
}

#[test]
fn the_network_is_not_served_without_a_key() {
    let model = tiny_model(GgmlType::Q8_0, 2048);
    let out = Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--model"])
        .arg(&model)
        .env_remove("FLINT_API_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it refused to start: {err}");
    assert!(err.contains("refusing to serve 0.0.0.0") && err.contains("--api-key") && err.contains("--insecure-no-key"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // With a key from the environment it serves, and asks for the key.
    let s = Server::start_env(&model, &["--host", "0.0.0.0"], &[("FLINT_API_KEY", KEY)]);
    let port = s.addr.rsplit(':').next().unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/models");
    assert_eq!(status(&http_with("GET", &url, &[], "")), 401);
    assert_eq!(status(&http_with("GET", &url, &[("Authorization", &bearer(KEY))], "")), 200);
    // Not bound to loopback, it answers any Host name (the key is the guard there).
    assert_eq!(status(&http_with("GET", &url, &[("Authorization", &bearer(KEY)), ("Host", "flint.lan")], "")), 200);
    drop(s);
    let s = Server::tiny(&["--host", "0.0.0.0", "--insecure-no-key"]);
    let port = s.addr.rsplit(':').next().unwrap();
    assert_eq!(status(&http_with("GET", &format!("http://127.0.0.1:{port}/v1/models"), &[], "")), 200, "--insecure-no-key serves it open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_file_is_read_again_on_sighup() {
    let dir = common::temp_dir("keyfile");
    let file = dir.join("keys");
    std::fs::write(&file, "# the team's keys\nsk-one-000000\n").unwrap();
    let s = Server::tiny(&["--api-key-file", file.to_str().unwrap()]);
    let models = |k: &str| status(&http_with("GET", &s.url("/v1/models"), &[("Authorization", &bearer(k))], ""));
    assert_eq!((models("sk-one-000000"), models("sk-two-000000")), (200, 401));
    let (mut old, _) = handshake(&s.addr, "/v1/ws", &[("Authorization", &bearer("sk-one-000000"))]).await.unwrap();
    assert_eq!(old.recv().await["type"], "session");
    std::fs::write(&file, "sk-two-000000\n").unwrap();
    unsafe_kill(s.child.id(), "HUP");
    let t = Instant::now();
    while models("sk-two-000000") != 200 {
        assert!(t.elapsed() < Duration::from_secs(10), "the new key was not taken");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(models("sk-one-000000"), 401, "the removed key is refused");
    old.send(json!({"type": "generate", "content": "hi", "max_tokens": 2})).await;
    let e = old.recv().await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("invalid_api_key")), "an open session of a removed key starts no turn: {e}");
    // A file broken or emptied by mistake keeps the keys in force.
    std::fs::write(&file, "").unwrap();
    unsafe_kill(s.child.id(), "HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(models("sk-two-000000"), 200, "an empty key file changes nothing");
    assert!(s.child.id() > 0 && status(&http_with("GET", &s.url("/health"), &[], "")) == 200, "the server lives on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_over_its_limits_gets_429_while_another_is_served() {
    // Requests per minute.
    let s = Server::tiny(&["--api-key", "sk-a-00000000", "--api-key", "sk-b-00000000", "--rate-limit", "5"]);
    let (a, b) = (json_with("sk-a-00000000"), json_with("sk-b-00000000"));
    let burst: Vec<String> = (0..10).map(|_| send("GET", &s.url("/v1/models"), &a, "")).collect();
    let codes: Vec<u16> = burst.iter().map(|r| status(r)).collect();
    assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429, 429, 429, 429], "a burst past 5 a minute");
    let late = &burst[9];
    let wait: u64 = header(late, "retry-after").expect("retry-after").parse().unwrap();
    assert!((1..=12).contains(&wait), "retry-after {wait}: the next of 5 a minute is due within 12 s");
    assert_eq!(body(late)["error"]["code"], "rate_limit_exceeded");
    assert_eq!(status(&send("POST", &s.url("/v1/chat/completions"), &b, CHAT)), 200, "the other key is served meanwhile");
    assert_eq!(handshake(&s.addr, "/v1/ws", &[("Authorization", &bearer("sk-a-00000000"))]).await.err(), Some(429));
    // A WebSocket's turns count too: b has used 2 of its 5 (the chat, the handshake).
    let (mut ws, _) = handshake(&s.addr, "/v1/ws", &[("Authorization", &bearer("sk-b-00000000"))]).await.unwrap();
    assert_eq!(ws.recv().await["type"], "session");
    for _ in 0..3 {
        ws.send(json!({"type": "generate", "content": "hi", "max_tokens": 2})).await;
        assert_eq!(ws.until_end().await.1["type"], "done");
    }
    ws.send(json!({"type": "generate", "content": "hi", "max_tokens": 2})).await;
    let e = ws.until_end().await.1;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("rate_limit_exceeded")), "{e}");
    assert!(e["retry_after"].as_u64().is_some_and(|s| s >= 1), "{e}");
    drop(s);

    // Generations at once.
    let s = Server::tiny_long(&["--api-key", "sk-a-00000000", "--api-key", "sk-b-00000000", "--max-parallel-per-key", "1"]);
    let (mut hog, _) = handshake(&s.addr, "/v1/ws", &[("Authorization", &bearer("sk-a-00000000"))]).await.unwrap();
    assert_eq!(hog.recv().await["type"], "session");
    hog.send(json!({"type": "generate", "prompt": "hog", "max_tokens": 100000})).await;
    assert_eq!(hog.recv().await["type"], "delta", "the first generation runs");
    let r = send("POST", &s.url("/v1/chat/completions"), &a, CHAT);
    assert_eq!(status(&r), 429, "a second generation of the same key: {r}");
    assert!(body(&r)["error"]["message"].as_str().unwrap().contains("--max-parallel-per-key"));
    assert_eq!(header(&r, "retry-after"), Some("1"));
    assert_eq!(status(&send("POST", &s.url("/v1/chat/completions"), &b, CHAT)), 200, "the other key is served while it runs");
    hog.send(json!({"type": "cancel"})).await;
    let end = hog.until_end().await.1;
    assert_eq!(end["type"], "done", "{end}");
    assert_eq!(status(&send("POST", &s.url("/v1/chat/completions"), &a, CHAT)), 200, "its place is free once it ends");
    let m = metrics(&s, Some("sk-b-00000000"));
    assert_eq!(refused(&m, "parallel_limit"), 1, "{m}");
}

#[test]
fn the_terminal_client_sends_its_key() {
    let s = Server::tiny(&["--api-key", KEY]);
    let chat = |key: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flint"));
        c.args(["chat", "--connect", &format!("ws://{}", s.addr), "--max-tokens", "8"]).env_remove("FLINT_API_KEY");
        if let Some(k) = key {
            c.env("FLINT_API_KEY", k);
        }
        let mut c = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        writeln!(c.stdin.take().unwrap(), "hi").unwrap();
        c.wait_with_output().unwrap()
    };
    let ok = chat(Some(KEY));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(!ok.stdout.is_empty(), "it answered");
    let no = chat(None);
    let err = String::from_utf8_lossy(&no.stderr);
    assert!(!no.status.success() && err.contains("HTTP 401") && err.contains("--api-key"), "without the key: {err}");
}

#[test]
fn the_openai_sdk_and_the_codex_cli_with_and_without_the_key() {
    let model = common::real_model("sdk_and_codex_with_keys (real model)").unwrap_or_else(|| tiny_model(GgmlType::Q8_0, 2048));
    let s = Server::start(&model, &["--api-key", KEY, "--max-tokens", "64"]);
    if python_with("openai_sdk_with_keys", &["openai", "websockets"]) {
        let st = Command::new("python3").arg(root().join("tests/server/security.py")).arg(format!("http://{}", s.addr)).arg(KEY).status().unwrap();
        assert!(st.success(), "tests/server/security.py failed");
    }
    let Some(bin) = codex("codex_with_keys") else { return };
    if common::real_model("codex_with_keys (real model)").is_none() {
        return;
    }
    let home = common::temp_dir("codex-keys");
    for websockets in [false, true] {
        let (rc, out, err) = codex_exec(&bin, &home, &s.addr, websockets, Keys { server: Some(KEY), sent: Some(KEY) }, "say hi");
        assert_eq!(rc, 0, "codex with the key (WebSocket mode: {websockets}):\n{err}");
        assert!(!out.trim().is_empty(), "codex printed no answer:\n{err}");
    }
    let m = common::server::http_with("GET", &s.url("/metrics"), &[("Authorization", &bearer(KEY))], "");
    assert!(counter(&m, "flint_sessions_opened_total{protocol=\"responses\"}") >= 1, "Codex used the WebSocket mode with its key:\n{m}");
    for (what, sent) in [("a wrong key", Some("sk-wrong-key-0000")), ("no key", None)] {
        let (rc, _, err) = codex_exec(&bin, &home, &s.addr, false, Keys { server: Some(KEY), sent }, "say hi");
        eprintln!("codex with {what}: rc {rc}\n{err}");
        assert_ne!(rc, 0, "codex with {what} fails");
        assert!(err.contains("401 Unauthorized"), "Codex shows the 401 for {what}:\n{err}");
    }
}

#[test]
fn a_browser_page_elsewhere_gets_nothing_and_the_own_page_takes_the_key() {
    if !common::browser("browser_security") {
        return;
    }
    let open = Server::tiny(&[]);
    let keyed = Server::tiny(&["--api-key", KEY]);
    let control = Server::tiny(&["--allow-origin", "*"]);
    let st = Command::new("python3")
        .arg(root().join("tests/server/security_browser.py"))
        .args([open.url(""), keyed.url(""), KEY.to_string(), control.url("")])
        .status()
        .unwrap();
    assert!(st.success(), "tests/server/security_browser.py failed");
}
