//! OpenAI-compatible HTTP: `/v1/chat/completions`, `/v1/completions` (streaming as
//! server-sent events, or whole), `/v1/models`, and OpenAI-style error bodies.
//! A client that disconnects drops the event receiver, which cancels its generation.

use super::guard::Caller;
use super::scheduler::{Event, Events, Slot};
use super::{ApiError, GenParams, State};
use crate::generate::Outcome;
use crate::tokenizer::Message;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State as AxState};
use axum::http::StatusCode;
use axum::response::sse::{Event as Sse, Sse as SseBody};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) fn error_response(status: u16, e: ApiError) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = if status.is_server_error() {
        "server_error"
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        "requests"
    } else {
        "invalid_request_error"
    };
    let body = json!({"error": {"message": e.message, "type": kind, "param": null, "code": e.code}});
    let mut r = (status, axum::Json(body)).into_response();
    if let Some(s) = e.retry_after {
        r.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
    }
    r
}

pub(crate) fn status_of(code: &str) -> u16 {
    match code {
        "busy" | "shutting_down" => 503,
        "too_large" => 413,
        "not_found" => 404,
        "invalid_api_key" => 401,
        "forbidden" => 403,
        "unsupported_media_type" => 415,
        "rate_limit_exceeded" => 429,
        "internal" => 500,
        _ => 400,
    }
}

pub(crate) fn fail(e: ApiError) -> Response {
    error_response(status_of(e.code), e)
}

pub(super) async fn not_found(uri: axum::http::Uri) -> Response {
    fail(ApiError::new("not_found", format!("no route for {}", uri.path())))
}

pub(super) async fn models(AxState(s): AxState<Arc<State>>) -> Response {
    let m = json!({"id": s.model_id, "object": "model", "created": 0, "owned_by": "flint", "context_length": s.n_ctx});
    // `models`: the catalog the Codex CLI reads from its provider (it warns without one).
    axum::Json(json!({"object": "list", "data": [m], "models": [codex_model(&s)]})).into_response()
}

/// The model as an entry of the Codex CLI's model catalog (its `ModelInfo`; every field it
/// requires is here). The base instructions are Flint's short ones: Codex's own are 17 KB,
/// more than a small model's context can spare.
fn codex_model(s: &State) -> Value {
    json!({
        "slug": s.model_id, "display_name": s.model_id, "description": "served by Flint",
        "context_window": s.n_ctx, "supported_reasoning_levels": [], "shell_type": "shell_command",
        "visibility": "list", "supported_in_api": true, "priority": 1, "support_verbosity": false,
        "truncation_policy": {"mode": "tokens", "limit": 4096}, "experimental_supported_tools": [],
        "base_instructions": "You are Codex, a coding agent, running on a local model served by Flint. \
            Answer concisely. Use the tools when the task needs them.",
    })
}

/// Message content: a string, or text parts (`[{"type": "text", "text": ...}]`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(self) -> Result<String, ApiError> {
        match self {
            Content::Text(s) => Ok(s),
            Content::Parts(parts) => parts
                .into_iter()
                .map(|p| match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => Ok(t),
                    (k, _) => Err(ApiError::invalid(format!("content part type {k:?} is not supported (text only)"))),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct Prediction {
    #[serde(rename = "type")]
    kind: String,
    content: Content,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    prediction: Option<Prediction>,
    #[serde(flatten)]
    params: GenParams,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    serde_json::from_value(parse_body(body)?).map_err(|e| ApiError::invalid(e.to_string()))
}

/// A request body as a JSON object, or the reason it is not one.
pub(crate) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new("too_large", "the request body is over the server's limit")
        } else {
            ApiError::invalid(e.body_text())
        }
    })?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::new("invalid_json", format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object"));
    }
    Ok(v)
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

pub(super) async fn chat(AxState(s): AxState<Arc<State>>, Extension(who): Extension<Caller>, body: Result<Bytes, BytesRejection>) -> Response {
    let r: ChatRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let prompt = (|| {
        let mut msgs = Vec::with_capacity(r.messages.len());
        for m in r.messages {
            let role = match m.role.as_str() {
                "developer" => "system",
                "system" | "user" | "assistant" => m.role.as_str(),
                other => return Err(ApiError::invalid(format!("unsupported role {other:?} (system, developer, user, assistant)"))),
            };
            let content = m.content.map(Content::text).transpose()?.unwrap_or_default();
            msgs.push(Message::new(role, &content));
        }
        if msgs.is_empty() {
            return Err(ApiError::invalid("messages must not be empty"));
        }
        s.tokenizer.chat_tokens(&msgs).map_err(|e| ApiError::invalid(e.to_string()))
    })();
    match prompt {
        Ok(p) => run(s, who, p, r.common, Kind::Chat).await,
        Err(e) => fail(e),
    }
}

pub(super) async fn completions(AxState(s): AxState<Arc<State>>, Extension(who): Extension<Caller>, body: Result<Bytes, BytesRejection>) -> Response {
    let r: CompletionRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let prompt = match r.prompt {
        Prompt::Text(t) => s.tokenizer.encode(&t, false),
        Prompt::Texts(v) if v.len() == 1 => s.tokenizer.encode(&v[0], false),
        Prompt::Texts(_) => return fail(ApiError::invalid("prompt: one prompt per request")),
        Prompt::Tokens(t) => {
            let v = s.tokenizer.vocab_size();
            if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
                return fail(ApiError::invalid(format!("prompt: token id {bad} is outside the vocabulary of {v}")));
            }
            Ok(t)
        }
    };
    match prompt {
        Ok(p) => run(s, who, p, r.common, Kind::Completion).await,
        Err(e) => fail(ApiError::invalid(e.to_string())),
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn chunk(&self, choice: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]})
    }

    fn text_choice(&self, text: &str, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => json!({"index": 0, "delta": if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) }, "finish_reason": finish}),
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        }
    }
}

fn usage(o: &Outcome) -> Value {
    let t = &o.timings;
    json!({
        "prompt_tokens": o.prompt_tokens.len(),
        "completion_tokens": o.tokens.len(),
        "total_tokens": o.prompt_tokens.len() + o.tokens.len(),
        "prompt_tokens_details": {"cached_tokens": t.cached_tokens},
        "completion_tokens_details": {"accepted_prediction_tokens": t.accepted, "rejected_prediction_tokens": t.rejected()},
    })
}

async fn run(s: Arc<State>, who: Caller, prompt: Vec<u32>, c: Common, kind: Kind) -> Response {
    if c.n.is_some_and(|n| n != 1) {
        return fail(ApiError::invalid("n: only one choice per request"));
    }
    let prediction = match c.prediction {
        None => None,
        Some(p) if p.kind == "content" => match p.content.text() {
            Ok(t) => Some(t),
            Err(e) => return fail(e),
        },
        Some(p) => return fail(ApiError::invalid(format!("prediction type {:?} is not supported (content)", p.kind))),
    };
    let params = GenParams { max_tokens: c.params.max_tokens.or(c.max_completion_tokens), ..c.params };
    let req = match s.request(prompt, &params, prediction.as_deref()) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let hold = match who.lease(&s.metrics) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    // Dropping the events (a client that disconnects) cancels the generation.
    let mut rx = s.scheduler.submit_or_refuse(Slot::Pool, req, hold).events;
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let meta = Meta { id: format!("{prefix}-{}", s.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed)), created, model: s.model_id.clone(), kind };
    // Wait for the first event so a refusal (queue full, context) gets its HTTP status.
    let first = match rx.recv().await {
        Some(Event::Error { code, message }) => return fail(ApiError::new(code, message)),
        Some(ev) => ev,
        None => return fail(ApiError::new("internal", "the engine dropped the request")),
    };
    if c.stream {
        let include_usage = c.stream_options.is_some_and(|o| o.include_usage);
        SseBody::new(sse_stream(meta, first, rx, include_usage)).into_response()
    } else {
        whole(meta, first, rx).await
    }
}

async fn whole(meta: Meta, first: Event, mut rx: Events) -> Response {
    let mut ev = Some(first);
    loop {
        match ev {
            Some(Event::Delta { .. }) => {}
            Some(Event::Done(o)) => {
                let reason = o.finish_reason.as_str();
                let choice = match meta.kind {
                    Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": o.text}, "finish_reason": reason, "logprobs": null}),
                    Kind::Completion => json!({"index": 0, "text": o.text, "finish_reason": reason, "logprobs": null}),
                };
                let mut body = meta.chunk(choice);
                body["object"] = json!(match meta.kind {
                    Kind::Chat => "chat.completion",
                    Kind::Completion => "text_completion",
                });
                body["usage"] = usage(&o);
                body["timings"] = super::timings_json(&o);
                return axum::Json(body).into_response();
            }
            Some(Event::Error { code, message }) => return fail(ApiError::new(code, message)),
            None => return fail(ApiError::new("internal", "the engine dropped the request")),
        }
        ev = rx.recv().await;
    }
}

/// The generation as server-sent events: a role chunk (chat), text chunks, a finish chunk,
/// the usage chunk when asked for, then `[DONE]`.
fn sse_stream(meta: Meta, first: Event, rx: Events, include_usage: bool) -> impl Stream<Item = Result<Sse, Infallible>> {
    let data = |v: Value| Ok(Sse::default().data(v.to_string()));
    let mut opening = Vec::new();
    if let Kind::Chat = meta.kind {
        opening.push(data(meta.chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}))));
    }
    let state = (meta, Some(first), Some(rx), include_usage);
    let body = stream::unfold(state, move |(meta, mut first, mut rx, include_usage)| async move {
        let r = rx.as_mut()?;
        let ev = match first.take() {
            Some(ev) => Some(ev),
            None => r.recv().await,
        };
        let out: Vec<Result<Sse, Infallible>> = match ev {
            Some(Event::Delta { text, .. }) if text.is_empty() => Vec::new(),
            Some(Event::Delta { text, .. }) => vec![data(meta.chunk(meta.text_choice(&text, None)))],
            Some(Event::Done(o)) => {
                rx = None;
                let mut v = vec![data(meta.chunk(meta.text_choice("", Some(o.finish_reason.as_str()))))];
                if include_usage {
                    let mut u = meta.chunk(json!(null));
                    u["choices"] = json!([]);
                    u["usage"] = usage(&o);
                    u["timings"] = super::timings_json(&o);
                    v.push(data(u));
                }
                v.push(Ok(Sse::default().data("[DONE]")));
                v
            }
            Some(Event::Error { code, message }) => {
                rx = None;
                let kind = if status_of(code) >= 500 { "server_error" } else { "invalid_request_error" };
                vec![data(json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))]
            }
            None => {
                rx = None;
                Vec::new()
            }
        };
        Some((stream::iter(out), (meta, first, rx, include_usage)))
    });
    use futures_util::StreamExt;
    stream::iter(opening).chain(body.flatten())
}
