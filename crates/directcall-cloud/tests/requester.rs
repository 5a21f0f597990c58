//! The requester against real brokers (the embedded rumqttd and a Mosquitto
//! started for each test), with bare MQTT peers as devices: seed devices,
//! slow ones, hostile ones. No directcall-device here.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use directcall_cloud::{Error, Field, Invocation, Options, Prefix, Requester, Unavailable};
use directcall_core::{MessageId, PresenceRoot, Target};
use directcall_testkit::{
    both_brokers, eventually, now_ms, unique, within, Kind, Raw, Relay, TestBroker,
};
use serde_json::{json, Value};

fn call(target: &str, method: &str, request: Value, timeout_ms: u64) -> Invocation {
    Invocation::parse(target, method, request)
        .unwrap()
        .timeout(Duration::from_millis(timeout_ms))
}

/// A requester with its own prefix, so parallel tests never see each other's replies.
async fn requester_with(b: &TestBroker, configure: impl FnOnce(Options) -> Options) -> Requester {
    let options = configure(Options::new(b.options()).prefix(Prefix::new(unique("test")).unwrap()));
    within(15, Requester::connect(options))
        .await
        .expect("requester connects")
}

async fn requester(b: &TestBroker) -> Requester {
    requester_with(b, |o| o).await
}

/// Polls `call` once: whether it is still pending (it then waits to be
/// woken: for its reply, or for an in-flight slot).
async fn still_pending<F: Future + Unpin>(call: &mut F) -> bool {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *call).poll(cx).is_pending())).await
}

/// Until `requester` has applied an AWS lifecycle event `aws` publishes for
/// a device of its own: then every event `aws` published before it has been
/// applied too (one publisher, one subscription: in order). Published again
/// until it lands, as the presence subscription may not be in place yet.
async fn presence_caught_up(requester: &Requester, aws: &Raw) {
    let marker = unique("marker");
    let event = json!({"clientId": marker, "timestamp": now_ms(), "eventType": "disconnected", "versionNumber": 0});
    within(10, async {
        loop {
            aws.publish(
                &format!("$aws/events/presence/disconnected/{marker}"),
                event.to_string(),
            )
            .await;
            for _ in 0..10 {
                if requester
                    .devices()
                    .iter()
                    .any(|d| d.target.as_str() == marker)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
    .await;
}

/// The topic levels of a request a raw device received.
fn levels(topic: &str) -> Vec<String> {
    topic.split('/').map(str::to_owned).collect()
}

async fn a_seed_device_answers_a_directcall_requester(b: TestBroker) {
    // A device that knows only the seed's fields: reads id, request, timestamp;
    // answers {"id", "response"} with no status.
    let car = unique("Device001");
    let mut seed = Raw::connect(&b.options_v311(), &car).await;
    seed.subscribe(&format!("{car}/#")).await;
    let r = requester(&b).await;
    let pending = tokio::spawn({
        let (r, car) = (r.clone(), car.clone());
        async move {
            r.invoke(call(&car, "reqid-ABCD", json!("my_request_1"), 5000))
                .await
        }
    });
    let (topic, req) = seed.next().await;
    let l = levels(&topic);
    assert_eq!(l.len(), 4);
    assert_eq!(
        (l[0].as_str(), l[1].as_str(), l[2].as_str()),
        (car.as_str(), "reqid-ABCD", r.prefix().as_str())
    );
    assert_eq!(req["id"], json!(l[3]));
    assert_eq!(req["request"], json!("my_request_1"));
    let ts: u64 = req["timestamp"]
        .as_str()
        .expect("timestamp is a decimal string")
        .parse()
        .unwrap();
    assert!(ts.abs_diff(now_ms()) < 60_000);
    let text = "Your request was 'my_request_1'. Some random response: '333.0155808661127'";
    seed.publish(
        &format!("{}/{}/{}/{}/ack", l[2], l[3], l[0], l[1]),
        json!({"id": l[3], "response": text}).to_string(),
    )
    .await;
    let reply = within(10, pending).await.unwrap().unwrap();
    assert_eq!(reply.status, 200, "no status means 200");
    assert_eq!(reply.response, json!(text));
    assert!(reply.is_success());
}
both_brokers!(a_seed_device_answers_a_directcall_requester);

async fn a_timeout_fires_at_the_deadline(b: TestBroker) {
    let _hole = b.black_hole().await;
    let r = requester(&b).await;
    let started = Instant::now();
    let e = within(10, r.invoke(call(&unique("nobody"), "m", Value::Null, 700)))
        .await
        .unwrap_err();
    let Error::Timeout { elapsed, .. } = e else {
        panic!("expected a timeout, got {e:?}")
    };
    // Never early. How late is bounded loosely only: on a loaded machine a
    // wake-up can be late by anything; the exact deadline is the unit
    // tests' (invoke.rs, on tokio's paused clock).
    assert!(elapsed >= Duration::from_millis(700), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(5),
        "timeout fired late: {elapsed:?}"
    );
    assert!(
        started.elapsed() >= elapsed,
        "elapsed counts from the call's start"
    );
    let s = r.stats();
    assert_eq!((s.timeouts, s.pending), (1, 0));
}
both_brokers!(a_timeout_fires_at_the_deadline);

async fn a_reply_on_another_targets_topic_is_refused(b: TestBroker) {
    let car = unique("car");
    let other = unique("other");
    let mut fake = Raw::connect(&b.options_v311(), &unique("fake")).await;
    fake.subscribe(&format!("{car}/#")).await;
    let r = requester(&b).await;
    let pending = tokio::spawn({
        let (r, car) = (r.clone(), car.clone());
        async move { r.invoke(call(&car, "unlock", Value::Null, 10_000)).await }
    });
    let (topic, req) = fake.next().await;
    let l = levels(&topic);
    let (prefix, id) = (&l[2], &l[3]);
    assert_eq!(req["id"], json!(id));
    // right id, but another device's topic: refused, the call keeps waiting
    fake.publish(
        &format!("{prefix}/{id}/{other}/unlock/ack"),
        json!({"id": id, "response": "spoofed"}).to_string(),
    )
    .await;
    // right topic, but the payload names another id: refused too
    fake.publish(
        &format!("{prefix}/{id}/{car}/unlock/ack"),
        json!({"id": MessageId::new().to_string(), "response": "spoofed"}).to_string(),
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
    let mut slow = Raw::connect(&b.options_v311(), &unique("slowcar")).await;
    slow.subscribe(&format!("{car}/#")).await;
    let r = requester(&b).await;
    let pending = tokio::spawn({
        let (r, car) = (r.clone(), car.clone());
        async move { r.invoke(call(&car, "unlock", Value::Null, 300)).await }
    });
    let (topic, _) = slow.next().await;
    let e = within(10, pending).await.unwrap().unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(r.stats().pending, 0);
    let l = levels(&topic);
    let (prefix, id) = (&l[2], &l[3]);
    let reply_topic = format!("{prefix}/{id}/{car}/unlock/ack");
    for text in ["too late", "too late again"] {
        slow.publish(
            &reply_topic,
            json!({"id": id, "response": text}).to_string(),
        )
        .await;
    }
    // an id nobody ever asked for, and garbage
    let unknown = MessageId::new();
    slow.publish(
        &format!("{prefix}/{unknown}/{car}/unlock/ack"),
        json!({"id": unknown.to_string()}).to_string(),
    )
    .await;
    slow.publish(&reply_topic, b"\xff not json".to_vec()).await;
    eventually(10, || {
        let s = r.stats();
        s.dropped_late == 2 && s.dropped_unknown == 1 && s.dropped_malformed == 1
    })
    .await;
    let s = r.stats();
    assert_eq!((s.pending, s.completed, s.timeouts), (0, 0, 1));
}
both_brokers!(a_reply_after_the_timeout_is_dropped_and_nothing_is_left);

async fn bad_input_is_refused_before_anything_is_published(b: TestBroker) {
    let mut spy = Raw::connect(&b.options_v311(), &unique("spy")).await;
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
    let _hole = b.black_hole().await;
    let r = requester(&b).await;
    let pending = tokio::spawn({
        let r = r.clone();
        async move {
            r.invoke(call(&unique("nobody"), "m", Value::Null, 10_000))
                .await
        }
    });
    eventually(10, || r.stats().pending == 1).await;
    within(10, r.shutdown()).await;
    let e = within(10, pending).await.unwrap().unwrap_err();
    assert!(matches!(e, Error::Closed), "{e:?}");
    let e = r
        .invoke(call("x", "m", Value::Null, 1000))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Closed), "{e:?}");
    assert_eq!(r.stats().pending, 0);
}
both_brokers!(shutdown_ends_pending_calls_with_closed);

async fn a_call_waiting_for_a_slot_when_shutdown_comes_ends_closed(b: TestBroker) {
    // One slot, taken by a call nobody answers: the second call waits for
    // the slot. Shutdown must end it with Closed, never let it time out.
    let _hole = b.black_hole().await;
    let r = requester_with(&b, |o| o.max_in_flight(1)).await;
    let nobody = unique("nobody");
    let first = tokio::spawn({
        let (r, t) = (r.clone(), nobody.clone());
        async move { r.invoke(call(&t, "m", Value::Null, 10_000)).await }
    });
    eventually(10, || r.stats().pending == 1).await;
    // Polled once, the second call is queued for the slot.
    let mut second = Box::pin(r.invoke(call(&nobody, "m", Value::Null, 30_000)));
    assert!(still_pending(&mut second).await);
    let second = tokio::spawn(second);
    within(10, r.shutdown()).await;
    for task in [first, second] {
        // Waiting out its 30 s deadline would fail `within`, and end as a
        // timeout.
        let e = within(10, task).await.unwrap().unwrap_err();
        assert!(matches!(e, Error::Closed), "{e:?}");
    }
    assert_eq!(r.stats().timeouts, 0);
}
both_brokers!(a_call_waiting_for_a_slot_when_shutdown_comes_ends_closed);

async fn a_target_recorded_offline_fails_at_once(b: TestBroker) {
    let car = unique("car");
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let r = requester_with(&b, |o| o.presence(root.clone())).await;
    let record = Raw::connect(&b.options_v311(), &unique("will")).await;
    let car_target = directcall_core::Target::new(&car).unwrap();
    record
        .publish_with(
            &root.topic(&car_target),
            json!({"online": false}).to_string(),
            1,
            true,
        )
        .await;
    let e = within(10, async {
        loop {
            match r.invoke(call(&car, "m", Value::Null, 200)).await {
                Err(e @ Error::Offline { .. }) => break e,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    let Error::Offline { target } = e else {
        unreachable!()
    };
    assert_eq!(target.as_str(), car);
    let published = r.stats().published;
    // At once: far sooner than the call's 30 s deadline.
    assert!(matches!(
        within(5, r.invoke(call(&car, "m", Value::Null, 30_000))).await,
        Err(Error::Offline { .. })
    ));
    assert_eq!(r.stats().published, published, "nothing is published");
    // a target with no record is tried as usual
    let e = r
        .invoke(call(&unique("unknown"), "x", Value::Null, 200))
        .await
        .unwrap_err();
    if b.answers_no_subscriber() {
        assert!(matches!(e, Error::NoSubscriber { .. }), "{e:?}");
    } else {
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    }
    // cleared records: tried again
    record
        .publish_with(&root.topic(&car_target), Vec::new(), 1, true)
        .await;
    within(10, async {
        while let Err(Error::Offline { .. }) = r.invoke(call(&car, "m", Value::Null, 50)).await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}
both_brokers!(a_target_recorded_offline_fails_at_once);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_lifecycle_events_mark_a_device_offline_on_mosquitto() {
    // rumqttd refuses `$` filters; Mosquitto, like AWS IoT Core, grants them.
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let car = unique("thing");
    let r = requester_with(&b, |o| o.aws_presence()).await;
    let aws = Raw::connect(&b.options_v311(), &unique("lifecycle")).await;
    let event = |kind: &str, ts: u64| {
        json!({"clientId": car, "timestamp": ts, "eventType": kind, "versionNumber": 0}).to_string()
    };
    within(10, async {
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
                Err(Error::Offline { .. }) => break,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    // Every late "connected" sent above has been applied (or ignored).
    presence_caught_up(&r, &aws).await;
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
async fn a_refused_presence_filter_does_not_stop_the_requester() {
    let b = TestBroker::start(Kind::Embedded).unwrap();
    let r = requester_with(&b, |o| o.aws_presence()).await;
    // rumqttd closes the connection over the `$aws` filter (as AWS IoT does
    // over a filter its policy denies), every time: a few reconnects, then
    // the requester goes on without presence.
    eventually(20, || r.stats().reconnects >= 3).await;
    assert!(r.wait_ready(Duration::from_secs(10)).await);
    let reconnects = r.stats().reconnects;
    let car = unique("car");
    let mut seed = Raw::connect(&b.options_v311(), &car).await;
    seed.subscribe(&format!("{car}/#")).await;
    let answer = tokio::spawn(async move {
        for _ in 0..5 {
            let (topic, req) = seed.next().await;
            let l = levels(&topic);
            seed.publish(
                &format!("{}/{}/{}/{}/ack", l[2], l[3], l[0], l[1]),
                json!({"id": req["id"], "response": "ok"}).to_string(),
            )
            .await;
        }
    });
    for _ in 0..5 {
        let reply = within(10, r.invoke(call(&car, "m", Value::Null, 5000)))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    within(10, answer).await.unwrap();
    assert_eq!(r.stats().reconnects, reconnects, "no more reconnects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_survives_a_lost_connection_while_its_subscription_waits() {
    // The connection dies exactly while the optional presence subscription
    // waits for its SUBACK (as a broker restart at that moment would): the
    // next connection must ask for it again, not give presence up for good.
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let upstream: SocketAddr = format!("127.0.0.1:{}", b.options().primary().port)
        .parse()
        .unwrap();
    let relay = Relay::start(upstream).await;
    relay.cut_at_subscribe(2);
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let options = Options::new(relay.options())
        .prefix(Prefix::new(unique("test")).unwrap())
        .presence(root.clone());
    let r = within(15, Requester::connect(options)).await.unwrap();
    eventually(10, || relay.connections() >= 2 && r.is_connected()).await;
    let car = unique("car");
    let record = Raw::connect(&b.options_v311(), &unique("record")).await;
    record
        .publish_with(
            &root.topic(&directcall_core::Target::new(&car).unwrap()),
            json!({"online": false}).to_string(),
            1,
            true,
        )
        .await;
    let offline = within(10, async {
        loop {
            match r.invoke(call(&car, "m", Value::Null, 100)).await {
                Err(Error::Offline { .. }) => break true,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(offline);
    assert_eq!(r.stats().reconnects, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_makes_a_new_connection_at_once() {
    let b = TestBroker::start(Kind::Embedded).unwrap();
    let r = requester(&b).await;
    r.reconnect();
    eventually(10, || r.stats().reconnects == 1 && r.is_connected()).await;
    let e = r
        .invoke(call(&unique("nobody"), "m", Value::Null, 200))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "connected again: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_calls_are_unavailable_with_the_cause() {
    let port = directcall_testkit::free_port().unwrap();
    let options = Options::new(directcall_core::BrokerOptions::new("127.0.0.1", port))
        .ready_timeout(Duration::from_millis(300));
    let e = Requester::connect(options.clone()).await.unwrap_err();
    let Error::Unavailable {
        cause: Unavailable::NotReady { timeout },
        last_error,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(*timeout, Duration::from_millis(300));
    let cause = last_error.as_ref().expect("the connection error is kept");
    assert!(cause.to_string().contains(&port.to_string()), "{cause}");
    assert!(std::error::Error::source(&e).is_some(), "{e}");
    let r = Requester::start(options).unwrap();
    eventually(5, || r.last_error().is_some()).await;
    let e = r
        .invoke(call("car", "m", Value::Null, 1000))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Unavailable {
                cause: Unavailable::NotConnected,
                last_error: Some(_)
            }
        ),
        "{e:?}"
    );
}

/// A seed device on a raw connection: answers every request on the reply
/// topic the request names, with the seed's fields only, until dropped.
async fn seed_device(b: &TestBroker, target: &str) -> tokio::task::JoinHandle<()> {
    let mut seed = Raw::connect(&b.options_v311(), &unique(target)).await;
    seed.subscribe(&format!("{target}/#")).await;
    tokio::spawn(async move {
        loop {
            let (topic, req) = seed.next().await;
            let l = levels(&topic);
            seed.publish(
                &format!("{}/{}/{}/{}/ack", l[2], l[3], l[0], l[1]),
                json!({"id": req["id"], "response": req["request"]}).to_string(),
            )
            .await;
        }
    })
}

/// Three requesters on one broker, 30 calls each: (per requester, the
/// replies it completed and the ones it dropped as unknown).
async fn fan_out(b: &TestBroker, shared: bool) -> Vec<(u64, u64)> {
    let car = unique("car");
    let device = seed_device(b, &car).await;
    let base = Prefix::new(unique("fleet")).unwrap();
    let mut requesters = Vec::new();
    for _ in 0..3 {
        let options = Options::new(b.options()).prefix(base.clone());
        let options = if shared {
            options.shared_prefix()
        } else {
            options
        };
        requesters.push(within(15, Requester::connect(options)).await.unwrap());
    }
    for (i, r) in requesters.iter().enumerate() {
        for n in 0..30 {
            let reply = within(10, r.invoke(call(&car, "m", json!([i, n]), 5000)))
                .await
                .unwrap();
            assert_eq!(reply.response, json!([i, n]), "cross-talk");
        }
    }
    if shared {
        // Each reply also reaches the two others, as unknown.
        eventually(10, || {
            requesters.iter().all(|r| r.stats().dropped_unknown >= 60)
        })
        .await;
    } else {
        // No reply may stray to another requester: give one the time to
        // (an absence has no event to wait for).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    device.abort();
    requesters
        .iter()
        .map(|r| (r.stats().completed, r.stats().dropped_unknown))
        .collect()
}

async fn each_requester_receives_only_its_own_replies(b: TestBroker) {
    // Per-instance prefixes (the default): every reply reaches exactly the
    // requester that asked, and no other.
    let own = fan_out(&b, false).await;
    assert_eq!(own, vec![(30, 0); 3], "each reply delivered once");
    // The seed's shared prefix, for contrast: every reply reaches all three.
    let shared = fan_out(&b, true).await;
    assert_eq!(
        shared,
        vec![(30, 60); 3],
        "each reply delivered three times"
    );
}
both_brokers!(each_requester_receives_only_its_own_replies);

#[test]
fn the_reply_prefix_is_per_instance_and_the_client_id_follows_it() {
    let base = Prefix::new("invocation_client").unwrap();
    let a = Options::new(directcall_core::BrokerOptions::new("h", 1)).prefix(base.clone());
    let b = Options::new(directcall_core::BrokerOptions::new("h", 1)).prefix(base.clone());
    let (pa, pb) = (a.get_reply_prefix().unwrap(), b.get_reply_prefix().unwrap());
    assert_ne!(pa, pb);
    assert!(pa.as_str().starts_with("invocation_client-"), "{pa}");
    assert_eq!(pa.as_str().len(), "invocation_client-".len() + 12);
    assert_eq!(a.get_client_id(), pa.as_str());
    let lambda = a.clone().client_id_prefix("invocation_client");
    assert_eq!(
        lambda.get_client_id(),
        pa.as_str(),
        "client id = reply prefix"
    );
    let shared = a.clone().shared_prefix();
    assert_eq!(shared.get_reply_prefix().unwrap(), base);
    assert_eq!(
        shared.get_client_id(),
        pa.as_str(),
        "still unique per instance"
    );
    let long = Options::new(directcall_core::BrokerOptions::new("h", 1))
        .prefix(Prefix::new("p".repeat(120)).unwrap());
    assert!(long.get_reply_prefix().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_late_knows_from_mirrored_records_who_is_offline() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let early = requester_with(&b, |o| o.aws_presence().mirror_presence(root.clone())).await;
    let car = unique("thing");
    let aws = Raw::connect(&b.options_v311(), &unique("lifecycle")).await;
    let event = json!({"clientId": car, "timestamp": now_ms(), "eventType": "disconnected", "versionNumber": 0});
    within(10, async {
        loop {
            aws.publish(
                &format!("$aws/events/presence/disconnected/{car}"),
                event.to_string(),
            )
            .await;
            if let Err(Error::Offline { .. }) =
                early.invoke(call(&car, "m", Value::Null, 100)).await
            {
                break;
            }
        }
    })
    .await;
    // Lifecycle events are not retained; the mirrored record is.
    let late = requester_with(&b, |o| o.aws_presence().mirror_presence(root.clone())).await;
    let e = within(10, async {
        loop {
            match late.invoke(call(&car, "m", Value::Null, 100)).await {
                Err(e @ Error::Offline { .. }) => break e,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(matches!(e, Error::Offline { .. }));
    // Without the mirror, a late replica would not know (on MQTT 5 it
    // would learn from the broker's "no matching subscribers" instead).
    let _hole = b.black_hole().await;
    let blind = requester_with(&b, |o| o.aws_presence()).await;
    // Its presence subscription is in place, and would have brought any
    // retained record.
    presence_caught_up(&blind, &aws).await;
    let e = blind
        .invoke(call(&car, "m", Value::Null, 200))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
}

/// A call is lazy: nothing is checked or published until its future is
/// first polled, so one dropped unpolled publishes nothing. Shown with a
/// bare MQTT spy on the target's topics: the first request it sees is the
/// call made after the dropped one, and only one was published.
async fn a_call_dropped_before_its_first_poll_publishes_nothing(b: TestBroker) {
    let mut spy = Raw::connect(&b.options_v311(), &unique("spy")).await;
    let r = requester(&b).await;
    let target = unique("car");
    spy.subscribe(&format!("{target}/#")).await;
    let unlock = r.invoke(call(&target, "unlock", json!("never"), 2000));
    drop(unlock);
    // A marker call, made after it: it publishes on its first poll.
    let marker = r.invoke(call(&target, "marker", json!("after"), 2000));
    let marker = tokio::spawn(marker);
    let (topic, request) = within(10, spy.next()).await;
    assert!(
        topic.starts_with(&format!("{target}/marker/")),
        "the first request published is the marker's, not the dropped call's: {topic} {request}"
    );
    assert_eq!(r.stats().published, 1);
    assert!(matches!(marker.await.unwrap(), Err(Error::Timeout { .. })));
    // The spy saw it, so the client wrote it: nothing waits in its queue.
    let s = r.stats();
    assert_eq!((s.published, s.written), (1, 1));
}
both_brokers!(a_call_dropped_before_its_first_poll_publishes_nothing);

/// A retained presence record of `target` under `root`, as a device (or the
/// broker, for its will) writes it.
async fn presence_record(record: &Raw, root: &PresenceRoot, target: &str, body: Value) {
    record
        .publish_with(
            &root.topic(&Target::new(target).unwrap()),
            body.to_string(),
            1,
            true,
        )
        .await;
}

async fn strict_presence_refuses_a_device_never_seen_at_once(b: TestBroker) {
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let (known, ghost) = (unique("car"), unique("ghost"));
    // A device that was online before the requester started: its record
    // reaches the requester only as a retained message after it connects.
    let record = Raw::connect(&b.options_v311(), &unique("record")).await;
    presence_record(&record, &root, &known, json!({"online": true})).await;
    let _device = seed_device(&b, &known).await;
    let r = requester_with(&b, |o| o.presence(root.clone()).strict_presence(true)).await;
    eventually(10, || r.stats().presence_snapshot).await;
    let reply = within(10, r.invoke(call(&known, "m", json!("hi"), 5000)))
        .await
        .unwrap();
    assert_eq!(reply.response, json!("hi"));
    // Never seen: refused at once, far sooner than its 30 s deadline, and
    // not as offline.
    let published = r.stats().published;
    let started = Instant::now();
    let e = within(5, r.invoke(call(&ghost, "m", Value::Null, 30_000)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnknownTarget { target } if target.as_str() == ghost),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "{e:?}");
    assert!(!e.may_have_run() && e.id().is_none(), "{e:?}");
    assert_eq!(r.stats().published, published, "nothing is published");
    // Once it has a record, it is called as usual.
    presence_record(&record, &root, &ghost, json!({"online": true})).await;
    let _ghost = seed_device(&b, &ghost).await;
    let reply = within(10, async {
        loop {
            match r.invoke(call(&ghost, "m", json!("boo"), 2000)).await {
                Err(Error::UnknownTarget { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => break other,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(reply.response, json!("boo"));
    // A new connection takes a new snapshot before it refuses anyone.
    r.reconnect();
    eventually(10, || {
        let s = r.stats();
        s.reconnects == 1 && s.presence_snapshot
    })
    .await;
    let e = within(
        5,
        r.invoke(call(&unique("ghost"), "m", Value::Null, 30_000)),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::UnknownTarget { .. }), "{e:?}");
    let reply = within(10, r.invoke(call(&known, "m", json!("again"), 5000)))
        .await
        .unwrap();
    assert_eq!(reply.response, json!("again"));
}
both_brokers!(strict_presence_refuses_a_device_never_seen_at_once);

#[tokio::test]
async fn strict_presence_needs_records_to_read() {
    let broker = || directcall_core::BrokerOptions::new("127.0.0.1", 9);
    for (options, why) in [
        (
            Options::new(broker()).strict_presence(true),
            "Options::presence",
        ),
        (
            Options::new(broker()).aws_presence().strict_presence(true),
            "Options::mirror_presence",
        ),
    ] {
        let e = Requester::start(options).unwrap_err();
        let Error::Config { option, reason } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(*option, "Options::strict_presence");
        assert!(reason.contains(why), "{e}");
    }
    let root = PresenceRoot::default();
    for options in [
        Options::new(broker()).presence(root.clone()),
        Options::new(broker())
            .aws_presence()
            .mirror_presence(root.clone()),
    ] {
        let r = Requester::start(options.strict_presence(true)).unwrap();
        assert!(!r.stats().presence_snapshot);
        r.shutdown().await;
    }
}

async fn a_will_stamped_with_the_connect_time_marks_the_device_offline(b: TestBroker) {
    // A device of another make writes its connect time into its last will
    // (a will is fixed when the device connects) and a later time into the
    // online record it publishes once connected. When it dies, the will
    // arrives last with the older timestamp: the device is offline.
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let car = unique("car");
    let r = requester_with(&b, |o| o.presence(root.clone())).await;
    let record = Raw::connect(&b.options_v311(), &unique("record")).await;
    let connected_at = now_ms();
    presence_record(
        &record,
        &root,
        &car,
        json!({"online": true, "timestamp": connected_at + 5}),
    )
    .await;
    eventually(10, || {
        r.devices()
            .iter()
            .any(|d| d.target.as_str() == car && d.online)
    })
    .await;
    presence_record(
        &record,
        &root,
        &car,
        json!({"online": false, "timestamp": connected_at}),
    )
    .await;
    let e = within(10, async {
        loop {
            match r.invoke(call(&car, "m", Value::Null, 100)).await {
                Err(e @ Error::Offline { .. }) => break e,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    assert!(!e.may_have_run(), "{e:?}");
    let listed = r.devices().into_iter().find(|d| d.target.as_str() == car);
    assert_eq!(listed.map(|d| d.online), Some(false));
}
both_brokers!(a_will_stamped_with_the_connect_time_marks_the_device_offline);

async fn the_presence_snapshot_is_in_only_once_every_retained_record_is(b: TestBroker) {
    // rumqttd sends a new subscription at most as many retained messages
    // as it has outgoing slots (1,024 in the test kit) and drops the rest.
    let devices = match b.kind {
        Kind::Embedded => 1000,
        _ => 5000,
    };
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let fleet = unique("fleet");
    let record = Raw::connect(&b.options_v311(), &unique("record")).await;
    for i in 0..devices {
        presence_record(
            &record,
            &root,
            &format!("{fleet}-{i}"),
            json!({"online": true}),
        )
        .await;
    }
    // The broker holds them all before the requester starts: it stores one
    // client's publishes in order, and a last one is there.
    let last = format!("{fleet}-last");
    presence_record(&record, &root, &last, json!({"online": true})).await;
    let mut reader = Raw::connect(&b.options_v311(), &unique("reader")).await;
    reader
        .subscribe(&root.topic(&Target::new(&last).unwrap()))
        .await;
    within(10, reader.next_raw()).await;
    let r = requester_with(&b, |o| o.presence(root.clone()).strict_presence(true)).await;
    // Read as soon as the snapshot is in: every record is known by then.
    let known = within(10, async {
        loop {
            if r.stats().presence_snapshot {
                break r.devices().len();
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(known, devices + 1);
}
both_brokers!(the_presence_snapshot_is_in_only_once_every_retained_record_is);

async fn a_reply_with_a_bad_status_ends_its_call_at_once(b: TestBroker) {
    let car = unique("car");
    let mut fake = Raw::connect(&b.options_v311(), &unique("fake")).await;
    fake.subscribe(&format!("{car}/#")).await;
    let r = requester_with(&b, |o| {
        o.record_calls(directcall_cloud::RecordOptions::default())
    })
    .await;
    for (n, bad) in [json!("201"), json!(70000), json!(-1)]
        .into_iter()
        .enumerate()
    {
        let pending = tokio::spawn({
            let (r, car) = (r.clone(), car.clone());
            async move { r.invoke(call(&car, "unlock", Value::Null, 30_000)).await }
        });
        let (topic, _) = fake.next().await;
        let l = levels(&topic);
        let (prefix, id) = (&l[2], &l[3]);
        // A stranger cannot end the call with a bad reply: not on another
        // device's topic, nor with another id in the payload.
        fake.publish(
            &format!("{prefix}/{id}/{}/unlock/ack", unique("other")),
            json!({"id": id, "status": bad}).to_string(),
        )
        .await;
        fake.publish(
            &format!("{prefix}/{id}/{car}/unlock/ack"),
            json!({"id": MessageId::new().to_string(), "status": bad}).to_string(),
        )
        .await;
        eventually(10, || r.stats().dropped_mismatched == 2 * (n as u64 + 1)).await;
        let mut pending = pending;
        assert!(still_pending(&mut pending).await, "ended by a stranger");
        // The device's own bad reply ends it at once, naming the field.
        let started = Instant::now();
        fake.publish(
            &format!("{prefix}/{id}/{car}/unlock/ack"),
            json!({"id": id, "response": "done", "status": bad}).to_string(),
        )
        .await;
        let e = within(10, pending).await.unwrap().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{e:?}");
        let Error::BadReply {
            id: failed,
            field,
            reason,
        } = &e
        else {
            panic!("expected a bad reply, got {e:?}")
        };
        assert_eq!(failed.to_string(), *id);
        assert_eq!(*field, Field::Status);
        assert!(reason.contains(&bad.to_string()), "{e}");
        assert_eq!(e.id(), Some(*failed));
        assert!(e.may_have_run());
        let record = r.call_record(failed).expect("a record");
        assert_eq!(record.state, directcall_cloud::CallState::BadReply);
        assert!(
            record
                .response
                .unwrap()
                .as_str()
                .unwrap()
                .contains("status"),
            "the record says why"
        );
    }
    assert_eq!((r.stats().pending, r.stats().timeouts), (0, 0));
}
both_brokers!(a_reply_with_a_bad_status_ends_its_call_at_once);

#[tokio::test]
async fn submit_without_records_names_the_option() {
    let b = TestBroker::start(Kind::Embedded).unwrap();
    let r = requester(&b).await;
    let e = r
        .submit(call(&unique("car"), "m", Value::Null, 1000))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Config {
                option: "Options::record_calls",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.may_have_run() && e.id().is_none());
    assert_eq!(r.stats().published, 0);
}
