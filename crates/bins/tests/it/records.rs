//! Call records: a late answer is kept after the timeout and can be read by
//! the call's id, from the library and through the gateway; records expire.
//! The device is a bare seed-format peer (the seed's exact fields), which
//! needs no extension for any of this.

use std::time::Duration;

use crate::common::*;
use crate::e2e;
use directcall_cloud::{CallState, Error, RecordOptions};
use directcall_testkit::{both_brokers, Raw};
use serde_json::{json, Value};

/// A seed-format device on `target` that answers each request `delay_ms`
/// after it arrives, with the seed's `{"id", "response"}` only.
async fn late_seed_device(
    b: &TestBroker,
    target: &str,
    delay_ms: u64,
) -> tokio::task::JoinHandle<()> {
    let mut seed = Raw::connect(&b.options_v311(), &unique("seed")).await;
    seed.subscribe(&format!("{target}/#")).await;
    tokio::spawn(async move {
        loop {
            let (topic, request) = seed.next().await;
            let l: Vec<String> = topic.split('/').map(str::to_owned).collect();
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let answer =
                json!({"id": request["id"], "response": format!("done: {}", request["request"])});
            seed.publish(
                &format!("{}/{}/{}/{}/ack", l[2], l[3], l[0], l[1]),
                answer.to_string(),
            )
            .await;
        }
    })
}

async fn a_late_answer_is_kept_on_the_record(b: TestBroker) {
    let car = unique("car");
    let device = late_seed_device(&b, &car, 600).await;
    let r = requester_with(&b, |o| o.record_calls(RecordOptions::default())).await;

    let e = within(10, r.invoke(call(&car, "unlock", json!("now"), 300)))
        .await
        .unwrap_err();
    let Error::Timeout { id, .. } = e else {
        panic!("expected a timeout, got {e:?}")
    };
    let record = r.call_record(&id).expect("a record");
    assert_eq!(record.state, CallState::TimedOut);
    assert_eq!(
        (record.target.as_str(), record.method.as_str()),
        (car.as_str(), "unlock")
    );
    eventually(10, || {
        r.call_record(&id)
            .is_some_and(|r| r.state == CallState::AnsweredLate)
    })
    .await;
    let record = r.call_record(&id).unwrap();
    assert_eq!(record.status, Some(200), "no status means 200");
    assert_eq!(record.response, Some(json!("done: \"now\"")));
    assert!(record.answered_at_ms.unwrap() >= record.sent_at_ms + 300);
    assert_eq!(r.stats().dropped_late, 1, "still counted as late");

    // In time: answered, with the answer on the record too.
    let reply = within(10, r.invoke(call(&car, "unlock", json!("again"), 5000)))
        .await
        .unwrap();
    let record = r.call_record(&reply.id).unwrap();
    assert_eq!(
        (record.state, record.response),
        (CallState::Answered, Some(json!("done: \"again\"")))
    );
    assert!(r.call_record(&directcall_core::MessageId::new()).is_none());
    assert_eq!(r.stats().pending, 0);
    device.abort();

    // Without records (the library's default) there is none.
    let plain = requester(&b).await;
    let _hole = b.black_hole().await;
    let e = plain
        .invoke(call(&unique("nobody"), "m", Value::Null, 100))
        .await
        .unwrap_err();
    let Error::Timeout { id, .. } = e else {
        panic!("expected a timeout, got {e:?}")
    };
    assert!(plain.call_record(&id).is_none());
}
both_brokers!(a_late_answer_is_kept_on_the_record);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_expire_after_their_retention() {
    let b = TestBroker::start(Kind::Embedded).unwrap();
    let _hole = b.black_hole().await;
    const RETENTION: Duration = Duration::from_millis(800);
    let r = requester_with(&b, |o| o.record_calls(RecordOptions::new(RETENTION, 100))).await;
    let before = std::time::Instant::now();
    let Err(Error::Timeout { id, .. }) = r
        .invoke(call(&unique("nobody"), "m", Value::Null, 100))
        .await
    else {
        panic!("expected a timeout")
    };
    assert_eq!(r.call_record(&id).unwrap().state, CallState::TimedOut);
    eventually(10, || r.call_record(&id).is_none()).await;
    // Gone, and not before its retention (counted from the call's start).
    assert!(before.elapsed() >= RETENTION, "{:?}", before.elapsed());
}

/// Through the gateway: the 504 names the record, `GET /v1/calls/{id}`
/// returns the late answer, bad ids are 400, unknown ones 404, tokens
/// guard the route, and records expire with `--record-retention`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_records_and_late_answers() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let car = unique("car");
    let _device = late_seed_device(&b, &car, 1300).await;
    let (_gw, base) =
        e2e::gateway(&b.url(), &["--api-token", "tok", "--record-retention", "4"]).await;
    e2e::wait_health(&base, 200).await;
    let auth = [("authorization", "Bearer tok")];
    let (status, body) = e2e::get_with(
        &format!("{base}/invoke?request=open&method=unlock&target={car}&timeout=1"),
        &auth,
    )
    .await;
    assert_eq!(status, 504, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(body["call"], json!(format!("/v1/calls/{id}")));
    let record_url = format!("{base}/v1/calls/{id}");

    let (status, record) = e2e::get_with(&record_url, &auth).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["state"], "timed_out", "{record}");
    let record = wait_for(10, "the late answer on the record", || async {
        let (_, record) = e2e::get_with(&record_url, &auth).await;
        (record["state"] == "answered_late").then_some(record)
    })
    .await;
    assert_eq!(record["status"], 200);
    assert_eq!(record["response"], json!("done: \"open\""));
    assert_eq!(
        (record["target"].as_str(), record["method"].as_str()),
        (Some(car.as_str()), Some("unlock"))
    );

    let (status, body) = e2e::get(&record_url).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = e2e::get_with(&format!("{base}/v1/calls/not-an-id"), &auth).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["response"].as_str().unwrap().starts_with("invalid id"),
        "{body}"
    );
    let unknown = directcall_core::MessageId::new();
    let (status, body) = e2e::get_with(&format!("{base}/v1/calls/{unknown}"), &auth).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );

    // Past the 4 s retention: gone.
    wait_for(10, "the record expired", || async {
        (e2e::get_with(&record_url, &auth).await.0 == 404).then_some(())
    })
    .await;
}

/// `Prefer: respond-async`: 202 at once with `Location`, then the record
/// long-polled with `?wait=` until the device answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_accepts_async_calls_and_long_polls_them() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let car = unique("car");
    let slow = directcall_device::Router::new().method("unlock", |call| async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        Ok(json!({"unlocked": call.request}))
    });
    let _device = device(&b, &car, slow).await;
    let (_gw, base) = e2e::gateway(&b.url(), &[]).await;
    e2e::wait_health(&base, 200).await;
    let accepted = e2e::post_full(
        &base,
        &format!("/v1/targets/{car}/methods/unlock"),
        &[
            ("content-type", "application/json"),
            ("prefer", "respond-async"),
        ],
        json!({"request": "door", "timeout_ms": 5000})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let body = e2e::json(&accepted);
    let location = accepted.header("location").expect("Location").to_owned();
    assert_eq!(body["call"], json!(location));
    assert_eq!(body["result"], "accepted");
    assert_eq!(accepted.header("preference-applied"), Some("respond-async"));

    let (status, record) = e2e::get(&format!("{base}{location}")).await;
    assert_eq!(
        (status, record["state"].as_str()),
        (200, Some("sent")),
        "{record}"
    );
    let (status, record) = e2e::get(&format!("{base}{location}?wait=5")).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["state"], "answered", "{record}");
    assert_eq!(record["response"], json!({"unlocked": "door"}));
    assert_eq!(record["id"], body["id"]);

    let (status, body) = e2e::get(&format!("{base}{location}?wait=ever")).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["response"]
            .as_str()
            .unwrap()
            .starts_with("invalid wait"),
        "{body}"
    );
}

/// The library's asynchronous form: `submit` returns the id once the
/// request is out; `wait_call_record` long-polls its record.
async fn a_submitted_call_ends_on_its_record(b: TestBroker) {
    let car = unique("car");
    let _device = device(&b, &car, car_router()).await;
    let r = requester_with(&b, |o| o.record_calls(RecordOptions::default())).await;
    let id = r
        .submit(call(&car, "alarm_off", Value::Null, 5000))
        .await
        .unwrap();
    let record = r
        .wait_call_record(&id, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        (record.state, record.response),
        (CallState::Answered, Some(json!("alarm off")))
    );
    // Without records, there would be nowhere to learn the outcome.
    let plain = requester(&b).await;
    let e = plain
        .submit(call(&car, "alarm_off", Value::Null, 5000))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("call records"), "{e}");
}
both_brokers!(a_submitted_call_ends_on_its_record);

/// Delivery receipts: a directcall device acknowledges before its handler
/// runs, so the record is `delivered` while a slow handler works, and then
/// `answered`; a seed device, which knows nothing of receipts, goes from
/// `sent` to `answered`.
async fn delivered_comes_before_answered(b: TestBroker) {
    let car = unique("car");
    let slow = directcall_device::Router::new().method("unlock", |_| async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        Ok("unlocked")
    });
    let _device = device(&b, &car, slow).await;
    let r = requester_with(&b, |o| {
        o.record_calls(RecordOptions::default())
            .delivery_receipts(true)
    })
    .await;
    let id = r
        .submit(call(&car, "unlock", Value::Null, 5000))
        .await
        .unwrap();
    eventually(5, || {
        r.call_record(&id)
            .is_some_and(|r| r.state == CallState::Delivered)
    })
    .await;
    let record = r
        .wait_call_record(&id, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(record.state, CallState::Answered);
    assert_eq!(record.response, Some(json!("unlocked")));
    assert!(record.delivered_at_ms.unwrap() <= record.answered_at_ms.unwrap());
    assert_eq!(r.stats().receipts, 1);
    assert_eq!(
        r.stats().dropped_malformed,
        0,
        "a receipt is not a malformed reply"
    );

    // The seed's device ignores the extension and sends no receipt: its
    // answer is its delivery.
    let seed_car = unique("seedcar");
    let seed = late_seed_device(&b, &seed_car, 0).await;
    let reply = within(10, r.invoke(call(&seed_car, "unlock", json!("x"), 5000)))
        .await
        .unwrap();
    let record = r.call_record(&reply.id).unwrap();
    assert_eq!(record.state, CallState::Answered);
    assert!(record.answered_at_ms.is_some());
    assert_eq!(record.delivered_at_ms, record.answered_at_ms);
    assert_eq!(r.stats().receipts, 1, "the seed's device sent no receipt");

    // Ours answering within RECEIPT_AFTER sends none either.
    let quick_car = unique("quickcar");
    let quick = directcall_device::Router::new().method("unlock", |_| async { Ok("unlocked") });
    let _quick = device(&b, &quick_car, quick).await;
    let reply = within(10, r.invoke(call(&quick_car, "unlock", Value::Null, 5000)))
        .await
        .unwrap();
    let record = r.call_record(&reply.id).unwrap();
    assert_eq!(record.delivered_at_ms, record.answered_at_ms);
    assert_eq!(r.stats().receipts, 1, "an answer at once needs no receipt");
    seed.abort();
}
both_brokers!(delivered_comes_before_answered);

/// The gateway with `--delivery-receipts`: a 504 says whether the device
/// had the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_says_whether_the_request_was_delivered() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let car = unique("car");
    let slow = directcall_device::Router::new().method("unlock", |_| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok("unlocked")
    });
    let _device = device(&b, &car, slow).await;
    let seed_car = unique("seedcar");
    let _seed = late_seed_device(&b, &seed_car, 1500).await;
    let (_gw, base) = e2e::gateway(&b.url(), &["--delivery-receipts"]).await;
    e2e::wait_health(&base, 200).await;

    let (status, body) = e2e::get(&format!(
        "{base}/invoke?request=r&method=unlock&target={car}&timeout=1"
    ))
    .await;
    assert_eq!(status, 504, "{body}");
    let delivery = body["delivery"].as_str().unwrap();
    assert!(
        delivery.starts_with("delivered at +")
            && delivery.ends_with(" ms, no answer by the deadline"),
        "{body}"
    );
    let (_, record) = e2e::get(&format!("{base}{}", body["call"].as_str().unwrap())).await;
    assert!(record["delivered_at_ms"].as_u64().is_some(), "{record}");

    let (status, body) = e2e::get(&format!(
        "{base}/invoke?request=r&method=unlock&target={seed_car}&timeout=1"
    ))
    .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["delivery"], "no sign of delivery");
}
