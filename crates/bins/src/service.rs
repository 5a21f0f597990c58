//! The HTTP mapping of PROTOCOL.md, independent of any HTTP server:
//! request parameters in, `(status, JSON body)` out. The bodies are the
//! typed structs below, so the OpenAPI document (derived from them with
//! utoipa) cannot drift from what is sent.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use directcall_cloud::{Invocation, Requester};
use directcall_core::deadline::whole_millis;
use directcall_core::{MessageId, Method, Target};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{Counter, Gauge, Histogram};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::cli::ConfigError;

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

/// Calls by outcome.
pub const CALLS: &str = "directcall_calls_total";
/// Time from request arrival to answer, for calls that reached the broker.
pub const CALL_DURATION: &str = "directcall_call_duration_seconds";
/// Calls waiting for a device now.
pub const CALLS_IN_FLIGHT: &str = "directcall_calls_in_flight";
/// Bucket bounds of [`CALL_DURATION`], in seconds.
pub const CALL_DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// An HTTP answer: status code and JSON body.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HttpReply {
    /// HTTP status code.
    pub status: u16,
    /// JSON body.
    pub body: Value,
    /// The outcome is a stored one (an idempotency key's): answered with
    /// `Idempotent-Replayed: true`.
    pub replayed: bool,
    /// A `Location` to answer with (a call accepted asynchronously).
    pub location: Option<String>,
    /// Seconds for `Retry-After` (a 429).
    pub retry_after: Option<u64>,
}

/// What a call ended as: the `result` of the body and its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// The device replied (200).
    Ok,
    /// No reply before the deadline (504).
    Timeout,
    /// The target is known offline (404).
    Offline,
    /// A bad parameter (400).
    #[serde(rename = "invalid_parameters")]
    Invalid,
    /// Too large (413).
    #[serde(rename = "payload_too_large")]
    TooLarge,
    /// No broker connection (503).
    Unavailable,
    /// Missing or wrong credentials (401).
    Unauthorized,
    /// No such route (404).
    NotFound,
    /// The route does not take this HTTP method (405).
    MethodNotAllowed,
    /// An idempotency key reused for another call (409).
    Conflict,
    /// A call accepted to run asynchronously (202).
    Accepted,
    /// Outside the credential's scope (403).
    Forbidden,
    /// Over a rate or in-flight limit (429).
    #[serde(rename = "rate_limited")]
    Limited,
}

impl Outcome {
    /// Every outcome, in a fixed order.
    pub const ALL: [Outcome; 13] = [
        Outcome::Ok,
        Outcome::Timeout,
        Outcome::Offline,
        Outcome::Invalid,
        Outcome::TooLarge,
        Outcome::Unavailable,
        Outcome::Unauthorized,
        Outcome::NotFound,
        Outcome::MethodNotAllowed,
        Outcome::Conflict,
        Outcome::Accepted,
        Outcome::Forbidden,
        Outcome::Limited,
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
            Outcome::NotFound => "not_found",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::Conflict => "conflict",
            Outcome::Accepted => "accepted",
            Outcome::Forbidden => "forbidden",
            Outcome::Limited => "rate_limited",
        }
    }

    /// Its HTTP status.
    pub fn http_status(self) -> u16 {
        match self {
            Outcome::Ok => 200,
            Outcome::Timeout => 504,
            Outcome::Offline | Outcome::NotFound => 404,
            Outcome::Invalid => 400,
            Outcome::TooLarge => 413,
            Outcome::Unavailable => 503,
            Outcome::Unauthorized => 401,
            Outcome::MethodNotAllowed => 405,
            Outcome::Conflict => 409,
            Outcome::Accepted => 202,
            Outcome::Forbidden => 403,
            Outcome::Limited => 429,
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Outcome::Ok => 0,
            Outcome::Timeout => 1,
            Outcome::Offline => 2,
            Outcome::Invalid => 3,
            Outcome::TooLarge => 4,
            Outcome::Unavailable => 5,
            Outcome::Unauthorized => 6,
            Outcome::NotFound => 7,
            Outcome::MethodNotAllowed => 8,
            Outcome::Conflict => 9,
            Outcome::Accepted => 10,
            Outcome::Forbidden => 11,
            Outcome::Limited => 12,
        }
    }
}

/// 200: the device answered.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct OkBody {
    /// Always `ok`.
    #[schema(value_type = String, pattern = "^ok$")]
    pub result: Outcome,
    /// Whole milliseconds since the request arrived.
    #[schema(pattern = "^[0-9]+$")]
    pub elapsed: String,
    /// The device's answer, any JSON.
    pub response: Value,
    /// The device's verdict: 200 done, 400, 404 unknown method, 500 handler
    /// failed, 503 busy.
    pub status: u16,
    /// The call's id.
    #[schema(pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    pub id: String,
}

/// 504: no reply before the deadline. The device may or may not have run
/// the method.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct TimeoutBody {
    /// Always `timeout`.
    #[schema(value_type = String, pattern = "^timeout$")]
    pub result: Outcome,
    /// Whole milliseconds since the request arrived.
    #[schema(pattern = "^[0-9]+$")]
    pub elapsed: String,
    /// The call's id.
    #[schema(pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    pub id: String,
    /// Where the call's record is (`/v1/calls/{id}`), when calls are
    /// recorded: a late answer lands there.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^/v1/calls/[0-9a-f-]{36}$")]
    pub call: Option<String>,
    /// With delivery receipts on: `delivered at +N ms, no answer by the
    /// deadline`, or `no sign of delivery`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
}

/// 202: the call was published and goes on; its record says how it ends.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct AcceptedBody {
    /// Always `accepted`.
    #[schema(value_type = String, pattern = "^accepted$")]
    pub result: Outcome,
    /// The call's id.
    #[schema(pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    pub id: String,
    /// Its record, also in the `Location` header: poll it, or long-poll
    /// it with `?wait=SECONDS`.
    #[schema(pattern = "^/v1/calls/[0-9a-f-]{36}$")]
    pub call: String,
}

/// 200 from `GET /v1/calls/{id}`: what became of a call. The schema of
/// [`directcall_cloud::CallRecord`]'s JSON, which is what is sent (the
/// cloud crate does not depend on utoipa); a test keeps the two alike.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct CallRecordBody {
    /// The call's id.
    #[schema(pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    pub id: String,
    /// The device called.
    pub target: String,
    /// The method called.
    pub method: String,
    /// `sent` (no answer yet), `delivered` (the device acknowledged it; no
    /// answer yet), `answered`, `timed_out` (no answer by the deadline, so
    /// far), `answered_late` (the answer came after the deadline and is
    /// here), `offline` (MQTT 5: no device subscribed), `unavailable` (MQTT
    /// 5: the broker refused the request).
    #[schema(pattern = "^(sent|delivered|answered|timed_out|answered_late|offline|unavailable)$")]
    pub state: String,
    /// When the request was published, in milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// When the device's delivery receipt arrived, in milliseconds since
    /// the Unix epoch (only when the gateway asks for receipts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at_ms: Option<u64>,
    /// When the answer arrived, in milliseconds since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered_at_ms: Option<u64>,
    /// The device's status, once it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The device's answer, any JSON, once it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// MQTT 5: the broker's PUBACK reason code, when it refused the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<u8>,
}

/// 404: the target is known to be offline; nothing was published.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct OfflineBody {
    /// Always `offline`.
    #[schema(value_type = String, pattern = "^offline$")]
    pub result: Outcome,
    /// Whole milliseconds since the request arrived.
    #[schema(pattern = "^[0-9]+$")]
    pub elapsed: String,
    /// Why it is known offline, when not from a presence record (MQTT 5: no
    /// device is subscribed to the target's requests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// The call's id, when a request was published (and refused by the
    /// broker for want of a subscriber).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// 400, 404 (no route), 405, 413, 503: what went wrong, in words.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct MessageBody {
    /// `invalid_parameters`, `payload_too_large`, `unavailable`,
    /// `not_found`, `method_not_allowed`, `conflict`, `forbidden` or
    /// `rate_limited`.
    #[schema(value_type = String, pattern = "^(invalid_parameters|payload_too_large|unavailable|not_found|method_not_allowed|conflict|forbidden|rate_limited)$")]
    pub result: Outcome,
    /// Which parameter, and why; or what is unavailable.
    pub response: String,
}

/// 401: missing or wrong credentials.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct UnauthorizedBody {
    /// Always `unauthorized`.
    #[schema(value_type = String, pattern = "^unauthorized$")]
    pub result: Outcome,
    /// Why, when there is more to say than "no credential matched" (a JWT
    /// that is expired, for another audience, ...); never the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

/// The seed's query parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct InvokeQuery {
    /// The device (one topic level: 1-128 bytes of `A-Z a-z 0-9 _ - . :`).
    #[param(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_.:-]+$")]
    target: String,
    /// The method (one topic level).
    #[param(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_.:-]+$")]
    method: String,
    /// The request value, sent to the device as a JSON string.
    request: String,
    /// Whole seconds to wait, 1 to the gateway's maximum.
    #[param(minimum = 1, maximum = 60, default = 10)]
    timeout: Option<u64>,
}

/// The JSON form's body: `{"request": <any JSON>, "timeout_ms": <int>}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PostBody {
    /// The request value, any JSON (default `null`).
    #[serde(default)]
    pub request: Value,
    /// Milliseconds to wait, 100 to the gateway's maximum.
    #[serde(default)]
    #[schema(value_type = u64, required = false, minimum = 100, maximum = 60000)]
    pub timeout_ms: Option<Value>,
}

fn body(value: &impl Serialize) -> Value {
    // Serialising these structs of strings, numbers and JSON values cannot fail.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

impl HttpReply {
    /// `{"result": <outcome>, "response": <message>}` with the outcome's status.
    pub fn message(outcome: Outcome, message: impl Into<String>) -> Self {
        HttpReply {
            status: outcome.http_status(),
            body: body(&MessageBody {
                result: outcome,
                response: message.into(),
            }),
            replayed: false,
            location: None,
            retry_after: None,
        }
    }

    /// 401 `{"result": "unauthorized"}`.
    pub fn unauthorized() -> Self {
        Self::unauthorized_with(None)
    }

    /// 401 saying why (never the token).
    pub fn unauthorized_because(why: impl Into<String>) -> Self {
        Self::unauthorized_with(Some(why.into()))
    }

    fn unauthorized_with(response: Option<String>) -> Self {
        HttpReply {
            status: 401,
            body: body(&UnauthorizedBody {
                result: Outcome::Unauthorized,
                response,
            }),
            replayed: false,
            location: None,
            retry_after: None,
        }
    }

    /// 400 naming the parameter.
    pub fn invalid(field: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        Self::message(Outcome::Invalid, format!("invalid {field}: {reason}"))
    }

    /// 429 naming the limit, with `Retry-After` (whole seconds, at least 1).
    pub fn limited(message: impl Into<String>, wait: Duration) -> Self {
        let mut reply = Self::message(Outcome::Limited, message);
        reply.retry_after = Some(
            wait.as_millis()
                .div_ceil(1000)
                .max(1)
                .try_into()
                .unwrap_or(u64::MAX),
        );
        reply
    }

    /// 413 for a body or query string of `size` bytes over `limit`.
    pub fn too_large(what: &str, size: Option<usize>, limit: usize) -> Self {
        let size = size.map(|s| format!(" ({s} bytes)")).unwrap_or_default();
        Self::message(
            Outcome::TooLarge,
            format!("{what}{size} exceeds {limit} bytes"),
        )
    }

    /// 404 for a path that is no route.
    pub fn not_found(path: &str) -> Self {
        Self::message(Outcome::NotFound, format!("no route {path}"))
    }

    /// 405 for a route that does not take the request's method.
    pub fn method_not_allowed(path: &str, method: &str) -> Self {
        Self::message(
            Outcome::MethodNotAllowed,
            format!("{path} does not take {method}"),
        )
    }

    /// The outcome its body names.
    pub fn outcome(&self) -> Option<Outcome> {
        let result = self.body.get("result")?.as_str()?;
        Outcome::ALL.into_iter().find(|o| o.as_str() == result)
    }
}

/// Timeout limits of the HTTP forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// When the caller names none (default 10 s).
    pub default_timeout: Duration,
    /// The most a caller may ask for (default 60 s); more is refused with 400.
    pub max_timeout: Duration,
}

impl Limits {
    /// `default_timeout` and `max_timeout`, both whole seconds.
    ///
    /// # Errors
    /// [`ConfigError::Conflict`] when either is zero or the default exceeds
    /// the maximum.
    pub fn new(default_timeout: u64, max_timeout: u64) -> Result<Self, ConfigError> {
        if default_timeout == 0 || max_timeout == 0 || default_timeout > max_timeout {
            return Err(ConfigError::Conflict(format!(
                "--default-timeout ({default_timeout}) must be from 1 to --max-timeout ({max_timeout})"
            )));
        }
        Ok(Limits {
            default_timeout: Duration::from_secs(default_timeout),
            max_timeout: Duration::from_secs(max_timeout),
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_timeout: DEFAULT_HTTP_TIMEOUT,
            max_timeout: DEFAULT_MAX_HTTP_TIMEOUT,
        }
    }
}

#[derive(Debug)]
struct Metrics {
    calls: [Counter; 13],
    duration: Histogram,
    in_flight: Gauge,
}

impl Metrics {
    fn register() -> Self {
        describe_counter!(CALLS, "HTTP calls by outcome.");
        describe_histogram!(
            CALL_DURATION,
            metrics::Unit::Seconds,
            "Time from request arrival to answer, for calls that reached the broker."
        );
        describe_gauge!(CALLS_IN_FLIGHT, "Calls waiting for a device now.");
        Metrics {
            calls: Outcome::ALL.map(|o| counter!(CALLS, "outcome" => o.as_str())),
            duration: histogram!(CALL_DURATION),
            in_flight: gauge!(CALLS_IN_FLIGHT),
        }
    }
}

/// Validates HTTP-shaped calls, runs them through a [`Requester`], and renders
/// the outcome as PROTOCOL.md's HTTP table. Cheap to clone.
#[derive(Debug, Clone)]
pub struct InvokeService {
    requester: Requester,
    limits: Limits,
    metrics: std::sync::Arc<Metrics>,
    /// The web console's per-second tally, when the console is on.
    console: Option<std::sync::Arc<crate::console::Console>>,
}

impl InvokeService {
    /// A service calling through `requester` within `limits`. Its metrics
    /// go to the `metrics` recorder installed at this point.
    pub fn new(requester: Requester, limits: Limits) -> Self {
        InvokeService {
            requester,
            limits,
            metrics: std::sync::Arc::new(Metrics::register()),
            console: None,
        }
    }

    /// The same service, also counting every outcome into `console`.
    pub(crate) fn with_console(mut self, console: std::sync::Arc<crate::console::Console>) -> Self {
        self.console = Some(console);
        self
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
        let target = Target::new(target).map_err(|e| HttpReply::invalid("target", e.reason()))?;
        let method = required(&params, "method")?;
        let method = Method::new(method).map_err(|e| HttpReply::invalid("method", e.reason()))?;
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
        let target = Target::new(target).map_err(|e| HttpReply::invalid("target", e.reason()))?;
        let method = Method::new(method).map_err(|e| HttpReply::invalid("method", e.reason()))?;
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
        // JSON Schema counts 814.0 as an integer; so does this.
        let whole = value.as_u64().or_else(|| {
            value
                .as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f))
                .map(|f| f as u64)
        });
        whole
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
        let names = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            (
                invocation.get_target().clone(),
                invocation.get_method().clone(),
            )
        });
        let start = invocation
            .get_started_at()
            .unwrap_or_else(tokio::time::Instant::now);
        self.metrics.in_flight.increment(1.0);
        let keyed = self.requester.invoke_keyed(invocation).await;
        self.metrics.in_flight.decrement(1.0);
        let elapsed = start.elapsed();
        let recorded = self.requester.record_options().is_some();
        let mut reply = render(keyed.result, elapsed, recorded);
        reply.replayed = keyed.replayed;
        if reply.status == 504 && self.requester.asks_receipts() {
            let record = reply.body["id"]
                .as_str()
                .and_then(|id| MessageId::parse(id).ok())
                .and_then(|id| self.requester.call_record(&id));
            reply.body["delivery"] =
                match record.and_then(|r| Some(r.delivered_at_ms?.saturating_sub(r.sent_at_ms))) {
                    Some(ms) => format!("delivered at +{ms} ms, no answer by the deadline"),
                    None => "no sign of delivery".to_owned(),
                }
                .into();
        }
        let outcome = reply.outcome().unwrap_or(Outcome::Unavailable);
        self.record(outcome, Some(elapsed));
        if let Some((target, method)) = names {
            tracing::debug!(
                id = reply.body.get("id").and_then(serde_json::Value::as_str).unwrap_or_default(),
                %target,
                %method,
                outcome = outcome.as_str(),
                elapsed_ms = whole_millis(elapsed),
                "call"
            );
        }
        reply
    }

    /// `Prefer: respond-async`: publishes the call and answers 202 at once,
    /// with its record's place; the call goes on, and ends on its record.
    pub async fn submit(&self, invocation: Invocation) -> HttpReply {
        let start = invocation
            .get_started_at()
            .unwrap_or_else(tokio::time::Instant::now);
        let reply = match self.requester.submit(invocation).await {
            Ok(id) => {
                let call = format!("/v1/calls/{id}");
                HttpReply {
                    status: 202,
                    body: body(&AcceptedBody {
                        result: Outcome::Accepted,
                        id: id.to_string(),
                        call: call.clone(),
                    }),
                    replayed: false,
                    location: Some(call),
                    retry_after: None,
                }
            }
            Err(e) => render(Err(e), start.elapsed(), true),
        };
        self.record(reply.outcome().unwrap_or(Outcome::Unavailable), None);
        reply
    }

    /// `GET /v1/calls/{id}?wait=SECONDS`: [`InvokeService::call_record`],
    /// waiting up to `wait` for the call to be final.
    pub async fn wait_call_record(&self, id: &str, wait: Duration) -> HttpReply {
        if let (Ok(id), false) = (MessageId::parse(id), wait.is_zero()) {
            self.requester.wait_call_record(&id, wait).await;
        }
        self.call_record(id).await
    }

    /// `GET /v1/calls/{id}`: the call's record, 404 when there is none (never
    /// made here, past retention, or calls not recorded), 400 for an id that
    /// is not a call id.
    pub async fn call_record(&self, id: &str) -> HttpReply {
        let Ok(id) = MessageId::parse(id) else {
            return HttpReply::invalid("id", "not a call id (a lowercase hyphenated UUID)");
        };
        let Some(options) = self.requester.record_options() else {
            return HttpReply::message(
                Outcome::NotFound,
                "calls are not recorded here (--record-retention 0)",
            );
        };
        match self.requester.fetch_call_record(&id).await {
            Some(r) => HttpReply {
                status: 200,
                // directcall_cloud::CallRecord's own JSON: CallRecordBody is its schema.
                body: body(&r),
                replayed: false,
                location: None,
                retry_after: None,
            },
            None => HttpReply::message(
                Outcome::NotFound,
                match self.requester.get_store() {
                    Some(_) => format!(
                        "no record of call {id}: records are kept {} s",
                        options.retention.as_secs()
                    ),
                    None => format!(
                        "no record of call {id}: records are kept {} s, and each gateway keeps only its own calls' (--store redis://… shares them)",
                        options.retention.as_secs()
                    ),
                },
            ),
        }
    }

    /// Counts a request refused before it became a call (401, 413, 400 at
    /// the HTTP layer).
    pub fn record_refused(&self, outcome: Outcome) {
        self.record(outcome, None);
    }

    fn record(&self, outcome: Outcome, latency: Option<Duration>) {
        self.metrics.calls[outcome.index()].increment(1);
        if let Some(latency) = latency {
            self.metrics.duration.record(latency.as_secs_f64());
        }
        if let Some(console) = &self.console {
            console.count(outcome, latency);
        }
    }
}

/// PROTOCOL.md's HTTP table.
fn render(
    result: Result<directcall_cloud::Reply, directcall_cloud::Error>,
    elapsed: Duration,
    recorded: bool,
) -> HttpReply {
    use directcall_cloud::Error;
    let ms = |d: Duration| whole_millis(d).to_string();
    let (status, value) = match result {
        Ok(reply) => (
            200,
            body(&OkBody {
                result: Outcome::Ok,
                elapsed: ms(reply.elapsed),
                response: reply.response,
                status: reply.status,
                id: reply.id.to_string(),
            }),
        ),
        Err(Error::Timeout { elapsed, id }) => (
            504,
            body(&TimeoutBody {
                result: Outcome::Timeout,
                elapsed: ms(elapsed),
                id: id.to_string(),
                call: recorded.then(|| format!("/v1/calls/{id}")),
                delivery: None,
            }),
        ),
        Err(Error::Offline { .. }) => (
            404,
            body(&OfflineBody {
                result: Outcome::Offline,
                elapsed: ms(elapsed),
                response: None,
                id: None,
            }),
        ),
        Err(Error::NoSubscriber { id }) => (
            404,
            body(&OfflineBody {
                result: Outcome::Offline,
                elapsed: ms(elapsed),
                response: Some(Error::NoSubscriber { id }.to_string()),
                id: Some(id.to_string()),
            }),
        ),
        Err(Error::Invalid { field, reason }) => return HttpReply::invalid(field, reason),
        Err(e @ Error::KeyConflict) => return HttpReply::message(Outcome::Conflict, e.to_string()),
        Err(e @ Error::PayloadTooLarge { .. }) => {
            return HttpReply::message(Outcome::TooLarge, e.to_string())
        }
        // Unavailable, Refused (the broker refused the publish), Closed,
        // and what a later version may add: not the caller's doing, and
        // nothing was delivered.
        Err(e) => return HttpReply::message(Outcome::Unavailable, e.to_string()),
    };
    HttpReply {
        status,
        body: value,
        replayed: false,
        location: None,
        retry_after: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use directcall_cloud::{BrokerOptions, Options};
    use serde_json::json;

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
        assert_eq!(inv.get_target().as_str(), "Device001");
        assert_eq!(inv.get_method().as_str(), "reqid-ABCD");
        assert_eq!(inv.get_request(), &json!("my_request_1"));
        assert_eq!(inv.get_timeout(), Duration::from_secs(3));
        let inv = query(&s, "request=&method=m&target=t&extra=1").unwrap();
        assert_eq!(inv.get_timeout(), DEFAULT_HTTP_TIMEOUT);
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
        assert_eq!(inv.get_request(), &json!({"a": [1]}));
        assert_eq!(inv.get_timeout(), Duration::from_millis(2500));
        let inv = s
            .post_invocation("car", "unlock", None, br#"{"timeout_ms":814.0}"#, now)
            .unwrap();
        assert_eq!(inv.get_timeout(), Duration::from_millis(814));
        let inv = s
            .post_invocation("car", "unlock", None, b"{}", now)
            .unwrap();
        assert_eq!(inv.get_request(), &Value::Null);
        for (ct, body, field) in [
            (None, &b"not json"[..], "body"),
            (None, b"[]", "body"),
            (None, br#"{"timeout":3}"#, "body"),
            (None, br#"{"timeout_ms":0}"#, "timeout_ms"),
            (None, br#"{"timeout_ms":60001}"#, "timeout_ms"),
            (None, br#"{"timeout_ms":1.5}"#, "timeout_ms"),
            (None, br#"{"timeout_ms":1e300}"#, "timeout_ms"),
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

    #[test]
    fn every_outcome_round_trips_through_its_body() {
        for o in Outcome::ALL {
            let r = HttpReply::message(o, "x");
            assert_eq!(r.outcome(), Some(o));
            assert_eq!(r.status, o.http_status());
        }
    }

    #[tokio::test]
    async fn an_unconnected_service_answers_503_and_counts_it() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let s = metrics::with_local_recorder(&recorder, service);
        let inv = query(&s, "target=t&method=m&request=r&timeout=1").unwrap();
        let r = s.invoke(inv).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body["result"], "unavailable");
        let text = handle.render();
        assert!(
            text.contains("directcall_calls_total{outcome=\"unavailable\"} 1"),
            "{text}"
        );
    }
}
