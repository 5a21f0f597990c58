//! The gateway's OpenAPI 3 document, derived from the handlers and body
//! types (utoipa), with this instance's limits filled in and its paths
//! under the base path the API is mounted at.

use serde_json::json;
use utoipa::OpenApi;

use super::body::{
    AcceptedBody, BadReplyBody, CallRecordBody, MessageBody, OfflineBody, OkBody, PostBody,
    TimeoutBody, UnauthorizedBody,
};
use super::groups::{
    self, DeviceResultBody, GroupAcceptedBody, GroupBody, GroupPostBody, GroupRecordBody,
    GroupSummaryBody, MatchBody, NamedGroupBody, TargetsBody,
};
use super::mapping::Limits;
use super::routes::{self, HealthBody, LiveBody, ReadyBody};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "directcall gateway",
        version = "1",
        description = "Synchronous calls to MQTT devices over HTTP (PROTOCOL.md, HTTP mapping). Every body is JSON."
    ),
    paths(routes::invoke_get, routes::invoke_get_slash, routes::invoke_post, routes::call_record, groups::invoke_group, groups::group_record, routes::healthz, routes::livez, routes::readyz, routes::metrics, routes::openapi),
    components(schemas(OkBody, TimeoutBody, OfflineBody, BadReplyBody, MessageBody, UnauthorizedBody, HealthBody, LiveBody, ReadyBody, PostBody, CallRecordBody, AcceptedBody, GroupPostBody, TargetsBody, MatchBody, NamedGroupBody, DeviceResultBody, GroupSummaryBody, GroupBody, GroupAcceptedBody, GroupRecordBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

#[cfg(feature = "console")]
#[derive(OpenApi)]
#[openapi(
    paths(super::console::devices, super::console::events),
    components(schemas(
        super::console::DevicesBody,
        super::console::DeviceBody,
        super::live::RecentTarget
    ))
)]
struct ConsoleDoc;

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
                        "Required only when the gateway authenticates its callers (--api-token, --credentials, --jwks, or the host application's own).",
                    ))
                    .build(),
            ),
        );
    }
}

/// [`document`] of a gateway that streams its answers.
#[cfg(test)]
pub(crate) fn openapi_json(
    limits: Limits,
    with_metrics: bool,
    with_console: bool,
    base: &str,
) -> String {
    document(limits, with_metrics, with_console, None, base)
}

/// The OpenAPI document of the gateway mounted at `base` (`""` or
/// `/devices`), with `limits` filled in so a client (or a schema-driven
/// tester) sees the bounds it will be held to, and without `/metrics` or
/// the console's routes when the gateway serves none. Behind a front end
/// that buffers answers of at most `buffered` bytes (the Lambda), group
/// calls answer 406 for NDJSON, never 202, and take as many devices as fit.
pub(crate) fn document(
    limits: Limits,
    with_metrics: bool,
    with_console: bool,
    buffered: Option<usize>,
    base: &str,
) -> String {
    #[allow(unused_mut)]
    let mut api = ApiDoc::openapi();
    #[cfg(feature = "console")]
    if with_console {
        api.merge(ConsoleDoc::openapi());
    }
    let _ = with_console;
    let Ok(mut doc) = serde_json::to_value(api) else {
        return String::new();
    };
    if let Some(paths) = doc["paths"].as_object_mut() {
        if !with_metrics {
            paths.remove("/metrics");
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
    for path in ["/v1/calls/{id}", "/v1/groups/{id}"] {
        if let Some(params) = doc["paths"][path]["get"]["parameters"].as_array_mut() {
            for p in params.iter_mut().filter(|p| p["name"] == "wait") {
                p["schema"]["maximum"] = json!(max_s);
            }
        }
    }
    let max_ms = u64::try_from(limits.max_timeout.as_millis()).unwrap_or(u64::MAX);
    let schemas = &mut doc["components"]["schemas"];
    for schema in ["PostBody", "TargetsBody", "MatchBody", "NamedGroupBody"] {
        schemas[schema]["properties"]["timeout_ms"]["maximum"] = json!(max_ms);
    }
    // Each name of a list is one topic level; a buffered answer takes as
    // many as fit.
    let max_targets = buffered.map_or(groups::MAX_GROUP_TARGETS, groups::buffered_results);
    let targets = &mut schemas["TargetsBody"]["properties"]["targets"];
    targets["maxItems"] = json!(max_targets);
    targets["items"] = json!({"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9_.:-]+$"});
    let group_call = &mut doc["paths"]["/v1/methods/{method}"]["post"]["responses"];
    if buffered.is_some() {
        if let Some(responses) = group_call.as_object_mut() {
            responses.remove("202");
        }
        if let Some(content) = group_call["200"]["content"].as_object_mut() {
            content.remove("application/x-ndjson");
        }
    } else if let Some(responses) = group_call.as_object_mut() {
        responses.remove("406");
    }
    if !base.is_empty() {
        if let Some(paths) = doc["paths"].as_object_mut() {
            *paths = std::mem::take(paths)
                .into_iter()
                .map(|(path, item)| (format!("{base}{path}"), item))
                .collect();
        }
        // The links a 202 and a 504 give point under the base too.
        let pattern = format!("^{base}/v1/calls/[0-9a-f-]{{36}}$");
        for schema in ["TimeoutBody", "AcceptedBody"] {
            let call = &mut doc["components"]["schemas"][schema]["properties"]["call"];
            if call.is_object() {
                call["pattern"] = json!(pattern);
            }
        }
        doc["components"]["schemas"]["GroupAcceptedBody"]["properties"]["group"]["pattern"] =
            json!(format!("^{base}/v1/groups/[0-9a-f-]{{36}}$"));
    }
    doc.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_has_every_route_and_the_limits() {
        let limits = Limits::new(2, 5).unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&openapi_json(limits, true, true, "")).unwrap();
        let without: serde_json::Value =
            serde_json::from_str(&openapi_json(limits, false, false, "")).unwrap();
        assert!(without["paths"].get("/metrics").is_none());
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "/invoke",
            "/invoke/",
            "/v1/targets/{target}/methods/{method}",
            "/v1/methods/{method}",
            "/v1/groups/{id}",
            "/healthz",
            "/livez",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ];
        if cfg!(feature = "console") {
            expected.extend(["/v1/devices", "/v1/events"]);
        }
        for p in expected {
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
            ["200", "400", "401", "403", "404", "409", "413", "429", "502", "503", "504"]
        );
    }

    #[test]
    fn group_calls_are_documented_as_this_front_end_answers_them() {
        let codes = |doc: &serde_json::Value| {
            let mut codes: Vec<String> = doc["paths"]["/v1/methods/{method}"]["post"]["responses"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            codes.sort_unstable();
            codes
        };
        let served: serde_json::Value = serde_json::from_str(&document(
            Limits::new(2, 5).unwrap(),
            false,
            false,
            None,
            "",
        ))
        .unwrap();
        assert_eq!(
            codes(&served),
            ["200", "202", "400", "401", "403", "409", "413", "429", "503"]
        );
        let ok = &served["paths"]["/v1/methods/{method}"]["post"]["responses"]["200"]["content"];
        assert!(ok.get("application/x-ndjson").is_some(), "{ok}");
        let schemas = &served["components"]["schemas"];
        assert_eq!(
            schemas["GroupPostBody"]["oneOf"].as_array().map(Vec::len),
            Some(3),
            "{}",
            schemas["GroupPostBody"]
        );
        let targets = &schemas["TargetsBody"]["properties"]["targets"];
        assert_eq!(targets["maxItems"], 100_000);
        assert_eq!(targets["items"]["maxLength"], 128);
        assert_eq!(
            schemas["MatchBody"]["properties"]["timeout_ms"]["maximum"],
            5000
        );
        // The Lambda's: no stream, no 202, a 406, and fewer devices.
        let lambda: serde_json::Value = serde_json::from_str(&document(
            Limits::new(2, 5).unwrap(),
            false,
            false,
            Some(3_000_000),
            "",
        ))
        .unwrap();
        assert_eq!(
            codes(&lambda),
            ["200", "400", "401", "403", "406", "409", "413", "429", "503"]
        );
        let ok = &lambda["paths"]["/v1/methods/{method}"]["post"]["responses"]["200"]["content"];
        assert!(ok.get("application/x-ndjson").is_none(), "{ok}");
        assert_eq!(
            lambda["components"]["schemas"]["TargetsBody"]["properties"]["targets"]["maxItems"],
            2928
        );
    }

    #[test]
    fn under_a_base_path_every_path_and_link_is_under_it() {
        let doc: serde_json::Value =
            serde_json::from_str(&openapi_json(Limits::default(), false, false, "/devices"))
                .unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(
            paths.keys().all(|p| p.starts_with("/devices/")),
            "{paths:?}"
        );
        assert!(paths.contains_key("/devices/v1/calls/{id}"));
        let pattern = doc["components"]["schemas"]["AcceptedBody"]["properties"]["call"]["pattern"]
            .as_str()
            .unwrap();
        assert!(pattern.starts_with("^/devices/v1/calls/"), "{pattern}");
        let pattern = doc["components"]["schemas"]["GroupAcceptedBody"]["properties"]["group"]
            ["pattern"]
            .as_str()
            .unwrap();
        assert!(pattern.starts_with("^/devices/v1/groups/"), "{pattern}");
    }
}
