//! The Lambda front end: API Gateway REST (v1) and HTTP API (v2) events in,
//! proxy responses out, through the same [`InvokeService`] as the gateway, on
//! one MQTT connection made at init and reused by every warm invocation.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use directcall_cloud::service::{HttpReply, InvokeService, Limits};
use directcall_cloud::{Options, Prefix, Requester};
use directcall_core::BrokerOptions;
use serde_json::{json, Value};

/// Default longest timeout: API Gateway REST ends integrations at 29 s.
pub const LAMBDA_MAX_TIMEOUT: Duration = Duration::from_secs(29);
/// Time kept back from the Lambda's own deadline to send the response.
pub const RESPONSE_MARGIN: Duration = Duration::from_millis(250);

/// What an API Gateway event asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET …/invoke` with decoded query pairs (repeats kept).
    Query(Vec<(String, String)>),
    /// `POST …/v1/targets/{target}/methods/{method}`.
    Post {
        /// Path target.
        target: String,
        /// Path method.
        method: String,
        /// `Content-Type`, if sent.
        content_type: Option<String>,
        /// Decoded body.
        body: Vec<u8>,
    },
}

fn header<'a>(event: &'a Value, name: &str) -> Option<&'a str> {
    event["headers"]
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))?
        .1
        .as_str()
}

/// Reads a REST (v1) or HTTP API (v2) proxy event.
///
/// # Errors
/// The [`HttpReply`] to answer with: 404 for a route that is not the
/// gateway's, 405 for a wrong method, 400 for an undecodable body.
pub fn parse_event(event: &Value) -> Result<ApiRequest, HttpReply> {
    let v2 = event["version"] == "2.0";
    let method = if v2 {
        event["requestContext"]["http"]["method"].as_str()
    } else {
        event["httpMethod"].as_str()
    }
    .unwrap_or("GET")
    .to_ascii_uppercase();
    let path = if v2 {
        event["rawPath"].as_str()
    } else {
        event["path"].as_str()
    }
    .unwrap_or("/");
    let segments: Vec<&str> = path.trim_end_matches('/').rsplit('/').collect();
    let not_found = || HttpReply {
        status: 404,
        body: json!({"result": "not_found", "response": format!("no route {path}")}),
    };
    let wrong_method = || HttpReply {
        status: 405,
        body: json!({"result": "method_not_allowed", "response": format!("{path} does not take {method}")}),
    };
    match segments.as_slice() {
        ["invoke", ..] => {
            if method != "GET" {
                return Err(wrong_method());
            }
            Ok(ApiRequest::Query(query_pairs(event, v2)))
        }
        [m, "methods", t, "targets", "v1", ..] => {
            if method != "POST" {
                return Err(wrong_method());
            }
            let decode = |s: &str| {
                form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.replace('+', " "))
                    .unwrap_or_default()
            };
            let raw = event["body"].as_str().unwrap_or_default();
            let body = if event["isBase64Encoded"] == true {
                base64::engine::general_purpose::STANDARD
                    .decode(raw)
                    .map_err(|e| HttpReply::invalid("body", format!("bad base64: {e}")))?
            } else {
                raw.as_bytes().to_vec()
            };
            Ok(ApiRequest::Post {
                // API Gateway hands over path segments still percent-encoded.
                target: decode(t),
                method: decode(m),
                content_type: header(event, "content-type").map(str::to_owned),
                body,
            })
        }
        _ => Err(not_found()),
    }
}

fn query_pairs(event: &Value, v2: bool) -> Vec<(String, String)> {
    if v2 {
        let raw = event["rawQueryString"].as_str().unwrap_or_default();
        return form_urlencoded::parse(raw.as_bytes())
            .into_owned()
            .collect();
    }
    // v1: the multi-value map keeps repeats, so a repeated parameter is refused
    // just as the gateway refuses it.
    if let Some(multi) = event["multiValueQueryStringParameters"].as_object() {
        return multi
            .iter()
            .flat_map(|(k, vs)| {
                vs.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| Some((k.clone(), v.as_str()?.to_owned())))
            })
            .collect();
    }
    event["queryStringParameters"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// A proxy response for API Gateway (the same shape serves v1 and v2).
pub fn response(reply: &HttpReply) -> Value {
    json!({
        "statusCode": reply.status,
        "headers": {"content-type": "application/json"},
        "body": reply.body.to_string(),
        "isBase64Encoded": false,
    })
}

/// The Lambda's settings, from the environment.
#[derive(Debug, Clone)]
pub struct LambdaConfig {
    /// Requester options (broker, prefix, client id).
    pub options: Options,
    /// Timeout limits (max 29 s by default).
    pub limits: Limits,
    /// Idle time after which the connection is made anew before publishing:
    /// a frozen execution environment sends no keepalive, so the broker may
    /// have dropped it.
    pub idle_reconnect: Duration,
    /// How long init waits for the connection.
    pub init_wait: Duration,
    /// Client ids are `<this>-<12 random hex digits>`, fresh for every
    /// connection made anew, so the old one (still open until it is shut
    /// down) is never pushed off the broker by a duplicate id, nor pushes back.
    pub client_id_prefix: String,
}

fn fresh_client_id(prefix: &str) -> String {
    format!("{prefix}-{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

/// Builds the Lambda's settings from an environment lookup.
///
/// | variable | meaning | default |
/// |---|---|---|
/// | `DIRECTCALL_BROKER` | broker URL; or build it from the two below | — |
/// | `DIRECTCALL_IOT_ENDPOINT` | AWS IoT data endpoint (`…-ats.iot.<region>.amazonaws.com`) | — |
/// | `DIRECTCALL_AUTH` | `sigv4` (WebSockets, the Lambda role), `mtls` (8883), `mtls443` (443, ALPN `x-amzn-mqtt-ca`) | `sigv4` |
/// | `DIRECTCALL_CA`, `DIRECTCALL_CERT`, `DIRECTCALL_KEY` | PEM files for TLS | platform roots |
/// | `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` | SigV4 signing (set by Lambda) | — |
/// | `DIRECTCALL_PREFIX` | topic prefix | `invocation_client` |
/// | `DIRECTCALL_CLIENT_ID_PREFIX` | client ids are `<this>-<random>` | the prefix |
/// | `DIRECTCALL_DEFAULT_TIMEOUT`, `DIRECTCALL_MAX_TIMEOUT` | seconds | 10, 29 |
/// | `DIRECTCALL_PRESENCE` | `aws` (lifecycle events), `directcall`, `off` | `off` |
/// | `DIRECTCALL_IDLE_RECONNECT_SECS` | reconnect before publishing after this much idle time | the keepalive (30) |
///
/// # Errors
/// A message naming the variable that is missing or wrong.
pub fn config_from(env: impl Fn(&str) -> Option<String>) -> Result<LambdaConfig, String> {
    let num = |name: &str, default: u64| -> Result<u64, String> {
        match env(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name}={v:?} is not a whole number")),
        }
    };
    let mut broker = match (env("DIRECTCALL_BROKER"), env("DIRECTCALL_IOT_ENDPOINT")) {
        (Some(url), _) => {
            BrokerOptions::from_url(&url).map_err(|e| format!("DIRECTCALL_BROKER: {e}"))?
        }
        (None, Some(endpoint)) => {
            let auth = env("DIRECTCALL_AUTH").unwrap_or_else(|| "sigv4".into());
            let url = match auth.as_str() {
                "sigv4" => format!("wss://{endpoint}/mqtt"),
                "mtls" => format!("mqtts://{endpoint}:8883"),
                "mtls443" => format!("mqtts://{endpoint}:443"),
                other => {
                    return Err(format!(
                        "DIRECTCALL_AUTH={other:?} is not sigv4, mtls or mtls443"
                    ))
                }
            };
            let mut b = BrokerOptions::from_url(&url).map_err(|e| e.to_string())?;
            if auth == "mtls443" {
                if let Some(tls) = b.tls_mut() {
                    tls.alpn = vec!["x-amzn-mqtt-ca".into()];
                }
            }
            if auth == "sigv4" {
                b.aws_sigv4 = Some(aws_credentials(&env)?);
            }
            b
        }
        (None, None) => return Err("set DIRECTCALL_BROKER or DIRECTCALL_IOT_ENDPOINT".into()),
    };
    if let Some(tls) = broker.tls_mut() {
        let read = |var: &str| -> Result<Option<Vec<u8>>, String> {
            env(var)
                .map(|path| std::fs::read(&path).map_err(|e| format!("{var}={path}: {e}")))
                .transpose()
        };
        if let Some(ca) = read("DIRECTCALL_CA")? {
            tls.ca_pem = Some(ca);
        }
        if let (Some(cert), Some(key)) = (read("DIRECTCALL_CERT")?, read("DIRECTCALL_KEY")?) {
            tls.client_auth = Some((cert, key));
        }
    }
    let prefix_text =
        env("DIRECTCALL_PREFIX").unwrap_or_else(|| directcall_core::topic::DEFAULT_PREFIX.into());
    let prefix =
        Prefix::new(prefix_text.as_str()).map_err(|e| format!("DIRECTCALL_PREFIX: {e}"))?;
    let client_prefix = env("DIRECTCALL_CLIENT_ID_PREFIX").unwrap_or(prefix_text);
    let mut options = Options::new(broker.clone())
        .prefix(prefix)
        .client_id(fresh_client_id(&client_prefix));
    options = match env("DIRECTCALL_PRESENCE").as_deref() {
        None | Some("off") => options,
        Some("aws") => options.aws_presence(),
        Some("directcall") => options.presence(directcall_core::PresenceRoot::default()),
        Some(other) => {
            return Err(format!(
                "DIRECTCALL_PRESENCE={other:?} is not aws, directcall or off"
            ))
        }
    };
    let max = num("DIRECTCALL_MAX_TIMEOUT", LAMBDA_MAX_TIMEOUT.as_secs())?;
    let default = num("DIRECTCALL_DEFAULT_TIMEOUT", 10)?;
    if max == 0 || default == 0 || default > max {
        return Err(format!("DIRECTCALL_DEFAULT_TIMEOUT ({default}) must be from 1 to DIRECTCALL_MAX_TIMEOUT ({max})"));
    }
    Ok(LambdaConfig {
        options,
        limits: Limits {
            default_timeout: Duration::from_secs(default),
            max_timeout: Duration::from_secs(max),
        },
        idle_reconnect: Duration::from_secs(num(
            "DIRECTCALL_IDLE_RECONNECT_SECS",
            broker.keep_alive.as_secs(),
        )?),
        init_wait: Duration::from_secs(5),
        client_id_prefix: client_prefix,
    })
}

fn aws_credentials(
    env: &impl Fn(&str) -> Option<String>,
) -> Result<directcall_core::AwsSigV4, String> {
    let need =
        |name: &str| env(name).ok_or_else(|| format!("{name} is not set (needed for SigV4)"));
    Ok(directcall_core::AwsSigV4 {
        region: need("AWS_REGION")?,
        access_key_id: need("AWS_ACCESS_KEY_ID")?,
        secret_access_key: need("AWS_SECRET_ACCESS_KEY")?,
        session_token: env("AWS_SESSION_TOKEN"),
    })
}

/// One execution environment's state: the connection, kept across warm
/// invocations.
pub struct LambdaState {
    config: LambdaConfig,
    service: Mutex<InvokeService>,
    last_done: Mutex<Instant>,
}

impl LambdaState {
    /// Connects once, at init (before the first event), waiting up to
    /// `init_wait`; a broker that is not there yet is retried per invocation.
    ///
    /// # Errors
    /// When the broker settings are unusable.
    pub async fn init(config: LambdaConfig) -> Result<Self, String> {
        let requester = Requester::start(config.options.clone()).map_err(|e| e.to_string())?;
        if !requester.wait_ready(config.init_wait).await {
            tracing::warn!(last_error = ?requester.last_error(), "not connected at init; will retry per invocation");
        }
        Ok(LambdaState {
            service: Mutex::new(InvokeService::new(requester, config.limits)),
            config,
            last_done: Mutex::new(Instant::now()),
        })
    }

    fn service(&self) -> InvokeService {
        self.service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Handles one API Gateway event; `deadline_ms` is the invocation's own
    /// deadline (ms since the Unix epoch) from the Runtime API.
    pub async fn handle(&self, event: &Value, deadline_ms: u64) -> Value {
        let start = Instant::now();
        let now_ms = u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        let budget = Duration::from_millis(deadline_ms.saturating_sub(now_ms))
            .saturating_sub(RESPONSE_MARGIN);
        let idle = self
            .last_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if idle > self.config.idle_reconnect {
            // After a long freeze the socket may be dead without knowing it:
            // make the connection anew rather than publish into the void.
            let options = self
                .config
                .options
                .clone()
                .client_id(fresh_client_id(&self.config.client_id_prefix));
            if let Ok(fresh) = Requester::start(options) {
                tracing::info!(
                    idle_s = idle.as_secs(),
                    "idle past the keepalive: reconnecting"
                );
                let old = std::mem::replace(
                    &mut *self.service.lock().unwrap_or_else(|e| e.into_inner()),
                    InvokeService::new(fresh, self.config.limits),
                );
                tokio::spawn(async move { old.requester().shutdown().await });
            }
        }
        let service = self.service();
        let reply = self.call(&service, event, start, budget).await;
        *self.last_done.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        response(&reply)
    }

    async fn call(
        &self,
        service: &InvokeService,
        event: &Value,
        start: Instant,
        budget: Duration,
    ) -> HttpReply {
        let invocation = match parse_event(event) {
            Ok(ApiRequest::Query(pairs)) => service.query_invocation(pairs, start),
            Ok(ApiRequest::Post {
                target,
                method,
                content_type,
                body,
            }) => service.post_invocation(&target, &method, content_type.as_deref(), &body, start),
            Err(reply) => Err(reply),
        };
        let invocation = match invocation {
            Ok(i) => i,
            Err(reply) => return reply,
        };
        // The call never outlives the Lambda's own deadline.
        let timeout = invocation
            .timeout_duration()
            .min(budget.max(Duration::from_millis(1)));
        if !service.requester().is_connected() {
            service.requester().wait_ready(timeout).await;
        }
        service.invoke(invocation.timeout(timeout)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rest_v1_events() {
        let event = json!({
            "resource": "/invoke", "path": "/invoke/", "httpMethod": "GET",
            "queryStringParameters": {"request": "my_request_1", "method": "reqid-ABCD", "target": "Device001", "timeout": "3"},
            "multiValueQueryStringParameters": {"request": ["my_request_1"], "method": ["reqid-ABCD"], "target": ["Device001"], "timeout": ["3"]},
            "headers": {"Host": "x"}, "body": null, "isBase64Encoded": false
        });
        let ApiRequest::Query(mut pairs) = parse_event(&event).unwrap() else {
            panic!()
        };
        pairs.sort();
        assert_eq!(pairs[0], ("method".into(), "reqid-ABCD".into()));
        assert_eq!(pairs.len(), 4);
        let repeated = json!({"path": "/invoke", "httpMethod": "GET", "multiValueQueryStringParameters": {"target": ["a", "b"]}});
        let ApiRequest::Query(pairs) = parse_event(&repeated).unwrap() else {
            panic!()
        };
        assert_eq!(pairs.len(), 2);
    }

    #[test]
    fn reads_http_api_v2_events() {
        let event = json!({
            "version": "2.0", "rawPath": "/Prod/v1/targets/car%2F1/methods/unlock", "rawQueryString": "",
            "requestContext": {"http": {"method": "POST"}},
            "headers": {"content-type": "application/json"},
            "body": base64::engine::general_purpose::STANDARD.encode(br#"{"request":1}"#), "isBase64Encoded": true
        });
        assert_eq!(
            parse_event(&event).unwrap(),
            ApiRequest::Post {
                target: "car/1".into(),
                method: "unlock".into(),
                content_type: Some("application/json".into()),
                body: br#"{"request":1}"#.to_vec()
            }
        );
        let get = json!({"version": "2.0", "rawPath": "/invoke", "rawQueryString": "target=a&target=b", "requestContext": {"http": {"method": "GET"}}});
        assert_eq!(
            parse_event(&get).unwrap(),
            ApiRequest::Query(vec![
                ("target".into(), "a".into()),
                ("target".into(), "b".into())
            ])
        );
        let wrong = json!({"version": "2.0", "rawPath": "/invoke", "requestContext": {"http": {"method": "DELETE"}}});
        assert_eq!(parse_event(&wrong).unwrap_err().status, 405);
        let elsewhere = json!({"version": "2.0", "rawPath": "/admin", "requestContext": {"http": {"method": "GET"}}});
        assert_eq!(parse_event(&elsewhere).unwrap_err().status, 404);
    }

    #[test]
    fn config_from_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let c = config_from(env(&[("DIRECTCALL_BROKER", "mqtt://127.0.0.1:1999")])).unwrap();
        assert_eq!(c.limits.max_timeout, Duration::from_secs(29));
        assert_eq!(c.options.broker().port, 1999);
        let c = config_from(env(&[
            (
                "DIRECTCALL_IOT_ENDPOINT",
                "abc-ats.iot.eu-west-1.amazonaws.com",
            ),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ]))
        .unwrap();
        assert_eq!(
            c.options.broker().url(),
            "wss://abc-ats.iot.eu-west-1.amazonaws.com:443/mqtt"
        );
        assert_eq!(
            c.options.broker().aws_sigv4.as_ref().unwrap().region,
            "eu-west-1"
        );
        let c = config_from(env(&[
            ("DIRECTCALL_IOT_ENDPOINT", "e"),
            ("DIRECTCALL_AUTH", "mtls443"),
        ]))
        .unwrap();
        assert!(
            matches!(&c.options.broker().transport, directcall_core::Transport::Tls(t) if t.alpn == ["x-amzn-mqtt-ca"])
        );
        assert!(config_from(env(&[]))
            .unwrap_err()
            .contains("DIRECTCALL_BROKER"));
        assert!(config_from(env(&[("DIRECTCALL_IOT_ENDPOINT", "e")]))
            .unwrap_err()
            .contains("AWS_REGION"));
        assert!(config_from(env(&[
            ("DIRECTCALL_BROKER", "mqtt://h"),
            ("DIRECTCALL_MAX_TIMEOUT", "x")
        ]))
        .is_err());
    }
}
