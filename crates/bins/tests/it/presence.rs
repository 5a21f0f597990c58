//! Presence through the gateway: `directcall serve --strict-presence`
//! answers a device that was never seen 404 `unknown_device` at once, and
//! tells it from a device known to be offline (404 `offline`).

use std::time::{Duration, Instant};

use crate::common::{car_router, device_with, unique, within, TestBroker};
use crate::e2e::{gateway, get, wait_health};
use directcall_core::PresenceRoot;
use directcall_testkit::both_brokers;
use serde_json::json;

async fn strict_presence_answers_404_unknown_device_at_once(b: TestBroker) {
    let root_name = unique("presence");
    let root = PresenceRoot::new(root_name.as_str()).unwrap();
    let (car, gone) = (unique("car"), unique("gone"));
    let _car = device_with(&b, &car, car_router(), |o| o.presence(root.clone())).await;
    let crashed = device_with(&b, &gone, car_router(), |o| o.presence(root.clone())).await;
    crashed.abort().await;
    let (_gw, base) = gateway(
        &b.url(),
        &["--strict-presence", "--presence-root", &root_name],
    )
    .await;
    wait_health(&base, 200).await;
    let invoke = |target: &str, timeout_s: u64| {
        format!("{base}/invoke?request=r&method=alarm_off&target={target}&timeout={timeout_s}")
    };
    // Until the presence snapshot is in, a device never seen is tried as
    // usual (a 504 after its second, or on MQTT 5 the broker's "no
    // matching subscribers"); then refused.
    let ghost = unique("ghost");
    within(30, async {
        while get(&invoke(&ghost, 1)).await.1["result"] != "unknown_device" {}
    })
    .await;
    let started = Instant::now();
    let (status, body) = get(&invoke(&unique("ghost"), 30)).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["result"], "unknown_device", "{body}");
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .contains("no presence record"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "at once, not after its 30 s: {:?}",
        started.elapsed()
    );
    // A device that crashed is offline, not unknown.
    let (status, body) = within(10, async {
        loop {
            let (status, body) = get(&invoke(&gone, 1)).await;
            if body["result"] == "offline" {
                break (status, body);
            }
        }
    })
    .await;
    assert_eq!((status, body["elapsed"].is_string()), (404, true), "{body}");
    // A device with a record answers.
    let (status, body) = get(&invoke(&car, 5)).await;
    assert_eq!(
        (status, &body["response"]),
        (200, &json!("alarm off")),
        "{body}"
    );
    // Counted under their own outcome.
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    let text = metrics.as_str().unwrap_or_default();
    for outcome in ["unknown_device", "offline"] {
        assert!(
            text.contains(&format!("directcall_calls_total{{outcome=\"{outcome}\"}}")),
            "{text}"
        );
    }
}
both_brokers!(strict_presence_answers_404_unknown_device_at_once);
