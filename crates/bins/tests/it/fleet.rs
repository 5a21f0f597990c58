//! A fleet: several gateways and devices on several broker nodes, each with
//! a list of brokers to fail over to. Two independent Mosquittos, and a
//! 3-node NATS cluster with MQTT (nats-server, JetStream in temp dirs) with
//! a node killed under load.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{call, unique, within};
use directcall_bins::http_client::Connection;
use directcall_cloud::gateway::{self, Gateway};
use directcall_cloud::{Error, Options, Prefix, PresenceRoot, Requester};
use directcall_core::{BrokerOptions, MessageId, Target};
use directcall_device::{serve, Device, DeviceOptions, Router};
use directcall_testkit::{eventually, program, wait_for, Mosquitto, NatsCluster, Raw};
use serde_json::{json, Value};

/// A gateway in this process on a free port: its base URL and requester.
async fn gateway(broker: BrokerOptions, presence: Option<PresenceRoot>) -> (String, Requester) {
    let mut options = Options::new(broker).prefix(Prefix::new("fleet").unwrap());
    if let Some(root) = presence {
        options = options.presence(root);
    }
    let requester = Requester::start(options).unwrap();
    assert!(
        requester.wait_ready(Duration::from_secs(15)).await,
        "gateway connects: {:?}",
        requester.last_error()
    );
    // The recorder is process-wide: every requester of this test binary
    // records into it once it is installed. The asserts below read only
    // gauges labelled with this test's own broker URLs.
    let metrics = directcall_bins::cli::metrics_handle();
    let app = Gateway::new(requester.clone())
        .metrics(move || metrics.render())
        .app();
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(gateway::serve(listener, app, std::future::pending()));
    (base, requester)
}

/// Executions per request id, to prove none ran twice.
type Ledger = Arc<Mutex<HashMap<MessageId, u32>>>;

fn ledger_router(ledger: &Ledger) -> Router {
    let ledger = Arc::clone(ledger);
    Router::new().method("ping", move |call| {
        let ledger = Arc::clone(&ledger);
        async move {
            *ledger.lock().unwrap().entry(call.id).or_default() += 1;
            Ok(json!({"pong": call.target.as_str()}))
        }
    })
}

async fn device(broker: BrokerOptions, target: &str, router: Router) -> Device {
    within(
        20,
        serve(
            router,
            DeviceOptions::new(broker, Target::new(target).unwrap()),
        ),
    )
    .await
    .expect("device connects")
}

async fn get_json(conn: &mut Connection, path: &str) -> (u16, Value) {
    let r = conn.get(path, &[]).await.expect("HTTP answer");
    (
        r.status,
        serde_json::from_str(&r.body).unwrap_or(Value::String(r.body)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_and_a_device_fail_over_to_the_next_broker_and_say_so() {
    let (Some(mut first), Some(second)) = (
        program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto")),
        Mosquitto::start("").expect("mosquitto"),
    ) else {
        return;
    };
    let mut both = BrokerOptions::from_urls([first.url().as_str(), second.url().as_str()]).unwrap();
    both.backoff_min = Some(Duration::from_millis(50));
    both.backoff_max = Some(Duration::from_millis(500));
    // A connect that outlasts its timeout moves on to the next broker, as it
    // should; on a loaded 2-core CI machine (the NATS tests start three
    // nodes beside this one) a 5 s connect once did, and the gateway began on
    // the second broker. The failover under test is a kill, refused at once.
    both.connect_timeout = Duration::from_secs(20);
    let car = unique("car");
    let ledger = Ledger::default();
    let _car = device(both.clone(), &car, ledger_router(&ledger)).await;
    let (base, requester) = gateway(both, None).await;
    let mut conn = Connection::open(&base).await.unwrap();
    let (status, health) = get_json(&mut conn, "/healthz").await;
    assert_eq!(
        (status, health["broker_url"].as_str()),
        (200, Some(first.url().as_str())),
        "the gateway begins on the first broker; its last connection error: {:?}",
        requester.last_error()
    );
    let path = format!("/invoke?request=r&method=ping&target={car}&timeout=2");
    assert_eq!(get_json(&mut conn, &path).await.0, 200);

    first.kill();
    let killed = Instant::now();
    // Short deadlines: a call published before the device is back on the
    // second broker waits out only 300 ms.
    let quick = format!("/v1/targets/{car}/methods/ping");
    let recovered = within(20, async {
        loop {
            let r = conn
                .send("POST", &quick, &[], br#"{"timeout_ms":300}"#.to_vec())
                .await
                .unwrap();
            if r.status == 200 {
                break killed.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    println!("failover to the second broker: first 200 after {recovered:?}");
    let (status, health) = get_json(&mut conn, "/healthz").await;
    assert_eq!(
        (status, health["broker_url"].as_str()),
        (200, Some(second.url().as_str())),
        "last connection error: {:?}",
        requester.last_error()
    );
    let metrics = conn.get("/metrics", &[]).await.unwrap().body;
    let in_use = |url: &str| format!("directcall_broker_in_use{{url=\"{url}\"}}");
    assert!(
        metrics.contains(&format!("{} 1", in_use(&second.url()))),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("{} 0", in_use(&first.url()))),
        "{metrics}"
    );
    assert_eq!(requester.stats().pending, 0);
    assert!(ledger.lock().unwrap().values().all(|n| *n == 1));
}

/// The cluster, ready for subscriptions, or `None` when the test is
/// skipped for want of the binary.
async fn cluster() -> Option<NatsCluster> {
    // Its ports are picked free and then bound by nats-server, so a test
    // running beside it may take one first: a cluster that does not start
    // is started again on fresh ports, up to three times.
    let mut started = NatsCluster::start(3);
    for _ in 0..2 {
        if started.is_ok() {
            break;
        }
        started = NatsCluster::start(3);
    }
    let c = program::NATS_SERVER.or_skip(started.expect("nats-server starts"))?;
    assert!(
        c.wait_ready(Duration::from_secs(30)).await,
        "the NATS cluster never took subscriptions: {}",
        c.log(0)
    );
    Some(c)
}

#[derive(Debug, Clone)]
struct Outcome {
    sent: Duration,
    gateway: usize,
    target: usize,
    status: u16,
    took: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_under_load() {
    let Some(mut nats) = cluster().await else {
        return;
    };
    // Device k and gateway k start on node k; each lists all three nodes.
    let ledger = Ledger::default();
    let mut devices = Vec::new();
    for k in 0..3 {
        devices.push(
            device(
                nats.options_from(k),
                &format!("car-{k}"),
                ledger_router(&ledger),
            )
            .await,
        );
    }
    let mut gateways = Vec::new();
    for k in 0..3 {
        gateways.push(gateway(nats.options_from(k), None).await);
    }
    let bases: Arc<Vec<String>> = Arc::new(gateways.iter().map(|(b, _)| b.clone()).collect());
    let start = Instant::now();
    // The load runs from before the kill until gateway 1 and car-1 (on the
    // killed node) have answered again, and 2 s more; never longer than
    // 45 s.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..9 {
        let (bases, outcomes, counter, stop) = (
            Arc::clone(&bases),
            Arc::clone(&outcomes),
            Arc::clone(&counter),
            Arc::clone(&stop),
        );
        workers.push(tokio::spawn(async move {
            let mut conns = Vec::new();
            for b in bases.iter() {
                conns.push(Connection::open(b).await.unwrap());
            }
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(45)
            {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (gw, target) = (n % 3, (n / 3) % 3);
                let sent = start.elapsed();
                let t = Instant::now();
                let path = format!("/invoke?request={n}&method=ping&target=car-{target}&timeout=2");
                let status = match conns[gw].get(&path, &[]).await {
                    Ok(r) => r.status,
                    Err(_) => {
                        conns[gw] = Connection::open(&bases[gw]).await.unwrap();
                        0
                    }
                };
                outcomes.lock().unwrap().push(Outcome {
                    sent,
                    gateway: gw,
                    target,
                    status,
                    took: t.elapsed(),
                });
            }
        }));
    }
    // Under load: every gateway and every device answering.
    eventually(20, || {
        let o = outcomes.lock().unwrap();
        (0..3).all(|k| {
            o.iter()
                .any(|o| o.status == 200 && o.gateway == k && o.target == k)
        })
    })
    .await;
    nats.kill(1);
    let killed = start.elapsed();
    // When the surviving nodes take new MQTT connections again: NATS's own
    // recovery (a JetStream leader on the killed node costs an election).
    let nats_back = {
        let nats = &nats;
        wait_for(45, "a surviving node taking connections", || async move {
            nats.accepts_mqtt(2).await.then(|| start.elapsed() - killed)
        })
        .await
    };
    let back = |outcomes: &[Outcome], pick: &dyn Fn(&Outcome) -> bool| {
        outcomes
            .iter()
            .filter(|o| o.sent >= killed && o.status == 200 && pick(o))
            .map(|o| o.sent + o.took - killed)
            .min()
    };
    eventually(45, || {
        let o = outcomes.lock().unwrap();
        back(&o, &|o| o.gateway == 1).is_some() && back(&o, &|o| o.target == 1).is_some()
    })
    .await;
    // The load goes on a while after the recovery: the scenario.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        within(30, w).await.unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for o in &outcomes {
        *by_status.entry(o.status).or_default() += 1;
    }
    for o in &outcomes {
        assert!(
            [200, 503, 504].contains(&o.status),
            "a call ended {} ({o:?})",
            o.status
        );
        // Seconds past it, for a loaded machine; a call held through the
        // JetStream election (10 to 15 s) would be far beyond.
        assert!(
            o.took < Duration::from_secs(2 + 3),
            "a call outlived its 2 s deadline: {o:?}"
        );
    }
    let gateway_back = back(&outcomes, &|o| o.gateway == 1).unwrap();
    let device_back = back(&outcomes, &|o| o.target == 1).unwrap();
    println!(
        "{} calls {by_status:?}; node 1 killed at {killed:?}; NATS took new connections again after {nats_back:?}; \
         gateway 1 answered again after {gateway_back:?}, car-1 after {device_back:?}",
        outcomes.len()
    );
    // Back through another node, in a bounded time. How soon is NATS's
    // affair more than directcall's: a bare client with a fresh id may be
    // let in early, while subscriptions of the gateway and the device are
    // refused until JetStream has a new leader (10 to 15 s measured), so
    // the bound is on the kill, not on the probe (SCALING.md has the runs).
    for (what, t) in [("gateway 1", gateway_back), ("car-1", device_back)] {
        assert!(
            t <= Duration::from_secs(30),
            "{what} back {t:?} after the kill (NATS took a new connection after {nats_back:?})"
        );
    }
    // No call ran twice (each HTTP call got exactly one answer, by
    // construction); a reply the broker delivered twice was dropped.
    assert!(
        ledger.lock().unwrap().values().all(|n| *n == 1),
        "a request ran twice"
    );
    // Nothing left pending anywhere.
    eventually(10, || gateways.iter().all(|(_, r)| r.stats().pending == 0)).await;
    let duplicates: Vec<u64> = gateways
        .iter()
        .map(|(_, r)| r.stats().dropped_duplicate)
        .collect();
    println!("replies the broker delivered twice, dropped: {duplicates:?}");
    drop(devices);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_names_with_a_dot_are_refused_clearly_and_presence_reaches_late_replicas() {
    let Some(nats) = cluster().await else {
        return;
    };
    // A requester refuses a dotted name before publishing: NATS would close
    // the whole connection over it.
    let r = within(
        15,
        Requester::connect(Options::new(nats.options(0)).prefix(Prefix::new("dots").unwrap())),
    )
    .await
    .unwrap();
    let e = {
        let r = &r;
        // The probe's answer comes right after the connection is ready.
        wait_for(10, "the dotted name refused", || async move {
            match r.invoke(call("car.1", "m", Value::Null, 300)).await {
                Err(e @ Error::Invalid { .. }) => Some(e),
                _ => None,
            }
        })
        .await
    };
    assert!(e.to_string().contains("contains '.'"), "{e}");
    assert!(r.is_connected(), "the connection is intact");
    // A device whose own name has a dot cannot subscribe: a clear error.
    let e = serve(
        Router::new(),
        DeviceOptions::new(nats.options(0), Target::new("car.1").unwrap())
            .ready_timeout(Duration::from_secs(3)),
    )
    .await
    .unwrap_err();
    let text = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(
        text.contains("refused the subscription to car.1/#") && text.contains("'.'"),
        "{text}"
    );

    // Presence: a device on node 0 crashes; its will (retained) reaches a
    // gateway started afterwards on node 2.
    let root = PresenceRoot::default();
    let ledger = Ledger::default();
    let crashed = within(
        20,
        serve(
            ledger_router(&ledger),
            DeviceOptions::new(nats.options_from(0), Target::new("car-x").unwrap())
                .presence(root.clone()),
        ),
    )
    .await
    .unwrap();
    crashed.abort().await;
    // Started once node 2 holds the will as the retained record: what a
    // new subscriber there is sent first.
    let record = root.topic(&Target::new("car-x").unwrap());
    wait_for(20, "the will retained on node 2", || {
        let (broker, record) = (nats.options(2), record.clone());
        async move {
            let mut watcher = Raw::connect(&broker, &unique("watcher")).await;
            watcher.subscribe(&record).await;
            let first = tokio::time::timeout(Duration::from_secs(2), watcher.next()).await;
            first
                .is_ok_and(|(_, retained)| retained == json!({"online": false}))
                .then_some(())
        }
    })
    .await;
    let (base, late) = gateway(nats.options_from(2), Some(root)).await;
    let mut conn = Connection::open(&base).await.unwrap();
    // Normally the first call is answered 404: the retained will is the
    // first thing the late gateway is sent. The bound is a ceiling for a
    // loaded machine (a JetStream-backed subscription on a busy 3-node
    // cluster); a miss names what the gateway answered and knew.
    let mut seen = Vec::new();
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (status, body) = get_json(
                &mut conn,
                "/invoke?request=r&method=ping&target=car-x&timeout=1",
            )
            .await;
            if status == 404 {
                break body;
            }
            seen.push((status, body));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let Ok(body) = answered else {
        panic!(
            "no 404 within 30 s; answers: {seen:?}; the late gateway knows {:?}, \
             connected {}, last error {:?}",
            late.devices(),
            late.is_connected(),
            late.last_error()
        );
    };
    assert_eq!(body["result"], "offline");
}

/// The issue's scenario: a 3-node NATS cluster, the device on node 3, the
/// gateway's requester listing nodes 1, 2 and 3. Node 1 hangs (SIGSTOP).
/// With calls waiting, the requester pings after 500 ms of silence, leaves
/// node 1 when no PINGRESP comes within the ping timeout, and calls are
/// answered through node 2. Before the ping timeout no call was answered
/// for the rest of a 40 s run; the bound here is a generous ceiling, the
/// measured time is printed and in docs/RELIABILITY.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_nats_node_under_the_gateway_is_left_within_seconds() {
    let Some(nats) = cluster().await else {
        return;
    };
    let _car = device(
        nats.options_from(2),
        "car-hung",
        ledger_router(&Ledger::default()),
    )
    .await;
    let (_base, r) = gateway(nats.options_from(0), None).await;
    let ping = || {
        let r = r.clone();
        async move {
            r.invoke(
                directcall_cloud::Invocation::parse("car-hung", "ping", "x")
                    .unwrap()
                    .timeout(Duration::from_secs(2)),
            )
            .await
            .ok()
        }
    };
    wait_for(20, "a first answer through node 1", ping).await;
    nats.freeze(0);
    let frozen = Instant::now();
    wait_for(30, "an answer through another node", ping).await;
    eprintln!(
        "hung NATS node: answered through another node {} ms after node 1 froze",
        frozen.elapsed().as_millis()
    );
    assert_ne!(r.broker_url(), nats.url(0));
    nats.thaw(0);
}
