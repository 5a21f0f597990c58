//! Who may call what, on the real gateway with a real broker: scoped
//! credentials from a file (403), a rate per credential and a bound per
//! target (429), nothing published for either (the device's own handler
//! counts), reload on SIGHUP under load with no call dropped, JSON audit
//! lines parsed back, and no secret in any log line.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::e2e;
use directcall_device::Router;
use serde_json::{json, Value};

const FILE: &str = r#"
[[credentials]]
name = "fleet-ops"
token = "ops-SECRET-1"
targets = ["car-*"]
methods = ["unlock", "lock"]

[[credentials]]
name = "dashboard"
token = "dash-SECRET-2"
methods = ["status"]
rate_per_second = 1
burst = 2
"#;

/// A device answering the methods these tests call after `ms`, counting
/// its runs.
fn counting(ms: u64) -> (Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let mut router = Router::new();
    for name in ["unlock", "lock", "open_trunk", "status", "anything", "m"] {
        let r = Arc::clone(&runs);
        router = router.method(name, move |call| {
            let r = Arc::clone(&r);
            async move {
                r.fetch_add(1, SeqCst);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(json!({"ran": call.method.as_str()}))
            }
        });
    }
    (router, runs)
}

async fn call(base: &str, token: &str, target: &str, method: &str) -> (u16, Value) {
    e2e::get_with(
        &format!("{base}/invoke?request=r&method={method}&target={target}&timeout=5"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

fn write_file(b: &TestBroker, text: &str) -> String {
    let path = b.mosquitto.as_ref().unwrap().dir().join("credentials.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_limits_reload_and_audit() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let car = format!("car-{}", unique("x"));
    let truck = unique("truck");
    let (router, car_runs) = counting(0);
    let _car = device(&b, &car, router).await;
    let (router, truck_runs) = counting(0);
    let _truck = device(&b, &truck, router).await;
    let creds = write_file(&b, FILE);
    let metrics_port = directcall_testkit::free_port().unwrap();
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let (gw, base, logs) = e2e::gateway_logged(
        &b.url(),
        &[
            "--credentials",
            &creds,
            "--api-token",
            "admin-SECRET-0",
            "--log-format",
            "json",
            "--max-in-flight-per-target",
            "2",
            "--metrics-listen",
            &metrics_listen,
        ],
    )
    .await;
    e2e::wait_health(&base, 200).await;

    // The 403 matrix: target glob, method list, both; nothing published.
    for (token, target, method, status, needle) in [
        ("ops-SECRET-1", car.as_str(), "unlock", 200, ""),
        (
            "ops-SECRET-1",
            truck.as_str(),
            "unlock",
            403,
            "credential 'fleet-ops' may not call target",
        ),
        (
            "ops-SECRET-1",
            car.as_str(),
            "open_trunk",
            403,
            "credential 'fleet-ops' may not call method 'open_trunk'",
        ),
        (
            "ops-SECRET-1",
            truck.as_str(),
            "open_trunk",
            403,
            "may not call target",
        ),
        ("dash-SECRET-2", truck.as_str(), "status", 200, ""),
        (
            "dash-SECRET-2",
            car.as_str(),
            "unlock",
            403,
            "credential 'dashboard' may not call method 'unlock'",
        ),
        ("admin-SECRET-0", truck.as_str(), "anything", 200, ""),
        ("wrong", car.as_str(), "unlock", 401, ""),
    ] {
        let (got, body) = call(&base, token, target, method).await;
        assert_eq!(got, status, "{token} {target} {method}: {body}");
        if status == 403 {
            assert_eq!(body["result"], "forbidden");
            assert!(
                body["response"].as_str().unwrap().contains(needle),
                "{body}"
            );
        }
    }
    assert_eq!(
        (car_runs.load(SeqCst), truck_runs.load(SeqCst)),
        (1, 2),
        "a refused call ran"
    );

    // The rate: dashboard has a burst of 2 at 1/s; the third at once is 429.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(call(&base, "dash-SECRET-2", &truck, "status").await.0);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let limited = e2e::post_full(
        &base,
        &format!("/v1/targets/{truck}/methods/status"),
        &[
            ("authorization", "Bearer dash-SECRET-2"),
            ("content-type", "application/json"),
        ],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert!(limited
        .header("retry-after")
        .is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    assert!(
        limited
            .body
            .contains("credential 'dashboard' is over its rate of 1 calls/s"),
        "{}",
        limited.body
    );
    let runs_before = truck_runs.load(SeqCst);
    assert_eq!(
        runs_before,
        2 + statuses.iter().filter(|s| **s == 200).count()
    );

    // The target bound: 2 in flight on a slow device, the third is 429.
    let slow = unique("slow");
    let (router, slow_runs) = counting(800);
    let _slow = device(&b, &slow, router).await;
    let spawn_call = || {
        let (base, slow) = (base.clone(), slow.clone());
        tokio::spawn(async move { call(&base, "admin-SECRET-0", &slow, "m").await })
    };
    let running = [spawn_call(), spawn_call()];
    // The third once both run on the device.
    eventually(10, || slow_runs.load(SeqCst) == 2).await;
    let third = spawn_call();
    let mut got = Vec::new();
    for c in running.into_iter().chain([third]) {
        got.push(c.await.unwrap());
    }
    let codes: Vec<u16> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(codes, [200, 200, 429], "{got:?}");
    assert!(got[2].1["response"]
        .as_str()
        .unwrap()
        .contains("--max-in-flight-per-target"));
    assert_eq!(slow_runs.load(SeqCst), 2, "the refused call ran");

    // Reload on SIGHUP while calls run: none dropped; the new rules apply.
    // Two callers of ten calls each: never more in flight than the
    // target's bound of 2, however slow the machine.
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (base, car) = (base.clone(), car.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..10 {
                    statuses.push(call(&base, "ops-SECRET-1", &car, "lock").await.0);
                    // Paced, so the reload lands among the calls.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                statuses
            })
        })
        .collect();
    write_file(
        &b,
        &FILE.replace(
            "methods = [\"unlock\", \"lock\"]",
            "methods = [\"unlock\", \"lock\", \"open_trunk\"]",
        ),
    );
    std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap();
    for l in load {
        assert_eq!(
            l.await.unwrap(),
            [200; 10],
            "a call was dropped by the reload"
        );
    }
    wait_for(10, "the reload taking effect", || async {
        (call(&base, "ops-SECRET-1", &car, "open_trunk").await.0 == 200).then_some(())
    })
    .await;

    // An asynchronous call (202) is audited like any other.
    let (status, accepted) = e2e::post(
        &base,
        &format!("/v1/targets/{car}/methods/lock"),
        &[
            ("authorization", "Bearer ops-SECRET-1"),
            ("content-type", "application/json"),
            ("prefer", "respond-async"),
        ],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");

    // Refusals before a call are audited too: a 401 (from where, which
    // path, never the token) and a 400 (naming the parameter); and a
    // call's line carries the caller's trace id.
    let (status, _) = call(&base, "wrong-SECRET-9", &car, "unlock").await;
    assert_eq!(status, 401);
    let (status, _) = e2e::get_with(
        &format!("{base}/invoke?request=r&method=unlock&target={car}&timeout=abc"),
        &[("authorization", "Bearer ops-SECRET-1")],
    )
    .await;
    assert_eq!(status, 400);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (status, _) = e2e::get_with(
        &format!("{base}/invoke?request=r&method=unlock&target={car}&timeout=5"),
        &[
            ("authorization", "Bearer ops-SECRET-1"),
            ("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01")),
        ],
    )
    .await;
    assert_eq!(status, 200);

    // Audit lines: JSON, one per call, with who, what and how it ended,
    // written by the log thread in order: all there once the last call's
    // (the traced one) is.
    eventually(10, || {
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["trace_id"] == trace))
    })
    .await;
    let lines = logs.lock().unwrap().clone();
    let audits: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "directcall::audit")
        .collect();
    assert!(audits.len() >= 30, "{} audit lines", audits.len());
    let forbidden = audits
        .iter()
        .find(|a| a["outcome"] == "forbidden" && a["method"] == "open_trunk")
        .expect("an audit line for a 403");
    assert_eq!(forbidden["credential"], "fleet-ops");
    assert_eq!(forbidden["http_status"], 403);
    assert!(forbidden["source"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let ok = audits
        .iter()
        .find(|a| a["outcome"] == "ok" && a["credential"] == "dashboard")
        .expect("an audit line for a 200");
    assert_eq!(ok["target_device"], json!(truck));
    assert_eq!(ok["device_status"], 200);
    assert_eq!(ok["id"].as_str().unwrap().len(), 36);
    assert!(ok["latency_ms"].as_u64().is_some());
    assert!(
        ok.get("request").is_none() && ok.get("response").is_none(),
        "bodies without --audit-bodies: {ok}"
    );
    assert!(audits.iter().any(|a| a["outcome"] == "rate_limited"));
    let async_call = audits
        .iter()
        .find(|a| a["outcome"] == "accepted")
        .expect("an audit line for a 202");
    assert_eq!(async_call["http_status"], 202);
    assert_eq!(async_call["id"], accepted["id"]);
    assert!(lines.iter().any(|l| l.contains("credentials reloaded")));
    let unauthorized = audits
        .iter()
        .find(|a| a["http_status"] == 401)
        .expect("an audit line for a 401");
    assert_eq!(unauthorized["outcome"], "unauthorized", "{unauthorized}");
    assert_eq!(unauthorized["path"], "/invoke", "{unauthorized}");
    assert!(unauthorized["source"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let invalid = audits
        .iter()
        .find(|a| a["http_status"] == 400)
        .expect("an audit line for a 400");
    assert_eq!(invalid["credential"], "fleet-ops", "{invalid}");
    assert!(
        invalid["reason"].as_str().unwrap().contains("timeout"),
        "{invalid}"
    );
    let traced = audits
        .iter()
        .find(|a| a["trace_id"] == trace)
        .expect("the trace id in a call's audit line");
    assert_eq!(traced["outcome"], "ok", "{traced}");

    // The metrics port answers without a token; the API's /metrics wants one.
    let (status, text) = e2e::get(&format!("http://{metrics_listen}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        text.as_str().unwrap().contains("directcall_calls_total"),
        "{text}"
    );
    assert_eq!(e2e::get(&format!("{base}/metrics")).await.0, 401);

    // The limits are in /metrics.
    let (status, metrics) = e2e::get_with(
        &format!("{base}/metrics"),
        &[("authorization", "Bearer admin-SECRET-0")],
    )
    .await;
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains("directcall_limit_target_in_flight 2"),
        "{text}"
    );
    assert!(
        text.contains("directcall_limit_credential_calls_per_second{credential=\"dashboard\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("directcall_calls_total{outcome=\"forbidden\"}"),
        "{text}"
    );
    assert!(
        text.contains("directcall_calls_total{outcome=\"rate_limited\"}"),
        "{text}"
    );

    // No secret in any line of the run.
    for secret in ["ops-SECRET-1", "dash-SECRET-2", "admin-SECRET-0"] {
        assert!(
            !lines.iter().any(|l| l.contains(secret)),
            "{secret} was logged"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_credentials_file_is_refused_and_a_bad_reload_keeps_the_old_rules() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let bad = write_file(&b, "[[credentials]]\nname = \"a\"\n");
    let err = e2e::refused(&[
        "serve",
        "--broker",
        &b.url(),
        "--listen",
        "127.0.0.1:0",
        "--credentials",
        &bad,
    ]);
    assert!(
        err.contains("credential 'a': give exactly one of token and token_env"),
        "{err}"
    );

    let creds = write_file(&b, FILE);
    let car = format!("car-{}", unique("y"));
    let (router, _) = counting(0);
    let _car = device(&b, &car, router).await;
    let (gw, base, logs) = e2e::gateway_logged(&b.url(), &["--credentials", &creds]).await;
    e2e::wait_health(&base, 200).await;
    assert_eq!(call(&base, "ops-SECRET-1", &car, "unlock").await.0, 200);
    write_file(&b, "this is not toml [");
    std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap();
    eventually(10, || {
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("credentials not reloaded"))
    })
    .await;
    assert_eq!(
        call(&base, "ops-SECRET-1", &car, "unlock").await.0,
        200,
        "the old rules stay"
    );
}
