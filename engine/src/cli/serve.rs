//! `flint serve`: its flags, checked, become the server's options.

use super::{model_path, ModelArgs};
use anyhow::{bail, Result};
use clap::Args;
use flint::Loaded;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Open WebSocket sessions at most (each keeps its conversation's KV cache).
    #[arg(long, default_value_t = 32)]
    max_sessions: usize,
    /// Generations in progress at once; they take turns step by step, the rest queue.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Generations waiting at most; beyond it requests are refused as busy.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Largest WebSocket message or HTTP body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_message: usize,
    /// Longest prompt in tokens (default: the model's context).
    #[arg(long)]
    max_prompt: Option<usize>,
    /// max_tokens for requests that do not set it.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Prompt tokens per prefill slice (a long prompt yields to other sessions between slices).
    #[arg(long, default_value_t = 128)]
    prefill_chunk: usize,
    /// Seconds running generations may go on after Ctrl-C or SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 5.0)]
    shutdown_grace: f64,
    /// Speculative decoding for requests that do not choose: none or ngram (prompt lookup).
    #[arg(long)]
    speculative: Option<String>,
    /// Seconds a WebSocket session may sit idle (no message, nothing generating) before it is closed.
    #[arg(long, default_value_t = 600.0)]
    idle_timeout: f64,
    /// Finished Responses-API responses kept for previous_response_id and GET /v1/responses/{id}
    /// (the oldest is evicted first; 0 keeps none).
    #[arg(long, default_value_t = 256)]
    max_stored_responses: usize,
    /// Seconds a stored response is kept.
    #[arg(long, default_value_t = 3600.0)]
    stored_response_ttl: f64,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if let Some(s) = a.speculative.as_deref() {
        if !matches!(s, "none" | "ngram") {
            bail!("--speculative for serve: none or ngram (requests bring their own prediction)");
        }
    }
    if !(a.shutdown_grace.is_finite() && a.shutdown_grace >= 0.0 && a.shutdown_grace < 1e9) {
        bail!("--shutdown-grace must be a number of seconds >= 0");
    }
    if !(a.idle_timeout.is_finite() && a.idle_timeout > 0.0 && a.idle_timeout < 1e9) {
        bail!("--idle-timeout must be a number of seconds > 0");
    }
    if !(a.stored_response_ttl.is_finite() && a.stored_response_ttl > 0.0 && a.stored_response_ttl < 1e9) {
        bail!("--stored-response-ttl must be a number of seconds > 0");
    }
    let path = model_path(&a.model.model)?;
    let l = Loaded::open(&path)?;
    let engine = l.engine_on(a.model.backend, 0, a.model.adapter.as_deref())?;
    let model_id = path.file_stem().map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let opts = flint::server::Options {
        host: a.host,
        port: a.port,
        max_sessions: a.max_sessions,
        parallel: a.parallel,
        max_queue: a.max_queue,
        max_message: a.max_message,
        max_prompt: a.max_prompt.unwrap_or(usize::MAX),
        default_max_tokens: a.max_tokens,
        prefill_chunk: a.prefill_chunk,
        shutdown_grace: std::time::Duration::from_secs_f64(a.shutdown_grace),
        idle_timeout: std::time::Duration::from_secs_f64(a.idle_timeout),
        speculative: a.speculative,
        max_stored_responses: a.max_stored_responses,
        stored_response_ttl: std::time::Duration::from_secs_f64(a.stored_response_ttl),
    };
    flint::server::serve(engine, model_id, opts)
}
