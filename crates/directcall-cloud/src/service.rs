//! The HTTP-shaped invoke service the gateway and the Lambda share: request
//! parameters in, `(status, JSON body)` out, exactly as PROTOCOL.md's "HTTP
//! mapping" says. No HTTP server here: each front end parses its own
//! transport and calls this one code path.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use directcall_core::deadline::whole_millis;
use directcall_core::{Method, Target};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::Error;
use crate::requester::{Invocation, Requester};

/// Largest HTTP body accepted, in bytes (128 KiB, AWS IoT Core's payload limit).
pub const MAX_HTTP_REQUEST_BYTES: usize = 128 * 1024;
/// Largest query string accepted, in bytes (48 KiB): URIs longer than 64 KiB
/// cannot even be represented by the HTTP stack, so the limit sits below that.
pub const MAX_QUERY_BYTES: usize = 48 * 1024;
/// Default `timeout` of the seed's GET form: 10 s.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest `timeout_ms` of the JSON form: a deadline shorter than a network
/// round trip could only ever time out.
pub const MIN_TIMEOUT_MS: u64 = 100;
/// Default longest `timeout` a caller may ask for: 60 s.
pub const DEFAULT_MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// Latency histogram bucket bounds, in seconds.
const BUCKETS_S: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// An HTTP answer: status code and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpReply {
    /// HTTP status code.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

/// What a call ended as, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The device replied (200).
    Ok,
    /// No reply before the deadline (504).
    Timeout,
    /// The target is known offline (404).
    Offline,
    /// A bad parameter (400).
    Invalid,
    /// Too large (413).
    TooLarge,
    /// No broker connection (503).
    Unavailable,
    /// Missing or wrong credentials (401).
    Unauthorized,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::Timeout,
        Outcome::Offline,
        Outcome::Invalid,
        Outcome::TooLarge,
        Outcome::Unavailable,
        Outcome::Unauthorized,
    ];

    /// The `result` string of the HTTP body.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Timeout => "timeout",
            Outcome::Offline => "offline",
            Outcome::Invalid => "invalid_parameters",
            Outcome::TooLarge => "payload_too_large",
            Outcome::Unavailable => "unavailable",
            Outcome::Unauthorized => "unauthorized",
        }
    }

    /// Its HTTP status.
    pub fn http_status(self) -> u16 {
        match self {
            Outcome::Ok => 200,
            Outcome::Timeout => 504,
            Outcome::Offline => 404,
            Outcome::Invalid => 400,
            Outcome::TooLarge => 413,
            Outcome::Unavailable => 503,
            Outcome::Unauthorized => 401,
        }
    }

    fn index(self) -> usize {
        Outcome::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

impl HttpReply {
    /// `{"result": <outcome>, "response": <message>}` with the outcome's status.
    pub fn message(outcome: Outcome, message: impl Into<String>) -> Self {
        HttpReply {
            status: outcome.http_status(),
            body: json!({ "result": outcome.as_str(), "response": message.into() }),
        }
    }

    /// 401 `{"result": "unauthorized"}`.
    pub fn unauthorized() -> Self {
        HttpReply {
            status: 401,
            body: json!({ "result": "unauthorized" }),
        }
    }

    /// 400 naming the parameter.
    pub fn invalid(field: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        Self::message(Outcome::Invalid, format!("invalid {field}: {reason}"))
    }

    /// 413 for a body or query string of `size` bytes over `limit`.
    pub fn too_large(what: &str, size: Option<usize>, limit: usize) -> Self {
        let size = size.map(|s| format!(" ({s} bytes)")).unwrap_or_default();
        Self::message(
            Outcome::TooLarge,
            format!("{what}{size} exceeds {limit} bytes"),
        )
    }
}

/// Timeout limits of the HTTP forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// When the caller names none (default 10 s).
    pub default_timeout: Duration,
    /// The most a caller may ask for (default 60 s); more is refused with 400.
    pub max_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_timeout: DEFAULT_HTTP_TIMEOUT,
            max_timeout: DEFAULT_MAX_HTTP_TIMEOUT,
        }
    }
}

#[derive(Debug, Default)]
struct Metrics {
    calls: [AtomicU64; 7],
    buckets: [AtomicU64; BUCKETS_S.len()],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
    in_flight: AtomicI64,
}

/// Validates HTTP-shaped calls, runs them through a [`Requester`], and renders
/// the outcome as PROTOCOL.md's HTTP table. Cheap to clone.
#[derive(Debug, Clone)]
pub struct InvokeService {
    requester: Requester,
    limits: Limits,
    metrics: Arc<Metrics>,
}

/// The POST body: `{"request": <any JSON>, "timeout_ms": <int>}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostBody {
    #[serde(default)]
    request: Value,
    #[serde(default)]
    timeout_ms: Option<Value>,
}

impl InvokeService {
    /// A service calling through `requester` within `limits`.
    pub fn new(requester: Requester, limits: Limits) -> Self {
        InvokeService {
            requester,
            limits,
            metrics: Arc::default(),
        }
    }

    /// The requester behind it.
    pub fn requester(&self) -> &Requester {
        &self.requester
    }

    /// The timeout limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The seed's GET form: `request`, `method`, `target` and `timeout`
    /// (whole seconds) as decoded query pairs. Unknown parameters are ignored;
    /// a repeated one is refused.
    ///
    /// # Errors
    /// A 400 [`HttpReply`] naming the first bad or missing parameter.
    pub fn query_invocation<K, V>(
        &self,
        pairs: impl IntoIterator<Item = (K, V)>,
        start: Instant,
    ) -> Result<Invocation, HttpReply>
    where
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut params: HashMap<&'static str, String> = HashMap::new();
        for (key, value) in pairs {
            let Some(name) = ["request", "method", "target", "timeout"]
                .into_iter()
                .find(|n| *n == key.as_ref())
            else {
                continue;
            };
            if params.insert(name, value.into()).is_some() {
                return Err(HttpReply::invalid(name, "given more than once"));
            }
        }
        let target = required(&params, "target")?;
        let target = Target::new(target).map_err(|e| HttpReply::invalid("target", reason(&e)))?;
        let method = required(&params, "method")?;
        let method = Method::new(method).map_err(|e| HttpReply::invalid("method", reason(&e)))?;
        let request = required(&params, "request")?.to_owned();
        let timeout = match params.get("timeout") {
            None => self.limits.default_timeout,
            Some(t) => self.timeout_secs(t)?,
        };
        Ok(Invocation::new(target, method, Value::String(request))
            .timeout(timeout)
            .started_at(start))
    }

    /// The JSON form: `POST /v1/targets/{target}/methods/{method}` with
    /// `{"request": <any JSON>, "timeout_ms": <int>}`. `content_type`, when
    /// given, must be `application/json`.
    ///
    /// # Errors
    /// A 413 [`HttpReply`] for a body over 128 KiB, a 400 naming the bad part.
    pub fn post_invocation(
        &self,
        target: &str,
        method: &str,
        content_type: Option<&str>,
        body: &[u8],
        start: Instant,
    ) -> Result<Invocation, HttpReply> {
        if body.len() > MAX_HTTP_REQUEST_BYTES {
            return Err(HttpReply::too_large(
                "body",
                Some(body.len()),
                MAX_HTTP_REQUEST_BYTES,
            ));
        }
        let target = Target::new(target).map_err(|e| HttpReply::invalid("target", reason(&e)))?;
        let method = Method::new(method).map_err(|e| HttpReply::invalid("method", reason(&e)))?;
        if let Some(ct) = content_type {
            let essence = ct.split(';').next().unwrap_or_default().trim();
            if !essence.eq_ignore_ascii_case("application/json") {
                return Err(HttpReply::invalid(
                    "content-type",
                    format!("must be application/json, got {ct:?}"),
                ));
            }
        }
        const SHAPE: &str = "expected {\"request\": <any JSON>, \"timeout_ms\": <integer>}";
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| HttpReply::invalid("body", format!("{e}; {SHAPE}")))?;
        if !value.is_object() {
            return Err(HttpReply::invalid(
                "body",
                format!("not a JSON object; {SHAPE}"),
            ));
        }
        // Present but null is a wrong type, not an absent field.
        let timeout_given = value.get("timeout_ms").cloned();
        let parsed: PostBody = serde_json::from_value(value)
            .map_err(|e| HttpReply::invalid("body", format!("{e}; {SHAPE}")))?;
        let timeout = match timeout_given.or(parsed.timeout_ms) {
            None => self.limits.default_timeout,
            Some(v) => self.timeout_ms(&v)?,
        };
        Ok(Invocation::new(target, method, parsed.request)
            .timeout(timeout)
            .started_at(start))
    }

    fn timeout_secs(&self, value: &str) -> Result<Duration, HttpReply> {
        let max = self.limits.max_timeout.as_secs().max(1);
        let secs = value
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=max).contains(s) && value.bytes().all(|b| b.is_ascii_digit()));
        secs.map(Duration::from_secs).ok_or_else(|| {
            HttpReply::invalid(
                "timeout",
                format!("must be a whole number of seconds from 1 to {max}, got {value:?}"),
            )
        })
    }

    fn timeout_ms(&self, value: &Value) -> Result<Duration, HttpReply> {
        let max = whole_millis(self.limits.max_timeout).max(MIN_TIMEOUT_MS);
        value
            .as_u64()
            .filter(|ms| (MIN_TIMEOUT_MS..=max).contains(ms))
            .map(Duration::from_millis)
            .ok_or_else(|| {
                HttpReply::invalid(
                    "timeout_ms",
                    format!("must be a whole number of milliseconds from {MIN_TIMEOUT_MS} to {max}, got {value}"),
                )
            })
    }

    /// Runs `invocation` and renders the outcome; also counts it and logs one
    /// line at debug level.
    pub async fn invoke(&self, invocation: Invocation) -> HttpReply {
        // Kept only for the debug line, and only when it will be written.
        let names = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| (invocation.target().clone(), invocation.method().clone()));
        let start = invocation.start_time().unwrap_or_else(Instant::now);
        self.metrics.in_flight.fetch_add(1, Relaxed);
        let result = self.requester.invoke(invocation).await;
        self.metrics.in_flight.fetch_sub(1, Relaxed);
        let elapsed = start.elapsed();
        let elapsed_ms = whole_millis(elapsed).to_string();
        let (outcome, body, id) = match result {
            Ok(reply) => (
                Outcome::Ok,
                json!({
                    "result": "ok",
                    "elapsed": whole_millis(reply.elapsed).to_string(),
                    "response": reply.response,
                    "status": reply.status,
                    "id": reply.id.to_string(),
                }),
                Some(reply.id),
            ),
            Err(Error::Timeout { elapsed, id }) => (
                Outcome::Timeout,
                json!({"result": "timeout", "elapsed": whole_millis(elapsed).to_string(), "id": id.to_string()}),
                Some(id),
            ),
            Err(Error::Offline { .. }) => (
                Outcome::Offline,
                json!({"result": "offline", "elapsed": elapsed_ms}),
                None,
            ),
            Err(Error::Invalid { field, reason }) => {
                let r = HttpReply::invalid(field, reason);
                (Outcome::Invalid, r.body, None)
            }
            Err(e @ Error::PayloadTooLarge { .. }) => (
                Outcome::TooLarge,
                HttpReply::message(Outcome::TooLarge, e.to_string()).body,
                None,
            ),
            Err(e) => (
                Outcome::Unavailable,
                HttpReply::message(Outcome::Unavailable, e.to_string()).body,
                None,
            ),
        };
        self.record(outcome, Some(elapsed));
        if let Some((target, method)) = names {
            tracing::debug!(
                id = id.map(|i| i.to_string()).unwrap_or_default(),
                %target,
                %method,
                outcome = outcome.as_str(),
                elapsed_ms = whole_millis(elapsed),
                "call"
            );
        }
        HttpReply {
            status: outcome.http_status(),
            body,
        }
    }

    /// Counts a request refused before it became a call (401, 413, 400 at
    /// the HTTP layer).
    pub fn record_refused(&self, outcome: Outcome) {
        self.record(outcome, None);
    }

    fn record(&self, outcome: Outcome, latency: Option<Duration>) {
        let m = &self.metrics;
        m.calls[outcome.index()].fetch_add(1, Relaxed);
        if let Some(latency) = latency {
            let s = latency.as_secs_f64();
            if let Some(i) = BUCKETS_S.iter().position(|b| s <= *b) {
                m.buckets[i].fetch_add(1, Relaxed);
            }
            m.latency_sum_us.fetch_add(
                u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
                Relaxed,
            );
            m.latency_count.fetch_add(1, Relaxed);
        }
    }

    /// Prometheus text exposition (format 0.0.4) of calls by outcome, the
    /// latency histogram, calls in flight, pending calls, dropped replies by
    /// reason, broker reconnects and connection state.
    pub fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let stats = self.requester.stats();
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP directcall_calls_total HTTP calls by outcome.\n# TYPE directcall_calls_total counter\n");
        for o in Outcome::ALL {
            let _ = writeln!(
                out,
                "directcall_calls_total{{outcome=\"{}\"}} {}",
                o.as_str(),
                m.calls[o.index()].load(Relaxed)
            );
        }
        out.push_str("# HELP directcall_call_duration_seconds Time from request arrival to answer, for calls that reached the broker.\n# TYPE directcall_call_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS_S.iter().enumerate() {
            cumulative += m.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "directcall_call_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = m.latency_count.load(Relaxed);
        let _ = writeln!(
            out,
            "directcall_call_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "directcall_call_duration_seconds_sum {}",
            m.latency_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "directcall_call_duration_seconds_count {count}");
        let _ = write!(
            out,
            "# HELP directcall_calls_in_flight Calls waiting for a device now.\n# TYPE directcall_calls_in_flight gauge\ndirectcall_calls_in_flight {}\n",
            m.in_flight.load(Relaxed)
        );
        let _ = write!(
            out,
            "# HELP directcall_pending_calls Entries in the pending-call table.\n# TYPE directcall_pending_calls gauge\ndirectcall_pending_calls {}\n",
            stats.pending
        );
        out.push_str("# HELP directcall_replies_dropped_total Replies that completed no call, by reason.\n# TYPE directcall_replies_dropped_total counter\n");
        for (reason, n) in [
            ("late", stats.dropped_late),
            ("duplicate", stats.dropped_duplicate),
            ("unknown", stats.dropped_unknown),
            ("mismatched", stats.dropped_mismatched),
            ("malformed", stats.dropped_malformed),
            ("oversized", stats.dropped_oversized),
        ] {
            let _ = writeln!(
                out,
                "directcall_replies_dropped_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = write!(
            out,
            "# HELP directcall_broker_reconnects_total Broker connections made after the first.\n# TYPE directcall_broker_reconnects_total counter\ndirectcall_broker_reconnects_total {}\n",
            stats.reconnects
        );
        let _ = write!(
            out,
            "# HELP directcall_broker_connected Whether the broker connection is up and subscribed.\n# TYPE directcall_broker_connected gauge\ndirectcall_broker_connected {}\n",
            u8::from(stats.connected)
        );
        out
    }
}

fn required<'a>(
    params: &'a HashMap<&'static str, String>,
    name: &'static str,
) -> Result<&'a str, HttpReply> {
    match params.get(name) {
        Some(v) => Ok(v),
        None => Err(HttpReply::invalid(name, "missing")),
    }
}

/// The reason part of a core validation error (the field is named by the caller).
fn reason(e: &directcall_core::Error) -> String {
    match e {
        directcall_core::Error::Invalid { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BrokerOptions, Options};

    fn service() -> InvokeService {
        // Never connects: parsing needs no broker.
        let options = Options::new(BrokerOptions::new("127.0.0.1", 9));
        InvokeService::new(Requester::start(options).unwrap(), Limits::default())
    }

    fn query(s: &InvokeService, q: &str) -> Result<Invocation, HttpReply> {
        s.query_invocation(form_urlencoded::parse(q.as_bytes()), Instant::now())
    }

    fn message(r: HttpReply) -> String {
        assert_eq!(r.status, 400);
        assert_eq!(r.body["result"], "invalid_parameters");
        r.body["response"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn the_seed_query_parses() {
        let s = service();
        let inv = query(
            &s,
            "request=my_request_1&method=reqid-ABCD&target=Device001&timeout=3",
        )
        .unwrap();
        assert_eq!(inv.target().as_str(), "Device001");
        assert_eq!(inv.method().as_str(), "reqid-ABCD");
        assert_eq!(inv.request(), &json!("my_request_1"));
        assert_eq!(inv.timeout_duration(), Duration::from_secs(3));
        let inv = query(&s, "request=&method=m&target=t&extra=1").unwrap();
        assert_eq!(inv.timeout_duration(), DEFAULT_HTTP_TIMEOUT);
    }

    #[tokio::test]
    async fn bad_queries_name_the_parameter() {
        let s = service();
        for (q, field) in [
            ("method=m&request=r", "target"),
            ("target=t&request=r", "method"),
            ("target=t&method=m", "request"),
            ("target=&method=m&request=r", "target"),
            ("target=a%2Fb&method=m&request=r", "target"),
            ("target=%23&method=m&request=r", "target"),
            ("target=t&method=%2B&request=r", "method"),
            ("target=t&method=%24SYS&request=r", "method"),
            ("target=t&target=u&method=m&request=r", "target"),
            ("target=t&method=m&request=r&timeout=0", "timeout"),
            ("target=t&method=m&request=r&timeout=-1", "timeout"),
            ("target=t&method=m&request=r&timeout=61", "timeout"),
            ("target=t&method=m&request=r&timeout=1e9", "timeout"),
            ("target=t&method=m&request=r&timeout=2.5", "timeout"),
            ("target=t&method=m&request=r&timeout=abc", "timeout"),
            ("target=t&method=m&request=r&timeout=", "timeout"),
            ("target=t&method=m&request=r&timeout=%2B5", "timeout"),
        ] {
            let m = message(query(&s, q).unwrap_err());
            assert!(m.starts_with(&format!("invalid {field}: ")), "{q}: {m}");
        }
    }

    #[tokio::test]
    async fn post_bodies() {
        let s = service();
        let now = Instant::now();
        let inv = s
            .post_invocation(
                "car",
                "unlock",
                Some("application/json; charset=utf-8"),
                br#"{"request":{"a":[1]},"timeout_ms":2500}"#,
                now,
            )
            .unwrap();
        assert_eq!(inv.request(), &json!({"a": [1]}));
        assert_eq!(inv.timeout_duration(), Duration::from_millis(2500));
        let inv = s
            .post_invocation("car", "unlock", None, b"{}", now)
            .unwrap();
        assert_eq!(inv.request(), &Value::Null);
        for (ct, body, field) in [
            (None, &b"not json"[..], "body"),
            (None, b"[]", "body"),
            (None, br#"{"timeout":3}"#, "body"),
            (None, br#"{"timeout_ms":0}"#, "timeout_ms"),
            (None, br#"{"timeout_ms":60001}"#, "timeout_ms"),
            (None, br#"{"timeout_ms":1.5}"#, "timeout_ms"),
            (None, br#"{"timeout_ms":"100"}"#, "timeout_ms"),
            (None, br#"{"timeout_ms":null}"#, "timeout_ms"),
            (None, br#"{"timeout_ms":99}"#, "timeout_ms"),
            (Some("text/plain"), b"{}", "content-type"),
        ] {
            let m = message(
                s.post_invocation("car", "unlock", ct, body, now)
                    .unwrap_err(),
            );
            assert!(m.starts_with(&format!("invalid {field}: ")), "{m}");
        }
        let deep = format!("{{\"request\":{}{}}}", "[".repeat(200), "]".repeat(200));
        let m = message(
            s.post_invocation("car", "unlock", None, deep.as_bytes(), now)
                .unwrap_err(),
        );
        assert!(m.starts_with("invalid body: "), "{m}");
        let m = message(
            s.post_invocation("car/x", "unlock", None, b"{}", now)
                .unwrap_err(),
        );
        assert!(m.starts_with("invalid target: "), "{m}");
        let big = vec![b' '; MAX_HTTP_REQUEST_BYTES + 1];
        assert_eq!(
            s.post_invocation("car", "unlock", None, &big, now)
                .unwrap_err()
                .status,
            413
        );
    }

    #[tokio::test]
    async fn an_unconnected_service_answers_503_and_counts_it() {
        let s = service();
        let inv = query(&s, "target=t&method=m&request=r&timeout=1").unwrap();
        let r = s.invoke(inv).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body["result"], "unavailable");
        let text = s.metrics_text();
        assert!(
            text.contains("directcall_calls_total{outcome=\"unavailable\"} 1"),
            "{text}"
        );
        assert!(text.contains("directcall_broker_connected 0"), "{text}");
    }
}
