//! The load tool behind `directcall bench` and the end-to-end criterion
//! benches: a closed-loop driver with latency percentiles. The raw-MQTT
//! floor every figure is compared with in the same run is
//! `directcall_testkit::RawPair`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod bridge;
pub mod command;
pub mod group;
pub mod h2;

/// How long and how hard to drive.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Stop after this many calls (the warm-up not counted).
    pub calls: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Calls made first and not measured.
    pub warmup: u64,
}

impl LoadOptions {
    /// `concurrency` calls in flight, until `calls` calls or `duration` (the
    /// first reached), after `warmup` unmeasured calls.
    pub fn new(
        concurrency: usize,
        calls: Option<u64>,
        duration: Option<Duration>,
        warmup: u64,
    ) -> Self {
        LoadOptions {
            concurrency,
            calls,
            duration,
            warmup,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LoadReport {
    /// `requester`, `http`, `raw`, ...
    pub mode: String,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Calls measured.
    pub calls: u64,
    /// Calls that succeeded.
    pub ok: u64,
    /// Failed calls by kind.
    pub errors: BTreeMap<String, u64>,
    /// Wall time of the measured part.
    pub elapsed: Duration,
    /// Latency percentiles of successful calls, in microseconds:
    /// p50, p90, p99, p99.9, max.
    pub latency_us: [u64; 5],
}

impl LoadReport {
    /// Successful calls per second.
    pub fn calls_per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Total failed calls.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The JSON object of `directcall bench --json`.
    pub fn to_json(&self) -> Value {
        let [p50, p90, p99, p999, max] = self.latency_us;
        json!({
            "mode": self.mode,
            "concurrency": self.concurrency,
            "calls": self.calls,
            "ok": self.ok,
            "errors": self.error_count(),
            "errors_by_kind": self.errors,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "calls_per_s": self.calls_per_s().round(),
            "p50_us": p50,
            "p90_us": p90,
            "p99_us": p99,
            "p999_us": p999,
            "max_us": max,
        })
    }

    /// Human-readable lines.
    pub fn to_text(&self) -> String {
        let [p50, p90, p99, p999, max] = self.latency_us;
        let mut s = format!(
            "{:<10} concurrency {:>5}  calls {:>8}  ok {:>8}  errors {:>6}  {:>9.0} calls/s\n           latency µs  p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}\n",
            self.mode,
            self.concurrency,
            self.calls,
            self.ok,
            self.error_count(),
            self.calls_per_s(),
        );
        for (kind, n) in &self.errors {
            s.push_str(&format!("           error {kind}: {n}\n"));
        }
        s
    }
}

/// A bare rumqttc client for a floor: `client_id` on the first endpoint of
/// `broker`, TCP_NODELAY, 30 s keep-alive, 1 MiB packets, a request queue of
/// 65,536; its event loop still to be polled.
///
/// # Errors
/// When `broker` names no endpoint.
pub fn floor_client(
    broker: &directcall_core::BrokerOptions,
    client_id: &str,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), crate::cli::BoxError> {
    let endpoint = broker
        .endpoints
        .first()
        .ok_or("the floor needs a broker endpoint")?;
    let mut mqtt = rumqttc::MqttOptions::new(client_id, endpoint.host.clone(), endpoint.port);
    mqtt.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(mqtt, 65_536);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    Ok((client, eventloop))
}

/// Percentiles of `samples` (sorted in place): p50, p90, p99, p99.9, max.
pub fn percentiles(samples: &mut [u64]) -> [u64; 5] {
    if samples.is_empty() {
        return [0; 5];
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64) * q).ceil() as usize;
        samples[i.clamp(1, samples.len()) - 1]
    };
    [
        at(0.50),
        at(0.90),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1],
    ]
}

/// What kind of failure a call of the load tool ended in (`timeout`,
/// `status_404`, ...), for counting.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Failure(pub String);

impl From<&str> for Failure {
    fn from(kind: &str) -> Self {
        Failure(kind.to_owned())
    }
}

impl From<String> for Failure {
    fn from(kind: String) -> Self {
        Failure(kind)
    }
}

impl From<directcall_testkit::RawCallError> for Failure {
    fn from(e: directcall_testkit::RawCallError) -> Self {
        Failure(e.to_string())
    }
}

/// Drives `call` from `concurrency` tasks until the call count or the
/// duration is reached, after `warmup` unmeasured calls. `call(n)` returns
/// `Err(kind)` for a failed call. `progress` is told of each measured call.
pub async fn run<F, Fut>(
    mode: &str,
    options: &LoadOptions,
    progress: Option<indicatif::ProgressBar>,
    call: F,
) -> LoadReport
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Failure>> + Send,
{
    // Warm-up: connections, caches, the broker's routes.
    let warm = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..options.concurrency.min(options.warmup.max(1) as usize) {
        let (warm, call, total) = (Arc::clone(&warm), call.clone(), options.warmup);
        tasks.push(tokio::spawn(async move {
            while warm.fetch_add(1, Relaxed) < total {
                let _ = call(u64::MAX).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }

    let total = options.calls.unwrap_or(u64::MAX);
    let until = options.duration.map(|d| Instant::now() + d);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let (next, call, progress) = (Arc::clone(&next), call.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let n = next.fetch_add(1, Relaxed);
                if n >= total || until.is_some_and(|u| Instant::now() >= u) {
                    break;
                }
                let t = Instant::now();
                match call(n).await {
                    Ok(()) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(Failure(kind)) => *errors.entry(kind).or_default() += 1,
                }
                if let Some(p) = &progress {
                    p.inc(1);
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        if let Ok((l, e)) = t.await {
            latencies.extend(l);
            for (k, n) in e {
                *errors.entry(k).or_default() += n;
            }
        }
    }
    let elapsed = start.elapsed();
    if let Some(p) = &progress {
        p.finish_and_clear();
    }
    let ok = latencies.len() as u64;
    LoadReport {
        mode: mode.to_owned(),
        concurrency: options.concurrency,
        calls: ok + errors.values().sum::<u64>(),
        ok,
        errors,
        elapsed,
        latency_us: percentiles(&mut latencies),
    }
}

/// Resident set size of this process, in bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let mut s: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentiles(&mut s), [500, 900, 990, 999, 1000]);
        assert_eq!(percentiles(&mut []), [0; 5]);
        assert_eq!(percentiles(&mut [7]), [7; 5]);
    }
}
