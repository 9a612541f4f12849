//! `flint chat --connect ws://HOST:PORT`: the terminal chat over a server's WebSocket.
//! Ctrl-C stops the answer (or quits when none runs); a line typed while the answer
//! streams redirects it; `/reset` starts a new conversation; Ctrl-D quits.

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::Write;
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

/// `defaults` is sent as the session's defaults (`session.update` fields); `key` is the
/// server's API key, sent as `Authorization: Bearer KEY`.
pub fn chat(url: &str, defaults: Value, key: Option<&str>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let r = rt.block_on(run(url, defaults, key));
    // Reading stdin occupies a blocking thread the runtime would otherwise wait for.
    rt.shutdown_background();
    r
}

fn prompt() {
    eprint!("> ");
    let _ = std::io::stderr().flush();
}

/// The WebSocket handshake, with the key; a refusal is told with the server's reason.
async fn open(url: &str, key: Option<&str>) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Error;
    let mut req = url.into_client_request().with_context(|| format!("not a WebSocket URL: {url}"))?;
    if let Some(k) = key {
        let v = format!("Bearer {k}").parse().context("the API key cannot travel in a header")?;
        req.headers_mut().insert("authorization", v);
    }
    match tokio_tungstenite::connect_async_with_config(req, None, true).await {
        Ok((ws, _)) => Ok(ws),
        Err(Error::Http(r)) => {
            let body = r.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let why = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["error"]["message"].as_str().map(String::from)).unwrap_or(body.into_owned());
            let hint = if r.status() == 401 && key.is_none() { " (pass --api-key or set FLINT_API_KEY)" } else { "" };
            bail!("{url} refused the connection: HTTP {}: {why}{hint}", r.status())
        }
        Err(e) => Err(e).with_context(|| format!("cannot connect to {url}")),
    }
}

async fn run(url: &str, defaults: Value, key: Option<&str>) -> Result<()> {
    let url = if url.ends_with("/v1/ws") { url.to_string() } else { format!("{}/v1/ws", url.trim_end_matches('/')) };
    let ws = open(&url, key).await?;
    let (mut tx, mut rx) = ws.split();
    let mut update = defaults;
    update["type"] = json!("session.update");
    tx.send(Message::text(update.to_string())).await?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut generating = false;
    // Redirects sent and not yet taken over a turn: one that arrives after the answer's end
    // starts a turn of its own (docs/protocol.md), so the answer goes on.
    let mut redirects = 0usize;
    let mut stdin_open = true;
    let mut resetting = false;
    let mut out = std::io::stdout();
    // One listener for the whole session: a `ctrl_c()` made afresh each turn of the loop
    // misses a Ctrl-C that lands while a delta is being written (seen in CI).
    let mut interrupts = interrupts()?;
    loop {
        tokio::select! {
            line = lines.next_line(), if stdin_open => {
                let Some(line) = line? else {
                    stdin_open = false;
                    if !generating { break }
                    continue;
                };
                let line = line.trim();
                if line.is_empty() {
                    if !generating { prompt() }
                    continue;
                }
                let msg = if line == "/reset" {
                    resetting = true;
                    json!({"type": "session.update", "reset": true})
                } else if generating {
                    eprintln!("\n[redirected]");
                    redirects += 1;
                    json!({"type": "redirect", "content": line})
                } else {
                    generating = true;
                    json!({"type": "generate", "content": line})
                };
                tx.send(Message::text(msg.to_string())).await?;
            }
            m = rx.next() => {
                let Some(m) = m else { bail!("the server closed the connection") };
                let m = m.context("the connection broke")?;
                let Message::Text(s) = m else {
                    if let Message::Close(f) = m {
                        bail!("the server closed the connection{}", f.map(|f| format!(": {}", f.reason)).unwrap_or_default());
                    }
                    continue;
                };
                let v: Value = serde_json::from_str(&s).context("the server sent something that is not JSON")?;
                match v["type"].as_str().unwrap_or("") {
                    "session" => {
                        eprintln!("[connected to {} · {} context · Ctrl-C stops an answer · type while it answers to redirect · /reset · Ctrl-D quits]", v["model"].as_str().unwrap_or("?"), v["n_ctx"]);
                        prompt();
                    }
                    "delta" => {
                        out.write_all(v["text"].as_str().unwrap_or("").as_bytes())?;
                        out.flush()?;
                    }
                    "done" => {
                        let (u, t) = (&v["usage"], &v["timings"]);
                        eprintln!(
                            "\n[{} · {} tokens at {:.1} tok/s · first token after {:.1} ms · {}/{} prompt tokens cached]",
                            v["finish_reason"].as_str().unwrap_or("?"), u["completion_tokens"], t["decode_tok_s"].as_f64().unwrap_or(0.0),
                            t["ttft_ms"].as_f64().unwrap_or(0.0), u["cached_tokens"], u["prompt_tokens"],
                        );
                        if v["finish_reason"] == "cancelled" {
                            redirects = 0; // a cancel drops the redirects not yet started
                        }
                        if redirects > 0 {
                            redirects -= 1; // the redirected turn follows
                        } else {
                            generating = false;
                            if !stdin_open { break }
                            prompt();
                        }
                    }
                    "error" => {
                        eprintln!("\n[error: {}: {}]", v["code"].as_str().unwrap_or("?"), v["message"].as_str().unwrap_or(""));
                        generating = false;
                        if !stdin_open { break }
                        prompt();
                    }
                    "session.updated" if resetting => {
                        resetting = false;
                        eprintln!("[new conversation]");
                        prompt();
                    }
                    _ => {}
                }
            }
            _ = interrupts.recv() => {
                if !generating {
                    eprintln!();
                    break;
                }
                tx.send(Message::text(json!({"type": "cancel"}).to_string())).await?;
            }
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    Ok(())
}

/// Ctrl-C as a stream that keeps the presses made while nobody was waiting for one.
fn interrupts() -> Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("cannot install the Ctrl-C handler")?;
        tokio::spawn(async move {
            while sig.recv().await.is_some() && tx.send(()).is_ok() {}
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() && tx.send(()).is_ok() {}
    });
    Ok(rx)
}
