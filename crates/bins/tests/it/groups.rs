//! Group calls over HTTP (`POST /v1/methods/{method}`, `GET
//! /v1/groups/{id}`) on the real gateway, a real Mosquitto and simulated
//! devices (`directcall-sim`, with `--presence` and `--group`): each form
//! (a list, a glob over presence, a named group), an answer at the
//! deadline, offline members, scoped credentials, a keyed retry, bad
//! bodies that publish nothing, NDJSON read as it comes, and 202 with the
//! record. The Lambda's buffered answer is in `lambda.rs`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::e2e::{self, gateway, gateway_logged, get_with, sim, wait_health};
use directcall_bins::http_client::Connection;
use serde_json::{json, Value};

const JSON: (&str, &str) = ("content-type", "application/json");

/// `POST /v1/methods/{method}` with `body` and `headers`.
async fn group_call(
    base: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, Value) {
    let mut all = vec![JSON];
    all.extend_from_slice(headers);
    e2e::post(
        base,
        &format!("/v1/methods/{method}"),
        &all,
        body.to_string().into_bytes(),
    )
    .await
}

/// Each device's result, by its name.
fn by_target(body: &Value) -> HashMap<String, Value> {
    body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {body}"))
        .iter()
        .map(|r| (r["target"].as_str().unwrap().to_owned(), r.clone()))
        .collect()
}

fn counts(body: &Value) -> [u64; 6] {
    let s = &body["summary"];
    [
        "ok",
        "device_error",
        "timeout",
        "offline",
        "refused",
        "total",
    ]
    .map(|k| s[k].as_u64().unwrap_or_else(|| panic!("no {k}: {body}")))
}

/// Waits until the gateway's presence says `online` devices matching
/// `glob` are online and `offline` offline.
async fn wait_presence(
    base: &str,
    headers: &[(&str, &str)],
    glob: &str,
    online: u64,
    offline: u64,
) {
    let url = format!("{base}/v1/devices?match={glob}");
    wait_for(
        20,
        &format!("{online} online, {offline} offline of {glob}"),
        || async {
            let (_, page) = get_with(&url, headers).await;
            (page["online"] == online && page["offline"] == offline).then_some(())
        },
    )
    .await;
}

/// A list: each device's result as it answered (ok, its error status),
/// those that did not by the deadline as timeouts, duplicates called once,
/// and one audit line for the whole call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_answers_each_device_and_ends_at_the_deadline() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let url = b.url();
    // Car009 has no device: its call waits for the deadline on MQTT 5 too.
    let _hole = b.black_hole().await;
    let _cars = sim(&url, &["--devices", "2", "--id-prefix", "Car", "--echo"]);
    let _failing = sim(&url, &["--client-id", "Fail001", "--fail-rate", "1"]);
    let _slow = sim(&url, &["--client-id", "Slow001", "--latency-ms", "4000"]);
    let (_gw, base, logs) = gateway_logged(&url, &["--log-format", "json"]).await;
    wait_health(&base, 200).await;

    let body = json!({
        "targets": ["Car001", "Car002", "Fail001", "Slow001", "Car009", "Car001"],
        "request": {"door": "front"},
        "timeout_ms": 1500,
    });
    let sent = Instant::now();
    let (status, answer) = group_call(&base, "unlock", &[], &body).await;
    let took = sent.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(3500),
        "{took:?}"
    );
    let results = by_target(&answer);
    assert_eq!(answer["results"].as_array().unwrap().len(), 5, "{answer}");
    for car in ["Car001", "Car002"] {
        let r = &results[car];
        assert_eq!(
            (&r["outcome"], &r["status"], &r["response"]),
            (&json!("ok"), &json!(200), &json!({"door": "front"})),
            "{r}"
        );
        assert!(r["latency_ms"].as_f64().unwrap() < 1500.0, "{r}");
    }
    assert_eq!(results["Fail001"]["outcome"], "device_error");
    assert_eq!(results["Fail001"]["status"], 500);
    for late in ["Slow001", "Car009"] {
        assert_eq!(results[late]["outcome"], "timeout", "{answer}");
        assert_eq!(results[late]["reason"], "no answer before the deadline");
        assert!(results[late].get("status").is_none());
    }
    // The timeouts come last: each answer was given as it came.
    let order: Vec<&str> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(&order[3..], ["timeout", "timeout"], "{answer}");
    assert_eq!(counts(&answer), [2, 1, 2, 0, 0, 5]);
    assert_eq!(answer["summary"]["expected"], 5);
    assert!(answer["summary"]["elapsed_ms"].as_u64().unwrap() >= 1500);
    let id = answer["id"].as_str().unwrap();
    assert_eq!(id.len(), 36);

    // One audit line for the call.
    let line = wait_for(10, "the group call's audit line", || async {
        logs.lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("\"group call\"") && l.contains(id))
            .cloned()
    })
    .await;
    let line: Value = serde_json::from_str(&line).unwrap();
    let fields = line.get("fields").unwrap_or(&line);
    for (k, v) in [
        ("method", json!("unlock")),
        ("kind", json!("targets")),
        ("set", json!("5 names")),
        ("mode", json!("json")),
        ("ok", json!(2)),
        ("device_error", json!(1)),
        ("timeout", json!(2)),
        ("total", json!(5)),
        ("complete", json!(true)),
    ] {
        assert_eq!(fields[k], v, "{k} in {line}");
    }
}

/// A glob over the targets presence knows: the online ones called, the
/// offline ones reported at once, the call over as soon as every device
/// has its result; `online_only` leaves the offline ones out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_glob_reaches_the_devices_presence_knows() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let url = b.url();
    let _kiosks = sim(
        &url,
        &["--devices", "2", "--id-prefix", "Kiosk", "--presence"],
    );
    let mut gone = sim(&url, &["--client-id", "Kiosk003", "--presence"]);
    let car = sim(&url, &["--client-id", "Car001", "--presence"]);
    gone.kill();
    let (_gw, base) = gateway(&url, &[]).await;
    wait_health(&base, 200).await;
    wait_presence(&base, &[], "Kiosk*", 2, 1).await;
    wait_presence(&base, &[], "Car*", 1, 0).await;

    let sent = Instant::now();
    let (status, answer) = group_call(
        &base,
        "reboot",
        &[],
        &json!({"match": "Kiosk*", "timeout_ms": 20000}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "waited for the deadline"
    );
    let results = by_target(&answer);
    assert_eq!(results.len(), 3, "{answer}");
    assert_eq!(results["Kiosk001"]["outcome"], "ok");
    assert_eq!(results["Kiosk002"]["outcome"], "ok");
    assert_eq!(results["Kiosk003"]["outcome"], "offline");
    assert_eq!(
        results["Kiosk003"]["reason"],
        "presence says the device is offline"
    );
    assert_eq!(counts(&answer), [2, 0, 0, 1, 0, 3]);
    assert_eq!(answer["summary"]["expected"], 3);

    let (_, answer) = group_call(
        &base,
        "reboot",
        &[],
        &json!({"match": "Kiosk*", "online_only": true}),
    )
    .await;
    let mut names: Vec<_> = by_target(&answer).into_keys().collect();
    names.sort();
    assert_eq!(names, ["Kiosk001", "Kiosk002"], "{answer}");

    // A glob nothing matches: no device, at once.
    let (status, answer) = group_call(&base, "reboot", &[], &json!({"match": "Bus-?"})).await;
    assert_eq!(status, 200);
    assert_eq!(counts(&answer), [0, 0, 0, 0, 0, 0]);
    assert_eq!(answer["summary"]["expected"], 0);
    drop(car);
}

/// A named group: one publish on the group's topic, each online member
/// answering on its own reply topic, the offline member (its presence
/// record names the group) reported at once; a group nobody's record names
/// counts the answers that come by the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_group_is_one_publish_and_each_member_answers() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let url = b.url();
    let mut watcher = Raw::connect(&b.options_v311(), &unique("watcher")).await;
    watcher.subscribe("directcall/groups/lobby/#").await;
    let _members = sim(
        &url,
        &[
            "--devices",
            "2",
            "--id-prefix",
            "Member",
            "--presence",
            "--group",
            "lobby",
            "--echo",
        ],
    );
    let mut gone = sim(
        &url,
        &["--client-id", "Member003", "--presence", "--group", "lobby"],
    );
    gone.kill();
    let _other = sim(
        &url,
        &[
            "--client-id",
            "Other001",
            "--presence",
            "--group",
            "floor-2",
        ],
    );
    let (_gw, base) = gateway(&url, &[]).await;
    wait_health(&base, 200).await;
    wait_presence(&base, &[], "Member*", 2, 1).await;
    wait_presence(&base, &[], "Other*", 1, 0).await;

    let sent = Instant::now();
    let (status, answer) = group_call(
        &base,
        "firmware",
        &[],
        &json!({"group": "lobby", "request": "v2", "timeout_ms": 20000}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "waited for the deadline"
    );
    let results = by_target(&answer);
    assert_eq!(results.len(), 3, "{answer}");
    for m in ["Member001", "Member002"] {
        assert_eq!(results[m]["outcome"], "ok", "{answer}");
        assert_eq!(results[m]["response"], "v2");
    }
    assert_eq!(results["Member003"]["outcome"], "offline");
    assert_eq!(answer["summary"]["expected"], 3);
    // One publish, on the group's topic, carrying the call's id.
    let id = answer["id"].as_str().unwrap();
    let (topic, request) = watcher.next().await;
    assert!(
        topic.starts_with("directcall/groups/lobby/firmware/"),
        "{topic}"
    );
    assert!(topic.ends_with(id), "{topic}");
    assert_eq!(request["id"], id);
    watcher.nothing_for(300).await;

    // Presence records name groups here, and none names this one: its
    // members are unknown (a device may join without saying so, and the
    // one publish reached whoever did), so the call counts the answers
    // until the deadline rather than saying "nobody" at once; on MQTT 5
    // the broker's "no subscribers" PUBACK ends it at once.
    let sent = Instant::now();
    let (status, answer) = group_call(
        &base,
        "firmware",
        &[],
        &json!({"group": "attic", "timeout_ms": 1000}),
    )
    .await;
    assert_eq!(status, 200);
    if directcall_testkit::mqtt_version() == directcall_core::MqttVersion::V5 {
        assert!(sent.elapsed() < Duration::from_millis(900), "{answer}");
    } else {
        assert!(sent.elapsed() >= Duration::from_millis(1000), "{answer}");
    }
    assert_eq!(answer["summary"]["expected"], Value::Null, "{answer}");
    assert_eq!(counts(&answer), [0, 0, 0, 0, 0, 0]);
}

const CREDENTIALS: &str = r#"
[[credentials]]
name = "ops"
token = "ops-secret"
targets = ["Car*"]
methods = ["unlock"]

[[credentials]]
name = "stations"
token = "stations-secret"
targets = ["Kiosk*"]
methods = ["reboot"]
groups = ["lobby*"]

[[credentials]]
name = "hasty"
token = "hasty-secret"
rate_per_second = 1
burst = 1
"#;

/// Scoped credentials: a listed target outside the scope is reported
/// `refused` and never published to, a scoped glob reaches only what the
/// scope names, a method outside the scope or a group outside the
/// `groups` scope is 403, a target at its in-flight bound is `refused`,
/// and a group call takes one token of its caller's rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_credentials_refuse_targets_and_forbid_groups() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let url = b.url();
    let creds = b.mosquitto.as_ref().unwrap().dir().join("credentials.toml");
    std::fs::write(&creds, CREDENTIALS).unwrap();
    let _car = sim(&url, &["--client-id", "Car001", "--presence"]);
    let _slow = sim(
        &url,
        &[
            "--client-id",
            "Car002",
            "--presence",
            "--latency-ms",
            "2500",
        ],
    );
    let _truck = sim(&url, &["--client-id", "Truck001", "--presence"]);
    let _kiosk = sim(&url, &["--client-id", "Kiosk001", "--group", "lobby"]);
    let mut truck_watch = Raw::connect(&b.options_v311(), &unique("truck-watch")).await;
    truck_watch.subscribe("Truck001/#").await;
    let (_gw, base) = gateway(
        &url,
        &[
            "--credentials",
            creds.to_str().unwrap(),
            "--max-in-flight-per-target",
            "1",
        ],
    )
    .await;
    wait_health(&base, 200).await;
    let ops = [("authorization", "Bearer ops-secret")];
    let stations = [("authorization", "Bearer stations-secret")];
    let hasty = [("authorization", "Bearer hasty-secret")];
    wait_presence(&base, &hasty, "*", 3, 0).await;

    // A list: the target outside the scope is refused, not dropped.
    let (status, answer) = group_call(
        &base,
        "unlock",
        &ops,
        &json!({"targets": ["Car001", "Truck001"], "timeout_ms": 5000}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let results = by_target(&answer);
    assert_eq!(results["Car001"]["outcome"], "ok");
    assert_eq!(results["Truck001"]["outcome"], "refused");
    assert_eq!(
        results["Truck001"]["reason"],
        "credential 'ops' may not call target 'Truck001'"
    );
    assert_eq!(counts(&answer), [1, 0, 0, 0, 1, 2]);
    truck_watch.nothing_for(300).await;

    // A glob reaches only the targets the scope names: Truck001 is
    // neither called nor reported.
    let (status, answer) = group_call(
        &base,
        "unlock",
        &ops,
        &json!({"match": "*", "timeout_ms": 8000}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut names: Vec<_> = by_target(&answer).into_keys().collect();
    names.sort();
    assert_eq!(names, ["Car001", "Car002"], "{answer}");
    assert_eq!(counts(&answer), [2, 0, 0, 0, 0, 2]);
    truck_watch.nothing_for(100).await;

    // A method outside the scope, or a group outside it: 403.
    let (status, answer) = group_call(&base, "wipe", &ops, &json!({"targets": ["Car001"]})).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(
        answer["response"],
        "credential 'ops' may not call method 'wipe'"
    );
    let (status, answer) = group_call(&base, "unlock", &ops, &json!({"group": "lobby"})).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(
        answer["response"],
        "credential 'ops' may not call group 'lobby': its scope names no groups"
    );
    let (status, answer) =
        group_call(&base, "reboot", &stations, &json!({"group": "floor-2"})).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(
        answer["response"],
        "credential 'stations' may not call group 'floor-2'"
    );
    // A group in the scope: its member answers.
    let (status, answer) = group_call(
        &base,
        "reboot",
        &stations,
        &json!({"group": "lobby", "timeout_ms": 1500}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(by_target(&answer)["Kiosk001"]["outcome"], "ok", "{answer}");

    // A target at its in-flight bound (1 here): refused, the rest called.
    let single = {
        let base = base.clone();
        tokio::spawn(async move {
            e2e::post(
                &base,
                "/v1/targets/Car002/methods/unlock",
                &[JSON, ("authorization", "Bearer ops-secret")],
                b"{}".to_vec(),
            )
            .await
        })
    };
    // The single call is out (a probe call would take the slot itself).
    wait_for(10, "Car002's one call in flight", || async {
        let (_, text) = get_with(&format!("{base}/metrics"), &ops).await;
        let pending = text.as_str()?.lines().find_map(|l| {
            l.strip_prefix(directcall_cloud::metrics::PENDING_CALLS)?
                .trim()
                .parse::<f64>()
                .ok()
        })?;
        (pending >= 1.0).then_some(())
    })
    .await;
    let (status, answer) = group_call(
        &base,
        "unlock",
        &ops,
        &json!({"targets": ["Car001", "Car002"], "timeout_ms": 5000}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let results = by_target(&answer);
    assert_eq!(results["Car001"]["outcome"], "ok");
    assert_eq!(results["Car002"]["outcome"], "refused", "{answer}");
    assert!(
        results["Car002"]["reason"]
            .as_str()
            .unwrap()
            .contains("calls in flight"),
        "{answer}"
    );
    assert_eq!(single.await.unwrap().0, 200);

    // One token per group call, however many devices: the second at once
    // is 429.
    let body = json!({"targets": ["Car001", "Truck001"], "timeout_ms": 3000});
    let (first, answer) = group_call(&base, "m", &hasty, &body).await;
    assert_eq!(first, 200, "{answer}");
    assert_eq!(counts(&answer), [2, 0, 0, 0, 0, 2]);
    let (second, answer) = group_call(&base, "m", &hasty, &body).await;
    assert_eq!(second, 429, "{answer}");
    assert_eq!(answer["result"], "rate_limited");
}

/// An Idempotency-Key: the retry runs no device that answered (its answer
/// is replayed), calls the one that did not, under the same id; the key
/// with another call is 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_retry_runs_no_device_twice() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let url = b.url();
    let _car = sim(&url, &["--client-id", "Car001", "--echo"]);
    let mut car_watch = Raw::connect(&b.options_v311(), &unique("car-watch")).await;
    car_watch.subscribe("Car001/#").await;
    let (_gw, base) = gateway(&url, &[]).await;
    wait_health(&base, 200).await;
    let key = [("idempotency-key", "unlock-all-7")];
    let body = json!({"targets": ["Car001", "Late001"], "request": "go", "timeout_ms": 800});

    let (status, first) = group_call(&base, "unlock", &key, &body).await;
    assert_eq!(status, 200, "{first}");
    let results = by_target(&first);
    assert_eq!(results["Car001"]["outcome"], "ok");
    // No device yet: a timeout (MQTT 3.1.1) or offline at once (MQTT 5).
    assert!(
        ["timeout", "offline"].contains(&results["Late001"]["outcome"].as_str().unwrap()),
        "{first}"
    );

    let _late = sim(&url, &["--client-id", "Late001", "--echo"]);
    let (status, second) = group_call(&base, "unlock", &key, &body).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["id"], first["id"], "a retry carries the same id");
    let results = by_target(&second);
    assert_eq!(results["Car001"]["outcome"], "ok");
    assert_eq!(results["Car001"]["replayed"], true, "{second}");
    assert_eq!(results["Car001"]["response"], "go");
    assert_eq!(results["Late001"]["outcome"], "ok", "{second}");
    assert!(results["Late001"].get("replayed").is_none());
    // Car001 got one request in all.
    let (topic, _) = car_watch.next().await;
    assert!(topic.starts_with("Car001/unlock/"), "{topic}");
    car_watch.nothing_for(300).await;

    let other = json!({"targets": ["Car001"], "request": "go", "timeout_ms": 800});
    let (status, answer) = group_call(&base, "unlock", &key, &other).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["result"], "conflict");
    let (status, answer) = group_call(&base, "unlock", &[("idempotency-key", "a b")], &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["response"]
            .as_str()
            .unwrap()
            .starts_with("invalid Idempotency-Key: "),
        "{answer}"
    );
}

/// Bad bodies are 400 naming the part (413 past the bounds), never a 500,
/// and publish nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_are_400_and_nothing_is_published() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let url = b.url();
    let mut watcher = Raw::connect(&b.options_v311(), &unique("watcher")).await;
    watcher.subscribe("#").await;
    let (_gw, base) = gateway(&url, &[]).await;
    wait_health(&base, 200).await;
    let many: Vec<String> = (0..100_001).map(|i| format!("d{i}")).collect();
    let big_request = "x".repeat(129 * 1024);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "m",
            json!({"targets": ["a", "b", "c", "d/e"]}),
            400,
            "invalid targets[3]: contains '/'",
        ),
        (
            "m",
            json!({"targets": ["a", 7]}),
            400,
            "invalid targets[1]: ",
        ),
        ("m", json!({"targets": []}), 400, "invalid targets: "),
        ("m", json!({"match": "a/b"}), 400, "invalid match: "),
        (
            "m",
            json!({"match": "*".repeat(65)}),
            400,
            "invalid match: ",
        ),
        (
            "m",
            json!({"group": "a#"}),
            400,
            "invalid group: contains '#'",
        ),
        (
            "a+b",
            json!({"group": "g"}),
            400,
            "invalid method: contains '+'",
        ),
        (
            "m",
            json!({"group": "g", "timeout_ms": 99}),
            400,
            "invalid timeout_ms: ",
        ),
        (
            "m",
            json!({"group": "g", "timeout_ms": 60001}),
            400,
            "invalid timeout_ms: ",
        ),
        (
            "m",
            json!({"group": "g", "targets": ["a"]}),
            400,
            "invalid body: give exactly one of targets, match, group",
        ),
        (
            "m",
            json!({"request": 1}),
            400,
            "invalid body: give exactly one of targets, match, group",
        ),
        (
            "m",
            json!({"targets": ["a"], "online_only": true}),
            400,
            "invalid online_only: ",
        ),
        (
            "m",
            json!({"group": "g", "receipt": true}),
            400,
            "invalid body: unknown field `receipt`",
        ),
        ("m", json!(["a"]), 400, "invalid body: not a JSON object"),
        (
            "m",
            json!({"targets": many}),
            413,
            "targets names 100001 devices",
        ),
        (
            "m",
            json!({"group": "g", "request": big_request}),
            413,
            "request (",
        ),
    ];
    for (method, body, status, message) in &cases {
        let (got, answer) = group_call(&base, method, &[], body).await;
        let what = &body.to_string()[..body.to_string().len().min(80)];
        assert_eq!(
            (got, answer["response"].is_string()),
            (*status, true),
            "{what}: {answer}"
        );
        let text = answer["response"].as_str().unwrap();
        assert!(text.starts_with(message), "{what}: {text}");
    }
    for (headers, body, status, message) in [
        (vec![JSON], b"{".to_vec(), 400, "invalid body: "),
        (
            vec![("content-type", "text/plain")],
            b"{}".to_vec(),
            400,
            "invalid content-type: ",
        ),
    ] {
        let (got, answer) = e2e::post(&base, "/v1/methods/m", &headers, body).await;
        assert_eq!(got, status, "{answer}");
        assert!(
            answer["response"].as_str().unwrap().starts_with(message),
            "{answer}"
        );
    }
    // A body declared over 4 MiB is refused before it is read.
    let (status, answer) = declared_too_large(&base).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer.contains("body exceeds 4194304 bytes"), "{answer}");
    // Only the gateway's own presence markers went out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let published: Vec<String> = watcher
        .drain()
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| !t.starts_with("directcall/presence/"))
        .collect();
    assert!(published.is_empty(), "published: {published:?}");
}

/// A POST whose `Content-Length` says 5 MB, its body never sent: the
/// status and body of the answer (which comes before the body would).
async fn declared_too_large(base: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/methods/m HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: 5000000\r\n\r\n{{"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).ends_with('}') {
        let n = within(10, tcp.read(&mut buf)).await.unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// `Accept: application/x-ndjson`: a line per result as it comes (the
/// fast device's long before the slow one answers), then the summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_lines_come_as_the_results_do() {
    use http_body_util::BodyExt;
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let url = b.url();
    let _fast = sim(&url, &["--client-id", "Fast001"]);
    let _slow = sim(&url, &["--client-id", "Slow001", "--latency-ms", "1500"]);
    let (_gw, base) = gateway(&url, &[]).await;
    wait_health(&base, 200).await;

    let mut conn = Connection::open(&base).await.unwrap();
    let headers = [
        ("content-type".to_owned(), "application/json".to_owned()),
        ("accept".to_owned(), "application/x-ndjson".to_owned()),
    ];
    let body = json!({"targets": ["Fast001", "Slow001"], "timeout_ms": 10000});
    let sent = Instant::now();
    let response = within(
        10,
        conn.send_streaming(
            "POST",
            "/v1/methods/m",
            &headers,
            body.to_string().into_bytes(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut body = response.into_body();
    let mut text = String::new();
    let mut lines: Vec<(Value, Duration)> = Vec::new();
    while let Some(frame) = within(10, body.frame()).await {
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
            while let Some(end) = text.find('\n') {
                let line: String = text.drain(..=end).collect();
                lines.push((serde_json::from_str(&line).unwrap(), sent.elapsed()));
            }
        }
    }
    assert!(text.is_empty(), "a last line without its newline: {text}");
    assert_eq!(lines.len(), 3, "{lines:?}");
    let (first, at) = &lines[0];
    assert_eq!(first["target"], "Fast001", "{lines:?}");
    assert_eq!(first["outcome"], "ok");
    assert!(
        *at < Duration::from_millis(1200),
        "the first line came at {at:?}"
    );
    let (second, at) = &lines[1];
    assert_eq!(second["target"], "Slow001");
    assert_eq!(second["outcome"], "ok");
    assert!(*at >= Duration::from_millis(1500), "{at:?}");
    let (end, _) = &lines[2];
    assert_eq!(end["id"].as_str().unwrap().len(), 36, "{end}");
    assert_eq!(end["summary"]["ok"], 2, "{end}");
    assert_eq!(end["summary"]["total"], 2, "{end}");
}

/// `Prefer: respond-async`: 202 at once with the record's place; the
/// record fills in as results come (`running`), and `?wait` returns when
/// it is `done`; it is its caller's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_group_call_fills_its_record() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let url = b.url();
    let _car = sim(&url, &["--client-id", "Car001"]);
    let _slow = sim(&url, &["--client-id", "Slow001", "--latency-ms", "1500"]);
    let (_gw, base) = gateway(&url, &["--api-token", "tok,other"]).await;
    wait_health(&base, 200).await;
    let tok = [("authorization", "Bearer tok")];
    let other = [("authorization", "Bearer other")];

    let sent = Instant::now();
    let response = e2e::post_full(
        &base,
        "/v1/methods/unlock",
        &[JSON, tok[0], ("prefer", "respond-async")],
        json!({"targets": ["Car001", "Slow001"], "timeout_ms": 10000})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert!(sent.elapsed() < Duration::from_millis(1500));
    assert_eq!(response.status, 202, "{}", response.body);
    let accepted = e2e::json(&response);
    let id = accepted["id"].as_str().unwrap();
    let link = format!("/v1/groups/{id}");
    assert_eq!(accepted["group"], link.as_str());
    assert_eq!(accepted["result"], "accepted");
    assert_eq!(response.header("location"), Some(link.as_str()));
    assert_eq!(response.header("preference-applied"), Some("respond-async"));

    let (status, record) = get_with(&format!("{base}{link}"), &tok).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["state"], "running", "{record}");
    assert_eq!(record["method"], "unlock");
    assert_eq!(record["caller"], "token-1");
    assert!(record["results"].as_array().unwrap().len() < 2, "{record}");

    let (status, record) = get_with(&format!("{base}{link}?wait=10"), &tok).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["state"], "done", "{record}");
    assert!(sent.elapsed() >= Duration::from_millis(1500));
    assert_eq!(counts(&record), [2, 0, 0, 0, 0, 2]);
    assert_eq!(by_target(&record)["Slow001"]["outcome"], "ok");

    // Another caller's record is not there for it.
    let (status, answer) = get_with(&format!("{base}{link}"), &other).await;
    assert_eq!(status, 404, "{answer}");
    let (status, _) = get_with(&format!("{base}/v1/groups/nope"), &tok).await;
    assert_eq!(status, 400);
    let (status, _) = get_with(&format!("{base}{link}?wait=61"), &tok).await;
    assert_eq!(status, 400);
    let (status, _) = get_with(&format!("{base}{link}"), &[]).await;
    assert_eq!(status, 401);
}

/// `directcall call --targets …` and `--group …`: a table row per device
/// and the counts, or the gateway's NDJSON lines; exit 0 only when every
/// device answered ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_a_group_call_as_a_table_or_ndjson() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let url = b.url();
    let _kiosks = sim(
        &url,
        &[
            "--devices",
            "2",
            "--id-prefix",
            "Kiosk",
            "--presence",
            "--group",
            "lobby",
            "--echo",
        ],
    );
    let (_gw, base) = gateway(&url, &[]).await;
    wait_health(&base, 200).await;
    wait_presence(&base, &[], "Kiosk*", 2, 0).await;
    let cli = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(e2e::DIRECTCALL)
                .arg("call")
                .args(&args)
                .output()
                .expect("directcall call runs")
        })
        .await
        .unwrap()
    };
    let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    // A glob: every device ok, exit 0.
    let out = cli(s(&[
        "--gateway",
        &base,
        "--targets",
        "Kiosk*",
        "--request",
        "\"hi\"",
        "ping",
    ]))
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("TARGET"), "{text}");
    for k in ["Kiosk001", "Kiosk002"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(k) && l.contains(" ok ") && l.ends_with("hi")),
            "{text}"
        );
    }
    assert!(
        lines.last().unwrap().starts_with("2 results (expected 2)"),
        "{text}"
    );

    // A list with a device nobody runs: its timeout shows, exit 1.
    let out = cli(s(&[
        "--gateway",
        &base,
        "--targets",
        "Kiosk001,Ghost001",
        "--timeout-ms",
        "500",
        "ping",
    ]))
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    // Nobody subscribes to Ghost001: on MQTT 5 the broker says so at once.
    let v5 = directcall_testkit::mqtt_version() == directcall_core::MqttVersion::V5;
    let (outcome, counted) = if v5 {
        ("offline", "ok 1, device_error 0, timeout 0, offline 1")
    } else {
        ("timeout", "ok 1, device_error 0, timeout 1, offline 0")
    };
    assert!(
        text.lines()
            .any(|l| l.starts_with("Ghost001") && l.contains(outcome)),
        "{text}"
    );
    assert!(text.contains(counted), "{text}");

    // A group as NDJSON: the gateway's lines, the summary last.
    let out = cli(s(&[
        "--gateway",
        &base,
        "--group",
        "lobby",
        "--ndjson",
        "ping",
    ]))
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[2]["summary"]["ok"], 2, "{text}");
    assert_eq!(lines[0]["outcome"], "ok", "{text}");

    // The gateway's refusal is shown with its status.
    let out = cli(s(&["--gateway", &base, "--targets", "a/b", "ping"])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.starts_with("HTTP 400"), "{text}");
    assert!(text.contains("targets[0]"), "{text}");
}
