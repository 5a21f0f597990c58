//! The HTTP bodies of PROTOCOL.md's mapping: what a call ended as
//! ([`Outcome`]), the answer ([`HttpReply`]) and the typed JSON bodies the
//! OpenAPI document is derived from (utoipa), so it cannot drift from what
//! is sent.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

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
    /// Strict presence: the target has no presence record, no device of
    /// that name was ever seen (404).
    UnknownDevice,
    /// The device's reply broke the protocol's rules (a `status` that is
    /// not an integer from 0 to 65535): the call ended at once (502).
    BadReply,
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
    /// An answer in a form this front end cannot give: a streamed one
    /// behind a front end that buffers answers (406).
    NotAcceptable,
}

impl Outcome {
    /// Every outcome, in a fixed order.
    pub const ALL: [Outcome; 16] = [
        Outcome::Ok,
        Outcome::Timeout,
        Outcome::Offline,
        Outcome::UnknownDevice,
        Outcome::BadReply,
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
        Outcome::NotAcceptable,
    ];

    /// The `result` string of the HTTP body.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Timeout => "timeout",
            Outcome::Offline => "offline",
            Outcome::UnknownDevice => "unknown_device",
            Outcome::BadReply => "bad_reply",
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
            Outcome::NotAcceptable => "not_acceptable",
        }
    }

    /// Its HTTP status.
    pub fn http_status(self) -> u16 {
        match self {
            Outcome::Ok => 200,
            Outcome::Timeout => 504,
            Outcome::Offline | Outcome::UnknownDevice | Outcome::NotFound => 404,
            Outcome::BadReply => 502,
            Outcome::Invalid => 400,
            Outcome::TooLarge => 413,
            Outcome::Unavailable => 503,
            Outcome::Unauthorized => 401,
            Outcome::MethodNotAllowed => 405,
            Outcome::Conflict => 409,
            Outcome::Accepted => 202,
            Outcome::Forbidden => 403,
            Outcome::Limited => 429,
            Outcome::NotAcceptable => 406,
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Outcome::Ok => 0,
            Outcome::Timeout => 1,
            Outcome::Offline => 2,
            Outcome::UnknownDevice => 3,
            Outcome::BadReply => 4,
            Outcome::Invalid => 5,
            Outcome::TooLarge => 6,
            Outcome::Unavailable => 7,
            Outcome::Unauthorized => 8,
            Outcome::NotFound => 9,
            Outcome::MethodNotAllowed => 10,
            Outcome::Conflict => 11,
            Outcome::Accepted => 12,
            Outcome::Forbidden => 13,
            Outcome::Limited => 14,
            Outcome::NotAcceptable => 15,
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
    /// When the call asked for a delivery receipt (`receipt`, or the
    /// gateway's `--delivery-receipts`): `delivered at +N ms, no answer by
    /// the deadline`, or `no sign of delivery`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
}

/// 502: the device answered with a reply that breaks the protocol's rules
/// (PROTOCOL.md, "Reply"), so there is no answer to give; the call ended
/// at once. The device may have run the method.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct BadReplyBody {
    /// Always `bad_reply`.
    #[schema(value_type = String, pattern = "^bad_reply$")]
    pub result: Outcome,
    /// Whole milliseconds since the request arrived.
    #[schema(pattern = "^[0-9]+$")]
    pub elapsed: String,
    /// The call's id.
    #[schema(pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    pub id: String,
    /// The reply's field at fault: `status`.
    pub field: String,
    /// What was wrong with it, in words.
    pub response: String,
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
/// [`CallRecord`](crate::CallRecord)'s JSON, which is what is sent (the
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
    /// 5: the broker refused the request, or, with a `reason`, the gateway
    /// shut down first), `bad_reply` (the device answered
    /// with a reply that breaks the rules: `response` says what was wrong).
    #[schema(
        pattern = "^(sent|delivered|answered|timed_out|answered_late|offline|unavailable|bad_reply)$"
    )]
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
    /// Who made the call, when the gateway knows its callers (a
    /// credential's name, or the caller a host application's
    /// authentication named): only that caller may read the record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// Why the call is `unavailable` when no broker said so: the gateway
    /// that made it shut down before it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// 404: the target is known to be offline (`offline`), or, with strict
/// presence, was never seen (`unknown_device`); nothing reached a device.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct OfflineBody {
    /// `offline`: a device known to be away (its presence record, or on
    /// MQTT 5 the broker found none subscribed); `unknown_device`: strict
    /// presence, and the target has no presence record at all.
    #[schema(value_type = String, pattern = "^(offline|unknown_device)$")]
    pub result: Outcome,
    /// Whole milliseconds since the request arrived.
    #[schema(pattern = "^[0-9]+$")]
    pub elapsed: String,
    /// Why, when not from a presence record saying offline (MQTT 5: no
    /// device is subscribed to the target's requests; strict presence: no
    /// record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// The call's id, when a request was published (and refused by the
    /// broker for want of a subscriber).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// 400, 404 (no route), 405, 406, 413, 503: what went wrong, in words.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[non_exhaustive]
pub struct MessageBody {
    /// `invalid_parameters`, `payload_too_large`, `unavailable`,
    /// `not_found`, `method_not_allowed`, `conflict`, `forbidden`,
    /// `rate_limited` or `not_acceptable`.
    #[schema(value_type = String, pattern = "^(invalid_parameters|payload_too_large|unavailable|not_found|method_not_allowed|conflict|forbidden|rate_limited|not_acceptable)$")]
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

/// The AWS sample's query parameters.
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
    /// `true` asks the device for a delivery receipt for this call
    /// (PROTOCOL.md, "Delivery receipts"), `false` asks for none; absent:
    /// as the gateway does (`--delivery-receipts`).
    receipt: Option<bool>,
}

/// The JSON form's body: `{"request": <any JSON>, "timeout_ms": <int>,
/// "receipt": <bool>}`.
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
    /// `true` asks the device for a delivery receipt for this call
    /// (PROTOCOL.md, "Delivery receipts"): its record moves to `delivered`
    /// once the device has it, and a 504 says whether it was delivered.
    /// `false` asks for none. Default: as the gateway does
    /// (`--delivery-receipts`). `null` is refused as a wrong type, so the
    /// schema does not allow it.
    #[serde(default)]
    #[schema(value_type = bool, required = false)]
    pub receipt: Option<bool>,
}

pub(crate) fn body(value: &impl Serialize) -> Value {
    // Serialising these structs of strings, numbers and JSON values cannot fail.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

impl HttpReply {
    /// `status` with `body`, and no extra header.
    pub fn new(status: u16, body: Value) -> Self {
        HttpReply {
            status,
            body,
            replayed: false,
            location: None,
            retry_after: None,
        }
    }

    /// 200 with `body`.
    pub fn ok(body: Value) -> Self {
        Self::new(200, body)
    }

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

    /// The same answer for an API mounted under `base` (`/devices`): its
    /// `Location` and the `call` (or `group`) link of its body point there.
    pub(crate) fn under(mut self, base: &str) -> Self {
        if base.is_empty() {
            return self;
        }
        if let Some(location) = &mut self.location {
            location.insert_str(0, base);
        }
        for link in ["call", "group"] {
            if let Some(Value::String(url)) = self.body.get_mut(link) {
                url.insert_str(0, base);
            }
        }
        self
    }

    /// The outcome its body names.
    pub fn outcome(&self) -> Option<Outcome> {
        let result = self.body.get("result")?.as_str()?;
        Outcome::ALL.into_iter().find(|o| o.as_str() == result)
    }
}
