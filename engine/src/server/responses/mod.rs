//! The OpenAI Responses API: `POST /v1/responses` (whole or as server-sent events),
//! `GET`/`DELETE /v1/responses/{id}`, and its WebSocket mode on the same path
//! (docs/protocol.md).
//!
//! - [`Create`]: the request, parsed leniently (unknown fields and item types ignored,
//!   other tool types skipped) into a conversation of chat-template turns;
//! - [`store`]: finished responses, so `previous_response_id` continues on their tokens
//!   (and, where the engine still holds them, their KV cache);
//! - [`emit`]: the engine's events as the Responses stream, in OpenAI's order;
//! - [`http`] and [`socket`]: the two transports.

pub mod emit;
pub mod http;
pub mod socket;
pub mod store;
pub mod tools;

use super::{ApiError, GenParams, State};
use crate::generate::Request;
use crate::tokenizer::Message;
use serde::Deserialize;
use serde_json::{json, Value};
use store::Stored;
use tools::Tool;

/// A `response.create`: the `POST /v1/responses` body, or the WebSocket event.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Create {
    pub input: Option<Value>,
    pub instructions: Option<String>,
    pub previous_response_id: Option<String>,
    pub store: Option<bool>,
    pub max_output_tokens: Option<usize>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub stream: Option<bool>,
    pub text: Option<Value>,
    pub metadata: Option<Value>,
    pub prompt_cache_key: Option<String>,
    /// Flint's: the expected output, for speculative decoding.
    pub prediction: Option<Value>,
    /// WebSocket mode: `false` prefills the input (warming the cache) and answers with an
    /// id and no output.
    pub generate: Option<bool>,
    /// WebSocket mode: the lane; one response at a time per lane, each on its own cache.
    pub stream_id: Option<String>,
    #[serde(flatten)]
    pub params: GenParams,
}

/// A request ready for the engine, with what its stored response needs.
pub struct Prepared {
    pub req: Request,
    /// The conversation, system turn included, that the prompt renders.
    pub messages: Vec<Message>,
    /// The system turn's text (instructions and tools): a continuation with the same one
    /// appends to the stored tokens; with another, the conversation is rendered afresh.
    pub system: String,
    /// Whether the output is parsed for tool calls.
    pub tools: bool,
}

impl Create {
    pub fn parse(v: Value) -> Result<Create, ApiError> {
        if !v.is_object() {
            return Err(ApiError::invalid("the request must be a JSON object"));
        }
        let c: Create = serde_json::from_value(v).map_err(|e| ApiError::invalid(e.to_string()))?;
        if let Some(f) = c.text.as_ref().and_then(|t| t.get("format")).and_then(|f| f.get("type")).and_then(Value::as_str) {
            if f != "text" {
                return Err(ApiError::new(
                    "unsupported",
                    format!("text.format {f:?} needs constrained decoding, which this server does not have yet; use \"text\""),
                ));
            }
        }
        Ok(c)
    }

    fn function_tools(&self) -> Vec<Tool> {
        let none = self.tool_choice.as_ref().and_then(Value::as_str) == Some("none");
        if none {
            return Vec::new();
        }
        Tool::from_request(self.tools.as_deref().unwrap_or_default())
    }

    /// The system turn: instructions, then the tools.
    fn system(&self, tools: &[Tool]) -> String {
        let mut parts: Vec<String> = self.instructions.iter().filter(|s| !s.is_empty()).cloned().collect();
        if !tools.is_empty() {
            parts.push(tools::system_section(tools));
        }
        parts.join("\n\n")
    }

    /// The engine request: the conversation (continuing `prev` where given) rendered with
    /// the chat template and tokenized, checked against the server's limits.
    pub fn prepare(&self, s: &State, prev: Option<&Stored>) -> Result<Prepared, ApiError> {
        let tk = &s.tokenizer;
        let bad = |e: anyhow::Error| ApiError::invalid(e.to_string());
        let new = input_messages(self.input.as_ref())?;
        let tools = self.function_tools();
        let system = self.system(&tools);
        let (prompt, messages) = match prev {
            Some(p) if p.system == system && p.answered() => {
                if new.is_empty() {
                    return Err(ApiError::invalid("input: a continuation needs new input"));
                }
                let mut prompt = p.context.clone();
                prompt.extend(tk.chat_continue(&new).map_err(bad)?);
                let mut messages = p.messages.clone();
                messages.extend(new);
                (prompt, messages)
            }
            _ => {
                let mut messages: Vec<Message> = Vec::new();
                if !system.is_empty() {
                    messages.push(Message::new("system", &system));
                }
                if let Some(p) = prev {
                    // New instructions replace the old ones (as OpenAI's do): the stored turns
                    // are rendered again under them. (A prefill-only predecessor is rendered
                    // again too; its tokens are still a prefix, so its cache is reused.)
                    messages.extend(p.messages.iter().skip(usize::from(!p.system.is_empty())).cloned());
                }
                messages.extend(new);
                if messages.is_empty() {
                    return Err(ApiError::invalid("input: the conversation is empty"));
                }
                (tk.chat_tokens(&messages).map_err(bad)?, messages)
            }
        };
        let prediction = match &self.prediction {
            None => None,
            Some(p) if p.get("type").and_then(Value::as_str) == Some("content") => Some(content_text(p.get("content"))?),
            Some(_) => return Err(ApiError::invalid("prediction: only {\"type\": \"content\", \"content\": ...} is supported")),
        };
        let params = GenParams { max_tokens: self.max_output_tokens.or(self.params.max_tokens), ..self.params.clone() };
        let mut req = s.request(prompt, &params, prediction.as_deref()).map_err(|e| match e.code {
            "context_full" => ApiError::new("context_length_exceeded", e.message),
            _ => e,
        })?;
        if self.generate == Some(false) {
            // Prefill only: the engine runs the prompt and stops before the first token.
            req.max_tokens = 0;
        }
        Ok(Prepared { req, messages, system, tools: !tools.is_empty() })
    }

    /// The request's settings as the Response object echoes them.
    pub fn echo(&self) -> Value {
        json!({
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata.clone().unwrap_or_else(|| json!({})),
            "parallel_tool_calls": self.parallel_tool_calls.unwrap_or(true),
            "previous_response_id": self.previous_response_id,
            "prompt_cache_key": self.prompt_cache_key,
            "reasoning": {"effort": null, "summary": null},
            "store": self.store.unwrap_or(true),
            "temperature": self.params.temperature.unwrap_or(crate::sampler::SamplerConfig::default().temperature),
            "text": {"format": {"type": "text"}},
            "tool_choice": self.tool_choice.clone().unwrap_or_else(|| json!("auto")),
            "tools": self.tools.clone().unwrap_or_default(),
            "top_p": self.params.top_p.unwrap_or(crate::sampler::SamplerConfig::default().top_p),
            "truncation": "disabled",
            "user": null,
        })
    }
}

/// Text of a content value: a string, or parts of which the text ones count.
fn content_text(c: Option<&Value>) -> Result<String, ApiError> {
    match c {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text" | "summary_text") => {
                        out.push_str(p.get("text").and_then(Value::as_str).unwrap_or_default())
                    }
                    Some(k @ ("input_image" | "input_file" | "input_audio")) => {
                        return Err(ApiError::invalid(format!("content part {k:?}: this server's models read text only")))
                    }
                    _ => {} // refusals, annotations, unknown parts: nothing the model reads
                }
            }
            Ok(out)
        }
        Some(other) => Err(ApiError::invalid(format!("content must be a string or a list of parts, not {other}"))),
    }
}

/// The input's items as chat-template turns. An assistant's text and calls in a row make
/// one assistant turn; call outputs in a row make one user turn.
pub fn input_messages(input: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let items = match input {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => return Ok(vec![Message::new("user", s)]),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(ApiError::invalid(format!("input must be a string or a list of items, not {other}"))),
    };
    let mut out: Vec<Message> = Vec::new();
    let mut push = |role: &str, text: String| match out.last_mut() {
        Some(m) if m.role == role && matches!(role, "assistant" | "tool") => {
            m.content.push('\n');
            m.content.push_str(&text);
        }
        _ => out.push(Message::new(role, &text)),
    };
    for item in items {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or(if item.get("role").is_some() { "message" } else { "" });
        let str_of = |k: &str| item.get(k).and_then(Value::as_str).unwrap_or_default();
        match kind {
            "message" => {
                let role = match str_of("role") {
                    "developer" | "system" => "system",
                    r @ ("user" | "assistant") => r,
                    other => return Err(ApiError::invalid(format!("input: unknown role {other:?} (system, developer, user, assistant)"))),
                };
                push(role, content_text(item.get("content"))?);
            }
            "function_call" => push("assistant", tools::render_call(str_of("name"), str_of("arguments"))),
            "custom_tool_call" => push("assistant", tools::render_call(str_of("name"), &Value::String(str_of("input").into()).to_string())),
            "function_call_output" | "custom_tool_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    other => content_text(other)?,
                };
                push("tool", tools::render_output(&output));
            }
            _ => {} // reasoning, web search calls and other items: nothing the model reads
        }
    }
    // Tool results go back in a user turn.
    for m in &mut out {
        if m.role == "tool" {
            m.role = "user".into();
        }
    }
    Ok(out)
}

/// A new id with OpenAI's prefixes (`resp_`, `msg_`, `fc_`, `call_`).
pub fn new_id(prefix: &str) -> String {
    use std::hash::BuildHasher;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Keyed by the process's random hash keys: ids do not repeat and are not guessable.
    let h = std::collections::hash_map::RandomState::new();
    format!("{prefix}_{:016x}{:08x}", h.hash_one(n), n as u32)
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
