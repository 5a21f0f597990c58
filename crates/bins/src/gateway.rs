//! The HTTP gateway: PROTOCOL.md's HTTP mapping over axum, on top of
//! [`InvokeService`]. `directcall serve` listens with it, and
//! `directcall-lambda` runs the very same Router behind API Gateway
//! (lambda_http), so both answer alike by construction.
//!
//! The OpenAPI document is derived from the handlers and body types below
//! (utoipa), served at `/openapi.json` with this instance's limits filled in.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use directcall_cloud::Invocation;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

use crate::access::{Access, Credential, Refusal, TargetLimit, TargetSlot, MAX_TOKEN_BYTES};
use crate::console::{
    console_asset, devices, events, Console, DeviceBody, DevicesBody, LogEntry, RecentTarget,
};
use crate::service::{
    AcceptedBody, CallRecordBody, HttpReply, InvokeQuery, InvokeService, Limits, MessageBody,
    OfflineBody, OkBody, Outcome, PostBody, TimeoutBody, UnauthorizedBody, MAX_HTTP_REQUEST_BYTES,
    MAX_QUERY_BYTES,
};

/// The longest a call may still take, set per request by a front end that
/// has a deadline of its own (the Lambda's invocation deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallBudget(pub Duration);

/// What the gateway serves, and how.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// The call path.
    pub service: InvokeService,
    /// Who may call what: when it holds any credential, calls, records and
    /// `/metrics` need `Authorization: Bearer <secret>`.
    pub access: Option<Arc<Access>>,
    /// At most this many calls in flight per target (`None`: no bound).
    pub target_limit: Option<usize>,
    /// Put the request and the response in each audit line. Default: false.
    pub audit_bodies: bool,
    /// Renders `/metrics`; `None` serves no such route (nor documents one).
    pub metrics: Option<PrometheusHandle>,
    /// Wait for the broker connection within each call's own deadline
    /// instead of answering 503 at once (the Lambda: a frozen, then thawed,
    /// environment reconnects first). Default: false.
    pub wait_for_broker: bool,
    /// Serve the web console at `/`, with `/v1/devices` and the event
    /// stream `/v1/events` (docs/console.md). Default: false; `directcall
    /// serve` turns it on unless `--no-console`.
    pub console: bool,
}

impl GatewayConfig {
    /// A gateway for `service`: no tokens, no `/metrics`, 503 at once while
    /// the broker is away.
    pub fn new(service: InvokeService) -> Self {
        GatewayConfig {
            service,
            access: None,
            target_limit: None,
            audit_bodies: false,
            metrics: None,
            wait_for_broker: false,
            console: false,
        }
    }

    /// Serve the web console at `/` (and `/v1/devices`, `/v1/events`).
    pub fn console(mut self, on: bool) -> Self {
        self.console = on;
        self
    }

    /// Require one of `tokens` as a bearer token (empty ones are ignored),
    /// each allowed everything.
    pub fn tokens(mut self, tokens: Vec<String>) -> Self {
        self.access = Access::new(tokens, None).ok().map(Arc::new);
        self
    }

    /// Require a credential of `access` (scopes, rates; reloadable).
    pub fn access(mut self, access: Arc<Access>) -> Self {
        self.access = Some(access);
        self
    }

    /// At most `max` calls in flight per target; past it, 429.
    pub fn target_limit(mut self, max: usize) -> Self {
        self.target_limit = Some(max);
        self
    }

    /// Put request and response bodies in the audit lines.
    pub fn audit_bodies(mut self, on: bool) -> Self {
        self.audit_bodies = on;
        self
    }

    /// Serve `/metrics` from `handle`.
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Wait for the broker within each call's deadline (default: 503 at once).
    pub fn wait_for_broker(mut self, wait: bool) -> Self {
        self.wait_for_broker = wait;
        self
    }
}

#[derive(Clone)]
pub(crate) struct Gateway {
    pub(crate) service: InvokeService,
    access: Option<Arc<Access>>,
    target_limit: Option<Arc<TargetLimit>>,
    audit_bodies: bool,
    metrics: Option<PrometheusHandle>,
    openapi: Arc<String>,
    wait_for_broker: bool,
    pub(crate) console: Option<Arc<Console>>,
}

/// Fires when the server begins to shut down: the event streams end then,
/// so a graceful shutdown does not wait for open consoles.
#[derive(Clone)]
pub(crate) struct Closing(pub(crate) tokio::sync::watch::Receiver<bool>);

/// `app` with a [`Closing`] signal, and the future that fires it after
/// `shutdown`.
fn with_closing(
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Router, impl Future<Output = ()> + Send + 'static) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = tx.send(true);
    };
    (app.layer(Extension(Closing(rx))), shutdown)
}

/// `{"status": "ok"|"unavailable", "broker": "connected"|"disconnected"}`.
#[derive(Debug, Serialize, ToSchema)]
struct HealthBody {
    /// `ok` when the broker connection is up and subscribed.
    #[schema(pattern = "^(ok|unavailable)$")]
    status: &'static str,
    /// `connected` or `disconnected`.
    #[schema(pattern = "^(connected|disconnected)$")]
    broker: &'static str,
    /// The broker in use, as a URL without credentials.
    broker_url: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "directcall gateway",
        version = "1",
        description = "Synchronous calls to MQTT devices over HTTP (PROTOCOL.md, HTTP mapping). Every body is JSON."
    ),
    paths(invoke_get, invoke_get_slash, invoke_post, call_record, crate::console::devices, crate::console::events, healthz, metrics, openapi),
    components(schemas(OkBody, TimeoutBody, OfflineBody, MessageBody, UnauthorizedBody, HealthBody, PostBody, CallRecordBody, AcceptedBody, DevicesBody, DeviceBody, RecentTarget)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Required only when the gateway runs with --api-token.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document of the gateway, with `limits` filled in so a client
/// (or a schema-driven tester) sees the bounds it will be held to, and
/// without `/metrics` or the console's routes when the gateway serves none.
pub fn openapi_json(limits: Limits, with_metrics: bool, with_console: bool) -> String {
    let Ok(mut doc) = serde_json::to_value(ApiDoc::openapi()) else {
        return String::new();
    };
    if let Some(paths) = doc["paths"].as_object_mut() {
        if !with_metrics {
            paths.remove("/metrics");
        }
        if !with_console {
            paths.remove("/v1/devices");
            paths.remove("/v1/events");
        }
    }
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
    if let Some(params) = doc["paths"]["/v1/calls/{id}"]["get"]["parameters"].as_array_mut() {
        for p in params.iter_mut().filter(|p| p["name"] == "wait") {
            p["schema"]["maximum"] = json!(max_s);
        }
    }
    let max_ms = u64::try_from(limits.max_timeout.as_millis()).unwrap_or(u64::MAX);
    doc["components"]["schemas"]["PostBody"]["properties"]["timeout_ms"]["maximum"] = json!(max_ms);
    doc.to_string()
}

/// The gateway's routes. With tokens, `/invoke`, `/v1/...` and `/metrics`
/// need `Authorization: Bearer <token>`; `/healthz` and `/openapi.json`
/// never do.
pub fn app(config: GatewayConfig) -> Router {
    let console = config.console.then(Console::new);
    let service = match &console {
        Some(c) => config.service.with_console(Arc::clone(c)),
        None => config.service,
    };
    let state = Gateway {
        openapi: Arc::new(openapi_json(
            service.limits(),
            config.metrics.is_some(),
            console.is_some(),
        )),
        access: config.access,
        target_limit: config.target_limit.map(TargetLimit::new),
        audit_bodies: config.audit_bodies,
        metrics: config.metrics,
        wait_for_broker: config.wait_for_broker,
        service,
        console,
    };
    if let Some(limit) = &state.target_limit {
        metrics::gauge!("directcall_limit_target_in_flight").set(limit.max() as f64);
    }
    if let Some(access) = &state.access {
        for c in access.current().iter() {
            if let Some((rate, _)) = c.rate() {
                metrics::gauge!("directcall_limit_credential_calls_per_second", "credential" => c.name().to_owned())
                    .set(f64::from(rate));
            }
        }
    }
    let mut router = Router::new()
        .route("/invoke", get(invoke_get))
        .route("/invoke/", get(invoke_get_slash))
        .route("/v1/targets/{target}/methods/{method}", post(invoke_post))
        .route("/v1/calls/{id}", get(call_record))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi));
    if state.metrics.is_some() {
        router = router.route("/metrics", get(metrics));
    }
    if state.console.is_some() {
        router = router
            .route("/", get(console_asset))
            .route("/console/{*path}", get(console_asset))
            .route("/v1/devices", get(devices))
            .route("/v1/events", get(events));
    }
    router
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
    let (app, shutdown) = with_closing(app, shutdown);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// TLS for the gateway's listener: its certificate chain and key (PEM),
/// and, to require client certificates, the CA they must chain to.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// From PEM: the certificate chain, its key, and optionally the CA that
    /// client certificates must chain to (then every client must show one).
    ///
    /// # Errors
    /// What is wrong with the material, in words.
    pub fn from_pem(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate: {e}"))?;
        if certs.is_empty() {
            return Err("certificate: no PEM certificate found".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("key: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match client_ca {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(pem) {
                    roots
                        .add(c.map_err(|e| format!("client CA: {e}"))?)
                        .map_err(|e| format!("client CA: {e}"))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| format!("client CA: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("certificate and key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }
}

/// [`serve`] over TLS: HTTP/1.1 and HTTP/2 (ALPN) on each accepted
/// connection. On `shutdown` it stops accepting and lets the connections
/// finish their requests in flight (at most 30 s).
///
/// # Errors
/// When the listener fails.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: ServerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config);
    let (app, shutdown) = with_closing(app, shutdown);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "TLS handshake: {e}");
                    return;
                }
            };
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().oneshot(request.map(Body::new))
                },
            );
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(connection.into_owned()).await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    Ok(())
}

/// A middleware that caps every call at `budget(request)`: for a front end
/// with a deadline of its own.
pub async fn with_budget(
    budget: impl Fn(&Request) -> Option<Duration>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Some(b) = budget(&request) {
        request.extensions_mut().insert(CallBudget(b));
    }
    next.run(request).await
}

/// Who is calling: their credential (none when the gateway has none) and
/// address (none behind API Gateway).
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) credential: Option<Arc<Credential>>,
    source: Option<SocketAddr>,
}

/// The audit line of one call: who, from where, what, how it ended. Bodies
/// only with `--audit-bodies`; never a secret.
fn audit(
    caller: &Caller,
    (target, method): &(directcall_core::Target, directcall_core::Method),
    reply: &HttpReply,
    started: Instant,
    request: Option<&serde_json::Value>,
    with_response: bool,
) {
    let credential = caller.credential.as_ref().map_or("-", |c| c.name());
    let source = caller.source.map(|a| a.to_string());
    let id = reply.body["id"].as_str().unwrap_or("-");
    let outcome = reply.body["result"].as_str().unwrap_or("-");
    let status = reply.body["status"].as_u64();
    let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let request = request.map(ToString::to_string);
    let response = with_response.then(|| reply.body["response"].to_string());
    tracing::info!(
        target: "directcall::audit",
        credential,
        source = source.as_deref().unwrap_or("-"),
        target_device = target.as_str(),
        method = method.as_str(),
        outcome,
        http_status = reply.status,
        device_status = status,
        latency_ms,
        id,
        request,
        response,
        "call"
    );
}

pub(crate) fn respond(reply: HttpReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body.to_string()).into_response();
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

/// Whether the request says `Prefer: respond-async` (RFC 7240).
fn prefers_async(headers: &HeaderMap) -> bool {
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

/// The `Idempotency-Key` header, scoped to the caller's credential (so two
/// callers never share a key), or a 400 naming it.
fn idempotency_key(
    headers: &HeaderMap,
    caller: &Caller,
) -> Result<Option<(String, String)>, HttpReply> {
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
    if key.is_empty() || key.len() > directcall_cloud::MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(invalid("must be 1 to 255 characters"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "may hold only visible ASCII characters (no spaces)",
        ));
    }
    let scope = match &caller.credential {
        Some(c) => format!("credential:{}", c.name()),
        None => "anyone".to_owned(),
    };
    Ok(Some((scope, key.to_owned())))
}

impl Gateway {
    /// The caller's credential (`None` when no credentials are set), or a
    /// 401 response.
    pub(crate) fn authenticate(
        &self,
        headers: &HeaderMap,
        connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    ) -> Result<Caller, Box<Response>> {
        let source = connect.map(|Extension(ConnectInfo(addr))| addr);
        let Some(access) = self.access.as_ref().filter(|a| a.is_required()) else {
            return Ok(Caller {
                credential: None,
                source,
            });
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        let verdict = if presented.len() > MAX_TOKEN_BYTES {
            Err(format!("bearer token over {MAX_TOKEN_BYTES} bytes"))
        } else {
            access.authenticate(presented)
        };
        match verdict {
            Ok(credential) => Ok(Caller {
                credential: Some(credential),
                source,
            }),
            Err(why) => {
                self.service.record_refused(Outcome::Unauthorized);
                // No token at all: nothing more to say than the status.
                let reply = if presented.is_empty() {
                    HttpReply::unauthorized()
                } else {
                    HttpReply::unauthorized_because(why)
                };
                let mut response = respond(reply);
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Err(Box::new(response))
            }
        }
    }

    /// Whether the caller may make this call now: its scope (403), its rate
    /// and the target's calls in flight (429). The slot is held for the
    /// call's life.
    fn admit(
        &self,
        caller: &Caller,
        invocation: &Invocation,
    ) -> Result<Option<TargetSlot>, HttpReply> {
        let (target, method) = (
            invocation.get_target().as_str(),
            invocation.get_method().as_str(),
        );
        let refused = |r: Refusal| match r {
            Refusal::Forbidden(m) => HttpReply::message(Outcome::Forbidden, m),
            Refusal::Limited(m, wait) => HttpReply::limited(m, wait),
        };
        if let Some(c) = &caller.credential {
            c.allows(target, method).map_err(refused)?;
            c.take().map_err(refused)?;
        }
        match &self.target_limit {
            Some(limit) => limit.enter(target).map(Some).map_err(refused),
            None => Ok(None),
        }
    }

    fn refuse(&self, reply: HttpReply) -> Response {
        self.service
            .record_refused(reply.outcome().unwrap_or(Outcome::Invalid));
        respond(reply)
    }

    /// Runs a parsed call within its budget, if the caller may make it, and
    /// writes its audit line. `asynchronous`: answers 202 once the request
    /// is published (the call then runs on its own; its target slot is held
    /// until the 202).
    async fn call(
        &self,
        caller: &Caller,
        invocation: Invocation,
        budget: Option<Extension<CallBudget>>,
        asynchronous: bool,
    ) -> Response {
        let started = Instant::now();
        let names = (
            invocation.get_target().clone(),
            invocation.get_method().clone(),
        );
        let request = self.audit_bodies.then(|| invocation.get_request().clone());
        let slot = match self.admit(caller, &invocation) {
            Ok(slot) => slot,
            Err(reply) => {
                self.finished(caller, names, &reply, started, request.as_ref(), false);
                return self.refuse(reply);
            }
        };
        let reply = if asynchronous {
            self.service.submit(invocation).await
        } else {
            self.run(invocation, budget).await
        };
        drop(slot);
        self.finished(
            caller,
            names,
            &reply,
            started,
            request.as_ref(),
            self.audit_bodies,
        );
        respond(reply)
    }

    /// The end of a call: its audit line, and its line in the console's
    /// live log.
    fn finished(
        &self,
        caller: &Caller,
        names: (directcall_core::Target, directcall_core::Method),
        reply: &HttpReply,
        started: Instant,
        request: Option<&serde_json::Value>,
        with_response: bool,
    ) {
        audit(caller, &names, reply, started, request, with_response);
        if let Some(console) = &self.console {
            let (target, method) = names;
            let mut entry = LogEntry::new(
                target.as_str(),
                method.as_str(),
                reply.body["result"].as_str().unwrap_or("-"),
                reply.status,
                started.elapsed(),
            );
            entry.id = reply.body["id"].as_str().map(str::to_owned);
            entry.device_status = reply.body["status"].as_u64();
            if let Some(c) = &caller.credential {
                c.name().clone_into(&mut entry.credential);
            }
            console.log(entry);
        }
    }

    async fn run(
        &self,
        invocation: Invocation,
        budget: Option<Extension<CallBudget>>,
    ) -> HttpReply {
        let invocation = match budget {
            Some(Extension(CallBudget(b))) => {
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
            requester.wait_ready(left).await;
        }
        self.service.invoke(invocation).await
    }
}

/// Call a method on a device (the seed's form).
#[utoipa::path(
    get,
    path = "/invoke",
    params(InvokeQuery, ("Idempotency-Key" = Option<String>, Header, description = "Makes the call idempotent: the same key with the same call while it runs waits for its outcome, and after it gets the stored outcome (with `Idempotent-Replayed: true`), for the record retention; with another call, 409. Scoped to the caller's token.", min_length = 1, max_length = 255, pattern = "^[!-~]+$")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The device answered (its own verdict is `status`).", body = OkBody),
        (status = 400, description = "A parameter is missing or invalid; nothing was published.", body = MessageBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
        (status = 404, description = "The target is known to be offline (a presence record says so, or on MQTT 5 the broker found no device subscribed); nothing reached a device.", body = OfflineBody),
        (status = 403, description = "The credential may not call this target or method; nothing was published.", body = MessageBody),
        (status = 409, description = "The Idempotency-Key was used for a different call; nothing was published.", body = MessageBody),
        (status = 429, description = "Over the credential's rate or the target's calls in flight; nothing was published. `Retry-After` says when to try again.", body = MessageBody,
            headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 413, description = "The query string is too large.", body = MessageBody),
        (status = 503, description = "No broker connection; nothing was published.", body = MessageBody),
        (status = 504, description = "No answer before the deadline.", body = TimeoutBody),
    )
)]
async fn invoke_get(
    State(gw): State<Gateway>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    budget: Option<Extension<CallBudget>>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Response {
    let start = Instant::now();
    let caller = match gw.authenticate(&headers, connect) {
        Ok(caller) => caller,
        Err(denied) => return *denied,
    };
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
        Ok(invocation) => match idempotency_key(&headers, &caller) {
            Ok(key) => {
                gw.call(
                    &caller,
                    keyed(traced(invocation, &headers), key),
                    budget,
                    false,
                )
                .await
            }
            Err(reply) => gw.refuse(reply),
        },
        Err(reply) => gw.refuse(reply),
    }
}

/// Call a method on a device (the seed's form, with API Gateway's trailing slash).
#[utoipa::path(
    get,
    path = "/invoke/",
    params(InvokeQuery, ("Idempotency-Key" = Option<String>, Header, description = "Makes the call idempotent: the same key with the same call while it runs waits for its outcome, and after it gets the stored outcome (with `Idempotent-Replayed: true`), for the record retention; with another call, 409. Scoped to the caller's token.", min_length = 1, max_length = 255, pattern = "^[!-~]+$")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The device answered (its own verdict is `status`).", body = OkBody),
        (status = 400, description = "A parameter is missing or invalid; nothing was published.", body = MessageBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
        (status = 404, description = "The target is known to be offline (a presence record says so, or on MQTT 5 the broker found no device subscribed); nothing reached a device.", body = OfflineBody),
        (status = 403, description = "The credential may not call this target or method; nothing was published.", body = MessageBody),
        (status = 409, description = "The Idempotency-Key was used for a different call; nothing was published.", body = MessageBody),
        (status = 429, description = "Over the credential's rate or the target's calls in flight; nothing was published. `Retry-After` says when to try again.", body = MessageBody,
            headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 413, description = "The query string is too large.", body = MessageBody),
        (status = 503, description = "No broker connection; nothing was published.", body = MessageBody),
        (status = 504, description = "No answer before the deadline.", body = TimeoutBody),
    )
)]
async fn invoke_get_slash(
    state: State<Gateway>,
    query: RawQuery,
    headers: HeaderMap,
    budget: Option<Extension<CallBudget>>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Response {
    invoke_get(state, query, headers, budget, connect).await
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
        (status = 404, description = "The target is known to be offline (a presence record says so, or on MQTT 5 the broker found no device subscribed); nothing reached a device.", body = OfflineBody),
        (status = 403, description = "The credential may not call this target or method; nothing was published.", body = MessageBody),
        (status = 409, description = "The Idempotency-Key was used for a different call; nothing was published.", body = MessageBody),
        (status = 429, description = "Over the credential's rate or the target's calls in flight; nothing was published. `Retry-After` says when to try again.", body = MessageBody,
            headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 413, description = "The body is over 128 KiB.", body = MessageBody),
        (status = 503, description = "No broker connection; nothing was published.", body = MessageBody),
        (status = 504, description = "No answer before the deadline.", body = TimeoutBody),
    )
)]
async fn invoke_post(
    State(gw): State<Gateway>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    budget: Option<Extension<CallBudget>>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Body,
) -> Response {
    let start = Instant::now();
    let caller = match gw.authenticate(&headers, connect) {
        Ok(caller) => caller,
        Err(denied) => return *denied,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // The same answer whether the length was declared or found by reading
    // (API Gateway declares none to the Lambda).
    if declared.is_some_and(|len| len > MAX_HTTP_REQUEST_BYTES) {
        return gw.refuse(HttpReply::too_large("body", None, MAX_HTTP_REQUEST_BYTES));
    }
    let body: Bytes = match axum::body::to_bytes(body, MAX_HTTP_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => return gw.refuse(HttpReply::too_large("body", None, MAX_HTTP_REQUEST_BYTES)),
    };
    // axum percent-decodes path segments (not form-decodes: `+` stays `+`,
    // and is then refused as a name).
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
        Ok(invocation) => match idempotency_key(&headers, &caller) {
            Ok(key) => {
                let invocation = keyed(traced(invocation, &headers), key);
                // Without records there is nowhere to learn the outcome:
                // the preference is ignored, as RFC 7240 allows.
                let asynchronous =
                    prefers_async(&headers) && gw.service.requester().record_options().is_some();
                gw.call(&caller, invocation, budget, asynchronous).await
            }
            Err(reply) => gw.refuse(reply),
        },
        Err(reply) => gw.refuse(reply),
    }
}

/// The call made idempotent under the caller's key, if it gave one.
fn keyed(invocation: Invocation, key: Option<(String, String)>) -> Invocation {
    match key {
        Some((scope, key)) => invocation.idempotency_scope(scope).idempotency_key(key),
        None => invocation,
    }
}

/// The caller's W3C `traceparent` header, passed on to the device when it
/// is valid; an invalid one is ignored, as the W3C recommendation says (a
/// receiver that cannot parse it starts a new trace).
fn traced(
    invocation: directcall_cloud::Invocation,
    headers: &HeaderMap,
) -> directcall_cloud::Invocation {
    match headers.get("traceparent").map(HeaderValue::to_str) {
        Some(Ok(value)) if directcall_core::trace::check_traceparent(value).is_ok() => {
            invocation.traceparent(value)
        }
        Some(_) => {
            tracing::debug!("ignored an invalid traceparent header");
            invocation
        }
        None => invocation,
    }
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
async fn healthz(State(gw): State<Gateway>) -> Response {
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
    respond(HttpReply {
        status: if connected { 200 } else { 503 },
        body: serde_json::to_value(body).unwrap_or_default(),
        replayed: false,
        location: None,
        retry_after: None,
    })
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
async fn metrics(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    if let Err(denied) = gw.authenticate(&headers, None) {
        return *denied;
    }
    let text = gw.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "The OpenAPI 3 document.", content_type = "application/json", body = Object))
)]
async fn openapi(State(gw): State<Gateway>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        gw.openapi.as_str().to_owned(),
    )
        .into_response()
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
async fn call_record(
    State(gw): State<Gateway>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    budget: Option<Extension<CallBudget>>,
) -> Response {
    let caller = match gw.authenticate(&headers, None) {
        Ok(caller) => caller,
        Err(denied) => return *denied,
    };
    let Ok(Path(id)) = path else {
        return gw.refuse(HttpReply::invalid("id", "not valid in a path"));
    };
    let max = gw.service.limits().max_timeout.as_secs().max(1);
    let mut wait = Duration::ZERO;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if name == "wait" {
            match value.parse::<u64>() {
                Ok(s) if s <= max => wait = Duration::from_secs(s),
                _ => {
                    return gw.refuse(HttpReply::invalid(
                        "wait",
                        format!("must be whole seconds from 0 to {max}"),
                    ))
                }
            }
        }
    }
    // Never past a front end's own deadline (the Lambda's).
    if let Some(Extension(CallBudget(b))) = budget {
        wait = wait.min(b);
    }
    let reply = gw.service.wait_call_record(&id, wait).await;
    // A record of a call outside the caller's scope is not its to read.
    if let (Some(c), Some(t), Some(m)) = (
        &caller.credential,
        reply.body["target"].as_str(),
        reply.body["method"].as_str(),
    ) {
        if let Err(Refusal::Forbidden(message)) = c.allows(t, m) {
            return gw.refuse(HttpReply::message(Outcome::Forbidden, message));
        }
    }
    respond(reply)
}

async fn not_found(uri: Uri) -> Response {
    respond(HttpReply::not_found(uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> Response {
    respond(HttpReply::method_not_allowed(uri.path(), method.as_str()))
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
    fn the_openapi_document_has_every_route_and_the_limits() {
        let limits = Limits::new(2, 5).unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&openapi_json(limits, true, true)).unwrap();
        let without: serde_json::Value =
            serde_json::from_str(&openapi_json(limits, false, false)).unwrap();
        assert!(without["paths"].get("/metrics").is_none());
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for p in [
            "/invoke",
            "/invoke/",
            "/v1/targets/{target}/methods/{method}",
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/v1/devices",
            "/v1/events",
        ] {
            assert!(paths.contains(&p), "{p} missing from {paths:?}");
        }
        for p in ["/v1/devices", "/v1/events"] {
            assert!(without["paths"].get(p).is_none(), "{p} without a console");
        }
        let timeout = doc["paths"]["/invoke"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "timeout")
            .unwrap();
        assert_eq!(
            (
                timeout["schema"]["maximum"].as_u64(),
                timeout["schema"]["default"].as_u64()
            ),
            (Some(5), Some(2))
        );
        let ms = &doc["components"]["schemas"]["PostBody"]["properties"]["timeout_ms"]["maximum"];
        assert_eq!(ms.as_u64(), Some(5000));
        let responses = doc["paths"]["/invoke"]["get"]["responses"]
            .as_object()
            .unwrap();
        let mut codes: Vec<&str> = responses.keys().map(String::as_str).collect();
        codes.sort_unstable();
        assert_eq!(
            codes,
            ["200", "400", "401", "403", "404", "409", "413", "429", "503", "504"]
        );
    }
}
