//! `/v1/ws`: one persistent WebSocket per conversation (protocol: docs/protocol.md).
//!
//! The conversation's tokens are kept here and its KV cache in the engine thread, so a
//! follow-up turn or a redirect appends to the context and prefills only the new tokens.

use super::guard::Caller;
use super::scheduler::{Control, Event, Events, Slot};
use super::{ApiError, GenParams, State};
use crate::edit::Edit;
use crate::generate::Outcome;
use crate::tokenizer::Message;
use axum::extract::ws::{CloseFrame, Message as Ws, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State as AxState};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;

/// Frames beyond this close the connection (code 1009); below it, messages over
/// `max_message` get an `error` event and the connection stays usable.
const HARD_LIMIT: usize = 16 << 20;

pub(super) async fn upgrade(AxState(state): AxState<Arc<State>>, Extension(who): Extension<Caller>, ws: WebSocketUpgrade) -> Response {
    match admit(&state, ws) {
        Ok((permit, ws)) => ws.on_upgrade(move |socket| session(state, who, socket, permit)).into_response(),
        Err(r) => r,
    }
}

/// A session place and the socket's frame limits, or the HTTP refusal (shutting down, or
/// every session place taken). Both WebSocket protocols share the places.
pub(super) fn admit(state: &State, ws: WebSocketUpgrade) -> Result<(OwnedSemaphorePermit, WebSocketUpgrade), Response> {
    if *state.shutdown.borrow() {
        return Err(super::openai::error_response(503, ApiError::new("shutting_down", "the server is shutting down")));
    }
    let Ok(permit) = state.sessions.clone().try_acquire_owned() else {
        let msg = format!("the server holds its maximum of {} sessions; retry later", state.opts.max_sessions);
        return Err(super::openai::error_response(503, ApiError::new("busy", msg)));
    };
    let hard = HARD_LIMIT.max(2 * state.opts.max_message);
    // A browser that offers subprotocols (its key travels in one) fails the handshake
    // unless the server selects one of them.
    Ok((permit, ws.max_message_size(hard).max_frame_size(hard).protocols([super::guard::PROTOCOL])))
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
    /// A code edit (`crate::edit`): the server builds the prompt, the prediction and the
    /// stop; `done` carries the rewritten code as `edit.text`.
    edit: Option<EditTurn>,
    /// Echoed on this turn's `done`.
    id: Option<Value>,
    #[serde(flatten)]
    params: GenParams,
    /// Set for a `redirect`: an edit then continues the conversation it redirects.
    #[serde(skip)]
    redirect: bool,
    /// Set for a `prefill`: the edit's prompt up to its instruction, and no answer.
    #[serde(skip)]
    prefill: bool,
}

impl Turn {
    /// Whether the turn brings no content of its own (an edit or a prefill builds its prompt
    /// and prediction from `edit`).
    fn edit_alone(&self) -> bool {
        self.prompt.is_none() && self.messages.is_none() && self.content.is_none() && self.prediction.is_none()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EditTurn {
    code: String,
    instruction: String,
    language: String,
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
    events: Events,
    control: Control,
    id: Option<Value>,
    chat: bool,
    edit: Option<Edit>,
    /// A `prefill`: it ends with `prefilled`, and a `generate` may take its place.
    prefill: bool,
}

/// Where the conversation's turn is. A turn leaves `Running` or `Redirecting` only on its
/// final event (`done` or `error`), so the client's next `generate` after a `done` that is
/// not `redirected` always finds the conversation idle.
enum TurnState {
    Idle,
    Running(Running),
    /// `redirect` arrived: the running turn stops at its next token (or has just ended on
    /// its own), then this turn starts on its context. Its `done` says `redirected`.
    Redirecting(Running, Turn),
}

impl TurnState {
    fn running(&mut self) -> Option<&mut Running> {
        match self {
            TurnState::Idle => None,
            TurnState::Running(r) | TurnState::Redirecting(r, _) => Some(r),
        }
    }
}

struct Conn {
    id: u64,
    state: Arc<State>,
    /// Whose session it is: each turn counts against its key's limits.
    who: Caller,
    system: Option<String>,
    defaults: GenParams,
    /// The tokens the conversation's KV cache holds: last prompt and answer.
    context: Vec<u32>,
    /// Whether `context` is a chat (so the next turn appends with the template).
    chat: bool,
    turn: TurnState,
}

async fn session(state: Arc<State>, who: Caller, mut socket: WebSocket, _permit: OwnedSemaphorePermit) {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    state.metrics.sessions.inc();
    state.metrics.sessions_opened.get_or_create(&crate::server::metrics::Protocol { protocol: "ws" }).inc();
    let mut c = Conn { id, state: state.clone(), who, system: None, defaults: GenParams::default(), context: Vec::new(), chat: false, turn: TurnState::Idle };
    let hello = json!({"type": "session", "id": id.to_string(), "model": state.model_id, "n_ctx": state.n_ctx});
    let mut shutdown = state.shutdown.clone();
    let mut last_seen = tokio::time::Instant::now();
    if socket.send(text(&hello)).await.is_ok() {
        loop {
            if *shutdown.borrow() && matches!(c.turn, TurnState::Idle) {
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
                _ = idle, if matches!(c.turn, TurnState::Idle) => {
                    let close = CloseFrame { code: 1001, reason: "idle".into() };
                    let _ = socket.send(Ws::Close(Some(close))).await;
                    break;
                }
                ev = next_event(&mut c.turn) => {
                    last_seen = tokio::time::Instant::now();
                    c.on_event(ev)
                }
                _ = shutdown.changed(), if !*shutdown.borrow() => Vec::new(),
            };
            if !send_all(&mut socket, out).await {
                break;
            }
        }
    }
    if let Some(r) = c.turn.running() {
        r.control.cancel();
    }
    c.turn = TurnState::Idle;
    state.scheduler.close(id);
    state.metrics.sessions.dec();
}

/// Send messages in one write; false when the socket failed or its client read nothing for
/// [`super::scheduler::CLIENT_STALL`] (a client that stops reading is dropped rather than
/// waited for forever). Both WebSocket protocols send this way.
pub(super) async fn send_all(socket: &mut WebSocket, out: Vec<Value>) -> bool {
    use futures_util::SinkExt;
    if out.is_empty() {
        return true;
    }
    let write = async {
        for v in &out {
            socket.feed(text(v)).await?;
        }
        socket.flush().await
    };
    matches!(tokio::time::timeout(super::scheduler::CLIENT_STALL, write).await, Ok(Ok(())))
}

fn text(v: &Value) -> Ws {
    Ws::Text(v.to_string().into())
}

fn error(e: ApiError) -> Value {
    let mut v = json!({"type": "error", "code": e.code, "message": e.message});
    if let Some(s) = e.retry_after {
        v["retry_after"] = json!(s);
    }
    v
}

/// The next event of the running turn, with the deltas already waiting merged into one (a
/// slow client gets fewer, larger messages). Pending forever when no turn runs.
async fn next_event(t: &mut TurnState) -> Event {
    let Some(r) = t.running() else { return std::future::pending().await };
    match r.events.recv_merged().await {
        Some(ev) => ev,
        None => Event::Error { code: "internal", message: "the turn's events ended twice".into() },
    }
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
        let v: Value = match serde_json::from_str(s.as_str()) {
            Ok(v) => v,
            Err(e) => return vec![error(ApiError::new("invalid_json", format!("not JSON: {e}")))],
        };
        // A refusal names the message it answers by that message's `id`, if it had one.
        let id = v.get("id").cloned();
        match self.dispatch(v) {
            Ok(out) => out,
            Err(e) => {
                let mut v = error(e);
                if let Some(id) = id {
                    v["id"] = id;
                }
                vec![v]
            }
        }
    }

    fn dispatch(&mut self, v: Value) -> Result<Vec<Value>, ApiError> {
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
                if !matches!(self.turn, TurnState::Idle) && (u.reset || u.system.is_some()) {
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
            "generate" | "prefill" => {
                let mut t: Turn = parse(&kind, v)?;
                t.prefill = kind == "prefill";
                self.turn = match std::mem::replace(&mut self.turn, TurnState::Idle) {
                    TurnState::Idle => TurnState::Running(self.start(t)?),
                    // A prefill gives way: it stops after the chunk in flight (what it
                    // computed stays cached) and this turn follows.
                    TurnState::Running(r) | TurnState::Redirecting(r, _) if r.prefill => {
                        r.control.cancel();
                        TurnState::Redirecting(r, t)
                    }
                    busy => {
                        self.turn = busy;
                        return Err(ApiError::new("busy", "a generation is running: cancel or redirect it"));
                    }
                };
                Ok(Vec::new())
            }
            "redirect" => {
                let mut t: Turn = parse(&kind, v)?;
                t.redirect = true;
                if t.prompt.is_some() {
                    return Err(ApiError::invalid("redirect continues the conversation: send content or messages"));
                }
                // A second redirect before the first has started replaces it.
                self.turn = match std::mem::replace(&mut self.turn, TurnState::Idle) {
                    TurnState::Idle => TurnState::Running(self.start(t)?),
                    TurnState::Running(r) | TurnState::Redirecting(r, _) => {
                        r.control.steer();
                        TurnState::Redirecting(r, t)
                    }
                };
                Ok(Vec::new())
            }
            "cancel" => {
                // A cancel that crosses the end of the generation is not an error; it also
                // drops a redirect that has not started.
                self.turn = match std::mem::replace(&mut self.turn, TurnState::Idle) {
                    TurnState::Idle => TurnState::Idle,
                    TurnState::Running(r) | TurnState::Redirecting(r, _) => {
                        r.control.cancel();
                        TurnState::Running(r)
                    }
                };
                Ok(Vec::new())
            }
            other => Err(ApiError::new(
                "unknown_type",
                format!("unknown message type {other:?} (session.update, generate, prefill, cancel, redirect)"),
            )),
        }
    }

    /// Tokenize a turn against the conversation and hand it to the engine.
    fn start(&mut self, mut t: Turn) -> Result<Running, ApiError> {
        if t.prefill {
            return self.start_prefill(t);
        }
        if let Some(e) = t.edit.take() {
            return self.start_edit(t, e);
        }
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
        self.submit(req, t.id, chat, None)
    }

    /// An edit: a fresh conversation for `generate`; for `redirect`, the new instruction
    /// after the redirected answer (which stays in context).
    fn start_edit(&mut self, t: Turn, e: EditTurn) -> Result<Running, ApiError> {
        if !t.edit_alone() {
            return Err(ApiError::invalid("an edit turn brings its code and instruction in `edit` alone"));
        }
        let tk = &self.state.tokenizer;
        let bad = |e: anyhow::Error| ApiError::invalid(e.to_string());
        let e = Edit { code: e.code, instruction: e.instruction, language: e.language };
        let prompt = if t.redirect && self.chat && !self.context.is_empty() {
            let mut p = self.context.clone();
            p.extend(e.continuation(tk).map_err(bad)?);
            p
        } else {
            e.prompt(tk).map_err(bad)?
        };
        let mut params = t.params.over(&self.defaults);
        if params.max_tokens.is_none() {
            params.max_tokens = Some(e.default_max_tokens(tk).map_err(bad)?);
        }
        let prediction = e.prediction();
        let mut req = self.state.request(prompt, &params, Some(&prediction))?;
        req.stop.push(crate::edit::FENCE.to_string());
        self.submit(req, t.id, true, Some(e))
    }

    /// A prefill: the edit's prompt before its instruction runs into the conversation's KV
    /// cache (a fresh conversation), so the edit that follows prefills only the instruction.
    fn start_prefill(&mut self, t: Turn) -> Result<Running, ApiError> {
        if !t.edit_alone() {
            return Err(ApiError::invalid("a prefill brings its code in `edit` alone"));
        }
        let Some(e) = t.edit else { return Err(ApiError::invalid("prefill: send the code to come in `edit: {code, language}`")) };
        let e = Edit { code: e.code, instruction: String::new(), language: e.language };
        let prefix = e.prefix(&self.state.tokenizer).map_err(|e| ApiError::invalid(e.to_string()))?;
        // Checked like a turn's prompt, then run with no answer (the engine stops before
        // the first token, keeping the prompt's last token for the turn that follows).
        let mut req = self.state.request(prefix, &t.params.over(&self.defaults), None)?;
        req.max_tokens = 0;
        self.context.clear();
        self.chat = false;
        let mut r = self.submit(req, t.id, false, None)?;
        r.prefill = true;
        Ok(r)
    }

    fn submit(&mut self, req: crate::generate::Request, id: Option<Value>, chat: bool, edit: Option<Edit>) -> Result<Running, ApiError> {
        let hold = self.who.turn(&self.state.metrics)?;
        let ticket = self.state.scheduler.submit_held(Slot::Conv(self.id), req, hold)?;
        Ok(Running { events: ticket.events, control: ticket.control, id, chat, edit, prefill: false })
    }

    fn on_event(&mut self, ev: Event) -> Vec<Value> {
        let end = match ev {
            Event::Delta { text, tokens } => return vec![json!({"type": "delta", "text": text, "tokens": tokens})],
            Event::Error { code, message } => Err(ApiError::new(code, message)),
            Event::Done(o) => Ok(o),
        };
        // The final event: the turn is over, whatever follows.
        let (r, next) = match std::mem::replace(&mut self.turn, TurnState::Idle) {
            TurnState::Idle => unreachable!("events come from a running turn"),
            TurnState::Running(r) => (r, None),
            TurnState::Redirecting(r, t) => (r, Some(t)),
        };
        let mut out = vec![match end {
            Err(e) => {
                // Marked, so a client tells it from the refusal of a message it sent.
                let mut v = error(e);
                v["turn_ended"] = json!(true);
                v["id"] = r.id.unwrap_or(Value::Null);
                v
            }
            Ok(o) if r.prefill => {
                // The cache holds the prefix, not a conversation: the next turn starts one.
                let done = o.finish_reason != crate::generate::FinishReason::Cancelled;
                let t = &o.timings;
                json!({"type": "prefilled", "id": r.id, "complete": done, "prompt_tokens": o.prompt_tokens.len(),
                       "cached_tokens": t.cached_tokens, "prompt_ms": t.prompt_ms})
            }
            Ok(o) => {
                self.context = o.prompt_tokens.iter().chain(&o.tokens).copied().collect();
                self.chat = r.chat;
                // Redirected whether the stop cut the answer short or crossed its natural
                // end: either way the redirected turn follows.
                let reason = if next.is_some() { "redirected" } else { o.finish_reason.as_str() };
                let mut d = done(&o, r.id, reason);
                if let Some(e) = &r.edit {
                    d["edit"] = json!({"text": e.result(&o.text)});
                }
                d
            }
        }];
        if let Some(t) = next {
            match self.start(t) {
                Ok(r) => self.turn = TurnState::Running(r),
                Err(e) => out.push(error(e)),
            }
        }
        out
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
