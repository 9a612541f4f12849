//! API keys: where they come from, how a presented one is checked, and each key's limits.
//!
//! Keys are kept as SHA-256 digests, and a presented key's digest is compared with every
//! one of them in constant time, so neither the time taken nor the order of the keys tells
//! how much of a guess was right.

use anyhow::{bail, Context, Result};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What one identity may use.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Requests (HTTP requests and WebSocket turns) per minute; 0: no limit.
    pub per_minute: u32,
    /// Generations queued or running at once; 0: no limit.
    pub parallel: usize,
}

/// Why an identity was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Over {
    /// Its requests per minute; the next is allowed after this long.
    Rate(Duration),
    /// Its generations at once.
    Parallel(usize),
    /// Its key was removed from the key file.
    Revoked,
}

/// One client: a key, or every caller when the server has no keys.
pub struct Identity {
    /// A key's fingerprint (the first 8 hex digits of its SHA-256), safe to log.
    pub label: String,
    digest: [u8; 32],
    rate: Option<DefaultDirectRateLimiter>,
    parallel: Option<(Arc<Semaphore>, usize)>,
    revoked: AtomicBool,
}

impl Identity {
    fn new(label: String, digest: [u8; 32], limits: Limits) -> Identity {
        let rate = NonZeroU32::new(limits.per_minute).map(|n| RateLimiter::direct(Quota::per_minute(n)));
        let parallel = (limits.parallel > 0).then(|| (Arc::new(Semaphore::new(limits.parallel)), limits.parallel));
        Identity { label, digest, rate, parallel, revoked: AtomicBool::new(false) }
    }

    pub fn anonymous(limits: Limits) -> Identity {
        Identity::new("anonymous".into(), [0; 32], limits)
    }

    /// Count one request against the rate.
    pub fn request(&self) -> Result<(), Over> {
        if self.revoked.load(Ordering::Relaxed) {
            return Err(Over::Revoked);
        }
        match &self.rate {
            Some(r) => r.check().map_err(|n| Over::Rate(n.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default())))),
            None => Ok(()),
        }
    }

    /// A place for one generation, held until the generation ends.
    pub fn lease(&self) -> Result<Option<OwnedSemaphorePermit>, Over> {
        if self.revoked.load(Ordering::Relaxed) {
            return Err(Over::Revoked);
        }
        match &self.parallel {
            Some((s, n)) => s.clone().try_acquire_owned().map(Some).map_err(|_| Over::Parallel(*n)),
            None => Ok(None),
        }
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The keys in force.
#[derive(Default)]
pub struct KeySet {
    ids: Vec<Arc<Identity>>,
}

impl KeySet {
    /// `keys`' identities; those of `old` whose key stays keep their counts and places,
    /// and those whose key is gone are revoked (their open sessions start no more turns).
    pub fn build(keys: &[String], limits: Limits, old: &KeySet) -> KeySet {
        let mut ids: Vec<Arc<Identity>> = Vec::new();
        for k in keys {
            let d = digest(k);
            if ids.iter().any(|i| i.digest == d) {
                continue;
            }
            let kept = old.ids.iter().find(|i| i.digest == d).cloned();
            ids.push(kept.unwrap_or_else(|| Arc::new(Identity::new(hex8(&d), d, limits))));
        }
        for o in &old.ids {
            if !ids.iter().any(|i| Arc::ptr_eq(i, o)) {
                o.revoked.store(true, Ordering::Relaxed);
            }
        }
        KeySet { ids }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// The identity of a presented key, compared with every key in constant time.
    pub fn find(&self, presented: &str) -> Option<Arc<Identity>> {
        let d = digest(presented);
        let mut found = None;
        for id in &self.ids {
            if bool::from(id.digest.ct_eq(&d)) {
                found = Some(id.clone());
            }
        }
        found
    }
}

fn hex8(d: &[u8; 32]) -> String {
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A key as it can travel in an `Authorization` header: 1 to 256 visible ASCII characters.
fn check_key(k: &str) -> Result<()> {
    if k.is_empty() || k.len() > 256 || !k.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        bail!("an API key must be 1 to 256 visible ASCII characters, without spaces");
    }
    Ok(())
}

/// The keys given on the command line (and `FLINT_API_KEY`) and those of the key file: one
/// a line, blank lines and lines starting with `#` skipped.
pub fn gather(given: &[String], file: Option<&Path>) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    for k in given {
        check_key(k).context("--api-key / FLINT_API_KEY")?;
        keys.push(k.clone());
    }
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read the key file {}", f.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            check_key(line).with_context(|| format!("{} line {}", f.display(), n + 1))?;
            keys.push(line.to_string());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(f) {
                if m.permissions().mode() & 0o077 != 0 {
                    eprintln!("flint: warning: the key file {} can be read by other users (chmod 600 it)", f.display());
                }
            }
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_and_reload() {
        let limits = Limits { per_minute: 0, parallel: 1 };
        let a = KeySet::build(&["sk-one".into(), "sk-two".into()], limits, &KeySet::default());
        assert_eq!(a.len(), 2);
        assert!(a.find("sk-one").is_some() && a.find("sk-two").is_some());
        assert!(a.find("sk-on").is_none() && a.find("").is_none() && a.find("sk-one ").is_none());
        let one = a.find("sk-one").unwrap();
        let held = one.lease().unwrap();
        assert_eq!(one.lease().unwrap_err(), Over::Parallel(1));
        // Reloaded: sk-one stays (with its place still taken), sk-two goes.
        let b = KeySet::build(&["sk-one".into(), "sk-three".into()], limits, &a);
        assert!(Arc::ptr_eq(&b.find("sk-one").unwrap(), &one));
        assert_eq!(b.find("sk-one").unwrap().lease().unwrap_err(), Over::Parallel(1));
        drop(held);
        assert!(one.lease().is_ok());
        let two = a.find("sk-two").unwrap();
        assert!(b.find("sk-two").is_none());
        assert_eq!(two.request().unwrap_err(), Over::Revoked);
    }

    #[test]
    fn rate() {
        let id = Identity::anonymous(Limits { per_minute: 3, parallel: 0 });
        for _ in 0..3 {
            id.request().unwrap();
        }
        match id.request() {
            Err(Over::Rate(wait)) => assert!(wait > Duration::from_secs(10) && wait <= Duration::from_secs(20), "{wait:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn key_file() {
        let dir = std::env::temp_dir().join(format!("flint-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys");
        std::fs::write(&f, "# team\nsk-a\n\n  sk-b  \n").unwrap();
        assert_eq!(gather(&["sk-c".into()], Some(&f)).unwrap(), ["sk-c", "sk-a", "sk-b"]);
        std::fs::write(&f, "sk-a\nsk b\n").unwrap();
        let e = format!("{:#}", gather(&[], Some(&f)).unwrap_err());
        assert!(e.contains("line 2") && !e.contains("sk b"), "{e}");
        assert!(gather(&["".into()], None).is_err());
        assert!(gather(&[], Some(&dir.join("none"))).is_err());
    }
}
