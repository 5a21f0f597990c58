//! What every route shares: the gateway's state, the caller of a request
//! ([`Authed`]), and the path from a parsed call to its HTTP answer
//! (admission, the call, its audit line and console entry). Below the
//! routes, the console and the servers, which all use it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts, NestedPath};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::audit::AuditLine;
use super::auth::{Authenticate, Caller, Refusal, Unauthorized};
use super::body::{HttpReply, Outcome};
use super::limits::{TargetLimit, TargetSlot};
#[cfg(feature = "console")]
use super::live::{Console, LogEntry};
use super::mapping::InvokeService;
use crate::Invocation;

/// The longest a call may still take, set per request (as a request
/// extension) by a front end that has a deadline of its own: the Lambda's
/// invocation deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallBudget(pub Duration);

/// Renders `/metrics`.
pub(crate) type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// What the routes share, behind one `Arc`.
pub(crate) struct Shared {
    pub(crate) service: InvokeService,
    pub(crate) auth: Option<Arc<dyn Authenticate>>,
    pub(crate) target_limit: Option<Arc<TargetLimit>>,
    /// The records of group calls answered 202 (none without call
    /// records).
    pub(crate) group_records: Option<Arc<super::group_records::GroupRecords>>,
    /// The front end buffers each answer, at most this many bytes (the
    /// Lambda): no NDJSON, group answers held to fit.
    pub(crate) buffered: Option<usize>,
    pub(crate) audit_bodies: bool,
    pub(crate) metrics: Option<MetricsRender>,
    /// The OpenAPI document under `base_path` (or at the root).
    pub(crate) openapi: String,
    /// The OpenAPI document under another base (the routes nested there).
    pub(crate) openapi_at: Arc<dyn Fn(&str) -> String + Send + Sync>,
    pub(crate) wait_for_broker: bool,
    /// Where the API is mounted, when set by the host (else the path it is
    /// nested at, if any).
    pub(crate) base_path: Option<String>,
    #[cfg(feature = "console")]
    pub(crate) console: Option<Arc<Console>>,
}

/// The gateway's state: cheap to clone.
#[derive(Clone)]
pub(crate) struct GatewayState(pub(crate) Arc<Shared>);

impl std::ops::Deref for GatewayState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What every request is told of the server's shutdown, as one request
/// extension (each extension is an allocation of its own): `draining`
/// fires when shutdown begins, before the server stops accepting
/// (`/readyz` answers 503 from then on); `closing` when the server stops
/// accepting (the event streams and long polls end then, so a graceful
/// shutdown does not wait for them).
#[derive(Clone)]
pub(crate) struct Lifecycle {
    pub(crate) draining: tokio::sync::watch::Receiver<bool>,
    pub(crate) closing: tokio::sync::watch::Receiver<bool>,
}

/// Who sent a request: its caller (none on an open gateway) and address
/// (none behind API Gateway), and where the API is mounted.
pub(crate) struct Authed {
    pub(crate) caller: Option<Caller>,
    pub(crate) source: Option<SocketAddr>,
    /// The path the API is mounted under (`/devices`), or empty.
    pub(crate) base: String,
    /// The request's URI, for the audit line of a refusal.
    pub(crate) uri: axum::http::Uri,
}

impl FromRequestParts<GatewayState> for Authed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &GatewayState,
    ) -> Result<Self, Self::Rejection> {
        let source = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| *addr);
        let base = state.base(parts.extensions.get::<NestedPath>());
        // A host's own authentication, as a middleware, named the caller.
        let uri = parts.uri.clone();
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(Authed {
                caller: Some(caller.clone()),
                source,
                base,
                uri,
            });
        }
        let caller = match state.auth.as_ref().filter(|a| a.is_required()) {
            None => None,
            Some(auth) => match auth.authenticate(parts) {
                Ok(caller) => Some(caller),
                Err(why) => return Err(state.unauthorized(why, source, uri.path())),
            },
        };
        Ok(Authed {
            caller,
            source,
            base,
            uri,
        })
    }
}

/// An HTTP answer from a reply: its status, JSON body and headers.
pub(crate) fn respond(reply: HttpReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, json_bytes(&reply.body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if reply.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if let Some(wait) = reply.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait));
    }
    if let Some(Ok(location)) = reply.location.as_deref().map(HeaderValue::from_str) {
        response.headers_mut().insert(header::LOCATION, location);
        response.headers_mut().insert(
            "preference-applied",
            HeaderValue::from_static("respond-async"),
        );
    }
    response
}

/// `body` as JSON in a buffer of its exact size: written into a buffer the
/// thread keeps, then copied once (`to_string()` grows a `String` several
/// times per body, and bytes of a `Vec` with room to spare cost one more
/// allocation to become a response body).
fn json_bytes(body: &serde_json::Value) -> axum::body::Bytes {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// A larger buffer (after a large body) is not kept.
    const KEEP: usize = 16 * 1024;
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        // Writing a `Value` into a `Vec` cannot fail: its keys are strings
        // and the `Vec` takes every byte.
        let _ = serde_json::to_writer(&mut *buf, body);
        let bytes = axum::body::Bytes::copy_from_slice(buf);
        if buf.capacity() > KEEP {
            *buf = Vec::new();
        }
        bytes
    })
}

/// What a call's audit line needs from its start.
struct Audit<'a> {
    names: &'a (directcall_core::Target, directcall_core::Method),
    started: Instant,
    request: Option<&'a serde_json::Value>,
    traceparent: Option<&'a str>,
}

impl GatewayState {
    /// Where the API is mounted: the host's base path, else the path the
    /// routes are nested at, else nothing.
    pub(crate) fn base(&self, nested: Option<&NestedPath>) -> String {
        let base = match &self.base_path {
            Some(base) => base.as_str(),
            None => nested.map_or("", NestedPath::as_str),
        };
        base.trim_end_matches('/').to_owned()
    }

    /// A 401 saying why (nothing more when no credential was presented),
    /// counted.
    /// Audited: from where, which path, why.
    pub(crate) fn unauthorized(
        &self,
        why: Unauthorized,
        source: Option<SocketAddr>,
        path: &str,
    ) -> Response {
        self.count(Outcome::Unauthorized);
        let reply = match why {
            Unauthorized::Missing => HttpReply::unauthorized(),
            Unauthorized::Refused(why) => HttpReply::unauthorized_because(why),
        };
        super::audit::refused(None, source, path, &reply);
        let mut response = respond(reply);
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }

    /// Counts a request refused before it became a call.
    fn count(&self, outcome: Outcome) {
        self.service.record_refused(outcome);
    }

    /// Answers `reply` to a request refused before it became a call,
    /// counting it.
    pub(crate) fn refuse(&self, reply: HttpReply) -> Response {
        self.count(reply.outcome().unwrap_or(Outcome::Invalid));
        respond(reply)
    }

    /// [`refuse`](Self::refuse), with an audit line saying who, from
    /// where, which path and why.
    pub(crate) fn refuse_from(&self, who: &Authed, reply: HttpReply) -> Response {
        super::audit::refused(who.caller.as_ref(), who.source, who.uri.path(), &reply);
        self.refuse(reply)
    }

    /// Whether the caller may make this call now: its scope (403), its rate
    /// and the target's calls in flight (429). The slot is held for the
    /// call's life.
    fn admit(
        &self,
        caller: Option<&Caller>,
        invocation: &Invocation,
    ) -> Result<Option<TargetSlot>, HttpReply> {
        let (target, method) = (
            invocation.get_target().as_str(),
            invocation.get_method().as_str(),
        );
        let refused = |r: Refusal| match r {
            Refusal::Limited {
                message,
                retry_after,
            } => HttpReply::limited(message, retry_after),
            other => HttpReply::message(Outcome::Forbidden, other.to_string()),
        };
        if let Some(c) = caller {
            c.allows(target, method).map_err(refused)?;
            c.take().map_err(refused)?;
        }
        match &self.target_limit {
            Some(limit) => limit.enter(target).map(Some).map_err(refused),
            None => Ok(None),
        }
    }

    /// Runs a parsed call within its budget, if the caller may make it, and
    /// writes its audit line. `asynchronous`: answers 202 once the request
    /// is published (the call then runs on its own; its target slot is held
    /// until the 202).
    pub(crate) async fn call(
        &self,
        who: &Authed,
        invocation: Invocation,
        budget: Option<CallBudget>,
        asynchronous: bool,
    ) -> Response {
        let started = Instant::now();
        let names = (
            invocation.get_target().clone(),
            invocation.get_method().clone(),
        );
        let request = self.audit_bodies.then(|| invocation.get_request().clone());
        let traceparent = invocation.get_traceparent().map(str::to_owned);
        let audit = Audit {
            names: &names,
            started,
            request: request.as_ref(),
            traceparent: traceparent.as_deref(),
        };
        let slot = match self.admit(who.caller.as_ref(), &invocation) {
            Ok(slot) => slot,
            Err(reply) => {
                self.finished(who, &audit, &reply, false);
                return self.refuse(reply);
            }
        };
        // The rarer 202 path boxed: it would size every call's future (a
        // future axum boxes and moves per request).
        let reply = if asynchronous {
            Box::pin(self.service.submit(invocation)).await
        } else {
            self.run(invocation, budget).await
        };
        drop(slot);
        let reply = reply.under(&who.base);
        self.finished(who, &audit, &reply, self.audit_bodies);
        respond(reply)
    }

    /// The end of a call: its audit line, and its line in the console's
    /// live log.
    fn finished(&self, who: &Authed, audit: &Audit<'_>, reply: &HttpReply, with_response: bool) {
        let (target, method) = audit.names;
        let started = audit.started;
        AuditLine {
            caller: who.caller.as_ref(),
            source: who.source,
            target,
            method,
            reply,
            started,
            request: audit.request,
            with_response,
            traceparent: audit.traceparent,
        }
        .write();
        #[cfg(feature = "console")]
        if let Some(console) = &self.console {
            let mut entry = LogEntry::new(
                target.as_str(),
                method.as_str(),
                reply.body["result"].as_str().unwrap_or("-"),
                reply.status,
                started.elapsed(),
            );
            entry.id = reply.body["id"].as_str().map(str::to_owned);
            entry.device_status = reply.body["status"].as_u64();
            if let Some(c) = &who.caller {
                c.name().clone_into(&mut entry.credential);
            }
            console.log(entry);
        }
    }

    async fn run(&self, invocation: Invocation, budget: Option<CallBudget>) -> HttpReply {
        let invocation = match budget {
            Some(CallBudget(b)) => {
                let timeout = invocation
                    .get_timeout()
                    .min(b.max(Duration::from_millis(1)));
                invocation.timeout(timeout)
            }
            None => invocation,
        };
        let requester = self.service.requester();
        if self.wait_for_broker && !requester.is_connected() {
            let start = invocation
                .get_started_at()
                .unwrap_or_else(tokio::time::Instant::now);
            let left = (start + invocation.get_timeout())
                .saturating_duration_since(tokio::time::Instant::now());
            Box::pin(requester.wait_ready(left)).await;
        }
        self.service.invoke(invocation).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_written_as_its_json_whatever_its_size() {
        let small = serde_json::json!({"result": "ok", "status": 200, "response": {"a": [1, 2]}});
        let large = serde_json::json!({"response": "x".repeat(100_000), "id": "é\"\n"});
        // Small, large (a buffer not kept), then small again.
        for body in [&small, &large, &small] {
            let bytes = json_bytes(body);
            assert_eq!(bytes, body.to_string().into_bytes());
            let back: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(&back, body);
        }
    }
}
