//! What the web console keeps: the live call log, and the per-second
//! tally behind its charts. No HTTP here; the routes are in `console`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::broadcast;
use utoipa::ToSchema;

use super::auth::Caller;
use super::body::Outcome;
use crate::records::now_ms;

/// How many calls the live log keeps (and sends to a page that connects).
pub(crate) const LOG_SIZE: usize = 300;
/// How long the event stream gathers calls before it sends them.
/// How many calls may wait for a slow event stream before it is told it
/// lagged.
const STREAM_BUFFER: usize = 8192;
/// How many seconds of call rates and latencies the charts get.
pub(crate) const HISTORY_SECONDS: usize = 300;

/// One call as the live log shows it.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct LogEntry {
    /// When it ended, ms since the Unix epoch.
    pub at_ms: u64,
    /// The call id, when it got one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The device called.
    pub target: String,
    /// The method called.
    pub method: String,
    /// The `result` of its HTTP answer.
    pub outcome: String,
    /// The HTTP status of its answer.
    pub http_status: u16,
    /// The device's own status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_status: Option<u64>,
    /// From the request's arrival to its answer.
    pub latency_ms: f64,
    /// The credential's name (never its secret); `-` on an open gateway.
    pub credential: String,
}

impl LogEntry {
    /// A call to `method` on `target` that ended now with `outcome`.
    pub fn new(
        target: impl Into<String>,
        method: impl Into<String>,
        outcome: impl Into<String>,
        http_status: u16,
        latency: Duration,
    ) -> Self {
        LogEntry {
            at_ms: now_ms(),
            id: None,
            target: target.into(),
            method: method.into(),
            outcome: outcome.into(),
            http_status,
            device_status: None,
            latency_ms: latency.as_secs_f64() * 1000.0,
            credential: "-".to_owned(),
        }
    }
}

/// A log entry, serialized once (when a page first needs it) for every page
/// that receives it.
#[derive(Debug)]
pub struct Logged {
    entry: LogEntry,
    json: std::sync::OnceLock<String>,
}

impl Logged {
    #[cfg(test)]
    pub(crate) fn entry(&self) -> &LogEntry {
        &self.entry
    }

    pub(crate) fn json(&self) -> &str {
        self.json
            .get_or_init(|| serde_json::to_string(&self.entry).unwrap_or_default())
    }

    /// Whether `credential` (none: an open gateway) may see it: only calls
    /// it could have made itself.
    pub(crate) fn visible_to(&self, credential: Option<&Caller>) -> bool {
        credential.is_none_or(|c| c.allows(&self.entry.target, &self.entry.method).is_ok())
    }
}

/// One second of calls: how many ended by outcome, and the latency
/// percentiles of those that reached the broker.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Second {
    /// The second, since the Unix epoch.
    pub t: u64,
    /// Calls that ended in it, by outcome (outcomes with none left out).
    pub calls: BTreeMap<&'static str, u64>,
    /// Latency percentiles in ms; absent in a second without timed calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p90_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// The per-second counters behind the charts: the current second's counts
/// and latency histogram, and the finished seconds.
#[derive(Debug)]
struct Tally {
    second: u64,
    counts: [u64; Outcome::ALL.len()],
    latency_us: Histogram<u64>,
    history: VecDeque<Second>,
}

impl Tally {
    fn new(now_s: u64) -> Self {
        Tally {
            second: now_s,
            counts: [0; Outcome::ALL.len()],
            // 1 µs to 1 h at 2 significant digits: about 4 KiB.
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 2)
                .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!())),
            history: VecDeque::with_capacity(HISTORY_SECONDS + 1),
        }
    }

    /// Closes every second before `now_s` (empty ones included).
    fn roll(&mut self, now_s: u64) {
        if now_s <= self.second {
            return;
        }
        let percentile = |h: &Histogram<u64>, q: f64| {
            (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
        };
        let closed = Second {
            t: self.second,
            calls: Outcome::ALL
                .iter()
                .zip(self.counts)
                .filter(|(_, n)| *n > 0)
                .map(|(o, n)| (o.as_str(), n))
                .collect(),
            p50_ms: percentile(&self.latency_us, 0.50),
            p90_ms: percentile(&self.latency_us, 0.90),
            p99_ms: percentile(&self.latency_us, 0.99),
        };
        self.history.push_back(closed);
        // The quiet seconds in between, at most a window's worth.
        let gap_start = (self.second + 1).max(now_s.saturating_sub(HISTORY_SECONDS as u64));
        for t in gap_start..now_s {
            self.history.push_back(Second {
                t,
                calls: BTreeMap::new(),
                p50_ms: None,
                p90_ms: None,
                p99_ms: None,
            });
        }
        while self.history.len() > HISTORY_SECONDS {
            self.history.pop_front();
        }
        self.second = now_s;
        self.counts = [0; Outcome::ALL.len()];
        self.latency_us.reset();
    }
}

/// What the console keeps: the live log, the tally, and the channel that
/// streams new calls to every open page.
#[derive(Debug)]
pub struct Console {
    calls: broadcast::Sender<Arc<Logged>>,
    log: Mutex<VecDeque<Arc<Logged>>>,
    tally: Mutex<Tally>,
}

impl Console {
    /// An empty console.
    pub fn new() -> Arc<Self> {
        Arc::new(Console {
            calls: broadcast::channel(STREAM_BUFFER).0,
            log: Mutex::new(VecDeque::with_capacity(LOG_SIZE)),
            tally: Mutex::new(Tally::new(now_ms() / 1000)),
        })
    }

    /// Counts one request's outcome (and its latency, for one that reached
    /// the broker) in the current second.
    pub fn count(&self, outcome: Outcome, latency: Option<Duration>) {
        let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        tally.roll(now_ms() / 1000);
        tally.counts[outcome.index()] += 1;
        if let Some(latency) = latency {
            let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            // Saturates at the histogram's top rather than failing.
            tally.latency_us.saturating_record(us.max(1));
        }
    }

    /// The finished seconds after `after` (all of them for `None`).
    pub(crate) fn seconds_after(&self, after: Option<u64>) -> Vec<Second> {
        let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        tally.roll(now_ms() / 1000);
        tally
            .history
            .iter()
            .filter(|s| after.is_none_or(|a| s.t > a))
            .cloned()
            .collect()
    }

    /// Adds a call to the live log and streams it to the open pages.
    pub fn log(&self, entry: LogEntry) {
        let logged = Arc::new(Logged {
            entry,
            json: std::sync::OnceLock::new(),
        });
        // Sent under the lock, so a page that connects gets each call
        // either in its backlog or as an event, never both.
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == LOG_SIZE {
            log.pop_front();
        }
        log.push_back(Arc::clone(&logged));
        // No page open is fine.
        let _ = self.calls.send(logged);
    }

    /// The live log, oldest first, and every call after it.
    pub(crate) fn watch_with_backlog(
        &self,
    ) -> (Vec<Arc<Logged>>, broadcast::Receiver<Arc<Logged>>) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        (log.iter().cloned().collect(), self.calls.subscribe())
    }

    /// The newest call's JSON, as a page receives it (for benches).
    pub fn newest_json(&self) -> Option<String> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.back().map(|l| l.json().to_owned())
    }

    /// The live log, oldest first.
    pub fn recent(&self) -> Vec<Arc<Logged>> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }
}

/// The targets of the live log, each with its latest call, newest first.
pub(crate) fn recently_called(log: &[Arc<Logged>]) -> Vec<RecentTarget> {
    let mut seen = std::collections::HashSet::new();
    log.iter()
        .rev()
        .filter(|l| seen.insert(l.entry.target.as_str()))
        .map(|l| RecentTarget {
            target: l.entry.target.clone(),
            at_ms: l.entry.at_ms,
            method: l.entry.method.clone(),
            outcome: l.entry.outcome.clone(),
        })
        .collect()
}

/// A target of the live log and its latest call.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct RecentTarget {
    /// The device.
    pub target: String,
    /// When its latest call ended, ms since the Unix epoch.
    pub at_ms: u64,
    /// That call's method.
    pub method: String,
    /// That call's outcome (`result`).
    pub outcome: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_closes_with_its_counts_and_percentiles_and_gaps_are_filled() {
        let mut t = Tally::new(100);
        for ms in 1..=100 {
            t.counts[Outcome::Ok.index()] += 1;
            t.latency_us.saturating_record(ms * 1000);
        }
        t.counts[Outcome::Timeout.index()] += 2;
        t.roll(103);
        assert_eq!(t.history.len(), 3, "{:?}", t.history);
        let first = &t.history[0];
        assert_eq!(first.t, 100);
        assert_eq!(first.calls.get("ok"), Some(&100));
        assert_eq!(first.calls.get("timeout"), Some(&2));
        let p50 = first.p50_ms.unwrap();
        let p99 = first.p99_ms.unwrap();
        assert!((49.0..=51.0).contains(&p50), "{p50}");
        assert!((98.0..=100.0).contains(&p99), "{p99}");
        assert_eq!(
            (t.history[1].t, t.history[2].t),
            (101, 102),
            "quiet seconds are there, empty"
        );
        assert!(t.history[1].calls.is_empty() && t.history[1].p50_ms.is_none());
        // A long quiet spell keeps only a window's worth.
        t.roll(100_000);
        assert_eq!(t.history.len(), HISTORY_SECONDS);
        assert_eq!(t.history.back().unwrap().t, 99_999);
    }

    #[test]
    fn the_log_keeps_the_last_calls_and_names_each_target_once() {
        let console = Console::new();
        for i in 0..LOG_SIZE + 5 {
            let mut entry = LogEntry::new(
                format!("t{}", i % 3),
                "m",
                "ok",
                200,
                Duration::from_millis(1),
            );
            entry.at_ms = i as u64;
            console.log(entry);
        }
        let json: serde_json::Value = serde_json::from_str(console.recent()[0].json()).unwrap();
        assert_eq!(json["target"], "t2");
        assert_eq!(json["credential"], "-");
        let log = console.recent();
        assert_eq!(log.len(), LOG_SIZE);
        assert_eq!(log[0].entry().at_ms, 5);
        let recent = recently_called(&log);
        let names: Vec<&str> = recent.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(names.len(), 3);
        assert_eq!(recent[0].at_ms, (LOG_SIZE + 4) as u64);
    }
}
