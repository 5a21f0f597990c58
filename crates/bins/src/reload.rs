//! Reloads without signals: files read again when their content changes
//! (a mounted Kubernetes Secret is replaced by a symlink swap, which no
//! SIGHUP announces), and the JWKS fetched on a schedule.
//!
//! Files are polled, not watched with inotify: a mounted Secret changes by
//! swapping a `..data` symlink, which watchers of the file itself miss, and
//! reading a few small files every few seconds costs nothing measurable.
//! Polling compares content, not modification times, so a change that
//! keeps the time (a copy with `-p`, a restored backup) is seen too.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use directcall_cloud::gateway::JwtVerifier;

/// The reloads counter: `what` (`credentials`, `tls`, `jwks`) and
/// `result` (`ok`, `error`).
pub const RELOADS: &str = "directcall_reloads_total";

/// Counts a reload of `what` that ended in `result`.
pub fn count(what: &'static str, ok: bool) {
    metrics::counter!(RELOADS, "what" => what, "result" => if ok { "ok" } else { "error" })
        .increment(1);
}

/// The content of `paths`, hashed; `None` when one cannot be read now (a
/// symlink swap in progress: the next look sees the new files).
fn fingerprint(paths: &[PathBuf]) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        std::fs::read(p).ok()?.hash(&mut h);
    }
    Some(h.finish())
}

/// Every `every`, reads `paths`; when their content changed since the last
/// look, calls `reload` (which says how it went, for the log and
/// [`RELOADS`]). A failed reload is tried again at the next change.
pub fn watch_files(
    what: &'static str,
    paths: Vec<PathBuf>,
    every: Duration,
    reload: impl Fn() -> Result<String, String> + Send + 'static,
) {
    let mut last = fingerprint(&paths);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(now) = fingerprint(&paths) else {
                continue;
            };
            if last == Some(now) {
                continue;
            }
            last = Some(now);
            match reload() {
                Ok(what_now) => {
                    count(what, true);
                    tracing::info!(what, "{what} reloaded: {what_now}");
                }
                Err(e) => {
                    count(what, false);
                    tracing::error!(what, "{what} not reloaded, the ones in use stay: {e}");
                }
            }
        }
    });
}

/// Keeps `verifier`'s keys fresh from `fetch` (the JWKS's file or URL,
/// `what` in logs): a first fetch now, before it returns, so that a
/// gateway whose JWKS is up accepts JWTs from its first request; then in
/// the background every `every` while it works, and after a failure again
/// after 1 s, doubling up to a minute (or `every`, if shorter). Never ends
/// the process: without keys, JWTs get 401.
pub async fn refresh_jwks<F, Fut>(
    verifier: Arc<JwtVerifier>,
    what: String,
    every: Duration,
    fetch: F,
) where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<String, String>> + Send,
{
    let mut jwks = Jwks {
        verifier,
        what,
        every,
        max_retry: every.min(Duration::from_secs(60)),
        retry: Duration::ZERO,
    };
    jwks.retry = Duration::from_secs(1).min(jwks.max_retry);
    let mut wait = jwks.fetch(&fetch, true).await;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(wait).await;
            wait = jwks.fetch(&fetch, false).await;
        }
    });
}

struct Jwks {
    verifier: Arc<JwtVerifier>,
    what: String,
    every: Duration,
    max_retry: Duration,
    retry: Duration,
}

impl Jwks {
    /// One fetch; returns the wait before the next.
    async fn fetch<F, Fut>(&mut self, fetch: &F, first: bool) -> Duration
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<String, String>>,
    {
        let what = &self.what;
        match fetch()
            .await
            .and_then(|text| self.verifier.set_jwks(&text).map_err(|e| e.to_string()))
        {
            Ok(keys) => {
                count("jwks", true);
                if first {
                    tracing::info!(jwks = %what, keys, "JWKS loaded");
                } else {
                    tracing::debug!(jwks = %what, keys, "JWKS refreshed");
                }
                self.retry = Duration::from_secs(1).min(self.max_retry);
                self.every
            }
            Err(e) => {
                count("jwks", false);
                let kept = if self.verifier.has_keys() {
                    "the keys in use stay"
                } else {
                    "no keys yet: JWTs get 401"
                };
                let wait = self.retry;
                tracing::error!(jwks = %what, retry_s = wait.as_secs_f64(), "JWKS not loaded ({kept}): {e}");
                self.retry = (self.retry * 2).min(self.max_retry);
                wait
            }
        }
    }
}
