//! The device against real brokers (the embedded rumqttd and a Mosquitto
//! started for each test), called by bare MQTT peers: the seed's requester
//! format, duplicates, stale and malformed requests. No directcall-cloud here.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use directcall_core::{MessageId, PresenceRoot, Target};
use directcall_device::{serve, start, Device, DeviceOptions, HandlerError, Router};
use directcall_testkit::{both_brokers, eventually, now_ms, unique, within, Kind, Raw, TestBroker};
use serde::Deserialize;
use serde_json::{json, Value};

async fn device_with<S>(
    b: &TestBroker,
    target: &str,
    router: Router<S>,
    configure: impl FnOnce(DeviceOptions) -> DeviceOptions,
) -> Device {
    let options = configure(DeviceOptions::new(
        b.options(),
        Target::new(target).unwrap(),
    ));
    within(15, serve(router, options))
        .await
        .expect("device connects")
}

async fn device<S>(b: &TestBroker, target: &str, router: Router<S>) -> Device {
    device_with(b, target, router, |o| o).await
}

/// A requester of the seed's kind: raw MQTT, its own prefix.
struct Caller {
    raw: Raw,
    prefix: String,
}

impl Caller {
    async fn new(b: &TestBroker) -> Caller {
        let prefix = unique("raw");
        let mut raw = Raw::connect(&b.options_v311(), &unique("caller")).await;
        raw.subscribe(&format!("{prefix}/+/+/+/ack")).await;
        Caller { raw, prefix }
    }

    /// Publishes a request with the seed's fields plus a budget; returns its id.
    async fn send(&self, target: &str, method: &str, request: Value) -> String {
        let id = MessageId::new().to_string();
        self.send_as(&id, target, method, json!({"id": id, "request": request, "timestamp": now_ms().to_string(), "timeout_ms": 5000}))
            .await;
        id
    }

    async fn send_as(&self, id: &str, target: &str, method: &str, payload: Value) {
        self.raw
            .publish(
                &format!("{target}/{method}/{}/{id}", self.prefix),
                payload.to_string(),
            )
            .await;
    }

    /// The next reply: (id, status, response).
    async fn reply(&mut self) -> (String, u64, Value) {
        let (_, r) = self.raw.next().await;
        (
            r["id"].as_str().unwrap().to_owned(),
            r["status"].as_u64().unwrap(),
            r["response"].clone(),
        )
    }
}

fn counting(count: Arc<AtomicUsize>) -> Router<Arc<AtomicUsize>> {
    Router::with_state(count).method_with_state("honk", |_, count| async move {
        count.fetch_add(1, Ordering::SeqCst);
        Ok("honked")
    })
}

async fn a_directcall_device_answers_a_seed_requester(b: TestBroker) {
    let car = unique("Device001");
    let _dev = device(
        &b,
        &car,
        Router::new().method("reqid-ABCD", |c| async move {
            Ok(format!(
                "Your request was '{}'",
                c.request.as_str().unwrap_or_default()
            ))
        }),
    )
    .await;
    // The seed Lambda: prefix invocation_client, payload {id, request, timestamp} only.
    let mut seed = Raw::connect(&b.options_v311(), &unique("invocation_client")).await;
    seed.subscribe("invocation_client/+/+/+/ack").await;
    let id = MessageId::new().to_string();
    seed.publish(
        &format!("{car}/reqid-ABCD/invocation_client/{id}"),
        json!({"id": id, "request": "my_request_1", "timestamp": now_ms().to_string()}).to_string(),
    )
    .await;
    let (topic, reply) = seed.next().await;
    assert_eq!(
        topic,
        format!("invocation_client/{id}/{car}/reqid-ABCD/ack")
    );
    assert_eq!(
        reply,
        json!({"id": id, "response": "Your request was 'my_request_1'", "status": 200})
    );
}
both_brokers!(a_directcall_device_answers_a_seed_requester);

async fn unknown_methods_errors_and_panics_are_answered(b: TestBroker) {
    let car = unique("car");
    let router = Router::new()
        .method("fail", |_| async {
            Err::<Value, _>(HandlerError::new("motor jammed"))
        })
        .method("io", |_| async {
            Err(std::io::Error::other("bus error"))?;
            Ok(Value::Null)
        })
        .method("refuse", |_| async {
            Err::<Value, _>(HandlerError::bad_request("no"))
        })
        .method("panic", |_| async {
            if true {
                panic!("handler bug");
            }
            Ok(Value::Null)
        });
    let dev = device(&b, &car, router).await;
    let mut caller = Caller::new(&b).await;
    for (method, status, text) in [
        ("fail", 500, "motor jammed"),
        ("io", 500, "bus error"),
        ("refuse", 400, "no"),
        ("panic", 500, "handler panicked"),
        ("fly", 404, "unknown method 'fly'"),
    ] {
        let id = caller.send(&car, method, Value::Null).await;
        assert_eq!(caller.reply().await, (id, status, json!(text)), "{method}");
    }
    assert_eq!(dev.stats().unknown_method, 1);
}
both_brokers!(unknown_methods_errors_and_panics_are_answered);

async fn typed_requests_json_errors_and_state_reach_the_wire(b: TestBroker) {
    #[derive(Deserialize)]
    struct WindowsDown {
        percent: u8,
    }
    let car = unique("car");
    let moves = Arc::new(AtomicUsize::new(0));
    let router = Router::with_state(Arc::clone(&moves))
        .method_with_state("windows_down", |call, moves| async move {
            let WindowsDown { percent } = call.json()?;
            let moves = moves.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(json!({"windows": "down", "percent": percent, "moves": moves}))
        })
        .method("unlock", |_| async {
            Err::<Value, _>(HandlerError::json(
                409,
                json!({"code": "door_open", "door": "rear_left"}),
            ))
        });
    let _dev = device(&b, &car, router).await;
    let mut caller = Caller::new(&b).await;
    for (method, request, status, response) in [
        (
            "windows_down",
            json!({"percent": 50}),
            200,
            json!({"windows": "down", "percent": 50, "moves": 1}),
        ),
        (
            "windows_down",
            json!({"percent": "half"}),
            400,
            json!("invalid request: invalid type: string \"half\", expected u8"),
        ),
        (
            "windows_down",
            json!({}),
            400,
            json!("invalid request: missing field `percent`"),
        ),
        (
            "windows_down",
            json!({"percent": 20}),
            200,
            json!({"windows": "down", "percent": 20, "moves": 2}),
        ),
        (
            "unlock",
            Value::Null,
            409,
            json!({"code": "door_open", "door": "rear_left"}),
        ),
    ] {
        let id = caller.send(&car, method, request.clone()).await;
        assert_eq!(
            caller.reply().await,
            (id, status, response),
            "{method} {request}"
        );
    }
    assert_eq!(moves.load(Ordering::SeqCst), 2, "the 400s ran no further");
}
both_brokers!(typed_requests_json_errors_and_state_reach_the_wire);

async fn a_request_delivered_twice_runs_once(b: TestBroker) {
    let car = unique("car");
    let count = Arc::new(AtomicUsize::new(0));
    let dev = device(&b, &car, counting(Arc::clone(&count))).await;
    let mut caller = Caller::new(&b).await;
    let id = MessageId::new().to_string();
    let request =
        json!({"id": id, "request": "r", "timestamp": now_ms().to_string(), "timeout_ms": 5000});
    caller.send_as(&id, &car, "honk", request.clone()).await;
    caller.send_as(&id, &car, "honk", request).await;
    assert_eq!(caller.reply().await, (id, 200, json!("honked")));
    caller.raw.nothing_for(500).await;
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(dev.stats().duplicates, 1);
}
both_brokers!(a_request_delivered_twice_runs_once);

async fn a_malformed_first_delivery_does_not_suppress_a_good_one(b: TestBroker) {
    let car = unique("car");
    let count = Arc::new(AtomicUsize::new(0));
    let dev = device(&b, &car, counting(Arc::clone(&count))).await;
    let mut caller = Caller::new(&b).await;
    let id = MessageId::new().to_string();
    // First the id arrives with a broken payload (answered 400), then well formed.
    caller
        .send_as(&id, &car, "honk", json!({"id": id, "timestamp": "soon"}))
        .await;
    let (got, status, _) = caller.reply().await;
    assert_eq!((got.as_str(), status), (id.as_str(), 400));
    caller
        .send_as(
            &id,
            &car,
            "honk",
            json!({"id": id, "request": "r", "timestamp": now_ms().to_string(), "timeout_ms": 5000}),
        )
        .await;
    assert_eq!(caller.reply().await, (id, 200, json!("honked")));
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(dev.stats().duplicates, 0);
}
both_brokers!(a_malformed_first_delivery_does_not_suppress_a_good_one);

async fn a_request_past_its_deadline_is_neither_run_nor_answered(b: TestBroker) {
    let car = unique("car");
    let count = Arc::new(AtomicUsize::new(0));
    let dev = device_with(&b, &car, counting(Arc::clone(&count)), |o| {
        o.skew(Duration::from_millis(500))
    })
    .await;
    let mut caller = Caller::new(&b).await;
    // sent 10 s ago with a 3 s budget: 10 > 3 + 0.5
    let stale = MessageId::new().to_string();
    let sent = (now_ms() - 10_000).to_string();
    caller
        .send_as(
            &stale,
            &car,
            "honk",
            json!({"id": stale, "request": 1, "timestamp": sent, "timeout_ms": 3000}),
        )
        .await;
    // sent 2 s ago with a 3 s budget: still good
    let fresh = MessageId::new().to_string();
    let sent = (now_ms() - 2_000).to_string();
    caller
        .send_as(
            &fresh,
            &car,
            "honk",
            json!({"id": fresh, "request": 2, "timestamp": sent, "timeout_ms": 3000}),
        )
        .await;
    assert_eq!(caller.reply().await.0, fresh);
    caller.raw.nothing_for(500).await;
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(dev.stats().expired, 1);
}
both_brokers!(a_request_past_its_deadline_is_neither_run_nor_answered);

async fn handlers_run_concurrently_up_to_the_limit_and_a_full_device_answers_503(b: TestBroker) {
    let car = unique("car");
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let router = Router::new().method("work", {
        let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
        move |_| {
            let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // Long enough for the eight requests to overlap.
                tokio::time::sleep(Duration::from_millis(200)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(Value::Null)
            }
        }
    });
    let dev = device_with(&b, &car, router, |o| o.max_concurrent(3).max_queued(3)).await;
    let mut caller = Caller::new(&b).await;
    for _ in 0..8 {
        caller.send(&car, "work", Value::Null).await;
    }
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(caller.reply().await.1);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 503, 503]);
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "handlers overlap, never more than 3"
    );
    assert_eq!(dev.stats().busy, 2);
}
both_brokers!(handlers_run_concurrently_up_to_the_limit_and_a_full_device_answers_503);

async fn presence_is_retained_and_the_will_marks_a_crash(b: TestBroker) {
    let car = unique("car");
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let dev = device_with(&b, &car, counting(Arc::default()), |o| {
        o.presence(root.clone())
    })
    .await;
    let mut watcher = Raw::connect(&b.options_v311(), &unique("watcher")).await;
    watcher.subscribe(&root.filter()).await;
    let (topic, record) = watcher.next().await;
    assert_eq!(topic, root.topic(&Target::new(&car).unwrap()));
    assert_eq!(record, json!({"online": true}));
    dev.abort().await;
    let (_, record) = watcher.next().await;
    assert_eq!(record, json!({"online": false}), "the last will");
}
both_brokers!(presence_is_retained_and_the_will_marks_a_crash);

async fn shutdown_lets_running_handlers_answer_then_refuses_the_rest(b: TestBroker) {
    let car = unique("car");
    let root = PresenceRoot::new(unique("presence")).unwrap();
    let router = Router::new()
        .method("quick", |_| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok("done")
        })
        .method("forever", |_| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok("never")
        });
    let dev = device_with(&b, &car, router, |o| {
        o.presence(root.clone())
            .drain_timeout(Duration::from_millis(1500))
    })
    .await;
    let mut watcher = Raw::connect(&b.options_v311(), &unique("watcher")).await;
    watcher.subscribe(&root.filter()).await;
    assert_eq!(watcher.next().await.1, json!({"online": true}));
    let mut caller = Caller::new(&b).await;
    let quick = caller.send(&car, "quick", Value::Null).await;
    let forever = caller.send(&car, "forever", Value::Null).await;
    eventually(10, || dev.stats().executed == 2).await;
    let started = Instant::now();
    // Draining from the shutdown's first poll, made here: a request sent
    // after it arrives while the device drains.
    let mut stopping = Box::pin(dev.shutdown());
    let first = stopping
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()));
    assert!(first.is_pending(), "the drain waits for the handlers");
    let stopping = tokio::spawn(stopping);
    // A request arriving while it drains is refused at once.
    let late = caller.send(&car, "quick", Value::Null).await;
    let mut replies = Vec::new();
    for _ in 0..3 {
        let (id, status, response) = caller.reply().await;
        replies.push((id, status, response, started.elapsed()));
    }
    within(10, stopping).await.unwrap();
    let find = |id: &str| replies.iter().find(|r| r.0 == id).unwrap().clone();
    let (_, status, response, _) = find(&late);
    assert_eq!((status, response), (503, json!("device shutting down")));
    let (_, status, response, _) = find(&quick);
    assert_eq!(
        (status, response),
        (200, json!("done")),
        "the running handler finished"
    );
    let (_, status, response, at) = find(&forever);
    assert_eq!((status, response), (503, json!("device shutting down")));
    assert!(
        at >= Duration::from_millis(1400),
        "answered after the drain timeout: {at:?}"
    );
    // The offline record comes after the answers.
    assert_eq!(watcher.next().await.1, json!({"online": false}));
}
both_brokers!(shutdown_lets_running_handlers_answer_then_refuses_the_rest);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_boots_before_its_broker_and_answers_once_it_is_there() {
    let Some(mut b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let broker = b.mosquitto.as_mut().unwrap();
    broker.kill();
    let car = unique("car");
    let started = Instant::now();
    let dev = start(
        Router::new().method("ping", |_| async { Ok("pong") }),
        DeviceOptions::new(b.options(), Target::new(&car).unwrap()),
    )
    .expect("valid settings");
    // At once, not after the 10 s a `serve` would wait to be ready.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "start returns at once: {:?}",
        started.elapsed()
    );
    assert!(!dev.is_connected());
    // It has been trying.
    eventually(10, || dev.last_error().is_some()).await;
    b.mosquitto.as_mut().unwrap().restart().unwrap();
    assert!(
        dev.wait_ready(Duration::from_secs(10)).await,
        "connected once the broker is up"
    );
    let mut caller = Caller::new(&b).await;
    let id = caller.send(&car, "ping", Value::Null).await;
    assert_eq!(caller.reply().await, (id, 200, json!("pong")));
    dev.shutdown().await;
}

/// Full jitter spreads a fleet's reconnects after a broker restart: 200
/// devices (1 s window, at most 3 s between attempts) lose the broker for
/// 3 s. The old backoff (100 ms doubling to 1 s, upper-half jitter) brought
/// every one back within 1 s, two thirds within 500 ms; with these settings
/// about a quarter come back within 500 ms and a quarter after 1.5 s. The
/// bounds are loose: only the shape is asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_comes_back_spread_out_after_a_broker_restart() {
    const DEVICES: usize = 200;
    const MAX: Duration = Duration::from_secs(3);
    let Some(mut b) = TestBroker::start(Kind::Mosquitto) else {
        return;
    };
    let mut fleet = Vec::with_capacity(DEVICES);
    for _ in 0..DEVICES {
        let target = unique("fleet");
        fleet.push(
            device_with(&b, &target, Router::new(), |o| {
                o.reconnect_window(Duration::from_secs(1))
                    .reconnect_max(MAX)
            })
            .await,
        );
    }
    b.mosquitto.as_mut().unwrap().kill();
    let down = Instant::now();
    eventually(10, || fleet.iter().all(|d| !d.is_connected())).await;
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down.elapsed())).await;
    let restarted = Instant::now();
    b.mosquitto.as_mut().unwrap().restart().unwrap();
    let mut back: Vec<Option<Duration>> = vec![None; DEVICES];
    within(20, async {
        while back.iter().any(Option::is_none) {
            for (at, device) in back.iter_mut().zip(&fleet) {
                if at.is_none() && device.is_connected() {
                    *at = Some(restarted.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut back: Vec<Duration> = back.into_iter().flatten().collect();
    back.sort();
    let share =
        |f: &dyn Fn(&Duration) -> bool| back.iter().filter(|t| f(t)).count() * 100 / DEVICES;
    let early = share(&|t| *t <= Duration::from_millis(500));
    let late = share(&|t| *t > Duration::from_millis(1500));
    println!(
        "{DEVICES} devices back after a 3 s outage: {early} % within 500 ms, {late} % after 1.5 s, the last {:?}",
        back[DEVICES - 1]
    );
    assert!(early < 50, "{early} % within 500 ms: not spread");
    assert!(late >= 10, "only {late} % after 1.5 s: not spread");
    // Never much later than the largest step (the margin is for a loaded
    // machine: the restart and the subscriptions take time too).
    assert!(back[DEVICES - 1] < MAX + Duration::from_secs(5), "{back:?}");
    for device in fleet {
        device.abort().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_gives_up_with_the_cause_when_the_broker_never_comes() {
    let port = directcall_testkit::free_port().unwrap();
    let options = DeviceOptions::new(
        directcall_core::BrokerOptions::new("127.0.0.1", port),
        Target::new("car").unwrap(),
    )
    .ready_timeout(Duration::from_millis(300));
    let e = serve(Router::new(), options).await.unwrap_err();
    let directcall_device::Error::Unavailable { last_error, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(last_error.is_some(), "{e}");
}

#[test]
fn core_errors_convert_with_question_mark() {
    fn build() -> Result<DeviceOptions, directcall_device::Error> {
        let broker = directcall_device::BrokerOptions::from_url("gopher://x")?;
        Ok(DeviceOptions::new(broker, Target::new("car")?))
    }
    let e = build().unwrap_err();
    assert!(
        matches!(
            e,
            directcall_device::Error::Invalid {
                field: directcall_device::Field::Broker,
                ..
            }
        ),
        "{e:?}"
    );
}
