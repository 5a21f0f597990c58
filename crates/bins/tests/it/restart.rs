//! The broker killed and restarted mid-run (Mosquitto: the embedded rumqttd
//! cannot be stopped), and a requester started while no broker listens.

use std::time::Duration;

use crate::common;
use crate::common::{car_router, device, eventually, requester, unique, within, Kind, TestBroker};
use directcall_cloud::{Error, Invocation, Options, Requester};
use directcall_core::BrokerOptions;
use serde_json::{json, Value};

fn alarm_off(target: &str, timeout_ms: u64) -> Invocation {
    common::call(target, "alarm_off", Value::Null, timeout_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_a_broker_restart_on_the_same_port() {
    let Some(mut b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let car = unique("car");
    let dev = device(&b, &car, car_router()).await;
    let r = requester(&b).await;
    assert_eq!(
        within(10, r.invoke(alarm_off(&car, 5000)))
            .await
            .unwrap()
            .response,
        json!("alarm off")
    );

    b.mosquitto.as_mut().unwrap().kill();
    // Calls during the outage end by their deadlines, as Timeout or
    // Unavailable. The broker comes back only after the last of them has
    // ended, so one waiting for it would hang; the bound is seconds past
    // the deadline, for a loaded machine.
    const DEADLINE_MS: u64 = 800;
    let outage: Vec<_> = (0..20)
        .map(|_| {
            let r = r.clone();
            let car = car.clone();
            tokio::spawn(async move { r.invoke(alarm_off(&car, DEADLINE_MS)).await })
        })
        .collect();
    for t in outage {
        match within(10, t).await.unwrap() {
            Err(Error::Timeout { elapsed, .. }) => {
                assert!(
                    elapsed < Duration::from_millis(DEADLINE_MS) + Duration::from_secs(3),
                    "waited past its deadline: {elapsed:?}"
                )
            }
            Err(Error::Unavailable { .. }) => {}
            other => panic!("expected Timeout or Unavailable during the outage, got {other:?}"),
        }
    }
    assert_eq!(r.stats().pending, 0);
    eventually(10, || !r.is_connected()).await;
    let e = r.invoke(alarm_off(&car, 5000)).await.unwrap_err();
    assert!(
        matches!(e, Error::Unavailable { .. }),
        "known-down fails at once: {e:?}"
    );

    b.mosquitto.as_mut().unwrap().restart().unwrap();
    assert!(
        r.wait_ready(Duration::from_secs(10)).await,
        "requester reconnects and resubscribes"
    );
    eventually(10, || dev.is_connected()).await;
    // Without restarting either side:
    let reply = within(10, r.invoke(alarm_off(&car, 5000))).await.unwrap();
    assert_eq!(reply.response, json!("alarm off"));
    let s = r.stats();
    assert_eq!(s.pending, 0);
    assert!(s.reconnects >= 1, "{s:?}");
}

#[tokio::test]
async fn a_requester_without_a_broker_is_unavailable_not_hung() {
    let port = directcall_testkit::free_port().unwrap();
    let options = Options::new(BrokerOptions::new("127.0.0.1", port))
        .ready_timeout(Duration::from_millis(500));
    let e = within(10, Requester::connect(options.clone()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");

    let lazy = Requester::start(options).unwrap();
    let e = within(5, lazy.invoke(alarm_off("car", 3000)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert_eq!(lazy.stats().pending, 0);
    within(5, lazy.shutdown()).await;
}
