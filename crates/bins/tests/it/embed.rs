//! The gateway mounted by a host application: `examples/embed_gateway.rs`'s
//! own service (the file is included here, so the test runs the example's
//! very middleware), with the API nested under `/devices`. Two tenants of
//! that middleware never replay or read each other's calls, and every link
//! the API gives can be followed under the prefix.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use crate::e2e;
use directcall_cloud::{Options, RecordOptions, Requester};
use directcall_device::{serve, DeviceOptions, Router, Target};
use directcall_testkit::EmbeddedBroker;
use serde_json::json;

#[path = "../../../../examples/embed_gateway.rs"]
mod example;

#[tokio::test]
async fn tenants_own_their_keys_and_records_and_links_work_under_the_prefix() {
    let broker = EmbeddedBroker::start(None).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let car = {
        let runs = Arc::clone(&runs);
        Router::new().method("unlock", move |call| {
            let runs = Arc::clone(&runs);
            async move {
                let run = runs.fetch_add(1, SeqCst) + 1;
                Ok(json!({"unlocked": call.request, "run": run}))
            }
        })
    };
    let _device = serve(
        car,
        DeviceOptions::new(broker.options(), Target::new("car-1").unwrap()),
    )
    .await
    .unwrap();
    let options = Options::new(broker.options()).record_calls(RecordOptions::default());
    let requester = Requester::connect(options).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = example::host_app(requester, example::tenants());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let path = "/devices/v1/targets/car-1/methods/unlock";
    let body = || br#"{"request": "door", "timeout_ms": 3000}"#.to_vec();
    let keyed = |tenant: &'static str| [("x-api-key", tenant), ("idempotency-key", "order-1")];

    // The host's own route is untouched, and its middleware answers 401.
    assert_eq!(e2e::get(&format!("{base}/")).await.0, 200);
    assert_eq!(e2e::post(&base, path, &[], body()).await.0, 401);

    // Team A's call runs once; its retry is replayed.
    let a = e2e::post_full(&base, path, &keyed("key-a"), body()).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.header("idempotent-replayed"), None);
    let a_body = e2e::json(&a);
    assert_eq!(a_body["response"]["run"], 1);
    let again = e2e::post_full(&base, path, &keyed("key-a"), body()).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(e2e::json(&again)["response"]["run"], 1);

    // Team B's same key is its own: the call runs again, nothing replayed.
    let b = e2e::post_full(&base, path, &keyed("key-b"), body()).await;
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(b.header("idempotent-replayed"), None);
    assert_eq!(e2e::json(&b)["response"]["run"], 2);
    assert_eq!(runs.load(SeqCst), 2);

    // A's record is A's: B cannot read it, nor learn that it exists.
    let record = format!("{base}/devices/v1/calls/{}", a_body["id"].as_str().unwrap());
    let (status, mine) = e2e::get_with(&record, &[("x-api-key", "key-a")]).await;
    assert_eq!(
        (status, &mine["state"]),
        (200, &json!("answered")),
        "{mine}"
    );
    assert_eq!(mine["caller"], "team-a");
    let (status, theirs) = e2e::get_with(&record, &[("x-api-key", "key-b")]).await;
    assert_eq!(status, 404, "{theirs}");
    assert!(!theirs.to_string().contains("door"), "{theirs}");

    // An asynchronous call's Location and `call` link point under the
    // prefix, and following them gives the record.
    let accepted = e2e::post_full(
        &base,
        path,
        &[("x-api-key", "key-a"), ("prefer", "respond-async")],
        body(),
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let location = accepted.header("location").unwrap().to_owned();
    assert!(location.starts_with("/devices/v1/calls/"), "{location}");
    assert_eq!(e2e::json(&accepted)["call"], json!(location));
    let (status, record) = e2e::get_with(
        &format!("{base}{location}?wait=3"),
        &[("x-api-key", "key-a")],
    )
    .await;
    assert_eq!(
        (status, &record["state"]),
        (200, &json!("answered")),
        "{record}"
    );
    let (status, _) = e2e::get_with(&format!("{base}{location}"), &[("x-api-key", "key-b")]).await;
    assert_eq!(status, 404);

    // The OpenAPI document of the nested API names its paths under it.
    let (status, doc) = e2e::get_with(
        &format!("{base}/devices/openapi.json"),
        &[("x-api-key", "key-b")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        doc["paths"]
            .as_object()
            .unwrap()
            .contains_key("/devices/v1/calls/{id}"),
        "{}",
        doc["paths"]
    );
}
