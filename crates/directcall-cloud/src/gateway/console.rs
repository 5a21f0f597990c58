//! The web console's routes: its page and embedded assets, the device list
//! `GET /v1/devices`, and the live event stream `GET /v1/events`.
//!
//! All of it is off unless the gateway serves the console: no route, and no
//! bookkeeping on the call path.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::body::{HttpReply, MessageBody, UnauthorizedBody};
use super::live::{recently_called, Logged, RecentTarget, LOG_SIZE};
use super::state::{respond, Authed, GatewayState, Lifecycle};

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

/// How many devices a page of `/v1/devices` holds unless `limit` says,
/// and how many the event stream's `hello` carries.
pub(crate) const DEFAULT_PAGE: usize = 100;
/// The most devices one page may hold.
pub(crate) const MAX_PAGE: usize = 1000;
/// The longest `after` and `prefix`, in characters: a target's longest name.
const MAX_NAME_CHARS: usize = 128;
/// The longest `match` glob, in characters: every name is matched against
/// it, and a glob's cost grows with its length times the name's.
const MAX_GLOB_CHARS: usize = 64;

/// `GET /v1/devices`: one page of what presence knows, how many match, and
/// the targets called lately.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DevicesBody {
    /// Whether this gateway tracks presence (`--presence`); without it,
    /// `devices` is empty.
    presence: bool,
    /// The page: up to `limit` targets with a presence record that match
    /// the query, in byte order of their names.
    devices: Vec<DeviceBody>,
    /// The next page's cursor (pass it as `after`), or null on the last page.
    #[schema(required = true, max_length = 128)]
    next: Option<String>,
    /// How many targets match the query, on every page (the cursor aside).
    total: usize,
    /// Of those, how many are online.
    online: usize,
    /// Of those, how many are offline.
    offline: usize,
    /// The targets of the last calls through this gateway, newest first,
    /// each with its latest call (the query does not filter them).
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

/// Online or offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StateFilter {
    /// Connected.
    Online,
    /// Not connected.
    Offline,
}

/// The query of `GET /v1/devices`: a page size, a cursor, and filters that
/// find one device among many.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DevicesQuery {
    /// How many devices the page holds: 1 to 1000, default 100.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<u32>,
    /// The cursor: the page starts after this name (the `next` of the page
    /// before). Empty: from the first.
    #[param(max_length = 128)]
    after: Option<String>,
    /// Only targets whose name starts with this (case-sensitive). Empty:
    /// every target.
    #[param(max_length = 128)]
    prefix: Option<String>,
    /// Only targets whose name matches this glob: `*` is any run of
    /// characters, `?` any one, and letters match either case (`*car*`).
    /// Empty: every target.
    #[serde(rename = "match")]
    #[param(max_length = 64)]
    glob: Option<String>,
    /// Only the targets online, or only those offline.
    #[param(inline)]
    state: Option<StateFilter>,
}

impl DevicesQuery {
    /// Parses a query string; a bad value is a 400 naming its parameter.
    /// Other parameters are ignored.
    fn parse(query: Option<&str>) -> Result<Self, HttpReply> {
        let text = |name: &str, value: String, max: usize| {
            if value.chars().count() > max {
                return Err(HttpReply::invalid(
                    name,
                    format!("must be at most {max} characters"),
                ));
            }
            Ok((!value.is_empty()).then_some(value))
        };
        let mut q = DevicesQuery::default();
        for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let value = value.into_owned();
            match &*name {
                "limit" => {
                    let limit = value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(&(*n as usize)));
                    let Some(limit) = limit else {
                        return Err(HttpReply::invalid(
                            "limit",
                            format!("must be a whole number from 1 to {MAX_PAGE}"),
                        ));
                    };
                    q.limit = Some(limit);
                }
                "after" => q.after = text("after", value, MAX_NAME_CHARS)?,
                "prefix" => q.prefix = text("prefix", value, MAX_NAME_CHARS)?,
                "match" => q.glob = text("match", value, MAX_GLOB_CHARS)?,
                "state" => {
                    q.state = Some(match value.as_str() {
                        "online" => StateFilter::Online,
                        "offline" => StateFilter::Offline,
                        _ => return Err(HttpReply::invalid("state", "must be online or offline")),
                    })
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// One page of devices as `credential` may see them: only targets its
/// rules name, only calls it could have made.
fn devices_body(gw: &GatewayState, credential: Option<&Caller>, q: &DevicesQuery) -> DevicesBody {
    let requester = gw.service.requester();
    let log = gw.console.as_ref().map(|c| c.recent()).unwrap_or_default();
    let log: Vec<_> = log
        .into_iter()
        .filter(|l| l.visible_to(credential))
        .collect();
    let glob = q
        .glob
        .as_deref()
        .map(wildmatch::WildMatch::new_case_insensitive);
    let keep = |name: &str, online: bool| {
        q.state.is_none_or(|s| (s == StateFilter::Online) == online)
            && q.prefix.as_deref().is_none_or(|p| name.starts_with(p))
            && glob.as_ref().is_none_or(|g| g.matches(name))
            && credential.is_none_or(|c| c.sees_target(name))
    };
    let limit = q.limit.map_or(DEFAULT_PAGE, |n| n as usize);
    let page = requester
        .presence()
        .map(|p| p.page(q.after.as_deref(), limit, keep))
        .unwrap_or_default();
    let next = page
        .more
        .then(|| page.devices.last().map(|d| d.target.to_string()))
        .flatten();
    DevicesBody {
        presence: requester.tracks_presence(),
        next,
        total: page.total,
        online: page.online,
        offline: page.total - page.online,
        devices: page.devices.into_iter().map(DeviceBody::from).collect(),
        recent: recently_called(&log),
    }
}

/// One page of the devices presence knows, online or offline and since
/// when, in byte order of their names; how many match; and the targets
/// called lately (the console's device list).
#[utoipa::path(
    get,
    path = "/v1/devices",
    params(DevicesQuery),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A page of the devices this credential may call, and how many match.", body = DevicesBody),
        (status = 400, description = "A query parameter out of bounds; the message names it.", body = MessageBody),
        (status = 401, description = "A token is required and none matched.", body = UnauthorizedBody),
    )
)]
pub(crate) async fn devices(
    State(gw): State<GatewayState>,
    who: Authed,
    RawQuery(query): RawQuery,
) -> Response {
    let q = match DevicesQuery::parse(query.as_deref()) {
        Ok(q) => q,
        Err(reply) => return gw.refuse(reply),
    };
    let body = devices_body(&gw, who.caller.as_ref(), &q);
    respond(HttpReply::ok(
        serde_json::to_value(body).unwrap_or_default(),
    ))
}

/// `value` as JSON (these bodies of strings, numbers and lists cannot fail
/// to serialise).
fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
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

/// The console's live feed, as Server-Sent Events: first `hello` (how
/// many devices, online and offline, the first page of `/v1/devices` with
/// its `next` cursor, the live log, the last minutes of per-second counts:
/// bounded whatever the fleet's size), then `calls` (the calls through
/// this gateway in the last 100 ms or so), `device` for each presence
/// change, `seconds` once a second, and `lagged` when a slow reader fell
/// behind. A credential sees only the calls and targets its rules allow.
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
    lifecycle: Option<Extension<Lifecycle>>,
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
    let devices = devices_body(&gw, credential.as_ref(), &DevicesQuery::default());
    let seconds = console.seconds_after(None);
    let last = seconds.last().map(|s| s.t);
    let calls_json: Vec<&str> = backlog
        .iter()
        .filter(|l| l.visible_to(credential.as_ref()))
        .map(|l| l.json())
        .collect();
    let hello = format!(
        r#"{{"presence":{},"records":{},"max_timeout_s":{},"devices":{},"next":{},"total":{},"online":{},"offline":{},"recent":{},"calls":[{}],"seconds":{}}}"#,
        devices.presence,
        requester.record_options().is_some(),
        gw.service.limits().max_timeout.as_secs().max(1),
        json(&devices.devices),
        json(&devices.next),
        devices.total,
        devices.online,
        devices.offline,
        json(&devices.recent),
        calls_json.join(","),
        json(&seconds),
    );
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let feed = Feed {
        hello: Some(hello),
        calls,
        devices: requester.tracks_presence().then_some(device_changes),
        closing: lifecycle.map(|Extension(l)| l.closing),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(query: &str) -> String {
        let reply = DevicesQuery::parse(Some(query)).unwrap_err();
        assert_eq!(reply.status, 400, "{query}");
        reply.body["response"].as_str().unwrap().to_owned()
    }

    #[test]
    fn the_devices_query_takes_bounded_values_and_names_a_bad_one() {
        let q = DevicesQuery::parse(Some(
            "limit=1000&after=Car007&prefix=Car&match=*7&state=offline&other=x",
        ))
        .unwrap();
        assert_eq!(q.limit, Some(1000));
        assert_eq!(
            (q.after.as_deref(), q.prefix.as_deref(), q.glob.as_deref()),
            (Some("Car007"), Some("Car"), Some("*7"))
        );
        assert_eq!(q.state, Some(StateFilter::Offline));
        let q = DevicesQuery::parse(Some("after=&prefix=&match=")).unwrap();
        assert!(q.after.is_none() && q.prefix.is_none() && q.glob.is_none());
        for bad in ["limit=0", "limit=1001", "limit=ten", "limit=", "limit=-1"] {
            assert!(refused(bad).starts_with("invalid limit:"), "{bad}");
        }
        assert!(refused("state=idle").starts_with("invalid state:"));
        let long = "a".repeat(129);
        assert!(refused(&format!("after={long}")).starts_with("invalid after:"));
        assert!(refused(&format!("prefix={long}")).starts_with("invalid prefix:"));
        let glob = "*".repeat(65);
        assert!(refused(&format!("match={glob}")).starts_with("invalid match:"));
    }

    #[test]
    fn the_openapi_document_states_the_query_bounds() {
        let doc: serde_json::Value = serde_json::from_str(&super::super::openapi::openapi_json(
            super::super::mapping::Limits::default(),
            false,
            true,
            "",
        ))
        .unwrap();
        let get = &doc["paths"]["/v1/devices"]["get"];
        let param = |name: &str| {
            get["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{name} missing: {get}"))
                .clone()
        };
        let limit = param("limit");
        assert_eq!(
            (
                &limit["schema"]["minimum"],
                &limit["schema"]["maximum"],
                &limit["schema"]["default"]
            ),
            (
                &serde_json::json!(1),
                &serde_json::json!(MAX_PAGE),
                &serde_json::json!(DEFAULT_PAGE)
            ),
            "{limit}"
        );
        assert_eq!(param("after")["schema"]["maxLength"], MAX_NAME_CHARS);
        assert_eq!(param("prefix")["schema"]["maxLength"], MAX_NAME_CHARS);
        assert_eq!(param("match")["schema"]["maxLength"], MAX_GLOB_CHARS);
        let state = param("state").to_string();
        assert!(
            state.contains(r#"["online","offline"]"#),
            "the two states, inline: {state}"
        );
        assert!(get["responses"].get("400").is_some());
        let required = &doc["components"]["schemas"]["DevicesBody"]["required"];
        assert!(
            required
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("next")),
            "next is always there, null on the last page: {required}"
        );
        let body = &doc["components"]["schemas"]["DevicesBody"]["properties"];
        for field in ["devices", "next", "total", "online", "offline", "recent"] {
            assert!(body.get(field).is_some(), "{field} missing: {body}");
        }
    }
}
