//! `flint serve`: the streaming front end.
//!
//! - `/v1/ws`: a persistent WebSocket session, one conversation per connection, with
//!   cancel and redirect (docs/protocol.md);
//! - `/v1/chat/completions`, `/v1/completions`, `/v1/models`: OpenAI-compatible HTTP, with
//!   server-sent events when streaming;
//! - `/v1/responses`: the OpenAI Responses API, over HTTP and in its WebSocket mode
//!   ([`responses`]);
//! - `/health`, `/metrics` (Prometheus), and `/`: a browser page for the WebSocket session.
//!
//! Every request becomes a job for the engine thread ([`scheduler`]), which owns the model
//! and the KV caches and interleaves the jobs step by step.

pub mod guard;
pub mod metrics;
mod openai;
mod responses;
pub mod scheduler;
mod ws;

use crate::generate::{Engine, Request};
use crate::sampler::SamplerConfig;
use crate::speculative::SpecConfig;
use crate::tokenizer::Tokenizer;
use anyhow::{Context, Result};
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use axum::Router;
use metrics::Metrics;
use scheduler::{Limits, Scheduler};
use serde::Deserialize;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Server settings (`flint serve` flags).
#[derive(Clone, Debug)]
pub struct Options {
    pub host: String,
    pub port: u16,
    /// Open WebSocket sessions at most; more are refused with HTTP 503.
    pub max_sessions: usize,
    /// Generations in progress at once (they take turns step by step).
    pub parallel: usize,
    /// Jobs waiting for a turn at most; more are refused as busy.
    pub max_queue: usize,
    /// Largest request: WebSocket message or HTTP body, in bytes.
    pub max_message: usize,
    /// Longest prompt in tokens (never more than the model's context minus one).
    pub max_prompt: usize,
    /// `max_tokens` when a request does not say.
    pub default_max_tokens: usize,
    pub prefill_chunk: usize,
    /// On shutdown, how long running generations may go on before they are cancelled.
    pub shutdown_grace: Duration,
    /// A WebSocket session with no message from its client and nothing generating for this
    /// long is closed (code 1001), so idle connections cannot hold every session place.
    pub idle_timeout: Duration,
    /// Speculative decoding for requests that do not choose ("none" or "ngram").
    pub speculative: Option<String>,
    /// Finished Responses-API responses kept for `previous_response_id` and `GET`, at most.
    pub max_stored_responses: usize,
    /// And for at most this long.
    pub stored_response_ttl: Duration,
    /// API keys, the Host and Origin checks, per-key limits.
    pub security: guard::Settings,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            host: "127.0.0.1".into(),
            port: 8080,
            max_sessions: 32,
            parallel: 8,
            max_queue: 64,
            max_message: 1 << 20,
            max_prompt: usize::MAX,
            default_max_tokens: 512,
            prefill_chunk: 128,
            shutdown_grace: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            speculative: None,
            max_stored_responses: 256,
            stored_response_ttl: Duration::from_secs(3600),
            security: guard::Settings::default(),
        }
    }
}

pub(crate) struct State {
    pub opts: Options,
    pub model_id: String,
    pub n_ctx: usize,
    pub tokenizer: Arc<Tokenizer>,
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<Semaphore>,
    pub next_id: AtomicU64,
    pub shutdown: watch::Receiver<bool>,
    pub responses: responses::store::Store,
    pub guard: guard::Guard,
}

/// Error codes shared by the WebSocket `error` event and the HTTP error body.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub code: &'static str,
    pub message: String,
    /// Seconds after which a refused request may be tried again (HTTP `retry-after`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), retry_after: None }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("invalid_request", message)
    }
}

impl From<scheduler::Refused> for ApiError {
    fn from(r: scheduler::Refused) -> Self {
        ApiError::new(r.code, r.message)
    }
}

/// `stop`: one string or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Generation parameters: a request's own, over the session's defaults, over the server's.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct GenParams {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    /// "none", "ngram" or "prediction" (implied by a `prediction`).
    pub speculative: Option<String>,
}

impl GenParams {
    /// `self`'s values where set, `base`'s elsewhere.
    pub fn over(&self, base: &GenParams) -> GenParams {
        GenParams {
            max_tokens: self.max_tokens.or(base.max_tokens),
            temperature: self.temperature.or(base.temperature),
            top_p: self.top_p.or(base.top_p),
            top_k: self.top_k.or(base.top_k),
            min_p: self.min_p.or(base.min_p),
            repeat_penalty: self.repeat_penalty.or(base.repeat_penalty),
            seed: self.seed.or(base.seed),
            stop: self.stop.clone().or_else(|| base.stop.clone()),
            speculative: self.speculative.clone().or_else(|| base.speculative.clone()),
        }
    }
}

impl State {
    /// A validated engine request for `prompt`, or the reason it cannot run.
    pub fn request(&self, prompt: Vec<u32>, p: &GenParams, prediction: Option<&str>) -> Result<Request, ApiError> {
        let limit = self.opts.max_prompt.min(self.n_ctx - 1);
        if prompt.len() > limit {
            return Err(ApiError::new(
                "context_full",
                format!("the prompt has {} tokens; this server accepts at most {limit}", prompt.len()),
            ));
        }
        if prompt.is_empty() {
            return Err(ApiError::invalid("the prompt is empty"));
        }
        let d = SamplerConfig::default();
        let sampling = SamplerConfig {
            temperature: p.temperature.unwrap_or(d.temperature),
            top_k: p.top_k.unwrap_or(d.top_k),
            top_p: p.top_p.unwrap_or(d.top_p),
            min_p: p.min_p.unwrap_or(d.min_p),
            repeat_penalty: p.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: d.repeat_last_n,
            seed: p.seed.unwrap_or(d.seed),
        };
        sampling.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
        let stop = match &p.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 16 || stop.iter().any(|s| s.len() > 256) {
            return Err(ApiError::invalid("stop: at most 16 strings of at most 256 bytes"));
        }
        let room = self.n_ctx - prompt.len();
        let max_tokens = match p.max_tokens {
            Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1")),
            Some(n) => n.min(room),
            None => self.opts.default_max_tokens.min(room),
        };
        let mode = p.speculative.as_deref().or(self.opts.speculative.as_deref());
        let speculative = match (prediction, mode) {
            (Some(text), None | Some("prediction")) => {
                let tokens = self.tokenizer.encode(text, false).map_err(|e| ApiError::invalid(e.to_string()))?;
                Some(SpecConfig::prediction(tokens))
            }
            (_, None | Some("none")) => None,
            (_, Some("ngram")) => Some(SpecConfig::ngram()),
            (None, Some("prediction")) => return Err(ApiError::invalid("speculative \"prediction\" needs a prediction")),
            (_, Some(other)) => {
                return Err(ApiError::invalid(format!("speculative must be none, ngram or prediction, not {other:?}")))
            }
        };
        let mut req = Request::new(prompt, max_tokens, sampling);
        req.stop = stop;
        req.speculative = speculative;
        Ok(req)
    }
}

/// The engine's timings of a finished generation, as both APIs report them.
pub(crate) fn timings_json(o: &crate::generate::Outcome) -> serde_json::Value {
    let t = &o.timings;
    serde_json::json!({"ttft_ms": t.ttft_ms, "prompt_ms": t.prompt_ms, "decode_tok_s": t.decode_tok_s, "forward_passes": t.forward_passes})
}

const PAGE: &str = include_str!("page.html");

/// Serve until Ctrl-C or SIGTERM, then shut down gracefully.
pub fn serve(engine: Engine, model_id: String, opts: Options) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
        let (tx, rx) = watch::channel(false);
        let app = App::new(engine, model_id, opts, rx)?;
        app.state.guard.bind(listener.local_addr()?)?;
        let keys = if app.state.guard.key_required() { "API key required" } else { "no API key" };
        eprintln!("flint: serving {} on http://{} (WebSocket /v1/ws; {keys})", app.state.model_id, listener.local_addr()?);
        tokio::spawn(async move {
            shutdown_signal().await;
            eprintln!("flint: shutting down");
            let _ = tx.send(true);
        });
        app.run(listener).await
    })
}

/// A server on an already bound listener; tests and benchmarks start it in-process.
pub struct App {
    state: Arc<State>,
    engine_thread: std::thread::JoinHandle<()>,
}

impl App {
    /// Start the engine thread. `shutdown` turning true begins a graceful shutdown. Fails
    /// on bad security settings (an unreadable key file, a malformed `--allow-origin`).
    pub fn new(engine: Engine, model_id: String, opts: Options, shutdown: watch::Receiver<bool>) -> Result<App> {
        let metrics = Arc::new(Metrics::new());
        let guard = guard::Guard::new(opts.security.clone())?;
        let limits = Limits { parallel: opts.parallel.max(1), max_queue: opts.max_queue, prefill_chunk: opts.prefill_chunk.max(1) };
        let (n_ctx, tokenizer) = (engine.fwd.config().n_ctx, engine.tokenizer.clone());
        let (scheduler, engine_thread) = Scheduler::start(engine, limits, metrics.clone());
        let state = Arc::new(State {
            responses: responses::store::Store::new(opts.max_stored_responses, opts.stored_response_ttl),
            sessions: Arc::new(Semaphore::new(opts.max_sessions)),
            opts,
            model_id,
            n_ctx,
            tokenizer,
            scheduler,
            metrics,
            next_id: AtomicU64::new(1),
            shutdown,
            guard,
        });
        Ok(App { state, engine_thread })
    }

    pub async fn run(self, listener: tokio::net::TcpListener) -> Result<()> {
        let state = self.state.clone();
        state.guard.bind(listener.local_addr()?)?;
        #[cfg(unix)]
        if state.opts.security.api_key_file.is_some() {
            tokio::spawn(reload_keys(state.clone()));
        }
        let router = Router::new()
            .route("/", get(page))
            .route("/health", get(health))
            .route("/metrics", get(metrics_text))
            .route("/v1/ws", get(ws::upgrade))
            .route("/v1/models", get(openai::models))
            .route("/v1/chat/completions", post(openai::chat))
            .route("/v1/completions", post(openai::completions))
            .route("/v1/responses", post(responses::http::create).get(responses::socket::upgrade))
            .route("/v1/responses/{id}", get(responses::http::get).delete(responses::http::delete))
            .fallback(openai::not_found)
            .layer(axum::extract::DefaultBodyLimit::max(state.opts.max_message))
            .layer(axum::middleware::from_fn_with_state(state.clone(), guard::check));
        // CORS answers only where other origins are allowed; the server's own page needs none.
        let router = match state.guard.cors() {
            Some(cors) => router.layer(cors),
            None => router,
        }
        .with_state(state.clone());
        let mut stop = state.shutdown.clone();
        // Tokens are small writes: without TCP_NODELAY, Nagle's algorithm holds them back
        // until the client's delayed ACK (tens of milliseconds).
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serving = axum::serve(listener, router).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        let mut stop = state.shutdown.clone();
        let draining = async {
            let _ = stop.wait_for(|s| *s).await;
            state.scheduler.shutdown(state.opts.shutdown_grace);
            // Every WebSocket session has ended when all their permits are back.
            let _ = state.sessions.acquire_many(state.opts.max_sessions as u32).await;
        };
        let (served, ()) = tokio::join!(serving, draining);
        served.context("the server failed")?;
        let engine_thread = self.engine_thread;
        tokio::task::spawn_blocking(move || engine_thread.join()).await.ok();
        Ok(())
    }
}

/// The browser page, which no other page may frame.
async fn page() -> impl IntoResponse {
    use axum::http::header;
    let headers = [
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (headers, Html(PAGE))
}

/// SIGHUP reads the key file again; a bad file leaves the keys in force.
#[cfg(unix)]
async fn reload_keys(s: Arc<State>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        match s.guard.reload() {
            Ok(n) => eprintln!("flint: SIGHUP: {n} API keys in force"),
            Err(e) => eprintln!("flint: SIGHUP: {e:#}; the keys in force stay"),
        }
    }
}

async fn health(axum::extract::State(s): axum::extract::State<Arc<State>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({
        "status": if *s.shutdown.borrow() { "shutting_down" } else { "ok" },
        "api_key_required": s.guard.key_required(),
        "model": s.model_id,
        "sessions": s.metrics.sessions.get(),
        "active_generations": s.metrics.active_generations.get(),
        "queue_depth": s.metrics.queue_depth.get(),
        "stored_responses": s.responses.len(),
    }))
}

async fn metrics_text(axum::extract::State(s): axum::extract::State<Arc<State>>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
