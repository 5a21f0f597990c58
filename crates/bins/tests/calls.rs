//! The call scenarios of the foundations, each against the embedded rumqttd
//! and a Mosquitto started by the harness.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{car_router, device, device_with, requester, unique, within, Raw, TestBroker};
use directcall_cloud::{Error, Field, Invocation};
use directcall_core::{MessageId, PresenceRoot};
use directcall_device::{HandlerError, MethodCall, Router};
use serde_json::{json, Value};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn call(target: &str, method: &str, request: Value, timeout_ms: u64) -> Invocation {
    Invocation::parse(target, method, request)
        .unwrap()
        .timeout(Duration::from_millis(timeout_ms))
}

async fn one_call_is_answered(b: TestBroker) {
    let car = unique("car");
    let _device = device(&b, &car, car_router()).await;
    let r = requester(&b).await;
    let reply = within(
        10,
        r.invoke(call(&car, "windows_down", json!("please"), 5000)),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.response,
        json!({"windows": "down", "device": car, "asked": "please"})
    );
    let reply = within(10, r.invoke(call(&car, "alarm_off", Value::Null, 5000)))
        .await
        .unwrap();
    assert_eq!(reply.response, json!("alarm off"));
    assert_eq!(r.stats().pending, 0);
    assert_eq!(r.stats().completed, 2);
}
both_brokers!(one_call_is_answered);

async fn concurrent_calls_over_twenty_devices_get_their_own_answers(b: TestBroker) {
    let fleet = unique("fleet");
    let echo = || {
        Router::new().method("echo", |c: MethodCall| async move {
            Ok::<_, HandlerError>(json!({"device": c.target.as_str(), "request": c.request}))
        })
    };
    let mut devices = Vec::new();
    for i in 0..20 {
        devices.push(device(&b, &format!("{fleet}-{i}"), echo()).await);
    }
    let r = requester(&b).await;
    let calls = (0..200).map(|n| {
        let r = r.clone();
        let target = format!("{fleet}-{}", n % 20);
        async move {
            let reply = r
                .invoke(call(&target, "echo", json!(n), 10_000))
                .await
                .unwrap();
            assert_eq!(reply.status, 200);
            assert_eq!(
                reply.response,
                json!({"device": target, "request": n}),
                "cross-talk"
            );
        }
    });
    let tasks: Vec<_> = calls.map(tokio::spawn).collect();
    for t in tasks {
        within(20, t).await.unwrap();
    }
    let s = r.stats();
    assert_eq!((s.completed, s.pending), (200, 0));
    assert_eq!(s.dropped_unknown + s.dropped_mismatched + s.dropped_late, 0);
    let executed: u64 = devices.iter().map(|d| d.stats().executed).sum();
    assert_eq!(executed, 200);
}
both_brokers!(concurrent_calls_over_twenty_devices_get_their_own_answers);

async fn a_timeout_fires_at_the_deadline(b: TestBroker) {
    let car = unique("car");
    let slow = Router::new().method("slow", |_c: MethodCall| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, HandlerError>(Value::Null)
    });
    let _device = device(&b, &car, slow).await;
    let r = requester(&b).await;
    for target in [car.as_str(), "nobody-home"] {
        let started = Instant::now();
        let e = within(10, r.invoke(call(target, "slow", Value::Null, 700)))
            .await
            .unwrap_err();
        let Error::Timeout { elapsed, .. } = e else {
            panic!("expected a timeout, got {e:?}")
        };
        assert!(elapsed >= Duration::from_millis(700), "{elapsed:?}");
        assert!(
            elapsed < Duration::from_millis(1200),
            "timeout fired late: {elapsed:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(1300));
    }
    let s = r.stats();
    assert_eq!((s.timeouts, s.pending), (2, 0));
}
both_brokers!(a_timeout_fires_at_the_deadline);

async fn an_unknown_method_is_answered_404_at_once(b: TestBroker) {
    let car = unique("car");
    let _device = device(&b, &car, car_router()).await;
    let r = requester(&b).await;
    let reply = within(10, r.invoke(call(&car, "fly", Value::Null, 10_000)))
        .await
        .unwrap();
    assert_eq!(reply.status, 404);
    assert_eq!(reply.response, json!("unknown method 'fly'"));
    // "long before the timeout": a fifth of it is plenty on a loaded machine.
    assert!(
        reply.elapsed < Duration::from_secs(2),
        "{:?}",
        reply.elapsed
    );
}
both_brokers!(an_unknown_method_is_answered_404_at_once);

async fn handler_errors_and_panics_are_answered_500(b: TestBroker) {
    let car = unique("car");
    let router = Router::new()
        .method("fail", |_c: MethodCall| async {
            Err::<Value, _>(HandlerError::new("motor jammed"))
        })
        .method("io", |_c: MethodCall| async {
            Err::<Value, _>(std::io::Error::other("bus error"))
        })
        .method("refuse", |_c: MethodCall| async {
            Err::<Value, _>(HandlerError::bad_request("no"))
        })
        .method("panic", |_c: MethodCall| async {
            if true {
                panic!("handler bug");
            }
            Ok::<Value, HandlerError>(Value::Null)
        });
    let _device = device(&b, &car, router).await;
    let r = requester(&b).await;
    for (method, status, text) in [
        ("fail", 500, "motor jammed"),
        ("io", 500, "bus error"),
        ("refuse", 400, "no"),
        ("panic", 500, "handler panicked"),
    ] {
        let reply = within(10, r.invoke(call(&car, method, Value::Null, 5000)))
            .await
            .unwrap();
        assert_eq!(
            (reply.status, reply.response),
            (status, json!(text)),
            "{method}"
        );
    }
}
both_brokers!(handler_errors_and_panics_are_answered_500);

async fn a_reply_on_another_targets_topic_is_refused(b: TestBroker) {
    let car = unique("car");
    let other = unique("other");
    let mut fake = Raw::connect(&b, &unique("fake")).await;
    fake.subscribe(&format!("{car}/#")).await;
    let r = requester(&b).await;
    let pending = tokio::spawn({
        let r = r.clone();
        let car = car.clone();
        async move { r.invoke(call(&car, "unlock", Value::Null, 10_000)).await }
    });
    let (topic, req) = fake.next().await;
    let levels: Vec<&str> = topic.split('/').collect();
    let (prefix, id) = (levels[2], levels[3]);
    assert_eq!(req["id"], json!(id));
    // right id, but another device's topic: refused, the call keeps waiting
    fake.publish(
        &format!("{prefix}/{id}/{other}/unlock/ack"),
        json!({"id": id, "response": "spoofed"}).to_string(),
    )
    .await;
    // right topic, but the payload names another id: refused too
    let stranger = MessageId::new().to_string();
    fake.publish(
        &format!("{prefix}/{id}/{car}/unlock/ack"),
        json!({"id": stranger, "response": "spoofed"}).to_string(),
    )
    .await;
    // then the genuine answer
    fake.publish(
        &format!("{prefix}/{id}/{car}/unlock/ack"),
        json!({"id": id, "response": "genuine"}).to_string(),
    )
    .await;
    let reply = within(10, pending).await.unwrap().unwrap();
    assert_eq!(reply.response, json!("genuine"));
    let s = r.stats();
    assert_eq!(s.dropped_mismatched, 2);
    assert_eq!((s.completed, s.pending), (1, 0));
}
both_brokers!(a_reply_on_another_targets_topic_is_refused);

async fn a_reply_after_the_timeout_is_dropped_and_nothing_is_left(b: TestBroker) {
    let car = unique("car");
    let mut slow = Raw::connect(&b, &unique("slowcar")).await;
    slow.subscribe(&format!("{car}/#")).await;
    let r = requester(&b).await;
    let pending = tokio::spawn({
        let r = r.clone();
        let car = car.clone();
        async move { r.invoke(call(&car, "unlock", Value::Null, 300)).await }
    });
    let (topic, _) = slow.next().await;
    let e = within(10, pending).await.unwrap().unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(r.stats().pending, 0);
    let levels: Vec<&str> = topic.split('/').collect();
    let (prefix, id) = (levels[2], levels[3]);
    let reply_topic = format!("{prefix}/{id}/{car}/unlock/ack");
    slow.publish(
        &reply_topic,
        json!({"id": id, "response": "too late"}).to_string(),
    )
    .await;
    slow.publish(
        &reply_topic,
        json!({"id": id, "response": "too late again"}).to_string(),
    )
    .await;
    // an id nobody ever asked for, and garbage
    let unknown = MessageId::new();
    slow.publish(
        &format!("{prefix}/{unknown}/{car}/unlock/ack"),
        json!({"id": unknown.to_string()}).to_string(),
    )
    .await;
    slow.publish(&reply_topic, b"\xff not json".to_vec()).await;
    within(10, async {
        loop {
            let s = r.stats();
            if s.dropped_late == 2 && s.dropped_unknown == 1 && s.dropped_malformed == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let s = r.stats();
    assert_eq!((s.pending, s.completed, s.timeouts), (0, 0, 1));
}
both_brokers!(a_reply_after_the_timeout_is_dropped_and_nothing_is_left);

fn counting_router(count: Arc<AtomicUsize>) -> Router {
    Router::new().method("honk", move |_c: MethodCall| {
        let count = Arc::clone(&count);
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(json!("honked"))
        }
    })
}

async fn a_request_delivered_twice_runs_once(b: TestBroker) {
    let car = unique("car");
    let count = Arc::new(AtomicUsize::new(0));
    let dev = device(&b, &car, counting_router(Arc::clone(&count))).await;
    let prefix = unique("raw");
    let mut caller = Raw::connect(&b, &unique("caller")).await;
    caller.subscribe(&format!("{prefix}/+/+/+/ack")).await;
    let id = MessageId::new().to_string();
    let request =
        json!({"id": id, "request": "r", "timestamp": now_ms().to_string(), "timeout_ms": 5000})
            .to_string();
    let topic = format!("{car}/honk/{prefix}/{id}");
    caller.publish(&topic, request.clone()).await;
    caller.publish(&topic, request).await;
    let (reply_topic, reply) = caller.next().await;
    assert_eq!(reply_topic, format!("{prefix}/{id}/{car}/honk/ack"));
    assert_eq!(
        reply,
        json!({"id": id, "response": "honked", "status": 200})
    );
    caller.nothing_for(500).await;
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(dev.stats().duplicates, 1);
}
both_brokers!(a_request_delivered_twice_runs_once);

async fn a_request_past_its_deadline_is_neither_run_nor_answered(b: TestBroker) {
    let car = unique("car");
    let count = Arc::new(AtomicUsize::new(0));
    let dev = device_with(&b, &car, counting_router(Arc::clone(&count)), |o| {
        o.skew(Duration::from_millis(500))
    })
    .await;
    let prefix = unique("raw");
    let mut caller = Raw::connect(&b, &unique("caller")).await;
    caller.subscribe(&format!("{prefix}/+/+/+/ack")).await;
    // sent 10 s ago with a 3 s budget: 10 > 3 + 0.5
    let stale = MessageId::new().to_string();
    let sent = (now_ms() - 10_000).to_string();
    caller
        .publish(
            &format!("{car}/honk/{prefix}/{stale}"),
            json!({"id": stale, "request": 1, "timestamp": sent, "timeout_ms": 3000}).to_string(),
        )
        .await;
    // sent 2 s ago with a 3 s budget: still good
    let fresh = MessageId::new().to_string();
    let sent = (now_ms() - 2_000).to_string();
    caller
        .publish(
            &format!("{car}/honk/{prefix}/{fresh}"),
            json!({"id": fresh, "request": 2, "timestamp": sent, "timeout_ms": 3000}).to_string(),
        )
        .await;
    let (_, reply) = caller.next().await;
    assert_eq!(reply["id"], json!(fresh));
    caller.nothing_for(500).await;
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(dev.stats().expired, 1);
}
both_brokers!(a_request_past_its_deadline_is_neither_run_nor_answered);

async fn handlers_run_concurrently_up_to_the_limit(b: TestBroker) {
    let car = unique("car");
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let router = Router::new().method("work", {
        let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
        move |_c: MethodCall| {
            let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(Value::Null)
            }
        }
    });
    let _dev = device_with(&b, &car, router, |o| o.max_concurrent(3)).await;
    let r = requester(&b).await;
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let r = r.clone();
            let car = car.clone();
            tokio::spawn(async move { r.invoke(call(&car, "work", Value::Null, 10_000)).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(within(15, t).await.unwrap().unwrap().status, 200);
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "handlers must overlap, but never more than 3"
    );
}
both_brokers!(handlers_run_concurrently_up_to_the_limit);

async fn a_full_device_answers_503_at_once(b: TestBroker) {
    let car = unique("car");
    let router = Router::new().method("work", |_c: MethodCall| async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok::<_, HandlerError>(json!("done"))
    });
    let dev = device_with(&b, &car, router, |o| o.max_concurrent(1).max_queued(0)).await;
    let r = requester(&b).await;
    let first = tokio::spawn({
        let r = r.clone();
        let car = car.clone();
        async move { r.invoke(call(&car, "work", Value::Null, 10_000)).await }
    });
    // wait until the first call runs, then the next ones find the device full
    within(10, async {
        while dev.stats().executed == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    for _ in 0..2 {
        let reply = within(10, r.invoke(call(&car, "work", Value::Null, 10_000)))
            .await
            .unwrap();
        assert_eq!(reply.status, 503);
    }
    assert_eq!(
        within(10, first).await.unwrap().unwrap().response,
        json!("done")
    );
    assert_eq!(dev.stats().busy, 2);
}
both_brokers!(a_full_device_answers_503_at_once);

async fn presence_is_retained_and_the_will_marks_a_crash(b: TestBroker) {
    let car = unique("car");
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let dev = device_with(&b, &car, car_router(), |o| o.presence(root.clone())).await;
    let mut watcher = Raw::connect(&b, &unique("watcher")).await;
    watcher.subscribe(&root.filter()).await;
    let (topic, record) = watcher.next().await;
    assert_eq!(
        (topic.as_str(), record),
        (
            root.topic(&directcall_core::Target::new(&car).unwrap())
                .as_str(),
            json!({"online": true})
        )
    );
    dev.abort().await;
    let (_, record) = watcher.next().await;
    assert_eq!(record, json!({"online": false}), "the last will");
}
both_brokers!(presence_is_retained_and_the_will_marks_a_crash);

async fn a_seed_device_answers_a_directcall_requester(b: TestBroker) {
    // A device that knows only the seed's fields: reads id, request, timestamp;
    // answers {"id", "response"} with no status.
    let car = "Device001-".to_owned() + &unique("seed");
    let mut seed = Raw::connect(&b, &car).await;
    seed.subscribe(&format!("{car}/#")).await;
    let r = requester(&b).await;
    let pending = tokio::spawn({
        let r = r.clone();
        let car = car.clone();
        async move {
            r.invoke(call(&car, "reqid-ABCD", json!("my_request_1"), 5000))
                .await
        }
    });
    let (topic, req) = seed.next().await;
    let levels: Vec<&str> = topic.split('/').collect();
    assert_eq!(levels.len(), 4);
    assert_eq!(
        (levels[0], levels[1], levels[2]),
        (car.as_str(), "reqid-ABCD", r.prefix().as_str())
    );
    assert_eq!(req["id"], json!(levels[3]));
    assert_eq!(req["request"], json!("my_request_1"));
    let ts: u64 = req["timestamp"]
        .as_str()
        .expect("timestamp is a decimal string")
        .parse()
        .unwrap();
    assert!(ts.abs_diff(now_ms()) < 60_000);
    let text = format!(
        "Your request was '{}'. Some random response: '333.0155808661127'",
        req["request"].as_str().unwrap()
    );
    seed.publish(
        &format!(
            "{}/{}/{}/{}/ack",
            levels[2], levels[3], levels[0], levels[1]
        ),
        json!({"id": levels[3], "response": text}).to_string(),
    )
    .await;
    let reply = within(10, pending).await.unwrap().unwrap();
    assert_eq!(reply.status, 200, "no status means 200");
    assert_eq!(reply.response, json!(text));
}
both_brokers!(a_seed_device_answers_a_directcall_requester);

async fn a_directcall_device_answers_a_seed_requester(b: TestBroker) {
    let car = unique("Device001");
    let _dev = device(
        &b,
        &car,
        Router::new().method("reqid-ABCD", |c: MethodCall| async move {
            Ok::<_, HandlerError>(json!(format!(
                "Your request was '{}'",
                c.request.as_str().unwrap_or_default()
            )))
        }),
    )
    .await;
    // The seed Lambda: prefix invocation_client, payload {id, request, timestamp} only.
    let mut seed = Raw::connect(&b, &unique("invocation_client")).await;
    seed.subscribe("invocation_client/+/+/+/ack").await;
    let id = MessageId::new().to_string();
    seed.publish(
        &format!("{car}/reqid-ABCD/invocation_client/{id}"),
        json!({"id": id, "request": "my_request_1", "timestamp": now_ms().to_string()}).to_string(),
    )
    .await;
    let (topic, reply) = loop {
        let (topic, reply) = seed.next().await;
        if reply["id"] == json!(id) {
            break (topic, reply);
        }
    };
    assert_eq!(
        topic,
        format!("invocation_client/{id}/{car}/reqid-ABCD/ack")
    );
    assert_eq!(reply["response"], json!("Your request was 'my_request_1'"));
    assert_eq!(reply["status"], json!(200));
}
both_brokers!(a_directcall_device_answers_a_seed_requester);

async fn bad_input_is_refused_before_anything_is_published(b: TestBroker) {
    let mut spy = Raw::connect(&b, &unique("spy")).await;
    let r = requester(&b).await;
    let target = unique("car");
    spy.subscribe(&format!("{target}/#")).await;
    let e = Invocation::parse("car/#", "m", Value::Null).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Invalid {
                field: Field::Target,
                ..
            }
        ),
        "{e:?}"
    );
    let e = Invocation::parse(&target, "+", Value::Null).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Invalid {
                field: Field::Method,
                ..
            }
        ),
        "{e:?}"
    );
    let (long_target, long_method) = ("t".repeat(128), "m".repeat(100));
    let e = r
        .invoke(call(&long_target, &long_method, Value::Null, 1000))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Invalid {
                field: Field::Topic,
                ..
            }
        ),
        "{e:?}"
    );
    let e = r
        .invoke(call(&target, "m", Value::Null, 0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Invalid {
                field: Field::Timeout,
                ..
            }
        ),
        "{e:?}"
    );
    let big = json!("x".repeat(200 * 1024));
    let e = r.invoke(call(&target, "m", big, 1000)).await.unwrap_err();
    assert!(matches!(e, Error::PayloadTooLarge { .. }), "{e:?}");
    spy.nothing_for(300).await;
    assert_eq!(r.stats().published, 0);
}
both_brokers!(bad_input_is_refused_before_anything_is_published);

async fn shutdown_ends_pending_calls_with_closed(b: TestBroker) {
    let r = requester(&b).await;
    let pending = tokio::spawn({
        let r = r.clone();
        async move {
            r.invoke(call(&unique("nobody"), "m", Value::Null, 10_000))
                .await
        }
    });
    within(10, async {
        while r.stats().pending == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    within(10, r.shutdown()).await;
    assert_eq!(
        within(10, pending).await.unwrap().unwrap_err(),
        Error::Closed
    );
    assert_eq!(
        r.invoke(call("x", "m", Value::Null, 1000))
            .await
            .unwrap_err(),
        Error::Closed
    );
    assert_eq!(r.stats().pending, 0);
}
both_brokers!(shutdown_ends_pending_calls_with_closed);

async fn a_call_to_a_crashed_device_fails_offline_at_once(b: TestBroker) {
    let car = unique("car");
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let dev = device_with(&b, &car, car_router(), |o| o.presence(root.clone())).await;
    let r = common::requester_with(&b, |o| o.presence(root.clone())).await;
    let ok = within(10, r.invoke(call(&car, "alarm_off", Value::Null, 5000)))
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    // killed without DISCONNECT: the broker publishes its will
    dev.abort().await;
    let offline = within(10, async {
        loop {
            match r.invoke(call(&car, "alarm_off", Value::Null, 300)).await {
                Err(Error::Offline { target }) => break target,
                Ok(reply) => panic!("a dead device answered: {reply:?}"),
                Err(_) => {} // the will may not have arrived yet
            }
        }
    })
    .await;
    assert_eq!(offline, car);
    let published = r.stats().published;
    let started = Instant::now();
    let e = r
        .invoke(call(&car, "alarm_off", Value::Null, 5000))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Offline { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "offline must not wait out the timeout"
    );
    assert_eq!(
        r.stats().published,
        published,
        "nothing is published to an offline target"
    );
    // a target with no record is tried as usual
    let e = r
        .invoke(call(&unique("unknown"), "x", Value::Null, 200))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    // the device comes back: callable again
    let _back = device_with(&b, &car, car_router(), |o| o.presence(root.clone())).await;
    let reply = within(10, async {
        loop {
            if let Ok(reply) = r.invoke(call(&car, "alarm_off", Value::Null, 1000)).await {
                break reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(reply.response, json!("alarm off"));
}
both_brokers!(a_call_to_a_crashed_device_fails_offline_at_once);

async fn aws_lifecycle_events_mark_a_device_offline(b: TestBroker) {
    let car = unique("thing");
    let r = common::requester_with(&b, |o| o.aws_presence()).await;
    let aws = Raw::connect(&b, &unique("lifecycle")).await;
    let event = |kind: &str, ts: u64| {
        json!({"clientId": car, "timestamp": ts, "eventType": kind, "versionNumber": 0}).to_string()
    };
    let e = within(10, async {
        loop {
            // Until the presence subscription (asked for after the reply
            // subscription) is in place, events go nowhere: send them again.
            aws.publish(
                &format!("$aws/events/presence/disconnected/{car}"),
                event("disconnected", 2000),
            )
            .await;
            // an older "connected" arriving late must not undo the newer disconnect
            aws.publish(
                &format!("$aws/events/presence/connected/{car}"),
                event("connected", 1000),
            )
            .await;
            match r.invoke(call(&car, "m", Value::Null, 200)).await {
                Err(e @ Error::Offline { .. }) => break e,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    assert!(matches!(e, Error::Offline { .. }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(matches!(
        r.invoke(call(&car, "m", Value::Null, 200)).await,
        Err(Error::Offline { .. })
    ));
    aws.publish(
        &format!("$aws/events/presence/connected/{car}"),
        event("connected", 3000),
    )
    .await;
    within(10, async {
        while let Err(Error::Offline { .. }) = r.invoke(call(&car, "m", Value::Null, 50)).await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_lifecycle_events_mark_a_device_offline_on_mosquitto() {
    // rumqttd refuses `$` filters; Mosquitto, like AWS IoT Core, grants them.
    if let Some(b) = TestBroker::start(common::Kind::Mosquitto) {
        aws_lifecycle_events_mark_a_device_offline(b).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_presence_filter_does_not_stop_the_requester() {
    let b = TestBroker::start(common::Kind::Embedded).unwrap();
    let car = unique("car");
    let _dev = device(&b, &car, car_router()).await;
    let r = common::requester_with(&b, |o| o.aws_presence()).await;
    // rumqttd closes the connection over the `$aws` filter (as AWS IoT does
    // over a filter its policy denies): one reconnect, then no presence.
    within(10, async {
        while r.stats().reconnects == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(r.wait_ready(Duration::from_secs(10)).await);
    for _ in 0..5 {
        let reply = within(10, r.invoke(call(&car, "alarm_off", Value::Null, 5000)))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    assert_eq!(r.stats().reconnects, 1);
}

/// MQTT over WebSockets (the transport AWS IoT's SigV4 auth rides on),
/// against Mosquitto's websockets listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_websockets() {
    let ws_port = directcall_bins::free_port().unwrap();
    let extra = format!("listener {ws_port} 127.0.0.1\nprotocol websockets\n");
    let Some(m) = directcall_bins::Mosquitto::start(&extra).expect("mosquitto") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "mosquitto is required in CI"
        );
        return;
    };
    let ws = directcall_core::BrokerOptions::from_url(&format!("ws://127.0.0.1:{ws_port}/mqtt"))
        .unwrap();
    let car = unique("car");
    let _dev = within(
        15,
        directcall_device::serve(
            car_router(),
            directcall_device::DeviceOptions::new(
                ws.clone(),
                directcall_core::Target::new(&car).unwrap(),
            ),
        ),
    )
    .await
    .expect("device over ws");
    let r = within(
        15,
        directcall_cloud::Requester::connect(directcall_cloud::Options::new(ws)),
    )
    .await
    .expect("requester over ws");
    let reply = within(10, r.invoke(call(&car, "alarm_off", Value::Null, 5000)))
        .await
        .unwrap();
    assert_eq!(reply.response, json!("alarm off"));
    drop(m);
}
