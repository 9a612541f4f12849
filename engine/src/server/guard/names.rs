//! `Host` and `Origin`: which names reach this server, and which pages are its own.
//!
//! DNS rebinding needs a name: a page on `evil.example` whose name is made to resolve to
//! 127.0.0.1 reaches a loopback server with `Host: evil.example`, and the browser counts
//! the answers as the page's own. An IP-literal `Host` cannot be rebound, so a loopback
//! server accepts IP literals, `localhost` (and `*.localhost`, which browsers resolve to
//! loopback themselves) and the names the operator allows.

use std::net::IpAddr;

/// A host (lower-case, IPv6 in brackets, no trailing dot) and its port when one is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    pub host: String,
    pub port: Option<u16>,
}

/// `host[:port]`, as in a `Host` header or an origin; None when malformed.
pub fn authority(s: &str) -> Option<Authority> {
    let s = s.trim();
    if s.is_empty() || s.contains(['/', '@', ' ', '\\', '?', '#']) {
        return None;
    }
    let (host, port) = if s.starts_with('[') {
        let end = s.find(']')?;
        let (h, rest) = s.split_at(end + 1);
        match rest {
            "" => (h, None),
            r => (h, Some(r.strip_prefix(':')?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() || (!host.starts_with('[') && host.contains(':')) {
        return None;
    }
    if host.starts_with('[') && host[1..host.len() - 1].parse::<std::net::Ipv6Addr>().is_err() {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok()?),
    };
    let host = host.to_ascii_lowercase();
    Some(Authority { host: host.strip_suffix('.').unwrap_or(&host).to_string(), port })
}

/// The host as an IP address, when it is a literal one.
pub fn ip(host: &str) -> Option<IpAddr> {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).parse().ok()
}

/// A name no DNS answer can rebind: an IP literal, `localhost`, `*.localhost`.
pub fn unrebindable(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost") || ip(host).is_some()
}

/// An origin (`scheme://host[:port]`), its port written out only when not the scheme's
/// default, so that equal origins compare equal. None for `null` and anything malformed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub at: Authority,
}

pub fn origin(s: &str) -> Option<Origin> {
    let (scheme, rest) = s.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let mut at = authority(rest)?;
    if at.port == Some(default) {
        at.port = None;
    }
    Some(Origin { scheme, at })
}

impl Origin {
    /// Whether a page of this origin is one this server served under the request's `Host`
    /// (the default port of either scheme counts as no port: a TLS proxy's `Host` has none).
    pub fn same_as(&self, host: &Authority) -> bool {
        let port = host.port.filter(|p| *p != 80 && *p != 443);
        self.at.host == host.host && self.at.port == port
    }

    pub fn text(&self) -> String {
        match self.at.port {
            Some(p) => format!("{}://{}:{p}", self.scheme, self.at.host),
            None => format!("{}://{}", self.scheme, self.at.host),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        let a = |s| authority(s).map(|a| (a.host, a.port));
        assert_eq!(a("127.0.0.1:8080"), Some(("127.0.0.1".into(), Some(8080))));
        assert_eq!(a("LocalHost."), Some(("localhost".into(), None)));
        assert_eq!(a("[::1]:9"), Some(("[::1]".into(), Some(9))));
        assert_eq!(a("[::1]"), Some(("[::1]".into(), None)));
        for bad in ["", "a:b", "::1", "[::1", "[zz]:1", "a/b", "u@h", "h:99999", "[::1]x", "h:"] {
            assert_eq!(authority(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rebinding() {
        for ok in ["127.0.0.1", "10.0.0.2", "[::1]", "localhost", "app.localhost"] {
            assert!(unrebindable(ok), "{ok}");
        }
        for no in ["evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "flint"] {
            assert!(!unrebindable(no), "{no}");
        }
    }

    #[test]
    fn origins() {
        let o = origin("HTTP://127.0.0.1:80").unwrap();
        assert_eq!(o.text(), "http://127.0.0.1");
        assert!(o.same_as(&authority("127.0.0.1").unwrap()));
        let o = origin("http://127.0.0.1:8080").unwrap();
        assert!(o.same_as(&authority("127.0.0.1:8080").unwrap()));
        assert!(!o.same_as(&authority("127.0.0.1:8081").unwrap()));
        assert!(!o.same_as(&authority("localhost:8080").unwrap()));
        assert!(origin("https://flint.example").unwrap().same_as(&authority("flint.example").unwrap()));
        for bad in ["null", "file://", "chrome-extension://abc", "http://", "http://a/b", "127.0.0.1:8080"] {
            assert_eq!(origin(bad), None, "{bad:?}");
        }
    }
}
