//! The API's routes: the two call forms (the AWS sample's `GET /invoke`
//! and `POST /v1/targets/{target}/methods/{method}`), call records,
//! health, metrics and the OpenAPI document. Every handler takes its
//! caller from [`Authed`]: authentication is never called by hand.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{NestedPathRejection, PathRejection};
use axum::extract::{NestedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Serialize;
use utoipa::ToSchema;

use super::body::{
    AcceptedBody, BadReplyBody, CallRecordBody, HttpReply, InvokeQuery, MessageBody, OfflineBody,
    OkBody, Outcome, PostBody, TimeoutBody, UnauthorizedBody,
};
use super::mapping::{MAX_HTTP_REQUEST_BYTES, MAX_QUERY_BYTES};
use super::state::{respond, Authed, CallBudget, GatewayState, Lifecycle};
use crate::Invocation;

/// `{"status": "ok"|"unavailable", "broker": "connected"|"disconnected"}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HealthBody {
    /// `ok` when the broker connection is up and subscribed.
    #[schema(pattern = "^(ok|unavailable)$")]
    status: &'static str,
    /// `connected` or `disconnected`.
    #[schema(pattern = "^(connected|disconnected)$")]
    broker: &'static str,
    /// The broker in use, as a URL without credentials.
    broker_url: String,
}

/// Whether the request says `Prefer: respond-async` (RFC 7240).
pub(crate) fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            p.split(';')
                .next()
                .is_some_and(|name| name.trim().eq_ignore_ascii_case("respond-async"))
        })
}

/// The `Idempotency-Key` header (the caller it is made for owns it, so two
/// callers never share a key), or a 400 naming it.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, HttpReply> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let invalid = |reason| HttpReply::invalid("Idempotency-Key", reason);
    let key = value
        .to_str()
        .map_err(|_| invalid("may hold only visible ASCII characters"))?;
    // The IETF draft writes it as a structured-field string: "…".
    let key = key
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .unwrap_or(key);
    if key.is_empty() || key.len() > crate::MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(invalid("must be 1 to 255 characters"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "may hold only visible ASCII characters (no spaces)",
        ));
    }
    Ok(Some(key.to_owned()))
}

/// Call a method on a device (the AWS sample's form).
#[utoipa::path(
    get,
    path = "/invoke",
    params(InvokeQuery, ("Idempotency-Key" = Option<String>, Header, description = "Makes the call idempotent: the same key with the same call while it runs waits for its outcome, and after it gets the stored outcome (with `Idempotent-Replayed: true`), for the record retention; with another call, 409. Scoped to the caller's token.", min_length = 1, max_length = 255, pattern = "^[!-~]+$")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The device answered (its own verdict is `status`).", body = OkBody),
        (status = 400, description = "A parameter is missing or invalid; nothing was published.", body = MessageBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
        (status = 404, description = "`offline`: the target is known to be offline (a presence record says so, or on MQTT 5 the broker found no device subscribed); `unknown_device`: with strict presence, the target has no presence record, no device of that name was ever seen. Nothing reached a device.", body = OfflineBody),
        (status = 403, description = "The credential may not call this target or method; nothing was published.", body = MessageBody),
        (status = 409, description = "The Idempotency-Key was used for a different call; nothing was published.", body = MessageBody),
        (status = 429, description = "Over the credential's rate or the target's calls in flight; nothing was published. `Retry-After` says when to try again.", body = MessageBody,
            headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 413, description = "The query string is too large.", body = MessageBody),
        (status = 503, description = "No broker connection; nothing was published.", body = MessageBody),
        (status = 502, description = "The device answered with a reply that breaks the protocol's rules (`field` names the part: a `status` that is not an integer from 0 to 65535); the call ended at once. The device may have run the method.", body = BadReplyBody),
        (status = 504, description = "No answer before the deadline.", body = TimeoutBody),
    )
)]
pub(crate) async fn invoke_get(
    State(gw): State<GatewayState>,
    who: Authed,
    request: Request,
) -> Response {
    let start = Instant::now();
    // The request's own parts, read in place: extractors for the query and
    // the headers would copy both for every call.
    let (parts, _) = request.into_parts();
    let budget = parts.extensions.get::<CallBudget>().cloned();
    let (query, headers) = (parts.uri.query().unwrap_or_default(), &parts.headers);
    if query.len() > MAX_QUERY_BYTES {
        return gw.refuse_from(
            &who,
            HttpReply::too_large("query string", Some(query.len()), MAX_QUERY_BYTES),
        );
    }
    match gw
        .service
        .query_invocation(form_urlencoded::parse(query.as_bytes()), start)
    {
        Ok(invocation) => match idempotency_key(headers) {
            Ok(key) => {
                gw.call(
                    &who,
                    identified(traced(invocation, headers), &who, key),
                    budget,
                    false,
                )
                .await
            }
            Err(reply) => gw.refuse_from(&who, reply),
        },
        Err(reply) => gw.refuse_from(&who, reply),
    }
}

/// Call a method on a device (the AWS sample's form, with API Gateway's trailing slash).
#[utoipa::path(
    get,
    path = "/invoke/",
    params(InvokeQuery, ("Idempotency-Key" = Option<String>, Header, description = "Makes the call idempotent: the same key with the same call while it runs waits for its outcome, and after it gets the stored outcome (with `Idempotent-Replayed: true`), for the record retention; with another call, 409. Scoped to the caller's token.", min_length = 1, max_length = 255, pattern = "^[!-~]+$")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The device answered (its own verdict is `status`).", body = OkBody),
        (status = 400, description = "A parameter is missing or invalid; nothing was published.", body = MessageBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
        (status = 404, description = "`offline`: the target is known to be offline (a presence record says so, or on MQTT 5 the broker found no device subscribed); `unknown_device`: with strict presence, the target has no presence record, no device of that name was ever seen. Nothing reached a device.", body = OfflineBody),
        (status = 403, description = "The credential may not call this target or method; nothing was published.", body = MessageBody),
        (status = 409, description = "The Idempotency-Key was used for a different call; nothing was published.", body = MessageBody),
        (status = 429, description = "Over the credential's rate or the target's calls in flight; nothing was published. `Retry-After` says when to try again.", body = MessageBody,
            headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 413, description = "The query string is too large.", body = MessageBody),
        (status = 503, description = "No broker connection; nothing was published.", body = MessageBody),
        (status = 502, description = "The device answered with a reply that breaks the protocol's rules (`field` names the part: a `status` that is not an integer from 0 to 65535); the call ended at once. The device may have run the method.", body = BadReplyBody),
        (status = 504, description = "No answer before the deadline.", body = TimeoutBody),
    )
)]
pub(crate) async fn invoke_get_slash(
    state: State<GatewayState>,
    who: Authed,
    request: Request,
) -> Response {
    invoke_get(state, who, request).await
}

/// Call a method on a device with any JSON request.
#[utoipa::path(
    post,
    path = "/v1/targets/{target}/methods/{method}",
    params(
        ("target" = String, Path, description = "The device (one topic level).", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_.:-]+$"),
        ("method" = String, Path, description = "The method (one topic level).", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_.:-]+$"),
        ("Prefer" = Option<String>, Header, description = "`respond-async` (RFC 7240): answer 202 at once with `Location: /v1/calls/{id}` instead of waiting; ignored when the gateway keeps no call records."),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the call idempotent: the same key with the same call while it runs waits for its outcome, and after it gets the stored outcome (with `Idempotent-Replayed: true`), for the record retention; with another call, 409. Scoped to the caller's token.", min_length = 1, max_length = 255, pattern = "^[!-~]+$"),
    ),
    request_body(content = PostBody, content_type = "application/json"),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The device answered (its own verdict is `status`).", body = OkBody),
        (status = 202, description = "With `Prefer: respond-async` (and call records on): published; `Location` names the call's record.", body = AcceptedBody,
            headers(("Location" = String, description = "The call's record, /v1/calls/{id}."))),
        (status = 400, description = "A parameter or the body is invalid; nothing was published.", body = MessageBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
        (status = 404, description = "`offline`: the target is known to be offline (a presence record says so, or on MQTT 5 the broker found no device subscribed); `unknown_device`: with strict presence, the target has no presence record, no device of that name was ever seen. Nothing reached a device.", body = OfflineBody),
        (status = 403, description = "The credential may not call this target or method; nothing was published.", body = MessageBody),
        (status = 409, description = "The Idempotency-Key was used for a different call; nothing was published.", body = MessageBody),
        (status = 429, description = "Over the credential's rate or the target's calls in flight; nothing was published. `Retry-After` says when to try again.", body = MessageBody,
            headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 413, description = "The body is over 128 KiB.", body = MessageBody),
        (status = 503, description = "No broker connection; nothing was published.", body = MessageBody),
        (status = 502, description = "The device answered with a reply that breaks the protocol's rules (`field` names the part: a `status` that is not an integer from 0 to 65535); the call ended at once. The device may have run the method.", body = BadReplyBody),
        (status = 504, description = "No answer before the deadline.", body = TimeoutBody),
    )
)]
pub(crate) async fn invoke_post(
    State(gw): State<GatewayState>,
    who: Authed,
    path: Result<Path<(String, String)>, PathRejection>,
    request: Request,
) -> Response {
    let start = Instant::now();
    // The headers read in place (a `HeaderMap` extractor copies them).
    let (parts, body) = request.into_parts();
    let budget = parts.extensions.get::<CallBudget>().cloned();
    let headers = &parts.headers;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // The same answer whether the length was declared or found by reading
    // (API Gateway declares none to the Lambda).
    if declared.is_some_and(|len| len > MAX_HTTP_REQUEST_BYTES) {
        return gw.refuse_from(
            &who,
            HttpReply::too_large("body", None, MAX_HTTP_REQUEST_BYTES),
        );
    }
    let body: Bytes = match axum::body::to_bytes(body, MAX_HTTP_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return gw.refuse_from(
                &who,
                HttpReply::too_large("body", None, MAX_HTTP_REQUEST_BYTES),
            )
        }
    };
    // axum percent-decodes path segments (not form-decodes: `+` stays `+`,
    // and is then refused as a name).
    let Ok(Path((target, method))) = path else {
        return gw.refuse_from(
            &who,
            HttpReply::invalid("path", "target and method must be UTF-8 path segments"),
        );
    };
    let content_type = match headers.get(header::CONTENT_TYPE).map(|v| v.to_str()) {
        None => None,
        Some(Ok(ct)) => Some(ct),
        Some(Err(_)) => {
            return gw.refuse_from(&who, HttpReply::invalid("content-type", "not ASCII"))
        }
    };
    match gw
        .service
        .post_invocation(&target, &method, content_type, &body, start)
    {
        Ok(invocation) => match idempotency_key(headers) {
            Ok(key) => {
                let invocation = identified(traced(invocation, headers), &who, key);
                // Without records there is nowhere to learn the outcome:
                // the preference is ignored, as RFC 7240 allows.
                let asynchronous =
                    prefers_async(headers) && gw.service.requester().record_options().is_some();
                gw.call(&who, invocation, budget, asynchronous).await
            }
            Err(reply) => gw.refuse_from(&who, reply),
        },
        Err(reply) => gw.refuse_from(&who, reply),
    }
}

/// The call made on behalf of its caller (who then owns its record and
/// its idempotency key), and made idempotent under the key it gave.
fn identified(invocation: Invocation, who: &Authed, key: Option<String>) -> Invocation {
    let invocation = match &who.caller {
        Some(c) => invocation.caller(c.name()),
        None => invocation,
    };
    match key {
        Some(key) => invocation.idempotency_key(key),
        None => invocation,
    }
}

/// The caller's W3C `traceparent` header, passed on to the device when it
/// is valid; an invalid one is ignored, as the W3C recommendation says (a
/// receiver that cannot parse it starts a new trace).
fn traced(invocation: Invocation, headers: &HeaderMap) -> Invocation {
    match traceparent(headers) {
        Some(value) => invocation.traceparent(value),
        None => invocation,
    }
}

/// The caller's valid W3C `traceparent` header, if any.
pub(crate) fn traceparent(headers: &HeaderMap) -> Option<&str> {
    match headers.get("traceparent").map(HeaderValue::to_str) {
        Some(Ok(value)) if directcall_core::trace::check_traceparent(value).is_ok() => Some(value),
        Some(_) => {
            tracing::debug!("ignored an invalid traceparent header");
            None
        }
        None => None,
    }
}

/// A long poll's `?wait=SECONDS` (0 to `max`), never past a front end's
/// own deadline (the Lambda's).
pub(crate) fn wait_param(
    query: Option<&str>,
    max: u64,
    budget: Option<&CallBudget>,
) -> Result<Duration, HttpReply> {
    let mut wait = Duration::ZERO;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if name == "wait" {
            match value.parse::<u64>() {
                Ok(s) if s <= max => wait = Duration::from_secs(s),
                _ => {
                    return Err(HttpReply::invalid(
                        "wait",
                        format!("must be whole seconds from 0 to {max}"),
                    ))
                }
            }
        }
    }
    Ok(match budget {
        Some(CallBudget(b)) => wait.min(*b),
        None => wait,
    })
}

/// Whether the broker connection is up and subscribed.
#[utoipa::path(
    get,
    path = "/healthz",
    responses(
        (status = 200, description = "Connected and subscribed.", body = HealthBody),
        (status = 503, description = "Not connected.", body = HealthBody),
    )
)]
pub(crate) async fn healthz(State(gw): State<GatewayState>) -> Response {
    let requester = gw.service.requester();
    let connected = requester.is_connected();
    let body = HealthBody {
        status: if connected { "ok" } else { "unavailable" },
        broker: if connected {
            "connected"
        } else {
            "disconnected"
        },
        broker_url: requester.broker_url().to_owned(),
    };
    respond(HttpReply::new(
        if connected { 200 } else { 503 },
        serde_json::to_value(body).unwrap_or_default(),
    ))
}

/// `{"status": "ok"}`: the process is alive and serving.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LiveBody {
    /// Always `ok`.
    #[schema(pattern = "^ok$")]
    status: &'static str,
}

/// Whether the process is alive (a liveness probe): 200 while it serves
/// HTTP, whatever the broker does. A broker outage is not a reason to
/// restart the gateway.
#[utoipa::path(
    get,
    path = "/livez",
    responses((status = 200, description = "Alive.", body = LiveBody))
)]
pub(crate) async fn livez() -> Response {
    respond(HttpReply::new(
        200,
        serde_json::to_value(LiveBody { status: "ok" }).unwrap_or_default(),
    ))
}

/// Whether this gateway should be sent calls now, and if not, why.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReadyBody {
    /// `ready` when every check passes, else `unavailable`.
    #[schema(pattern = "^(ready|unavailable)$")]
    status: &'static str,
    /// `connected` or `disconnected`.
    #[schema(pattern = "^(connected|disconnected)$")]
    broker: &'static str,
    /// `loaded` (strict presence: every retained record is in), `loading`
    /// (strict presence, not yet), `best_effort` (presence without
    /// `--strict-presence`: records arrive as they come) or `off`.
    #[schema(pattern = "^(loaded|loading|best_effort|off)$")]
    presence: &'static str,
    /// Whether shutdown has begun.
    draining: bool,
}

/// Whether to send this gateway calls (a readiness probe): 200 when the
/// broker is connected, the presence snapshot is loaded (strict presence)
/// and shutdown has not begun; 503 otherwise, saying which.
#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, description = "Ready for calls.", body = ReadyBody),
        (status = 503, description = "Not ready: see which check failed.", body = ReadyBody),
    )
)]
pub(crate) async fn readyz(
    State(gw): State<GatewayState>,
    lifecycle: Option<Extension<Lifecycle>>,
) -> Response {
    let requester = gw.service.requester();
    let connected = requester.is_connected();
    let presence = requester.presence_state();
    let draining = lifecycle.is_some_and(|Extension(l)| *l.draining.borrow());
    let ready = connected && presence != crate::PresenceState::Loading && !draining;
    let body = ReadyBody {
        status: if ready { "ready" } else { "unavailable" },
        broker: if connected {
            "connected"
        } else {
            "disconnected"
        },
        presence: presence.as_str(),
        draining,
    };
    respond(HttpReply::new(
        if ready { 200 } else { 503 },
        serde_json::to_value(body).unwrap_or_default(),
    ))
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The metrics.", content_type = "text/plain", body = String),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
    )
)]
pub(crate) async fn metrics(State(gw): State<GatewayState>, _who: Authed) -> Response {
    let text = gw
        .metrics
        .as_ref()
        .map(|render| render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "The OpenAPI 3 document.", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi(
    State(gw): State<GatewayState>,
    nested: Result<NestedPath, NestedPathRejection>,
) -> Response {
    let base = gw.base(nested.as_ref().ok());
    let doc = match &gw.base_path {
        Some(_) => gw.openapi.clone(),
        None if base.is_empty() => gw.openapi.clone(),
        // Nested by a host: the document under the path it chose.
        None => (gw.openapi_at)(&base),
    };
    ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
}

/// What became of a call: its record, with a late answer when one came
/// after the 504.
#[utoipa::path(
    get,
    path = "/v1/calls/{id}",
    params(
        ("id" = String, Path, description = "The call's id, as its 200, 202 or 504 answer gave it.", min_length = 36, max_length = 36, pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
        ("wait" = Option<u64>, Query, description = "Long poll: wait up to this many seconds (at most the gateway's maximum timeout) for the call to have its answer (`answered`, `answered_late`) or be unable to (`offline`, `unavailable`).", minimum = 0, maximum = 60),
    ),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The call's record.", body = CallRecordBody),
        (status = 400, description = "Not a call id.", body = MessageBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
        (status = 403, description = "The call is outside the credential's scope.", body = MessageBody),
        (status = 404, description = "No record: never made here, past the retention window, or calls are not recorded.", body = MessageBody),
    )
)]
pub(crate) async fn call_record(
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
    let max = gw.service.limits().max_timeout.as_secs().max(1);
    let wait = match wait_param(query.as_deref(), max, budget.as_ref().map(|Extension(b)| b)) {
        Ok(wait) => wait,
        Err(reply) => return gw.refuse_from(&who, reply),
    };
    // A long poll ends when the server stops accepting: the record as it
    // stands then, rather than a drain held up for `wait`.
    let reply = match lifecycle {
        Some(Extension(Lifecycle { mut closing, .. })) => tokio::select! {
            reply = gw.service.wait_call_record(&id, wait) => reply,
            () = async { drop(closing.wait_for(|c| *c).await) } => gw.service.call_record(&id).await,
        },
        None => gw.service.wait_call_record(&id, wait).await,
    };
    // A record of a call outside the caller's scope is not its to read.
    if let (Some(c), Some(t), Some(m)) = (
        &who.caller,
        reply.body["target"].as_str(),
        reply.body["method"].as_str(),
    ) {
        if let Err(refusal) = c.allows(t, m) {
            return gw.refuse_from(
                &who,
                HttpReply::message(Outcome::Forbidden, refusal.to_string()),
            );
        }
    }
    // Another caller's record (in scope) is not this one's to read, nor
    // to know of.
    if let Some(owner) = reply.body["caller"].as_str() {
        if who.caller.as_ref().is_none_or(|c| c.name() != owner) {
            return gw.refuse_from(
                &who,
                HttpReply::message(
                    Outcome::NotFound,
                    format!("no record of call {id} made by this caller"),
                ),
            );
        }
    }
    respond(reply)
}

pub(crate) async fn not_found(uri: Uri) -> Response {
    respond(HttpReply::not_found(uri.path()))
}

pub(crate) async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> Response {
    respond(HttpReply::method_not_allowed(uri.path(), method.as_str()))
}
