use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use directcall_core::broker::{DEFAULT_DEVICE_BACKOFF_MAX, DEFAULT_DEVICE_BACKOFF_MIN};
use directcall_core::deadline::{is_expired, unix_millis, DEFAULT_SKEW};
use directcall_core::mqtt::{
    Connection, ConnectionError, ConnectionOptions, Driver, Link, Message, Properties, QoS,
    Session, Subscription, Will,
};
use directcall_core::recent::RecentIds;
use directcall_core::topic::{device_filter, group_filter, GROUP_ROOT};
use directcall_core::{
    BackoffJitter, BrokerOptions, CallTopics, Group, GroupTopics, MessageId, Method, PresenceRoot,
    Receipt, ReplyPayload, RequestPayload, Target,
};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify, Semaphore};

use crate::call::MethodCall;
use crate::error::{Error, Unavailable};
use crate::metrics::Metrics;
use crate::router::{Answer, Router};

/// Default number of handlers running at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;
/// How long a request that asked for a delivery receipt may take to be
/// answered before the receipt goes out: an answer within it says it was
/// delivered, and needs no receipt before it (PROTOCOL.md, "Delivery
/// receipts").
pub const RECEIPT_AFTER: Duration = Duration::from_millis(10);
/// Default number of requests waiting for a handler slot; beyond it, 503.
pub const DEFAULT_MAX_QUEUED: usize = 1024;
/// Default number of recent request ids remembered to run each once.
pub const DEFAULT_DEDUP_CAPACITY: usize = 4096;
/// Default time [`serve`] waits for the connection and subscription.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time [`Device::shutdown`] lets running handlers finish.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Default QoS of reply publishes: 0. What a reply gets delivered at is
/// capped by the requester's reply subscription (QoS 0 by default), and a
/// clean-session device drops unacknowledged publishes when it reconnects,
/// so QoS 1 would buy an acknowledgement per reply and nothing else;
/// measured, it cost a fifth of the throughput at 128 calls in flight
/// (PERFORMANCE.md). The AWS sample's devices publish at 1; both work.
pub const DEFAULT_REPLY_QOS: QoS = QoS::AtMostOnce;
/// Default QoS of the device's request subscription: 1, so a requester that
/// publishes requests at QoS 1 gets at-least-once delivery (requests go out
/// at QoS 0 by default, and are then delivered at 0 whatever this is).
pub const DEFAULT_REQUEST_SUBSCRIPTION_QOS: QoS = QoS::AtLeastOnce;

/// How a device connects and serves: a builder whose setters consume and
/// return it, each stating its default.
///
/// ```
/// use std::time::Duration;
/// use directcall_device::{BrokerOptions, DeviceOptions, Group, PresenceRoot, Target};
///
/// # fn main() -> Result<(), directcall_device::Error> {
/// let broker = BrokerOptions::from_url("mqtt://127.0.0.1:1883")?;
/// let options = DeviceOptions::new(broker, Target::new("VIN123")?)
///     .presence(PresenceRoot::default()) // retained online record, last will offline
///     .group(Group::new("lobby")?) // also answer calls to the group "lobby"
///     .max_concurrent(8) // handlers at once; more wait, up to max_queued
///     .drain_timeout(Duration::from_secs(2)); // what shutdown lets running handlers take
/// # let _ = options;
/// # Ok(()) }
/// ```
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
    groups: Vec<Group>,
    ready_timeout: Duration,
    drain_timeout: Duration,
    any_target: bool,
    reply_qos: QoS,
    subscription_qos: QoS,
    session_expiry: Option<Duration>,
    #[cfg(feature = "websocket")]
    url_signer: Option<Arc<dyn directcall_core::mqtt::UrlSigner>>,
}

impl DeviceOptions {
    /// Serve calls to `target` through `broker`. Where `broker` leaves the
    /// reconnect backoff unset, the device's defaults apply: full jitter, a
    /// 1 s first window, steps up to 30 s (see
    /// [`DeviceOptions::reconnect_max`]).
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
            groups: Vec::new(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            any_target: false,
            reply_qos: DEFAULT_REPLY_QOS,
            subscription_qos: DEFAULT_REQUEST_SUBSCRIPTION_QOS,
            session_expiry: None,
            #[cfg(feature = "websocket")]
            url_signer: None,
        }
    }

    /// Keep the MQTT session `expiry` after a disconnect (default: a clean
    /// session each time). The broker then keeps the device's subscription
    /// and queues QoS 1 requests for it while it is away; on MQTT 5 a
    /// request's Message Expiry Interval (a directcall requester sets it to
    /// the call's deadline) still drops it before a late reconnect.
    pub fn persistent_session(mut self, expiry: Duration) -> Self {
        self.session_expiry = Some(expiry);
        self
    }

    /// Sign the WebSocket URL with `signer` on every connection attempt
    /// (feature `websocket`). Default: none.
    #[cfg(feature = "websocket")]
    pub fn url_signer(mut self, signer: Arc<dyn directcall_core::mqtt::UrlSigner>) -> Self {
        self.url_signer = Some(signer);
        self
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

    /// *Extension*: also answer calls to the named group `group`
    /// (PROTOCOL.md, "Groups"): a requester publishes one request on
    /// `directcall/groups/{group}/{method}/{prefix}/{id}`, every member
    /// runs it as a request to itself (the same router, deduplication,
    /// deadline and limits) and answers on its own reply topic,
    /// `{prefix}/{id}/{target}/{method}/ack`. Call it once per group to join
    /// several; joining a group twice joins it once. Default: no group.
    ///
    /// Each group is one more subscription, `directcall/groups/{group}/#`,
    /// asked for in a SUBSCRIBE of its own after the device's own
    /// `{target}/#`: [`serve`] returns once that one is granted, and a
    /// broker that refuses a group's filter (an AWS IoT policy that denies
    /// it) costs that group only. With [presence](DeviceOptions::presence),
    /// the device's records list its groups (`"groups": [..]`).
    ///
    /// ```
    /// use directcall_device::{BrokerOptions, DeviceOptions, Group, Target};
    ///
    /// # fn main() -> Result<(), directcall_device::Error> {
    /// let broker = BrokerOptions::from_url("mqtt://127.0.0.1:1883")?;
    /// let options = DeviceOptions::new(broker, Target::new("Kiosk-7")?)
    ///     .group(Group::new("lobby")?)
    ///     .group(Group::new("floor-2")?);
    /// # let _ = options;
    /// // A name that is not a topic level is refused with the field it is:
    /// let e = Group::new("floor/2").map_err(directcall_device::Error::from).unwrap_err();
    /// assert_eq!(e.to_string(), "invalid group: contains '/'; only A-Z a-z 0-9 _ - . : are allowed");
    /// # Ok(()) }
    /// ```
    pub fn group(mut self, group: Group) -> Self {
        if !self.groups.contains(&group) {
            self.groups.push(group);
        }
        self
    }

    /// Answer requests addressed to *any* target (subscribing `+/+/+/+`),
    /// each as the target its topic names. For test tooling that must answer
    /// whatever a generator invents; never for a real device, which must
    /// only see its own requests. Default: off.
    ///
    /// A group request ([`DeviceOptions::group`]) names no target: such a
    /// device answers it once, as the target it was made for.
    pub fn any_target(mut self) -> Self {
        self.any_target = true;
        self
    }

    /// How long [`serve`] waits for the connection and subscription
    /// (default 10 s). [`start`] does not wait.
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = d;
        self
    }

    /// QoS of reply publishes (default [`DEFAULT_REPLY_QOS`]).
    pub fn reply_qos(mut self, qos: QoS) -> Self {
        self.reply_qos = qos;
        self
    }

    /// QoS of the request subscription (default
    /// [`DEFAULT_REQUEST_SUBSCRIPTION_QOS`]). On a broker that backs QoS 1
    /// subscriptions with storage (NATS: JetStream consumers), QoS 0 avoids
    /// that cost when requesters publish at QoS 0 anyway.
    pub fn subscription_qos(mut self, qos: QoS) -> Self {
        self.subscription_qos = qos;
        self
    }

    /// How long [`Device::shutdown`] lets running handlers finish before it
    /// answers the rest 503 (default 5 s).
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// The longest wait between two reconnect attempts (default 30 s,
    /// [`DEFAULT_DEVICE_BACKOFF_MAX`]). After losing its connection a device
    /// waits a random time from 0 up to a step that starts at the
    /// [reconnect window](DeviceOptions::reconnect_window) and doubles with
    /// each failed attempt up to this ("full jitter"): a fleet cut off by a
    /// broker restart comes back spread over up to this long instead of in
    /// one burst, and no device waits longer than this once the broker is
    /// back. Sets [`BrokerOptions::backoff_max`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use directcall_device::{BrokerOptions, DeviceOptions, Target};
    ///
    /// # fn main() -> Result<(), directcall_device::Error> {
    /// let broker = BrokerOptions::from_url("mqtts://iot.example.com")?;
    /// // A large fleet: spread reconnects over a minute.
    /// let options = DeviceOptions::new(broker, Target::new("VIN123")?)
    ///     .reconnect_max(Duration::from_secs(60));
    /// # let _ = options;
    /// # Ok(()) }
    /// ```
    pub fn reconnect_max(mut self, max: Duration) -> Self {
        self.broker.backoff_max = Some(max);
        self
    }

    /// The window the first reconnect after a loss is spread over (default
    /// 1 s, [`DEFAULT_DEVICE_BACKOFF_MIN`]): the device waits a random time
    /// from 0 to this, so that even a broker back at once does not meet
    /// the whole fleet in the same instant; the first backoff step, doubled
    /// with each failed attempt. A fleet's reconnects after such a blip
    /// come at about fleet size ÷ window a second. Sets
    /// [`BrokerOptions::backoff_min`].
    pub fn reconnect_window(mut self, window: Duration) -> Self {
        self.broker.backoff_min = Some(window);
        self
    }
}

/// The presence record a device writes (online, offline, its last will):
/// `{"online": ..}`, and `"groups": [..]` when it is in any.
fn presence_record(online: bool, groups: &[Group]) -> String {
    let mut record = json!({ "online": online });
    if !groups.is_empty() {
        record["groups"] = groups.iter().map(Group::as_str).collect();
    }
    record.to_string()
}

/// The group level of a topic under [`GROUP_ROOT`], whatever follows it;
/// `None` for any other topic.
fn group_level(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix(GROUP_ROOT)?.strip_prefix('/')?;
    rest.split('/').next()
}

/// `broker` with the device's reconnect backoff where it sets none: full
/// jitter, a 1 s first window, 30 s steps at most (a default window never
/// wider than a maximum that was set).
fn with_device_backoff(mut broker: BrokerOptions) -> BrokerOptions {
    let max = *broker.backoff_max.get_or_insert(DEFAULT_DEVICE_BACKOFF_MAX);
    broker
        .backoff_min
        .get_or_insert(DEFAULT_DEVICE_BACKOFF_MIN.min(max));
    broker.backoff_jitter.get_or_insert(BackoffJitter::Full);
    broker
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
    /// Requests answered 503: too many waiting, or shutting down.
    pub busy: u64,
    /// Requests dropped unanswered: past their deadline.
    pub expired: u64,
    /// Requests dropped: the same id was already received.
    pub duplicates: u64,
    /// Messages dropped or answered 400 or 413: unparsable topic or payload,
    /// or too large.
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

/// Where and how a request is answered.
struct ReplyTo {
    topic: String,
    /// The call id the reply payload echoes; `None` for a plain MQTT 5
    /// request.
    id: Option<MessageId>,
    /// MQTT 5 Correlation Data to send back.
    correlation: Option<Vec<u8>>,
}

/// A request whose topic passed, as far as its topic and properties tell.
struct Received {
    /// Its topics; for a group request, the member's part of it.
    call: CallTopics,
    /// MQTT 5: the Response Topic it named (never a group request's).
    reply_to: Option<String>,
    /// The group it was sent to, for a group request.
    group: Option<Group>,
    /// From the MQTT 5 user property.
    traceparent: Option<String>,
}

/// The user property carrying a W3C trace context.
const TRACEPARENT: &str = "traceparent";

/// A Response Topic a device may publish to: a topic name (no wildcard, no
/// NUL), not empty, at most 1024 bytes.
fn valid_response_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 1024 && !topic.contains(['+', '#', '\0'])
}

/// `{target}/{method}`: the topic of a plain MQTT 5 request.
fn plain_request(topic: &str) -> Option<(Target, Method)> {
    let (target, method) = topic.split_once('/')?;
    Some((Target::new(target).ok()?, Method::new(method).ok()?))
}

/// What handlers still running must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Run on.
    No,
    /// Stop and answer 503: the drain timeout passed.
    Answer503,
    /// Stop without an answer, as a crash would.
    Abandon,
}

struct Shared {
    link: Link,
    router: Router,
    target: Target,
    skew: Option<Duration>,
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    seen: Mutex<RecentIds<MessageId, ()>>,
    /// Requests between their arrival and their answer: no map, so the
    /// driver and the handler tasks share no lock.
    running: AtomicUsize,
    /// Notified when `running` falls to zero while draining.
    idle: Notify,
    cut: watch::Sender<Cut>,
    draining: AtomicBool,
    presence_topic: Option<String>,
    groups: Vec<Group>,
    any_target: bool,
    reply_qos: QoS,
    subscription_qos: QoS,
    counters: Counters,
    metrics: Metrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here holds an invariant a panic elsewhere could break half-way.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running device: answers calls until [`Device::shutdown`] or drop.
pub struct Device {
    shared: Arc<Shared>,
    driver: Option<Driver>,
    drain_timeout: Duration,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("target", &self.shared.target)
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// Starts a device and returns at once, before it is connected: firmware
/// boots before the network does. The connection is made, and remade after
/// every loss, in the background with capped, fully jittered backoff
/// ([`DeviceOptions::reconnect_max`]); requests are answered
/// from the first connection on. See [`serve`] for the behaviour.
///
/// # Errors
/// [`Error::Setup`] when the broker settings cannot be used (TLS material,
/// a transport whose feature is not compiled in). Never for an unreachable
/// broker.
pub fn start<S>(router: Router<S>, options: DeviceOptions) -> Result<Device, Error> {
    let client_id = options
        .client_id
        .clone()
        .unwrap_or_else(|| options.target.to_string());
    let presence_topic = options
        .presence
        .as_ref()
        .map(|root| root.topic(&options.target));
    let max_in_flight = options.max_concurrent + options.max_queued;
    let mut connection_options =
        ConnectionOptions::new(with_device_backoff(options.broker.clone()), client_id)
            .capacity(max_in_flight);
    if let Some(expiry) = options.session_expiry {
        connection_options = connection_options.session_expiry(expiry);
    }
    if let Some(topic) = &presence_topic {
        connection_options = connection_options.will(Will::new(
            topic.clone(),
            presence_record(false, &options.groups),
            QoS::AtLeastOnce,
            true,
        ));
    }
    #[cfg(feature = "websocket")]
    if let Some(signer) = options.url_signer.clone() {
        connection_options = connection_options.url_signer(signer);
    }
    let connection = Connection::new(connection_options)?;
    let shared = Arc::new(Shared::new(
        &options,
        connection.link(),
        router.into_stateless(),
        presence_topic,
    ));
    let driver = connection.run(Arc::clone(&shared));
    Ok(Device {
        shared,
        driver: Some(driver),
        drain_timeout: options.drain_timeout,
    })
}

/// Connects as a device, subscribes to `{target}/#` (and to the filter of
/// each of its [groups](DeviceOptions::group)) and answers calls with
/// `router`'s handlers until the returned [`Device`] is shut down or dropped.
///
/// Each request is answered on its ack topic with a `status`: the handler's
/// value with 200, its error's status (500 by default), 404 at once for an
/// unknown method, 503 at once when too many requests wait. A request past
/// its deadline (PROTOCOL.md: `now > timestamp + timeout_ms + skew`) is
/// neither run nor answered, and one delivered twice runs once.
///
/// ```no_run
/// use directcall_device::{serve, BrokerOptions, DeviceOptions, Router, Target};
///
/// # async fn run() -> Result<(), directcall_device::Error> {
/// let router = Router::new().method("ping", |_| async { Ok("pong") });
/// let broker = BrokerOptions::from_url("mqtt://127.0.0.1:1883")?;
/// let device = serve(router, DeviceOptions::new(broker, Target::new("VIN123")?)).await?;
/// assert!(device.is_connected());
/// // ... answers calls until it is shut down (or dropped):
/// device.shutdown().await;
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::Setup`] for unusable broker settings; [`Error::Unavailable`]
/// when not connected and subscribed within the ready timeout (default
/// 10 s). A device that must boot while the broker is away uses [`start`].
pub async fn serve<S>(router: Router<S>, options: DeviceOptions) -> Result<Device, Error> {
    let ready_timeout = options.ready_timeout;
    let device = start(router, options)?;
    if device.wait_ready(ready_timeout).await {
        Ok(device)
    } else {
        let last_error = device.shared.link.last_error();
        device.abort().await;
        Err(Error::Unavailable {
            cause: Unavailable::NotReady {
                timeout: ready_timeout,
            },
            last_error,
        })
    }
}

impl Device {
    /// The target this device answers for.
    pub fn target(&self) -> &Target {
        &self.shared.target
    }

    /// The groups whose calls it answers too ([`DeviceOptions::group`]).
    pub fn groups(&self) -> &[Group] {
        &self.shared.groups
    }

    /// Whether the connection is up and subscribed now.
    pub fn is_connected(&self) -> bool {
        self.shared.link.is_ready()
    }

    /// Waits until the connection is up and subscribed, at most `timeout`;
    /// returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        self.shared.link.wait_ready(timeout).await
    }

    /// Why the connection last failed, if it ever did.
    pub fn last_error(&self) -> Option<ConnectionError> {
        self.shared.link.last_error()
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

    /// Stops gracefully: new requests are answered 503 at once, running
    /// handlers get up to the drain timeout (default 5 s) to finish and be
    /// answered, the ones still running then are answered 503; then the
    /// offline record is published (with presence) and the connection is
    /// closed cleanly.
    pub async fn shutdown(mut self) {
        let shared = &self.shared;
        shared.draining.store(true, Relaxed);
        if !shared.wait_idle(self.drain_timeout).await {
            tracing::warn!(
                calls = shared.running.load(Relaxed),
                "handlers still running after the drain timeout: answering 503"
            );
            shared.cut.send_replace(Cut::Answer503);
            // Their 503s go out before the DISCONNECT.
            shared.wait_idle(CUT_TIMEOUT).await;
        }
        if let Some(driver) = self.driver.take() {
            driver.stop().await;
        }
    }

    /// Drops the connection without DISCONNECT, as a crash or a lost network
    /// would: the broker then publishes the last will. Handlers still running
    /// are abandoned. For tests and simulations.
    pub async fn abort(mut self) {
        self.shared.cut.send_replace(Cut::Abandon);
        if let Some(driver) = self.driver.take() {
            driver.abort().await;
        }
    }
}

/// How long a shutdown waits for the 503s of handlers cut at the drain
/// timeout to be queued.
const CUT_TIMEOUT: Duration = Duration::from_secs(1);

/// One running request: counted from its arrival until its task ends,
/// however it ends (answered, cut, panicked).
struct RunningGuard(Arc<Shared>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let shared = &self.0;
        if shared.running.fetch_sub(1, Relaxed) == 1 && shared.draining.load(Relaxed) {
            shared.idle.notify_waiters();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.link.stop();
    }
}

impl Session for Shared {
    fn subscriptions(&self) -> Vec<Subscription> {
        let filter = if self.any_target {
            "+/+/+/+".to_owned()
        } else {
            device_filter(&self.target)
        };
        // The device's own filter is the essential one; each group's
        // follows in a SUBSCRIBE of its own.
        std::iter::once(filter)
            .chain(self.groups.iter().map(group_filter))
            .map(|filter| Subscription::new(filter, self.subscription_qos))
            .collect()
    }

    fn on_connected(&self) {
        self.publish_presence(true);
    }

    fn on_ready(&self) {
        self.metrics.connected.set(1.0);
    }

    fn on_message(self: &Arc<Self>, message: Message<'_>) {
        self.on_request(message.topic, message.payload, message.properties);
    }

    fn on_disconnected(&self, _error: &ConnectionError) {
        self.metrics.connected.set(0.0);
    }

    fn on_stopping(&self) {
        self.metrics.connected.set(0.0);
        self.publish_presence(false);
    }
}

impl Shared {
    fn new(
        options: &DeviceOptions,
        link: Link,
        router: Router,
        presence_topic: Option<String>,
    ) -> Self {
        Shared {
            link,
            router,
            target: options.target.clone(),
            skew: options.skew,
            slots: Arc::new(Semaphore::new(options.max_concurrent)),
            max_in_flight: options.max_concurrent + options.max_queued,
            seen: Mutex::new(RecentIds::new(options.dedup_capacity)),
            running: AtomicUsize::new(0),
            idle: Notify::new(),
            cut: watch::Sender::new(Cut::No),
            draining: AtomicBool::new(false),
            presence_topic,
            groups: options.groups.clone(),
            any_target: options.any_target,
            reply_qos: options.reply_qos,
            subscription_qos: options.subscription_qos,
            counters: Counters::default(),
            metrics: Metrics::register(),
        }
    }

    fn publish_presence(&self, online: bool) {
        if let Some(topic) = &self.presence_topic {
            self.link.publish_or_queue(
                topic.clone(),
                presence_record(online, &self.groups),
                QoS::AtLeastOnce,
                true,
            );
        }
    }

    fn answer(&self, to: &ReplyTo, status: u16, response: Value) {
        let payload = match &to.id {
            Some(id) => ReplyPayload::new(id.to_string(), status, response).to_vec(),
            // A plain MQTT 5 request has no id to echo.
            None => json!({"status": status, "response": response})
                .to_string()
                .into_bytes(),
        };
        let properties = to.correlation.as_ref().map(|c| {
            let mut p = Properties::default();
            p.correlation_data = Some(c.clone());
            p
        });
        self.link.publish_or_queue_with(
            to.topic.clone(),
            payload,
            self.reply_qos,
            false,
            properties.as_ref(),
        );
        self.counters.replied.fetch_add(1, Relaxed);
        self.metrics.replied.increment(1);
    }

    fn count(&self, counter: &AtomicU64, metric: &metrics::Counter) {
        counter.fetch_add(1, Relaxed);
        metric.increment(1);
    }

    fn on_request(self: &Arc<Self>, topic: &str, payload: &[u8], props: Option<&Properties>) {
        let (c, m) = (&self.counters, &self.metrics);
        let traceparent = props
            .and_then(|p| p.user_property(TRACEPARENT))
            .map(str::to_owned);
        // A topic under the group root is a group request and never one
        // to a target, whatever filter it came through.
        if let Some(group) = group_level(topic) {
            self.on_group_request(topic, group, payload, traceparent);
            return;
        }
        c.received.fetch_add(1, Relaxed);
        // MQTT 5: answer where the request asks (its Response Topic), with
        // its Correlation Data.
        let response_topic = props
            .and_then(|p| p.response_topic.as_deref())
            .filter(|t| valid_response_topic(t));
        let correlation = props.and_then(|p| p.correlation_data.clone());
        let call = match CallTopics::parse_request(topic) {
            Ok(call) if self.any_target || *call.target() == self.target => call,
            _ => {
                match (response_topic, plain_request(topic)) {
                    (Some(reply_topic), Some((target, method)))
                        if self.any_target || target == self.target =>
                    {
                        let to = ReplyTo {
                            topic: reply_topic.to_owned(),
                            id: None,
                            correlation,
                        };
                        self.on_plain_request(to, target, method, payload, traceparent);
                    }
                    _ => {
                        self.count(&c.malformed, &m.malformed);
                        tracing::debug!(topic, "ignored: not a request topic");
                    }
                }
                return;
            }
        };
        let to = ReplyTo {
            topic: response_topic.map_or_else(|| call.reply_topic(), str::to_owned),
            id: Some(call.id()),
            correlation,
        };
        let received = Received {
            call,
            reply_to: response_topic.map(str::to_owned),
            group: None,
            traceparent,
        };
        self.on_call(to, received, payload);
    }

    /// A message on `directcall/groups/{group}/...`. One of the device's
    /// groups: run as a request to the device itself, answered on its own
    /// reply topic, never on a Response Topic, which would be the same for
    /// every member. Another group's (a device named `directcall` sees
    /// them all through `directcall/#`; a persistent session may keep a
    /// group the device has left): not for this device, dropped uncounted.
    fn on_group_request(
        self: &Arc<Self>,
        topic: &str,
        group: &str,
        payload: &[u8],
        traceparent: Option<String>,
    ) {
        let (c, m) = (&self.counters, &self.metrics);
        if !self.groups.iter().any(|g| g.as_str() == group) {
            tracing::debug!(topic, "ignored: a request to a group this device is not in");
            return;
        }
        c.received.fetch_add(1, Relaxed);
        let parsed = GroupTopics::parse_request(topic).map(|parsed| {
            let g = parsed?;
            Ok::<_, directcall_core::Error>((g.member(self.target.clone())?, g.group().clone()))
        });
        let (call, group) = match parsed {
            Some(Ok(parsed)) => parsed,
            other => {
                // No reply topic can be made from a broken topic.
                self.count(&c.malformed, &m.malformed);
                let reason = other.and_then(Result::err).map(|e| e.to_string());
                tracing::debug!(topic, reason, "ignored: not a group request topic");
                return;
            }
        };
        let to = ReplyTo {
            topic: call.reply_topic(),
            id: Some(call.id()),
            correlation: None,
        };
        let received = Received {
            call,
            reply_to: None,
            group: Some(group),
            traceparent,
        };
        self.on_call(to, received, payload);
    }

    /// A request whose topic passed: checked, deduplicated, run and
    /// answered at `to`.
    fn on_call(self: &Arc<Self>, to: ReplyTo, received: Received, payload: &[u8]) {
        let (c, m) = (&self.counters, &self.metrics);
        let Received {
            call,
            reply_to,
            group,
            traceparent,
        } = received;
        // Everything that refuses a message comes before its id is marked
        // as seen: a malformed first delivery must not suppress a later
        // well-formed one.
        if payload.len() > self.link.max_packet_bytes() {
            self.count(&c.malformed, &m.malformed);
            let reason = format!(
                "request of {} bytes is over the {}-byte limit",
                payload.len(),
                self.link.max_packet_bytes()
            );
            self.answer(&to, 413, json!(reason));
            return;
        }
        let request = match RequestPayload::from_slice(payload) {
            Ok(r) if MessageId::parse(&r.id).ok() == Some(call.id()) => r,
            Ok(_) => {
                self.count(&c.malformed, &m.malformed);
                self.answer(&to, 400, json!("payload id differs from the topic's"));
                return;
            }
            Err(e) => {
                self.count(&c.malformed, &m.malformed);
                self.answer(&to, 400, json!(format!("malformed request: {e}")));
                return;
            }
        };
        if !lock(&self.seen).insert(call.id(), ()) {
            self.count(&c.duplicates, &m.duplicates);
            tracing::debug!(id = %call.id(), "dropped: duplicate request");
            return;
        }
        if self.is_expired(&request) {
            self.count(&c.expired, &m.expired);
            tracing::debug!(id = %call.id(), "dropped: past its deadline");
            return;
        }
        let method_call = MethodCall {
            id: call.id(),
            target: call.target().clone(),
            method: call.method().clone(),
            prefix: Some(call.prefix().clone()),
            group,
            request: request.request,
            timestamp: request.timestamp,
            timeout_ms: request.timeout_ms,
            reply_to,
            traceparent: traceparent.or(request.traceparent),
        };
        self.dispatch(to, method_call, request.receipt);
    }

    /// A plain MQTT 5 request: `{target}/{method}` with a Response Topic,
    /// the whole payload as the request value (JSON, else text).
    fn on_plain_request(
        self: &Arc<Self>,
        to: ReplyTo,
        target: Target,
        method: Method,
        payload: &[u8],
        traceparent: Option<String>,
    ) {
        let (c, m) = (&self.counters, &self.metrics);
        if payload.len() > self.link.max_packet_bytes() {
            self.count(&c.malformed, &m.malformed);
            let reason = format!(
                "request of {} bytes is over the {}-byte limit",
                payload.len(),
                self.link.max_packet_bytes()
            );
            self.answer(&to, 413, json!(reason));
            return;
        }
        let request = serde_json::from_slice(payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
        // Correlation data that is a call id makes the request run once.
        let id = to
            .correlation
            .as_deref()
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| MessageId::parse(c).ok());
        if let Some(id) = id {
            if !lock(&self.seen).insert(id, ()) {
                self.count(&c.duplicates, &m.duplicates);
                tracing::debug!(%target, %method, "dropped: duplicate request");
                return;
            }
        }
        let method_call = MethodCall {
            id: id.unwrap_or_else(MessageId::new),
            target,
            method,
            prefix: None,
            group: None,
            request,
            timestamp: None,
            timeout_ms: None,
            reply_to: Some(to.topic.clone()),
            traceparent,
        };
        self.dispatch(to, method_call, false);
    }

    /// The delivery receipt of call `id`: on the reply topic, in a shape no
    /// answer has (PROTOCOL.md, "Delivery receipts").
    fn receipt(&self, to: &ReplyTo, id: MessageId) {
        self.link.publish_or_queue_with(
            to.topic.clone(),
            Receipt::new(id.to_string()).to_vec(),
            self.reply_qos,
            false,
            None,
        );
    }

    /// Runs a request that passed its checks, and answers it at `to`. When
    /// it asked for a delivery receipt (`receipt`), one goes out only if
    /// the answer has not within [`RECEIPT_AFTER`]: an answer says it was
    /// delivered, and a receipt right before it would cost the broker a
    /// second message for nothing.
    fn dispatch(self: &Arc<Self>, to: ReplyTo, method_call: MethodCall, receipt: bool) {
        let (c, m) = (&self.counters, &self.metrics);
        if !self.router.knows(&method_call.method) {
            self.count(&c.unknown_method, &m.unknown_method);
            let reason = format!("unknown method '{}'", method_call.method);
            self.answer(&to, 404, json!(reason));
            return;
        }
        if self.draining.load(Relaxed) {
            self.count(&c.busy, &m.busy);
            self.answer(&to, 503, json!("device shutting down"));
            return;
        }
        if self.running.fetch_add(1, Relaxed) >= self.max_in_flight {
            self.running.fetch_sub(1, Relaxed);
            self.count(&c.busy, &m.busy);
            self.answer(&to, 503, json!("busy: too many requests waiting"));
            return;
        }
        let running = RunningGuard(Arc::clone(self));
        let receipt = receipt.then_some(method_call.id);
        let (timestamp, timeout_ms) = (method_call.timestamp, method_call.timeout_ms);
        let shared = Arc::clone(self);
        let free_slot = Arc::clone(&self.slots).try_acquire_owned().ok();
        let inline = free_slot.is_some();
        let mut work: Pin<Box<dyn Future<Output = Option<Answer>> + Send>> = match free_slot {
            Some(slot) => {
                self.count(&c.executed, &m.executed);
                Box::pin(async move {
                    let answer = shared.router.call(method_call).await;
                    drop(slot);
                    Some(answer)
                })
            }
            None => Box::pin(async move {
                let slot = Arc::clone(&shared.slots).acquire_owned().await;
                // It may have waited for its slot past its deadline.
                let expired = shared.skew.is_some_and(|skew| {
                    is_expired(timestamp, timeout_ms, unix_millis(SystemTime::now()), skew)
                });
                if slot.is_err() || expired {
                    return None;
                }
                shared.count(&shared.counters.executed, &shared.metrics.executed);
                let answer = shared.router.call(method_call).await;
                drop(slot);
                Some(answer)
            }),
        };
        // A handler that answers on its first poll (most device methods:
        // set a pin, read a value) is answered here, with no task and no
        // thread hop; one that waits goes on in a task, which polls it again
        // with its own waker.
        if inline {
            let mut cx = Context::from_waker(Waker::noop());
            if let Poll::Ready(answer) = work.as_mut().poll(&mut cx) {
                match answer {
                    Some(a) => self.answer(&to, a.status, a.response),
                    None => self.count(&c.expired, &m.expired),
                }
                drop(running);
                return;
            }
        }
        tokio::spawn(async move {
            let shared = &running.0;
            // Watched only while the handler is pending: a handler that
            // answers at once never registers.
            let cut = async {
                let mut cut = shared.cut.subscribe();
                let seen = cut.wait_for(|c| *c != Cut::No).await.map(|c| *c);
                seen.unwrap_or(Cut::Abandon)
            };
            // Not answered at once: a receipt, unless the answer comes
            // within RECEIPT_AFTER.
            let work = async {
                let Some(id) = receipt else {
                    return work.await;
                };
                tokio::select! {
                    biased;
                    answer = &mut work => answer,
                    () = tokio::time::sleep(RECEIPT_AFTER) => {
                        shared.receipt(&to, id);
                        work.await
                    }
                }
            };
            let answer = tokio::select! {
                biased;
                answer = work => answer,
                cut = cut => match cut {
                    Cut::Answer503 => Some(Answer {
                        status: 503,
                        response: json!("device shutting down"),
                    }),
                    _ => return,
                },
            };
            match answer {
                Some(a) => shared.answer(&to, a.status, a.response),
                None => shared.count(&shared.counters.expired, &shared.metrics.expired),
            }
        });
    }

    /// Waits until no request is running, for at most `timeout`; whether
    /// none is.
    async fn wait_idle(&self, timeout: Duration) -> bool {
        let idle = async {
            loop {
                let notified = self.idle.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if self.running.load(Relaxed) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, idle).await.is_ok()
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

#[cfg(test)]
mod tests {
    //! The drain and the expiry rule without a broker, time on tokio's
    //! paused clock: exact and instant. The device here has no driver:
    //! requests are handed to it as the driver would, and its answers queue
    //! on a connection that is never run.
    use super::*;
    use tokio::time::Instant;

    const DRAIN: Duration = Duration::from_millis(1500);

    /// A device serving `router` on target `car`, and the connection its
    /// answers queue on (kept, so that they can).
    fn idle_device(router: Router, drain_timeout: Duration) -> (Device, Connection) {
        let options = DeviceOptions::new(
            BrokerOptions::new("127.0.0.1", 1),
            Target::new("car").unwrap(),
        )
        .drain_timeout(drain_timeout);
        idle_device_with(router, options)
    }

    /// A device serving `router` with `options`, as [`idle_device`].
    fn idle_device_with(router: Router, options: DeviceOptions) -> (Device, Connection) {
        let connection = Connection::new(
            ConnectionOptions::new(options.broker.clone(), options.target.as_str())
                .capacity(options.max_concurrent + options.max_queued),
        )
        .unwrap();
        let shared = Arc::new(Shared::new(&options, connection.link(), router, None));
        let device = Device {
            shared,
            driver: None,
            drain_timeout: options.drain_timeout,
        };
        (device, connection)
    }

    /// Hands the device a request for `method`, sent `age` ago with a 3 s
    /// budget (or with neither), as the driver would.
    fn deliver(device: &Arc<Shared>, method: &str, age: Option<Duration>) {
        let call = CallTopics::new(
            Target::new("car").unwrap(),
            Method::new(method).unwrap(),
            directcall_core::Prefix::default(),
            MessageId::new(),
        )
        .unwrap();
        let mut payload = json!({"id": call.id().to_string(), "request": null});
        if let Some(age) = age {
            let sent = unix_millis(SystemTime::now() - age);
            payload["timestamp"] = json!(sent.to_string());
            payload["timeout_ms"] = json!(3000);
        }
        device.on_request(&call.request_topic(), payload.to_string().as_bytes(), None);
    }

    /// (answers sent, requests refused busy, handlers run)
    fn counts(device: &Shared) -> (u64, u64, u64) {
        let c = &device.counters;
        (
            c.replied.load(Relaxed),
            c.busy.load(Relaxed),
            c.executed.load(Relaxed),
        )
    }

    fn quick_and_forever() -> Router {
        Router::new()
            .method("quick", |_| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok("done")
            })
            .method("forever", |_| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok("never")
            })
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_running_handlers_answer_then_answers_the_rest_at_the_drain_timeout() {
        let (device, _connection) = idle_device(quick_and_forever(), DRAIN);
        let shared = Arc::clone(&device.shared);
        deliver(&shared, "quick", None);
        deliver(&shared, "forever", None);
        assert_eq!(counts(&shared), (0, 0, 2));
        let started = Instant::now();
        let stopping = tokio::spawn(device.shutdown());
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Draining: a new request is answered 503 at once, and not run.
        deliver(&shared, "quick", None);
        assert_eq!(counts(&shared), (1, 1, 2));
        // The quick handler finishes within the drain and is answered.
        tokio::time::sleep_until(started + Duration::from_millis(301)).await;
        assert_eq!(counts(&shared), (2, 1, 2));
        // The other is answered (503) at the drain timeout, and only then
        // does the shutdown end.
        tokio::time::sleep_until(started + DRAIN - Duration::from_millis(1)).await;
        assert_eq!(counts(&shared), (2, 1, 2));
        assert!(!stopping.is_finished());
        stopping.await.unwrap();
        let took = started.elapsed();
        assert!(took >= DRAIN && took < DRAIN + CUT_TIMEOUT, "{took:?}");
        assert_eq!(counts(&shared), (3, 1, 2));
        assert_eq!(shared.running.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_as_soon_as_the_running_handlers_are_done() {
        let (device, _connection) = idle_device(quick_and_forever(), DEFAULT_DRAIN_TIMEOUT);
        let shared = Arc::clone(&device.shared);
        deliver(&shared, "quick", None);
        let started = Instant::now();
        device.shutdown().await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < DEFAULT_DRAIN_TIMEOUT,
            "{took:?}"
        );
        assert_eq!(counts(&shared), (1, 0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_deadline_is_neither_run_nor_answered() {
        let (device, _connection) = idle_device(quick_and_forever(), DRAIN);
        let shared = Arc::clone(&device.shared);
        // Sent 10 s ago with 3 s to go: past them and the 1 s skew. Sent
        // 2 s ago: within.
        deliver(&shared, "quick", Some(Duration::from_secs(10)));
        deliver(&shared, "quick", Some(Duration::from_secs(2)));
        let s = device.stats();
        assert_eq!((s.received, s.expired, s.executed), (2, 1, 1));
        device.shutdown().await;
        assert_eq!(counts(&shared), (1, 0, 1), "only the one in time answered");
    }

    #[test]
    fn a_device_reconnects_with_full_jitter_up_to_30_s_unless_told_otherwise() {
        let backoff = |b: &BrokerOptions| (b.backoff_min, b.backoff_max, b.backoff_jitter);
        let car = || Target::new("car").unwrap();
        let broker = BrokerOptions::new("127.0.0.1", 1);
        let device = with_device_backoff(DeviceOptions::new(broker.clone(), car()).broker);
        assert_eq!(
            backoff(&device),
            (
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(30)),
                Some(BackoffJitter::Full)
            )
        );
        let tuned = DeviceOptions::new(broker.clone(), car())
            .reconnect_window(Duration::from_millis(200))
            .reconnect_max(Duration::from_secs(3));
        assert_eq!(
            backoff(&with_device_backoff(tuned.broker)),
            (
                Some(Duration::from_millis(200)),
                Some(Duration::from_secs(3)),
                Some(BackoffJitter::Full)
            )
        );
        // What the broker options set is kept; a maximum below the default
        // window narrows the window too.
        let mut set = broker;
        set.backoff_max = Some(Duration::from_millis(500));
        set.backoff_jitter = Some(BackoffJitter::UpperHalf);
        assert_eq!(
            backoff(&with_device_backoff(DeviceOptions::new(set, car()).broker)),
            (
                Some(Duration::from_millis(500)),
                Some(Duration::from_millis(500)),
                Some(BackoffJitter::UpperHalf)
            )
        );
    }
    #[test]
    fn the_presence_records_list_the_groups_when_there_are_any() {
        assert_eq!(presence_record(true, &[]), r#"{"online":true}"#);
        assert_eq!(presence_record(false, &[]), r#"{"online":false}"#);
        let groups = [Group::new("lobby").unwrap(), Group::new("floor-2").unwrap()];
        let record: Value = serde_json::from_str(&presence_record(true, &groups)).unwrap();
        assert_eq!(
            record,
            json!({"online": true, "groups": ["lobby", "floor-2"]})
        );
        // What a requester reads back from it.
        let root = PresenceRoot::default();
        let car = Target::new("car").unwrap();
        let event = directcall_core::presence::parse_directcall(
            &root,
            &root.topic(&car),
            presence_record(false, &groups).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            (event.online, event.groups),
            (Some(false), Some(groups.to_vec()))
        );
    }

    /// A device named `directcall` sees every group's requests through its
    /// `directcall/#`: it runs its own groups' and a call to itself, and
    /// drops the others' without counting them; a member counts a broken
    /// group topic as malformed.
    #[tokio::test(start_paused = true)]
    async fn a_group_request_runs_as_a_request_to_the_device_and_other_groups_are_ignored() {
        let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
        let router = Router::with_state(Arc::clone(&ran)).method_with_state(
            "honk",
            |call, ran| async move {
                lock(&ran).push((call.target.clone(), call.group.clone()));
                Ok("honked")
            },
        );
        let options = DeviceOptions::new(
            BrokerOptions::new("127.0.0.1", 1),
            Target::new("directcall").unwrap(),
        )
        .group(Group::new("g1").unwrap())
        .group(Group::new("g1").unwrap());
        let (device, _connection) = idle_device_with(router.into_stateless(), options);
        assert_eq!(device.groups(), [Group::new("g1").unwrap()], "joined once");
        let shared = Arc::clone(&device.shared);
        let filters: Vec<String> = shared
            .subscriptions()
            .into_iter()
            .map(|s| s.filter)
            .collect();
        assert_eq!(filters, ["directcall/#", "directcall/groups/g1/#"]);
        let group_call = |group: &str| {
            let g = GroupTopics::new(
                Group::new(group).unwrap(),
                Method::new("honk").unwrap(),
                directcall_core::Prefix::default(),
                MessageId::new(),
            )
            .unwrap();
            let payload = json!({"id": g.id().to_string(), "request": null});
            shared.on_request(&g.request_topic(), payload.to_string().as_bytes(), None);
        };
        group_call("g1");
        group_call("g2");
        let own = CallTopics::new(
            Target::new("directcall").unwrap(),
            Method::new("honk").unwrap(),
            directcall_core::Prefix::default(),
            MessageId::new(),
        )
        .unwrap();
        let payload = json!({"id": own.id().to_string(), "request": null});
        shared.on_request(&own.request_topic(), payload.to_string().as_bytes(), None);
        for broken in [
            "directcall/groups/g1/honk",
            "directcall/groups/g1/honk/p/not-an-id",
            "directcall/groups/g2/honk",
        ] {
            shared.on_request(broken, b"{}", None);
        }
        let s = device.stats();
        assert_eq!(
            (s.received, s.executed, s.malformed, s.replied),
            (4, 2, 2, 2),
            "g2's requests are not the device's business"
        );
        let me = Target::new("directcall").unwrap();
        assert_eq!(
            *lock(&ran),
            [(me.clone(), Some(Group::new("g1").unwrap())), (me, None)]
        );
    }
}
