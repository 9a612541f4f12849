//! `POST /v1/responses` (whole, or streamed as server-sent events), `GET` and `DELETE
//! /v1/responses/{id}`; and [`Running`], which turns one response's engine events into its
//! Responses events for either transport.

use super::emit::{Emitter, Ending};
use super::store::Stored;
use super::{Create, Prepared};
use crate::server::openai::{error_response, fail, parse_body};
use crate::server::guard::Caller;
use crate::server::scheduler::{Control, Event, Events, Slot, Why};
use crate::server::{timings_json, ApiError, State};
use crate::generate::{FinishReason, Outcome};
use crate::tokenizer::Message;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State as AxState};
use axum::response::sse::{Event as Sse, Sse as SseBody};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A response on its way: its events' emitter and what its stored record needs. Both
/// transports feed it the engine's events ([`Running::on_event`]) and send what it returns.
pub struct Running {
    pub emitter: Emitter,
    pub create: Create,
    pub messages: Vec<Message>,
    pub system: String,
    /// For `generate: false`, the prompt: its response completes at once.
    warm: Option<Vec<u32>>,
    /// Completed before the engine ended (`generate: false`): its record.
    concluded: Option<Arc<Stored>>,
}

impl Running {
    pub fn new(s: &State, create: Create, p: &Prepared) -> Running {
        let emitter = Emitter::new(&super::new_id("resp"), &s.model_id, &create.echo(), p.tools);
        let warm = (create.generate == Some(false)).then(|| p.req.prompt.clone());
        Running { emitter, create, messages: p.messages.clone(), system: p.system.clone(), warm, concluded: None }
    }

    /// The opening events (`response.created`, `response.in_progress`). A prefill-only
    /// response completes here too: an id to continue from, while the engine warms the cache
    /// (the lane's next response waits for it).
    pub fn begin(&mut self, s: &State) -> Vec<Value> {
        let mut out = self.emitter.start();
        if let Some(prompt) = self.warm.take() {
            let o = Outcome { prompt_tokens: prompt, tokens: Vec::new(), text: String::new(), finish_reason: FinishReason::Length, timings: Default::default() };
            let (evs, stored) = self.conclude(s, &o, Ending::Natural);
            out.extend(evs);
            self.concluded = Some(stored);
        }
        out
    }

    /// One of the engine's events: the Responses events it makes, and the end, if it is one.
    pub fn on_event(&mut self, s: &State, ev: Option<Event>, control: &Control) -> (Vec<Value>, Option<Ended>) {
        if let Some(stored) = &self.concluded {
            let end = (!matches!(ev, Some(Event::Delta { .. }))).then(|| Ended::Done(stored.clone()));
            return (Vec::new(), end);
        }
        match ev {
            Some(Event::Delta { text, .. }) => (self.emitter.text(&text), None),
            Some(Event::Done(o)) => {
                let ending = match control.requested() {
                    Some(Why::Steered) => Ending::Steered,
                    Some(_) => Ending::Cancelled,
                    None => Ending::Natural,
                };
                let (evs, stored) = self.conclude(s, &o, ending);
                (evs, Some(Ended::Done(stored)))
            }
            Some(Event::Error { code, message }) => (vec![self.emitter.failed(code, &message)], Some(Ended::Failed)),
            None => (vec![self.emitter.failed("internal", "the engine ended the response without a final event")], Some(Ended::Failed)),
        }
    }

    /// The closing events and the stored record of a finished response.
    fn conclude(&mut self, s: &State, o: &Outcome, ending: Ending) -> (Vec<Value>, Arc<Stored>) {
        let (evs, response) = self.emitter.finish(o, ending, timings_json(o));
        let mut messages = std::mem::take(&mut self.messages);
        if self.create.generate != Some(false) {
            messages.push(Message::new("assistant", &o.text));
        }
        let context = o.prompt_tokens.iter().chain(&o.tokens).copied().collect();
        let stored = Arc::new(Stored::new(response, context, messages, std::mem::take(&mut self.system), self.create.clone()));
        if stored.create.store != Some(false) {
            s.responses.put(self.emitter.id().to_string(), stored.clone());
        }
        (evs, stored)
    }
}

/// How a response ended.
pub enum Ended {
    /// The response finished (completed, incomplete or cancelled): its record.
    Done(Arc<Stored>),
    /// It failed after it started (`response.failed` was sent).
    Failed,
    /// The receiving side went away.
    Gone,
}

/// Send one response's events to `out` until its end. `first` is an event already read
/// from `events`.
async fn drive(s: Arc<State>, mut run: Running, mut events: Events, control: Control, first: Option<Event>, out: mpsc::Sender<Value>) -> Ended {
    for v in run.begin(&s) {
        if out.send(v).await.is_err() {
            return Ended::Gone;
        }
    }
    let mut first = first;
    loop {
        let ev = match first.take() {
            Some(ev) => Some(ev),
            None => tokio::select! {
                ev = events.recv_merged() => ev,
                // Dropping `events` cancels the generation at once.
                _ = out.closed() => return Ended::Gone,
            },
        };
        let (evs, end) = run.on_event(&s, ev, &control);
        for v in evs {
            if out.send(v).await.is_err() {
                return end.unwrap_or(Ended::Gone);
            }
        }
        if let Some(end) = end {
            return end;
        }
    }
}

/// The stored response `previous_response_id` names, or OpenAI's 400.
pub fn previous(s: &State, id: Option<&str>) -> Result<Option<Arc<Stored>>, ApiError> {
    match id {
        None => Ok(None),
        Some(id) => s
            .responses
            .get(id)
            .map(Some)
            .ok_or_else(|| ApiError::new("previous_response_not_found", format!("Previous response with id '{id}' not found."))),
    }
}

pub async fn create(AxState(s): AxState<Arc<State>>, Extension(who): Extension<Caller>, body: Result<Bytes, BytesRejection>) -> Response {
    let c = match parse_body(body).and_then(Create::parse) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let prepared = previous(&s, c.previous_response_id.as_deref()).and_then(|prev| c.prepare(&s, prev.as_deref()));
    let p = match prepared {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let stream = c.stream == Some(true);
    let run = Running::new(&s, c, &p);
    let hold = match who.lease(&s.metrics) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    let ticket = match s.scheduler.submit_held(Slot::Pool, p.req, hold) {
        Ok(t) => t,
        Err(r) => return fail(r.into()),
    };
    let mut events = ticket.events;
    // Wait for the first event so a refusal gets its HTTP status.
    let first = match events.recv().await {
        Some(Event::Error { code, message }) => return fail(ApiError::new(code, message)),
        Some(ev) => ev,
        None => return fail(ApiError::new("internal", "the engine dropped the request")),
    };
    let (tx, mut rx) = mpsc::channel::<Value>(64);
    let driving = tokio::spawn(drive(s.clone(), run, events, ticket.control, Some(first), tx));
    if stream {
        let body = stream::unfold(rx, |mut rx| async move {
            let v = rx.recv().await?;
            let kind = v["type"].as_str().unwrap_or("message").to_string();
            Some((Ok::<_, Infallible>(Sse::default().event(kind).data(v.to_string())), rx))
        });
        return SseBody::new(body).into_response();
    }
    // Whole: the answer is the finished Response object.
    let mut last = Value::Null;
    while let Some(v) = rx.recv().await {
        last = v;
    }
    match driving.await {
        Ok(Ended::Done(stored)) => axum::Json(stored.response.clone()).into_response(),
        _ => {
            let message = last["response"]["error"]["message"].as_str().unwrap_or("the response failed").to_string();
            fail(ApiError::new("internal", message))
        }
    }
}

pub async fn get(AxState(s): AxState<Arc<State>>, Path(id): Path<String>) -> Response {
    match s.responses.get(&id) {
        Some(r) => axum::Json(r.response.clone()).into_response(),
        None => not_found(&id),
    }
}

pub async fn delete(AxState(s): AxState<Arc<State>>, Path(id): Path<String>) -> Response {
    if s.responses.delete(&id) {
        axum::Json(json!({"id": id, "object": "response", "deleted": true})).into_response()
    } else {
        not_found(&id)
    }
}

fn not_found(id: &str) -> Response {
    error_response(404, ApiError::new("not_found", format!("Response with id '{id}' not found.")))
}
