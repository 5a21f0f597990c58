use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use directcall_cloud::connection::{self, send_nowait, Outgoing, Session};
use directcall_core::deadline::{is_expired, unix_millis, DEFAULT_SKEW};
use directcall_core::recent::RecentIds;
use directcall_core::topic::device_filter;
use directcall_core::{
    Backoff, BrokerOptions, CallTopics, MessageId, PresenceRoot, ReplyPayload, RequestPayload,
    Target,
};
use futures_util::FutureExt;
use rumqttc::{AsyncClient, LastWill, QoS, SubscribeFilter};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::handler::{MethodCall, Router};

/// Default number of handlers running at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;
/// Default number of requests waiting for a handler slot; beyond it, 503.
pub const DEFAULT_MAX_QUEUED: usize = 1024;
/// Default number of recent request ids remembered to run each once.
pub const DEFAULT_DEDUP_CAPACITY: usize = 4096;

/// Errors of the device side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker could not be reached and subscribed in time.
    #[error("broker unavailable: {reason}")]
    Unavailable {
        /// What went wrong.
        reason: String,
    },
    /// The broker settings are unusable (TLS material, ...).
    #[error("invalid broker settings: {reason}")]
    InvalidBroker {
        /// What is wrong.
        reason: String,
    },
}

/// How a device connects and serves.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    broker: BrokerOptions,
    target: Target,
    client_id: Option<String>,
    skew: Option<Duration>,
    max_concurrent: usize,
    max_queued: usize,
    dedup_capacity: usize,
    presence: Option<PresenceRoot>,
    ready_timeout: Duration,
    any_target: bool,
}

impl DeviceOptions {
    /// Serve calls to `target` through `broker`.
    pub fn new(broker: BrokerOptions, target: Target) -> Self {
        DeviceOptions {
            broker,
            target,
            client_id: None,
            skew: Some(DEFAULT_SKEW),
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_queued: DEFAULT_MAX_QUEUED,
            dedup_capacity: DEFAULT_DEDUP_CAPACITY,
            presence: None,
            ready_timeout: Duration::from_secs(10),
            any_target: false,
        }
    }

    /// MQTT client id (default: the target name, as AWS IoT expects).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Clock skew allowed before a late request is dropped (default 1 s).
    pub fn skew(mut self, skew: Duration) -> Self {
        self.skew = Some(skew);
        self
    }

    /// Run requests however late they arrive: for a device whose clock is not
    /// trusted. Default: late requests are dropped.
    pub fn ignore_deadlines(mut self) -> Self {
        self.skew = None;
        self
    }

    /// Handlers running at once (default 64).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n.max(1);
        self
    }

    /// Requests waiting for a handler slot (default 1024); further requests
    /// are answered 503 at once.
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = n;
        self
    }

    /// Recent request ids remembered, so a request delivered twice runs once
    /// (default 4096).
    pub fn dedup_capacity(mut self, n: usize) -> Self {
        self.dedup_capacity = n;
        self
    }

    /// Publish presence under `root`: retained `{"online":true}` on connect,
    /// and a retained last will `{"online":false}` (default: off).
    pub fn presence(mut self, root: PresenceRoot) -> Self {
        self.presence = Some(root);
        self
    }

    /// Answer requests addressed to *any* target (subscribing `+/+/+/+`),
    /// each as the target its topic names. For test tooling that must answer
    /// whatever a generator invents; never for a real device, which must
    /// only see its own requests. Default: off.
    pub fn any_target(mut self) -> Self {
        self.any_target = true;
        self
    }

    /// How long [`serve`] waits for the connection and subscription (default 10 s).
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = d;
        self
    }
}

/// Counters of a device, read with [`Device::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceStats {
    /// Whether the connection is up and subscribed.
    pub connected: bool,
    /// Requests received on the device's topics.
    pub received: u64,
    /// Handlers run.
    pub executed: u64,
    /// Replies published.
    pub replied: u64,
    /// Requests answered 404: no such method.
    pub unknown_method: u64,
    /// Requests answered 503: too many waiting.
    pub busy: u64,
    /// Requests dropped unanswered: past their deadline.
    pub expired: u64,
    /// Requests dropped: the same id was already received.
    pub duplicates: u64,
    /// Messages dropped or answered 400: unparsable topic or payload.
    pub malformed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    executed: AtomicU64,
    replied: AtomicU64,
    unknown_method: AtomicU64,
    busy: AtomicU64,
    expired: AtomicU64,
    duplicates: AtomicU64,
    malformed: AtomicU64,
}

struct Shared {
    client: AsyncClient,
    router: Router,
    target: Target,
    skew: Option<Duration>,
    slots: Arc<Semaphore>,
    in_flight: AtomicUsize,
    max_in_flight: usize,
    max_packet_bytes: usize,
    seen: Mutex<RecentIds<MessageId, ()>>,
    presence_topic: Option<String>,
    any_target: bool,
    connected: watch::Sender<bool>,
    shutdown: watch::Sender<bool>,
    counters: Counters,
    last_error: std::sync::Mutex<Option<String>>,
}

/// A running device: answers calls until [`Device::shutdown`] or drop.
pub struct Device {
    shared: Arc<Shared>,
    driver: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("target", &self.shared.target)
            .finish()
    }
}

/// Connects as a device, subscribes to `{target}/#` and answers calls with
/// `router`'s handlers until the returned [`Device`] is shut down or dropped.
///
/// Each request is answered on its ack topic with a `status`: the handler's
/// value with 200, its error's status (500 by default), 404 at once for an
/// unknown method, 503 at once when too many requests wait. A request past
/// its deadline (PROTOCOL.md: `now > timestamp + timeout_ms + skew`) is
/// neither run nor answered, and one delivered twice runs once.
///
/// # Errors
/// [`Error::Unavailable`] when not connected and subscribed within the ready
/// timeout.
pub async fn serve(router: Router, options: DeviceOptions) -> Result<Device, Error> {
    let client_id = options
        .client_id
        .clone()
        .unwrap_or_else(|| options.target.to_string());
    let (mut mqtt_options, network) = connection::mqtt_options(&options.broker, &client_id)
        .map_err(|reason| Error::InvalidBroker { reason })?;
    let presence_topic = options
        .presence
        .as_ref()
        .map(|root| root.topic(&options.target));
    if let Some(topic) = &presence_topic {
        mqtt_options.set_last_will(LastWill::new(
            topic.clone(),
            json!({"online": false}).to_string(),
            QoS::AtLeastOnce,
            true,
        ));
    }
    let cap = options.max_concurrent + options.max_queued + 64;
    let (client, mut eventloop) = AsyncClient::new(mqtt_options, cap);
    eventloop.set_network_options(network);
    let shared = Arc::new(Shared {
        client,
        router,
        target: options.target.clone(),
        skew: options.skew,
        slots: Arc::new(Semaphore::new(options.max_concurrent)),
        in_flight: AtomicUsize::new(0),
        max_in_flight: options.max_concurrent + options.max_queued,
        max_packet_bytes: options.broker.max_packet_bytes,
        seen: Mutex::new(RecentIds::new(options.dedup_capacity)),
        presence_topic,
        any_target: options.any_target,
        connected: watch::Sender::new(false),
        shutdown: watch::Sender::new(false),
        counters: Counters::default(),
        last_error: std::sync::Mutex::new(None),
    });
    let backoff = Backoff::new(options.broker.backoff_min, options.broker.backoff_max);
    let driver = tokio::spawn(connection::drive(
        Arc::clone(&shared),
        eventloop,
        backoff,
        shared.shutdown.subscribe(),
    ));
    let mut device = Device {
        shared,
        driver: Some(driver),
    };
    let mut ready = device.shared.connected.subscribe();
    if tokio::time::timeout(options.ready_timeout, ready.wait_for(|up| *up))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        Ok(device)
    } else {
        let last = device
            .shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        device.stop(false).await;
        Err(Error::Unavailable {
            reason: format!(
                "not connected and subscribed within {} ms; last error: {}",
                options.ready_timeout.as_millis(),
                last.as_deref().unwrap_or("none (no answer)")
            ),
        })
    }
}

impl Device {
    /// The target this device answers for.
    pub fn target(&self) -> &Target {
        &self.shared.target
    }

    /// Whether the connection is up and subscribed now.
    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DeviceStats {
        let c = &self.shared.counters;
        DeviceStats {
            connected: self.is_connected(),
            received: c.received.load(Relaxed),
            executed: c.executed.load(Relaxed),
            replied: c.replied.load(Relaxed),
            unknown_method: c.unknown_method.load(Relaxed),
            busy: c.busy.load(Relaxed),
            expired: c.expired.load(Relaxed),
            duplicates: c.duplicates.load(Relaxed),
            malformed: c.malformed.load(Relaxed),
        }
    }

    /// Publishes the offline record (with presence), disconnects cleanly and
    /// waits for the connection task to end.
    pub async fn shutdown(mut self) {
        self.stop(true).await;
    }

    /// Drops the connection without DISCONNECT, as a crash or a lost network
    /// would: the broker then publishes the last will. For tests and
    /// simulations.
    pub async fn abort(mut self) {
        self.stop(false).await;
    }

    async fn stop(&mut self, graceful: bool) {
        if graceful {
            self.shared.shutdown.send_replace(true);
            if let Some(driver) = self.driver.take() {
                let _ = driver.await;
            }
        } else if let Some(driver) = self.driver.take() {
            driver.abort();
            let _ = driver.await;
            self.shared.connected.send_replace(false);
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl Session for Shared {
    fn client(&self) -> &AsyncClient {
        &self.client
    }

    fn ready(&self) -> &watch::Sender<bool> {
        &self.connected
    }

    fn filters(&self) -> Vec<SubscribeFilter> {
        let filter = if self.any_target {
            "+/+/+/+".to_owned()
        } else {
            device_filter(&self.target)
        };
        vec![SubscribeFilter::new(filter, QoS::AtLeastOnce)]
    }

    fn connected(&self) {
        self.publish_presence(true);
    }

    fn publish(self: &Arc<Self>, topic: &str, payload: &[u8]) {
        Shared::on_request(self, topic, payload);
    }

    fn disconnected(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_owned());
    }

    fn stopping(&self) {
        self.publish_presence(false);
    }
}

/// Counts a request as in flight until it is answered or dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Shared {
    fn publish_presence(&self, online: bool) {
        if let Some(topic) = &self.presence_topic {
            send_nowait(
                &self.client,
                Outgoing::Publish {
                    topic: topic.clone(),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    payload: json!({ "online": online }).to_string().into_bytes(),
                },
            );
        }
    }

    fn reply(&self, call: &CallTopics, status: u16, response: Value) {
        let payload = ReplyPayload {
            id: call.id().to_string(),
            response,
            status,
        };
        send_nowait(
            &self.client,
            Outgoing::Publish {
                topic: call.reply_topic(),
                qos: QoS::AtLeastOnce,
                retain: false,
                payload: payload.to_vec(),
            },
        );
        self.counters.replied.fetch_add(1, Relaxed);
    }

    fn on_request(self: &Arc<Self>, topic: &str, payload: &[u8]) {
        let this = self;
        let c = &this.counters;
        c.received.fetch_add(1, Relaxed);
        let call = match CallTopics::parse_request(topic) {
            Ok(call) if this.any_target || *call.target() == this.target => call,
            _ => {
                c.malformed.fetch_add(1, Relaxed);
                tracing::debug!(topic, "ignored: not a request topic");
                return;
            }
        };
        let first_time = this
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(call.id(), ());
        if !first_time {
            c.duplicates.fetch_add(1, Relaxed);
            tracing::debug!(topic, "dropped: duplicate request");
            return;
        }
        if payload.len() > this.max_packet_bytes {
            c.malformed.fetch_add(1, Relaxed);
            this.reply(
                &call,
                413,
                json!(format!(
                    "request of {} bytes is over the {}-byte limit",
                    payload.len(),
                    this.max_packet_bytes
                )),
            );
            return;
        }
        let request = match RequestPayload::from_slice(payload) {
            Ok(r) if MessageId::parse(&r.id).ok() == Some(call.id()) => r,
            Ok(_) => {
                c.malformed.fetch_add(1, Relaxed);
                this.reply(&call, 400, json!("payload id differs from the topic's"));
                return;
            }
            Err(e) => {
                c.malformed.fetch_add(1, Relaxed);
                this.reply(&call, 400, json!(format!("malformed request: {e}")));
                return;
            }
        };
        if this.is_expired(&request) {
            c.expired.fetch_add(1, Relaxed);
            tracing::debug!(topic, "dropped: past its deadline");
            return;
        }
        let Some(handler) = this.router.get(call.method()) else {
            c.unknown_method.fetch_add(1, Relaxed);
            this.reply(
                &call,
                404,
                json!(format!("unknown method '{}'", call.method())),
            );
            return;
        };
        if this.in_flight.fetch_add(1, Relaxed) >= this.max_in_flight {
            this.in_flight.fetch_sub(1, Relaxed);
            c.busy.fetch_add(1, Relaxed);
            this.reply(&call, 503, json!("busy: too many requests waiting"));
            return;
        }
        let shared = Arc::clone(this);
        tokio::spawn(async move {
            let _in_flight = InFlight(&shared.in_flight);
            let Ok(_slot) = Arc::clone(&shared.slots).acquire_owned().await else {
                return;
            };
            // It may have waited for its slot past its deadline.
            if shared.is_expired(&request) {
                shared.counters.expired.fetch_add(1, Relaxed);
                return;
            }
            let method_call = MethodCall {
                id: call.id(),
                target: call.target().clone(),
                method: call.method().clone(),
                prefix: call.prefix().clone(),
                request: request.request,
                timestamp: request.timestamp,
                timeout_ms: request.timeout_ms,
            };
            shared.counters.executed.fetch_add(1, Relaxed);
            // A panicking handler still gets its caller a 500.
            let outcome = AssertUnwindSafe(handler.call(method_call))
                .catch_unwind()
                .await;
            let (status, response) = match outcome {
                Ok(Ok(value)) => (200, value),
                Ok(Err(e)) => (e.status(), Value::String(e.message().to_owned())),
                Err(_) => (500, json!("handler panicked")),
            };
            shared.reply(&call, status, response);
        });
    }

    fn is_expired(&self, request: &RequestPayload) -> bool {
        self.skew.is_some_and(|skew| {
            is_expired(
                request.timestamp,
                request.timeout_ms,
                unix_millis(SystemTime::now()),
                skew,
            )
        })
    }
}
