//! Group calls over HTTP (PROTOCOL.md, "HTTP mapping"): `POST
//! /v1/methods/{method}` calls one method on a list of devices, on the
//! devices presence knows whose names match a glob, or on a named group,
//! and answers every device's result in one JSON document, as NDJSON lines
//! while they come, or 202 with a record (`GET /v1/groups/{id}`) that fills
//! in as they come.
//!
//! Access: a list or a glob is admitted target by target (a target outside
//! the caller's scope, or at its in-flight bound, is reported `refused`,
//! never published to), a named group by its name (`groups` in the
//! credentials file). A group call takes one token of its caller's rate.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use directcall_core::{Group, MessageId, Method, Target};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::audit::GroupAuditLine;
use super::body::{HttpReply, MessageBody, Outcome, UnauthorizedBody};
use super::limits::TargetSlot;
use super::mapping::{json_object, refusal, InvokeService, MAX_HTTP_REQUEST_BYTES};
use super::routes::{idempotency_key, prefers_async, traceparent, wait_param};
use super::state::{respond, Authed, CallBudget, GatewayState, Lifecycle};
use crate::{DeviceResult, GroupCall, GroupInvocation};

/// The most devices one group call's list may name.
pub const MAX_GROUP_TARGETS: usize = 100_000;

/// The largest body of a group call, in bytes (4 MiB: 100,000 names of up
/// to 38 characters, or fewer longer ones; the `request` in it is held to
/// [`MAX_HTTP_REQUEST_BYTES`] as a single call's is).
pub const MAX_GROUP_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The most bytes one device's result takes in an answer that a front end
/// buffers ([`Gateway::buffered`](super::Gateway::buffered)): a longer
/// result keeps its target, outcome, status and latency, and its
/// `response` is left out, saying so in `reason`.
pub const BUFFERED_RESULT_BYTES: usize = 1024;

const NDJSON: &str = "application/x-ndjson";

/// How many results a buffered answer of `max_bytes` holds: each at most
/// [`BUFFERED_RESULT_BYTES`], and room for one more for the id and the
/// summary.
pub(crate) fn buffered_results(max_bytes: usize) -> usize {
    (max_bytes / BUFFERED_RESULT_BYTES)
        .saturating_sub(1)
        .clamp(1, MAX_GROUP_TARGETS)
}

/// Which devices a group call names, for its audit line.
#[derive(Debug, Clone)]
pub(crate) enum SetKind {
    Targets(usize),
    Match(String),
    Group(Group),
}

impl SetKind {
    fn as_str(&self) -> &'static str {
        match self {
            SetKind::Targets(_) => "targets",
            SetKind::Match(_) => "match",
            SetKind::Group(_) => "group",
        }
    }

    fn describe(&self) -> String {
        match self {
            SetKind::Targets(n) => format!("{n} names"),
            SetKind::Match(p) => p.clone(),
            SetKind::Group(g) => g.to_string(),
        }
    }
}

/// A parsed group call.
pub(crate) struct GroupRequest {
    pub(crate) invocation: GroupInvocation,
    pub(crate) kind: SetKind,
}

const SHAPE: &str = "expected {\"targets\": [<name>, …] or \"match\": <glob> or \"group\": <name>, \"request\": <any JSON>, \"timeout_ms\": <integer>, \"online_only\": <boolean, with match>}";

impl InvokeService {
    /// The body of `POST /v1/methods/{method}`: exactly one of `targets`
    /// (at most `max_targets` names), `match` (with `online_only`) and
    /// `group`, with `request` and `timeout_ms` as a single call takes
    /// them.
    ///
    /// # Errors
    /// A 400 [`HttpReply`] naming the bad part (`targets[3]`, `match`,
    /// `group`, `method`, `timeout_ms`, ...); 413 for a list over
    /// `max_targets` or a `request` over 128 KiB.
    pub(crate) fn group_invocation(
        &self,
        method: &str,
        content_type: Option<&str>,
        body: &[u8],
        max_targets: usize,
    ) -> Result<GroupRequest, HttpReply> {
        let method = Method::new(method).map_err(|e| HttpReply::invalid("method", e.reason()))?;
        let map = json_object(content_type, body, SHAPE)?;
        if let Some(unknown) = map.keys().find(|k| {
            ![
                "targets",
                "match",
                "online_only",
                "group",
                "request",
                "timeout_ms",
            ]
            .contains(&k.as_str())
        }) {
            return Err(HttpReply::invalid(
                "body",
                format!("unknown field `{unknown}`; {SHAPE}"),
            ));
        }
        let given: Vec<&str> = ["targets", "match", "group"]
            .into_iter()
            .filter(|k| map.contains_key(*k))
            .collect();
        if given.len() != 1 {
            return Err(HttpReply::invalid(
                "body",
                format!(
                    "give exactly one of targets, match, group (got {})",
                    if given.is_empty() {
                        "none".to_owned()
                    } else {
                        given.join(", ")
                    }
                ),
            ));
        }
        let online_only = match map.get("online_only") {
            None => None,
            Some(Value::Bool(b)) if given[0] == "match" => Some(*b),
            Some(Value::Bool(_)) => {
                return Err(HttpReply::invalid(
                    "online_only",
                    "only with match: a list or a group names its devices",
                ))
            }
            Some(other) => {
                return Err(HttpReply::invalid(
                    "online_only",
                    format!("must be true or false, got {other}"),
                ))
            }
        };
        let timeout = self.timeout_field(map.get("timeout_ms"))?;
        let request = map.get("request").cloned().unwrap_or(Value::Null);
        let size = serde_json::to_vec(&request).map_or(0, |v| v.len());
        if size > MAX_HTTP_REQUEST_BYTES {
            return Err(HttpReply::too_large(
                "request",
                Some(size),
                MAX_HTTP_REQUEST_BYTES,
            ));
        }
        let (invocation, kind) = match given[0] {
            "targets" => {
                let Some(list) = map.get("targets").and_then(Value::as_array) else {
                    return Err(HttpReply::invalid(
                        "targets",
                        "must be an array of device names",
                    ));
                };
                if list.is_empty() {
                    return Err(HttpReply::invalid(
                        "targets",
                        "must name at least one device",
                    ));
                }
                if list.len() > max_targets {
                    return Err(HttpReply::message(
                        Outcome::TooLarge,
                        format!(
                            "targets names {} devices; a group call takes at most {max_targets}",
                            list.len()
                        ),
                    ));
                }
                let mut names = Vec::with_capacity(list.len());
                for (i, name) in list.iter().enumerate() {
                    let field = format!("targets[{i}]");
                    let Some(name) = name.as_str() else {
                        return Err(HttpReply::invalid(
                            field,
                            format!("must be a device name (a string), got {name}"),
                        ));
                    };
                    Target::new(name).map_err(|e| HttpReply::invalid(&field, e.reason()))?;
                    names.push(name);
                }
                let invocation =
                    GroupInvocation::targets(&names, method.as_str(), request).map_err(refusal)?;
                // Duplicates are called once.
                let n = match invocation.get_targets() {
                    crate::Targets::List(list) => list.len(),
                    _ => names.len(),
                };
                (invocation, SetKind::Targets(n))
            }
            "match" => {
                let Some(pattern) = map.get("match").and_then(Value::as_str) else {
                    return Err(HttpReply::invalid("match", "must be a glob (a string)"));
                };
                crate::group::check_glob(pattern).map_err(|e| match e {
                    crate::Error::Invalid { reason, .. } => HttpReply::invalid("match", reason),
                    other => refusal(other),
                })?;
                if !self.requester().tracks_presence() {
                    return Err(HttpReply::invalid(
                        "match",
                        "a glob is matched against presence records, and this gateway follows none (--presence off)",
                    ));
                }
                let invocation = GroupInvocation::matching(pattern, method.as_str(), request)
                    .map_err(refusal)?
                    .online_only(online_only.unwrap_or(false));
                (invocation, SetKind::Match(pattern.to_owned()))
            }
            _ => {
                let Some(name) = map.get("group").and_then(Value::as_str) else {
                    return Err(HttpReply::invalid(
                        "group",
                        "must be a group name (a string)",
                    ));
                };
                let group =
                    Group::new(name).map_err(|e| HttpReply::invalid("group", e.reason()))?;
                let invocation =
                    GroupInvocation::group(name, method.as_str(), request).map_err(refusal)?;
                (invocation, SetKind::Group(group))
            }
        };
        Ok(GroupRequest {
            invocation: invocation.timeout(timeout),
            kind,
        })
    }
}

/// Whether the request asks for NDJSON (`Accept: application/x-ndjson`,
/// with a quality above zero).
fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';');
            let essence = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    == Some(0.0)
            });
            essence.eq_ignore_ascii_case(NDJSON) && !refused
        })
}

// The bodies, for the OpenAPI document: what is sent is the library's own
// JSON (DeviceResult, GroupSummary), which a test keeps alike.

/// The body of `POST /v1/methods/{method}`: exactly one of `targets`,
/// `match` and `group`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(crate) enum GroupPostBody {
    /// A list of devices.
    Targets(TargetsBody),
    /// The devices presence knows whose names match a glob.
    Match(MatchBody),
    /// The members of a named group.
    Group(NamedGroupBody),
}

/// A call to each device of a list.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct TargetsBody {
    /// The devices, each one topic level (duplicates are called once).
    #[schema(min_items = 1, max_items = 100000)]
    targets: Vec<String>,
    /// The request value, any JSON (default `null`).
    request: Option<Value>,
    /// Milliseconds the whole call may take, every device included, 100
    /// to the gateway's maximum (default as a single call's). `null` is
    /// refused as a wrong type.
    #[schema(value_type = u64, required = false, minimum = 100, maximum = 60000)]
    timeout_ms: Option<u64>,
}

/// A call to every device presence knows whose name matches a glob.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct MatchBody {
    /// A glob over device names: `*` any run of characters, `?` one
    /// (case-sensitive).
    #[serde(rename = "match")]
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.:*?-]+$")]
    pattern: String,
    /// Only the devices presence says are online (default: all it knows,
    /// offline ones reported `offline`). `null` is refused as a wrong
    /// type.
    #[schema(value_type = bool, required = false)]
    online_only: Option<bool>,
    /// The request value, any JSON (default `null`).
    request: Option<Value>,
    /// Milliseconds the whole call may take, 100 to the gateway's maximum.
    #[schema(value_type = u64, required = false, minimum = 100, maximum = 60000)]
    timeout_ms: Option<u64>,
}

/// A call to the members of a named group: one publish on the group's
/// topic.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct NamedGroupBody {
    /// The group (one topic level).
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_.:-]+$")]
    group: String,
    /// The request value, any JSON (default `null`).
    request: Option<Value>,
    /// Milliseconds the whole call may take, 100 to the gateway's maximum.
    #[schema(value_type = u64, required = false, minimum = 100, maximum = 60000)]
    timeout_ms: Option<u64>,
}

/// One device's result.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct DeviceResultBody {
    /// The device.
    target: String,
    /// `ok` (answered 2xx), `device_error` (answered another status, or a
    /// reply that broke the rules), `timeout`, `offline` or `refused` (not
    /// called: outside the caller's scope, at the target's in-flight
    /// bound, or refused by the broker).
    #[schema(pattern = "^(ok|device_error|timeout|offline|refused)$")]
    outcome: String,
    /// The device's status, when it answered.
    status: Option<u16>,
    /// The device's answer, any JSON, when it answered.
    response: Option<Value>,
    /// From the request's publish to the answer, in milliseconds (three
    /// decimals), when it answered.
    latency_ms: Option<f64>,
    /// Why, for an outcome that is not an answer (or an answer left out of
    /// a buffered one).
    reason: Option<String>,
    /// `true`: replayed from an earlier call with the same idempotency key.
    replayed: Option<bool>,
}

/// The counts of a group call's results by outcome.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct GroupSummaryBody {
    ok: usize,
    device_error: usize,
    timeout: usize,
    offline: usize,
    refused: usize,
    /// Results in all.
    total: usize,
    /// How many devices the call expected, when it knew (a list, a glob, a
    /// group whose members presence records name); `null` for a group of
    /// unknown membership, whose `total` counts the answers that came.
    expected: Option<usize>,
    /// From the start of the call to its end (or to now, while it runs).
    elapsed_ms: u64,
}

/// 200: every device's result, and the counts.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct GroupBody {
    /// The call's id: every device's request carried it.
    #[schema(pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    id: String,
    /// One per device, in the order they came.
    results: Vec<DeviceResultBody>,
    summary: GroupSummaryBody,
    /// A buffered answer (the Lambda): how many results did not fit and
    /// were left out (they are in `summary`).
    #[serde(skip_serializing_if = "Option::is_none")]
    omitted: Option<usize>,
}

/// 202: the call goes on; its record fills in as results come.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct GroupAcceptedBody {
    /// Always `accepted`.
    #[schema(pattern = "^accepted$")]
    result: String,
    /// The call's id.
    #[schema(pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    id: String,
    /// Its record, also in `Location`: poll it, or long-poll it with
    /// `?wait=SECONDS`.
    #[schema(pattern = "^/v1/groups/[0-9a-f-]{36}$")]
    group: String,
}

/// 200 from `GET /v1/groups/{id}`: a group call answered 202, so far.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct GroupRecordBody {
    /// The call's id.
    #[schema(pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    id: String,
    /// The method called.
    method: String,
    /// `running` or `done`.
    #[schema(pattern = "^(running|done)$")]
    state: String,
    /// The results so far, in the order they came.
    results: Vec<DeviceResultBody>,
    summary: GroupSummaryBody,
    /// Who made the call, when the gateway knows its callers: only that
    /// caller may read the record.
    #[serde(skip_serializing_if = "Option::is_none")]
    caller: Option<String>,
}

/// The target slots a group call holds: one per admitted target, given
/// back when its result comes.
type Slots = Arc<Mutex<HashMap<Target, TargetSlot>>>;

/// A group call being answered: its results, the target slots it holds,
/// and its audit line, written when it is dropped (at its end, or when
/// the client went away).
struct Running {
    call: GroupCall,
    slots: Slots,
    audit: GroupAuditLine,
    ended: bool,
}

impl Running {
    async fn next(&mut self) -> Option<DeviceResult> {
        let result = self.call.next().await;
        match &result {
            Some(r) => {
                self.slots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&r.target);
            }
            None => self.ended = true,
        }
        result
    }

    fn end_line(&self) -> Bytes {
        let mut line = json!({"id": self.call.id().to_string(), "summary": self.call.summary()})
            .to_string()
            .into_bytes();
        line.push(b'\n');
        Bytes::from(line)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.audit.write(self.call.summary(), self.ended);
    }
}

/// A result as a buffered answer holds it: at most
/// [`BUFFERED_RESULT_BYTES`] (with its separator), its `response` left out
/// when longer.
fn capped(result: DeviceResult) -> Value {
    let value = serde_json::to_value(&result).unwrap_or(Value::Null);
    let size = value.to_string().len();
    if size < BUFFERED_RESULT_BYTES {
        return value;
    }
    let mut value = value;
    if let Some(map) = value.as_object_mut() {
        map.remove("response");
        map.insert(
            "reason".into(),
            json!(format!(
                "response left out: the result is {size} bytes, over the {BUFFERED_RESULT_BYTES} a buffered answer holds per device"
            )),
        );
    }
    value
}

/// Call a method on many devices at once: a list, a glob over presence, or
/// a named group.
#[utoipa::path(
    post,
    path = "/v1/methods/{method}",
    params(
        ("method" = String, Path, description = "The method (one topic level).", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_.:-]+$"),
        ("Accept" = Option<String>, Header, description = "`application/x-ndjson`: one line per device's result as it comes, then `{\"id\",\"summary\"}`; otherwise one JSON document at the end."),
        ("Prefer" = Option<String>, Header, description = "`respond-async` (RFC 7240): answer 202 at once with `Location: /v1/groups/{id}`; ignored when the gateway keeps no call records."),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the group call idempotent for the record retention: a retry with the same key and the same call re-runs no device that answered (its answer is replayed, `replayed: true`) and calls the rest again under the same id; with another call, or while the first still runs, 409. Scoped to the caller's token.", min_length = 1, max_length = 255, pattern = "^[!-~]+$"),
    ),
    request_body(content = GroupPostBody, content_type = "application/json"),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Every device's result (a device's failure is its `outcome`, never the call's status).", content(
            (GroupBody = "application/json"),
            (String = "application/x-ndjson"),
        )),
        (status = 202, description = "With `Prefer: respond-async` (and call records on): published; `Location` names the group call's record.", body = GroupAcceptedBody,
            headers(("Location" = String, description = "The record, /v1/groups/{id}."))),
        (status = 400, description = "A parameter or the body is invalid (the message names it: `targets[3]`, `match`, `group`, `method`, `timeout_ms`, ...); nothing was published.", body = MessageBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
        (status = 403, description = "The credential may not call this method at all, or this group; nothing was published. A target of a list or a glob outside its scope is reported `refused` instead.", body = MessageBody),
        (status = 406, description = "NDJSON asked of a front end that buffers answers (the Lambda); nothing was published.", body = MessageBody),
        (status = 409, description = "The Idempotency-Key was used for a different group call, or its first call still runs; nothing was published.", body = MessageBody),
        (status = 413, description = "The body is over 4 MiB, the request over 128 KiB, or the list names more devices than a group call takes.", body = MessageBody),
        (status = 429, description = "Over the credential's rate (a group call counts as one request); nothing was published. `Retry-After` says when to try again.", body = MessageBody,
            headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 503, description = "No broker connection; nothing was published.", body = MessageBody),
    )
)]
pub(crate) async fn invoke_group(
    State(gw): State<GatewayState>,
    who: Authed,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    budget: Option<Extension<CallBudget>>,
    body: Body,
) -> Response {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || HttpReply::too_large("body", None, MAX_GROUP_REQUEST_BYTES);
    if declared.is_some_and(|len| len > MAX_GROUP_REQUEST_BYTES) {
        return gw.refuse_from(&who, too_large());
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_GROUP_REQUEST_BYTES).await else {
        return gw.refuse_from(&who, too_large());
    };
    let Ok(Path(method)) = path else {
        return gw.refuse_from(
            &who,
            HttpReply::invalid("path", "the method must be a UTF-8 path segment"),
        );
    };
    let ndjson = wants_ndjson(&headers);
    if ndjson && gw.buffered.is_some() {
        return gw.refuse_from(
            &who,
            HttpReply::message(
                Outcome::NotAcceptable,
                "streaming (application/x-ndjson) is not available on the Lambda: API Gateway buffers the whole answer; ask for application/json",
            ),
        );
    }
    let content_type = match headers.get(header::CONTENT_TYPE).map(|v| v.to_str()) {
        None => None,
        Some(Ok(ct)) => Some(ct),
        Some(Err(_)) => {
            return gw.refuse_from(&who, HttpReply::invalid("content-type", "not ASCII"))
        }
    };
    let max_targets = gw.buffered.map_or(MAX_GROUP_TARGETS, buffered_results);
    let request = match gw
        .service
        .group_invocation(&method, content_type, &body, max_targets)
    {
        Ok(r) => r,
        Err(reply) => return gw.refuse_from(&who, reply),
    };
    let key = match idempotency_key(&headers) {
        Ok(key) => key,
        Err(reply) => return gw.refuse_from(&who, reply),
    };
    let asynchronous =
        prefers_async(&headers) && gw.group_records.is_some() && gw.buffered.is_none();
    let mode = if asynchronous {
        Mode::Async
    } else if ndjson {
        Mode::Ndjson
    } else {
        Mode::Json
    };
    let trace = traceparent(&headers).map(str::to_owned);
    gw.group_call(
        &who,
        request,
        key,
        trace,
        budget.map(|Extension(b)| b),
        mode,
    )
    .await
}

/// How a group call is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Json,
    Ndjson,
    Async,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Json => "json",
            Mode::Ndjson => "ndjson",
            Mode::Async => "async",
        }
    }
}

impl GatewayState {
    /// Admits a parsed group call (the method or group against the
    /// caller's scope, one token of its rate, each target of a list or a
    /// glob against its scope and in-flight bound), runs it, and answers
    /// in `mode`.
    async fn group_call(
        &self,
        who: &Authed,
        request: GroupRequest,
        key: Option<String>,
        trace: Option<String>,
        budget: Option<CallBudget>,
        mode: Mode,
    ) -> Response {
        let started = std::time::Instant::now();
        let GroupRequest {
            mut invocation,
            kind,
        } = request;
        let method = invocation.get_method().clone();
        let forbidden = |r: super::auth::Refusal| match r {
            super::auth::Refusal::Limited {
                message,
                retry_after,
            } => HttpReply::limited(message, retry_after),
            other => HttpReply::message(Outcome::Forbidden, other.to_string()),
        };
        if let Some(c) = &who.caller {
            let allowed = match &kind {
                SetKind::Group(g) => c.allows_group(g.as_str(), method.as_str()),
                _ => c.allows_method(method.as_str()),
            };
            if let Err(r) = allowed.and_then(|()| c.take()) {
                return self.refuse_from(who, forbidden(r));
            }
            invocation = invocation.caller(c.name());
        }
        let slots: Slots = Arc::default();
        // A group's members are whoever joined it: admitted by its name.
        if !matches!(kind, SetKind::Group(_))
            && (who.caller.is_some() || self.target_limit.is_some())
        {
            let caller = who.caller.clone();
            let limit = self.target_limit.clone();
            let held = Arc::clone(&slots);
            let m = method.clone();
            invocation = invocation.admit(move |t| {
                if let Some(c) = &caller {
                    c.allows(t.as_str(), m.as_str())
                        .map_err(|r| r.to_string())?;
                }
                if let Some(limit) = &limit {
                    let slot = limit.enter(t.as_str()).map_err(|r| r.to_string())?;
                    held.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(t.clone(), slot);
                }
                Ok(())
            });
        }
        // A glob reaches only what the caller's scope names, as its device
        // list shows only those.
        if let (SetKind::Match(_), Some(c)) = (&kind, &who.caller) {
            if c.is_scoped() {
                let c = c.clone();
                invocation = invocation.within(move |t| c.sees_target(t.as_str()));
            }
        }
        if let Some(key) = key {
            invocation = invocation.idempotency_key(key);
        }
        if let Some(t) = &trace {
            invocation = invocation.traceparent(t.clone());
        }
        if let Some(CallBudget(b)) = budget {
            let timeout = invocation
                .get_timeout()
                .min(b.max(Duration::from_millis(1)));
            invocation = invocation.timeout(timeout);
        }
        let requester = self.service.requester();
        if self.wait_for_broker && !requester.is_connected() {
            requester.wait_ready(invocation.get_timeout()).await;
        }
        let call = match requester.invoke_group(invocation).await {
            Ok(call) => call,
            Err(crate::Error::KeyConflict) => {
                return self.refuse_from(
                    who,
                    HttpReply::message(
                        Outcome::Conflict,
                        "the idempotency key was already used for a different group call (other devices, method or request), or the first call with it still runs",
                    ),
                )
            }
            Err(e) => return self.refuse_from(who, refusal(e)),
        };
        let id = call.id();
        let mut running = Running {
            call,
            slots,
            audit: GroupAuditLine {
                caller: who.caller.as_ref().map(|c| c.name().to_owned()),
                source: who.source,
                method: method.clone(),
                kind: kind.as_str(),
                set: kind.describe(),
                mode: mode.as_str(),
                started,
                traceparent: trace,
                id,
            },
            ended: false,
        };
        match mode {
            Mode::Json if self.buffered.is_none() => {
                // The results as the library gives them, then the body
                // written straight from them: no `Value` per result, which
                // would cost several times the result itself while the
                // call runs.
                #[derive(Serialize)]
                struct Answer<'a> {
                    id: String,
                    results: &'a [DeviceResult],
                    summary: &'a crate::GroupSummary,
                }
                let mut results = Vec::new();
                while let Some(r) = running.next().await {
                    results.push(r);
                }
                let body = serde_json::to_vec(&Answer {
                    id: id.to_string(),
                    results: &results,
                    summary: running.call.summary(),
                })
                .unwrap_or_default();
                drop(results);
                drop(running);
                let mut response = (StatusCode::OK, body).into_response();
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            Mode::Json => {
                let mut results = Vec::new();
                let mut omitted = 0usize;
                // Buffered (the Lambda): what fits its answer.
                let max = self.buffered.map_or(usize::MAX, buffered_results);
                while let Some(r) = running.next().await {
                    if results.len() < max {
                        results.push(capped(r));
                    } else {
                        omitted += 1;
                    }
                }
                let mut body = json!({
                    "id": id.to_string(),
                    "results": results,
                    "summary": running.call.summary(),
                });
                if omitted > 0 {
                    body["omitted"] = json!(omitted);
                }
                drop(running);
                respond(HttpReply::ok(body))
            }
            Mode::Ndjson => {
                let lines = futures_util::stream::unfold(Some(running), |state| async move {
                    let mut running = state?;
                    match running.next().await {
                        Some(r) => {
                            let mut line = serde_json::to_vec(&r).unwrap_or_default();
                            line.push(b'\n');
                            Some((Ok::<_, Infallible>(Bytes::from(line)), Some(running)))
                        }
                        // The last line; dropping `running` writes the
                        // audit line.
                        None => Some((Ok(running.end_line()), None)),
                    }
                });
                let mut response = (StatusCode::OK, Body::from_stream(lines)).into_response();
                let h = response.headers_mut();
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                // Proxies that buffer (nginx) pass each line on at once.
                h.insert("x-accel-buffering", HeaderValue::from_static("no"));
                response
            }
            Mode::Async => {
                let Some(records) = self.group_records.clone() else {
                    return respond(HttpReply::message(
                        Outcome::Unavailable,
                        "group calls are not recorded here",
                    ));
                };
                let record =
                    records.insert(id, method, who.caller.as_ref().map(|c| c.name().to_owned()));
                tokio::spawn(async move {
                    while let Some(r) = running.next().await {
                        records.push(&record, &r, running.call.summary());
                    }
                    records.finish(&record, running.call.summary());
                });
                let link = format!("/v1/groups/{id}");
                let mut reply = HttpReply::new(
                    202,
                    json!({"result": "accepted", "id": id.to_string(), "group": link}),
                );
                reply.location = Some(link);
                respond(reply.under(&who.base))
            }
        }
    }
}

/// What became of a group call answered 202: its results so far.
#[utoipa::path(
    get,
    path = "/v1/groups/{id}",
    params(
        ("id" = String, Path, description = "The group call's id, as its 202 gave it.", min_length = 36, max_length = 36, pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
        ("wait" = Option<u64>, Query, description = "Long poll: wait up to this many seconds (at most the gateway's maximum timeout) for the call to be `done`.", minimum = 0, maximum = 60),
    ),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The group call's record.", body = GroupRecordBody),
        (status = 400, description = "Not a call id, or a bad `wait`.", body = MessageBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
        (status = 404, description = "No record: never made here (records are in each gateway's memory), not answered 202, made by another caller, past the retention window, or calls are not recorded.", body = MessageBody),
    )
)]
pub(crate) async fn group_record(
    State(gw): State<GatewayState>,
    who: Authed,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    budget: Option<Extension<CallBudget>>,
    lifecycle: Option<Extension<Lifecycle>>,
) -> Response {
    let Ok(Path(id)) = path else {
        return gw.refuse_from(&who, HttpReply::invalid("id", "not valid in a path"));
    };
    let Ok(id) = MessageId::parse(&id) else {
        return gw.refuse_from(
            &who,
            HttpReply::invalid("id", "not a call id (a lowercase hyphenated UUID)"),
        );
    };
    let max = gw.service.limits().max_timeout.as_secs().max(1);
    let wait = match wait_param(query.as_deref(), max, budget.as_ref().map(|Extension(b)| b)) {
        Ok(wait) => wait,
        Err(reply) => return gw.refuse_from(&who, reply),
    };
    let Some(records) = &gw.group_records else {
        return gw.refuse_from(
            &who,
            HttpReply::message(
                Outcome::NotFound,
                "group calls are not recorded here (--record-retention 0)",
            ),
        );
    };
    let not_found = || {
        HttpReply::message(
            Outcome::NotFound,
            format!(
                "no record of group call {id} made by this caller: records are kept {} s, only for group calls answered 202 (Prefer: respond-async), in the memory of the gateway that made them",
                records.retention().as_secs()
            ),
        )
    };
    let Some(record) = records.get(&id) else {
        return gw.refuse_from(&who, not_found());
    };
    // Another caller's record is not this one's to read, nor to know of.
    if let Some(owner) = record.caller() {
        if who.caller.as_ref().is_none_or(|c| c.name() != owner) {
            return gw.refuse_from(&who, not_found());
        }
    }
    if !wait.is_zero() {
        let mut done = record.watch_done();
        let finished = async {
            let _ = done.wait_for(|d| *d).await;
        };
        match lifecycle {
            Some(Extension(Lifecycle { mut closing, .. })) => tokio::select! {
                _ = tokio::time::timeout(wait, finished) => {}
                () = async { drop(closing.wait_for(|c| *c).await) } => {}
            },
            None => drop(tokio::time::timeout(wait, finished).await),
        }
    }
    respond(HttpReply::ok(record.body()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BrokerOptions, Options, Requester};

    fn service(presence: bool) -> InvokeService {
        // Never connects: parsing needs no broker.
        let mut options = Options::new(BrokerOptions::new("127.0.0.1", 9));
        if presence {
            options = options.presence(directcall_core::PresenceRoot::default());
        }
        InvokeService::new(
            Requester::start(options).unwrap(),
            super::super::Limits::default(),
        )
    }

    fn refused(s: &InvokeService, method: &str, body: &str, max: usize) -> HttpReply {
        match s.group_invocation(method, None, body.as_bytes(), max) {
            Ok(_) => panic!("{body} was taken"),
            Err(r) => r,
        }
    }

    #[tokio::test]
    async fn group_bodies_parse() {
        let s = service(true);
        let r = s
            .group_invocation(
                "reboot",
                Some("application/json"),
                br#"{"targets":["a","b","a"],"request":{"x":1},"timeout_ms":2500}"#,
                10,
            )
            .unwrap();
        assert_eq!(
            r.invocation.get_targets(),
            &crate::Targets::List(vec![Target::new("a").unwrap(), Target::new("b").unwrap()])
        );
        assert_eq!(r.invocation.get_request(), &json!({"x": 1}));
        assert_eq!(r.invocation.get_timeout(), Duration::from_millis(2500));
        let r = s
            .group_invocation("m", None, br#"{"match":"Kiosk-*","online_only":true}"#, 10)
            .unwrap();
        assert_eq!(
            r.invocation.get_targets(),
            &crate::Targets::Match {
                pattern: "Kiosk-*".into(),
                online_only: true
            }
        );
        assert_eq!(
            r.invocation.get_timeout(),
            super::super::DEFAULT_HTTP_TIMEOUT
        );
        assert_eq!(r.invocation.get_request(), &Value::Null);
        let r = s
            .group_invocation("m", None, br#"{"group":"station-7"}"#, 10)
            .unwrap();
        assert_eq!(r.kind.as_str(), "group");
    }

    #[tokio::test]
    async fn bad_group_bodies_name_the_part() {
        let s = service(true);
        for (method, body, message) in [
            (
                "m",
                r#"{"targets":["a","b","c","d/e"]}"#,
                "invalid targets[3]: contains '/'",
            ),
            (
                "m",
                r#"{"targets":["a",7]}"#,
                "invalid targets[1]: must be a device name",
            ),
            (
                "m",
                r#"{"targets":[]}"#,
                "invalid targets: must name at least one",
            ),
            (
                "m",
                r#"{"targets":"a"}"#,
                "invalid targets: must be an array",
            ),
            ("m", r#"{"match":"a/b"}"#, "invalid match: "),
            ("m", r#"{"match":""}"#, "invalid match: "),
            ("m", r#"{"match":7}"#, "invalid match: "),
            ("m", r#"{"group":"a#"}"#, "invalid group: contains '#'"),
            (
                "m",
                r#"{"group":"g","targets":["a"]}"#,
                "invalid body: give exactly one of targets, match, group (got targets, group)",
            ),
            (
                "m",
                r#"{"request":1}"#,
                "invalid body: give exactly one of targets, match, group (got none)",
            ),
            (
                "m",
                r#"{"group":"g","online_only":true}"#,
                "invalid online_only: only with match",
            ),
            (
                "m",
                r#"{"match":"g*","online_only":1}"#,
                "invalid online_only: must be true or false",
            ),
            (
                "m",
                r#"{"group":"g","timeout_ms":99}"#,
                "invalid timeout_ms: ",
            ),
            (
                "m",
                r#"{"group":"g","timeout_ms":null}"#,
                "invalid timeout_ms: ",
            ),
            (
                "m",
                r#"{"group":"g","receipt":true}"#,
                "invalid body: unknown field `receipt`",
            ),
            ("m", r#"[]"#, "invalid body: not a JSON object"),
            ("m", r#"{"#, "invalid body: "),
            ("a/b", r#"{"group":"g"}"#, "invalid method: "),
        ] {
            let r = refused(&s, method, body, 10);
            assert_eq!(r.status, 400, "{body}: {:?}", r.body);
            let text = r.body["response"].as_str().unwrap();
            assert!(text.starts_with(message), "{body}: {text}");
        }
        let r = refused(&s, "m", r#"{"targets":["a","b","c"]}"#, 2);
        assert_eq!(r.status, 413);
        let big = format!(
            r#"{{"group":"g","request":"{}"}}"#,
            "x".repeat(MAX_HTTP_REQUEST_BYTES)
        );
        let r = refused(&s, "m", &big, 2);
        assert_eq!(r.status, 413, "{:?}", r.body);
        // A glob needs presence to match against.
        let r = refused(&service(false), "m", r#"{"match":"a*"}"#, 2);
        let text = r.body["response"].as_str().unwrap();
        assert!(text.starts_with("invalid match: "), "{text}");
    }

    #[test]
    fn accept_asks_for_ndjson() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            wants_ndjson(&h)
        };
        assert!(h("application/x-ndjson"));
        assert!(h("application/json;q=0.5, Application/X-NDJSON"));
        assert!(!h("application/json"));
        assert!(!h("application/x-ndjson;q=0"));
        assert!(!wants_ndjson(&HeaderMap::new()));
    }

    #[test]
    fn a_buffered_answer_holds_its_bound() {
        // The Lambda's: 3,000,000 bytes of body.
        assert_eq!(buffered_results(3_000_000), 2_928);
        let long = DeviceResult {
            target: Target::new("a".repeat(128)).unwrap(),
            outcome: crate::DeviceOutcome::Ok,
            status: Some(200),
            response: Some(json!("x".repeat(5000))),
            latency: Some(Duration::from_micros(123_456_789)),
            reason: None,
            replayed: true,
        };
        let v = capped(long);
        assert!(v.get("response").is_none());
        assert!(v.to_string().len() < BUFFERED_RESULT_BYTES, "{v}");
        assert!(v["reason"]
            .as_str()
            .unwrap()
            .starts_with("response left out"));
    }

    #[test]
    fn the_schemas_name_every_field_sent() {
        use utoipa::PartialSchema;
        let schema = |s: utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>| {
            serde_json::to_value(s).unwrap()["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        let result = DeviceResult {
            target: Target::new("a").unwrap(),
            outcome: crate::DeviceOutcome::Ok,
            status: Some(200),
            response: Some(json!(1)),
            latency: Some(Duration::from_millis(1)),
            reason: Some("r".into()),
            replayed: true,
        };
        let fields = schema(DeviceResultBody::schema());
        for key in serde_json::to_value(&result)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
        {
            assert!(fields.contains(key), "{key} not in DeviceResultBody");
        }
        let fields = schema(GroupSummaryBody::schema());
        for key in serde_json::to_value(crate::GroupSummary::default())
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
        {
            assert!(fields.contains(key), "{key} not in GroupSummaryBody");
        }
    }
}
