//! End-to-end: the real `directcall` and `directcall-sim` binaries against a
//! Mosquitto started by the harness and against the embedded broker, over
//! real HTTP. Every row of PROTOCOL.md's HTTP table is asserted here.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::e2e;
use crate::e2e::*;
use directcall_testkit::{program, EmbeddedBroker, Mosquitto};
use serde_json::{json, Value};

/// A broker of its own for each test: no two tests share a `Device001`.
struct Broker {
    url: String,
    mosquitto: Option<Mosquitto>,
}

fn embedded() -> Broker {
    let b = EmbeddedBroker::start(None).expect("embedded broker");
    // The binaries read DIRECTCALL_MQTT_VERSION themselves; rumqttd serves
    // each version on its own port.
    let url = match directcall_testkit::mqtt_version() {
        directcall_core::MqttVersion::V5 => b.url_v5(),
        _ => b.url(),
    };
    Broker {
        url,
        mosquitto: None,
    }
}

fn mosquitto() -> Option<Broker> {
    let m = program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto starts"))?;
    Some(Broker {
        url: m.url(),
        mosquitto: Some(m),
    })
}

async fn reference_example_answers_then_times_out(b: Broker) {
    let (_gw, base) = gateway(&b.url, &[]).await;
    wait_health(&base, 200).await;
    let mut sim = sim(&b.url, &["--client-id", "Device001"]);
    let (status, body) = get(&format!("{base}{REFERENCE_QUERY}")).await;
    assert_reference_answer(status, &body);

    sim.kill();
    let (status, body) = get(&format!("{base}{REFERENCE_QUERY}")).await;
    // On MQTT 5 too: the target answered within 10 s, so its request goes
    // at QoS 0 and no PUBACK says "no matching subscribers" (PROTOCOL.md,
    // "MQTT 5"; mqtt5.rs tests both sides of that trade-off).
    // The simulator stopped (no presence record): the caller waits out its
    // 3 s, not less, and not much more (seconds of slack for a loaded
    // machine).
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["result"], "timeout");
    assert_eq!(body["id"].as_str().unwrap().len(), 36);
    let elapsed = elapsed_ms(&body);
    assert!((3000..5000).contains(&elapsed), "elapsed {elapsed} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_example_on_mosquitto() {
    if let Some(b) = mosquitto() {
        reference_example_answers_then_times_out(b).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_example_on_the_embedded_broker() {
    reference_example_answers_then_times_out(embedded()).await;
}

/// HTTP/2 without TLS (h2c, prior knowledge), as a load balancer speaks
/// it: many calls at once on one connection, more than one connection's
/// stream limit, each with its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_speaks_http2_many_calls_on_one_connection() {
    let Some(b) = mosquitto() else { return };
    // 300 calls to one device at once: no per-target bound here.
    let (_gw, base) = gateway(&b.url, &["--max-in-flight-per-target", "0"]).await;
    wait_health(&base, 200).await;
    let _sim = sim(&b.url, &["--client-id", "Device001", "--latency-ms", "200"]);
    let h2 = directcall_bins::bench::h2::Multiplexed::open(&base)
        .await
        .expect("h2c connection");
    let calls = (0..300).map(|i| {
        let h2 = h2.clone();
        async move {
            let path = format!("/invoke?request=r{i}&method=m&target=Device001&timeout=10");
            (i, h2.get(&path).await.expect("HTTP/2 exchange"))
        }
    });
    let answers = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("300 calls within 30 s");
    for (i, r) in answers {
        assert_eq!(r.status, 200, "{}", r.body);
        let body: Value = serde_json::from_str(&r.body).unwrap();
        let answer = body["response"].as_str().unwrap();
        assert!(
            answer.starts_with(&format!("Your request was 'r{i}'")),
            "{answer}"
        );
    }
    assert!(
        directcall_bins::bench::h2::Multiplexed::open("https://127.0.0.1:1")
            .await
            .is_err(),
        "h2c only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_device_is_offline_at_once() {
    let Some(b) = mosquitto() else { return };
    let (_gw, base) = gateway(&b.url, &[]).await;
    wait_health(&base, 200).await;
    let mut car = sim(&b.url, &["--client-id", "Car7", "--presence"]);
    let url = format!("{base}/invoke?request=r&method=m&target=Car7&timeout=5");
    assert_eq!(get(&url).await.0, 200);
    car.kill(); // SIGKILL: no DISCONNECT, the broker publishes the will
    let until = std::time::Instant::now() + Duration::from_secs(15);
    let body = loop {
        let (status, body) = get(&format!(
            "{base}/invoke?request=r&method=m&target=Car7&timeout=1"
        ))
        .await;
        if status == 404 {
            break body;
        }
        assert!(
            std::time::Instant::now() < until,
            "never offline: {status} {body}"
        );
    };
    assert_eq!(body["result"], "offline");
    assert!(elapsed_ms(&body) < 1000, "{body}");
    // back online: callable again
    let _car = sim(&b.url, &["--client-id", "Car7", "--presence"]);
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while get(&url).await.0 != 200 {
        assert!(std::time::Instant::now() < until, "never back online");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_get_400_naming_them_and_big_requests_413() {
    let b = embedded();
    let (_gw, base) = gateway(&b.url, &[]).await;
    wait_health(&base, 200).await;
    let _sim = sim(&b.url, &[]);
    for (query, field) in [
        ("method=m&request=r", "target"),
        ("target=a%2Fb&method=m&request=r", "target"),
        ("target=%23&method=m&request=r", "target"),
        ("target=Device001&request=r", "method"),
        ("target=Device001&method=%2B&request=r", "method"),
        ("target=Device001&method=m", "request"),
        ("target=Device001&method=m&request=r&timeout=0", "timeout"),
        ("target=Device001&method=m&request=r&timeout=61", "timeout"),
        ("target=Device001&method=m&request=r&timeout=abc", "timeout"),
        ("target=Device001&target=x&method=m&request=r", "target"),
    ] {
        let (status, body) = get(&format!("{base}/invoke?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["result"], "invalid_parameters");
        let msg = body["response"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!("invalid {field}: ")),
            "{query}: {msg}"
        );
    }
    let json_ct = [("content-type", "application/json")];
    for (path, headers, body, field) in [
        (
            "/v1/targets/Device001/methods/m",
            &json_ct[..],
            &b"{"[..],
            "body",
        ),
        (
            "/v1/targets/Device001/methods/m",
            &json_ct[..],
            br#"{"timeout_ms":-1}"#,
            "timeout_ms",
        ),
        (
            "/v1/targets/Device001/methods/m",
            &[("content-type", "text/plain")][..],
            b"{}",
            "content-type",
        ),
        (
            "/v1/targets/%24SYS/methods/m",
            &json_ct[..],
            b"{}",
            "target",
        ),
        (
            "/v1/targets/Device001/methods/a%20b",
            &json_ct[..],
            b"{}",
            "method",
        ),
    ] {
        let (status, reply) = post(&base, path, headers, body.to_vec()).await;
        assert_eq!(status, 400, "{path}: {reply}");
        let msg = reply["response"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!("invalid {field}: ")),
            "{path}: {msg}"
        );
    }
    // POST with a JSON request works
    let (status, reply) = post(
        &base,
        "/v1/targets/Device001/methods/m",
        &json_ct,
        br#"{"request":{"x":1},"timeout_ms":3000}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply["response"]
        .as_str()
        .unwrap()
        .starts_with("Your request was '{\"x\":1}'"));

    let big = serde_json::to_vec(&json!({"request": "x".repeat(200 * 1024)})).unwrap();
    let (status, reply) = post(&base, "/v1/targets/Device001/methods/m", &json_ct, big).await;
    assert_eq!(
        (status, reply["result"].as_str()),
        (413, Some("payload_too_large")),
        "{reply}"
    );
    let long = "x".repeat(50 * 1024);
    let (status, reply) = get(&format!(
        "{base}/invoke?target=Device001&method=m&request={long}"
    ))
    .await;
    assert_eq!(
        (status, reply["result"].as_str()),
        (413, Some("payload_too_large")),
        "{reply}"
    );

    assert_eq!(get(&format!("{base}/nowhere")).await.0, 404);
    assert_eq!(post(&base, "/invoke", &[], Vec::new()).await.0, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_broker_means_503_and_recovery_without_restarts() {
    let Some(mut b) = mosquitto() else { return };
    let (_gw, base) = gateway(&b.url, &[]).await;
    wait_health(&base, 200).await;
    let _sim = sim(&b.url, &[]);
    assert_reference_answer_ok(&base).await;
    b.mosquitto.as_mut().unwrap().kill();
    wait_health(&base, 503).await;
    let (status, body) = get(&format!("{base}{REFERENCE_QUERY}")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["result"], "unavailable");
    b.mosquitto.as_mut().unwrap().restart().unwrap();
    wait_health(&base, 200).await;
    // the simulator reconnects by itself too
    let until = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get(&format!("{base}{REFERENCE_QUERY}")).await;
        if status == 200 {
            assert_reference_answer(status, &body);
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "never recovered: {status} {body}"
        );
    }
}

async fn assert_reference_answer_ok(base: &str) {
    let (status, body) = get(&format!("{base}{REFERENCE_QUERY}")).await;
    assert_reference_answer(status, &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_guard_calls_and_metrics() {
    let b = embedded();
    let (_gw, base) = gateway(&b.url, &["--api-token", "alpha,beta"]).await;
    wait_health(&base, 200).await;
    let _sim = sim(&b.url, &[]);
    let url = format!("{base}{REFERENCE_QUERY}");
    let (status, body) = get(&url).await;
    assert_eq!((status, body), (401, json!({"result": "unauthorized"})));
    assert_eq!(
        get_with(&url, &[("authorization", "Bearer alphA")]).await.0,
        401
    );
    assert_eq!(get_with(&url, &[("authorization", "alpha")]).await.0, 401);
    let (status, body) = get_with(&url, &[("authorization", "Bearer beta")]).await;
    assert_reference_answer(status, &body);
    assert_eq!(get(&format!("{base}/metrics")).await.0, 401);
    let (status, metrics) = get_with(
        &format!("{base}/metrics"),
        &[("authorization", "Bearer alpha")],
    )
    .await;
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains("directcall_calls_total{outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("directcall_calls_total{outcome=\"unauthorized\"} 4"),
        "{text}"
    );
    // Durations by outcome: no timeout mixed in with the answers.
    assert!(
        text.contains("directcall_call_duration_seconds_count{outcome=\"ok\"} 1"),
        "{text}"
    );
    // Which build, and the process's own figures.
    assert!(
        text.contains(&format!(
            "directcall_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(text.contains("directcall_presence_devices"), "{text}");
    for process in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(text.contains(process), "{process} missing: {text}");
    }
    assert!(text.contains("directcall_broker_connected 1"), "{text}");
    // health and the API description stay public
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    assert_eq!(get(&format!("{base}/openapi.json")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_calls_in_flight_finish_then_exits_0() {
    let b = embedded();
    let (mut gw, base) = gateway(&b.url, &[]).await;
    wait_health(&base, 200).await;
    let _sim = sim(&b.url, &["--latency-ms", "1500"]);
    let in_flight = tokio::spawn({
        let url = format!("{base}{REFERENCE_QUERY}");
        async move { get(&url).await }
    });
    wait_pending(&base, 1).await;
    gw.terminate();
    let (status, body) = in_flight.await.unwrap();
    assert_reference_answer(status, &body);
    assert!(elapsed_ms(&body) >= 1500);
    let exit = tokio::task::spawn_blocking(move || gw.wait_exit(15))
        .await
        .unwrap();
    assert!(exit.success(), "{exit}");
    assert!(
        directcall_bins::http_client::get(&format!("{base}/healthz"), &[])
            .await
            .is_err(),
        "still accepting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invoke_command_prints_the_gateway_json_with_exit_codes() {
    let b = embedded();
    let _sim = sim(&b.url, &["--methods", "unlock"]);
    let run = |args: &[&str]| {
        let mut all = vec!["invoke", "--broker", b.url.as_str()];
        all.extend_from_slice(args);
        let out = std::process::Command::new(DIRECTCALL)
            .args(&all)
            .output()
            .unwrap();
        let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.code(), body)
    };
    let (code, body) = run(&[
        "--target",
        "Device001",
        "--method",
        "unlock",
        "--request",
        "my_request_1",
        "--timeout",
        "3",
    ]);
    assert_eq!(code, Some(0), "{body}");
    assert_eq!(body["result"], "ok");
    assert!(body["response"]
        .as_str()
        .unwrap()
        .starts_with("Your request was 'my_request_1'"));
    let (code, body) = run(&["--target", "Device001", "--method", "fly", "--timeout", "3"]);
    assert_eq!(
        (code, body["status"].as_u64()),
        (Some(6), Some(404)),
        "{body}"
    );
    let (code, body) = run(&["--target", "Nobody", "--method", "unlock", "--timeout", "1"]);
    assert_eq!(
        (code, body["result"].as_str()),
        (Some(3), Some("timeout")),
        "{body}"
    );
    let (code, body) = run(&["--target", "a/b", "--method", "unlock"]);
    assert_eq!(
        (code, body["result"].as_str()),
        (Some(2), Some("invalid_parameters")),
        "{body}"
    );
    let port = directcall_testkit::free_port().unwrap().to_string();
    let out = std::process::Command::new(DIRECTCALL)
        .args([
            "invoke",
            "--broker",
            &format!("mqtt://127.0.0.1:{port}"),
            "--target",
            "x",
            "--method",
            "m",
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (out.status.code(), body["result"].as_str()),
        (Some(5), Some("unavailable")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_command_prints_status_and_body() {
    let b = embedded();
    let (_gw, base) = gateway(&b.url, &[]).await;
    wait_health(&base, 200).await;
    let _sim = sim(&b.url, &[]);
    let out = std::process::Command::new(DIRECTCALL)
        .args(["call", &format!("{base}{REFERENCE_QUERY}")])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (first, rest) = stdout.split_once('\n').unwrap();
    assert_eq!(first, "HTTP 200");
    let body: Value = serde_json::from_str(rest.trim()).unwrap();
    assert_reference_answer(200, &body);
    assert_eq!(out.status.code(), Some(0));
    let out = std::process::Command::new(DIRECTCALL)
        .args(["call", &format!("{base}/invoke?target=x")])
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .starts_with("HTTP 400\n"));
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_knobs() {
    let b = embedded();
    let (_gw, base) = gateway(&b.url, &[]).await;
    wait_health(&base, 200).await;
    let _fleet = sim(&b.url, &["--devices", "3", "--methods", "a,b"]);
    let _broken = sim(&b.url, &["--client-id", "Broken", "--fail-rate", "1"]);
    for target in ["Device001", "Device002", "Device003"] {
        let (status, body) = get(&format!(
            "{base}/invoke?request=r&method=b&target={target}&timeout=5"
        ))
        .await;
        assert_eq!(
            (status, body["status"].as_u64()),
            (200, Some(200)),
            "{target}: {body}"
        );
    }
    let (_, body) = get(&format!(
        "{base}/invoke?request=r&method=c&target=Device002&timeout=5"
    ))
    .await;
    assert_eq!(
        (body["status"].as_u64(), body["response"].as_str()),
        (Some(404), Some("unknown method 'c'"))
    );
    let (_, body) = get(&format!(
        "{base}/invoke?request=r&method=c&target=Broken&timeout=5"
    ))
    .await;
    assert_eq!(
        (body["status"].as_u64(), body["response"].as_str()),
        (Some(500), Some("simulated failure"))
    );
}

/// `directcall-sim --group`: every simulated device joins each group, its
/// presence record lists them, and a group call from the library (one
/// publish on the group's topic) is answered by each, on its own reply
/// topic, as the presence records promised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_devices_join_their_groups_and_say_so_in_presence() {
    let e = EmbeddedBroker::start(None).expect("embedded broker");
    let broker = match directcall_testkit::mqtt_version() {
        directcall_core::MqttVersion::V5 => e.options_v5(),
        _ => e.options(),
    };
    let prefix = directcall_testkit::unique("Kiosk");
    let _fleet = sim(
        &broker.url(),
        &[
            "--devices",
            "3",
            "--id-prefix",
            &prefix,
            "--presence",
            "--group",
            "lobby",
            "--group",
            "floor-2",
        ],
    );
    let names: BTreeSet<String> = (1..=3).map(|i| format!("{prefix}{i:03}")).collect();
    let mut watcher =
        directcall_testkit::Raw::connect(&e.options(), &directcall_testkit::unique("watcher"))
            .await;
    watcher.subscribe("directcall/presence/+").await;
    let mut records = BTreeSet::new();
    for _ in 0..3 {
        let (topic, record) = watcher.next().await;
        assert_eq!(
            record,
            json!({"online": true, "groups": ["lobby", "floor-2"]}),
            "{topic}"
        );
        records.insert(topic.trim_start_matches("directcall/presence/").to_owned());
    }
    assert_eq!(records, names);

    let requester = directcall_cloud::Requester::connect(
        directcall_cloud::Options::new(broker).presence(directcall_core::PresenceRoot::default()),
    )
    .await
    .expect("requester connects");
    directcall_testkit::eventually(10, || requester.devices().len() == 3).await;
    let call = directcall_cloud::GroupInvocation::group("floor-2", "ping", "r")
        .unwrap()
        .timeout(Duration::from_secs(5));
    let outcome = requester.invoke_group(call).await.unwrap().collect().await;
    assert_eq!(outcome.summary.expected, Some(3), "{outcome:?}");
    assert_eq!(outcome.summary.ok, 3, "{outcome:?}");
    let answered: BTreeSet<String> = outcome
        .results
        .iter()
        .map(|r| r.target.to_string())
        .collect();
    assert_eq!(answered, names);
    for r in &outcome.results {
        let text = r
            .response
            .as_ref()
            .and_then(Value::as_str)
            .unwrap_or_default();
        assert!(text.starts_with("Your request was 'r'"), "{r:?}");
    }
    assert!(
        outcome.summary.elapsed_ms < 5000,
        "ends when every member answered: {outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_a_curl_line_that_works() {
    let port = directcall_testkit::free_port().unwrap().to_string();
    let demo = Proc::spawn(
        DIRECTCALL,
        &["demo", "--listen", &format!("127.0.0.1:{port}")],
    );
    let line = demo.wait_line("curl '");
    let url = line
        .trim()
        .trim_start_matches("curl '")
        .trim_end_matches('\'');
    assert_eq!(url, format!("http://127.0.0.1:{port}{REFERENCE_QUERY}"));
    let (status, body) = get(url).await;
    assert_reference_answer(status, &body);
}

/// Every (route, method, status) the gateway answered in this run is in
/// /openapi.json, and everything /openapi.json promises was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_gateway() {
    let Some(mut b) = mosquitto() else { return };
    // Nobody's calls time out (504) on MQTT 5 too.
    let _hole = e2e::black_hole(&b.url).await;
    // `tok` may call everything; `narrow` only `m` on Device001, once a minute.
    let creds = b.mosquitto.as_ref().unwrap().dir().join("credentials.toml");
    std::fs::write(
        &creds,
        "[[credentials]]\nname = \"narrow\"\ntoken = \"narrow-secret\"\ntargets = [\"Device001\"]\nmethods = [\"m\"]\nrate_per_second = 1\nburst = 1\n",
    )
    .unwrap();
    let creds = creds.to_str().unwrap();
    let (_gw, base) = gateway(&b.url, &["--api-token", "tok", "--credentials", creds]).await;
    wait_health(&base, 200).await;
    let _device = sim(&b.url, &[]);
    let mut gone = sim(&b.url, &["--client-id", "Gone", "--presence"]);
    gone.kill();
    // A device whose status is a string: every call to it is a 502.
    let mut odd = directcall_testkit::Raw::connect(
        &directcall_core::BrokerOptions::from_url(&b.url).unwrap(),
        "odd-device",
    )
    .await;
    odd.subscribe("Odd001/#").await;
    let _odd = tokio::spawn(async move {
        loop {
            let (topic, request) = odd.next().await;
            let l: Vec<&str> = topic.split('/').collect();
            odd.publish(
                &format!("{}/{}/{}/{}/ack", l[2], l[3], l[0], l[1]),
                serde_json::json!({"id": request["id"], "status": "201"}).to_string(),
            )
            .await;
        }
    });
    let (_, doc) = get(&format!("{base}/openapi.json")).await;
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for code in op["responses"].as_object().unwrap().keys() {
                documented.insert((path.clone(), method.clone(), code.parse::<u16>().unwrap()));
            }
        }
    }
    let auth = [("authorization", "Bearer tok")];
    let json_auth = [
        ("authorization", "Bearer tok"),
        ("content-type", "application/json"),
    ];
    let mut seen = BTreeSet::new();
    let mut note = |path: &str, method: &str, status: u16| {
        seen.insert((path.to_owned(), method.to_owned(), status));
    };
    // Offline needs the will to have arrived.
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while get_with(
        &format!("{base}/invoke?request=r&method=m&target=Gone&timeout=1"),
        &auth,
    )
    .await
    .0 != 404
    {
        assert!(std::time::Instant::now() < until);
    }
    for route in ["/invoke", "/invoke/"] {
        for (query, headers) in [
            ("request=r&method=m&target=Device001&timeout=3", &auth[..]),
            ("request=r&method=m&target=Device001", &[][..]),
            ("request=r&method=m&target=a/b", &auth[..]),
            ("request=r&method=m&target=Gone&timeout=1", &auth[..]),
            ("request=r&method=m&target=Nobody&timeout=1", &auth[..]),
            ("request=r&method=m&target=Odd001&timeout=3", &auth[..]),
        ] {
            let (status, _) = get_with(&format!("{base}{route}?{query}"), headers).await;
            note(route, "get", status);
        }
        let long = "x".repeat(50 * 1024);
        let (status, _) = get_with(
            &format!("{base}{route}?request={long}&method=m&target=Device001"),
            &auth,
        )
        .await;
        note(route, "get", status);
    }
    let post_route = "/v1/targets/{target}/methods/{method}";
    for (target, headers, body) in [
        (
            "Device001",
            &json_auth[..],
            br#"{"request":1,"timeout_ms":3000}"#.to_vec(),
        ),
        (
            "Device001",
            &[("content-type", "application/json")][..],
            b"{}".to_vec(),
        ),
        ("Device001", &json_auth[..], b"[".to_vec()),
        ("Gone", &json_auth[..], br#"{"timeout_ms":1000}"#.to_vec()),
        ("Nobody", &json_auth[..], br#"{"timeout_ms":1000}"#.to_vec()),
        ("Odd001", &json_auth[..], br#"{"timeout_ms":3000}"#.to_vec()),
        ("Device001", &json_auth[..], vec![b' '; 129 * 1024]),
    ] {
        let (status, _) = post(
            &base,
            &format!("/v1/targets/{target}/methods/m"),
            headers,
            body,
        )
        .await;
        note(post_route, "post", status);
    }
    // Group calls: answered, no token, a bad body, a list too long.
    let group_route = "/v1/methods/{method}";
    let many: Vec<String> = (0..100_001).map(|i| format!("d{i}")).collect();
    for (headers, body) in [
        (
            &json_auth[..],
            serde_json::json!({"targets": ["Device001", "Nobody"], "timeout_ms": 1000})
                .to_string()
                .into_bytes(),
        ),
        (
            &[("content-type", "application/json")][..],
            br#"{"targets":["Device001"]}"#.to_vec(),
        ),
        (&json_auth[..], br#"{"targets":["a/b"]}"#.to_vec()),
        (
            &json_auth[..],
            serde_json::json!({ "targets": many })
                .to_string()
                .into_bytes(),
        ),
    ] {
        let (status, _) = post(&base, "/v1/methods/m", headers, body).await;
        note(group_route, "post", status);
    }
    // Outside the narrow credential's scope: 403; past its rate: 429.
    let narrow = [("authorization", "Bearer narrow-secret")];
    let narrow_json = [
        ("authorization", "Bearer narrow-secret"),
        ("content-type", "application/json"),
    ];
    for route in ["/invoke", "/invoke/"] {
        let (status, _) = get_with(
            &format!("{base}{route}?request=r&method=other&target=Device001&timeout=3"),
            &narrow,
        )
        .await;
        note(route, "get", status);
    }
    let (status, _) = post(
        &base,
        "/v1/targets/Device001/methods/other",
        &narrow_json,
        b"{}".to_vec(),
    )
    .await;
    note(post_route, "post", status);
    // A group outside the narrow credential's scope (it names none): 403.
    let (status, _) = post(
        &base,
        "/v1/methods/m",
        &narrow_json,
        br#"{"group":"lobby"}"#.to_vec(),
    )
    .await;
    note(group_route, "post", status);
    for _ in 0..2 {
        let (status, _) = post(
            &base,
            "/v1/methods/m",
            &narrow_json,
            br#"{"targets":["Device001"],"timeout_ms":3000}"#.to_vec(),
        )
        .await;
        note(group_route, "post", status);
        for route in ["/invoke", "/invoke/"] {
            let (status, _) = get_with(
                &format!("{base}{route}?request=r&method=m&target=Device001&timeout=3"),
                &narrow,
            )
            .await;
            note(route, "get", status);
        }
        let (status, _) = post(
            &base,
            "/v1/targets/Device001/methods/m",
            &narrow_json,
            b"{}".to_vec(),
        )
        .await;
        note(post_route, "post", status);
    }
    // An idempotency key reused for another call: 409 on every form.
    for (i, route) in ["/invoke", "/invoke/"].into_iter().enumerate() {
        let key = format!("k-get-{i}");
        let keyed = [
            ("authorization", "Bearer tok"),
            ("idempotency-key", key.as_str()),
        ];
        for request in ["one", "two"] {
            let (status, _) = get_with(
                &format!("{base}{route}?request={request}&method=m&target=Device001&timeout=3"),
                &keyed,
            )
            .await;
            note(route, "get", status);
        }
    }
    for request in ["1", "2"] {
        let keyed = [
            ("authorization", "Bearer tok"),
            ("content-type", "application/json"),
            ("idempotency-key", "k-post"),
        ];
        let body = format!(r#"{{"request":{request},"timeout_ms":3000}}"#).into_bytes();
        let (status, _) = post(&base, "/v1/targets/Device001/methods/m", &keyed, body).await;
        note(post_route, "post", status);
    }
    // Asynchronously: 202.
    let prefer = [
        ("authorization", "Bearer tok"),
        ("content-type", "application/json"),
        ("prefer", "respond-async"),
    ];
    let (status, _) = post(
        &base,
        "/v1/targets/Device001/methods/m",
        &prefer,
        b"{}".to_vec(),
    )
    .await;
    note(post_route, "post", status);
    // A group call: a key reused for another one (409), and 202 with its
    // record: found, not a call id, no token, unknown.
    for request in ["1", "2"] {
        let keyed = [
            ("authorization", "Bearer tok"),
            ("content-type", "application/json"),
            ("idempotency-key", "k-group"),
        ];
        let body = format!(r#"{{"targets":["Device001"],"request":{request}}}"#).into_bytes();
        let (status, _) = post(&base, "/v1/methods/m", &keyed, body).await;
        note(group_route, "post", status);
    }
    let (status, accepted) = post(
        &base,
        "/v1/methods/m",
        &prefer,
        br#"{"targets":["Device001"]}"#.to_vec(),
    )
    .await;
    note(group_route, "post", status);
    let group_record = accepted["group"].as_str().unwrap_or_default().to_owned();
    for (path, headers) in [
        (format!("{group_record}?wait=3"), &auth[..]),
        ("/v1/groups/nope".to_owned(), &auth[..]),
        (group_record.clone(), &[][..]),
        (
            format!("/v1/groups/{}", directcall_core::MessageId::new()),
            &auth[..],
        ),
    ] {
        note(
            "/v1/groups/{id}",
            "get",
            get_with(&format!("{base}{path}"), headers).await.0,
        );
    }
    // A call's record: found, not a call id, no token, unknown.
    let (status, answered) = get_with(
        &format!("{base}/invoke?request=r&method=other&target=Device001&timeout=3"),
        &auth,
    )
    .await;
    assert_eq!(status, 200, "{answered}");
    let records = "/v1/calls/{id}";
    let id = answered["id"].as_str().unwrap();
    // The record sent is the CallRecord's own JSON: every field of it is
    // in the documented schema, and the schema's required ones are there.
    let (_, record) = get_with(&format!("{base}/v1/calls/{id}"), &auth).await;
    let schema = &doc["components"]["schemas"]["CallRecordBody"];
    let fields: BTreeSet<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for key in record.as_object().unwrap().keys() {
        assert!(
            fields.contains(key.as_str()),
            "{key} is not in CallRecordBody"
        );
    }
    for key in schema["required"].as_array().unwrap() {
        assert!(
            record.get(key.as_str().unwrap()).is_some(),
            "{key} missing: {record}"
        );
    }
    for (path, headers) in [
        (format!("/v1/calls/{id}"), &narrow[..]),
        (format!("/v1/calls/{id}"), &auth[..]),
        ("/v1/calls/nope".to_owned(), &auth[..]),
        (format!("/v1/calls/{id}"), &[][..]),
        (
            format!("/v1/calls/{}", directcall_core::MessageId::new()),
            &auth[..],
        ),
    ] {
        note(
            records,
            "get",
            get_with(&format!("{base}{path}"), headers).await.0,
        );
    }
    // The console's routes: the device list and the event stream.
    for headers in [&auth[..], &[][..]] {
        note(
            "/v1/devices",
            "get",
            get_with(&format!("{base}/v1/devices"), headers).await.0,
        );
        note(
            "/v1/devices",
            "get",
            get_with(&format!("{base}/v1/devices?limit=0"), headers)
                .await
                .0,
        );
        let (status, head) = e2e::stream_status(&base, "/v1/events", headers).await;
        if status == 200 {
            assert!(
                head.iter()
                    .any(|(n, v)| n == "content-type" && v.starts_with("text/event-stream")),
                "{head:?}"
            );
        }
        note("/v1/events", "get", status);
    }
    note("/healthz", "get", get(&format!("{base}/healthz")).await.0);
    note("/livez", "get", get(&format!("{base}/livez")).await.0);
    note("/readyz", "get", get(&format!("{base}/readyz")).await.0);
    note("/metrics", "get", get(&format!("{base}/metrics")).await.0);
    note(
        "/metrics",
        "get",
        get_with(&format!("{base}/metrics"), &auth).await.0,
    );
    note(
        "/openapi.json",
        "get",
        get(&format!("{base}/openapi.json")).await.0,
    );
    // and with the broker gone: 503 on every call route and on /healthz
    b.mosquitto.as_mut().unwrap().kill();
    wait_health(&base, 503).await;
    note("/healthz", "get", 503);
    note("/readyz", "get", get(&format!("{base}/readyz")).await.0);
    for route in ["/invoke", "/invoke/"] {
        let (status, _) = get_with(
            &format!("{base}{route}?request=r&method=m&target=Device001"),
            &auth,
        )
        .await;
        note(route, "get", status);
    }
    let (status, _) = post(
        &base,
        "/v1/targets/Device001/methods/m",
        &json_auth,
        b"{}".to_vec(),
    )
    .await;
    note(post_route, "post", status);
    let (status, _) = post(
        &base,
        "/v1/methods/m",
        &json_auth,
        br#"{"targets":["Device001"]}"#.to_vec(),
    )
    .await;
    note(group_route, "post", status);

    let undocumented: Vec<_> = seen.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "answered but not in openapi.json: {undocumented:?}"
    );
    let unseen: Vec<_> = documented.difference(&seen).collect();
    assert!(
        unseen.is_empty(),
        "in openapi.json but never answered: {unseen:?}"
    );
}

/// `directcall call --sigv4` signs exactly the request it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_command_signs_with_sigv4() {
    use axum::http::HeaderMap;
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Option<HeaderMap>>> = Arc::default();
    let app = axum::Router::new().fallback({
        let seen = Arc::clone(&seen);
        move |headers: HeaderMap| {
            *seen.lock().unwrap() = Some(headers);
            async { "{\"result\":\"ok\"}" }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/Prod/invoke/?request=my_request_1&method=reqid-ABCD&target=Device001&timeout=3");
    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            std::process::Command::new(DIRECTCALL)
                .args(["call", "--sigv4", "--region", "eu-west-1", &url])
                .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
                .env(
                    "AWS_SECRET_ACCESS_KEY",
                    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                )
                .env("AWS_SESSION_TOKEN", "session-token")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers = seen.lock().unwrap().clone().expect("the request arrived");
    let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
    let date = h("x-amz-date").expect("x-amz-date");
    assert_eq!(h("x-amz-security-token").as_deref(), Some("session-token"));
    // Recompute for the time it used: same URL, same credentials, same signature.
    let when = chrono_like_parse(&date);
    let creds = directcall_cloud::sigv4::AwsSigV4::new(
        "eu-west-1",
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    )
    .session_token("session-token");
    let expected =
        directcall_cloud::sigv4::sign_get_headers(&url, "execute-api", &creds, when).unwrap();
    let auth = expected
        .iter()
        .find(|(k, _)| k == "authorization")
        .unwrap()
        .1
        .clone();
    assert_eq!(h("authorization"), Some(auth));
}

/// `YYYYMMDDTHHMMSSZ` to a time (UTC), without a date crate.
fn chrono_like_parse(s: &str) -> std::time::SystemTime {
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
    let (y, m, d, hh, mm, ss) = (n(0, 4), n(4, 6), n(6, 8), n(9, 11), n(11, 13), n(13, 15));
    // days from civil (Howard Hinnant's algorithm)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    std::time::UNIX_EPOCH + Duration::from_secs((days * 86_400 + hh * 3600 + mm * 60 + ss) as u64)
}

/// `directcall bench --mode slow`, small: a gateway child process holds the
/// slow calls, every one is answered, and the report has its figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slow_calls_bench_holds_them_all_and_reports() {
    if program::MOSQUITTO.require().is_none() {
        return;
    }
    let mut bench = Proc::spawn(
        DIRECTCALL,
        &[
            "bench",
            "--mode",
            "slow",
            "--mosquitto",
            "--slow-calls",
            "300",
            "--slow-latency-ms",
            "3000",
            "--h2-connections",
            "4",
            "--calls",
            "100",
            "--warmup",
            "10",
            "--json",
        ],
    );
    let line = bench.wait_line("\"mode\":\"slow\"");
    assert!(bench.wait_exit(30).success());
    let report: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(report["slow_status"], json!({"200": 300}), "{report}");
    assert_eq!(report["waiting_before_fast"], 300, "{report}");
    assert_eq!(report["fast_alone"]["ok"], 100, "{report}");
    assert_eq!(report["fast_beside"]["errors"], 0, "{report}");
    assert!(
        report["fast_beside"]["ok"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["gateway_rss_loaded_mb"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

/// `directcall bench --mode http --compare-raw`, small: the floor is the
/// bare HTTP→MQTT bridge, every call of both sides answered, and the
/// ratios reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_bench_compares_with_a_bare_bridge() {
    if program::MOSQUITTO.require().is_none() {
        return;
    }
    let mut bench = Proc::spawn(
        DIRECTCALL,
        &[
            "bench",
            "--mode",
            "http",
            "--mosquitto",
            "--compare-raw",
            "--calls",
            "200",
            "--warmup",
            "20",
            "--concurrency",
            "4",
            "--json",
        ],
    );
    let line = bench.wait_line("\"floor\":\"bridge\"");
    assert!(bench.wait_exit(60).success());
    let report: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(report["ok"], 200, "{report}");
    assert_eq!(report["raw"]["ok"], 200, "{report}");
    assert_eq!(report["raw"]["errors"], 0, "{report}");
    assert!(
        report["ratio_calls_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

/// `directcall bench --mode group`, small, each form: every device
/// answers every group call, on both sides of the comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_bench_reaches_every_device_on_both_sides() {
    if program::MOSQUITTO.require().is_none() {
        return;
    }
    for form in ["group", "list", "match"] {
        let mut bench = Proc::spawn(
            DIRECTCALL,
            &[
                "bench",
                "--mode",
                "group",
                "--group-form",
                form,
                "--mosquitto",
                "--devices",
                "20",
                "--calls",
                "2",
                "--compare-raw",
                "--json",
            ],
        );
        let line = bench.wait_line("\"mode\":\"group\"");
        assert!(bench.wait_exit(60).success());
        let report: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(report["form"], form, "{report}");
        assert_eq!(report["directcall"]["answered"], 20, "{report}");
        assert_eq!(report["raw"]["answered"], 20, "{report}");
        assert!(report["ratio_last"].as_f64().unwrap() > 0.0, "{report}");
    }
}
