//! The web console's routes: its page and embedded assets, the device list
//! `GET /v1/devices`, and the live event stream `GET /v1/events`.
//!
//! All of it is off unless the gateway serves the console: no route, and no
//! bookkeeping on the call path.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::body::{HttpReply, UnauthorizedBody};
use super::live::{recently_called, Logged, RecentTarget, LOG_SIZE};
use super::state::{respond, Authed, Closing, GatewayState};

/// How long the event stream gathers calls before it sends them.
const BATCH_WINDOW: Duration = Duration::from_millis(100);

/// The console's Content-Security-Policy: nothing but this origin's own
/// scripts, styles and fetches; no inline script, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The embedded files: URL path, content type, bytes. The vendored ones are
/// the npm packages' own files, unmodified (console/vendor/VENDORED.md).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../../console/index.html"),
    ),
    (
        "/console/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/app.js"),
    ),
    (
        "/console/app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/app.css"),
    ),
    (
        "/console/vendor/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "/console/vendor/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/vendor/uplot/uPlot.min.css"),
    ),
    // The package's ES modules import each other without a file extension
    // (`./fetch`, `./parse`): served at exactly those URLs.
    (
        "/console/vendor/fetch-event-source/index.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/vendor/fetch-event-source/index.js"),
    ),
    (
        "/console/vendor/fetch-event-source/fetch",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/vendor/fetch-event-source/fetch.js"),
    ),
    (
        "/console/vendor/fetch-event-source/parse",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/vendor/fetch-event-source/parse.js"),
    ),
];

/// The embedded file at `path`, with the console's security headers, or
/// `None`.
pub(crate) fn asset(path: &str) -> Option<Response> {
    let (_, content_type, bytes) = ASSETS.iter().find(|(p, _, _)| *p == path)?;
    let mut response = (StatusCode::OK, *bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}

/// The console's page and its embedded assets.
pub(crate) async fn console_asset(uri: Uri) -> Response {
    match asset(uri.path()) {
        Some(response) => response,
        None => respond(HttpReply::not_found(uri.path())),
    }
}

/// `GET /v1/devices`: what presence knows, and the targets called lately.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DevicesBody {
    /// Whether this gateway tracks presence (`--presence`); without it,
    /// `devices` is empty.
    presence: bool,
    /// Every target with a presence record, by name.
    devices: Vec<DeviceBody>,
    /// The targets of the last calls through this gateway, newest first,
    /// each with its latest call.
    recent: Vec<RecentTarget>,
}

/// A target's presence.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeviceBody {
    /// The device.
    target: String,
    /// Whether it is connected.
    online: bool,
    /// Since when, ms since the Unix epoch.
    since_ms: u64,
}

impl From<crate::DeviceState> for DeviceBody {
    fn from(d: crate::DeviceState) -> Self {
        DeviceBody {
            target: d.target.as_str().to_owned(),
            online: d.online,
            since_ms: d.since_ms,
        }
    }
}

/// The devices body as `credential` may see it: only targets its rules
/// name, only calls it could have made.
fn devices_body(gw: &GatewayState, credential: Option<&Caller>) -> DevicesBody {
    let requester = gw.service.requester();
    let visible = |target: &str| credential.is_none_or(|c| c.sees_target(target));
    let log = gw.console.as_ref().map(|c| c.recent()).unwrap_or_default();
    let log: Vec<_> = log
        .into_iter()
        .filter(|l| l.visible_to(credential))
        .collect();
    DevicesBody {
        presence: requester.tracks_presence(),
        devices: requester
            .devices()
            .into_iter()
            .filter(|d| visible(d.target.as_str()))
            .map(DeviceBody::from)
            .collect(),
        recent: recently_called(&log),
    }
}

/// The devices presence knows, online or offline and since when, and the
/// targets called lately (the console's device list).
#[utoipa::path(
    get,
    path = "/v1/devices",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The devices this credential may call.", body = DevicesBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
    )
)]
pub(crate) async fn devices(State(gw): State<GatewayState>, who: Authed) -> Response {
    let body = devices_body(&gw, who.caller.as_ref());
    respond(HttpReply::ok(
        serde_json::to_value(body).unwrap_or_default(),
    ))
}

/// One page's event stream: what is left to send, and what it waits on.
struct Feed {
    hello: Option<String>,
    calls: tokio::sync::broadcast::Receiver<Arc<Logged>>,
    devices: Option<tokio::sync::broadcast::Receiver<crate::DeviceState>>,
    closing: Option<tokio::sync::watch::Receiver<bool>>,
    ticker: tokio::time::Interval,
    /// The newest second sent.
    last: Option<u64>,
}

/// The console's live feed, as Server-Sent Events: first `hello` (the
/// devices, the live log, the last minutes of per-second counts), then
/// `calls` (the calls through this gateway in the last 100 ms or so), `device` for each presence
/// change and `seconds` once a second. A credential sees only the calls
/// and targets its rules allow.
#[utoipa::path(
    get,
    path = "/v1/events",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The event stream (never ends on its own).", content_type = "text/event-stream", body = String),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
    )
)]
pub(crate) async fn events(
    State(gw): State<GatewayState>,
    who: Authed,
    closing: Option<Extension<Closing>>,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let Some(console) = gw.console.clone() else {
        return respond(HttpReply::not_found("/v1/events"));
    };
    let credential = who.caller;
    let requester = gw.service.requester().clone();
    // Watch first, then read the snapshot: nothing falls in between.
    let (backlog, calls) = console.watch_with_backlog();
    let device_changes = requester.watch_devices();
    let devices = devices_body(&gw, credential.as_ref());
    let seconds = console.seconds_after(None);
    let last = seconds.last().map(|s| s.t);
    let calls_json: Vec<&str> = backlog
        .iter()
        .filter(|l| l.visible_to(credential.as_ref()))
        .map(|l| l.json())
        .collect();
    let hello = format!(
        r#"{{"presence":{},"records":{},"max_timeout_s":{},"devices":{},"recent":{},"calls":[{}],"seconds":{}}}"#,
        devices.presence,
        requester.record_options().is_some(),
        gw.service.limits().max_timeout.as_secs().max(1),
        serde_json::to_string(&devices.devices).unwrap_or_else(|_| "[]".into()),
        serde_json::to_string(&devices.recent).unwrap_or_else(|_| "[]".into()),
        calls_json.join(","),
        serde_json::to_string(&seconds).unwrap_or_else(|_| "[]".into()),
    );
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let feed = Feed {
        hello: Some(hello),
        calls,
        devices: requester.tracks_presence().then_some(device_changes),
        closing: closing.map(|Extension(Closing(rx))| rx),
        ticker,
        last,
    };
    let stream = futures_util::stream::unfold(feed, move |mut feed| {
        let console = Arc::clone(&console);
        let credential = credential.clone();
        async move {
            if let Some(hello) = feed.hello.take() {
                let event = Event::default().event("hello").data(hello);
                return Some((Ok::<_, std::convert::Infallible>(event), feed));
            }
            let lagged = |n: u64| {
                Event::default()
                    .event("lagged")
                    .data(format!(r#"{{"missed":{n}}}"#))
            };
            loop {
                let Feed {
                    calls,
                    devices,
                    closing,
                    ticker,
                    last,
                    ..
                } = &mut feed;
                let closed = async {
                    match closing.as_mut() {
                        // Fired, or the server is gone.
                        Some(rx) => drop(rx.wait_for(|c| *c).await),
                        None => std::future::pending().await,
                    }
                };
                let device = async {
                    match devices.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let event = tokio::select! {
                    () = closed => return None,
                    call = calls.recv() => match call {
                        // Then gather for a moment: one event (one write,
                        // one wake of the page) per batch, however busy.
                        Ok(first) => {
                            tokio::time::sleep(BATCH_WINDOW).await;
                            let mut batch = vec![first];
                            while let Ok(l) = calls.try_recv() {
                                batch.push(l);
                            }
                            batch.retain(|l| l.visible_to(credential.as_ref()));
                            if batch.is_empty() {
                                continue;
                            }
                            // A page shows the last LOG_SIZE calls: the rest
                            // are only counted.
                            let more = batch.len().saturating_sub(LOG_SIZE);
                            let shown: Vec<&str> = batch[more..].iter().map(|l| l.json()).collect();
                            let data = format!(r#"{{"calls":[{}],"more":{more}}}"#, shown.join(","));
                            Event::default().event("calls").data(data)
                        }
                        Err(RecvError::Lagged(n)) => lagged(n),
                        Err(RecvError::Closed) => return None,
                    },
                    device = device => match device {
                        Ok(d) if credential.as_ref().is_none_or(|c| c.sees_target(d.target.as_str())) => {
                            let body = serde_json::to_string(&DeviceBody::from(d)).unwrap_or_default();
                            Event::default().event("device").data(body)
                        }
                        Ok(_) => continue,
                        // Fell behind: the page reads the list again.
                        Err(RecvError::Lagged(n)) => lagged(n),
                        Err(RecvError::Closed) => {
                            *devices = None;
                            continue;
                        }
                    },
                    _ = ticker.tick() => {
                        let seconds = console.seconds_after(*last);
                        let Some(newest) = seconds.last().map(|s| s.t) else { continue };
                        *last = Some(newest);
                        Event::default().event("seconds").data(serde_json::to_string(&seconds).unwrap_or_default())
                    },
                };
                return Some((Ok(event), feed));
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
