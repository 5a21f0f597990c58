//! What comes back through the gateway: a device's reply that breaks the
//! rules is a 502 naming the field, at once; a caller asks for a delivery
//! receipt per call (`"receipt": true`, `&receipt=true`).

use std::time::{Duration, Instant};

use crate::common::{device, unique, TestBroker};
use crate::e2e::{gateway, get, post, wait_health};
use directcall_device::Router;
use directcall_testkit::{both_brokers, Raw};
use serde_json::json;

async fn a_bad_status_is_a_502_naming_the_field_at_once(b: TestBroker) {
    let car = unique("car");
    // A device of another make that writes its status as a string.
    let mut odd = Raw::connect(&b.options_v311(), &unique("odd")).await;
    odd.subscribe(&format!("{car}/#")).await;
    let answering = tokio::spawn(async move {
        loop {
            let (topic, request) = odd.next().await;
            let l: Vec<&str> = topic.split('/').collect();
            odd.publish(
                &format!("{}/{}/{}/{}/ack", l[2], l[3], l[0], l[1]),
                json!({"id": request["id"], "response": "done", "status": "201"}).to_string(),
            )
            .await;
        }
    });
    let (_gw, base) = gateway(&b.url(), &[]).await;
    wait_health(&base, 200).await;
    for path in [
        format!("/invoke?request=r&method=unlock&target={car}&timeout=30"),
        format!("/v1/targets/{car}/methods/unlock"),
    ] {
        let started = Instant::now();
        let (status, body) = if path.starts_with("/invoke") {
            get(&format!("{base}{path}")).await
        } else {
            post(&base, &path, &[], br#"{"timeout_ms":30000}"#.to_vec()).await
        };
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "at once, not after its 30 s: {:?}",
            started.elapsed()
        );
        assert_eq!(status, 502, "{body}");
        assert_eq!(body["result"], "bad_reply", "{body}");
        assert_eq!(body["field"], "status", "{body}");
        assert!(
            body["response"]
                .as_str()
                .unwrap()
                .contains(r#"got the string "201""#),
            "{body}"
        );
        // Its record says so too.
        let id = body["id"].as_str().unwrap();
        let (status, record) = get(&format!("{base}/v1/calls/{id}")).await;
        assert_eq!(
            (status, &record["state"]),
            (200, &json!("bad_reply")),
            "{record}"
        );
    }
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    let text = metrics.as_str().unwrap_or_default();
    assert!(
        text.contains("directcall_calls_total{outcome=\"bad_reply\"} 2"),
        "{text}"
    );
    answering.abort();
}
both_brokers!(a_bad_status_is_a_502_naming_the_field_at_once);

async fn a_caller_asks_for_a_receipt_per_call(b: TestBroker) {
    let car = unique("car");
    let slow = Router::new().method("slow", |_| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok("late")
    });
    let _car = device(&b, &car, slow).await;
    // The gateway asks for no receipts of its own (no --delivery-receipts).
    let (_gw, base) = gateway(&b.url(), &[]).await;
    wait_health(&base, 200).await;
    let path = format!("/v1/targets/{car}/methods/slow");
    let with = |receipt: &str| format!(r#"{{"timeout_ms":500{receipt}}}"#);
    let (status, body) = post(&base, &path, &[], with(r#","receipt":true"#).into_bytes()).await;
    assert_eq!(status, 504, "{body}");
    assert_delivered(&body);
    let (_, record) = get(&format!("{base}{}", body["call"].as_str().unwrap())).await;
    assert!(record["delivered_at_ms"].is_u64(), "{record}");
    // Not asked: no receipt, and the 504 does not pretend to know.
    let (status, body) = post(&base, &path, &[], with("").into_bytes()).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.get("delivery").is_none(), "{body}");
    let (_, record) = get(&format!("{base}{}", body["call"].as_str().unwrap())).await;
    assert!(record.get("delivered_at_ms").is_none(), "{record}");
    // The AWS sample's form takes it as a parameter.
    let (status, body) = get(&format!(
        "{base}/invoke?request=r&method=slow&target={car}&timeout=1&receipt=true"
    ))
    .await;
    assert_eq!(status, 504, "{body}");
    assert_delivered(&body);
    // A bad value is refused, naming it.
    let (status, body) = post(&base, &path, &[], br#"{"receipt":"yes"}"#.to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .starts_with("invalid receipt: "),
        "{body}"
    );
}
both_brokers!(a_caller_asks_for_a_receipt_per_call);

/// A 504 that says the device had the request.
fn assert_delivered(body: &serde_json::Value) {
    let delivery = body["delivery"].as_str().unwrap_or_default();
    assert!(delivery.starts_with("delivered at +"), "{body}");
}
