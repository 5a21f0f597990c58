//! Idempotency keys: one execution per key, counted by the device's own
//! handler; stored outcomes replayed; a reused key with another call is a
//! conflict; ids derived from keys let a device drop a retry that came
//! another way. Library and gateway.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::e2e;
use directcall_cloud::{Error, MessageId};
use directcall_device::Router;
use directcall_testkit::both_brokers;
use serde_json::json;

/// A device whose `unlock` takes `ms` and counts its runs.
fn counting(ms: u64) -> (Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let router = {
        let runs = Arc::clone(&runs);
        Router::new().method("unlock", move |call| {
            let runs = Arc::clone(&runs);
            async move {
                let n = runs.fetch_add(1, SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(json!({"unlocked": call.request, "run": n}))
            }
        })
    };
    (router, runs)
}

async fn one_key_runs_once(b: TestBroker) {
    let car = unique("car");
    let (router, runs) = counting(300);
    let _device = device(&b, &car, router).await;
    let r = requester(&b).await;
    let key = unique("order");
    let keyed = |request| call(&car, "unlock", request, 5000).idempotency_key(key.clone());

    // Two at once: one execution, the same answer, one of them replayed.
    let (a, c) = tokio::join!(
        r.invoke(keyed(json!("door"))),
        r.invoke(keyed(json!("door")))
    );
    let (ra, rc) = (a.unwrap(), c.unwrap());
    assert_eq!(ra.response, json!({"unlocked": "door", "run": 1}));
    assert_eq!(ra.response, rc.response);
    assert_eq!(
        ra.id,
        MessageId::from_key(&key),
        "the id comes from the key"
    );
    assert_eq!((ra.replayed, rc.replayed), (false, true));
    assert_eq!(runs.load(SeqCst), 1);

    // Afterwards: the stored outcome, replayed; nothing published.
    let published = r.stats().published;
    let again = within(10, r.invoke(keyed(json!("door")))).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.response, ra.response);
    assert_eq!(r.stats().published, published);

    // The same key with another call: a conflict, nothing published.
    let e = r.invoke(keyed(json!("trunk"))).await.unwrap_err();
    assert!(matches!(e, Error::KeyConflict), "{e:?}");
    let e = r
        .invoke(call(&car, "unlock", json!("door"), 5000).idempotency_key("no spaces"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Idempotency-Key"), "{e}");
    assert_eq!(r.stats().published, published);

    // Another requester (another gateway replica) with the same key knows
    // nothing of it, but publishes the same id: the device drops it.
    let other = requester(&b).await;
    let e = other
        .invoke(call(&car, "unlock", json!("door"), 700).idempotency_key(key.clone()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert_eq!(runs.load(SeqCst), 1, "the device ran it once");
    assert_eq!(r.stats().pending, 0);
}
both_brokers!(one_key_runs_once);

/// Through the gateway: concurrent POSTs with one key run once and the
/// second says `Idempotent-Replayed: true`; another body is 409; a bad key
/// is 400 naming the header; keys of two tokens never meet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_honours_idempotency_keys() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let car = unique("car");
    let (router, runs) = counting(400);
    let _device = device(&b, &car, router).await;
    let (_gw, base) = e2e::gateway(&b.url(), &["--api-token", "alice,bob"]).await;
    e2e::wait_health(&base, 200).await;
    let path = format!("/v1/targets/{car}/methods/unlock");
    let send = |token: &'static str, key: &'static str, request: &'static str| {
        let (base, path) = (base.clone(), path.clone());
        async move {
            let auth = format!("Bearer {token}");
            e2e::post_full(
                &base,
                &path,
                &[
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                    ("idempotency-key", key),
                ],
                json!({"request": request, "timeout_ms": 5000})
                    .to_string()
                    .into_bytes(),
            )
            .await
        }
    };
    let (a, c) = tokio::join!(send("alice", "k-1", "door"), send("alice", "k-1", "door"));
    assert_eq!((a.status, c.status), (200, 200), "{} {}", a.body, c.body);
    assert_eq!(e2e::json(&a)["response"], e2e::json(&c)["response"]);
    let replayed: Vec<_> = [&a, &c]
        .iter()
        .map(|r| r.header("idempotent-replayed").is_some())
        .collect();
    assert_eq!(replayed.iter().filter(|r| **r).count(), 1, "{replayed:?}");
    assert_eq!(runs.load(SeqCst), 1);

    let later = send("alice", "k-1", "door").await;
    assert_eq!(later.header("idempotent-replayed"), Some("true"));
    assert_eq!(e2e::json(&later)["response"], e2e::json(&a)["response"]);

    let conflict = send("alice", "k-1", "trunk").await;
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    assert_eq!(e2e::json(&conflict)["result"], "conflict");

    let bad = send("alice", "has space", "door").await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("Idempotency-Key"), "{}", bad.body);

    // Bob's k-1 is his own: it runs.
    let bob = send("bob", "k-1", "door").await;
    assert_eq!(bob.status, 200, "{}", bob.body);
    assert_eq!(bob.header("idempotent-replayed"), None);
    assert_eq!(runs.load(SeqCst), 2);
    assert_eq!(e2e::json(&bob)["response"]["run"], 2);

    // The GET form takes the header too.
    let (status, body) = e2e::get_with(
        &format!("{base}/invoke?request=door&method=unlock&target={car}&timeout=5"),
        &[
            ("authorization", "Bearer bob"),
            ("idempotency-key", "\"g-1\""),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(runs.load(SeqCst), 3);
}
