//! The real `directcall-lambda` binary driven through a Lambda Runtime API
//! served on localhost (the documented endpoints: next, response, error),
//! with API Gateway events, against a real Mosquitto and a simulated device;
//! and PROTOCOL.md's HTTP table run against it and `directcall serve` alike.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::e2e;
use crate::e2e::{gateway, get_with, sim, wait_health};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use directcall_testkit::{program, Mosquitto};
use serde_json::{json, Value};
use tokio::sync::Notify;

#[derive(Default)]
struct RuntimeApi {
    queue: Mutex<VecDeque<(String, Value, u64)>>,
    queued: Notify,
    /// Each response, and when it reached this API (ms since the epoch).
    responses: Mutex<HashMap<String, (Value, u64)>>,
    errors: Mutex<Vec<String>>,
    answered: Notify,
}

async fn next(State(api): State<Arc<RuntimeApi>>) -> impl IntoResponse {
    loop {
        let notified = api.queued.notified();
        if let Some((id, event, deadline)) = api.queue.lock().unwrap().pop_front() {
            let mut headers = HeaderMap::new();
            headers.insert(
                "lambda-runtime-aws-request-id",
                HeaderValue::from_str(&id).unwrap(),
            );
            headers.insert(
                "lambda-runtime-deadline-ms",
                HeaderValue::from_str(&deadline.to_string()).unwrap(),
            );
            headers.insert(
                "lambda-runtime-invoked-function-arn",
                HeaderValue::from_static(
                    "arn:aws:lambda:us-east-1:123456789012:function:directcall",
                ),
            );
            headers.insert(
                "lambda-runtime-trace-id",
                HeaderValue::from_static(
                    "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1",
                ),
            );
            return (StatusCode::OK, headers, event.to_string());
        }
        notified.await;
    }
}

async fn respond(
    State(api): State<Arc<RuntimeApi>>,
    Path(id): Path<String>,
    body: String,
) -> StatusCode {
    let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    api.responses
        .lock()
        .unwrap()
        .insert(id, (value, directcall_testkit::now_ms()));
    api.answered.notify_waiters();
    StatusCode::ACCEPTED
}

async fn error(State(api): State<Arc<RuntimeApi>>, body: String) -> StatusCode {
    api.errors.lock().unwrap().push(body);
    api.answered.notify_waiters();
    StatusCode::ACCEPTED
}

impl RuntimeApi {
    /// Queues an event and waits for the function's response: the
    /// response, the invocation's deadline and when the response came (ms
    /// since the epoch).
    async fn invoke(&self, event: Value, deadline_in: Duration) -> (Value, u64, u64) {
        let id = format!("req-{:08x}", fastrand_u32());
        let deadline = (SystemTime::now() + deadline_in)
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        self.queue
            .lock()
            .unwrap()
            .push_back((id.clone(), event, deadline));
        self.queued.notify_waiters();
        let until = Instant::now() + Duration::from_secs(40);
        loop {
            let answered = self.answered.notified();
            if let Some((r, at)) = self.responses.lock().unwrap().remove(&id) {
                return (r, deadline, at);
            }
            assert!(
                self.errors.lock().unwrap().is_empty(),
                "function error: {:?}",
                self.errors.lock().unwrap()
            );
            assert!(Instant::now() < until, "no response to {id}");
            let _ = tokio::time::timeout(Duration::from_millis(200), answered).await;
        }
    }
}

fn fastrand_u32() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// A `directcall-lambda` process polling a Runtime API of this test's own.
struct Lambda {
    api: Arc<RuntimeApi>,
    process: std::process::Child,
}

impl Lambda {
    async fn start(broker_url: &str, env: &[(&str, &str)]) -> Lambda {
        let api = Arc::new(RuntimeApi::default());
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(respond),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(error))
            .with_state(Arc::clone(&api));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let runtime_api = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_directcall-lambda"));
        command
            .env("AWS_LAMBDA_RUNTIME_API", &runtime_api)
            .env("AWS_LAMBDA_FUNCTION_NAME", "directcall")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", "test")
            .env("AWS_REGION", "us-east-1")
            .env("DIRECTCALL_BROKER", broker_url)
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            command.env(k, v);
        }
        Lambda {
            api,
            process: command.spawn().unwrap(),
        }
    }

    /// One HTTP request as an API Gateway event (REST v1 or HTTP API v2,
    /// stage `Prod`), answered through the runtime: (status, JSON body).
    async fn http(&self, version: u8, request: &Req, deadline_in: Duration) -> (u16, Value) {
        let (status, body, _) = self.http_timed(version, request, deadline_in).await;
        (status, body)
    }

    /// [`Lambda::http`], and by how many milliseconds the response reached
    /// the Runtime API before the invocation's deadline (negative: after).
    async fn http_timed(
        &self,
        version: u8,
        request: &Req,
        deadline_in: Duration,
    ) -> (u16, Value, i64) {
        let event = if version == 1 {
            rest_v1_event(request)
        } else {
            http_v2_event(request)
        };
        let (r, deadline, at) = self.api.invoke(event, deadline_in).await;
        let status = u16::try_from(r["statusCode"].as_u64().expect("statusCode")).unwrap();
        let body = r["body"].as_str().unwrap_or_default();
        let ahead = i64::try_from(deadline).unwrap() - i64::try_from(at).unwrap();
        (
            status,
            serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
            ahead,
        )
    }
}

impl Drop for Lambda {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// An HTTP request of the table.
#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    /// Path with its query, as sent (percent-encoded).
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Option<String>,
}

fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// A REST API (v1) proxy event, as API Gateway sends it: the stage is not in
/// `path`, repeated query parameters are in the multi-value map.
fn rest_v1_event(r: &Req) -> Value {
    let (path, query) = r.path.split_once('?').unwrap_or((&r.path, ""));
    let mut multi = serde_json::Map::new();
    for (k, v) in query_pairs(query) {
        multi
            .entry(k)
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .unwrap()
            .push(json!(v));
    }
    let single: serde_json::Map<String, Value> = multi
        .iter()
        .map(|(k, v)| (k.clone(), v[0].clone()))
        .collect();
    let headers: serde_json::Map<String, Value> = r
        .headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    json!({
        "resource": path, "path": path, "httpMethod": r.method,
        "headers": headers,
        "queryStringParameters": if single.is_empty() { Value::Null } else { Value::Object(single) },
        "multiValueQueryStringParameters": if multi.is_empty() { Value::Null } else { Value::Object(multi) },
        "requestContext": {"resourcePath": path, "httpMethod": r.method, "stage": "Prod", "path": format!("/Prod{path}")},
        "body": r.body, "isBase64Encoded": false
    })
}

/// An HTTP API (v2) event with a named stage: the stage is in `rawPath`.
fn http_v2_event(r: &Req) -> Value {
    let (path, query) = r.path.split_once('?').unwrap_or((&r.path, ""));
    let headers: serde_json::Map<String, Value> = r
        .headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    json!({
        "version": "2.0", "routeKey": "$default", "rawPath": format!("/Prod{path}"), "rawQueryString": query,
        "headers": headers,
        "requestContext": {"http": {"method": r.method, "path": format!("/Prod{path}")}, "stage": "Prod"},
        "body": r.body, "isBase64Encoded": false
    })
}

async fn over_http(base: &str, r: &Req) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    match r.method {
        "POST" => {
            e2e::post(
                base,
                &r.path,
                &headers,
                r.body.clone().unwrap_or_default().into_bytes(),
            )
            .await
        }
        "GET" => get_with(&format!("{base}{}", r.path), &headers).await,
        other => {
            let mut conn = directcall_bins::http_client::Connection::open(base)
                .await
                .unwrap();
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(a, b)| ((*a).into(), (*b).into()))
                .collect();
            let resp = conn
                .send(other, &r.path, &headers, Vec::new())
                .await
                .unwrap();
            (
                resp.status,
                serde_json::from_str(&resp.body).unwrap_or(Value::String(resp.body)),
            )
        }
    }
}

/// The body with what differs from call to call (`elapsed`, `id`, the
/// simulator's random number) blanked.
fn normalized(mut body: Value) -> Value {
    for field in ["elapsed", "id", "call"] {
        if body.get(field).is_some() {
            body[field] = json!("*");
        }
    }
    if let Some(text) = body["response"].as_str() {
        if let Some((head, _)) = text.split_once(" Some random response:") {
            body["response"] = json!(format!("{head} *"));
        }
    }
    body
}

fn req(method: &'static str, path: &str, token: bool, body: Option<&str>) -> Req {
    let mut headers = vec![];
    if token {
        headers.push(("authorization", "Bearer tok".to_owned()));
    }
    if body.is_some() {
        headers.push(("content-type", "application/json".to_owned()));
    }
    Req {
        method,
        path: path.to_owned(),
        headers,
        body: body.map(str::to_owned),
    }
}

/// PROTOCOL.md's HTTP table, and the routes around it, against the gateway
/// and the Lambda (REST v1 and HTTP API v2 events): same inputs, same
/// statuses, same bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_and_the_lambda_answer_the_http_table_alike() {
    let Some(mut m) = program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto")) else {
        return;
    };
    let url = m.url();
    // Nobody's calls time out (504) on MQTT 5 too.
    let _hole = e2e::black_hole(&url).await;
    let _device = sim(
        &url,
        &["--client-id", "Device001", "--methods", "reqid-ABCD"],
    );
    let mut gone = sim(&url, &["--client-id", "Gone", "--presence"]);
    gone.kill();
    let (_gw, base) = gateway(&url, &["--api-token", "tok", "--max-timeout", "29"]).await;
    wait_health(&base, 200).await;
    let lambda = Lambda::start(&url, &[("DIRECTCALL_API_TOKENS", "tok")]).await;

    // The will of "Gone" must have reached both.
    let offline = req(
        "GET",
        "/invoke?request=r&method=m&target=Gone&timeout=1",
        true,
        None,
    );
    let until = Instant::now() + Duration::from_secs(15);
    while over_http(&base, &offline).await.0 != 404
        || lambda.http(1, &offline, Duration::from_secs(5)).await.0 != 404
    {
        assert!(Instant::now() < until, "the will never arrived");
    }

    let big = format!("{{\"request\":\"{}\"}}", "x".repeat(129 * 1024));
    let table: Vec<(Req, u16, &str)> = vec![
        (
            req(
                "GET",
                "/invoke?request=my_request_1&method=reqid-ABCD&target=Device001&timeout=3",
                true,
                None,
            ),
            200,
            "ok",
        ),
        (
            req(
                "GET",
                "/invoke/?request=my_request_1&method=reqid-ABCD&target=Device001&timeout=3",
                true,
                None,
            ),
            200,
            "ok",
        ),
        (
            req(
                "POST",
                "/v1/targets/Device001/methods/reqid-ABCD",
                true,
                Some(r#"{"request":{"a":1},"timeout_ms":3000}"#),
            ),
            200,
            "ok",
        ),
        (
            req(
                "GET",
                "/invoke?request=r&method=fly&target=Device001&timeout=3",
                true,
                None,
            ),
            200,
            "ok",
        ),
        (
            req(
                "GET",
                "/invoke?request=r&method=m&target=Nobody&timeout=1",
                true,
                None,
            ),
            504,
            "timeout",
        ),
        (
            req(
                "POST",
                "/v1/targets/Nobody/methods/m",
                true,
                Some(r#"{"timeout_ms":500}"#),
            ),
            504,
            "timeout",
        ),
        (offline.clone(), 404, "offline"),
        (
            req("GET", "/invoke?request=r&method=m&timeout=1", true, None),
            400,
            "invalid_parameters",
        ),
        (
            req("GET", "/invoke?request=r&method=m&target=a%2Fb", true, None),
            400,
            "invalid_parameters",
        ),
        (
            req(
                "GET",
                "/invoke?request=r&method=m&target=t&target=u",
                true,
                None,
            ),
            400,
            "invalid_parameters",
        ),
        (
            req(
                "GET",
                "/invoke?request=r&method=m&target=t&timeout=30",
                true,
                None,
            ),
            400,
            "invalid_parameters",
        ),
        (
            req(
                "GET",
                "/invoke?request=r&method=m&target=t&timeout=abc",
                true,
                None,
            ),
            400,
            "invalid_parameters",
        ),
        (
            req("POST", "/v1/targets/car%2Bx/methods/m", true, Some("{}")),
            400,
            "invalid_parameters",
        ),
        (
            req("POST", "/v1/targets/car+x/methods/m", true, Some("{}")),
            400,
            "invalid_parameters",
        ),
        (
            req("POST", "/v1/targets/car%2Fx/methods/m", true, Some("{}")),
            400,
            "invalid_parameters",
        ),
        (
            req("POST", "/v1/targets/car/methods/m", true, Some("[")),
            400,
            "invalid_parameters",
        ),
        (
            req(
                "POST",
                "/v1/targets/car/methods/m",
                true,
                Some(r#"{"timeout_ms":99}"#),
            ),
            400,
            "invalid_parameters",
        ),
        (
            req("POST", "/v1/targets/car/methods/m", true, Some(&big)),
            413,
            "payload_too_large",
        ),
        (
            req(
                "GET",
                "/invoke?request=r&method=m&target=Device001",
                false,
                None,
            ),
            401,
            "unauthorized",
        ),
        (
            req("POST", "/v1/targets/Device001/methods/m", false, Some("{}")),
            401,
            "unauthorized",
        ),
        (req("GET", "/admin", true, None), 404, "not_found"),
        (
            req("DELETE", "/invoke", true, None),
            405,
            "method_not_allowed",
        ),
        (
            req("GET", "/v1/targets/car/methods/m", true, None),
            405,
            "method_not_allowed",
        ),
    ];
    let mut answers = Vec::new();
    for (request, status, result) in &table {
        let from_gateway = over_http(&base, request).await;
        let v1 = lambda.http(1, request, Duration::from_secs(30)).await;
        let v2 = lambda.http(2, request, Duration::from_secs(30)).await;
        let what = format!(
            "{} {}",
            request.method,
            &request.path[..request.path.len().min(90)]
        );
        assert_eq!(
            from_gateway.0, *status,
            "gateway {what}: {}",
            from_gateway.1
        );
        assert_eq!(
            from_gateway.1["result"], *result,
            "{what}: {}",
            from_gateway.1
        );
        let expected = (from_gateway.0, normalized(from_gateway.1));
        assert_eq!((v1.0, normalized(v1.1)), expected, "REST v1 event {what}");
        assert_eq!(
            (v2.0, normalized(v2.1)),
            expected,
            "HTTP API v2 event {what}"
        );
        answers.push(expected);
    }
    // The 400s name the parameter: the `+` in a path stays a `+`.
    let plus = &answers[13].1["response"];
    assert!(
        plus.as_str()
            .unwrap()
            .starts_with("invalid target: contains '+'"),
        "{plus}"
    );

    // And with the broker gone: 503 from both (the Lambda first waits for the
    // broker within the call's deadline).
    m.kill();
    wait_health(&base, 503).await;
    let call = req(
        "GET",
        "/invoke?request=r&method=m&target=Device001&timeout=1",
        true,
        None,
    );
    let from_gateway = over_http(&base, &call).await;
    assert_eq!(from_gateway.0, 503, "{}", from_gateway.1);
    let v1 = lambda.http(1, &call, Duration::from_secs(30)).await;
    assert_eq!((v1.0, normalized(v1.1)), (503, normalized(from_gateway.1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lambda_answers_api_gateway_events_on_one_reused_connection() {
    let Some(m) = program::MOSQUITTO.or_skip(
        Mosquitto::start("log_type notice\nconnection_messages true\n").expect("mosquitto"),
    ) else {
        return;
    };
    let _sim = sim(&m.url(), &["--client-id", "Device001"]);
    let _hole = e2e::black_hole(&m.url()).await;
    let lambda = Lambda::start(
        &m.url(),
        &[
            ("DIRECTCALL_CLIENT_ID_PREFIX", "lambdatest"),
            ("DIRECTCALL_IDLE_RECONNECT_SECS", "3"),
        ],
    )
    .await;
    let connects = || {
        m.log()
            .lines()
            .filter(|l| l.contains("New client connected") && l.contains("lambdatest-"))
            .count()
    };
    let ok = req(
        "GET",
        "/invoke?request=my_request_1&method=reqid-ABCD&target=Device001&timeout=3",
        false,
        None,
    );
    let (status, body) = lambda.http(1, &ok, Duration::from_secs(30)).await;
    e2e::assert_reference_answer(status, &body);
    assert_eq!(connects(), 1, "one CONNECT, made at init: {}", m.log());

    // The call never outlives the Lambda: 10 s asked, 1.5 s left; the
    // response reaches the Runtime API before the invocation's deadline
    // (the function keeps a margin for sending it).
    let slow = req(
        "GET",
        "/invoke?request=r&method=m&target=Nobody&timeout=10",
        false,
        None,
    );
    let (status, body, ahead_ms) = lambda
        .http_timed(2, &slow, Duration::from_millis(1500))
        .await;
    assert_eq!(status, 504, "{body}");
    assert!(ahead_ms > 0, "answered {} ms after the deadline", -ahead_ms);

    // Warm invocations reused the init connection: still one CONNECT.
    assert_eq!(connects(), 1, "a warm invocation reconnected: {}", m.log());

    // Idle past the keepalive threshold (3 s here), as after a freeze: the
    // connection is made anew before publishing, and the call still works.
    // The idle time is the scenario.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (status, body) = lambda.http(1, &ok, Duration::from_secs(30)).await;
    e2e::assert_reference_answer(status, &body);
    assert_eq!(connects(), 2, "{}", m.log());
}

/// Two warm Lambda instances on one broker, as API Gateway scales out: each
/// receives only the replies to its own calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_warm_lambdas_each_receive_only_their_own_replies() {
    let Some(m) = program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto")) else {
        return;
    };
    let _sim = sim(&m.url(), &["--client-id", "Device001"]);
    let env = [
        ("DIRECTCALL_PREFIX", "invocation_client"),
        ("DIRECTCALL_CLIENT_ID_PREFIX", "invocation_client"),
    ];
    let (a, b) = (
        Lambda::start(&m.url(), &env).await,
        Lambda::start(&m.url(), &env).await,
    );
    let ok = req(
        "GET",
        "/invoke?request=my_request_1&method=reqid-ABCD&target=Device001&timeout=3",
        false,
        None,
    );
    for _ in 0..10 {
        for lambda in [&a, &b] {
            let (status, body) = lambda.http(1, &ok, Duration::from_secs(30)).await;
            e2e::assert_reference_answer(status, &body);
        }
    }
    let metric = |text: &str, line: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in {text}"))
    };
    for lambda in [&a, &b] {
        let (status, text) = lambda
            .http(
                1,
                &req("GET", "/metrics", false, None),
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(status, 200);
        let text = text.as_str().unwrap().to_owned();
        assert_eq!(
            metric(&text, "directcall_replies_completed_total"),
            10,
            "{text}"
        );
        assert_eq!(
            metric(
                &text,
                "directcall_replies_dropped_total{reason=\"unknown\"}"
            ),
            0,
            "another instance's reply reached this one: {text}"
        );
    }
}

/// A group call through the Lambda (REST v1 and HTTP API v2 events): one
/// buffered JSON answer, each result held to 1 KiB (a longer `response` is
/// left out, saying so), NDJSON refused with 406, a list longer than fits
/// 413, the Lambda's timeout bound 400, `Prefer: respond-async` ignored,
/// and never past the invocation's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_call_through_the_lambda_is_buffered() {
    let Some(m) = program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto")) else {
        return;
    };
    let url = m.url();
    let _hole = e2e::black_hole(&url).await;
    let _car = sim(&url, &["--client-id", "Car001", "--echo"]);
    // A device of another make whose answer is 5,000 bytes.
    let broker = directcall_core::BrokerOptions::from_url(&url).unwrap();
    let mut big = directcall_testkit::Raw::connect(&broker, "big-device").await;
    big.subscribe("Big001/#").await;
    let _big = tokio::spawn(async move {
        loop {
            let (topic, request) = big.next().await;
            let l: Vec<&str> = topic.split('/').collect();
            big.publish(
                &format!("{}/{}/{}/{}/ack", l[2], l[3], l[0], l[1]),
                json!({"id": request["id"], "response": "x".repeat(5000)}).to_string(),
            )
            .await;
        }
    });
    let lambda = Lambda::start(&url, &[]).await;
    let group = |body: Value, extra: Vec<(&'static str, String)>| {
        let mut r = req("POST", "/v1/methods/unlock", false, Some(&body.to_string()));
        r.headers.extend(extra);
        r
    };
    let body =
        json!({"targets": ["Car001", "Big001", "Nobody"], "request": "go", "timeout_ms": 1500});
    for version in [1, 2] {
        let (status, answer) = lambda
            .http(
                version,
                &group(body.clone(), vec![]),
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(status, 200, "v{version}: {answer}");
        let results: HashMap<&str, &Value> = answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["target"].as_str().unwrap(), r))
            .collect();
        assert_eq!(results["Car001"]["outcome"], "ok");
        assert_eq!(results["Car001"]["response"], "go");
        assert_eq!(results["Big001"]["outcome"], "ok");
        assert_eq!(results["Big001"]["status"], 200);
        assert!(results["Big001"].get("response").is_none(), "{answer}");
        assert!(
            results["Big001"]["reason"]
                .as_str()
                .unwrap()
                .starts_with("response left out"),
            "{answer}"
        );
        assert_eq!(results["Nobody"]["outcome"], "timeout");
        assert_eq!(answer["summary"]["ok"], 2);
        assert_eq!(answer["summary"]["timeout"], 1);
    }
    // No stream through API Gateway.
    let (status, answer) = lambda
        .http(
            2,
            &group(
                body.clone(),
                vec![("accept", "application/x-ndjson".into())],
            ),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(status, 406, "{answer}");
    assert_eq!(answer["result"], "not_acceptable");
    assert!(
        answer["response"]
            .as_str()
            .unwrap()
            .contains("not available on the Lambda"),
        "{answer}"
    );
    // Past the Lambda's 29 s, or more devices than a 6 MB answer holds.
    let (status, answer) = lambda
        .http(
            1,
            &group(json!({"targets": ["Car001"], "timeout_ms": 30000}), vec![]),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["response"].as_str().unwrap().starts_with(
        "invalid timeout_ms: must be a whole number of milliseconds from 100 to 29000"
    ));
    let many: Vec<String> = (0..2929).map(|i| format!("Car{i:04}")).collect();
    let (status, answer) = lambda
        .http(
            1,
            &group(json!({"targets": many}), vec![]),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(
        answer["response"],
        "targets names 2929 devices; a group call takes at most 2928"
    );
    // A frozen environment runs nothing after its answer: no 202.
    let (status, answer) = lambda
        .http(
            1,
            &group(
                json!({"targets": ["Car001"]}),
                vec![("prefer", "respond-async".into())],
            ),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["summary"]["ok"], 1);
    // 10 s asked, 1.5 s left: answered before the invocation's deadline.
    let (status, answer, ahead_ms) = lambda
        .http_timed(
            2,
            &group(json!({"targets": ["Nobody"], "timeout_ms": 10000}), vec![]),
            Duration::from_millis(1500),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["summary"]["timeout"], 1);
    assert!(ahead_ms > 0, "answered {} ms after the deadline", -ahead_ms);
}
