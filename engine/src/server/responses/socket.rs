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

use super::http::{previous, Ended, Running};
use super::store::Stored;
use super::Create;
use crate::server::guard::Caller;
use crate::server::scheduler::{Control, Event, Events, Slot};
use crate::server::{ApiError, State};
use axum::extract::ws::{CloseFrame, Message as Ws, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State as AxState};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;

/// Lanes per connection, and creates waiting per lane.
const MAX_LANES: usize = 8;
const MAX_WAITING: usize = 16;

pub async fn upgrade(AxState(state): AxState<Arc<State>>, Extension(who): Extension<Caller>, ws: WebSocketUpgrade) -> Response {
    match crate::server::ws::admit(&state, ws) {
        Ok((permit, ws)) => ws.on_upgrade(move |socket| session(state, who, socket, permit)).into_response(),
        Err(r) => r,
    }
}

struct Active {
    id: String,
    control: Control,
    events: Events,
    run: Running,
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
    /// Whose connection it is: each response counts against its key's limits.
    who: Caller,
    lanes: HashMap<Option<String>, Lane>,
}

/// What woke the connection.
enum Wake {
    Message(Option<Result<Ws, axum::Error>>),
    Engine(Option<String>, Option<Event>),
    Idle,
    Nothing,
}

/// The next engine event of any lane's running response (the connection reads them itself:
/// no task between the engine and the socket). Pending forever when none runs.
async fn next_event(lanes: &mut HashMap<Option<String>, Lane>) -> (Option<String>, Option<Event>) {
    let running: Vec<_> = lanes
        .iter_mut()
        .filter_map(|(lane, l)| {
            let a = l.active.as_mut()?;
            Some(Box::pin(async move { (lane.clone(), a.events.recv_merged().await) }))
        })
        .collect();
    if running.is_empty() {
        return std::future::pending().await;
    }
    futures_util::future::select_all(running).await.0
}

async fn session(state: Arc<State>, who: Caller, mut socket: WebSocket, _permit: OwnedSemaphorePermit) {
    state.metrics.sessions.inc();
    state.metrics.sessions_opened.get_or_create(&crate::server::metrics::Protocol { protocol: "responses" }).inc();
    let mut c = Conn { state: state.clone(), who, lanes: HashMap::new() };
    let mut shutdown = state.shutdown.clone();
    let mut last_seen = tokio::time::Instant::now();
    loop {
        let busy = c.lanes.values().any(|l| l.active.is_some());
        if *shutdown.borrow() && !busy {
            let _ = socket.send(Ws::Close(Some(CloseFrame { code: 1001, reason: "server shutting down".into() }))).await;
            break;
        }
        let idle = tokio::time::sleep_until(last_seen + state.opts.idle_timeout);
        let wake = tokio::select! {
            m = socket.recv() => Wake::Message(m),
            (lane, ev) = next_event(&mut c.lanes) => Wake::Engine(lane, ev),
            _ = idle, if !busy => Wake::Idle,
            _ = shutdown.changed(), if !*shutdown.borrow() => Wake::Nothing,
        };
        let sends = match wake {
            Wake::Message(Some(Ok(m))) => {
                last_seen = tokio::time::Instant::now();
                c.on_message(m)
            }
            Wake::Message(_) => break, // closed or broken
            Wake::Engine(lane, ev) => {
                last_seen = tokio::time::Instant::now();
                c.on_event(lane, ev)
            }
            Wake::Idle => {
                let _ = socket.send(Ws::Close(Some(CloseFrame { code: 1001, reason: "idle".into() }))).await;
                break;
            }
            Wake::Nothing => Vec::new(),
        };
        // All of a step's events in one write (a first token comes with its item's
        // opening events).
        if !crate::server::ws::send_all(&mut socket, sends).await {
            break;
        }
    }
    // Closing the socket cancels whatever runs (dropping its events would too).
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
    let mut v = json!({"type": "error", "status": status, "code": e.code, "message": e.message, "param": null,
        "error": {"type": kind, "code": e.code, "message": e.message, "param": null}});
    if let Some(s) = e.retry_after {
        v["retry_after"] = json!(s);
    }
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
        let mut run = Running::new(&self.state, c, &p);
        let id = run.emitter.id().to_string();
        let conv = self.lane(&lane)?.conv;
        let hold = self.who.turn(&self.state.metrics)?;
        let ticket = self.state.scheduler.submit_held(Slot::Conv(conv), p.req, hold)?;
        let opening = run.begin(&self.state).into_iter().map(|v| with_lane(v, &lane)).collect();
        self.lane(&lane)?.active = Some(Active { id, control: ticket.control, events: ticket.events, run, steer: None });
        Ok(opening)
    }

    /// An engine event of a lane's running response.
    fn on_event(&mut self, lane: Option<String>, ev: Option<Event>) -> Vec<Value> {
        let Some(a) = self.lanes.get_mut(&lane).and_then(|l| l.active.as_mut()) else { return Vec::new() };
        let (evs, end) = a.run.on_event(&self.state, ev, &a.control);
        let mut out: Vec<Value> = evs.into_iter().map(|v| with_lane(v, &lane)).collect();
        if let Some(ended) = end {
            out.extend(self.on_ended(lane, ended));
        }
        out
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
