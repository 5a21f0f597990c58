//! The real `directcall-lambda` binary driven through a Lambda Runtime API
//! served on localhost (the documented endpoints: next, response, error),
//! with API Gateway events, against a real Mosquitto and a simulated device.

mod e2e;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use directcall_bins::Mosquitto;
use serde_json::{json, Value};
use tokio::sync::Notify;

#[derive(Default)]
struct RuntimeApi {
    queue: Mutex<VecDeque<(String, Value, u64)>>,
    queued: Notify,
    responses: Mutex<HashMap<String, Value>>,
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
    api.responses.lock().unwrap().insert(id, value);
    api.answered.notify_waiters();
    StatusCode::ACCEPTED
}

async fn error(State(api): State<Arc<RuntimeApi>>, body: String) -> StatusCode {
    api.errors.lock().unwrap().push(body);
    api.answered.notify_waiters();
    StatusCode::ACCEPTED
}

impl RuntimeApi {
    /// Queues an event and waits for the function's response.
    async fn invoke(&self, event: Value, deadline_in: Duration) -> Value {
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
            if let Some(r) = self.responses.lock().unwrap().remove(&id) {
                return r;
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

fn rest_v1(query: &[(&str, &str)]) -> Value {
    let single: serde_json::Map<String, Value> = query
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let multi: serde_json::Map<String, Value> = query
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!([v])))
        .collect();
    json!({
        "resource": "/invoke", "path": "/invoke/", "httpMethod": "GET",
        "headers": {"Host": "abc123.execute-api.us-east-1.amazonaws.com"},
        "queryStringParameters": single, "multiValueQueryStringParameters": multi,
        "requestContext": {"resourcePath": "/invoke", "httpMethod": "GET", "stage": "Prod"},
        "body": null, "isBase64Encoded": false
    })
}

fn http_v2(raw_query: &str) -> Value {
    json!({
        "version": "2.0", "routeKey": "GET /invoke", "rawPath": "/invoke", "rawQueryString": raw_query,
        "headers": {"host": "abc123.execute-api.us-east-1.amazonaws.com"},
        "requestContext": {"http": {"method": "GET", "path": "/invoke"}, "stage": "$default"},
        "isBase64Encoded": false
    })
}

fn body(response: &Value) -> Value {
    serde_json::from_str(response["body"].as_str().expect("a proxy response body")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lambda_answers_api_gateway_events_on_one_reused_connection() {
    let Some(m) =
        Mosquitto::start("log_type notice\nconnection_messages true\n").expect("mosquitto")
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "mosquitto is required in CI"
        );
        eprintln!("\n*** SKIPPED: mosquitto is not installed ***\n");
        return;
    };
    let _sim = e2e::sim(&m.url(), &["--client-id", "Device001"]);

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

    let mut lambda = std::process::Command::new(env!("CARGO_BIN_EXE_directcall-lambda"))
        .env("AWS_LAMBDA_RUNTIME_API", &runtime_api)
        .env("AWS_LAMBDA_FUNCTION_NAME", "directcall")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "test")
        .env("AWS_REGION", "us-east-1")
        .env("DIRECTCALL_BROKER", m.url())
        .env("DIRECTCALL_CLIENT_ID_PREFIX", "lambdatest")
        .env("DIRECTCALL_IDLE_RECONNECT_SECS", "3")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let connects = || {
        m.log()
            .lines()
            .filter(|l| l.contains("New client connected") && l.contains("lambdatest-"))
            .count()
    };

    // The seed's request, as a REST API (v1) proxy event: 200 with the device's answer.
    let ok = rest_v1(&[
        ("request", "my_request_1"),
        ("method", "reqid-ABCD"),
        ("target", "Device001"),
        ("timeout", "3"),
    ]);
    let r = api.invoke(ok.clone(), Duration::from_secs(30)).await;
    assert_eq!(r["statusCode"], 200, "{r}");
    let b = body(&r);
    assert_eq!(b["result"], "ok");
    assert!(b["response"]
        .as_str()
        .unwrap()
        .starts_with("Your request was 'my_request_1'. Some random response: '"));
    let connected_before_second = connects();
    assert_eq!(
        connected_before_second,
        1,
        "one CONNECT, made at init: {}",
        m.log()
    );

    // An HTTP API (v2) event for a device nobody runs: 504 after its 1 s.
    let r = api
        .invoke(
            http_v2("request=r&method=m&target=Nobody&timeout=1"),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(r["statusCode"], 504, "{r}");
    let elapsed: u64 = body(&r)["elapsed"].as_str().unwrap().parse().unwrap();
    assert!((1000..1500).contains(&elapsed), "{elapsed}");

    // Bad input: 400 naming the parameter, nothing published.
    let r = api
        .invoke(
            rest_v1(&[("request", "r"), ("method", "m"), ("target", "a/b")]),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(r["statusCode"], 400, "{r}");
    assert!(body(&r)["response"]
        .as_str()
        .unwrap()
        .starts_with("invalid target: "));
    // More than API Gateway's 29 s: refused, not cut.
    let r = api
        .invoke(
            rest_v1(&[
                ("request", "r"),
                ("method", "m"),
                ("target", "Device001"),
                ("timeout", "30"),
            ]),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(r["statusCode"], 400, "{r}");

    // The call never outlives the Lambda: 10 s asked, 1.5 s left.
    let started = Instant::now();
    let r = api
        .invoke(
            rest_v1(&[
                ("request", "r"),
                ("method", "m"),
                ("target", "Nobody"),
                ("timeout", "10"),
            ]),
            Duration::from_millis(1500),
        )
        .await;
    assert_eq!(r["statusCode"], 504, "{r}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // Warm invocations reused the init connection: still one CONNECT.
    assert_eq!(connects(), 1, "a warm invocation reconnected: {}", m.log());

    // Idle past the keepalive threshold (3 s here), as after a freeze: the
    // connection is made anew before publishing, and the call still works.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let r = api.invoke(ok, Duration::from_secs(30)).await;
    assert_eq!(r["statusCode"], 200, "{r}");
    assert_eq!(connects(), 2, "{}", m.log());

    let _ = lambda.kill();
    let _ = lambda.wait();
}
