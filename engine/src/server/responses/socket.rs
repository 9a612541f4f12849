//! The Responses API's WebSocket mode: one persistent socket to `/v1/responses`.
//!
//! Client events: `response.create` (the POST body; `generate: false` only prefills;
//! `stream_id` names a lane), `response.steer` (`input`, optionally the running response's
//! `previous_response_id` or a `stream_id`), and Flint's `response.cancel`. Server events:
//! the same events as the HTTP stream, one per text message, each with its lane's
//! `stream_id`; `response.steer.accepted` / `response.steer.failed`; `error`.
//!
//! Each lane runs one response at a time on its own KV cache; further creates wait in
//! order. The connection keeps every lane's latest response, so `previous_response_id`
//! plus the new input continues on that cache even with `store: false`. A steer stops the
//! running response at its next token (`response.incomplete`, reason `steered`) and starts
//! its successor at once: the steering input appended to the partial answer.

use super::http::{drive, previous, Ended, Outlet, Running};
use super::store::Stored;
use super::Create;
use crate::server::scheduler::{Control, Slot};
use crate::server::{ApiError, State};
use axum::extract::ws::{CloseFrame, Message as Ws, WebSocket, WebSocketUpgrade};
use axum::extract::State as AxState;
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// Lanes per connection, and creates waiting per lane.
const MAX_LANES: usize = 8;
const MAX_WAITING: usize = 16;

pub async fn upgrade(AxState(state): AxState<Arc<State>>, ws: WebSocketUpgrade) -> Response {
    match crate::server::ws::admit(&state, ws) {
        Ok((permit, ws)) => ws.on_upgrade(move |socket| session(state, socket, permit)).into_response(),
        Err(r) => r,
    }
}

/// What a response's task hands the connection.
enum Out {
    Event(Option<String>, Value),
    Ended(Option<String>, Ended),
}

struct Active {
    id: String,
    control: Control,
    /// An accepted steer's input: the successor's.
    steer: Option<Value>,
}

struct Lane {
    /// The engine's conversation slot: this lane's KV cache.
    conv: u64,
    active: Option<Active>,
    waiting: VecDeque<Create>,
    latest: Option<Arc<Stored>>,
}

struct Conn {
    state: Arc<State>,
    lanes: HashMap<Option<String>, Lane>,
    out: mpsc::Sender<Out>,
}

async fn session(state: Arc<State>, mut socket: WebSocket, _permit: OwnedSemaphorePermit) {
    state.metrics.sessions.inc();
    state.metrics.sessions_opened.get_or_create(&crate::server::metrics::Protocol { protocol: "responses" }).inc();
    let (out, mut events) = mpsc::channel(64);
    let mut c = Conn { state: state.clone(), lanes: HashMap::new(), out };
    let mut shutdown = state.shutdown.clone();
    let mut last_seen = tokio::time::Instant::now();
    loop {
        let busy = c.lanes.values().any(|l| l.active.is_some());
        if *shutdown.borrow() && !busy {
            let _ = socket.send(Ws::Close(Some(CloseFrame { code: 1001, reason: "server shutting down".into() }))).await;
            break;
        }
        let idle = tokio::time::sleep_until(last_seen + state.opts.idle_timeout);
        let sends = tokio::select! {
            m = socket.recv() => match m {
                Some(Ok(m)) => {
                    last_seen = tokio::time::Instant::now();
                    c.on_message(m)
                }
                _ => break,
            },
            o = events.recv() => {
                last_seen = tokio::time::Instant::now();
                let Some(mut o) = o else { break };
                // With every event already waiting: one write for all (a first token comes
                // with its item's opening events).
                let mut out = Vec::new();
                loop {
                    match o {
                        Out::Event(lane, v) => out.push(with_lane(v, &lane)),
                        Out::Ended(lane, ended) => out.extend(c.on_ended(lane, ended)),
                    }
                    match events.try_recv() {
                        Ok(next) => o = next,
                        Err(_) => break,
                    }
                }
                out
            }
            _ = idle, if !busy => {
                let _ = socket.send(Ws::Close(Some(CloseFrame { code: 1001, reason: "idle".into() }))).await;
                break;
            }
            _ = shutdown.changed(), if !*shutdown.borrow() => Vec::new(),
        };
        if sends.is_empty() {
            continue;
        }
        let write = async {
            for v in sends {
                socket.feed(Ws::Text(v.to_string().into())).await?;
            }
            socket.flush().await
        };
        // A client that stops reading is dropped rather than waited for forever.
        if !matches!(tokio::time::timeout(crate::server::scheduler::CLIENT_STALL, write).await, Ok(Ok(()))) {
            break;
        }
    }
    // Closing the socket cancels whatever runs; each task ends as its events do.
    for lane in c.lanes.values() {
        if let Some(a) = &lane.active {
            a.control.cancel();
        }
        state.scheduler.close(lane.conv);
    }
    state.metrics.sessions.dec();
}

fn lane_name(s: &str) -> bool {
    (1..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn with_lane(mut v: Value, lane: &Option<String>) -> Value {
    if let Some(l) = lane {
        v["stream_id"] = json!(l);
    }
    v
}

/// An `error` event in both shapes the clients read (see [`super::emit::Emitter::error`]).
fn error(e: &ApiError, lane: &Option<String>) -> Value {
    let status = crate::server::openai::status_of(e.code);
    let kind = if status >= 500 { "server_error" } else { "invalid_request_error" };
    let v = json!({"type": "error", "status": status, "code": e.code, "message": e.message, "param": null,
        "error": {"type": kind, "code": e.code, "message": e.message, "param": null}});
    with_lane(v, lane)
}

impl Conn {
    fn on_message(&mut self, m: Ws) -> Vec<Value> {
        let s = match m {
            Ws::Text(s) => s,
            Ws::Binary(_) => return vec![error(&ApiError::new("binary_frame", "binary frames are not part of the protocol; send JSON text"), &None)],
            _ => return Vec::new(),
        };
        if s.len() > self.state.opts.max_message {
            let msg = format!("the message has {} bytes; the limit is {}", s.len(), self.state.opts.max_message);
            return vec![error(&ApiError::new("too_large", msg), &None)];
        }
        let v: Value = match serde_json::from_str(&s) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return vec![error(&ApiError::invalid("an event must be a JSON object"), &None)],
            Err(e) => return vec![error(&ApiError::new("invalid_json", format!("not JSON: {e}")), &None)],
        };
        let lane = match v.get("stream_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if lane_name(s) => Some(s.clone()),
            Some(_) => {
                let e = ApiError::new("invalid_stream_id", "stream_id must be 1 to 256 characters of A-Z, a-z, 0-9, '_', '.' and '-'");
                return vec![error(&e, &None)];
            }
        };
        let kind = v.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
        let r = match kind.as_str() {
            "response.create" => Create::parse(v).and_then(|c| self.create(lane.clone(), c)),
            "response.steer" => Ok(self.steer(lane.clone(), &v)),
            "response.cancel" => {
                // A cancel that crosses the response's end is not an error.
                if let Some(a) = self.lanes.get_mut(&lane).and_then(|l| l.active.as_mut()) {
                    a.steer = None;
                    a.control.cancel();
                }
                Ok(Vec::new())
            }
            other => Err(ApiError::new(
                "unknown_type",
                format!("unknown event type {other:?} (response.create, response.steer, response.cancel)"),
            )),
        };
        r.unwrap_or_else(|e| vec![error(&e, &lane)])
    }

    fn lane(&mut self, lane: &Option<String>) -> Result<&mut Lane, ApiError> {
        if !self.lanes.contains_key(lane) {
            if self.lanes.len() >= MAX_LANES {
                return Err(ApiError::new("websocket_stream_limit_reached", format!("a connection has at most {MAX_LANES} lanes (stream_id)")));
            }
            let conv = self.state.next_id.fetch_add(1, Ordering::Relaxed);
            self.lanes.insert(lane.clone(), Lane { conv, active: None, waiting: VecDeque::new(), latest: None });
        }
        Ok(self.lanes.get_mut(lane).expect("inserted"))
    }

    /// Start the create now, or queue it behind its lane's running response.
    fn create(&mut self, lane: Option<String>, c: Create) -> Result<Vec<Value>, ApiError> {
        let l = self.lane(&lane)?;
        if l.active.is_some() {
            if l.waiting.len() >= MAX_WAITING {
                return Err(ApiError::new("busy", format!("{MAX_WAITING} responses already wait on this lane")));
            }
            l.waiting.push_back(c);
            return Ok(Vec::new());
        }
        self.start(lane, c)
    }

    /// The stored response a create continues: this connection's own first (kept even
    /// with `store: false`), then the server's store.
    fn previous(&self, id: Option<&str>) -> Result<Option<Arc<Stored>>, ApiError> {
        let own = id.and_then(|id| self.lanes.values().filter_map(|l| l.latest.clone()).find(|s| s.response["id"] == id));
        match own {
            Some(s) => Ok(Some(s)),
            None => previous(&self.state, id),
        }
    }

    fn start(&mut self, lane: Option<String>, c: Create) -> Result<Vec<Value>, ApiError> {
        let prev = self.previous(c.previous_response_id.as_deref())?;
        let p = c.prepare(&self.state, prev.as_deref())?;
        let run = Running::new(&self.state, c, &p);
        let id = run.emitter.id().to_string();
        let conv = self.lane(&lane)?.conv;
        let ticket = self.state.scheduler.submit(Slot::Conv(conv), p.req)?;
        self.lane(&lane)?.active = Some(Active { id, control: ticket.control.clone(), steer: None });
        let (state, out) = (self.state.clone(), self.out.clone());
        tokio::spawn(async move {
            let tagged = lane.clone();
            let outlet = Outlet { tx: out.clone(), wrap: Box::new(move |v| Out::Event(tagged.clone(), v)) };
            // A connection that is gone closes `out`: the response ends with it.
            let ended = drive(state, run, ticket.events, ticket.control, None, outlet).await;
            let _ = out.send(Out::Ended(lane, ended)).await;
        });
        Ok(Vec::new())
    }

    fn steer(&mut self, lane: Option<String>, v: &Value) -> Vec<Value> {
        let target = v.get("previous_response_id").and_then(Value::as_str);
        let input = v.get("input").filter(|i| !i.is_null()).cloned();
        let steer = json!({"previous_response_id": target, "input": input});
        let failed = |code: &str, message: &str| {
            let error = json!({"type": "invalid_request_error", "code": code, "message": message});
            vec![with_lane(json!({"type": "response.steer.failed", "error": error, "steer": steer}), &lane)]
        };
        let Some(input) = input.clone() else {
            return failed("invalid_input", "response.steer needs input");
        };
        let Some(a) = self.lanes.get_mut(&lane).and_then(|l| l.active.as_mut()) else {
            return failed("response_not_active", "no response is running on this lane");
        };
        if target.is_some_and(|t| t != a.id) {
            return failed("response_not_found", "that response is not the one running on this lane");
        }
        if a.steer.is_some() {
            return failed("too_many_pending_steers", "this response is already being steered");
        }
        a.steer = Some(input.clone());
        a.control.steer();
        let steer = json!({"previous_response_id": a.id, "input": input});
        vec![with_lane(json!({"type": "response.steer.accepted", "steer": steer}), &lane)]
    }

    /// A response's task ended: its successor (a steer's, or the next waiting create) starts.
    fn on_ended(&mut self, lane: Option<String>, ended: Ended) -> Vec<Value> {
        let Some(l) = self.lanes.get_mut(&lane) else { return Vec::new() };
        let steer = l.active.take().and_then(|a| a.steer);
        let next = match ended {
            Ended::Done(stored) => {
                l.latest = Some(stored.clone());
                steer.map(|input| {
                    // The steered response's settings, continuing from its partial answer.
                    let mut c = stored.create.clone();
                    c.input = Some(input);
                    c.previous_response_id = stored.response["id"].as_str().map(str::to_string);
                    c.generate = None;
                    c
                })
            }
            Ended::Failed | Ended::Gone => None,
        };
        let mut out = Vec::new();
        let mut next = next.or_else(|| l.waiting.pop_front());
        while let Some(c) = next.take() {
            match self.start(lane.clone(), c) {
                Ok(v) => out.extend(v),
                Err(e) => {
                    out.push(error(&e, &lane));
                    next = self.lanes.get_mut(&lane).and_then(|l| l.waiting.pop_front());
                }
            }
        }
        out
    }
}
