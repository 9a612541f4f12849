//! The request lifecycle under a hostile mix, bounded in time (`FLINT_SOAK_SECS`, default 40):
//! a real `flint serve` on loopback; sessions of both WebSocket protocols and HTTP clients
//! that cancel, redirect, steer, disconnect, read slowly and send malformed input at random
//! moments, beside a well-behaved client. Asserted: every turn ends with exactly one final
//! event, never `internal`, never `busy` after a final event; a conversation's cache survives
//! a cancel; the well-behaved client is served throughout; memory stays bounded; `/metrics`
//! returns to zero active generations.

mod common;

use common::server::{connect, http, Server, Ws};
use common::tiny_model;
use flint::quant::GgmlType;
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const WORDS: &[&str] = &["alpha", "beta", "lexer", "parse", "token", "rust", "fn", "loop", "cache", "edit", "x", "42"];

fn words(rng: &mut ChaCha8Rng) -> String {
    let n = rng.random_range(1..12);
    (0..n).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect::<Vec<_>>().join(" ")
}

fn secs() -> u64 {
    std::env::var("FLINT_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(40)
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[derive(Default, Debug)]
struct Tally {
    turns: usize,
    cancels: usize,
    redirects: usize,
    steers: usize,
    disconnects: usize,
    garbage: usize,
    cache_checks: usize,
}

/// A message within `t`, or None.
async fn within(ws: &mut Ws, t: Duration) -> Option<Value> {
    loop {
        match tokio::time::timeout(t, ws.0.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Text(s)))) => return Some(serde_json::from_str(&s).unwrap()),
            Ok(Some(Ok(Message::Close(f)))) => panic!("the server closed the session: {f:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("the session broke: {other:?}"),
        }
    }
}

/// `/v1/ws`: turns with a random action each; returns when the time is up.
async fn ws_client(addr: String, seed: u64, until: Instant) -> Tally {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = Tally::default();
    while Instant::now() < until {
        let mut ws = connect(&addr).await;
        // Cached tokens a turn must reuse at least (after a cancel).
        let mut must_reuse: Option<u64> = None;
        for turn in 0..rng.random_range(2..7u64) {
            let id = seed * 1000 + turn;
            ws.send(json!({"type": "generate", "content": words(&mut rng), "max_tokens": rng.random_range(2..100), "id": id})).await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
            let action = rng.random_range(0..10);
            // Every generate and every redirect gets exactly one final event of its own id
            // (a redirect that crosses the natural end is a new turn).
            let mut expect = vec![json!(id)];
            let mut stray_errors = 0;
            match action {
                0 | 1 => {
                    ws.send(json!({"type": "cancel"})).await;
                    t.cancels += 1;
                }
                2 | 3 => {
                    expect.push(json!(id + 500));
                    ws.send(json!({"type": "redirect", "content": words(&mut rng), "max_tokens": 20, "id": id + 500})).await;
                    t.redirects += 1;
                }
                4 => {
                    ws.0.send(Message::text("{not json")).await.unwrap();
                    ws.0.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
                    stray_errors = 2;
                    t.garbage += 1;
                }
                5 => tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await, // reads late
                6 => {
                    t.disconnects += 1;
                    break; // drops the socket mid-turn
                }
                _ => {}
            }
            // Read to the final events, in order, and the garbage's refusals (at any time).
            let mut finals = Vec::new();
            while finals.len() < expect.len() || stray_errors > 0 {
                let v = within(&mut ws, Duration::from_secs(60)).await.expect("a turn ended with no final event within 60 s");
                match v["type"].as_str().unwrap() {
                    "delta" => assert!(finals.len() < expect.len(), "a delta after the last final event: {v}"),
                    "error" if v.get("turn_ended").is_none() && stray_errors > 0 => stray_errors -= 1,
                    "error" => panic!("turn {id}: a final error: {v}"),
                    "done" => {
                        assert!(finals.len() < expect.len(), "one final event too many: {v}");
                        assert_eq!(v["id"], expect[finals.len()], "the final events come in order, one per request: {v}");
                        if v["finish_reason"] == "redirected" {
                            assert_eq!(expect.len(), 2, "only a redirect says redirected: {v}");
                        }
                        finals.push(v);
                    }
                    other => panic!("unexpected {other}: {v}"),
                }
            }
            let fin = finals.pop().expect("a final event");
            // A turn that ran the model (not one cancelled while it still waited) shows
            // what it reused.
            let ran = fin["timings"]["forward_passes"].as_u64().unwrap() > 0 || fin["timings"]["prompt_ms"].as_f64().unwrap() > 0.0;
            if let (Some(n), true) = (must_reuse, ran) {
                assert!(fin["usage"]["cached_tokens"].as_u64().unwrap() >= n, "the cache survived the cancel: {fin}");
                t.cache_checks += 1;
                must_reuse = None;
            }
            if fin["finish_reason"] == "cancelled" {
                // What its cache held must survive: the whole prompt once an answer began,
                // else what it had reused (a turn cancelled while queued or in prefill).
                let u = &fin["usage"];
                let began = u["completion_tokens"].as_u64().unwrap() > 0;
                let n = u[if began { "prompt_tokens" } else { "cached_tokens" }].as_u64().unwrap();
                must_reuse = Some(must_reuse.unwrap_or(0).max(n));
            }
            // Exactly one final event: nothing else follows it.
            if let Some(v) = within(&mut ws, Duration::from_millis(30)).await {
                panic!("turn {id}: a message after its final event: {v}");
            }
            t.turns += 1;
        }
    }
    t
}

/// The Responses API's WebSocket mode: creates, continuations, steers and cancels.
async fn responses_client(addr: String, seed: u64, until: Instant) -> Tally {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = Tally::default();
    while Instant::now() < until {
        let (s, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/responses")).await.expect("connect");
        let mut ws = Ws(s);
        let mut last: Option<String> = None;
        for _ in 0..rng.random_range(2..7) {
            let mut create = json!({"type": "response.create", "input": words(&mut rng), "max_output_tokens": rng.random_range(2..80)});
            if let Some(prev) = &last {
                create["previous_response_id"] = json!(prev);
            }
            ws.send(create).await;
            let action = rng.random_range(0..8);
            if action == 5 {
                t.disconnects += 1;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
                break;
            }
            // Responses still to end: this one, and a steer's successor.
            // `replies`: steers not yet answered (accepted or failed, always one).
            let (mut open, mut acted, mut stray, mut replies) = (1, false, 0, 0);
            let mut ends: Vec<Value> = Vec::new();
            while open > 0 || stray > 0 || replies > 0 {
                let v = within(&mut ws, Duration::from_secs(60)).await.expect("a response ended with no final event within 60 s");
                let kind = v["type"].as_str().unwrap().to_string();
                if kind == "response.output_text.delta" && !acted {
                    acted = true;
                    match action {
                        0 | 1 => {
                            ws.send(json!({"type": "response.cancel"})).await;
                            t.cancels += 1;
                        }
                        2 | 3 => {
                            ws.send(json!({"type": "response.steer", "input": words(&mut rng)})).await;
                            replies += 1;
                            t.steers += 1;
                        }
                        4 => {
                            ws.0.send(Message::text("[1, 2")).await.unwrap();
                            stray += 1;
                            t.garbage += 1;
                        }
                        _ => {}
                    }
                }
                match kind.as_str() {
                    "response.steer.accepted" => {
                        open += 1;
                        replies -= 1;
                    }
                    "response.steer.failed" => {
                        assert_eq!(v["error"]["code"], "response_not_active", "a steer fails only once its response ended: {v}");
                        replies -= 1;
                    }
                    "error" if stray > 0 => stray -= 1,
                    "error" | "response.failed" => panic!("a failure: {v}"),
                    "response.completed" | "response.incomplete" => {
                        open -= 1;
                        ends.push(v["response"].clone());
                    }
                    _ => {}
                }
            }
            // Each response ended once.
            let mut ids: Vec<&str> = ends.iter().map(|r| r["id"].as_str().unwrap()).collect();
            ids.dedup();
            assert_eq!(ids.len(), ends.len(), "one final event per response: {ends:?}");
            if ends.len() == 2 {
                assert_eq!(ends[1]["previous_response_id"], ends[0]["id"], "the successor continues the steered response");
            }
            if let Some(v) = within(&mut ws, Duration::from_millis(30)).await {
                panic!("a message after the final event: {v}");
            }
            last = ends.last().and_then(|r| r["id"].as_str()).map(str::to_string);
            t.turns += ends.len();
        }
    }
    t
}

/// HTTP streams (chat completions and responses), some dropped mid-answer.
fn http_client(addr: String, seed: u64, until: Instant) -> Tally {
    use std::io::{Read, Write};
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = Tally::default();
    while Instant::now() < until {
        let (path, body) = if rng.random_bool(0.5) {
            ("/v1/responses", json!({"input": words(&mut rng), "stream": true, "max_output_tokens": rng.random_range(2..200)}))
        } else {
            ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": words(&mut rng)}], "stream": true, "max_tokens": rng.random_range(2..200)}))
        };
        let body = body.to_string();
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        write!(c, "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        if rng.random_bool(0.4) {
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf);
            t.disconnects += 1;
            continue; // dropped mid-answer
        }
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let end = if path == "/v1/responses" { "\"response.completed\"" } else { "[DONE]" };
        assert!(out.contains(end) || out.contains("response.incomplete"), "the stream ended properly: {out}");
        t.turns += 1;
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_turn_ends_once_under_cancel_redirect_steer_and_disconnect() {
    let s = Server::start(&tiny_model(GgmlType::Q8_0, 2048), &["--parallel", "4", "--max-sessions", "64"]);
    let addr = s.addr.clone();
    let until = Instant::now() + Duration::from_secs(secs());
    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(tokio::spawn(ws_client(addr.clone(), i + 1, until)));
    }
    for i in 0..4 {
        tasks.push(tokio::spawn(responses_client(addr.clone(), i + 100, until)));
    }
    for i in 0..2 {
        let a = addr.clone();
        tasks.push(tokio::task::spawn_blocking(move || http_client(a, i + 200, until)));
    }
    // The well-behaved client on the side, and memory samples.
    let url = s.url("/v1/chat/completions");
    let pid = s.child.id();
    let side = tokio::task::spawn_blocking(move || {
        let (mut served, mut worst, mut rss) = (0, Duration::ZERO, Vec::new());
        while Instant::now() < until {
            let t0 = Instant::now();
            let r = http("POST", &url, &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).to_string());
            assert!(r.starts_with("HTTP/1.1 200"), "the well-behaved client was refused: {r}");
            worst = worst.max(t0.elapsed());
            served += 1;
            rss.push(rss_kb(pid));
            std::thread::sleep(Duration::from_millis(250));
        }
        (served, worst, rss)
    });
    let mut total = Tally::default();
    for task in tasks {
        let t = task.await.expect("a client failed its checks");
        total.turns += t.turns;
        total.cancels += t.cancels;
        total.redirects += t.redirects;
        total.steers += t.steers;
        total.disconnects += t.disconnects;
        total.garbage += t.garbage;
        total.cache_checks += t.cache_checks;
    }
    let (served, worst, rss) = side.await.unwrap();
    eprintln!("soak: {total:?}; side client served {served} requests, slowest {worst:?}; RSS {} -> {} KB", rss[rss.len() / 4], rss.last().unwrap());
    assert!(total.turns > 100 && total.cancels > 10 && total.redirects > 10 && total.steers > 5 && total.cache_checks > 3, "the mix ran: {total:?}");
    assert!(worst < Duration::from_secs(20), "the well-behaved client waited {worst:?}");
    // Memory: after the first quarter (caches grown), steady.
    let (early, late) = (rss[rss.len() / 4], *rss.last().unwrap());
    assert!(late < early + 64 * 1024, "memory grew from {early} KB to {late} KB");
    // Everything winds down to zero.
    let t = Instant::now();
    loop {
        let m = http("GET", &s.url("/metrics"), "");
        if m.contains("flint_active_generations 0") && m.contains("flint_queue_depth 0") && m.contains("flint_sessions 0") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "generations or sessions remain:\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = http("GET", &s.url("/metrics"), "");
    assert!(!m.contains("reason=\"internal\""), "no request failed inside: {m}");
}

/// The two races of the old lifecycle, made certain: with one generation place taken, a
/// turn is still queued when its cancel (or redirect) arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_or_redirect_of_a_queued_turn_ends_it_properly() {
    // A long context: the hog must still be generating when its cancel comes, however fast
    // the tiny model runs (at 2,048 positions the CPU backend reached the end first).
    let s = Server::tiny_long(&["--parallel", "1", "--max-queue", "2"]);
    let mut hog = s.ws().await;
    hog.send(json!({"type": "generate", "prompt": "hog", "max_tokens": 100000})).await;
    assert_eq!(hog.recv().await["type"], "delta");
    // Cancelled while queued: `done` with `cancelled`, no error, the session usable.
    let mut a = s.ws().await;
    a.send(json!({"type": "generate", "content": "hi", "max_tokens": 5, "id": 1})).await;
    a.send(json!({"type": "cancel"})).await;
    let (deltas, end) = a.until_end().await;
    assert!(deltas.is_empty(), "a queued turn generated nothing");
    assert_eq!((end["type"].as_str(), end["finish_reason"].as_str(), end["id"].as_i64()), (Some("done"), Some("cancelled"), Some(1)), "{end}");
    // Redirected while queued: the redirected turn follows, once the place is free.
    a.send(json!({"type": "generate", "content": "hi", "max_tokens": 5, "id": 2})).await;
    a.send(json!({"type": "redirect", "content": "instead", "max_tokens": 5, "id": 3})).await;
    let (_, end) = a.until_end().await;
    assert_eq!((end["finish_reason"].as_str(), end["id"].as_i64()), (Some("redirected"), Some(2)), "{end}");
    // Cancelled queued turns no longer count against --max-queue: many more fit.
    let mut others = Vec::new();
    for i in 0..6 {
        let mut w = s.ws().await;
        w.send(json!({"type": "generate", "content": "q", "max_tokens": 3, "id": 10 + i})).await;
        w.send(json!({"type": "cancel"})).await;
        let (_, end) = w.until_end().await;
        assert_eq!(end["finish_reason"], "cancelled", "{end}");
        others.push(w);
    }
    hog.send(json!({"type": "cancel"})).await;
    assert_eq!(hog.until_end().await.1["finish_reason"], "cancelled");
    // The redirected turn of `a` ran.
    let (_, end) = a.until_end().await;
    assert_eq!((end["type"].as_str(), end["id"].as_i64()), (Some("done"), Some(3)), "{end}");
    // And a generate right after a done is never busy.
    for i in 0..5 {
        a.send(json!({"type": "generate", "content": "again", "max_tokens": 2, "id": 20 + i})).await;
        let (_, end) = a.until_end().await;
        assert_eq!(end["type"], "done", "{end}");
    }
}
