//! The Lambda front end: the gateway's own axum Router (every route, body
//! and status of `directcall serve`), run behind API Gateway (REST v1 or
//! HTTP API v2) by lambda_http on lambda_runtime, on one MQTT connection
//! made at init and reused by every warm invocation.
//!
//! What only a Lambda needs sits in one middleware around the Router:
//! - the API Gateway stage is stripped from the path, so `/Prod/invoke`
//!   routes like `/invoke`;
//! - each call is capped by the invocation's own deadline (less a margin to
//!   send the response);
//! - after an idle spell longer than the keepalive, the connection is made
//!   anew before the call: a frozen environment sent no keepalive, and its
//!   socket may be dead without knowing it;
//! - answers are buffered, at most [`MAX_ANSWER_BYTES`]: a group call
//!   cannot stream (406 for NDJSON) and is held to what fits
//!   ([`Gateway::buffered`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Request, State};
use axum::http::Uri;
use axum::middleware::Next;
use axum::response::Response;
use clap::Parser;
use directcall_cloud::Requester;
use directcall_core::deadline::unix_millis;
use lambda_http::request::RequestContext;
use lambda_http::RequestExt;
use tower::{Layer, ServiceExt};

use directcall_cloud::gateway::{CallBudget, Gateway};

use crate::cli::{AccessArgs, BrokerArgs, ConfigError, RequesterArgs};

/// Time kept back from the Lambda's own deadline to send the response.
pub const RESPONSE_MARGIN: Duration = Duration::from_millis(250);

/// The largest body the Lambda answers, in bytes: a Lambda's answer is at
/// most 6 MB (6,291,456 bytes), and API Gateway's event carries the body in
/// it as a JSON string, escaped, which can double its size. A group call's
/// answer is held to it: 2,928 results of at most 1 KiB each
/// ([`directcall_cloud::gateway::BUFFERED_RESULT_BYTES`]).
pub const MAX_ANSWER_BYTES: usize = 3_000_000;

/// `directcall-lambda`'s settings: the same broker and requester flags, with
/// the same environment variables, as `directcall serve` (a Lambda reads
/// only the environment).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "directcall-lambda",
    version,
    about = "directcall behind API Gateway: the gateway's routes as an AWS Lambda"
)]
#[non_exhaustive]
pub struct LambdaArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub requester: RequesterArgs,
    /// Timeout of a call that names none, in seconds.
    #[arg(long, env = "DIRECTCALL_DEFAULT_TIMEOUT", default_value_t = 10)]
    pub default_timeout: u64,
    /// Longest timeout a caller may ask for, in seconds (API Gateway REST
    /// ends integrations at 29 s).
    #[arg(long, env = "DIRECTCALL_MAX_TIMEOUT", default_value_t = 29)]
    pub max_timeout: u64,
    /// Make the connection anew before a call after this many seconds idle
    /// [default: the keepalive].
    #[arg(long, env = "DIRECTCALL_IDLE_RECONNECT_SECS")]
    pub idle_reconnect: Option<u64>,
    /// Who may call what (as for `directcall serve`; no SIGHUP reload here).
    #[command(flatten)]
    pub access: AccessArgs,
}

/// How long `init` waits for the broker before the first event.
pub const INIT_WAIT: Duration = Duration::from_secs(5);

struct Environment {
    requester: Requester,
    idle_reconnect: Duration,
    last_done: Mutex<Instant>,
}

/// Why the Lambda could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LambdaError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The requester.
    #[error(transparent)]
    Requester(#[from] directcall_cloud::Error),
    /// The Lambda runtime.
    #[error("Lambda runtime: {0}")]
    Runtime(#[source] lambda_http::Error),
}

/// Connects at init (waiting up to [`INIT_WAIT`]; a broker that is not there
/// yet is waited for within each call's deadline) and serves events until
/// the runtime ends.
///
/// # Errors
/// [`LambdaError`] for an unusable configuration or a runtime failure.
pub async fn run(args: LambdaArgs) -> Result<(), LambdaError> {
    // Before anything records a metric: handles bind to the recorder
    // installed when they are made.
    crate::cli::metrics_handle();
    let broker = args.broker.resolve()?;
    let options = args.requester.options(&broker)?;
    let limits = crate::cli::limits(args.default_timeout, args.max_timeout)?;
    let idle_reconnect = args
        .idle_reconnect
        .map_or(broker.options.keep_alive, Duration::from_secs);
    let requester = Requester::start(options)?;
    if !requester.wait_ready(INIT_WAIT).await {
        tracing::warn!(last_error = ?requester.last_error(), "not connected at init; calls wait for the broker within their deadline");
    }
    let environment = Arc::new(Environment {
        requester: requester.clone(),
        idle_reconnect,
        last_done: Mutex::new(Instant::now()),
    });
    let access = args.access.access().await?;
    let gateway = args.access.apply(
        Gateway::new(requester)
            .limits(limits)
            .metrics(crate::cli::render_metrics)
            .wait_for_broker(true)
            .buffered(MAX_ANSWER_BYTES),
        Arc::new(access),
    );
    let app = axum::middleware::from_fn_with_state(environment, prepare).layer(gateway.app());
    let app = tower::service_fn(move |request: lambda_http::Request| {
        app.clone().oneshot(request.map(axum::body::Body::new))
    });
    lambda_http::run(app).await.map_err(LambdaError::Runtime)
}

/// The path without API Gateway's stage prefix (`/Prod/invoke` → `/invoke`).
fn strip_stage(uri: &Uri, stage: &str) -> Option<Uri> {
    if stage.is_empty() || stage == "$default" {
        return None;
    }
    let prefix = format!("/{stage}");
    let rest = uri.path().strip_prefix(&prefix)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let path = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    Uri::from_parts(parts).ok()
}

async fn prepare(
    State(env): State<Arc<Environment>>,
    mut request: Request,
    next: Next,
) -> Response {
    let stage = match request.request_context_ref() {
        Some(RequestContext::ApiGatewayV1(c)) => c.stage.clone(),
        Some(RequestContext::ApiGatewayV2(c)) => c.stage.clone(),
        _ => None,
    };
    if let Some(uri) = stage.and_then(|s| strip_stage(request.uri(), &s)) {
        *request.uri_mut() = uri;
    }
    if let Some(context) = request.lambda_context_ref() {
        let left = context
            .deadline
            .saturating_sub(unix_millis(SystemTime::now()));
        let budget = Duration::from_millis(left).saturating_sub(RESPONSE_MARGIN);
        request.extensions_mut().insert(CallBudget(budget));
    }
    let idle = env
        .last_done
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .elapsed();
    if idle > env.idle_reconnect {
        tracing::info!(
            idle_s = idle.as_secs(),
            "idle past the keepalive: reconnecting"
        );
        env.requester.reconnect();
    }
    let response = next.run(request).await;
    *env.last_done.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stage_is_stripped_from_the_path() {
        let uri: Uri = "/Prod/invoke?target=a".parse().unwrap();
        assert_eq!(strip_stage(&uri, "Prod").unwrap(), "/invoke?target=a");
        let uri: Uri = "/Prod/v1/targets/car/methods/m".parse().unwrap();
        assert_eq!(
            strip_stage(&uri, "Prod").unwrap(),
            "/v1/targets/car/methods/m"
        );
        assert!(strip_stage(&"/invoke".parse().unwrap(), "Prod").is_none());
        assert!(strip_stage(&"/Production/x".parse().unwrap(), "Prod").is_none());
        assert!(strip_stage(&"/invoke".parse().unwrap(), "$default").is_none());
    }

    #[test]
    fn settings_come_from_the_same_flags_as_serve() {
        let args = LambdaArgs::try_parse_from([
            "directcall-lambda",
            "--broker",
            "mqtt://127.0.0.1:1999",
            "--presence",
            "aws",
        ])
        .unwrap();
        assert_eq!(args.max_timeout, 29);
        let broker = args.broker.resolve().unwrap();
        assert_eq!(broker.options.primary().port, 1999);
        let e = LambdaArgs::try_parse_from([
            "directcall-lambda",
            "--broker",
            "mqtt://h",
            "--max-timeout",
            "x",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("--max-timeout"), "{e}");
        // A certificate without its key is refused at start-up.
        let e = LambdaArgs::try_parse_from([
            "directcall-lambda",
            "--broker",
            "mqtts://h",
            "--cert",
            "/nonexistent",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("--key"), "{e}");
    }
}
