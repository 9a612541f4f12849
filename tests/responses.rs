//! The OpenAI Responses API end to end: the official `openai` SDK (`tests/server/responses.py`)
//! and the real Codex CLI against a real `flint serve`, and the protocol's bad input over raw
//! HTTP and WebSocket.

mod common;

use common::codex::{codex, codex_exec, Keys};
use common::server::{body, counter, http, Server, Ws};
use common::{python_with, tiny_model};
use flint::quant::GgmlType;
use futures_util::SinkExt;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use tokio_tungstenite::tungstenite::Message;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn openai_sdk_responses_http_and_websocket_mode() {
    if !python_with("openai_sdk_responses", &["openai", "websockets"]) {
        return;
    }
    // The real model counts and stops where asked, so steering lands mid-answer.
    let model = common::real_model("openai_sdk_responses (real model)").unwrap_or_else(|| tiny_model(GgmlType::Q8_0, 2048));
    let s = Server::start(&model, &[]);
    let st = Command::new("python3").arg(root().join("tests/server/responses.py")).arg(format!("http://{}", s.addr)).status().unwrap();
    assert!(st.success(), "tests/server/responses.py failed");
}

#[test]
fn bad_requests_get_openai_errors_over_http() {
    let s = Server::tiny(&[]);
    let url = s.url("/v1/responses");
    let cases = [
        ("{not json", 400, "invalid_json"),
        ("[1]", 400, "invalid_request"),
        (r#"{"input": 5}"#, 400, "invalid_request"),
        (r#"{"input": "x", "text": {"format": {"type": "json_schema"}}}"#, 400, "unsupported"),
        (r#"{"input": [{"role": "robot", "content": "x"}]}"#, 400, "invalid_request"),
        (r#"{"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}"#, 400, "invalid_request"),
        (r#"{"input": "x", "previous_response_id": "resp_gone"}"#, 400, "previous_response_not_found"),
        (r#"{"input": "x", "max_output_tokens": 0}"#, 400, "invalid_request"),
        (r#"{"input": []}"#, 400, "invalid_request"),
    ];
    for (req, status, code) in cases {
        let r = http("POST", &url, req);
        assert!(r.starts_with(&format!("HTTP/1.1 {status}")), "{req}: {r}");
        let b = body(&r);
        assert_eq!(b["error"]["code"], code, "{req}: {r}");
        assert!(b["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
    }
    let r = http("GET", &s.url("/v1/responses/resp_nope"), "");
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    // A whole response, then retrieved, then deleted.
    let r = http("POST", &url, r#"{"input": "hello", "max_output_tokens": 4}"#);
    let resp = body(&r);
    assert_eq!(resp["object"], "response", "{r}");
    let id = resp["id"].as_str().unwrap();
    assert_eq!(body(&http("GET", &s.url(&format!("/v1/responses/{id}")), ""))["id"], id);
    assert_eq!(body(&http("DELETE", &s.url(&format!("/v1/responses/{id}")), ""))["deleted"], true);
    assert!(http("GET", &s.url(&format!("/v1/responses/{id}")), "").starts_with("HTTP/1.1 404"));
    // The server serves on, and no request failed inside.
    let m = http("GET", &s.url("/metrics"), "");
    assert!(!m.contains("reason=\"internal\""), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_events_over_the_websocket_mode_leave_it_usable() {
    let s = Server::tiny(&["--max-message", "4096"]);
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/responses", s.addr)).await.unwrap();
    let mut ws = Ws(ws);
    let expect_error = |v: &Value, code: &str| {
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["code"], code, "nested, as the SDK reads it: {v}");
        assert_eq!(v["code"], code, "and flat: {v}");
    };
    ws.0.send(Message::text("{oops")).await.unwrap();
    expect_error(&ws.recv().await, "invalid_json");
    ws.0.send(Message::binary(vec![0u8; 4])).await.unwrap();
    expect_error(&ws.recv().await, "binary_frame");
    ws.send(json!({"type": "response.explode"})).await;
    expect_error(&ws.recv().await, "unknown_type");
    ws.send(json!({"type": "response.create", "input": "x".repeat(5000)})).await;
    expect_error(&ws.recv().await, "too_large");
    ws.send(json!({"type": "response.create", "input": "x", "stream_id": "bad lane!"})).await;
    expect_error(&ws.recv().await, "invalid_stream_id");
    ws.send(json!({"type": "response.create", "input": "x", "previous_response_id": "resp_nope"})).await;
    expect_error(&ws.recv().await, "previous_response_not_found");
    ws.send(json!({"type": "response.steer", "input": "x"})).await;
    let v = ws.recv().await;
    assert_eq!((v["type"].as_str(), v["error"]["code"].as_str()), (Some("response.steer.failed"), Some("response_not_active")), "{v}");
    // Still usable: a response runs to its end.
    ws.send(json!({"type": "response.create", "input": "hello", "max_output_tokens": 3})).await;
    loop {
        let v = ws.recv().await;
        if v["type"] == "response.incomplete" || v["type"] == "response.completed" {
            assert!(v["response"]["usage"]["output_tokens"].as_u64().unwrap() <= 3, "{v}");
            break;
        }
        assert_ne!(v["type"], "error", "{v}");
    }
}

/// A new connection (an agent's next run, say) picks up the cache a closed one left behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_connection_reuses_the_cache_a_closed_one_left() {
    let s = Server::tiny(&[]);
    let input = "You are a careful reviewer. ".repeat(20) + "Review this.";
    let mut cached = Vec::new();
    for _ in 0..2 {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/responses", s.addr)).await.unwrap();
        let mut ws = Ws(ws);
        ws.send(json!({"type": "response.create", "input": input, "max_output_tokens": 2})).await;
        loop {
            let v = ws.recv().await;
            if v["type"] == "response.completed" || v["type"] == "response.incomplete" {
                cached.push((v["response"]["usage"]["input_tokens_details"]["cached_tokens"].as_u64().unwrap(), v["response"]["usage"]["input_tokens"].as_u64().unwrap()));
                break;
            }
        }
        drop(ws);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(cached[0].0, 0, "the first connection starts cold");
    assert!(cached[1].0 + 1 >= cached[1].1, "the second reuses all but the last prompt token: {cached:?}");
}

#[test]
fn the_codex_cli_answers_over_http_and_websocket() {
    let Some(bin) = codex("the_codex_cli_answers_over_http_and_websocket") else { return };
    let Some(model) = common::real_model("the_codex_cli (real model)") else { return };
    let s = Server::start(&model, &["--max-tokens", "64"]);
    let home = common::temp_dir("codex-home");
    std::fs::create_dir_all(&home).unwrap();
    // Over HTTP (server-sent events): the answer is printed on stdout.
    let (rc, out, err) = codex_exec(&bin, &home, &s.addr, false, Keys::default(), "say hi");
    eprintln!("codex over HTTP: rc {rc}, stdout {out:?}");
    assert_eq!(rc, 0, "codex exec over HTTP failed:\n{err}");
    assert!(!out.trim().is_empty(), "codex printed no answer:\n{err}");
    assert!(!err.contains("Model metadata"), "Codex took Flint's catalog entry without a warning:\n{err}");
    // Over the WebSocket mode: the prewarm (`generate: false`) prefills the instructions and
    // tools, and the turn continues on that cache with only its new input.
    let before = http("GET", &s.url("/metrics"), "");
    let (rc, out, err) = codex_exec(&bin, &home, &s.addr, true, Keys::default(), "say hi");
    eprintln!("codex over WebSocket: rc {rc}, stdout {out:?}");
    assert_eq!(rc, 0, "codex exec over WebSocket failed:\n{err}");
    assert!(!out.trim().is_empty(), "codex printed no answer:\n{err}");
    let after = http("GET", &s.url("/metrics"), "");
    let opened = "flint_sessions_opened_total{protocol=\"responses\"}";
    assert!(counter(&after, opened) > counter(&before, opened), "Codex used the WebSocket mode:\n{after}");
    let cached = "flint_cached_prompt_tokens_total";
    assert!(counter(&after, cached) > counter(&before, cached) + 1000, "the turn continued on the prewarmed cache:\n{after}");
    // A request past the context: Codex shows OpenAI's context_length_exceeded as such.
    let long = "Summarize this text. ".to_string() + &"the quick brown fox jumps over the lazy dog ".repeat(1200);
    let (rc, _, err) = codex_exec(&bin, &home, &s.addr, false, Keys::default(), &long);
    assert_ne!(rc, 0);
    assert!(err.contains("context window"), "Codex shows the context error:\n{err}");
    assert!(!http("GET", &s.url("/metrics"), "").contains("reason=\"internal\""));
}
