//! Call records and idempotency keys shared through a real Redis (started
//! by the test on a free port): two gateway replicas answer for each
//! other's calls, a retry through the other replica joins the first call,
//! and records expire. Through Redis Sentinel, the replicas follow the
//! master it promotes.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::e2e;
use directcall_device::Router;
use directcall_testkit::{program, RedisSentinel, RedisServer};
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

    // A sentinel URL that names no master: refused, without its password.
    let err = e2e::refused(&[
        "serve",
        "--broker",
        &b.url(),
        "--listen",
        "127.0.0.1:0",
        "--store",
        "redis+sentinel://:s3cret@127.0.0.1:26379",
    ]);
    assert!(err.contains("names no master"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

/// A device that counts its runs of `unlock` by call id.
fn counting_router(runs: &Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>) -> Router {
    let runs = Arc::clone(runs);
    Router::new().method("unlock", move |call| {
        let runs = Arc::clone(&runs);
        async move {
            *runs.lock().unwrap().entry(call.id.to_string()).or_default() += 1;
            Ok(json!("unlocked"))
        }
    })
}

/// Redis killed under load, then started again (empty) on its port: calls
/// keep being answered, each replica serves its own records from memory, a
/// keyed retry on the same replica joins the first call instead of running
/// again, and once Redis is back the replicas share records again with no
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_costs_no_call_and_writes_resume() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let Some(mut redis) = redis() else { return };
    let car = unique("car");
    let runs = Arc::default();
    let _device = device(&b, &car, counting_router(&runs)).await;
    let url = redis.url();
    let a = requester_with(&b, |o| o.redis_store(url.clone())).await;
    let bb = requester_with(&b, |o| o.redis_store(url.clone())).await;
    let keyed = |key: &str| call(&car, "unlock", json!(key), 2000).idempotency_key(key);

    let before = within(10, a.invoke(keyed("before"))).await.unwrap();
    wait_for(10, "B reading A's record through Redis", || async {
        bb.fetch_call_record(&before.id).await
    })
    .await;

    redis.kill();
    let outage = std::time::Instant::now();
    for i in 0..40 {
        let key = format!("outage-{i}");
        // Ok means answered within its 2 s deadline: the requester ends a
        // call at its deadline whatever it waits on.
        let reply = within(10, a.invoke(keyed(&key))).await;
        let reply = reply.unwrap_or_else(|e| panic!("call {i} while Redis is down: {e}"));
        assert_eq!(reply.response, json!("unlocked"));
        // A's own record, from memory.
        assert!(a.fetch_call_record(&reply.id).await.is_some());
        // The same key again on A: the stored outcome, not a second run.
        let again = within(10, a.invoke(keyed(&key))).await.unwrap();
        assert!(again.replayed);
        assert_eq!(runs.lock().unwrap()[&reply.id.to_string()], 1);
        // Unkeyed calls through B go on too.
        within(10, bb.invoke(call(&car, "unlock", json!(i), 2000)))
            .await
            .unwrap();
    }
    eprintln!(
        "redis down: 120 calls answered in {} ms",
        outage.elapsed().as_millis()
    );

    redis.restart().unwrap();
    let back = std::time::Instant::now();
    let after = wait_for(20, "a call through A readable through B again", || async {
        let reply = a.invoke(keyed(&unique("after"))).await.ok()?;
        let id = reply.id;
        tokio::time::sleep(Duration::from_millis(100)).await;
        bb.fetch_call_record(&id).await
    })
    .await;
    assert_eq!(after.response, Some(json!("unlocked")));
    eprintln!(
        "redis restarted: shared again {} ms later",
        back.elapsed().as_millis()
    );
}

/// Redis frozen (SIGSTOP: connections open, nothing answered): no keyed
/// call waits on it past its own deadline; each goes on without the store
/// after at most half its time (500 ms at most) and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_never_holds_a_call_past_its_deadline() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let Some(redis) = redis() else { return };
    let car = unique("car");
    let runs = Arc::default();
    let _device = device(&b, &car, counting_router(&runs)).await;
    let url = redis.url();
    let a = requester_with(&b, |o| o.redis_store(url.clone())).await;
    let bb = requester_with(&b, |o| o.redis_store(url.clone())).await;
    within(
        10,
        a.invoke(call(&car, "unlock", json!(0), 1000).idempotency_key("warm")),
    )
    .await
    .unwrap();

    redis.freeze();
    for i in 0..5 {
        // Ok: answered within its 1 s deadline, after waiting at most
        // 500 ms on the store (before, it waited on Redis for minutes).
        let reply = within(
            10,
            a.invoke(call(&car, "unlock", json!(i), 1000).idempotency_key(format!("frozen-{i}"))),
        )
        .await
        .unwrap_or_else(|e| panic!("call {i} with Redis frozen: {e}"));
        assert_eq!(reply.response, json!("unlocked"));
        // A record of another replica's call cannot be read now: the read
        // gives up after 500 ms instead of holding its caller.
        let missing = within(5, a.fetch_call_record(&directcall_core::MessageId::new())).await;
        assert!(missing.is_none());
    }
    // Thawed: the replicas share records again, with no restart.
    redis.thaw();
    let thawed = std::time::Instant::now();
    wait_for(
        20,
        "a call through A readable through B after the thaw",
        || async {
            let reply = a
                .invoke(call(&car, "unlock", json!("after"), 1000).idempotency_key(unique("after")))
                .await
                .ok()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            bb.fetch_call_record(&reply.id).await
        },
    )
    .await;
    eprintln!(
        "redis thawed: shared again {} ms later",
        thawed.elapsed().as_millis()
    );
}

/// Redis unreachable from the start (nothing listens on its port): a keyed
/// call with a 1 s deadline is answered, not held for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_never_answered_costs_a_keyed_call_nothing() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let port = directcall_testkit::free_port().unwrap();
    let url = format!("redis://127.0.0.1:{port}");
    let car = unique("car");
    let runs = Arc::default();
    let _device = device(&b, &car, counting_router(&runs)).await;
    let a = requester_with(&b, |o| o.redis_store(url.clone())).await;
    // Ok: answered within its 1 s deadline (the issue measured 473 s).
    let reply = within(
        10,
        a.invoke(call(&car, "unlock", json!("x"), 1000).idempotency_key("first-use")),
    )
    .await
    .unwrap();
    assert_eq!(reply.response, json!("unlocked"));
}

/// Redis over TLS (`rediss://`), its server certificate checked against
/// `--store-ca`: records are shared as over plain TCP; with a CA that did
/// not sign it, the store fails (counted and logged) and calls go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_shared_over_rediss_verified_against_the_store_ca() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let (Some(pki), Some(stranger)) = (
        crate::common::pki::Pki::new("rediss"),
        crate::common::pki::Pki::new("rediss-stranger"),
    ) else {
        return;
    };
    pki.issue("localhost");
    let Some(redis) = program::REDIS_SERVER.or_skip(
        RedisServer::start_tls(
            &pki.dir.join("localhost.pem"),
            &pki.dir.join("localhost.key"),
            &pki.dir.join("ca.pem"),
        )
        .expect("redis-server starts with TLS"),
    ) else {
        return;
    };
    let store = redis.url();
    assert!(store.starts_with("rediss://"), "{store}");
    let car = unique("car");
    let _device = device(&b, &car, car_router()).await;
    let ca = pki.path("ca.pem");
    let flags = ["--store", store.as_str(), "--store-ca", ca.as_str()];
    let (_a, a) = e2e::gateway(&b.url(), &flags).await;
    let (_b, bb) = e2e::gateway(&b.url(), &flags).await;
    e2e::wait_health(&a, 200).await;
    e2e::wait_health(&bb, 200).await;
    let (status, body) = e2e::get(&format!(
        "{a}/invoke?request=r&method=windows_down&target={car}&timeout=5"
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    // The record is written behind the reply: "sent" may come first.
    let record = wait_for(
        10,
        "the answered record through the other replica",
        || async {
            let (status, record) = e2e::get(&format!("{bb}/v1/calls/{id}")).await;
            (status == 200 && record["state"] != "sent").then_some(record)
        },
    )
    .await;
    assert_eq!(record["state"], "answered", "{record}");

    // A CA that did not sign the server's certificate: the store fails,
    // the call does not.
    let wrong = stranger.path("ca.pem");
    let (_c, c, logs) = e2e::gateway_logged(
        &b.url(),
        &["--store", store.as_str(), "--store-ca", wrong.as_str()],
    )
    .await;
    e2e::wait_health(&c, 200).await;
    let (status, body) = e2e::get(&format!(
        "{c}/invoke?request=r&method=windows_down&target={car}&timeout=5"
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    wait_for(15, "the store's TLS failure logged", || async {
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("shared store"))
            .then_some(())
    })
    .await;
}

/// `master`, its replica and a sentinel watching them, the sentinel
/// knowing the replica (so that it can promote it).
fn with_replica_and_sentinel(master: RedisServer) -> (RedisServer, RedisServer, RedisSentinel) {
    let replica = RedisServer::start_replica_of(&master)
        .expect("a replica starts and syncs")
        .expect("redis-server is installed");
    let sentinel = RedisSentinel::start(&master, "mymaster")
        .expect("a sentinel starts and learns the replica")
        .expect("redis-server is installed");
    (master, replica, sentinel)
}

/// One call through `a`, its record then read through `b`, all within
/// `secs`: a call made while the store is away may never reach it (its
/// write fails), so each try is a new call.
async fn shared_within(secs: u64, what: &str, car: &str, a: &str, b: &str) -> serde_json::Value {
    wait_for(secs, what, || async {
        let (status, body) = e2e::get(&format!(
            "{a}/invoke?request=r&method=windows_down&target={car}&timeout=5"
        ))
        .await;
        assert_eq!(status, 200, "{body}");
        let id = body["id"].as_str().unwrap().to_owned();
        let read = format!("{b}/v1/calls/{id}");
        for _ in 0..10 {
            // The record is written behind the reply: "sent" may come first.
            let (status, record) = e2e::get(&read).await;
            if status == 200 && record["state"] != "sent" {
                return Some(record);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    })
    .await
}

/// Waits (30 s at most) until the sentinel names `replica` as the master;
/// how long that took.
async fn promoted(sentinel: &RedisSentinel, replica: &RedisServer) -> Duration {
    let started = std::time::Instant::now();
    let replica = std::net::SocketAddr::from(([127, 0, 0, 1], replica.port()));
    wait_for(30, "the sentinel promoting the replica", || async {
        (sentinel.master().ok().flatten() == Some(replica)).then_some(())
    })
    .await;
    started.elapsed()
}

/// Redis behind a Sentinel (`--store redis+sentinel://`): two gateways
/// share records through the master the sentinel names; the master
/// killed, the sentinel promotes its replica, and both gateways follow it
/// with no restart (each drops its connection to the old master and asks
/// the sentinel again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_follow_the_master_a_sentinel_promotes_after_a_kill() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let Some(master) = redis() else { return };
    let (mut master, replica, sentinel) = with_replica_and_sentinel(master);
    let store = format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port());
    let car = unique("car");
    let _device = device(&b, &car, car_router()).await;
    let flags = ["--store", store.as_str()];
    let (_a, a) = e2e::gateway(&b.url(), &flags).await;
    let (_b, bb) = e2e::gateway(&b.url(), &flags).await;
    e2e::wait_health(&a, 200).await;
    e2e::wait_health(&bb, 200).await;
    let record = shared_within(10, "A's call readable through B", &car, &a, &bb).await;
    assert_eq!(record["state"], "answered", "{record}");

    master.kill();
    let killed = std::time::Instant::now();
    let failover = promoted(&sentinel, &replica).await;
    let record = shared_within(
        20,
        "A's call readable through B after the failover",
        &car,
        &a,
        &bb,
    )
    .await;
    assert_eq!(record["state"], "answered", "{record}");
    eprintln!(
        "master killed: the sentinel named the replica after {} ms, records shared again after {} ms",
        failover.as_millis(),
        killed.elapsed().as_millis()
    );
}

/// The master frozen (SIGSTOP: connections open, nothing answered) rather
/// than killed, as a master cut off by the network would be: the gateways
/// follow the replica the sentinel promotes all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_follow_the_master_a_sentinel_promotes_after_a_freeze() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let Some(master) = redis() else { return };
    let (master, replica, sentinel) = with_replica_and_sentinel(master);
    let store = format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port());
    let car = unique("car");
    let _device = device(&b, &car, car_router()).await;
    let flags = ["--store", store.as_str()];
    let (_a, a) = e2e::gateway(&b.url(), &flags).await;
    let (_b, bb) = e2e::gateway(&b.url(), &flags).await;
    e2e::wait_health(&a, 200).await;
    e2e::wait_health(&bb, 200).await;
    shared_within(10, "A's call readable through B", &car, &a, &bb).await;

    master.freeze();
    let frozen = std::time::Instant::now();
    let failover = promoted(&sentinel, &replica).await;
    let record = shared_within(
        20,
        "A's call readable through B after the failover",
        &car,
        &a,
        &bb,
    )
    .await;
    assert_eq!(record["state"], "answered", "{record}");
    eprintln!(
        "master frozen: the sentinel named the replica after {} ms, records shared again after {} ms",
        failover.as_millis(),
        frozen.elapsed().as_millis()
    );
    master.thaw();
}

/// Sentinel over TLS (`rediss+sentinel://`, `--store-ca`): the sentinel
/// and the servers it names are reached over TLS, their certificates
/// checked against the CA; records are shared, and follow the replica the
/// sentinel promotes once the master is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_follow_the_master_a_sentinel_promotes_over_tls() {
    let Some(b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let (Some(pki), Some(stranger)) = (
        crate::common::pki::Pki::new("sentinel-tls"),
        crate::common::pki::Pki::new("sentinel-tls-stranger"),
    ) else {
        return;
    };
    pki.issue("localhost");
    let Some(master) = program::REDIS_SERVER.or_skip(
        RedisServer::start_tls(
            &pki.dir.join("localhost.pem"),
            &pki.dir.join("localhost.key"),
            &pki.dir.join("ca.pem"),
        )
        .expect("redis-server starts with TLS"),
    ) else {
        return;
    };
    let (mut master, replica, sentinel) = with_replica_and_sentinel(master);
    let store = format!("rediss+sentinel://127.0.0.1:{}/mymaster", sentinel.port());
    let ca = pki.path("ca.pem");
    let car = unique("car");
    let _device = device(&b, &car, car_router()).await;
    let flags = ["--store", store.as_str(), "--store-ca", ca.as_str()];
    let (_a, a) = e2e::gateway(&b.url(), &flags).await;
    let (_b, bb) = e2e::gateway(&b.url(), &flags).await;
    e2e::wait_health(&a, 200).await;
    e2e::wait_health(&bb, 200).await;
    shared_within(10, "A's call readable through B", &car, &a, &bb).await;

    // A CA that did not sign the certificates: the store fails, the call
    // does not.
    let wrong = stranger.path("ca.pem");
    let (_c, c, logs) = e2e::gateway_logged(
        &b.url(),
        &["--store", store.as_str(), "--store-ca", wrong.as_str()],
    )
    .await;
    e2e::wait_health(&c, 200).await;
    let (status, body) = e2e::get(&format!(
        "{c}/invoke?request=r&method=windows_down&target={car}&timeout=5"
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    wait_for(15, "the store's TLS failure logged", || async {
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("shared store"))
            .then_some(())
    })
    .await;

    master.kill();
    let killed = std::time::Instant::now();
    let failover = promoted(&sentinel, &replica).await;
    shared_within(
        20,
        "A's call readable through B after the failover",
        &car,
        &a,
        &bb,
    )
    .await;
    eprintln!(
        "over TLS, master killed: the sentinel named the replica after {} ms, records shared again after {} ms",
        failover.as_millis(),
        killed.elapsed().as_millis()
    );
}
