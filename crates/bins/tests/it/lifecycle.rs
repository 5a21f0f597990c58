//! The gateway as an orchestrator runs it: the liveness and readiness
//! probes, and the SIGTERM sequence (not ready, a delay while still
//! serving, a bounded drain, calls answered 202 kept on their records)
//! against the real `directcall` binary, a Mosquitto and a Redis of the
//! test's own.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::e2e;
use directcall_device::Router;
use directcall_testkit::{program, RedisServer};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_is_the_process_and_readyz_is_the_broker_and_presence() {
    let Some(mut b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let (_gw, base) =
        e2e::gateway(&b.url(), &["--presence", "directcall", "--strict-presence"]).await;
    let ready = format!("{base}/readyz");
    let body = wait_for(20, "ready", || async {
        let (status, body) = e2e::get(&ready).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(
        body,
        json!({"status": "ready", "broker": "connected", "presence": "loaded", "draining": false})
    );
    assert_eq!(
        e2e::get(&format!("{base}/livez")).await,
        (200, json!({"status": "ok"}))
    );

    // The broker goes away: not ready, still alive (a restart would not
    // bring the broker back).
    b.mosquitto.as_mut().unwrap().kill();
    let body = wait_for(20, "not ready without the broker", || async {
        let (status, body) = e2e::get(&ready).await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["broker"], "disconnected", "{body}");
    assert_eq!(body["draining"], false, "{body}");
    assert_eq!(e2e::get(&format!("{base}/livez")).await.0, 200);

    // Back: ready again, the snapshot loaded on the new connection.
    b.mosquitto.as_mut().unwrap().restart().unwrap();
    let body = wait_for(30, "ready again", || async {
        let (status, body) = e2e::get(&ready).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(body["presence"], "loaded", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_best_effort_presence_and_never_needs_a_token() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let (_gw, base) = e2e::gateway(&b.url(), &["--api-token", "tok"]).await;
    let ready = format!("{base}/readyz");
    let body = wait_for(20, "ready", || async {
        let (status, body) = e2e::get(&ready).await;
        (status == 200).then_some(body)
    })
    .await;
    // Presence records are read by default, without strict presence: the
    // gateway cannot know when all are in, and does not wait for them.
    assert_eq!(body["presence"], "best_effort", "{body}");
    // The API itself still wants the token.
    let (status, _) = e2e::get(&format!(
        "{base}/invoke?request=r&method=m&target=Device001&timeout=1"
    ))
    .await;
    assert_eq!(status, 401);
}

async fn submit(base: &str, target: &str, timeout_ms: u64) -> String {
    let (status, body) = e2e::post(
        base,
        &format!("/v1/targets/{target}/methods/unlock"),
        &[
            ("content-type", "application/json"),
            ("prefer", "respond-async"),
        ],
        format!(r#"{{"request":"r","timeout_ms":{timeout_ms}}}"#).into_bytes(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_not_ready_serves_through_the_delay_then_drains_within_the_bound() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let Some(redis) = program::REDIS_SERVER.or_skip(RedisServer::start().expect("redis-server"))
    else {
        return;
    };
    let store = redis.url();
    // A device that answers in 2.5 s (after the delay: the drain waits
    // for it), and a target that never answers
    // (subscribed, so that MQTT 5 does not call it offline at once).
    let car = unique("car");
    let router = Router::new().method("unlock", |_call| async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        Ok(json!("unlocked"))
    });
    let _device = device(&b, &car, router).await;
    let _hole = b.black_hole().await;
    let silent = unique("silent");

    let flags = [
        "--store",
        store.as_str(),
        "--max-timeout",
        "60",
        "--shutdown-delay",
        "1.5",
        "--shutdown-timeout",
        "3",
    ];
    let (mut a, base_a, logs) = e2e::gateway_logged(&b.url(), &flags).await;
    let (_b, base_b) = e2e::gateway(&b.url(), &["--store", store.as_str()]).await;
    e2e::wait_health(&base_a, 200).await;
    e2e::wait_health(&base_b, 200).await;

    // Two calls answered 202: one ends within the drain, one cannot.
    let answers = submit(&base_a, &car, 10_000).await;
    let never = submit(&base_a, &silent, 50_000).await;
    // A long poll on the call that never ends.
    let poll = tokio::spawn({
        let url = format!("{base_a}/v1/calls/{never}?wait=50");
        async move {
            let started = Instant::now();
            let (status, body) = e2e::get(&url).await;
            (status, body, started.elapsed())
        }
    });

    let term = Instant::now();
    a.terminate();
    // Not ready, and still serving (it answered) while alive.
    let ready = format!("{base_a}/readyz");
    let body = wait_for(5, "not ready after SIGTERM", || async {
        let (status, body) = e2e::get(&ready).await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(body["draining"], true, "{body}");
    assert_eq!(body["broker"], "connected", "{body}");
    assert_eq!(e2e::get(&format!("{base_a}/livez")).await.0, 200);

    // The long poll ends when the server stops accepting, not at 50 s.
    let (status, record, waited) = poll.await.unwrap();
    assert_eq!(status, 200, "{record}");
    assert!(waited < Duration::from_secs(15), "{waited:?}");
    assert!(
        matches!(record["state"].as_str(), Some("sent" | "delivered")),
        "{record}"
    );

    // The process ends within delay + timeout (+ the store's flush and
    // slack for a loaded machine), with exit code 0.
    let exit = tokio::task::spawn_blocking(move || a.wait_exit(20))
        .await
        .unwrap();
    assert!(exit.success(), "{exit}");
    let took = term.elapsed();
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");

    // Through the other replica: the call that could end did, and the one
    // that could not says why.
    let record = |id: String| {
        let url = format!("{base_b}/v1/calls/{id}");
        async move {
            let (status, body) = e2e::get(&url).await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let ended: Value = record(answers).await;
    assert_eq!(ended["state"], "answered", "{ended}");
    assert_eq!(ended["response"], json!("unlocked"), "{ended}");
    let cut: Value = record(never).await;
    assert_eq!(cut["state"], "unavailable", "{cut}");
    assert_eq!(cut["reason"], directcall_cloud::SHUT_DOWN_REASON, "{cut}");
    let logs = logs.lock().unwrap().join("\n");
    assert!(logs.contains("calls still open"), "{logs}");
}

/// Over HTTPS the drain has the same bound: a call that would take 8 s is
/// ended when `--shutdown-timeout 1` is up (503, saying it may have run),
/// and the process exits 0 long before the call's own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_drain_is_bounded_by_the_shutdown_timeout() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let Some(curl) = program::CURL.require() else {
        return;
    };
    let Some(pki) = crate::common::pki::Pki::new("drain") else {
        return;
    };
    pki.issue("server");
    let car = unique("car");
    let router = Router::new().method("unlock", |_call| async {
        tokio::time::sleep(Duration::from_secs(8)).await;
        Ok(json!("unlocked"))
    });
    let _device = device(&b, &car, router).await;
    let port = directcall_testkit::free_port().unwrap();
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let mut gw = e2e::Proc::spawn(
        e2e::DIRECTCALL,
        &[
            "serve",
            "--broker",
            &b.url(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--shutdown-timeout",
            "1",
        ],
    );
    let ca = pki.path("ca.pem");
    let curl_get = move |path: String| {
        let (curl, ca) = (curl.clone(), ca.clone());
        std::thread::spawn(move || {
            let out = std::process::Command::new(curl)
                .args(["-s", "--max-time", "30", "-w", " %{http_code}"])
                .args([
                    "--resolve",
                    &format!("localhost:{port}:127.0.0.1"),
                    "--cacert",
                    &ca,
                ])
                .arg(format!("https://localhost:{port}{path}"))
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let ready = curl_get.clone();
    wait_for(20, "HTTPS ready", || {
        let code = ready("/readyz".into()).join().unwrap();
        async move { code.ends_with(" 200").then_some(()) }
    })
    .await;
    let slow = curl_get(format!(
        "/invoke?request=r&method=unlock&target={car}&timeout=20"
    ));
    // Once the device runs it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let term = Instant::now();
    gw.terminate();
    let exit = tokio::task::spawn_blocking(move || gw.wait_exit(15))
        .await
        .unwrap();
    let took = term.elapsed();
    assert!(exit.success(), "{exit}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    // The call still out when the bound was up is answered 503 saying
    // so (the requester ended it as it stopped), not held for its 20 s.
    let answer = slow.join().unwrap();
    assert!(answer.ends_with(" 503"), "{answer}");
    assert!(answer.contains("may or may not have run"), "{answer}");
}

/// A rolling upgrade: a gateway leaves with a call that timed out (504)
/// and one answered 202 still open; the device answers both after the
/// gateway is gone, and the replica that stays puts both late answers on
/// their records in the shared store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_answers_to_a_gateway_that_left_are_kept_by_another_replica() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let Some(redis) = program::REDIS_SERVER.or_skip(RedisServer::start().expect("redis-server"))
    else {
        return;
    };
    let store = redis.url();
    let car = unique("car");
    let router = Router::new().method("unlock", |_call| async {
        tokio::time::sleep(Duration::from_millis(3000)).await;
        Ok(json!("unlocked"))
    });
    let _device = device(&b, &car, router).await;
    let flags = [
        "--store",
        store.as_str(),
        "--shutdown-delay",
        "0",
        "--shutdown-timeout",
        "0.2",
    ];
    let (mut a, base_a) = e2e::gateway(&b.url(), &flags).await;
    let (_b, base_b, logs_b) = e2e::gateway_logged(&b.url(), &["--store", store.as_str()]).await;
    e2e::wait_health(&base_a, 200).await;
    e2e::wait_health(&base_b, 200).await;

    let (status, body) = e2e::post(
        &base_a,
        &format!("/v1/targets/{car}/methods/unlock"),
        &[("content-type", "application/json")],
        br#"{"request":"r","timeout_ms":300}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    let timed_out = body["id"].as_str().unwrap().to_owned();
    let open = submit(&base_a, &car, 20_000).await;

    a.terminate();
    let exit = tokio::task::spawn_blocking(move || a.wait_exit(20))
        .await
        .unwrap();
    assert!(exit.success(), "{exit}");
    // Gone before either answer came (3 s after each request).
    for (id, was) in [(&timed_out, "timed_out"), (&open, "unavailable")] {
        let (status, record) = e2e::get(&format!("{base_b}/v1/calls/{id}")).await;
        assert_eq!(status, 200, "{record}");
        assert_eq!(record["state"], was, "{record}");
    }

    for id in [timed_out, open] {
        let url = format!("{base_b}/v1/calls/{id}");
        let record = wait_for(15, "the late answer on the record", || async {
            let (_, record) = e2e::get(&url).await;
            (record["state"] == "answered_late").then_some(record)
        })
        .await;
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(record["response"], json!("unlocked"), "{record}");
    }
    let logs = logs_b.lock().unwrap().join("\n");
    assert!(logs.contains("a requester left"), "{logs}");
    let (_, metrics) = e2e::get(&format!("{base_b}/metrics")).await;
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(
        metrics.contains("directcall_late_answers_adopted_total 2"),
        "{metrics}"
    );
}
