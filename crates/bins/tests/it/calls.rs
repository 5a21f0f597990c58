//! The call scenarios of the foundations, each against the embedded rumqttd
//! and a Mosquitto started by the harness.

use std::time::{Duration, Instant};

use crate::common;
use crate::common::{
    call, car_router, device, device_with, requester, unique, wait_for, within, TestBroker,
};
use directcall_cloud::Error;
use directcall_core::PresenceRoot;
use directcall_device::Router;
use directcall_testkit::both_brokers;
use serde_json::{json, Value};

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
        Router::new().method("echo", |c| async move {
            Ok(json!({"device": c.target.as_str(), "request": c.request}))
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

async fn a_call_to_a_crashed_device_fails_offline_at_once(b: TestBroker) {
    let car = unique("car");
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let dev = device_with(&b, &car, car_router(), |o| o.presence(root.clone())).await;
    let r = common::requester_with(&b, |o| o.presence(root.clone())).await;
    let ok = within(10, r.invoke(call(&car, "alarm_off", Value::Null, 5000)))
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    // The device list: online, since a moment ago.
    let listed = {
        let (r, car) = (&r, car.as_str());
        wait_for(10, "the device listed", || async move {
            r.devices().into_iter().find(|d| d.target.as_str() == car)
        })
        .await
    };
    assert!(listed.online, "{listed:?}");
    let mut changes = r.watch_devices();
    // killed without DISCONNECT: the broker publishes its will
    dev.abort().await;
    let change = within(10, async {
        loop {
            let d = changes.recv().await.unwrap();
            if d.target.as_str() == car {
                break d;
            }
        }
    })
    .await;
    assert!(!change.online, "{change:?}");
    assert!(change.since_ms >= listed.since_ms, "{change:?} {listed:?}");
    let listed = r.devices().into_iter().find(|d| d.target.as_str() == car);
    assert_eq!(listed, Some(change));
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
    assert_eq!(offline.as_str(), car);
    let published = r.stats().published;
    let started = Instant::now();
    let e = r
        .invoke(call(&car, "alarm_off", Value::Null, 10_000))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Offline { .. }), "{e:?}");
    // At once: far from the 10 s a call that waited would take.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "offline must not wait out the timeout: {:?}",
        started.elapsed()
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
    if b.answers_no_subscriber() {
        assert!(matches!(e, Error::NoSubscriber { .. }), "{e:?}");
    } else {
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    }
    // the device comes back: callable again
    let _back = device_with(&b, &car, car_router(), |o| o.presence(root.clone())).await;
    let reply = {
        let (r, car) = (&r, car.as_str());
        wait_for(10, "the device callable again", || async move {
            r.invoke(call(car, "alarm_off", Value::Null, 1000))
                .await
                .ok()
        })
        .await
    };
    assert_eq!(reply.response, json!("alarm off"));
}
both_brokers!(a_call_to_a_crashed_device_fails_offline_at_once);

/// MQTT over WebSockets (the transport AWS IoT's SigV4 auth rides on),
/// against Mosquitto's websockets listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_websockets() {
    let ws_port = directcall_testkit::free_port().unwrap();
    let extra = format!("listener {ws_port} 127.0.0.1\nprotocol websockets\n");
    let Some(m) = directcall_testkit::program::MOSQUITTO
        .or_skip(directcall_testkit::Mosquitto::start(&extra).expect("mosquitto"))
    else {
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
