//! A response's stream of server events, in OpenAI's order: `response.created`,
//! `response.in_progress`, then for each output item `response.output_item.added`, its
//! content (`response.content_part.added`, `response.output_text.delta`...,
//! `response.output_text.done`, `response.content_part.done`; or a call's
//! `response.function_call_arguments.delta` and `.done`), `response.output_item.done`, and
//! one final `response.completed`, `response.incomplete` or `response.failed`. Every event
//! carries an increasing `sequence_number`. The same events go out as server-sent events
//! and as WebSocket messages.

use super::tools::{CallParser, Piece};
use super::{new_id, now};
use crate::generate::{FinishReason, Outcome};
use serde_json::{json, Value};

/// How a response ended, beyond its outcome's finish reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// As the outcome says (stop, length, or a cancel by a client that went away).
    Natural,
    /// `response.cancel`: status `cancelled`.
    Cancelled,
    /// `response.steer`: `incomplete`, reason `steered`; a successor follows.
    Steered,
}

pub struct Emitter {
    seq: u64,
    /// The Response object as created: id, model, the request's echoed settings.
    base: Value,
    output: Vec<Value>,
    /// The message item being streamed: its id and text so far.
    open: Option<(String, String)>,
    /// Present when the request offers tools: the output is parsed for calls.
    calls: Option<CallParser>,
}

impl Emitter {
    pub fn new(id: &str, model: &str, echo: &Value, tools: bool) -> Emitter {
        let mut base = json!({"id": id, "object": "response", "created_at": now(), "status": "in_progress", "background": false,
            "error": null, "incomplete_details": null, "model": model, "output": [], "usage": null});
        if let (Some(b), Some(e)) = (base.as_object_mut(), echo.as_object()) {
            b.extend(e.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Emitter { seq: 0, base, output: Vec::new(), open: None, calls: tools.then(CallParser::default) }
    }

    pub fn id(&self) -> &str {
        self.base["id"].as_str().unwrap_or_default()
    }

    fn event(&mut self, kind: &str, mut v: Value) -> Value {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        v
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<Value> {
        let r = self.base.clone();
        vec![self.event("response.created", json!({"response": r})), self.event("response.in_progress", json!({"response": r}))]
    }

    /// Events for newly generated text.
    pub fn text(&mut self, text: &str) -> Vec<Value> {
        let pieces = match &mut self.calls {
            Some(p) => p.push(text),
            None => vec![Piece::Text(text.to_string())],
        };
        self.pieces(pieces)
    }

    fn pieces(&mut self, pieces: Vec<Piece>) -> Vec<Value> {
        let mut out = Vec::new();
        for p in pieces {
            match p {
                Piece::Text(t) if t.is_empty() => {}
                Piece::Text(t) => {
                    if self.open.is_none() {
                        // Whitespace between calls opens no message.
                        if t.trim().is_empty() && !self.output.is_empty() {
                            continue;
                        }
                        let id = new_id("msg");
                        let index = self.output.len();
                        let item = json!({"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []});
                        out.push(self.event("response.output_item.added", json!({"output_index": index, "item": item})));
                        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
                        out.push(self.event("response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0, "part": part})));
                        self.open = Some((id, String::new()));
                    }
                    let (id, acc) = self.open.as_mut().expect("opened above");
                    acc.push_str(&t);
                    let id = id.clone();
                    let index = self.output.len();
                    out.push(self.event(
                        "response.output_text.delta",
                        json!({"item_id": id, "output_index": index, "content_index": 0, "delta": t, "logprobs": []}),
                    ));
                }
                Piece::Call { name, arguments } => {
                    out.extend(self.close_message());
                    let (id, call_id, index) = (new_id("fc"), new_id("call"), self.output.len());
                    let mut item = json!({"id": id, "type": "function_call", "status": "in_progress", "call_id": call_id, "name": name, "arguments": ""});
                    out.push(self.event("response.output_item.added", json!({"output_index": index, "item": item})));
                    out.push(self.event(
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": index, "delta": arguments}),
                    ));
                    out.push(self.event(
                        "response.function_call_arguments.done",
                        json!({"item_id": id, "output_index": index, "name": name, "arguments": arguments}),
                    ));
                    item["status"] = json!("completed");
                    item["arguments"] = json!(arguments);
                    out.push(self.event("response.output_item.done", json!({"output_index": index, "item": item})));
                    self.output.push(item);
                }
            }
        }
        out
    }

    fn close_message(&mut self) -> Vec<Value> {
        let Some((id, text)) = self.open.take() else { return Vec::new() };
        let index = self.output.len();
        let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
        let item = json!({"id": id, "type": "message", "status": "completed", "role": "assistant", "content": [part]});
        let out = vec![
            self.event("response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []})),
            self.event("response.content_part.done", json!({"item_id": id, "output_index": index, "content_index": 0, "part": part})),
            self.event("response.output_item.done", json!({"output_index": index, "item": item})),
        ];
        self.output.push(item);
        out
    }

    /// The closing events and the finished Response object.
    pub fn finish(&mut self, o: &Outcome, ending: Ending, timings: Value) -> (Vec<Value>, Value) {
        let rest = self.calls.as_mut().map(CallParser::finish).unwrap_or_default();
        let mut out = self.pieces(rest);
        out.extend(self.close_message());
        let (status, reason, kind) = match (ending, o.finish_reason) {
            (Ending::Steered, _) => ("incomplete", Some("steered"), "response.incomplete"),
            (Ending::Cancelled, _) | (Ending::Natural, FinishReason::Cancelled) => ("cancelled", None, "response.incomplete"),
            (Ending::Natural, FinishReason::Length) if o.tokens.is_empty() && o.timings.forward_passes == 0 => {
                // Prefill only (`generate: false`), or no room at all: nothing to say.
                ("completed", None, "response.completed")
            }
            (Ending::Natural, FinishReason::Length) => ("incomplete", Some("max_output_tokens"), "response.incomplete"),
            (Ending::Natural, FinishReason::Stop) => ("completed", None, "response.completed"),
        };
        let mut r = self.base.clone();
        r["status"] = json!(status);
        r["incomplete_details"] = reason.map_or(Value::Null, |r| json!({"reason": r}));
        r["output"] = json!(self.output);
        r["output_text"] = json!(self.output_text());
        r["usage"] = usage(o);
        r["timings"] = timings;
        out.push(self.event(kind, json!({"response": r})));
        (out, r)
    }

    /// The closing `response.failed`, for a failure after the response started.
    pub fn failed(&mut self, code: &str, message: &str) -> Value {
        let mut r = self.base.clone();
        r["status"] = json!("failed");
        r["error"] = json!({"code": code, "message": message});
        r["output"] = json!(self.output);
        self.event("response.failed", json!({"response": r}))
    }

    /// The text of the output's messages.
    fn output_text(&self) -> String {
        let texts = self.output.iter().filter(|i| i["type"] == "message").filter_map(|i| i["content"][0]["text"].as_str());
        texts.collect()
    }
}

pub fn usage(o: &Outcome) -> Value {
    let (i, n) = (o.prompt_tokens.len(), o.tokens.len());
    json!({
        "input_tokens": i,
        "input_tokens_details": {"cached_tokens": o.timings.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": n,
        "output_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": o.timings.accepted, "rejected_prediction_tokens": o.timings.rejected()},
        "total_tokens": i + n,
    })
}
