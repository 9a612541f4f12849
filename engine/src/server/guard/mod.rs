//! Who may use the server, checked before any route (docs/protocol.md, "Security"):
//!
//! 1. `Host`: on a loopback address, only names no DNS answer can rebind (IP literals,
//!    `localhost`) and `--allow-host` entries (403 otherwise).
//! 2. `Origin`: a browser page may call the API only from the server's own origin or an
//!    `--allow-origin` entry (403 otherwise); a request without `Origin` (a CLI, an SDK)
//!    is not a page's. CORS headers go to allowed origins only.
//! 3. The API key, when the server has any: `Authorization: Bearer KEY`, or for a browser's
//!    WebSocket (which cannot set headers) the subprotocol `flint.bearer.BASE64URL(KEY)`
//!    (401 otherwise). `/` and `/health` stay open, and `/metrics` with `--public-metrics`.
//! 4. POST bodies are `application/json` (415 otherwise): no "simple" cross-site form post.
//! 5. The key's requests per minute (429 with `retry-after`); its generations at once are
//!    counted where each starts ([`Caller::lease`]).

pub mod keys;
mod names;

use super::metrics::{Metrics, Refusal};
use super::openai::error_response;
use super::ApiError;
use anyhow::{bail, Context, Result};
use axum::extract::{Request, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;
use keys::{Identity, KeySet, Limits, Over};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

/// The WebSocket subprotocol the server selects; a browser offers it beside its key's.
pub const PROTOCOL: &str = "flint";
const BEARER_PROTOCOL: &str = "flint.bearer.";

/// `flint serve`'s security flags.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// `--api-key` (repeatable) and `FLINT_API_KEY`.
    pub api_keys: Vec<String>,
    /// `--api-key-file`: one key a line, read again on SIGHUP.
    pub api_key_file: Option<PathBuf>,
    /// Serve a non-loopback address without a key.
    pub insecure_no_key: bool,
    /// Browser origins besides the server's own that may call the API (`*`: any).
    pub allow_origins: Vec<String>,
    /// Host names besides IP literals and `localhost` that a loopback server answers to.
    pub allow_hosts: Vec<String>,
    /// `/metrics` without a key.
    pub public_metrics: bool,
    pub limits: Limits,
}

/// The refusal that ends a request in the guard.
struct Refused {
    status: u16,
    why: Refusal,
    error: ApiError,
    headers: Vec<(header::HeaderName, String)>,
}

impl Refused {
    fn new(status: u16, why: &'static str, code: &'static str, message: String) -> Refused {
        Refused { status, why: Refusal { reason: why }, error: ApiError::new(code, message), headers: Vec::new() }
    }
}

/// A request's identity, for the handlers: its key's, or the anonymous one.
#[derive(Clone)]
pub struct Caller(pub Arc<Identity>);

/// A generation's place in its key's `--max-parallel-per-key`, held until it ends.
pub type Hold = Option<OwnedSemaphorePermit>;

impl Caller {
    /// A place for one generation (an HTTP request's; its rate was counted on arrival).
    pub(crate) fn lease(&self, m: &Metrics) -> Result<Hold, ApiError> {
        self.0.lease().map_err(|o| counted(o, m))
    }

    /// A WebSocket turn: one request against the key's rate, and a place for its generation.
    pub(crate) fn turn(&self, m: &Metrics) -> Result<Hold, ApiError> {
        self.0.request().map_err(|o| counted(o, m))?;
        self.lease(m)
    }
}

/// An identity's refusal as an API error, counted in `flint_refused_total`.
fn counted(o: Over, m: &Metrics) -> ApiError {
    let (why, e) = over(o);
    m.refused.get_or_create(&Refusal { reason: why }).inc();
    e
}

/// An identity's refusal: its metrics reason and its API error.
fn over(o: Over) -> (&'static str, ApiError) {
    let (why, e) = match o {
        Over::Rate(wait) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let msg = format!("rate limit reached for this key; retry in {secs} s");
            ("rate_limited", ApiError { retry_after: Some(secs), ..ApiError::new("rate_limit_exceeded", msg) })
        }
        Over::Parallel(n) => {
            let msg = format!("this key already has {n} generations running or queued (--max-parallel-per-key); retry when one ends");
            ("parallel_limit", ApiError { retry_after: Some(1), ..ApiError::new("rate_limit_exceeded", msg) })
        }
        Over::Revoked => ("unauthorized", ApiError::new("invalid_api_key", "this API key has been removed from the server's key file")),
    };
    (why, e)
}

pub struct Guard {
    s: Settings,
    keys: RwLock<Arc<KeySet>>,
    anonymous: Arc<Identity>,
    origins: Vec<names::Origin>,
    any_origin: bool,
    hosts: Vec<String>,
    /// Bound to a loopback address: the `Host` check applies (or with `--allow-host`).
    loopback: AtomicBool,
}

impl Guard {
    pub fn new(s: Settings) -> Result<Guard> {
        let list = keys::gather(&s.api_keys, s.api_key_file.as_deref())?;
        if let (Some(f), true) = (&s.api_key_file, list.is_empty()) {
            bail!("the key file {} has no key", f.display());
        }
        let keys = KeySet::build(&list, s.limits, &KeySet::default());
        let mut origins = Vec::new();
        for o in s.allow_origins.iter().filter(|o| *o != "*") {
            origins.push(names::origin(o).with_context(|| format!("--allow-origin {o:?}: expected scheme://host[:port], e.g. http://localhost:3000"))?);
        }
        let mut hosts = Vec::new();
        for h in &s.allow_hosts {
            let a = names::authority(h).filter(|a| a.port.is_none()).with_context(|| format!("--allow-host {h:?}: expected a host name, e.g. flint.lan"))?;
            hosts.push(a.host);
        }
        Ok(Guard {
            any_origin: s.allow_origins.iter().any(|o| o == "*"),
            anonymous: Arc::new(Identity::anonymous(s.limits)),
            keys: RwLock::new(Arc::new(keys)),
            loopback: AtomicBool::new(true),
            origins,
            hosts,
            s,
        })
    }

    /// The address the server listens on: serving the network without a key is refused.
    pub fn bind(&self, addr: SocketAddr) -> Result<()> {
        exposure(addr, self.key_required(), self.s.insecure_no_key)?;
        self.loopback.store(addr.ip().is_loopback(), Ordering::Relaxed);
        Ok(())
    }

    pub fn key_required(&self) -> bool {
        !self.keys.read().unwrap().is_empty()
    }

    /// Read the key file again (SIGHUP). On an error the keys in force stay.
    pub fn reload(&self) -> Result<usize> {
        let list = keys::gather(&self.s.api_keys, self.s.api_key_file.as_deref())?;
        let mut k = self.keys.write().unwrap();
        if list.is_empty() && !k.is_empty() {
            bail!("the key file now has no key; keeping the {} in force (an open server needs a restart without keys)", k.len());
        }
        *k = Arc::new(KeySet::build(&list, self.s.limits, &k));
        Ok(k.len())
    }

    /// CORS for the allowed origins only (preflights included); None when there are none.
    pub fn cors(&self) -> Option<tower_http::cors::CorsLayer> {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        if self.origins.is_empty() && !self.any_origin {
            return None;
        }
        let allow = if self.any_origin {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(self.origins.iter().filter_map(|o| HeaderValue::from_str(&o.text()).ok()))
        };
        let cors = CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::HeaderName::from_static("openai-beta")])
            .expose_headers([header::RETRY_AFTER])
            .max_age(Duration::from_secs(600));
        Some(cors)
    }

    fn admit(&self, req: &Request) -> Result<Option<Caller>, Refused> {
        let h = req.headers();
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).or(req.uri().authority().map(|a| a.as_str()));
        let Some(host) = host.and_then(names::authority) else {
            return Err(Refused::new(400, "forbidden_host", "invalid_request", "the request has no valid Host header".into()));
        };
        let enforce = self.loopback.load(Ordering::Relaxed) || !self.hosts.is_empty();
        if enforce && !names::unrebindable(&host.host) && !self.hosts.contains(&host.host) {
            let msg = format!("this server does not answer to the name {:?} (a DNS-rebinding guard); start it with --allow-host {} to allow it", host.host, host.host);
            return Err(Refused::new(403, "forbidden_host", "forbidden", msg));
        }
        if let Some(o) = h.get(header::ORIGIN) {
            let text = o.to_str().unwrap_or("?");
            let own = names::origin(text).is_some_and(|o| o.same_as(&host) || self.any_origin || self.origins.contains(&o));
            if !own {
                let msg = format!("requests from the web page at {text} are refused (only this server's own page may call it); start it with --allow-origin {text} to allow that page");
                return Err(Refused::new(403, "forbidden_origin", "forbidden", msg));
            }
        }
        if req.method() == Method::OPTIONS {
            return Ok(None);
        }
        let path = req.uri().path();
        if path == "/" || path == "/health" || (path == "/metrics" && self.s.public_metrics) {
            return Ok(None);
        }
        let id = {
            let keys = self.keys.read().unwrap().clone();
            if keys.is_empty() {
                self.anonymous.clone()
            } else {
                match presented(h) {
                    None => {
                        let msg = "this server needs an API key: send Authorization: Bearer KEY (the browser page asks for it)";
                        return Err(unauthorized(msg.into()));
                    }
                    Some(k) => keys.find(&k).ok_or_else(|| unauthorized(format!("incorrect API key provided: {}", masked(&k))))?,
                }
            }
        };
        if req.method() == Method::POST && !json_body(h) {
            let got = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("none");
            let msg = format!("request bodies must be Content-Type: application/json, not {got}");
            return Err(Refused::new(415, "unsupported_media_type", "unsupported_media_type", msg));
        }
        id.request().map_err(|o| {
            let (why, e) = over(o);
            Refused { status: super::openai::status_of(e.code), why: Refusal { reason: why }, error: e, headers: Vec::new() }
        })?;
        Ok(Some(Caller(id)))
    }
}

/// Refuse to serve the network without a key (unless told to).
pub fn exposure(addr: SocketAddr, keyed: bool, insecure: bool) -> Result<()> {
    if !addr.ip().is_loopback() && !keyed && !insecure {
        bail!(
            "refusing to serve {addr} without an API key: anyone who can reach it could use the model; \
             pass --api-key KEY, --api-key-file FILE or FLINT_API_KEY (or --insecure-no-key to serve it open)"
        );
    }
    Ok(())
}

fn unauthorized(message: String) -> Refused {
    let mut r = Refused::new(401, "unauthorized", "invalid_api_key", message);
    r.headers.push((header::WWW_AUTHENTICATE, "Bearer realm=\"flint\"".into()));
    r
}

/// The first and last characters of a wrong key, as OpenAI's error shows them.
fn masked(k: &str) -> String {
    let c: Vec<char> = k.chars().collect();
    if c.len() <= 8 {
        return "***".into();
    }
    format!("{}***{}", c[..3].iter().collect::<String>(), c[c.len() - 4..].iter().collect::<String>())
}

/// The key a request presents: `Authorization: Bearer KEY`, or a WebSocket subprotocol.
fn presented(h: &HeaderMap) -> Option<String> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, key) = v.trim().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| key.trim().to_string());
    }
    let protocols = h.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok());
    let p = protocols.flat_map(|v| v.split(',')).map(str::trim).find_map(|p| p.strip_prefix(BEARER_PROTOCOL))?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok()?;
    String::from_utf8(raw).ok()
}

fn json_body(h: &HeaderMap) -> bool {
    let Some(v) = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// The middleware: every request passes [`Guard::admit`] before its route.
pub(crate) async fn check(AxState(s): AxState<Arc<super::State>>, mut req: Request, next: Next) -> Response {
    match s.guard.admit(&req) {
        Ok(caller) => {
            if let Some(c) = caller {
                req.extensions_mut().insert(c);
            }
            next.run(req).await
        }
        Err(r) => {
            s.metrics.refused.get_or_create(&r.why).inc();
            let mut resp = error_response(r.status, r.error);
            for (k, v) in r.headers {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    resp.headers_mut().insert(k, v);
                }
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_presented() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), None);
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("flint, flint.bearer.c2stYWJj"));
        assert_eq!(presented(&h).as_deref(), Some("sk-abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  sk-xyz "));
        assert_eq!(presented(&h).as_deref(), Some("sk-xyz"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dTpw"));
        assert_eq!(presented(&h), None);
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(!json_body(&h));
        for (v, ok) in [("application/json", true), ("Application/JSON; charset=utf-8", true), ("text/plain", false), ("application/jsonx", false)] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(v));
            assert_eq!(json_body(&h), ok, "{v}");
        }
    }

    #[test]
    fn exposed_without_key() {
        assert!(exposure("127.0.0.1:8080".parse().unwrap(), false, false).is_ok());
        assert!(exposure("[::1]:8080".parse().unwrap(), false, false).is_ok());
        let e = exposure("0.0.0.0:8080".parse().unwrap(), false, false).unwrap_err().to_string();
        assert!(e.contains("--api-key") && e.contains("--insecure-no-key"), "{e}");
        assert!(exposure("0.0.0.0:8080".parse().unwrap(), true, false).is_ok());
        assert!(exposure("0.0.0.0:8080".parse().unwrap(), false, true).is_ok());
    }
}
