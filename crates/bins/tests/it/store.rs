//! Call records and idempotency keys shared through a real Redis (started
//! by the test on a free port): two gateway replicas answer for each
//! other's calls, a retry through the other replica joins the first call,
//! and records expire.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::e2e;
use directcall_device::Router;
use directcall_testkit::{program, RedisServer};
use serde_json::json;

fn redis() -> Option<RedisServer> {
    program::REDIS_SERVER.or_skip(RedisServer::start().expect("redis-server starts"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_records_and_keys_through_redis() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let Some(redis) = redis() else { return };
    let store = redis.url();
    let car = unique("car");
    let runs = Arc::new(AtomicUsize::new(0));
    let router = {
        let runs = Arc::clone(&runs);
        Router::new().method("unlock", move |call| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, SeqCst);
                // Slow: longer than a 1 s call, shorter than a 5 s one.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Ok(json!({"unlocked": call.request}))
            }
        })
    };
    let _device = device(&b, &car, router).await;
    let flags = ["--store", store.as_str(), "--record-retention", "6"];
    let (_a, a) = e2e::gateway(&b.url(), &flags).await;
    let (_b, bb) = e2e::gateway(&b.url(), &flags).await;
    e2e::wait_health(&a, 200).await;
    e2e::wait_health(&bb, 200).await;

    // A call through A times out; B serves its record, late answer and all.
    let (status, body) = e2e::get(&format!(
        "{a}/invoke?request=late&method=unlock&target={car}&timeout=1"
    ))
    .await;
    assert_eq!(status, 504, "{body}");
    let call = body["call"].as_str().unwrap().to_owned();
    let (status, record) = e2e::get(&format!("{bb}{call}?wait=5")).await;
    assert_eq!(status, 200, "{record}");
    let record_url = format!("{bb}{call}");
    let record = wait_for(10, "the late answer on the record", || async {
        let (_, record) = e2e::get(&record_url).await;
        (record["state"] == "answered_late").then_some(record)
    })
    .await;
    assert_eq!(record["response"], json!({"unlocked": "late"}));
    assert_eq!(runs.load(SeqCst), 1);

    // A keyed call through A; its retry through B while it runs joins it.
    let path = format!("/v1/targets/{car}/methods/unlock");
    let send = |base: String, request: &'static str| {
        let path = path.clone();
        async move {
            e2e::post_full(
                &base,
                &path,
                &[
                    ("content-type", "application/json"),
                    ("idempotency-key", "order-7"),
                ],
                json!({"request": request, "timeout_ms": 5000})
                    .to_string()
                    .into_bytes(),
            )
            .await
        }
    };
    let first = tokio::spawn(send(a.clone(), "door"));
    // The retry goes once the first runs on the device.
    eventually(10, || runs.load(SeqCst) == 2).await;
    let retry = send(bb.clone(), "door").await;
    let first = first.await.unwrap();
    assert_eq!(
        (first.status, retry.status),
        (200, 200),
        "{} {}",
        first.body,
        retry.body
    );
    assert_eq!(e2e::json(&first)["response"], json!({"unlocked": "door"}));
    assert_eq!(e2e::json(&retry)["response"], e2e::json(&first)["response"]);
    assert_eq!(e2e::json(&retry)["id"], e2e::json(&first)["id"]);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(runs.load(SeqCst), 2, "the retry ran nothing");

    // The same key with another body, through either: 409.
    let other = send(bb.clone(), "trunk").await;
    assert_eq!(other.status, 409, "{}", other.body);

    // Records expire in Redis too (6 s retention).
    wait_for(15, "the record expired", || async {
        (e2e::get(&record_url).await.0 == 404).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_store_is_refused_at_start() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let err = e2e::refused(&[
        "serve",
        "--broker",
        &b.url(),
        "--listen",
        "127.0.0.1:0",
        "--store",
        "postgres://x",
    ]);
    assert!(err.contains("--store postgres://x"), "{err}");
}
