//! End-to-end round trips through a real broker (the embedded rumqttd, and a
//! private Mosquitto when installed), at 1 and 128 calls in flight, each
//! beside its raw-MQTT floor measured by the same code in the same run.
//!
//! `cargo bench -p directcall-bins --bench roundtrip`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use directcall_bins::sim;
use directcall_cloud::{Invocation, Options, Prefix, Requester};
use directcall_core::{BrokerOptions, Method, Target};
use directcall_testkit::{EmbeddedBroker, Legs, Mosquitto, RawPair};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `iters` calls with `in_flight` workers and returns the wall time.
async fn drive<F, Fut>(iters: u64, in_flight: usize, call: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let left = Arc::new(AtomicU64::new(iters));
    let start = Instant::now();
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (left, call) = (Arc::clone(&left), call.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    call().await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    start.elapsed()
}

fn roundtrips(
    c: &mut Criterion,
    label: &str,
    broker: BrokerOptions,
    runtime: &tokio::runtime::Runtime,
) {
    let (requester, raw, _device) = runtime.block_on(async {
        let target = Target::new("BenchCar001").unwrap();
        // It echoes the request, as the floor's responder does.
        let mut echo = sim::SimOptions::default();
        echo.echo = true;
        let device = sim::start(&broker.clone().into(), std::slice::from_ref(&target), &echo)
            .await
            .expect("device");
        let prefix = Prefix::new(format!("crit-{:06x}", fastrand_u32())).unwrap();
        let requester = Requester::connect(Options::new(broker.clone()).prefix(prefix))
            .await
            .expect("requester");
        let raw = Arc::new(
            // The broker's floor: every leg QoS 0.
            RawPair::start(&broker, Legs::ALL_QOS_0)
                .await
                .expect("raw pair"),
        );
        (requester, raw, device)
    });
    let target = Target::new("BenchCar001").unwrap();
    let method = Method::new("bench").unwrap();
    let payload = "x".repeat(16);

    let mut group = c.benchmark_group(format!("roundtrip/{label}"));
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for in_flight in [1usize, 128] {
        group.bench_with_input(
            BenchmarkId::new("directcall", in_flight),
            &in_flight,
            |b, &n| {
                b.iter_custom(|iters| {
                    let (r, t, m, p) = (
                        requester.clone(),
                        target.clone(),
                        method.clone(),
                        payload.clone(),
                    );
                    runtime.block_on(drive(iters, n, move || {
                        let call = Invocation::new(t.clone(), m.clone(), Value::String(p.clone()))
                            .timeout(TIMEOUT);
                        let r = r.clone();
                        async move {
                            let reply = r.invoke(call).await.expect("reply");
                            assert_eq!(reply.status, 200);
                        }
                    }))
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("raw-floor", in_flight),
            &in_flight,
            |b, &n| {
                b.iter_custom(|iters| {
                    let (raw, p) = (Arc::clone(&raw), payload.clone().into_bytes());
                    runtime.block_on(drive(iters, n, move || {
                        let (raw, p) = (Arc::clone(&raw), p.clone());
                        async move { raw.call(&p, TIMEOUT).await.expect("echo") }
                    }))
                })
            },
        );
    }
    group.finish();
    runtime.block_on(requester.shutdown());
}

fn fastrand_u32() -> u32 {
    // Any varying value will do for a prefix.
    Instant::now().elapsed().subsec_nanos() ^ std::process::id()
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let embedded = EmbeddedBroker::start(None).expect("embedded broker");
    roundtrips(c, "embedded", embedded.options(), &runtime);
    match Mosquitto::start("") {
        Ok(Some(m)) => roundtrips(c, "mosquitto", m.options(), &runtime),
        _ => eprintln!("*** mosquitto not installed: its round trips are skipped ***"),
    }
}

criterion_group!(roundtrip, benches);
criterion_main!(roundtrip);
