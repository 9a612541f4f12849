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
    #[command(flatten)]
    security: SecurityArgs,
}

/// Who may use the server (docs/protocol.md, "Security").
#[derive(Args)]
pub struct SecurityArgs {
    /// Require this API key (Authorization: Bearer KEY) on every API route and WebSocket;
    /// repeatable. Also FLINT_API_KEY.
    #[arg(long = "api-key", value_name = "KEY", env = "FLINT_API_KEY", hide_env_values = true)]
    api_keys: Vec<String>,
    /// Keys from a file, one a line (# comments); read again on SIGHUP.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<std::path::PathBuf>,
    /// Serve a non-loopback --host without an API key (anyone who reaches it may use it).
    #[arg(long)]
    insecure_no_key: bool,
    /// A browser origin besides the server's own whose pages may call the API (CORS), e.g.
    /// http://localhost:3000; repeatable; * allows any.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    allow_origins: Vec<String>,
    /// A host name the server answers to besides IP literals and localhost (the
    /// DNS-rebinding guard); repeatable.
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_hosts: Vec<String>,
    /// Serve /metrics without a key (for a scraper).
    #[arg(long)]
    public_metrics: bool,
    /// Requests (HTTP requests and WebSocket turns) per minute per key; 0: no limit.
    #[arg(long, default_value_t = 0)]
    rate_limit: u32,
    /// Generations running or queued at once per key; 0: no limit.
    #[arg(long, default_value_t = 0)]
    max_parallel_per_key: usize,
}

impl SecurityArgs {
    fn settings(self) -> flint::server::guard::Settings {
        flint::server::guard::Settings {
            api_keys: self.api_keys,
            api_key_file: self.api_key_file,
            insecure_no_key: self.insecure_no_key,
            allow_origins: self.allow_origins,
            allow_hosts: self.allow_hosts,
            public_metrics: self.public_metrics,
            limits: flint::server::guard::keys::Limits { per_minute: self.rate_limit, parallel: self.max_parallel_per_key },
        }
    }
}

/// Refuse an exposed address without a key before the model loads (the server checks the
/// address it binds again).
fn check_exposure(host: &str, port: u16, s: &flint::server::guard::Settings) -> Result<()> {
    use std::net::ToSocketAddrs;
    let keyed = !s.api_keys.is_empty() || s.api_key_file.is_some();
    for addr in (host, port).to_socket_addrs().into_iter().flatten() {
        flint::server::guard::exposure(addr, keyed, s.insecure_no_key)?;
    }
    Ok(())
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
    let security = a.security.settings();
    check_exposure(&a.host, a.port, &security)?;
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
        security,
    };
    flint::server::serve(engine, model_id, opts)
}
