//! `/v1/ws`: one persistent WebSocket per conversation (protocol: docs/protocol.md).
//!
//! The conversation's tokens are kept here and its KV cache in the engine thread, so a
//! follow-up turn or a redirect appends to the context and prefills only the new tokens.

use super::scheduler::{Event, Job, Slot, CHANNEL};
use super::{ApiError, GenParams, State};
use crate::generate::{FinishReason, Outcome};
use crate::tokenizer::Message;
use axum::extract::ws::{CloseFrame, Message as Ws, WebSocket, WebSocketUpgrade};
use axum::extract::State as AxState;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// Frames beyond this close the connection (code 1009); below it, messages over
/// `max_message` get an `error` event and the connection stays usable.
const HARD_LIMIT: usize = 16 << 20;

pub(super) async fn upgrade(AxState(state): AxState<Arc<State>>, ws: WebSocketUpgrade) -> Response {
    if *state.shutdown.borrow() {
        return super::openai::error_response(503, ApiError::new("shutting_down", "the server is shutting down"));
    }
    let Ok(permit) = state.sessions.clone().try_acquire_owned() else {
        let msg = format!("the server holds its maximum of {} sessions; retry later", state.opts.max_sessions);
        return super::openai::error_response(503, ApiError::new("busy", msg));
    };
    let hard = HARD_LIMIT.max(2 * state.opts.max_message);
    ws.max_message_size(hard).max_frame_size(hard).on_upgrade(move |socket| session(state, socket, permit)).into_response()
}

/// A turn's content: new messages for the conversation, or a raw prompt.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Turn {
    messages: Option<Vec<Message>>,
    /// One user message (shorthand for `messages: [{role: "user", content}]`).
    content: Option<String>,
    /// Raw completion: the whole context as text, no chat template.
    prompt: Option<String>,
    /// The expected output (e.g. the file being edited), for speculative decoding.
    prediction: Option<String>,
    /// Echoed on this turn's `done`.
    id: Option<Value>,
    #[serde(flatten)]
    params: GenParams,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Update {
    system: Option<String>,
    reset: bool,
    #[serde(flatten)]
    params: GenParams,
}

struct Running {
    rx: mpsc::Receiver<Event>,
    /// An event read while merging deltas, handed out next.
    pending: Option<Event>,
    cancel: Arc<AtomicBool>,
    id: Option<Value>,
    chat: bool,
    /// Set by `redirect`: the turn to start once this one has stopped.
    redirect: Option<Turn>,
}

struct Conn {
    id: u64,
    state: Arc<State>,
    system: Option<String>,
    defaults: GenParams,
    /// The tokens the conversation's KV cache holds: last prompt and answer.
    context: Vec<u32>,
    /// Whether `context` is a chat (so the next turn appends with the template).
    chat: bool,
    running: Option<Running>,
}

async fn session(state: Arc<State>, mut socket: WebSocket, _permit: OwnedSemaphorePermit) {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    state.metrics.sessions.inc();
    let mut c = Conn { id, state: state.clone(), system: None, defaults: GenParams::default(), context: Vec::new(), chat: false, running: None };
    let hello = json!({"type": "session", "id": id.to_string(), "model": state.model_id, "n_ctx": state.n_ctx});
    let mut shutdown = state.shutdown.clone();
    let mut last_seen = tokio::time::Instant::now();
    if socket.send(text(&hello)).await.is_ok() {
        loop {
            if *shutdown.borrow() && c.running.is_none() {
                let close = CloseFrame { code: 1001, reason: "server shutting down".into() };
                let _ = socket.send(Ws::Close(Some(close))).await;
                break;
            }
            let idle = tokio::time::sleep_until(last_seen + state.opts.idle_timeout);
            let out = tokio::select! {
                m = socket.recv() => match m {
                    Some(Ok(m)) => {
                        last_seen = tokio::time::Instant::now();
                        c.on_message(m)
                    }
                    _ => break, // closed or broken: the engine cancels the job when its channel closes
                },
                _ = idle, if c.running.is_none() => {
                    let close = CloseFrame { code: 1001, reason: "idle".into() };
                    let _ = socket.send(Ws::Close(Some(close))).await;
                    break;
                }
                ev = next_event(&mut c.running) => {
                    last_seen = tokio::time::Instant::now();
                    c.on_event(ev)
                }
                _ = shutdown.changed(), if !*shutdown.borrow() => Vec::new(),
            };
            let mut ok = true;
            for v in out {
                // A client that stops reading is dropped rather than waited for forever.
                let sent = tokio::time::timeout(super::scheduler::CLIENT_STALL, socket.send(text(&v))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    ok = false;
                    break;
                }
            }
            if !ok {
                break;
            }
        }
    }
    if let Some(r) = &c.running {
        r.cancel.store(true, Ordering::SeqCst);
    }
    drop(c.running.take());
    state.scheduler.close(id);
    state.metrics.sessions.dec();
}

fn text(v: &Value) -> Ws {
    Ws::Text(v.to_string().into())
}

fn error(e: ApiError) -> Value {
    json!({"type": "error", "code": e.code, "message": e.message})
}

/// The next event of the running generation, with the deltas already waiting merged into
/// one (a slow client gets fewer, larger messages). Pending forever when none runs.
async fn next_event(r: &mut Option<Running>) -> Event {
    let Some(r) = r else { return std::future::pending().await };
    if let Some(ev) = r.pending.take() {
        return ev;
    }
    let Some(first) = r.rx.recv().await else {
        return Event::Error { code: "internal", message: "the engine dropped the generation".into() };
    };
    let Event::Delta { mut text, mut tokens } = first else { return first };
    while let Ok(ev) = r.rx.try_recv() {
        match ev {
            Event::Delta { text: t, tokens: k } => {
                text.push_str(&t);
                tokens.extend(k);
            }
            other => {
                r.pending = Some(other);
                break;
            }
        }
    }
    Event::Delta { text, tokens }
}

impl Conn {
    fn on_message(&mut self, m: Ws) -> Vec<Value> {
        let s = match m {
            Ws::Text(s) => s,
            Ws::Binary(_) => return vec![error(ApiError::new("binary_frame", "binary frames are not part of the protocol; send JSON text"))],
            _ => return Vec::new(), // ping, pong and close are handled by the socket
        };
        if s.len() > self.state.opts.max_message {
            let msg = format!("the message has {} bytes; the limit is {}", s.len(), self.state.opts.max_message);
            return vec![error(ApiError::new("too_large", msg))];
        }
        match self.dispatch(s.as_str()) {
            Ok(out) => out,
            Err(e) => vec![error(e)],
        }
    }

    fn dispatch(&mut self, s: &str) -> Result<Vec<Value>, ApiError> {
        let v: Value = serde_json::from_str(s).map_err(|e| ApiError::new("invalid_json", format!("not JSON: {e}")))?;
        let kind = v
            .as_object()
            .ok_or_else(|| ApiError::invalid("a message must be a JSON object"))?
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid("a message needs a string field \"type\""))?
            .to_string();
        fn parse<T: serde::de::DeserializeOwned>(kind: &str, v: Value) -> Result<T, ApiError> {
            serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("{kind}: {e}")))
        }
        match kind.as_str() {
            "session.update" => {
                let u: Update = parse(&kind, v)?;
                if self.running.is_some() && (u.reset || u.system.is_some()) {
                    return Err(ApiError::new("busy", "cannot reset the conversation while it generates; cancel first"));
                }
                if u.reset || u.system.is_some() {
                    self.context.clear();
                    self.chat = false;
                }
                if let Some(s) = u.system {
                    self.system = (!s.is_empty()).then_some(s);
                }
                let defaults = u.params.over(&self.defaults);
                // Check the new defaults now rather than at the next turn.
                self.state.request(vec![0], &defaults, None)?;
                self.defaults = defaults;
                Ok(vec![json!({"type": "session.updated", "system": self.system, "context_tokens": self.context.len()})])
            }
            "generate" => {
                if self.running.is_some() {
                    return Err(ApiError::new("busy", "a generation is running: cancel or redirect it"));
                }
                let t: Turn = parse(&kind, v)?;
                self.start(t)?;
                Ok(Vec::new())
            }
            "redirect" => {
                let t: Turn = parse(&kind, v)?;
                if t.prompt.is_some() {
                    return Err(ApiError::invalid("redirect continues the conversation: send content or messages"));
                }
                match &mut self.running {
                    Some(r) => {
                        r.redirect = Some(t);
                        r.cancel.store(true, Ordering::SeqCst);
                    }
                    None => self.start(t)?,
                }
                Ok(Vec::new())
            }
            "cancel" => {
                // A cancel that crosses the end of the generation is not an error.
                if let Some(r) = &self.running {
                    r.cancel.store(true, Ordering::SeqCst);
                }
                Ok(Vec::new())
            }
            other => Err(ApiError::new(
                "unknown_type",
                format!("unknown message type {other:?} (session.update, generate, cancel, redirect)"),
            )),
        }
    }

    /// Tokenize a turn against the conversation and hand it to the engine.
    fn start(&mut self, t: Turn) -> Result<(), ApiError> {
        let tk = &self.state.tokenizer;
        let bad = |e: anyhow::Error| ApiError::invalid(e.to_string());
        let (prompt, chat) = match (t.prompt, t.messages, t.content) {
            (Some(p), None, None) => (tk.encode(&p, false).map_err(bad)?, false),
            (None, msgs, content) => {
                let mut msgs = msgs.unwrap_or_default();
                if let Some(c) = content {
                    msgs.push(Message::new("user", &c));
                }
                if msgs.is_empty() {
                    return Err(ApiError::invalid("a turn needs content, messages or prompt"));
                }
                if let Some(m) = msgs.iter().find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant")) {
                    return Err(ApiError::invalid(format!("unknown role {:?} (system, user, assistant)", m.role)));
                }
                let tokens = if self.chat && !self.context.is_empty() {
                    let mut p = self.context.clone();
                    p.extend(tk.chat_continue(&msgs).map_err(bad)?);
                    p
                } else {
                    let mut all: Vec<Message> = self.system.iter().map(|s| Message::new("system", s)).collect();
                    all.extend(msgs);
                    tk.chat_tokens(&all).map_err(bad)?
                };
                (tokens, true)
            }
            _ => return Err(ApiError::invalid("send either prompt or content/messages, not both")),
        };
        let req = self.state.request(prompt, &t.params.over(&self.defaults), t.prediction.as_deref())?;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let cancel = State::new_cancel();
        self.state.scheduler.submit(Job { slot: Slot::Conv(self.id), req, cancel: cancel.clone(), events: tx });
        self.running = Some(Running { rx, pending: None, cancel, id: t.id, chat, redirect: None });
        Ok(())
    }

    fn on_event(&mut self, ev: Event) -> Vec<Value> {
        match ev {
            Event::Delta { text, tokens } => vec![json!({"type": "delta", "text": text, "tokens": tokens})],
            Event::Error { code, message } => {
                self.running = None;
                vec![error(ApiError { code, message })]
            }
            Event::Done(o) => {
                let r = self.running.take().expect("events come from a running generation");
                self.context = o.prompt_tokens.iter().chain(&o.tokens).copied().collect();
                self.chat = r.chat;
                let redirected = r.redirect.is_some() && o.finish_reason == FinishReason::Cancelled;
                let mut out = vec![done(&o, r.id, if redirected { "redirected" } else { o.finish_reason.as_str() })];
                if let Some(t) = r.redirect {
                    if let Err(e) = self.start(t) {
                        out.push(error(e));
                    }
                }
                out
            }
        }
    }
}

fn done(o: &Outcome, id: Option<Value>, reason: &str) -> Value {
    let t = &o.timings;
    json!({
        "type": "done",
        "id": id,
        "finish_reason": reason,
        "text": o.text,
        "usage": {
            "prompt_tokens": o.prompt_tokens.len(),
            "completion_tokens": o.tokens.len(),
            "cached_tokens": t.cached_tokens,
            "accepted_prediction_tokens": t.accepted,
            "rejected_prediction_tokens": t.rejected(),
        },
        "timings": super::timings_json(o),
    })
}
