//! `flint serve` end to end: the real binary on loopback, driven over real sockets.
//! Protocol tests use the tiny synthetic model (random weights: the text is noise, the
//! mechanics are real); `tests/server/clients.py` drives the same server with the official
//! `openai` and `websockets` Python packages, and `tests/server/browser.py` the browser
//! page in headless Chromium.

mod common;

use common::server::{http, unsafe_kill, Server, Ws};
use common::{python_with, tiny_model};
use flint::quant::GgmlType;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn tokens(deltas: &[Value]) -> usize {
    deltas.iter().map(|d| d["tokens"].as_array().unwrap().len()).sum()
}

fn text(deltas: &[Value]) -> String {
    deltas.iter().map(|d| d["text"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn turns_reuse_the_conversation_kv_cache() {
    let s = Server::tiny(&[]);
    let mut ws = s.ws().await;
    ws.send(json!({"type": "generate", "content": "hello there", "max_tokens": 20, "id": 1})).await;
    let (d1, done1) = ws.until_end().await;
    assert_eq!(done1["id"], 1);
    let u1 = &done1["usage"];
    assert_eq!(u1["cached_tokens"], 0);
    assert_eq!(tokens(&d1), u1["completion_tokens"].as_u64().unwrap() as usize);
    assert_eq!(text(&d1), done1["text"].as_str().unwrap(), "the deltas add up to the answer");
    let context = u1["prompt_tokens"].as_u64().unwrap() + u1["completion_tokens"].as_u64().unwrap();
    ws.send(json!({"type": "generate", "content": "and again", "max_tokens": 5})).await;
    let (_, done2) = ws.until_end().await;
    let u2 = &done2["usage"];
    // Everything but (at most) the last generated token, which never ran through the model.
    assert!(u2["cached_tokens"].as_u64().unwrap() >= context - 1, "{u2} after a context of {context}");
    assert!(u2["prompt_tokens"].as_u64().unwrap() > context, "the follow-up appends to the conversation");
    // After a reset the next turn starts from scratch.
    ws.send(json!({"type": "session.update", "reset": true, "system": "Be brief."})).await;
    assert_eq!(ws.recv().await["type"], "session.updated");
    ws.send(json!({"type": "generate", "content": "hello there", "max_tokens": 3})).await;
    let (_, done3) = ws.until_end().await;
    assert!(done3["usage"]["prompt_tokens"].as_u64().unwrap() < context, "{done3}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_within_a_step() {
    let s = Server::tiny(&[]);
    let mut ws = s.ws().await;
    ws.send(json!({"type": "generate", "prompt": "once upon a time", "max_tokens": 1500, "temperature": 0.8})).await;
    let first = ws.recv().await;
    assert_eq!(first["type"], "delta");
    ws.send(json!({"type": "cancel"})).await;
    let (after, done) = ws.until_end().await;
    assert_eq!(done["finish_reason"], "cancelled", "{done}");
    let n = done["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n < 1500, "cancelled after {n} tokens");
    // What streamed after the cancel is what was already in flight, not new decoding.
    eprintln!("cancel: {} tokens arrived after the cancel was sent; {n} generated in all", tokens(&after));
    // The session goes on.
    ws.send(json!({"type": "generate", "content": "next", "max_tokens": 4})).await;
    let (_, done) = ws.until_end().await;
    assert_eq!(done["type"], "done");
    // A cancel with nothing running is ignored.
    ws.send(json!({"type": "cancel"})).await;
    ws.send(json!({"type": "generate", "content": "x", "max_tokens": 2})).await;
    assert_eq!(ws.until_end().await.1["type"], "done");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_continues_the_conversation() {
    let s = Server::tiny(&[]);
    let mut ws = s.ws().await;
    ws.send(json!({"type": "generate", "content": "write a long story", "max_tokens": 1500, "temperature": 0.8})).await;
    assert_eq!(ws.recv().await["type"], "delta");
    ws.send(json!({"type": "redirect", "content": "no, a poem", "max_tokens": 8, "id": "r"})).await;
    let (_, first) = ws.until_end().await;
    assert_eq!(first["finish_reason"], "redirected", "{first}");
    let partial = first["usage"]["prompt_tokens"].as_u64().unwrap() + first["usage"]["completion_tokens"].as_u64().unwrap();
    let (_, second) = ws.until_end().await;
    assert_eq!(second["type"], "done", "{second}");
    assert_eq!(second["id"], "r");
    let u = &second["usage"];
    assert!(u["cached_tokens"].as_u64().unwrap() >= partial - 1, "the redirect prefills only the new input: {u}, partial {partial}");
    // A redirect with nothing running starts a turn.
    ws.send(json!({"type": "redirect", "content": "more", "max_tokens": 2})).await;
    assert_eq!(ws.until_end().await.1["type"], "done");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_errors_and_the_session_stays_usable() {
    let s = Server::tiny(&["--max-message", "4096"]);
    let mut ws = s.ws().await;
    let expect = async |ws: &mut Ws, m: Message, code: &str| {
        ws.0.send(m).await.unwrap();
        let v = ws.recv().await;
        assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some(code)), "{v}");
    };
    let t = |s: &str| Message::text(s.to_string());
    expect(&mut ws, t("not json"), "invalid_json").await;
    expect(&mut ws, t("[1,2]"), "invalid_request").await;
    expect(&mut ws, t(r#"{"kind":"generate"}"#), "invalid_request").await;
    expect(&mut ws, t(r#"{"type":"launch"}"#), "unknown_type").await;
    expect(&mut ws, t(r#"{"type":"generate","content":"hi","max_tokens":"many"}"#), "invalid_request").await;
    expect(&mut ws, t(r#"{"type":"generate","content":"hi","temperature":-1}"#), "invalid_request").await;
    expect(&mut ws, t(r#"{"type":"generate","content":"hi","top_p":0}"#), "invalid_request").await;
    expect(&mut ws, t(r#"{"type":"generate","content":"hi","max_tokens":0}"#), "invalid_request").await;
    expect(&mut ws, t(r#"{"type":"generate","messages":[{"role":"wizard","content":"hi"}]}"#), "invalid_request").await;
    expect(&mut ws, t(r#"{"type":"generate","prompt":"a","content":"b"}"#), "invalid_request").await;
    expect(&mut ws, t(r#"{"type":"generate"}"#), "invalid_request").await;
    expect(&mut ws, t(r#"{"type":"generate","prompt":""}"#), "invalid_request").await;
    expect(&mut ws, t(r#"{"type":"generate","content":"hi","speculative":"psychic"}"#), "invalid_request").await;
    expect(&mut ws, t(r#"{"type":"session.update","temperature":"hot"}"#), "invalid_request").await;
    expect(&mut ws, Message::binary(vec![1u8, 2, 3]), "binary_frame").await;
    expect(&mut ws, t(&format!(r#"{{"type":"generate","content":"{}"}}"#, "a".repeat(5000))), "too_large").await;
    // A prompt longer than the context (2048): one token per byte here.
    let long = "x".repeat(2100);
    let s2 = Server::tiny(&[]);
    let mut ws2 = s2.ws().await;
    expect(&mut ws2, t(&json!({"type": "generate", "prompt": long}).to_string()), "context_full").await;
    // Busy: a second generate while one runs.
    ws.send(json!({"type": "generate", "prompt": "abc", "max_tokens": 1000})).await;
    assert_eq!(ws.recv().await["type"], "delta");
    ws.send(json!({"type": "generate", "prompt": "x"})).await;
    let (_, busy) = ws.until_end().await;
    assert_eq!(busy["code"], "busy", "{busy}");
    ws.send(json!({"type": "cancel"})).await;
    let (_, done) = ws.until_end().await;
    assert_eq!(done["finish_reason"], "cancelled");
    // Still usable after all of it.
    ws.send(json!({"type": "generate", "content": "fine", "max_tokens": 3})).await;
    assert_eq!(ws.until_end().await.1["type"], "done");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_sessions_take_turns_and_batch_losslessly() {
    let s = Server::tiny(&["--parallel", "4"]);
    let request = |i: u64| json!({"type": "generate", "prompt": format!("session {i} says"), "max_tokens": 400, "temperature": 0.9, "seed": i});
    // Each request alone first.
    let mut solo = Vec::new();
    let mut ws = s.ws().await;
    for i in 0..4 {
        ws.send(json!({"type": "session.update", "reset": true})).await;
        ws.recv().await;
        ws.send(request(i)).await;
        solo.push(ws.until_end().await.1["text"].clone());
    }
    // Then all at once: they take turns (and their decode steps are batched).
    let mut handles = Vec::new();
    let t0 = Instant::now();
    for i in 0..4 {
        let mut ws = s.ws().await;
        let req = request(i);
        handles.push(tokio::spawn(async move {
            ws.send(req).await;
            let mut first = None;
            loop {
                let v = ws.recv().await;
                match v["type"].as_str().unwrap() {
                    "delta" => {
                        first.get_or_insert(t0.elapsed());
                    }
                    "done" => return (first.unwrap(), t0.elapsed(), v),
                    _ => panic!("{v}"),
                }
            }
        }));
    }
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.unwrap());
    }
    let earliest_done = results.iter().map(|r| r.1).min().unwrap();
    for (i, (first, _, done)) in results.iter().enumerate() {
        assert!(*first < earliest_done, "every session streams before any finishes: first token {first:?}, a session done at {earliest_done:?}");
        assert_eq!(done["text"], solo[i], "session {i}: batched with others, the output is the one it gets alone");
    }
    let m = tokio::task::spawn_blocking(move || http("GET", &s.url("/metrics"), "")).await.unwrap();
    let batches = m.lines().find(|l| l.starts_with("flint_decode_batch_size_count")).unwrap_or_else(|| panic!("{m}"));
    assert!(!batches.ends_with(" 0"), "decode steps were batched: {batches}");
}

#[tokio::test(flavor = "multi_thread")]
async fn session_and_queue_limits() {
    let s = Server::tiny(&["--max-sessions", "2", "--parallel", "1", "--max-queue", "1"]);
    let mut a = s.ws().await;
    let mut b = s.ws().await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", s.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("a third session must be refused with 503, got {other:?}"),
    }
    // One generation runs, one waits, a third is refused as busy.
    a.send(json!({"type": "generate", "prompt": "a", "max_tokens": 2000})).await;
    assert_eq!(a.recv().await["type"], "delta");
    b.send(json!({"type": "generate", "prompt": "b", "max_tokens": 3})).await;
    let body = json!({"prompt": "c", "max_tokens": 3}).to_string();
    let r = http("POST", &s.url("/v1/completions"), &body);
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("\"code\":\"busy\""), "{r}");
    a.send(json!({"type": "cancel"})).await;
    assert_eq!(a.until_end().await.1["finish_reason"], "cancelled");
    assert_eq!(b.until_end().await.1["type"], "done", "the queued job runs once the first ends");
    // A closed session frees its place.
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _c = s.ws().await;
}

#[test]
fn http_errors_are_openai_shaped() {
    let s = Server::tiny(&["--max-message", "2048"]);
    let cases: [(&str, &str, &str, &str); 7] = [
        ("POST", "/v1/chat/completions", "{", "invalid_json"),
        ("POST", "/v1/chat/completions", r#"{"messages":"hi"}"#, "invalid_request"),
        ("POST", "/v1/chat/completions", r#"{"messages":[{"role":"user","content":"hi"}],"temperature":-2}"#, "invalid_request"),
        ("POST", "/v1/chat/completions", r#"{"messages":[{"role":"user","content":"hi"}],"n":3}"#, "invalid_request"),
        ("POST", "/v1/completions", r#"{"prompt":[999999]}"#, "invalid_request"),
        ("GET", "/v1/nothing", "", "not_found"),
        ("POST", "/v1/completions", &format!(r#"{{"prompt":"{}"}}"#, "a".repeat(4096)), "too_large"),
    ];
    for (method, path, body, code) in cases {
        let r = http(method, &s.url(path), body);
        let status: u16 = r[9..12].parse().unwrap();
        let json: Value = serde_json::from_str(&r[r.find("\r\n\r\n").unwrap() + 4..]).unwrap_or_else(|_| panic!("{r}"));
        assert_eq!(json["error"]["code"], code, "{method} {path}: {r}");
        assert!(json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(status, match code { "not_found" => 404, "too_large" => 413, _ => 400 }, "{r}");
    }
    // The server is still fine.
    let r = http("POST", &s.url("/v1/completions"), r#"{"prompt":"ok","max_tokens":2}"#);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[test]
fn a_disconnected_http_client_cancels_its_generation() {
    use std::io::{Read, Write};
    let s = Server::tiny_long(&[]);
    let body = json!({"prompt": "forever", "max_tokens": 100000, "stream": true}).to_string();
    let mut c = std::net::TcpStream::connect(&s.addr).unwrap();
    write!(c, "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", s.addr, body.len()).unwrap();
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    drop(c);
    let t = Instant::now();
    loop {
        let m = http("GET", &s.url("/metrics"), "");
        if m.contains("flint_requests_total{reason=\"client_gone\"} 1") && m.contains("flint_active_generations 0") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the generation was not cancelled:\n{m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn health_and_metrics() {
    let s = Server::tiny(&[]);
    let r = http("POST", &s.url("/v1/completions"), r#"{"prompt":"hello","max_tokens":5}"#);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let h = http("GET", &s.url("/health"), "");
    assert!(h.contains("\"status\":\"ok\""), "{h}");
    let m = http("GET", &s.url("/metrics"), "");
    for name in [
        "flint_time_to_first_token_seconds_bucket",
        "flint_inter_token_latency_seconds_bucket",
        "flint_completion_tokens_total 5",
        "flint_sessions 0",
        "flint_queue_depth 0",
        "flint_speculative_accepted_tokens_total",
        "flint_requests_total{reason=\"length\"} 1",
    ] {
        assert!(m.contains(name), "/metrics lacks {name}:\n{m}");
    }
    let page = http("GET", &s.url("/"), "");
    assert!(page.contains("/v1/ws") && page.contains("text/html"), "the page is served");
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_ends_generations_and_sessions() {
    let mut s = Server::tiny_long(&["--shutdown-grace", "0.3"]);
    let mut ws = s.ws().await;
    ws.send(json!({"type": "generate", "prompt": "long", "max_tokens": 100000})).await;
    assert_eq!(ws.recv().await["type"], "delta");
    let status = tokio::task::spawn_blocking(move || {
        let st = s.terminate();
        (st, s)
    });
    let (_, done) = ws.until_end().await;
    assert_eq!(done["finish_reason"], "cancelled", "cancelled after the grace period: {done}");
    // Then the server closes the session with 1001 (going away).
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.0.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1001);
                break;
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => panic!("closed without 1001"),
            _ => {}
        }
    }
    let (st, _s) = status.await.unwrap();
    assert!(st.success(), "exit status {st}");
}

#[test]
fn python_clients() {
    if !python_with("python_clients", &["openai", "websockets"]) {
        return;
    }
    let model = common::real_model("python_clients (real model)").unwrap_or_else(|| tiny_model(GgmlType::Q8_0, 2048));
    let s = Server::start(&model, &[]);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let st = Command::new("python3").arg(root.join("tests/server/clients.py")).arg(format!("http://{}", s.addr)).status().unwrap();
    assert!(st.success(), "tests/server/clients.py failed");
}

#[test]
fn browser_page() {
    if !common::browser("browser_page") {
        return;
    }
    // The real model streams at a human-visible pace, so Stop and redirect land mid-answer.
    let model = common::real_model("browser_page (real model)").unwrap_or_else(|| tiny_model(GgmlType::Q8_0, 2048));
    let s = Server::start(&model, &["--max-tokens", "2000"]);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let shot = common::temp_dir("browser").join("page.png");
    let st = Command::new("python3").arg(root.join("tests/server/browser.py")).arg(format!("http://{}", s.addr)).arg(&shot).status().unwrap();
    eprintln!("browser_page: screenshot at {}", shot.display());
    assert!(st.success(), "tests/server/browser.py failed");
}

#[test]
fn terminal_chat_over_the_websocket() {
    use std::io::{Read, Write};
    let s = Server::tiny(&[]);
    let mut c = Command::new(env!("CARGO_BIN_EXE_flint"))
        .args(["chat", "--connect", &format!("ws://{}", s.addr), "--max-tokens", "1500", "--temperature", "0.8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let mut err = BufReader::new(c.stderr.take().unwrap());
    // The answers as they stream: Ctrl-C and the redirect are sent once an answer is under
    // way (a fixed sleep lost the race on a loaded machine, the answer finishing first or
    // the signal landing before it began).
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let (out, mut stdout) = (out.clone(), c.stdout.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let streaming = |from: usize| {
        let t = std::time::Instant::now();
        while out.lock().unwrap().len() <= from {
            assert!(t.elapsed() < Duration::from_secs(60), "no answer streamed");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let mut wait_for = |what: &str| {
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            assert!(err.read_line(&mut line).unwrap() > 0, "the client ended before {what:?}; stderr: {seen}");
            seen.push_str(&line);
            if line.contains(what) {
                return line;
            }
        }
    };
    wait_for("connected to");
    // Ctrl-C during an answer stops it; the client goes on.
    let seen = out.lock().unwrap().len();
    writeln!(stdin, "tell me everything").unwrap();
    streaming(seen);
    unsafe_kill(c.id(), "INT");
    wait_for("[cancelled");
    // A line typed while the answer streams redirects it.
    let seen = out.lock().unwrap().len();
    writeln!(stdin, "first question").unwrap();
    streaming(seen);
    writeln!(stdin, "second thoughts").unwrap();
    wait_for("[redirected ·");
    wait_for(" prompt tokens cached]");
    // Ctrl-D quits.
    drop(stdin);
    let st = c.wait().unwrap();
    assert!(st.success(), "{st}");
    reader.join().unwrap();
    assert!(!out.lock().unwrap().is_empty(), "answers were printed");
}

/// Backpressure in the engine thread: a generation whose client does not read stops at its
/// channel's bound (nothing more is buffered) while the others go on, and resumes when the
/// client reads again, with nothing lost.
#[test]
fn a_client_that_does_not_read_is_held_at_its_bound_and_others_go_on() {
    use flint::generate::Request;
    use flint::sampler::SamplerConfig;
    use flint::server::metrics::Metrics;
    use flint::server::scheduler::{Event, Events, Limits, Scheduler, Slot, CHANNEL};
    use std::sync::Arc;
    let l = flint::Loaded::open(&tiny_model(GgmlType::Q8_0, 2048)).unwrap();
    let engine = l.engine(flint::BackendKind::Cpu, 0).unwrap();
    let limits = Limits { parallel: 4, max_queue: 8, prefill_chunk: 64 };
    let (sched, thread) = Scheduler::start(engine, limits, Arc::new(Metrics::new()));
    let job = |slot, n| sched.submit(slot, Request::new(vec![5, 6, 7], n, SamplerConfig::default())).unwrap().events;
    let mut slow_rx = job(Slot::Conv(1), 1000);
    let mut fast_rx = job(Slot::Conv(2), 300);
    let drain = |rx: &mut Events| -> (String, usize) {
        let mut text = String::new();
        let mut n = 0;
        loop {
            match rx.blocking_recv().expect("the engine ended the job") {
                Event::Delta { text: t, tokens } => {
                    text.push_str(&t);
                    n += tokens.len();
                }
                Event::Done(o) => {
                    assert_eq!(o.text, text, "nothing was lost");
                    return (text, n);
                }
                Event::Error { message, .. } => panic!("{message}"),
            }
        }
    };
    // The fast job finishes while the slow one's client reads nothing.
    let (_, n) = drain(&mut fast_rx);
    assert_eq!(n, 300);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(slow_rx.buffered(), CHANNEL, "the engine stopped at its bound, and buffered no more");
    // Reading again resumes it to the end.
    let (_, n) = drain(&mut slow_rx);
    assert_eq!(n, 1000);
    sched.shutdown(Duration::from_secs(1));
    drop(sched);
    thread.join().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sessions_are_closed_and_free_their_place() {
    let s = Server::tiny(&["--max-sessions", "1", "--idle-timeout", "0.5"]);
    let mut ws = s.ws().await;
    // A turn runs; then, with no message and nothing generating, the session is closed.
    ws.send(json!({"type": "generate", "prompt": "a", "max_tokens": 3})).await;
    assert_eq!(ws.until_end().await.1["type"], "done");
    let t = Instant::now();
    match tokio::time::timeout(Duration::from_secs(10), ws.0.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1001),
        other => panic!("expected a close for idleness, got {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(300), "closed too early: {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _again = s.ws().await; // the place is free
}
