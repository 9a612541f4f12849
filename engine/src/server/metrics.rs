//! `/metrics`: Prometheus (OpenMetrics text) counters, gauges and latency histograms.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Finish {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Protocol {
    /// `ws` (`/v1/ws`) or `responses` (the Responses API's WebSocket mode).
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refusal {
    /// `unauthorized`, `forbidden_host`, `forbidden_origin`, `unsupported_media_type`,
    /// `rate_limited` or `parallel_limit`.
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// From a job's submission (queueing included) to its first token.
    pub ttft: Histogram,
    /// Between consecutive tokens of one generation, as its client sees them.
    pub inter_token: Histogram,
    /// Per finished generation: tokens after the first per second of decoding.
    pub decode_tok_s: Histogram,
    /// Generations per batched decode pass.
    pub batch_size: Histogram,
    pub completion_tokens: Counter,
    pub prompt_tokens: Counter,
    pub cached_tokens: Counter,
    pub drafted_tokens: Counter,
    pub accepted_tokens: Counter,
    pub requests: Family<Finish, Counter>,
    pub sessions_opened: Family<Protocol, Counter>,
    /// Requests and turns the security checks refused, by reason.
    pub refused: Family<Refusal, Counter>,
    pub sessions: Gauge,
    pub active_generations: Gauge,
    pub queue_depth: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("flint");
        let ttft = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let inter_token = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let decode_tok_s = Histogram::new(exponential_buckets(10.0, 2.0, 10));
        let batch_size = Histogram::new(exponential_buckets(2.0, 2.0, 6));
        let m = Metrics {
            ttft,
            inter_token,
            decode_tok_s,
            batch_size,
            completion_tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            cached_tokens: Counter::default(),
            drafted_tokens: Counter::default(),
            accepted_tokens: Counter::default(),
            requests: Family::default(),
            sessions_opened: Family::default(),
            refused: Family::default(),
            sessions: Gauge::default(),
            active_generations: Gauge::default(),
            queue_depth: Gauge::default(),
            registry: Registry::default(),
        };
        r.register_with_unit("time_to_first_token", "Submission to first token", Unit::Seconds, m.ttft.clone());
        r.register_with_unit("inter_token_latency", "Time between consecutive streamed tokens", Unit::Seconds, m.inter_token.clone());
        r.register("decode_tokens_per_second", "Decode speed of each finished generation", m.decode_tok_s.clone());
        r.register("decode_batch_size", "Generations per batched decode pass", m.batch_size.clone());
        r.register("completion_tokens", "Tokens generated", m.completion_tokens.clone());
        r.register("prompt_tokens", "Prompt tokens received", m.prompt_tokens.clone());
        r.register("cached_prompt_tokens", "Prompt tokens whose KV cache was reused", m.cached_tokens.clone());
        r.register("speculative_drafted_tokens", "Draft tokens proposed for verification", m.drafted_tokens.clone());
        r.register("speculative_accepted_tokens", "Draft tokens the model accepted", m.accepted_tokens.clone());
        r.register("requests", "Finished generations by finish reason", m.requests.clone());
        r.register("sessions", "Open WebSocket sessions", m.sessions.clone());
        r.register("sessions_opened", "WebSocket sessions opened, by protocol", m.sessions_opened.clone());
        r.register("refused", "Requests refused by the security checks (key, Host, Origin, content type, limits)", m.refused.clone());
        r.register("active_generations", "Generations in progress", m.active_generations.clone());
        r.register("queue_depth", "Generations waiting for a turn", m.queue_depth.clone());
        Metrics { registry: r, ..m }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
