//! The HTTP gateway (`directcall serve`): PROTOCOL.md's HTTP mapping over
//! axum, on top of the shared [`InvokeService`].

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use directcall_cloud::service::{
    HttpReply, InvokeService, Limits, Outcome, MAX_HTTP_REQUEST_BYTES, MAX_QUERY_BYTES,
};
use serde_json::json;

/// The OpenAPI 3 document of the gateway's HTTP API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

#[derive(Clone)]
struct Gateway {
    service: InvokeService,
    tokens: Arc<Vec<Vec<u8>>>,
    openapi: Arc<String>,
}

/// The OpenAPI document with this gateway's timeout limits filled in, so a
/// client (or a schema-driven tester) sees the bounds it will be held to.
fn openapi_for(limits: Limits) -> String {
    let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(OPENAPI) else {
        return OPENAPI.to_owned();
    };
    let max_s = limits.max_timeout.as_secs().max(1);
    let default_s = limits.default_timeout.as_secs().clamp(1, max_s);
    for path in ["/invoke", "/invoke/"] {
        if let Some(params) = doc["paths"][path]["get"]["parameters"].as_array_mut() {
            for p in params.iter_mut().filter(|p| p["name"] == "timeout") {
                p["schema"]["maximum"] = json!(max_s);
                p["schema"]["default"] = json!(default_s);
            }
        }
    }
    doc["components"]["schemas"]["PostBody"]["properties"]["timeout_ms"]["maximum"] =
        json!(u64::try_from(limits.max_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1));
    doc.to_string()
}

/// The gateway's routes. With `tokens`, `/invoke`, `/v1/...` and `/metrics`
/// need `Authorization: Bearer <token>`; `/healthz` and `/openapi.json` never do.
pub fn app(service: InvokeService, tokens: Vec<String>) -> Router {
    let state = Gateway {
        openapi: Arc::new(openapi_for(service.limits())),
        service,
        tokens: Arc::new(tokens.into_iter().map(String::into_bytes).collect()),
    };
    Router::new()
        .route("/invoke", get(invoke_get))
        .route("/invoke/", get(invoke_get))
        .route("/v1/targets/{target}/methods/{method}", post(invoke_post))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting
/// and lets requests in flight finish (each ends by its own deadline) before
/// returning.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Small JSON answers: do not let Nagle hold them back.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn respond(reply: HttpReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Gateway {
    /// A 401 response when tokens are configured and none matches.
    fn denied(&self, headers: &HeaderMap) -> Option<Response> {
        if self.tokens.is_empty() {
            return None;
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        // Check every token, so timing does not tell which one came close.
        let ok = self
            .tokens
            .iter()
            .fold(false, |ok, t| ok | constant_time_eq(presented, t));
        if ok {
            None
        } else {
            self.service.record_refused(Outcome::Unauthorized);
            let mut response = respond(HttpReply::unauthorized());
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(response)
        }
    }

    fn refuse(&self, reply: HttpReply) -> Response {
        let outcome = if reply.status == 413 {
            Outcome::TooLarge
        } else {
            Outcome::Invalid
        };
        self.service.record_refused(outcome);
        respond(reply)
    }
}

async fn invoke_get(
    State(gw): State<Gateway>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let start = Instant::now();
    if let Some(denied) = gw.denied(&headers) {
        return denied;
    }
    let query = query.unwrap_or_default();
    if query.len() > MAX_QUERY_BYTES {
        return gw.refuse(HttpReply::too_large(
            "query string",
            Some(query.len()),
            MAX_QUERY_BYTES,
        ));
    }
    match gw
        .service
        .query_invocation(form_urlencoded::parse(query.as_bytes()), start)
    {
        Ok(invocation) => respond(gw.service.invoke(invocation).await),
        Err(reply) => gw.refuse(reply),
    }
}

async fn invoke_post(
    State(gw): State<Gateway>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    if let Some(denied) = gw.denied(&headers) {
        return denied;
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared.filter(|len| *len > MAX_HTTP_REQUEST_BYTES) {
        return gw.refuse(HttpReply::too_large(
            "body",
            Some(len),
            MAX_HTTP_REQUEST_BYTES,
        ));
    }
    let body: Bytes = match axum::body::to_bytes(body, MAX_HTTP_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => return gw.refuse(HttpReply::too_large("body", None, MAX_HTTP_REQUEST_BYTES)),
    };
    let Ok(Path((target, method))) = path else {
        return gw.refuse(HttpReply::invalid(
            "path",
            "target and method must be UTF-8 path segments",
        ));
    };
    let content_type = match headers.get(header::CONTENT_TYPE).map(|v| v.to_str()) {
        None => None,
        Some(Ok(ct)) => Some(ct),
        Some(Err(_)) => return gw.refuse(HttpReply::invalid("content-type", "not ASCII")),
    };
    match gw
        .service
        .post_invocation(&target, &method, content_type, &body, start)
    {
        Ok(invocation) => respond(gw.service.invoke(invocation).await),
        Err(reply) => gw.refuse(reply),
    }
}

async fn healthz(State(gw): State<Gateway>) -> Response {
    let connected = gw.service.requester().is_connected();
    let (status, body) = if connected {
        (200, json!({"status": "ok", "broker": "connected"}))
    } else {
        (
            503,
            json!({"status": "unavailable", "broker": "disconnected"}),
        )
    };
    respond(HttpReply { status, body })
}

async fn metrics(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    if let Some(denied) = gw.denied(&headers) {
        return denied;
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.service.metrics_text(),
    )
        .into_response()
}

async fn openapi(State(gw): State<Gateway>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        gw.openapi.as_str().to_owned(),
    )
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    respond(HttpReply {
        status: 404,
        body: json!({"result": "not_found", "response": format!("no route {}", uri.path())}),
    })
}

async fn method_not_allowed(uri: Uri) -> Response {
    respond(HttpReply {
        status: 405,
        body: json!({"result": "method_not_allowed", "response": format!("{} does not take this method", uri.path())}),
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: no new requests, letting calls in flight finish");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn the_openapi_document_is_json_with_the_limits_filled_in() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let limits = Limits {
            default_timeout: std::time::Duration::from_secs(2),
            max_timeout: std::time::Duration::from_secs(5),
        };
        let doc: serde_json::Value = serde_json::from_str(&openapi_for(limits)).unwrap();
        let timeout = &doc["paths"]["/invoke"]["get"]["parameters"][3]["schema"];
        assert_eq!(
            (timeout["maximum"].as_u64(), timeout["default"].as_u64()),
            (Some(5), Some(2))
        );
        let ms = &doc["components"]["schemas"]["PostBody"]["properties"]["timeout_ms"]["maximum"];
        assert_eq!(ms.as_u64(), Some(5000));
    }
}
