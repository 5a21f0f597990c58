//! Silent faults: a broker that hangs with its sockets open, a link that
//! swallows everything, a broker that accepts TCP and never sends CONNACK,
//! and, the other way round, a slow but healthy link that must not be taken
//! for a dead one. The bounds below are generous ceilings for a loaded
//! machine (the measured figures are in docs/RELIABILITY.md); before the
//! ping timeout, the first two took 30 to 60 s.

use std::time::{Duration, Instant};

use crate::common::{call, unique, wait_for, within};
use directcall_cloud::{Error, Options, Prefix, Requester};
use directcall_core::{BrokerOptions, Target};
use directcall_device::{DeviceOptions, Router};
use directcall_testkit::{program, Mosquitto, Relay};
use serde_json::{json, Value};

fn mosquitto() -> Option<Mosquitto> {
    program::MOSQUITTO.or_skip(Mosquitto::start("").expect("mosquitto starts"))
}

fn fast(mut o: BrokerOptions) -> BrokerOptions {
    o.backoff_min = Some(Duration::from_millis(50));
    o.backoff_max = Some(Duration::from_millis(500));
    o
}

fn echo() -> Router {
    Router::new().method("ping", |_| async { Ok("pong") })
}

async fn requester_on(broker: BrokerOptions) -> Requester {
    let options = Options::new(broker).prefix(Prefix::new(unique("silent")).unwrap());
    within(15, Requester::connect(options))
        .await
        .expect("requester connects")
}

async fn device_on(broker: BrokerOptions, target: &str) -> directcall_device::Device {
    let options = DeviceOptions::new(broker, Target::new(target).unwrap());
    within(15, directcall_device::serve(echo(), options))
        .await
        .expect("device connects")
}

/// Calls until one is answered; how long that took.
async fn until_answered(r: &Requester, car: &str, bound_secs: u64) -> Duration {
    let started = Instant::now();
    wait_for(
        bound_secs,
        "a call answered through the next broker",
        || {
            let (r, car) = (r.clone(), car.to_owned());
            async move {
                r.invoke(call(&car, "ping", Value::Null, 1000))
                    .await
                    .ok()
                    .filter(|reply| reply.response == json!("pong"))
            }
        },
    )
    .await;
    started.elapsed()
}

/// Two Mosquittos, the device and the requester both listing A then B.
/// A hangs (SIGSTOP: sockets open, nothing answered). The requester, with
/// calls waiting, pings after 500 ms of silence and leaves A when no
/// PINGRESP comes within the ping timeout; the device (keepalive 5 s)
/// leaves at its keepalive ping plus the ping timeout. Calls are answered
/// through B within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_broker_is_left_within_seconds_by_both_sides() {
    let (Some(a), Some(b)) = (mosquitto(), mosquitto()) else {
        return;
    };
    let both = fast(BrokerOptions::from_url(&format!("{},{}", a.url(), b.url())).unwrap());
    let car = unique("car");
    let mut device_broker = both.clone();
    device_broker.keep_alive = Duration::from_secs(5);
    let _device = device_on(device_broker, &car).await;
    let r = requester_on(both).await;
    assert!(r.broker_url().ends_with(&a.port().to_string()));
    let reply = within(10, r.invoke(call(&car, "ping", Value::Null, 2000)))
        .await
        .unwrap();
    assert_eq!(reply.response, json!("pong"));

    a.freeze();
    // A call out when the broker hangs ends once the ping timeout says
    // so, as may-have-run, not at its 10 s deadline.
    let e = within(8, r.invoke(call(&car, "ping", Value::Null, 10_000)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BrokerHung { .. }), "{e:?}");
    assert!(e.may_have_run() && e.id().is_some());
    let took = until_answered(&r, &car, 20).await;
    eprintln!(
        "hung broker: answered through B {} ms after A froze",
        took.as_millis()
    );
    assert!(r.broker_url().ends_with(&b.port().to_string()));
    assert!(r
        .last_error()
        .is_some_and(|e| e.to_string().contains("ping timeout")));
    assert_eq!(r.stats().pending, 0);
    a.thaw();
}

/// The same fault in the network: a relay in front of A starts swallowing
/// every byte both ways with the sockets open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_link_is_left_within_seconds() {
    let (Some(a), Some(b)) = (mosquitto(), mosquitto()) else {
        return;
    };
    let relay = Relay::start(([127, 0, 0, 1], a.port()).into()).await;
    let urls = format!("mqtt://{},{}", relay.addr(), b.url());
    let both = fast(BrokerOptions::from_url(&urls).unwrap());
    let car = unique("car");
    let mut device_broker = both.clone();
    device_broker.keep_alive = Duration::from_secs(5);
    let _device = device_on(device_broker, &car).await;
    let r = requester_on(both).await;
    within(10, r.invoke(call(&car, "ping", Value::Null, 2000)))
        .await
        .unwrap();

    relay.black_hole(true);
    let took = until_answered(&r, &car, 20).await;
    eprintln!(
        "black hole: answered through B {} ms after",
        took.as_millis()
    );
    assert!(r.broker_url().ends_with(&b.port().to_string()));
}

/// A broker that accepts TCP and never answers the CONNECT is left within
/// `connect_timeout`, by both sides, for the next endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_never_sends_connack_is_left_within_the_connect_timeout() {
    let Some(b) = mosquitto() else { return };
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = mute.accept().await {
            held.push(socket); // open, never read, never answered
        }
    });
    let mut both =
        fast(BrokerOptions::from_url(&format!("mqtt://{mute_addr},{}", b.url())).unwrap());
    both.connect_timeout = Duration::from_secs(1);
    let car = unique("car");
    let started = Instant::now();
    let _device = device_on(both.clone(), &car).await;
    let r = requester_on(both).await;
    eprintln!(
        "no CONNACK: both sides ready in {} ms",
        started.elapsed().as_millis()
    );
    assert!(r.broker_url().ends_with(&b.port().to_string()));
    let reply = within(10, r.invoke(call(&car, "ping", Value::Null, 2000)))
        .await
        .unwrap();
    assert_eq!(reply.response, json!("pong"));
    held.abort();
}

/// A healthy broker behind a slow link (300 ms each way, so every call and
/// every ping takes over 600 ms) is not taken for a hung one: calls keep
/// being answered and the connection is never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_is_not_taken_for_a_hung_broker() {
    let Some(a) = mosquitto() else { return };
    let relay = Relay::start(([127, 0, 0, 1], a.port()).into()).await;
    let car = unique("car");
    let _device = device_on(fast(a.options()), &car).await;
    let r = requester_on(relay.options()).await;
    relay.latency(Duration::from_millis(300));
    // Calls one after another for about 4 s: each waits over 600 ms with
    // nothing back, so the requester pings during each one.
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(4) {
        match within(10, r.invoke(call(&car, "ping", Value::Null, 5000))).await {
            Ok(reply) => {
                assert_eq!(reply.response, json!("pong"));
                answered += 1;
            }
            Err(e @ Error::Timeout { .. }) => panic!("a slow link timed out: {e}"),
            Err(e) => panic!("a slow link failed: {e}"),
        }
    }
    assert!(answered >= 3, "{answered} calls");
    assert_eq!(r.stats().reconnects, 0, "{:?}", r.last_error());
    assert_eq!(relay.connections(), 1);
}
