//! The web console's server side: its embedded assets, the live call log,
//! the per-second tally behind its charts, and the two API routes it reads,
//! `GET /v1/devices` and the event stream `GET /v1/events`.
//!
//! Everything here is off with `--no-console`: no route, and no
//! bookkeeping on the call path.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::broadcast;
use utoipa::ToSchema;

use crate::access::Credential;
use crate::gateway::{respond, Closing, Gateway};
use crate::service::{HttpReply, Outcome, UnauthorizedBody};

/// How many calls the live log keeps (and sends to a page that connects).
pub const LOG_SIZE: usize = 300;
/// How long the event stream gathers calls before it sends them.
const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// How many calls may wait for a slow event stream before it is told it
/// lagged.
const STREAM_BUFFER: usize = 8192;
/// How many seconds of call rates and latencies the charts get.
pub const HISTORY_SECONDS: usize = 300;

/// The console's Content-Security-Policy: nothing but this origin's own
/// scripts, styles and fetches; no inline script, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The embedded files: URL path, content type, bytes. The vendored ones are
/// the npm packages' own files, unmodified (console/vendor/VENDORED.md).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../console/index.html"),
    ),
    (
        "/console/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/app.js"),
    ),
    (
        "/console/app.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/app.css"),
    ),
    (
        "/console/vendor/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "/console/vendor/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/vendor/uplot/uPlot.min.css"),
    ),
    // The package's ES modules import each other without a file extension
    // (`./fetch`, `./parse`): served at exactly those URLs.
    (
        "/console/vendor/fetch-event-source/index.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/vendor/fetch-event-source/index.js"),
    ),
    (
        "/console/vendor/fetch-event-source/fetch",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/vendor/fetch-event-source/fetch.js"),
    ),
    (
        "/console/vendor/fetch-event-source/parse",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/vendor/fetch-event-source/parse.js"),
    ),
];

/// The embedded file at `path`, with the console's security headers, or
/// `None`.
pub(crate) fn asset(path: &str) -> Option<Response> {
    let (_, content_type, bytes) = ASSETS.iter().find(|(p, _, _)| *p == path)?;
    let mut response = (StatusCode::OK, *bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

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
    pub(crate) fn visible_to(&self, credential: Option<&Credential>) -> bool {
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

// ------------------------------------------------------------------ routes

/// The console's page and its embedded assets.
pub(crate) async fn console_asset(uri: Uri) -> Response {
    match asset(uri.path()) {
        Some(response) => response,
        None => respond(HttpReply::not_found(uri.path())),
    }
}

/// `GET /v1/devices`: what presence knows, and the targets called lately.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DevicesBody {
    /// Whether this gateway tracks presence (`--presence`); without it,
    /// `devices` is empty.
    presence: bool,
    /// Every target with a presence record, by name.
    devices: Vec<DeviceBody>,
    /// The targets of the last calls through this gateway, newest first,
    /// each with its latest call.
    recent: Vec<RecentTarget>,
}

/// A target's presence.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeviceBody {
    /// The device.
    target: String,
    /// Whether it is connected.
    online: bool,
    /// Since when, ms since the Unix epoch.
    since_ms: u64,
}

impl From<directcall_cloud::DeviceState> for DeviceBody {
    fn from(d: directcall_cloud::DeviceState) -> Self {
        DeviceBody {
            target: d.target.as_str().to_owned(),
            online: d.online,
            since_ms: d.since_ms,
        }
    }
}

impl Gateway {
    /// The devices body as `credential` may see it: only targets its rules
    /// name, only calls it could have made.
    pub(crate) fn devices_body(&self, credential: Option<&Credential>) -> DevicesBody {
        let requester = self.service.requester();
        let visible = |target: &str| credential.is_none_or(|c| c.sees_target(target));
        let log = self
            .console
            .as_ref()
            .map(|c| c.recent())
            .unwrap_or_default();
        let log: Vec<_> = log
            .into_iter()
            .filter(|l| l.visible_to(credential))
            .collect();
        DevicesBody {
            presence: requester.tracks_presence(),
            devices: requester
                .devices()
                .into_iter()
                .filter(|d| visible(d.target.as_str()))
                .map(DeviceBody::from)
                .collect(),
            recent: recently_called(&log),
        }
    }
}

/// The devices presence knows, online or offline and since when, and the
/// targets called lately (the console's device list).
#[utoipa::path(
    get,
    path = "/v1/devices",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The devices this credential may call.", body = DevicesBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
    )
)]
pub(crate) async fn devices(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    let caller = match gw.authenticate(&headers, None) {
        Ok(caller) => caller,
        Err(denied) => return *denied,
    };
    let body = gw.devices_body(caller.credential.as_deref());
    respond(HttpReply {
        status: 200,
        body: serde_json::to_value(body).unwrap_or_default(),
        replayed: false,
        location: None,
        retry_after: None,
    })
}

/// One page's event stream: what is left to send, and what it waits on.
struct Feed {
    hello: Option<String>,
    calls: tokio::sync::broadcast::Receiver<Arc<Logged>>,
    devices: Option<tokio::sync::broadcast::Receiver<directcall_cloud::DeviceState>>,
    closing: Option<tokio::sync::watch::Receiver<bool>>,
    ticker: tokio::time::Interval,
    /// The newest second sent.
    last: Option<u64>,
}

/// The console's live feed, as Server-Sent Events: first `hello` (the
/// devices, the live log, the last minutes of per-second counts), then
/// `calls` (the calls through this gateway in the last 100 ms or so), `device` for each presence
/// change and `seconds` once a second. A credential sees only the calls
/// and targets its rules allow.
#[utoipa::path(
    get,
    path = "/v1/events",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The event stream (never ends on its own).", content_type = "text/event-stream", body = String),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
    )
)]
pub(crate) async fn events(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    closing: Option<Extension<Closing>>,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let caller = match gw.authenticate(&headers, None) {
        Ok(caller) => caller,
        Err(denied) => return *denied,
    };
    let Some(console) = gw.console.clone() else {
        return respond(HttpReply::not_found("/v1/events"));
    };
    let credential = caller.credential;
    let requester = gw.service.requester().clone();
    // Watch first, then read the snapshot: nothing falls in between.
    let (backlog, calls) = console.watch_with_backlog();
    let device_changes = requester.watch_devices();
    let devices = gw.devices_body(credential.as_deref());
    let seconds = console.seconds_after(None);
    let last = seconds.last().map(|s| s.t);
    let calls_json: Vec<&str> = backlog
        .iter()
        .filter(|l| l.visible_to(credential.as_deref()))
        .map(|l| l.json())
        .collect();
    let hello = format!(
        r#"{{"presence":{},"records":{},"max_timeout_s":{},"devices":{},"recent":{},"calls":[{}],"seconds":{}}}"#,
        devices.presence,
        requester.record_options().is_some(),
        gw.service.limits().max_timeout.as_secs().max(1),
        serde_json::to_string(&devices.devices).unwrap_or_else(|_| "[]".into()),
        serde_json::to_string(&devices.recent).unwrap_or_else(|_| "[]".into()),
        calls_json.join(","),
        serde_json::to_string(&seconds).unwrap_or_else(|_| "[]".into()),
    );
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let feed = Feed {
        hello: Some(hello),
        calls,
        devices: requester.tracks_presence().then_some(device_changes),
        closing: closing.map(|Extension(Closing(rx))| rx),
        ticker,
        last,
    };
    let stream = futures_util::stream::unfold(feed, move |mut feed| {
        let console = Arc::clone(&console);
        let credential = credential.clone();
        async move {
            if let Some(hello) = feed.hello.take() {
                let event = Event::default().event("hello").data(hello);
                return Some((Ok::<_, std::convert::Infallible>(event), feed));
            }
            let lagged = |n: u64| {
                Event::default()
                    .event("lagged")
                    .data(format!(r#"{{"missed":{n}}}"#))
            };
            loop {
                let Feed {
                    calls,
                    devices,
                    closing,
                    ticker,
                    last,
                    ..
                } = &mut feed;
                let closed = async {
                    match closing.as_mut() {
                        // Fired, or the server is gone.
                        Some(rx) => drop(rx.wait_for(|c| *c).await),
                        None => std::future::pending().await,
                    }
                };
                let device = async {
                    match devices.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let event = tokio::select! {
                    () = closed => return None,
                    call = calls.recv() => match call {
                        // Then gather for a moment: one event (one write,
                        // one wake of the page) per batch, however busy.
                        Ok(first) => {
                            tokio::time::sleep(BATCH_WINDOW).await;
                            let mut batch = vec![first];
                            while let Ok(l) = calls.try_recv() {
                                batch.push(l);
                            }
                            batch.retain(|l| l.visible_to(credential.as_deref()));
                            if batch.is_empty() {
                                continue;
                            }
                            // A page shows the last LOG_SIZE calls: the rest
                            // are only counted.
                            let more = batch.len().saturating_sub(LOG_SIZE);
                            let shown: Vec<&str> = batch[more..].iter().map(|l| l.json()).collect();
                            let data = format!(r#"{{"calls":[{}],"more":{more}}}"#, shown.join(","));
                            Event::default().event("calls").data(data)
                        }
                        Err(RecvError::Lagged(n)) => lagged(n),
                        Err(RecvError::Closed) => return None,
                    },
                    device = device => match device {
                        Ok(d) if credential.as_deref().is_none_or(|c| c.sees_target(d.target.as_str())) => {
                            let body = serde_json::to_string(&DeviceBody::from(d)).unwrap_or_default();
                            Event::default().event("device").data(body)
                        }
                        Ok(_) => continue,
                        // Fell behind: the page reads the list again.
                        Err(RecvError::Lagged(n)) => lagged(n),
                        Err(RecvError::Closed) => {
                            *devices = None;
                            continue;
                        }
                    },
                    _ = ticker.tick() => {
                        let seconds = console.seconds_after(*last);
                        let Some(newest) = seconds.last().map(|s| s.t) else { continue };
                        *last = Some(newest);
                        Event::default().event("seconds").data(serde_json::to_string(&seconds).unwrap_or_default())
                    },
                };
                return Some((Ok(event), feed));
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
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
