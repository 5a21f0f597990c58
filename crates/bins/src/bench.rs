//! The load tool behind `directcall bench` and the end-to-end criterion
//! benches: a closed-loop driver with latency percentiles, and the raw-MQTT
//! floor (a bare rumqttc request/echo pair correlated by id) that every
//! directcall figure is compared with in the same run.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use directcall_cloud::connection::{self, send_nowait, Outgoing};
use directcall_core::BrokerOptions;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

/// How long and how hard to drive.
#[derive(Debug, Clone)]
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

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
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
    Fut: Future<Output = Result<(), String>> + Send,
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
                    Err(kind) => *errors.entry(kind).or_default() += 1,
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

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

/// The floor: one requester connection and one responder connection of bare
/// rumqttc, with TCP_NODELAY and the same QoS as directcall (request at
/// `qos`, reply at 1), correlated by an id in the topic through a map of
/// oneshots. Everything directcall adds is measured against this.
pub struct RawPair {
    client: AsyncClient,
    waiters: Waiters,
    next_id: AtomicU64,
    request_root: String,
    qos: QoS,
    stop: watch::Sender<bool>,
}

impl RawPair {
    /// Connects both ends to `broker` and waits for their subscriptions.
    ///
    /// # Errors
    /// A message when either end cannot connect within 10 s.
    pub async fn start(broker: &BrokerOptions, qos: QoS) -> Result<RawPair, String> {
        let run = format!("{:08x}", fastrand::u32(..));
        let request_root = format!("rawbench-{run}/req");
        let reply_root = format!("rawbench-{run}/rep");
        let (stop, _) = watch::channel(false);
        let waiters: Waiters = Arc::default();

        let (ready_tx, mut ready_rx) = watch::channel(0u8);

        // Responder: echo every request to the reply topic with the same id.
        // Its event loop keeps its own handle of the client.
        raw_client(
            broker,
            &format!("rawbench-{run}-responder"),
            format!("{request_root}/+"),
            &ready_tx,
            &stop,
            {
                let reply_root = reply_root.clone();
                move |client: &AsyncClient, topic: &str, payload: &[u8]| {
                    let id = topic.rsplit('/').next().unwrap_or_default();
                    send_nowait(
                        client,
                        Outgoing::Publish {
                            topic: format!("{reply_root}/{id}"),
                            qos: QoS::AtLeastOnce,
                            retain: false,
                            payload: payload.to_vec(),
                        },
                    );
                }
            },
        )?;

        // Requester: complete the waiter named by the reply topic.
        let client = raw_client(
            broker,
            &format!("rawbench-{run}-requester"),
            format!("{reply_root}/+"),
            &ready_tx,
            &stop,
            {
                let waiters = Arc::clone(&waiters);
                move |_: &AsyncClient, topic: &str, _: &[u8]| {
                    let id = topic.rsplit('/').next().and_then(|i| i.parse::<u64>().ok());
                    let waiter = id.and_then(|id| {
                        waiters
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id)
                    });
                    if let Some(w) = waiter {
                        let _ = w.send(());
                    }
                }
            },
        )?;
        tokio::time::timeout(Duration::from_secs(10), ready_rx.wait_for(|n| *n >= 2))
            .await
            .map_err(|_| format!("raw pair: no connection to {} within 10 s", broker.url()))?
            .map_err(|e| e.to_string())?;
        Ok(RawPair {
            client,
            waiters,
            next_id: AtomicU64::new(0),
            request_root,
            qos,
            stop,
        })
    }

    /// One request/echo round trip carrying `payload`.
    ///
    /// # Errors
    /// `"timeout"` or `"unavailable"`.
    pub async fn call(&self, payload: &[u8], timeout: Duration) -> Result<(), String> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let topic = format!("{}/{id}", self.request_root);
        if self
            .client
            .try_publish(topic, self.qos, false, payload.to_vec())
            .is_err()
        {
            self.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err("unavailable".into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                self.waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err("timeout".into())
            }
        }
    }
}

/// A bare rumqttc client with TCP_NODELAY, subscribed to `filter` on every
/// connection, handing each message to `on_message` from its event loop.
fn raw_client(
    broker: &BrokerOptions,
    client_id: &str,
    filter: String,
    ready: &watch::Sender<u8>,
    stop: &watch::Sender<bool>,
    on_message: impl Fn(&AsyncClient, &str, &[u8]) + Send + 'static,
) -> Result<AsyncClient, String> {
    let (mqtt, net) = connection::mqtt_options(broker, client_id)?;
    let (client, mut events) = AsyncClient::new(mqtt, 200_000);
    events.set_network_options(net);
    let (me, ready) = (client.clone(), ready.clone());
    let mut stop = stop.subscribe();
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                e = events.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let f = rumqttc::SubscribeFilter::new(filter.clone(), QoS::AtLeastOnce);
                    send_nowait(&me, Outgoing::Subscribe(vec![f]));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => ready.send_modify(|n| *n += 1),
                Ok(Event::Incoming(Packet::Publish(p))) => on_message(&me, &p.topic, &p.payload),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Ok(client)
}

impl Drop for RawPair {
    fn drop(&mut self) {
        self.stop.send_replace(true);
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
