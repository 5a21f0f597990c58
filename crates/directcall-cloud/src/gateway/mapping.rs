//! The HTTP mapping of PROTOCOL.md, independent of any HTTP server:
//! request parameters in, an [`HttpReply`] (status and JSON body) out.

use std::time::{Duration, Instant};

use directcall_core::deadline::whole_millis;
use directcall_core::{MessageId, Method, Target};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{Counter, Gauge, Histogram};
use serde_json::Value;

use super::body::{
    body, AcceptedBody, BadReplyBody, HttpReply, OfflineBody, OkBody, Outcome, PostBody,
    TimeoutBody,
};
use crate::{Invocation, Requester};

/// Largest HTTP body accepted, in bytes (128 KiB, AWS IoT Core's payload limit).
pub const MAX_HTTP_REQUEST_BYTES: usize = 128 * 1024;
/// Largest query string accepted, in bytes (48 KiB): URIs longer than 64 KiB
/// cannot even be represented by the HTTP stack, so the limit sits below that.
pub const MAX_QUERY_BYTES: usize = 48 * 1024;
/// Default `timeout` of the AWS sample's GET form: 10 s.
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
    /// ```
    /// # use directcall_cloud::gateway::Limits;
    /// let limits = Limits::new(3, 29)?; // the Lambda's: API Gateway ends at 29 s
    /// assert!(Limits::new(30, 29).is_err());
    /// # Ok::<(), directcall_cloud::gateway::InvalidLimits>(())
    /// ```
    ///
    /// # Errors
    /// [`InvalidLimits`] when either is zero or the default exceeds the
    /// maximum.
    pub fn new(default_timeout: u64, max_timeout: u64) -> Result<Self, InvalidLimits> {
        if default_timeout == 0 || max_timeout == 0 || default_timeout > max_timeout {
            return Err(InvalidLimits {
                default_timeout,
                max_timeout,
            });
        }
        Ok(Limits {
            default_timeout: Duration::from_secs(default_timeout),
            max_timeout: Duration::from_secs(max_timeout),
        })
    }
}

/// Timeout limits that cannot be used: the default must be from 1 s to
/// the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the default timeout ({default_timeout} s) must be from 1 to the maximum timeout ({max_timeout} s)")]
#[non_exhaustive]
pub struct InvalidLimits {
    /// The default asked for, in seconds.
    pub default_timeout: u64,
    /// The maximum asked for, in seconds.
    pub max_timeout: u64,
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
    calls: [Counter; Outcome::ALL.len()],
    /// By outcome: a timeout's 10 s never mixes with answers' milliseconds.
    duration: [Histogram; Outcome::ALL.len()],
    in_flight: Gauge,
}

impl Metrics {
    fn register() -> Self {
        describe_counter!(CALLS, "HTTP calls by outcome.");
        describe_histogram!(
            CALL_DURATION,
            metrics::Unit::Seconds,
            "Time from request arrival to answer, for calls that reached the broker, by outcome."
        );
        describe_gauge!(CALLS_IN_FLIGHT, "Calls waiting for a device now.");
        Metrics {
            calls: Outcome::ALL.map(|o| counter!(CALLS, "outcome" => o.as_str())),
            duration: Outcome::ALL.map(|o| histogram!(CALL_DURATION, "outcome" => o.as_str())),
            in_flight: gauge!(CALLS_IN_FLIGHT),
        }
    }
}

/// Validates HTTP-shaped calls, runs them through a [`Requester`], and renders
/// the outcome as PROTOCOL.md's HTTP table. Cheap to clone.
#[derive(Clone)]
pub struct InvokeService {
    requester: Requester,
    limits: Limits,
    metrics: std::sync::Arc<Metrics>,
    /// Told every outcome (the web console's per-second tally).
    observer: Option<Observer>,
}

/// Told each outcome, and its latency for a call that reached the broker.
pub(crate) type Observer = std::sync::Arc<dyn Fn(Outcome, Option<Duration>) + Send + Sync>;

impl std::fmt::Debug for InvokeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvokeService")
            .field("requester", &self.requester)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl InvokeService {
    /// A service calling through `requester` within `limits`. Its metrics
    /// go to the `metrics` recorder installed at this point.
    pub fn new(requester: Requester, limits: Limits) -> Self {
        InvokeService {
            requester,
            limits,
            metrics: std::sync::Arc::new(Metrics::register()),
            observer: None,
        }
    }

    /// The same service, also telling `observer` every outcome.
    #[cfg_attr(not(feature = "console"), allow(dead_code))]
    pub(crate) fn observed(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
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

    /// The AWS sample's GET form: `request`, `method`, `target`, `timeout`
    /// (whole seconds) and `receipt` (`true` or `false`: a delivery receipt
    /// for this call) as decoded query pairs. Unknown parameters are
    /// ignored; a repeated one is refused.
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
        // Kept in an array, not a map: one string per given parameter, and
        // each moved on (no copy) into the invocation.
        const NAMES: [&str; 5] = ["request", "method", "target", "timeout", "receipt"];
        let mut params: [Option<String>; 5] = Default::default();
        for (key, value) in pairs {
            let Some(i) = NAMES.iter().position(|n| *n == key.as_ref()) else {
                continue;
            };
            if params[i].is_some() {
                return Err(HttpReply::invalid(NAMES[i], "given more than once"));
            }
            params[i] = Some(value.into());
        }
        let [request, method, target, timeout, receipt] = params;
        let target = required(target, "target")?;
        let target = Target::new(target).map_err(|e| HttpReply::invalid("target", e.reason()))?;
        let method = required(method, "method")?;
        let method = Method::new(method).map_err(|e| HttpReply::invalid("method", e.reason()))?;
        let request = required(request, "request")?;
        let timeout = match timeout {
            None => self.limits.default_timeout,
            Some(t) => self.timeout_secs(&t)?,
        };
        let invocation = Invocation::new(target, method, Value::String(request))
            .timeout(timeout)
            .started_at(start);
        Ok(match receipt.as_deref() {
            None => invocation,
            Some("true") => invocation.receipt(true),
            Some("false") => invocation.receipt(false),
            Some(other) => {
                return Err(HttpReply::invalid(
                    "receipt",
                    format!("must be true or false, got {other:?}"),
                ))
            }
        })
    }

    /// The JSON form: `POST /v1/targets/{target}/methods/{method}` with
    /// `{"request": <any JSON>, "timeout_ms": <int>, "receipt": <bool>}`
    /// (`receipt`: a delivery receipt for this call). `content_type`, when
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
        const SHAPE: &str =
            "expected {\"request\": <any JSON>, \"timeout_ms\": <integer>, \"receipt\": <boolean>}";
        let value = Value::Object(json_object(content_type, body, SHAPE)?);
        // Present but null is a wrong type, not an absent field.
        let timeout_given = value.get("timeout_ms").cloned();
        if let Some(receipt) = value.get("receipt").filter(|r| !r.is_boolean()) {
            return Err(HttpReply::invalid(
                "receipt",
                format!("must be true or false, got {receipt}"),
            ));
        }
        let parsed: PostBody = serde_json::from_value(value)
            .map_err(|e| HttpReply::invalid("body", format!("{e}; {SHAPE}")))?;
        let timeout = self.timeout_field(timeout_given.or(parsed.timeout_ms).as_ref())?;
        let invocation = Invocation::new(target, method, parsed.request)
            .timeout(timeout)
            .started_at(start);
        Ok(match parsed.receipt {
            Some(ask) => invocation.receipt(ask),
            None => invocation,
        })
    }

    /// A JSON body's `timeout_ms` (absent: the default timeout).
    ///
    /// # Errors
    /// A 400 [`HttpReply`] naming `timeout_ms`.
    pub(crate) fn timeout_field(&self, value: Option<&Value>) -> Result<Duration, HttpReply> {
        match value {
            None => Ok(self.limits.default_timeout),
            Some(v) => self.timeout_ms(v),
        }
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
        let receipt = invocation
            .get_receipt()
            .unwrap_or_else(|| self.requester.asks_receipts());
        self.metrics.in_flight.increment(1.0);
        let (result, replayed) = self.requester.invoke_replayed(invocation).await;
        self.metrics.in_flight.decrement(1.0);
        let elapsed = start.elapsed();
        let recorded = self.requester.record_options().is_some();
        let mut reply = render(result, elapsed, recorded);
        reply.replayed = replayed;
        if reply.status == 504 && receipt {
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
                // crate::CallRecord's own JSON: CallRecordBody is its schema.
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
            self.metrics.duration[outcome.index()].record(latency.as_secs_f64());
        }
        if let Some(observer) = &self.observer {
            observer(outcome, latency);
        }
    }
}

/// PROTOCOL.md's HTTP table.
fn render(
    result: Result<crate::Reply, crate::Error>,
    elapsed: Duration,
    recorded: bool,
) -> HttpReply {
    use crate::Error;
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
        Err(e @ Error::UnknownTarget { .. }) => (
            404,
            body(&OfflineBody {
                result: Outcome::UnknownDevice,
                elapsed: ms(elapsed),
                response: Some(e.to_string()),
                id: None,
            }),
        ),
        Err(Error::BadReply { id, field, reason }) => (
            502,
            body(&BadReplyBody {
                result: Outcome::BadReply,
                elapsed: ms(elapsed),
                id: id.to_string(),
                field: field.to_string(),
                response: Error::BadReply { id, field, reason }.to_string(),
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
        Err(Error::Closed) => {
            return HttpReply::message(
                Outcome::Unavailable,
                "the gateway is shutting down: a call out when it stopped may or may not have run on the device",
            )
        }
        // Unavailable, Refused (the broker refused the publish),
        // BrokerHung (its text says it may have run), and what a later
        // version may add: not the caller's doing.
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

/// A JSON body that must be an object, under a `content_type` that, when
/// given, must be `application/json`; `shape` says what was expected.
///
/// # Errors
/// A 400 [`HttpReply`] naming `content-type` or `body`.
pub(crate) fn json_object(
    content_type: Option<&str>,
    body: &[u8],
    shape: &str,
) -> Result<serde_json::Map<String, Value>, HttpReply> {
    if let Some(ct) = content_type {
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(HttpReply::invalid(
                "content-type",
                format!("must be application/json, got {ct:?}"),
            ));
        }
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(HttpReply::invalid(
            "body",
            format!("not a JSON object; {shape}"),
        )),
        Err(e) => Err(HttpReply::invalid("body", format!("{e}; {shape}"))),
    }
}

/// The answer to a call refused by the requester before anything was
/// published (a bad name, a key used for another call, no broker).
pub(crate) fn refusal(e: crate::Error) -> HttpReply {
    render(Err(e), Duration::ZERO, false)
}

fn required(value: Option<String>, name: &'static str) -> Result<String, HttpReply> {
    value.ok_or_else(|| HttpReply::invalid(name, "missing"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BrokerOptions, Options};
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
    async fn a_call_may_ask_for_its_own_receipt() {
        let s = service();
        let now = Instant::now();
        let q = |extra: &str| query(&s, &format!("target=t&method=m&request=r{extra}"));
        assert_eq!(q("").unwrap().get_receipt(), None);
        assert_eq!(q("&receipt=true").unwrap().get_receipt(), Some(true));
        assert_eq!(q("&receipt=false").unwrap().get_receipt(), Some(false));
        for bad in ["&receipt=1", "&receipt=", "&receipt=true&receipt=true"] {
            let m = message(q(bad).unwrap_err());
            assert!(m.starts_with("invalid receipt: "), "{bad}: {m}");
        }
        let post = |body: &str| s.post_invocation("car", "m", None, body.as_bytes(), now);
        assert_eq!(post("{}").unwrap().get_receipt(), None);
        assert_eq!(
            post(r#"{"receipt":true}"#).unwrap().get_receipt(),
            Some(true)
        );
        assert_eq!(
            post(r#"{"receipt":false}"#).unwrap().get_receipt(),
            Some(false)
        );
        for bad in [
            r#"{"receipt":"true"}"#,
            r#"{"receipt":null}"#,
            r#"{"receipt":1}"#,
        ] {
            let m = message(post(bad).unwrap_err());
            assert!(m.starts_with("invalid receipt: "), "{bad}: {m}");
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
    fn a_bad_reply_is_502_naming_the_field_and_an_unknown_device_is_not_offline() {
        let id = MessageId::new();
        let r = render(
            Err(crate::Error::BadReply {
                id,
                field: directcall_core::Field::Status,
                reason:
                    "must be an integer from 0 to 65535 (absent means 200), got the string \"201\""
                        .into(),
            }),
            Duration::from_millis(12),
            true,
        );
        assert_eq!(r.status, 502);
        assert_eq!(
            r.body,
            json!({
                "result": "bad_reply",
                "elapsed": "12",
                "id": id.to_string(),
                "field": "status",
                "response": "the device's reply is malformed: invalid status: must be an integer from 0 to 65535 (absent means 200), got the string \"201\"",
            })
        );
        assert_eq!(r.outcome(), Some(Outcome::BadReply));
        let target = Target::new("car").unwrap();
        let unknown = render(
            Err(crate::Error::UnknownTarget {
                target: target.clone(),
            }),
            Duration::ZERO,
            true,
        );
        let offline = render(Err(crate::Error::Offline { target }), Duration::ZERO, true);
        assert_eq!((unknown.status, offline.status), (404, 404));
        assert_eq!(unknown.body["result"], "unknown_device");
        assert_eq!(offline.body["result"], "offline");
        assert_eq!(
            unknown.body["response"],
            "target car is unknown: it has no presence record (strict presence)"
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
