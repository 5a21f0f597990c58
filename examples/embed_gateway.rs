//! A backend team's own axum service, with directcall's HTTP API mounted
//! under `/devices`, behind the team's own authentication.
//!
//! The team names its tenants by `x-api-key`; its middleware puts the
//! tenant's [`Caller`] into the request, and the gateway takes it from
//! there: each tenant's idempotency keys and call records are its own.
//! An embedded broker and a simulated car run in this same process, so it
//! needs nothing installed:
//!
//! ```text
//! cargo run --release -p directcall-bins --example embed_gateway
//! ```
//!
//! It makes one call with a key (200) and one without (401), prints both
//! statuses, and exits 0 when they are those.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use directcall_cloud::gateway::{Caller, Gateway};
use directcall_cloud::{Options, RecordOptions, Requester};
use directcall_device::{serve, DeviceOptions, Target};
use directcall_testkit::EmbeddedBroker;
use serde_json::json;

/// The team's tenants, by API key. One `Caller` per tenant, cloned into
/// each request.
pub(crate) type Tenants = Arc<HashMap<String, Caller>>;

/// The two tenants of this example: `team-a` may call anything, `team-b`
/// only the cars.
pub(crate) fn tenants() -> Tenants {
    Arc::new(HashMap::from([
        ("key-a".to_owned(), Caller::new("team-a")),
        (
            "key-b".to_owned(),
            Caller::new("team-b").scope([("car-*", "*")]),
        ),
    ]))
}

/// The team's authentication: `x-api-key` names the tenant, or 401.
pub(crate) async fn authenticate(
    State(tenants): State<Tenants>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = request
        .headers()
        .get("x-api-key")
        .and_then(|key| key.to_str().ok())
        .and_then(|key| tenants.get(key));
    match caller {
        Some(caller) => {
            let caller = caller.clone();
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        None => (StatusCode::UNAUTHORIZED, "an x-api-key is required\n").into_response(),
    }
}

/// The team's service: its own routes, and directcall's under `/devices`,
/// behind its middleware.
pub(crate) fn host_app(requester: Requester, tenants: Tenants) -> Router {
    let devices = Gateway::new(requester)
        .routes()
        .layer(middleware::from_fn_with_state(tenants, authenticate));
    Router::new()
        .route("/", get(|| async { "the team's own service\n" }))
        .nest("/devices", devices)
}

#[allow(dead_code)] // a test of this example includes the file and calls the functions above
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A broker and a car, in this process.
    let broker = EmbeddedBroker::start(None)?;
    let car = directcall_device::Router::new().method("windows_down", |call| async move {
        Ok(json!({ "windows": "down", "asked": call.request }))
    });
    let device = serve(
        car,
        DeviceOptions::new(broker.options(), Target::new("car-1")?),
    )
    .await?;

    // The team's service, with call records on (GET /devices/v1/calls/{id}).
    let options = Options::new(broker.options()).record_calls(RecordOptions::default());
    let requester = Requester::connect(options).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = host_app(requester.clone(), tenants());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let url = format!("http://{addr}/devices/v1/targets/car-1/methods/windows_down");
    let body = r#"{"request": {"percent": 50}, "timeout_ms": 3000}"#;
    let with_key = post(&url, Some("key-a"), body).await?;
    let without = post(&url, None, body).await?;
    println!("POST {url}");
    println!("  with x-api-key:    {} {}", with_key.0, with_key.1.trim());
    println!("  without x-api-key: {} {}", without.0, without.1.trim());

    server.abort();
    requester.shutdown().await;
    device.shutdown().await;
    if (with_key.0, without.0) == (200, 401) {
        Ok(())
    } else {
        Err("expected 200 with the key and 401 without".into())
    }
}

/// A POST with an optional API key: its status and body.
#[allow(dead_code)]
async fn post(
    url: &str,
    key: Option<&str>,
    body: &'static str,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let mut request = axum::http::Request::post(url).header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(request.body(Full::from(body))?),
    )
    .await??;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
