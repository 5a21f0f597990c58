//! Network faults under load, from the test kit's relay: added latency, a
//! bandwidth limit, a black hole, a half-open socket, a reset in the middle
//! of a packet and a slow drip of partial packets, each between the
//! requester and the broker, and between the device and the broker.
//!
//! Each run: 8 callers with 1 s deadlines, 1 s healthy, the fault held for
//! 3 s, then healed. Each must show that no call outlived its deadline
//! (beyond scheduling slack), every outcome is a documented one, nothing
//! ran twice, and calls succeed again after the fault clears; the time to
//! that first success is printed (docs/RELIABILITY.md has the figures).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{call, unique, wait_for, within};
use directcall_cloud::{Error, Options, Prefix, Requester};
use directcall_core::{BrokerOptions, MessageId, Target};
use directcall_device::{DeviceOptions, Router};
use directcall_testkit::{program, Mosquitto, Relay};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_millis(1000);
const HOLD: Duration = Duration::from_secs(3);
/// How late past its deadline a call may end on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug)]
enum Side {
    Requester,
    Device,
}

fn fast(mut o: BrokerOptions) -> BrokerOptions {
    o.backoff_min = Some(Duration::from_millis(50));
    o.backoff_max = Some(Duration::from_millis(500));
    o.connect_timeout = Duration::from_secs(1);
    o
}

fn kind(r: &Result<directcall_cloud::Reply, Error>) -> &'static str {
    match r {
        Ok(reply) if reply.response == json!("pong") => "ok",
        Ok(_) => "bad answer",
        Err(Error::Timeout { .. }) => "timeout",
        Err(Error::BrokerHung { .. }) => "broker_hung",
        Err(Error::Unavailable { .. }) => "unavailable",
        Err(_) => "other",
    }
}

async fn under_load(name: &str, side: Side, fault: impl FnOnce(&Relay)) {
    let Some(m) = program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto starts"))
    else {
        return;
    };
    let relay = Relay::start(([127, 0, 0, 1], m.port()).into()).await;
    let through_relay = fast(relay.options());
    let direct = fast(m.options());
    let (requester_broker, mut device_broker) = match side {
        Side::Requester => (through_relay, direct),
        Side::Device => (direct, through_relay),
    };
    // A short keepalive, so that a device behind a silent link notices
    // within seconds (keepalive + ping timeout).
    device_broker.keep_alive = Duration::from_secs(2);

    let runs: Arc<Mutex<HashMap<MessageId, u32>>> = Arc::default();
    let router = {
        let runs = Arc::clone(&runs);
        Router::new().method("ping", move |call| {
            let runs = Arc::clone(&runs);
            async move {
                *runs.lock().unwrap().entry(call.id).or_default() += 1;
                Ok("pong")
            }
        })
    };
    let car = unique("car");
    let options = DeviceOptions::new(device_broker, Target::new(&car).unwrap());
    let _device = within(15, directcall_device::serve(router, options))
        .await
        .expect("device connects");
    let r = within(
        15,
        Requester::connect(
            Options::new(requester_broker).prefix(Prefix::new(unique("net")).unwrap()),
        ),
    )
    .await
    .expect("requester connects");

    let stop = Arc::new(AtomicBool::new(false));
    // (when it ended, outcome)
    let outcomes: Arc<Mutex<Vec<(Instant, &'static str)>>> = Arc::default();
    let worst_late = Arc::new(Mutex::new(Duration::ZERO));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (r, car, stop) = (r.clone(), car.clone(), Arc::clone(&stop));
            let (outcomes, worst_late) = (Arc::clone(&outcomes), Arc::clone(&worst_late));
            tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    let started = Instant::now();
                    let result = r
                        .invoke(call(&car, "ping", Value::Null, DEADLINE.as_millis() as u64))
                        .await;
                    let took = started.elapsed();
                    {
                        let mut worst = worst_late.lock().unwrap();
                        *worst = (*worst).max(took.saturating_sub(DEADLINE));
                    }
                    let k = kind(&result);
                    outcomes.lock().unwrap().push((Instant::now(), k));
                    if k != "ok" {
                        // Do not spin on fail-fast errors.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    fault(&relay);
    tokio::time::sleep(HOLD).await;
    relay.heal();
    let healed = Instant::now();
    let recovered = {
        let outcomes = Arc::clone(&outcomes);
        wait_for(20, "a call answered after the fault cleared", || {
            let outcomes = Arc::clone(&outcomes);
            async move {
                let o = outcomes.lock().unwrap();
                o.iter()
                    .find(|(at, k)| *at > healed && *k == "ok")
                    .map(|(at, _)| at.duration_since(healed))
            }
        })
        .await
    };
    stop.store(true, Relaxed);
    for w in workers {
        within(10, w).await.unwrap();
    }

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, k) in outcomes.lock().unwrap().iter() {
        *counts.entry(k).or_default() += 1;
    }
    let worst = *worst_late.lock().unwrap();
    eprintln!(
        "{name} {side:?}: {counts:?}, worst {} ms past a deadline, answered again {} ms after the fault cleared",
        worst.as_millis(),
        recovered.as_millis()
    );
    for k in counts.keys() {
        assert!(
            ["ok", "timeout", "broker_hung", "unavailable"].contains(k),
            "an undocumented outcome: {counts:?}"
        );
    }
    assert!(counts.get("ok").is_some_and(|n| *n > 0), "{counts:?}");
    assert!(worst <= SLACK, "a call ended {worst:?} past its deadline");
    let twice = runs.lock().unwrap().values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "requests run twice");
    assert_eq!(r.stats().pending, 0);
}

macro_rules! both_sides {
    ($($name:ident: $fault:expr;)*) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn requester_side() {
                    under_load(stringify!($name), Side::Requester, $fault).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn device_side() {
                    under_load(stringify!($name), Side::Device, $fault).await;
                }
            }
        )*
    };
}

both_sides! {
    latency_200_ms: |r: &Relay| r.latency(Duration::from_millis(200));
    bandwidth_2_kb_per_s: |r: &Relay| r.bandwidth(2_000);
    black_hole: |r: &Relay| r.black_hole(true);
    half_open: |r: &Relay| r.half_open(true);
    reset_mid_packet: |r: &Relay| r.reset_mid_packet();
    slow_drip: |r: &Relay| r.drip(Duration::from_millis(20));
}
