//! The requester's HTTP face (feature `gateway`): PROTOCOL.md's HTTP
//! mapping over axum, as routes a host application mounts in its own
//! router, or as the whole application `directcall serve` runs.
//!
//! [`Gateway::routes`] has no fallback and no process-wide side effect, so
//! a host can `merge` it or `nest` it under a prefix (links it gives, a
//! `Location` or a `call` URL, and its OpenAPI paths follow the prefix).
//! [`Gateway::app`] adds the JSON 404 fallback and the limit gauges, for a
//! process that is only the gateway.
//!
//! Who calls is a [`Caller`]: found by an [`Authenticate`] implementation
//! ([`Access`] is the gateway's own: API tokens, a credentials file, JWTs),
//! or named by a host middleware that puts a `Caller` in the request's
//! extensions. A caller's name owns its idempotency keys and its call
//! records: two callers never replay or read each other's calls.
//!
//! ```no_run
//! use axum::Router;
//! use directcall_cloud::gateway::{Access, Gateway};
//! use directcall_cloud::{BrokerOptions, Options, Requester};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let requester = Requester::connect(Options::new(BrokerOptions::from_url("mqtt://127.0.0.1:1883")?)).await?;
//! let devices = Gateway::new(requester)
//!     .authenticate(Access::new(vec!["s3cret".into()], None)?)
//!     .routes();
//! let app: Router = Router::new().nest("/devices", devices); // and the host's own routes
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! `examples/embed_gateway.rs` is a whole host service: its own
//! authentication middleware, the API under `/devices`, an embedded broker
//! and a simulated device.

mod access;
mod audit;
mod auth;
mod body;
#[cfg(feature = "console")]
mod console;
mod group_records;
mod groups;
mod jwt;
mod limits;
#[cfg(feature = "console")]
mod live;
mod mapping;
mod openapi;
mod routes;
mod serve;
mod state;
mod tls;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

pub use access::{Access, AccessError, CredentialProblem, Credentials, MAX_TOKEN_BYTES};
pub use auth::{Authenticate, Caller, Refusal, Unauthorized};
pub use body::{
    AcceptedBody, BadReplyBody, CallRecordBody, HttpReply, InvokeQuery, MessageBody, OfflineBody,
    OkBody, Outcome, PostBody, TimeoutBody, UnauthorizedBody,
};
#[cfg(feature = "console")]
pub use console::CSP as CONSOLE_CSP;
pub use group_records::MAX_GROUP_RECORD_BYTES;
pub use groups::{BUFFERED_RESULT_BYTES, MAX_GROUP_REQUEST_BYTES, MAX_GROUP_TARGETS};
pub use jwt::{JwtError, JwtVerifier};
#[cfg(feature = "console")]
pub use live::{Console, LogEntry};
pub use mapping::{
    InvalidLimits, InvokeService, Limits, CALLS, CALLS_IN_FLIGHT, CALL_DURATION,
    CALL_DURATION_BUCKETS, DEFAULT_HTTP_TIMEOUT, DEFAULT_MAX_HTTP_TIMEOUT, MAX_HTTP_REQUEST_BYTES,
    MAX_QUERY_BYTES, MIN_TIMEOUT_MS,
};
pub use serve::{serve, serve_tls, Server, Stopped, DEFAULT_SHUTDOWN_TIMEOUT};
pub use state::CallBudget;
pub use tls::{PemError, ServerTls, TlsError};

use crate::Requester;
use limits::TargetLimit;
use state::{GatewayState, MetricsRender, Shared};

/// The gauge of the per-target bound, set by [`Gateway::app`].
pub const LIMIT_TARGET_IN_FLIGHT: &str = "directcall_limit_target_in_flight";

/// What the gateway serves, and how: a builder of its routes.
///
/// ```no_run
/// # async fn run(requester: directcall_cloud::Requester) -> Result<(), Box<dyn std::error::Error>> {
/// use directcall_cloud::gateway::{Gateway, Limits};
///
/// let app = Gateway::new(requester)
///     .limits(Limits::new(10, 29)?)
///     .max_in_flight_per_target(8)
///     .app(); // the routes, a JSON 404 for any other path, the limit gauges
/// # let _ = app; Ok(()) }
/// ```
#[must_use = "a gateway does nothing until its routes are served"]
pub struct Gateway {
    requester: Requester,
    limits: Limits,
    auth: Option<Arc<dyn Authenticate>>,
    target_limit: Option<usize>,
    audit_bodies: bool,
    metrics: Option<MetricsRender>,
    wait_for_broker: bool,
    #[cfg(feature = "console")]
    console: bool,
    base_path: Option<String>,
    buffered: Option<usize>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("limits", &self.limits)
            .field("authenticates", &self.auth.is_some())
            .field("target_limit", &self.target_limit)
            .field("base_path", &self.base_path)
            .field("buffered", &self.buffered)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway calling through `requester`: open (no authentication), no
    /// per-target bound, the default [`Limits`], no `/metrics`, 503 at once
    /// while the broker is away.
    pub fn new(requester: Requester) -> Self {
        Gateway {
            requester,
            limits: Limits::default(),
            auth: None,
            target_limit: None,
            audit_bodies: false,
            metrics: None,
            wait_for_broker: false,
            #[cfg(feature = "console")]
            console: false,
            base_path: None,
            buffered: None,
        }
    }

    /// The timeouts a caller may ask for. Default: [`Limits::default`]
    /// (10 s when none is named, at most 60 s).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Who may call what: every route but the probes (`/healthz`,
    /// `/livez`, `/readyz`) and `/openapi.json`
    /// asks `auth` for the request's [`Caller`], and answers 401 when it
    /// finds none. A `Caller` already in the request's extensions (put
    /// there by a host middleware) is taken as it is. Default: open.
    pub fn authenticate(mut self, auth: impl Authenticate) -> Self {
        self.auth = Some(Arc::new(auth));
        self
    }

    /// At most `max` calls in flight per target; past it, 429 with
    /// `Retry-After`. Default: no bound.
    pub fn max_in_flight_per_target(mut self, max: usize) -> Self {
        self.target_limit = Some(max);
        self
    }

    /// Put request and response bodies in the audit lines. Default: false.
    pub fn audit_bodies(mut self, on: bool) -> Self {
        self.audit_bodies = on;
        self
    }

    /// Serve `GET /metrics` (behind the same authentication as calls),
    /// answering what `render` returns (Prometheus text). Default: no such
    /// route.
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// Wait for the broker within each call's own deadline instead of
    /// answering 503 at once (the Lambda: a frozen, then thawed,
    /// environment reconnects first). Default: false.
    pub fn wait_for_broker(mut self, wait: bool) -> Self {
        self.wait_for_broker = wait;
        self
    }

    /// Serve the web console at `/`, with `/v1/devices` and the event
    /// stream `/v1/events` (docs/console.md). Its page names its assets by
    /// absolute paths: serve it from an app at the root, not nested.
    /// Default: false.
    #[cfg(feature = "console")]
    #[cfg_attr(docsrs, doc(cfg(feature = "console")))]
    pub fn console(mut self, on: bool) -> Self {
        self.console = on;
        self
    }

    /// The path the API is reached under (`/devices`), for the links it
    /// gives and its OpenAPI document, when a proxy or the host strips it
    /// before the request reaches the routes. Routes nested with
    /// `Router::nest` find their prefix on their own. Default: none.
    pub fn base_path(mut self, path: impl Into<String>) -> Self {
        let path = path.into();
        let path = path.trim_end_matches('/');
        self.base_path = Some(if path.is_empty() || path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        });
        self
    }

    /// The front end in front of these routes buffers each answer whole,
    /// at most `max_answer_bytes` (API Gateway in front of the Lambda):
    /// a group call asked for NDJSON is 406, `Prefer: respond-async` on
    /// one is ignored (a frozen environment runs nothing after its
    /// answer), and its answer is held to fit: each device's result to
    /// [`BUFFERED_RESULT_BYTES`] (a longer `response` is left out, saying
    /// so), a list to as many devices as fit (413 past it), and the
    /// results of a glob or a group past that many left out (counted in
    /// `omitted` and in the summary). Default: answers are streamed as
    /// they are made.
    pub fn buffered(mut self, max_answer_bytes: usize) -> Self {
        self.buffered = Some(max_answer_bytes);
        self
    }

    fn state(self) -> GatewayState {
        let service = InvokeService::new(self.requester, self.limits);
        #[cfg(feature = "console")]
        let console = self.console.then(Console::new);
        #[cfg(feature = "console")]
        let service = match &console {
            Some(c) => {
                let c = Arc::clone(c);
                service.observed(Arc::new(move |outcome, latency| c.count(outcome, latency)))
            }
            None => service,
        };
        #[cfg(feature = "console")]
        let with_console = console.is_some();
        #[cfg(not(feature = "console"))]
        let with_console = false;
        let (limits, with_metrics, buffered) = (self.limits, self.metrics.is_some(), self.buffered);
        let openapi_at =
            move |base: &str| openapi::document(limits, with_metrics, with_console, buffered, base);
        let group_records = service.requester().record_options().map(|options| {
            Arc::new(group_records::GroupRecords::new(
                options,
                group_records::MAX_GROUP_RECORD_BYTES,
            ))
        });
        GatewayState(Arc::new(Shared {
            openapi: openapi_at(self.base_path.as_deref().unwrap_or_default()),
            openapi_at: Arc::new(openapi_at),
            service,
            auth: self.auth,
            target_limit: self.target_limit.map(TargetLimit::new),
            group_records,
            buffered: self.buffered,
            audit_bodies: self.audit_bodies,
            metrics: self.metrics,
            wait_for_broker: self.wait_for_broker,
            base_path: self.base_path,
            #[cfg(feature = "console")]
            console,
        }))
    }

    /// The API's routes, for a host to `merge` or `nest` into its own
    /// router: no fallback, no process-wide side effect. A route that does
    /// not take the request's method answers 405 with a JSON body.
    pub fn routes(self) -> Router {
        Self::routes_of(self.state())
    }

    fn routes_of(state: GatewayState) -> Router {
        let mut router = Router::new()
            .route("/invoke", get(routes::invoke_get))
            .route("/invoke/", get(routes::invoke_get_slash))
            .route(
                "/v1/targets/{target}/methods/{method}",
                post(routes::invoke_post),
            )
            .route("/v1/calls/{id}", get(routes::call_record))
            .route("/v1/methods/{method}", post(groups::invoke_group))
            .route("/v1/groups/{id}", get(groups::group_record))
            .route("/healthz", get(routes::healthz))
            .route("/livez", get(routes::livez))
            .route("/readyz", get(routes::readyz))
            .route("/openapi.json", get(routes::openapi));
        if state.metrics.is_some() {
            router = router.route("/metrics", get(routes::metrics));
        }
        #[cfg(feature = "console")]
        if state.console.is_some() {
            router = router
                .route("/", get(console::console_asset))
                .route("/console/{*path}", get(console::console_asset))
                .route("/v1/devices", get(console::devices))
                .route("/v1/events", get(console::events));
        }
        router
            .method_not_allowed_fallback(routes::method_not_allowed)
            .with_state(state)
    }

    /// The whole application of a process that is only the gateway
    /// (`directcall serve`): [`routes`](Self::routes), a JSON 404 for any
    /// other path, and the gauge of the per-target bound
    /// ([`LIMIT_TARGET_IN_FLIGHT`]) set in the `metrics` recorder.
    pub fn app(self) -> Router {
        if let Some(max) = self.target_limit {
            metrics::gauge!(LIMIT_TARGET_IN_FLIGHT).set(max as f64);
        }
        self.routes().fallback(routes::not_found)
    }
}
