//! MQTT 5 against a real Mosquitto (and, where it holds, the embedded
//! rumqttd): "no matching subscribers" ends a call at once, requests expire
//! in the broker, `mosquitto_rr` calls a directcall device, a version 5
//! requester calls a 3.1.1 seed-format device, and `traceparent` reaches the
//! handler.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::e2e;
use directcall_cloud::{Error, MqttVersion, QoS};
use directcall_core::BrokerOptions;
use directcall_device::{DeviceOptions, Router};
use directcall_testkit::program;
use serde_json::{json, Value};

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn mosquitto() -> Option<TestBroker> {
    TestBroker::start(Kind::Mosquitto)
}

fn v5(b: &TestBroker) -> BrokerOptions {
    b.options().mqtt_version(MqttVersion::V5)
}

async fn requester_v5(b: &TestBroker) -> directcall_cloud::Requester {
    requester_v5_with(b, |o| o).await
}

async fn requester_v5_with(
    b: &TestBroker,
    f: impl FnOnce(directcall_cloud::Options) -> directcall_cloud::Options,
) -> directcall_cloud::Requester {
    let prefix = directcall_cloud::Prefix::new(unique("v5")).unwrap();
    let options = f(directcall_cloud::Options::new(v5(b)).prefix(prefix));
    within(15, directcall_cloud::Requester::connect(options))
        .await
        .expect("requester connects")
}

async fn device_on(
    broker: BrokerOptions,
    target: &str,
    router: Router,
) -> directcall_device::Device {
    let options = DeviceOptions::new(broker, directcall_core::Target::new(target).unwrap());
    within(15, directcall_device::serve(router, options))
        .await
        .expect("device connects")
}

/// A call to a target nobody subscribes to: the broker's PUBACK says so
/// (reason 0x10) and the call ends at once as offline, leaving nothing
/// pending; on 3.1.1 the same call waits out its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_nobody_is_subscribed_to_ends_as_offline_at_once() {
    let Some(b) = mosquitto() else { return };
    let r = requester_v5(&b).await;
    let started = Instant::now();
    let e = within(
        5,
        r.invoke(call("NoSuchDevice", "unlock", json!("now"), 3000)),
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, Error::NoSubscriber { .. }), "{e:?}");
    assert!(e.to_string().contains("no device is subscribed"), "{e}");
    // Bounded generously: the figure is benched, not asserted (PERFORMANCE.md).
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let stats = r.stats();
    assert_eq!((stats.refused, stats.pending, stats.timeouts), (1, 0, 0));
    r.shutdown().await;

    // The same call from a 3.1.1 requester is a timeout.
    let prefix = directcall_cloud::Prefix::new(unique("v311")).unwrap();
    let r311 = within(
        15,
        directcall_cloud::Requester::connect(
            directcall_cloud::Options::new(b.options_v311()).prefix(prefix),
        ),
    )
    .await
    .expect("requester connects");
    let e = r311
        .invoke(call("NoSuchDevice", "unlock", json!("now"), 300))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
}

/// The trade-off of the default request QoS on MQTT 5: a target that
/// answered within the last 10 s gets its requests at QoS 0, with no PUBACK
/// round, so if it has gone since, the call waits out its deadline (or
/// presence says offline) instead of ending at once as `NoSubscriber`;
/// `request_qos(1)` keeps the PUBACK round for every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_answered_lately_gets_its_requests_without_the_puback_round() {
    let Some(b) = mosquitto() else { return };
    let car = unique("car");
    let device = device_on(
        v5(&b),
        &car,
        Router::new().method("ping", |_| async { Ok("pong") }),
    )
    .await;
    let default = requester_v5(&b).await;
    let every = requester_v5_with(&b, |o| o.request_qos(QoS::AtLeastOnce)).await;
    for r in [&default, &every] {
        let reply = within(10, r.invoke(call(&car, "ping", Value::Null, 5000)))
            .await
            .unwrap();
        assert_eq!(reply.response, json!("pong"));
    }
    device.abort().await;
    // Once the broker has dropped the device's subscription, QoS 1 says so.
    let e = wait_for(10, "the broker to drop the device's subscription", || {
        let every = every.clone();
        let car = car.clone();
        async move {
            match every.invoke(call(&car, "ping", Value::Null, 500)).await {
                Err(e @ Error::NoSubscriber { .. }) => Some(e),
                _ => None,
            }
        }
    })
    .await;
    assert!(matches!(e, Error::NoSubscriber { .. }), "{e:?}");
    let e = within(5, default.invoke(call(&car, "ping", Value::Null, 500)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(default.stats().pending, 0);
}

/// Through the gateway: 404 `offline`, with the reason and the call's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_on_mqtt_5_answers_404_offline_for_a_target_nobody_serves() {
    let Some(b) = mosquitto() else { return };
    let (_gw, base) = e2e::gateway(&b.url(), &["--mqtt-version", "5"]).await;
    e2e::wait_health(&base, 200).await;
    let (status, body) = e2e::get(&format!(
        "{base}/invoke?request=r&method=unlock&target=NoSuchDevice&timeout=3"
    ))
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["result"], "offline");
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains("no device is subscribed"),
        "{body}"
    );
    assert_eq!(body["id"].as_str().unwrap().len(), 36);
    assert!(e2e::elapsed_ms(&body) < 1000, "{body}");
}

/// A publish the broker's ACL denies: Mosquitto answers PUBACK 0x87 (not
/// authorized) on MQTT 5, and the call ends at once as `Refused` with that
/// code; the gateway answers 503 `unavailable` naming the reason (on 3.1.1
/// Mosquitto drops a denied publish silently and the caller times out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_refuses_ends_the_call_with_the_reason() {
    let dir = std::env::temp_dir().join(unique("acl"));
    std::fs::create_dir_all(&dir).unwrap();
    let acl = dir.join("acl");
    // Anyone may read everything and write replies; requests only to Allowed.
    std::fs::write(
        &acl,
        "topic read #\ntopic write Allowed/#\ntopic write +/+/+/+/ack\n",
    )
    .unwrap();
    let Some(m) = program::MOSQUITTO.or_skip(
        directcall_testkit::Mosquitto::start(&format!("acl_file {}\n", acl.display()))
            .expect("mosquitto starts"),
    ) else {
        return;
    };
    let broker = BrokerOptions::from_url(&m.url())
        .unwrap()
        .mqtt_version(MqttVersion::V5);
    let r = within(
        15,
        directcall_cloud::Requester::connect(
            directcall_cloud::Options::new(broker)
                .prefix(directcall_cloud::Prefix::new(unique("acl")).unwrap()),
        ),
    )
    .await
    .expect("requester connects");
    let e = within(5, r.invoke(call("Denied", "unlock", json!("now"), 3000)))
        .await
        .unwrap_err();
    let Error::Refused { code, .. } = e else {
        panic!("expected Refused, got {e:?}")
    };
    assert_eq!(code, 0x87);
    assert!(e.to_string().contains("not authorized"), "{e}");
    let s = r.stats();
    assert_eq!((s.refused, s.pending, s.timeouts), (1, 0, 0));

    let (_gw, base) = e2e::gateway(&m.url(), &["--mqtt-version", "5"]).await;
    e2e::wait_health(&base, 200).await;
    let (status, body) = e2e::get(&format!(
        "{base}/invoke?request=r&method=unlock&target=Denied&timeout=3"
    ))
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["result"], "unavailable");
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains("not authorized"),
        "{body}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A device with a persistent session is away; a call's request is queued
/// for it with a Message Expiry Interval of the call's deadline. Back after
/// the deadline, it never receives the request; back within it, it does and
/// answers (the control that shows the broker held the request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_request_never_reaches_a_device_that_comes_back_late() {
    let Some(b) = mosquitto() else { return };
    let ran = Arc::new(AtomicUsize::new(0));
    let router = {
        let ran = Arc::clone(&ran);
        Router::new().method("unlock", move |_| {
            let ran = Arc::clone(&ran);
            async move {
                ran.fetch_add(1, SeqCst);
                Ok("unlocked")
            }
        })
    };
    let car = unique("car");
    let options = || {
        DeviceOptions::new(v5(&b), directcall_core::Target::new(&car).unwrap())
            .persistent_session(Duration::from_secs(60))
            .client_id(car.clone())
    };
    // Every request at QoS 1, so the broker queues it for the away
    // session (by default a target that answered lately gets QoS 0).
    let r = requester_v5_with(&b, |o| o.request_qos(QoS::AtLeastOnce)).await;

    // Late: the call's 1 s deadline passes while the device is away.
    within(15, directcall_device::serve(router.clone(), options()))
        .await
        .unwrap()
        .abort()
        .await;
    let e = r
        .invoke(call(&car, "unlock", json!("now"), 1000))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Timeout { .. }),
        "the session keeps the subscription, so the broker accepts the request: {e:?}"
    );
    // Away a while longer: the scenario. Mosquitto keeps expiry in whole
    // seconds, so a 1 s expiry may take up to 2 s to pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let back = within(15, directcall_device::serve(router.clone(), options()))
        .await
        .unwrap();
    // A request the broker held would be delivered on reconnecting, before
    // anything published after it: once a fresh call is answered, the
    // expired one would have arrived.
    let control = within(10, r.invoke(call(&car, "unlock", json!("control"), 5000)))
        .await
        .unwrap();
    assert_eq!(control.response, json!("unlocked"));
    assert_eq!(ran.load(SeqCst), 1, "an expired request was delivered");
    assert_eq!(back.stats().received, 1, "an expired request was delivered");
    back.abort().await;

    // Within the deadline: the broker delivers the queued request when the
    // device is back, and the caller gets its answer. A spy sees the
    // request once the broker has it, and so has queued it for the device.
    let mut spy = Raw::connect(&b.options_v311(), &unique("spy")).await;
    spy.subscribe(&format!("{car}/#")).await;
    let pending = tokio::spawn({
        let r = r.clone();
        let car = car.clone();
        async move { r.invoke(call(&car, "unlock", json!("now"), 20_000)).await }
    });
    let (topic, _) = spy.next_raw().await;
    assert!(topic.starts_with(&format!("{car}/unlock/")), "{topic}");
    let back = within(15, directcall_device::serve(router, options()))
        .await
        .unwrap();
    let reply = within(20, pending).await.unwrap().unwrap();
    assert_eq!((reply.status, reply.response), (200, json!("unlocked")));
    assert_eq!(ran.load(SeqCst), 2);
    back.shutdown().await;
}

/// `mosquitto_rr`, Mosquitto's own request/response client, calls a
/// directcall device on `{target}/{method}` with a Response Topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_rr_gets_an_answer_from_a_directcall_device() {
    let Some(b) = mosquitto() else { return };
    let Some(rr) = program::MOSQUITTO_RR.require() else {
        return;
    };
    let router = Router::new().method("windows_down", |call| async move {
        Ok(json!({"lowered_to": call.request["percent"], "reply_to": call.reply_to}))
    });
    let _dev = device_on(v5(&b), "VIN123", router).await;
    let port = b.options().endpoints[0].port.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(rr)
            .args(["-V", "5", "-h", "127.0.0.1", "-p", &port])
            .args(["-t", "VIN123/windows_down", "-e", "some/reply/topic"])
            .args(["-m", r#"{"percent":50}"#, "-W", "10"])
            .output()
            .expect("mosquitto_rr runs")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let answer: Value = serde_json::from_slice(&out.stdout).expect("JSON answer");
    assert_eq!(
        answer,
        json!({"status": 200, "response": {"lowered_to": 50, "reply_to": "some/reply/topic"}})
    );
}

/// A plain MQTT 5 request with Correlation Data gets it back, and a
/// request without a Response Topic on `{target}/{method}` is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_request_gets_its_correlation_data_back() {
    let Some(b) = mosquitto() else { return };
    let Some(pub_bin) = program::MOSQUITTO_PUB.require() else {
        return;
    };
    let Some(sub_bin) = program::MOSQUITTO_SUB.require() else {
        return;
    };
    let dev = device_on(
        v5(&b),
        "VIN9",
        Router::new().method("ping", |_| async { Ok("pong") }),
    )
    .await;
    let port = b.options().endpoints[0].port.to_string();
    let reply_topic = unique("replies");
    let publish = |topic: &str, props: &[&str]| {
        let mut c = std::process::Command::new(&pub_bin);
        c.args(["-V", "5", "-h", "127.0.0.1", "-p", &port, "-t", topic]);
        for p in props {
            c.arg(p);
        }
        assert!(c.status().unwrap().success());
    };
    // A retained marker on the reply topic: the subscriber's first line,
    // printed once its subscription is in place.
    publish(&reply_topic, &["-r", "-m", "subscribed"]);
    let mut sub = std::process::Command::new(sub_bin)
        .args([
            "-V",
            "5",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            &reply_topic,
        ])
        .args(["-C", "2", "-W", "10", "-F", "%D %p"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(sub.stdout.take().unwrap());
    let next_line = || {
        lines
            .recv_timeout(Duration::from_secs(10))
            .expect("mosquitto_sub prints within 10 s")
    };
    assert_eq!(next_line().trim(), "subscribed");
    // No response topic: not a request (the seed shape needs four levels).
    publish("VIN9/ping", &["-m", "x"]);
    eventually(5, || dev.stats().malformed == 1).await;
    publish(
        "VIN9/ping",
        &[
            "-m",
            "x",
            "-D",
            "publish",
            "response-topic",
            &reply_topic,
            "-D",
            "publish",
            "correlation-data",
            "abc-123",
        ],
    );
    assert_eq!(
        next_line().trim(),
        r#"abc-123 {"response":"pong","status":200}"#
    );
    let _ = sub.kill();
    let _ = sub.wait();
}

/// The lines `out` prints, read on a thread of their own.
fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A version 5 requester calls a device that speaks only the seed's 3.1.1
/// format (here a bare 3.1.1 client doing what the sample's device does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_requester_calls_a_seed_format_3_1_1_device() {
    let Some(b) = mosquitto() else { return };
    let mut seed = Raw::connect(&b.options_v311(), "SeedCar").await;
    seed.subscribe("SeedCar/#").await;
    let r = requester_v5(&b).await;
    let call = tokio::spawn({
        let r = r.clone();
        async move {
            r.invoke(call("SeedCar", "honk", json!("twice"), 5000))
                .await
        }
    });
    let (topic, request) = seed.next().await;
    // The seed's device: reply on {prefix}/{id}/{target}/{method}/ack with id and response.
    let levels: Vec<&str> = topic.split('/').collect();
    assert_eq!(levels[..2], ["SeedCar", "honk"]);
    assert_eq!(request["request"], "twice");
    let ack = format!("{}/{}/SeedCar/honk/ack", levels[2], levels[3]);
    seed.publish(
        &ack,
        json!({"id": request["id"], "response": "honked"}).to_string(),
    )
    .await;
    let reply = within(10, call).await.unwrap().unwrap();
    assert_eq!((reply.status, reply.response), (200, json!("honked")));
}

/// `traceparent` from the HTTP header reaches the device's handler: as the
/// MQTT 5 user property on version 5, as the payload field on 3.1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_reaches_the_handler_on_both_versions() {
    let Some(b) = mosquitto() else { return };
    for version in ["5", "3.1.1"] {
        let seen = Arc::new(Mutex::new(None::<Option<String>>));
        let router = {
            let seen = Arc::clone(&seen);
            Router::new().method("trace", move |call| {
                let seen = Arc::clone(&seen);
                async move {
                    *seen.lock().unwrap() = Some(call.traceparent.clone());
                    Ok("traced")
                }
            })
        };
        let car = unique("traced");
        let broker = b
            .options()
            .mqtt_version(MqttVersion::parse(version).unwrap());
        let _dev = device_on(broker, &car, router).await;
        let (_gw, base) = e2e::gateway(&b.url(), &["--mqtt-version", version]).await;
        e2e::wait_health(&base, 200).await;
        let url = format!("{base}/invoke?request=r&method=trace&target={car}&timeout=5");
        let (status, body) = e2e::get_with(&url, &[("traceparent", TRACEPARENT)]).await;
        assert_eq!(status, 200, "{version}: {body}");
        assert_eq!(
            seen.lock().unwrap().clone(),
            Some(Some(TRACEPARENT.to_owned())),
            "MQTT {version}"
        );
        // An invalid one is ignored (W3C: start a new trace), not refused.
        let (status, _) = e2e::get_with(&url, &[("traceparent", "00-zz-1")]).await;
        assert_eq!(status, 200);
        assert_eq!(seen.lock().unwrap().clone(), Some(None), "MQTT {version}");
    }
}

/// The library refuses a malformed traceparent before publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_is_refused_by_the_library() {
    let Some(b) = mosquitto() else { return };
    let r = requester_v5(&b).await;
    let e = r
        .invoke(call("Any", "m", Value::Null, 1000).traceparent("not-a-trace"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Invalid { field, .. } if field.as_str() == "traceparent"),
        "{e:?}"
    );
    assert_eq!(r.stats().published, 0);
}

/// The embedded rumqttd 0.20 on its MQTT 5 listener: calls, Response Topic
/// and user properties work; its PUBACK never says "no matching
/// subscribers", so a call nobody serves waits out its deadline there. What
/// it does is asserted, so a rumqttd upgrade that changes it is noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_broker_mqtt_5_calls_work_without_no_subscriber_pubacks() {
    let b = directcall_testkit::EmbeddedBroker::start(None).expect("embedded broker");
    let o = b.options_v5();
    let router = Router::new().method("m", |c| async move {
        Ok(json!({"traceparent": c.traceparent, "reply_to": c.reply_to}))
    });
    let _dev = device_on(o.clone(), "Car1", router).await;
    let prefix = directcall_cloud::Prefix::new(unique("emb5")).unwrap();
    let r = within(
        15,
        directcall_cloud::Requester::connect(directcall_cloud::Options::new(o).prefix(prefix)),
    )
    .await
    .unwrap();
    let reply = r
        .invoke(call("Car1", "m", json!(1), 3000).traceparent(TRACEPARENT))
        .await
        .unwrap();
    assert_eq!(reply.response["traceparent"], TRACEPARENT);
    assert!(reply.response["reply_to"]
        .as_str()
        .unwrap()
        .ends_with("/Car1/m/ack"));
    let e = r
        .invoke(call("Nobody", "m", json!(1), 500))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
}

/// NATS's MQTT is 3.1.1 only: a version 5 requester is refused at CONNECT
/// and says so, rather than waiting silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refuses_mqtt_5_and_the_requester_says_why() {
    let Some(nats) = program::NATS_SERVER
        .or_skip(directcall_testkit::NatsCluster::start(1).expect("nats-server starts"))
    else {
        return;
    };
    let mut broker = nats.options(0).mqtt_version(MqttVersion::V5);
    broker.connect_timeout = Duration::from_secs(2);
    let options = directcall_cloud::Options::new(broker).ready_timeout(Duration::from_secs(3));
    let e = within(15, directcall_cloud::Requester::connect(options))
        .await
        .unwrap_err();
    let Error::Unavailable { last_error, .. } = &e else {
        panic!("expected Unavailable, got {e:?}")
    };
    let last = last_error
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    eprintln!("{e}: {last}");
    assert!(last.contains("try MQTT 3.1.1"), "{e}: {last}");
}
