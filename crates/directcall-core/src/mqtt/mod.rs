//! The one MQTT connection layer the requester and the device share
//! (feature `mqtt`).
//!
//! It holds what both sides must get right and nothing either side owns:
//! rumqttc options with its traps set right (TCP_NODELAY, packet sizes,
//! clean sessions), TLS (feature `tls`) and WebSockets with a URL
//! signing hook (feature `websocket`), and the task that drives a
//! connection: it reconnects with capped, jittered backoff, subscribes again
//! on every connection, reports ready only after the essential SUBACK, and
//! owns the ready state, the last error and shutdown. No rumqttc type appears
//! in this module's public API.
//!
//! A side builds a [`Connection`], takes its [`Link`] (the cheap handle that
//! publishes and reports state) into its own state, then runs the connection
//! with that state as its [`Session`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use directcall_core::mqtt::{Connection, ConnectionOptions, Link, Message, QoS, Session, Subscription};
//! use directcall_core::BrokerOptions;
//!
//! struct Echo { link: Link }
//!
//! impl Session for Echo {
//!     fn subscriptions(&self) -> Vec<Subscription> {
//!         vec![Subscription::new("echo/in", QoS::AtLeastOnce)]
//!     }
//!     fn on_message(self: &Arc<Self>, message: Message<'_>) {
//!         self.link.publish_or_queue("echo/out", message.payload.to_vec(), QoS::AtMostOnce, false);
//!     }
//! }
//!
//! # async fn run() -> Result<(), directcall_core::mqtt::SetupError> {
//! let connection = Connection::new(ConnectionOptions::new(BrokerOptions::new("127.0.0.1", 1883), "echo-1"))?;
//! let session = Arc::new(Echo { link: connection.link() });
//! let driver = connection.run(session);
//! driver.link().wait_ready(std::time::Duration::from_secs(5)).await;
//! driver.stop().await;
//! # Ok(()) }
//! ```

mod driver;
mod error;
pub(crate) mod options;
#[cfg(feature = "tls")]
pub mod tls;
mod transport;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::broker::{BrokerOptions, MqttVersion};
use transport::{Client, Deferred, Endpoints, Events};

pub use error::{ConnectionError, PublishError, SetupError};

/// Room in the request channel beyond what a side asks for: presence
/// records, subscriptions and the DISCONNECT never wait behind calls.
const CHANNEL_SLACK: usize = 64;

/// Delivery guarantee of a publish or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum QoS {
    /// At most once: never queued, never repeated.
    #[default]
    AtMostOnce,
    /// At least once: acknowledged by the broker, repeated until it is.
    AtLeastOnce,
}

impl QoS {
    /// `0` or `1`, as MQTT numbers them.
    pub fn level(self) -> u8 {
        match self {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
        }
    }

    /// The QoS of level `0` or `1`; `None` for any other number (QoS 2 is
    /// not used: AWS IoT Core does not support it).
    pub fn from_level(level: u8) -> Option<Self> {
        match level {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            _ => None,
        }
    }

    pub(crate) fn to_rumqttc(self) -> rumqttc::QoS {
        match self {
            QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
            QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        }
    }
}

/// One topic filter to subscribe to on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subscription {
    /// The filter, e.g. `VIN123/#`.
    pub filter: String,
    /// The most the broker may deliver at.
    pub qos: QoS,
}

impl Subscription {
    /// A subscription to `filter` at `qos`.
    pub fn new(filter: impl Into<String>, qos: QoS) -> Self {
        Subscription {
            filter: filter.into(),
            qos,
        }
    }
}

/// A message the broker publishes when the connection dies without a
/// DISCONNECT (MQTT's last will).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Will {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its QoS.
    pub qos: QoS,
    /// Whether the broker retains it.
    pub retain: bool,
}

impl Will {
    /// A will on `topic` with `payload`.
    pub fn new(
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        qos: QoS,
        retain: bool,
    ) -> Self {
        Will {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
        }
    }
}

/// One incoming message, borrowed from the connection's buffer.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Message<'a> {
    /// The topic it was published on.
    pub topic: &'a str,
    /// Its payload.
    pub payload: &'a [u8],
    /// Its MQTT 5 properties (`None` on 3.1.1, or when it carried none).
    pub properties: Option<&'a Properties>,
}

/// The MQTT 5 properties of a publish that directcall reads or writes.
/// Ignored on a 3.1.1 connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Properties {
    /// Message Expiry Interval: the broker discards the message if it cannot
    /// deliver it within this many seconds.
    pub message_expiry_secs: Option<u32>,
    /// Response Topic: where the receiver should answer.
    pub response_topic: Option<String>,
    /// Correlation Data: returned unchanged with the answer.
    pub correlation_data: Option<Vec<u8>>,
    /// User properties, in order (`traceparent`, ...).
    pub user_properties: Vec<(String, String)>,
}

impl Properties {
    /// The value of the first user property named `name`.
    pub fn user_property(&self, name: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Signs the URL of a WebSocket connection anew on every connection attempt:
/// presigned URLs expire (AWS IoT Core's SigV4 URLs after minutes), so a URL
/// signed once would fail the first reconnect after that.
///
/// directcall-cloud implements it for AWS IoT Core (`AwsSigV4`).
pub trait UrlSigner: std::fmt::Debug + Send + Sync + 'static {
    /// `url` (`wss://host/path`, no query) with its signature added.
    ///
    /// # Errors
    /// When it cannot be signed now; the attempt then goes out unsigned and
    /// the broker refuses it, which the connection reports as its last error.
    fn sign(&self, url: &str) -> Result<String, Box<dyn std::error::Error + Send + Sync>>;
}

/// What one side does with its connection's events. Every method is called
/// from the driver task and must return quickly: never await user code or a
/// full channel here (spawn instead).
pub trait Session: Send + Sync + 'static {
    /// The filters to subscribe to on every connection. The first is
    /// essential: the link is ready once the broker grants it. The others
    /// are optional and asked for in a SUBSCRIBE of their own afterwards, so
    /// a broker that closes the connection over one of them (AWS IoT Core
    /// does, for a filter the policy denies) cannot take the essential one
    /// down with it.
    fn subscriptions(&self) -> Vec<Subscription>;

    /// A connection was made (CONNACK), before its subscriptions are granted.
    fn on_connected(&self) {}

    /// The essential subscription was granted: the link is ready.
    fn on_ready(&self) {}

    /// A message arrived.
    fn on_message(self: &Arc<Self>, message: Message<'_>);

    /// The connection failed or was lost.
    fn on_disconnected(&self, _error: &ConnectionError) {}

    /// The driver is stopping, before it sends DISCONNECT: the last chance to
    /// publish (an offline presence record, say).
    fn on_stopping(&self) {}

    /// MQTT 5, with [`ConnectionOptions::track_acks`]: the broker answered
    /// the QoS 1 publish to `topic` made with [`Link::publish_with`] with a
    /// PUBACK reason code other than success: `0x10` no matching
    /// subscribers, `0x87` not authorized, `0x97` quota exceeded, ...
    fn on_publish_refused(&self, _topic: &str, _reason: u8) {}
}

/// How to open one connection.
#[derive(Clone)]
#[non_exhaustive]
pub struct ConnectionOptions {
    /// Where and how.
    pub broker: BrokerOptions,
    /// The MQTT client id.
    pub client_id: String,
    /// The last will, if any.
    pub will: Option<Will>,
    /// Requests that may wait to be written at once (default 1024); size it
    /// for the calls a side keeps in flight.
    pub capacity: usize,
    /// Signs WebSocket URLs on every attempt (default: none).
    pub url_signer: Option<Arc<dyn UrlSigner>>,
    /// Find out, on every connection, whether the broker refuses topics
    /// containing `.` (NATS does, and closes the whole connection over a
    /// publish to one), with a dotted subscription under the essential
    /// filter's first level; read the answer with [`Link::refuses_dots`].
    /// Default: off.
    pub probe_dots: bool,
    /// Keep the session this long after a disconnect (MQTT 5 Session Expiry
    /// Interval; on 3.1.1 a session without clean-session, kept as long as
    /// the broker keeps such sessions): subscriptions and QoS 1 messages
    /// sent meanwhile wait for the next connection. Default: `None`, a clean
    /// session each time.
    pub session_expiry: Option<Duration>,
    /// MQTT 5: match each PUBACK to the QoS 1 publish it acknowledges and
    /// report refusals to [`Session::on_publish_refused`]. Default: off.
    pub track_acks: bool,
    /// Ping the broker when a publish has had no packet back for
    /// [`SILENCE_BEFORE_PING`](crate::broker::SILENCE_BEFORE_PING), and take
    /// the connection for lost without an answer within the broker's
    /// `ping_timeout`: for a side that expects an answer to what it
    /// publishes (a requester). Default: off (pings at the keepalive only).
    pub ping_after_silence: bool,
}

impl std::fmt::Debug for ConnectionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionOptions")
            .field("broker", &self.broker)
            .field("client_id", &self.client_id)
            .field("will", &self.will.as_ref().map(|w| &w.topic))
            .field("capacity", &self.capacity)
            .field("url_signer", &self.url_signer.is_some())
            .field("probe_dots", &self.probe_dots)
            .field("session_expiry", &self.session_expiry)
            .field("track_acks", &self.track_acks)
            .field("ping_after_silence", &self.ping_after_silence)
            .finish()
    }
}

impl ConnectionOptions {
    /// A connection to `broker` as `client_id`, with no will, room for 1024
    /// queued requests and no URL signer.
    pub fn new(broker: BrokerOptions, client_id: impl Into<String>) -> Self {
        ConnectionOptions {
            broker,
            client_id: client_id.into(),
            will: None,
            capacity: 1024,
            url_signer: None,
            probe_dots: false,
            session_expiry: None,
            track_acks: false,
            ping_after_silence: false,
        }
    }

    /// Keep the session `expiry` after a disconnect (default: a clean
    /// session each time); see [`ConnectionOptions::session_expiry`].
    pub fn session_expiry(mut self, expiry: Duration) -> Self {
        self.session_expiry = Some(expiry);
        self
    }

    /// Report refused QoS 1 publishes (MQTT 5; default: off); see
    /// [`ConnectionOptions::track_acks`].
    pub fn track_acks(mut self) -> Self {
        self.track_acks = true;
        self
    }

    /// The last will (default: none).
    pub fn will(mut self, will: Will) -> Self {
        self.will = Some(will);
        self
    }

    /// Room in the request queue (default 1024).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Sign WebSocket URLs with `signer` on every connection attempt.
    pub fn url_signer(mut self, signer: Arc<dyn UrlSigner>) -> Self {
        self.url_signer = Some(signer);
        self
    }

    /// Find out whether the broker refuses topics containing `.` (default:
    /// off); see [`ConnectionOptions::probe_dots`].
    pub fn probe_dots(mut self) -> Self {
        self.probe_dots = true;
        self
    }

    /// Ping the broker when a publish has had nothing back for a while
    /// (default: off); see [`ConnectionOptions::ping_after_silence`].
    pub fn ping_after_silence(mut self) -> Self {
        self.ping_after_silence = true;
        self
    }
}

/// A client id made unique per process: `{base}-` and 12 random hex digits.
/// A second connection with the same id would push the first off the broker
/// (and AWS IoT Core allows one CONNECT per second per id).
pub fn unique_client_id(base: &str) -> String {
    format!("{base}-{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

/// What a [`Link`] asks of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Control {
    Stop,
    Reconnect,
    Subscribe(Subscription),
    Unsubscribe(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the driver and every [`Link`].
#[derive(Debug)]
struct LinkState {
    ready: watch::Sender<bool>,
    /// Stop and reconnect requests for the driver: a channel, so that the
    /// driver's wait on them between two packets costs next to nothing.
    control: mpsc::UnboundedSender<Control>,
    stopping: AtomicBool,
    last_error: Mutex<Option<ConnectionError>>,
    connects: AtomicU64,
    /// PUBLISH packets the client has written to the connection.
    written: AtomicU64,
    client_id: String,
    /// Every endpoint's URL, and the one in use (or being tried).
    urls: Vec<String>,
    current: AtomicUsize,
    /// 0 unknown, 1 dots accepted, 2 dots refused.
    dots: AtomicU8,
    max_packet_bytes: usize,
    version: MqttVersion,
    /// With `track_acks` on MQTT 5: the QoS 1 publishes queued and not yet
    /// written, in queue order (the topic of a tracked one, `None` for
    /// another), so the driver can tell which publish a packet id is.
    unwritten: Option<Mutex<VecDeque<Option<String>>>>,
}

/// A connection that is built but not yet driven. Take its [`Link`] into the
/// session, then [`Connection::run`] it.
pub struct Connection {
    client: Client,
    eventloop: Events,
    endpoints: Endpoints,
    control: mpsc::UnboundedReceiver<Control>,
    state: Arc<LinkState>,
    backoff: crate::broker::Backoff,
    probe_dots: bool,
    fresh_client_id_on_failover: bool,
    ping_timeout: std::time::Duration,
    ping_after_silence: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("client_id", &self.state.client_id)
            .field("broker", &self.state.urls)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Builds the connection; nothing touches the network until
    /// [`Connection::run`].
    ///
    /// # Errors
    /// [`SetupError`] when the TLS material is unusable or the transport
    /// needs a feature that is not compiled in.
    pub fn new(options: ConnectionOptions) -> Result<Self, SetupError> {
        let (endpoints, network) = options::all_endpoints(&options)?;
        let capacity = options.capacity.saturating_add(CHANNEL_SLACK);
        let (client, eventloop) = match &endpoints {
            Endpoints::V4(all) => {
                let (client, mut eventloop) = rumqttc::AsyncClient::new(all[0].clone(), capacity);
                eventloop.set_network_options(network);
                (Client::V4(client), Events::V4(Box::new(eventloop)))
            }
            Endpoints::V5(all) => {
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(all[0].clone(), capacity);
                (Client::V5(client), Events::V5(Box::new(eventloop)))
            }
        };
        let broker = &options.broker;
        let track = options.track_acks && broker.mqtt_version == MqttVersion::V5;
        let (control_tx, control) = mpsc::unbounded_channel();
        Ok(Connection {
            client,
            eventloop,
            endpoints,
            control,
            backoff: crate::broker::Backoff::of(broker),
            probe_dots: options.probe_dots,
            fresh_client_id_on_failover: broker.fresh_client_id_on_failover,
            ping_timeout: broker.ping_timeout,
            ping_after_silence: options.ping_after_silence,
            state: Arc::new(LinkState {
                ready: watch::Sender::new(false),
                control: control_tx,
                stopping: AtomicBool::new(false),
                last_error: Mutex::new(None),
                connects: AtomicU64::new(0),
                written: AtomicU64::new(0),
                client_id: options.client_id,
                urls: broker.endpoints.iter().map(|e| e.url()).collect(),
                current: AtomicUsize::new(0),
                dots: AtomicU8::new(0),
                max_packet_bytes: broker.max_packet_bytes,
                version: broker.mqtt_version,
                unwritten: track.then(|| Mutex::new(VecDeque::new())),
            }),
        })
    }

    /// The handle that publishes on this connection and reports its state.
    pub fn link(&self) -> Link {
        Link {
            client: self.client.clone(),
            state: Arc::clone(&self.state),
        }
    }

    /// Spawns the task that drives the connection for `session`, until
    /// [`Driver::stop`] or [`Link::stop`].
    pub fn run<S: Session>(self, session: Arc<S>) -> Driver {
        let link = self.link();
        let task = tokio::spawn(driver::drive(
            session,
            driver::Parts {
                eventloop: self.eventloop,
                endpoints: self.endpoints,
                control: self.control,
                backoff: self.backoff,
                probe_dots: self.probe_dots,
                fresh_client_id_on_failover: self.fresh_client_id_on_failover,
                liveness: driver::Liveness::new(
                    self.ping_timeout,
                    self.ping_after_silence
                        .then_some(crate::broker::SILENCE_BEFORE_PING),
                ),
            },
            link.clone(),
        ));
        Driver { link, task }
    }
}

/// A cheap, cloneable handle on a running connection: publish, and read or
/// wait for its state.
#[derive(Clone)]
pub struct Link {
    client: Client,
    state: Arc<LinkState>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("client_id", &self.state.client_id)
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// What became of a publish [`Link::try_enqueue`] tried to queue.
enum Enqueued {
    Queued,
    /// The queue was full; the publish may wait for room.
    Full(Deferred),
    /// The queue was full and the publish is tracked: not to wait.
    Dropped,
}

impl Link {
    /// Queues a publish without waiting.
    ///
    /// # Errors
    /// [`PublishError`] when the request queue is full, the connection has
    /// ended, or the topic is not a valid MQTT topic name.
    pub fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), PublishError> {
        self.publish_with(topic, payload, qos, retain, None)
    }

    /// Queues a publish with MQTT 5 `properties` (dropped on 3.1.1) without
    /// waiting. With [`ConnectionOptions::track_acks`], a refusal of a QoS 1
    /// publish made here reaches [`Session::on_publish_refused`].
    ///
    /// # Errors
    /// [`PublishError`] when the request queue is full, the connection has
    /// ended, or the topic is not a valid MQTT topic name.
    pub fn publish_with(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        qos: QoS,
        retain: bool,
        properties: Option<&Properties>,
    ) -> Result<(), PublishError> {
        match self.try_enqueue(topic.into(), payload.into(), qos, retain, properties, true) {
            Enqueued::Queued => Ok(()),
            Enqueued::Full(_) | Enqueued::Dropped => Err(PublishError::NotQueued),
        }
    }

    /// Queues a publish without waiting. When this link tracks QoS 1 acks,
    /// the publish is noted (its topic, if `note_topic`) under the same
    /// lock as it is queued, so that the noted order is the queue's.
    fn try_enqueue(
        &self,
        topic: String,
        payload: Vec<u8>,
        qos: QoS,
        retain: bool,
        properties: Option<&Properties>,
        note_topic: bool,
    ) -> Enqueued {
        let Some(unwritten) = self.tracked(qos) else {
            return match self
                .client
                .try_publish(topic, payload, qos, retain, properties)
            {
                Ok(()) => Enqueued::Queued,
                Err(deferred) => Enqueued::Full(deferred),
            };
        };
        let mut unwritten = lock(unwritten);
        unwritten.push_back(note_topic.then(|| topic.clone()));
        match self
            .client
            .try_publish(topic, payload, qos, retain, properties)
        {
            Ok(()) => Enqueued::Queued,
            Err(_) => {
                unwritten.pop_back();
                Enqueued::Dropped
            }
        }
    }

    /// The queue of unwritten QoS 1 publishes, when this link tracks them.
    fn tracked(&self, qos: QoS) -> Option<&Mutex<VecDeque<Option<String>>>> {
        match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => self.state.unwritten.as_ref(),
        }
    }

    /// Queues a publish and never fails or blocks the caller: when the queue
    /// is full, a task waits for room (from the driver, awaiting the queue
    /// would deadlock: rumqttc issues 263 and 1025).
    pub fn publish_or_queue(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        qos: QoS,
        retain: bool,
    ) {
        self.publish_or_queue_with(topic, payload, qos, retain, None);
    }

    /// [`Link::publish_or_queue`] with MQTT 5 `properties` (dropped on
    /// 3.1.1).
    pub fn publish_or_queue_with(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        qos: QoS,
        retain: bool,
        properties: Option<&Properties>,
    ) {
        match self.try_enqueue(topic.into(), payload.into(), qos, retain, properties, false) {
            Enqueued::Queued => {}
            // Waiting for room would queue it out of the noted order:
            // dropped instead (a full queue of a link that tracks acks
            // means calls are failing anyway).
            Enqueued::Dropped => {
                tracing::warn!("request queue full: a QoS 1 publish was dropped");
            }
            Enqueued::Full(Deferred::Refused) => {}
            Enqueued::Full(deferred) => {
                let client = self.client.clone();
                tokio::spawn(async move { client.publish_deferred(deferred).await });
            }
        }
    }

    /// The MQTT version this link speaks.
    pub fn mqtt_version(&self) -> MqttVersion {
        self.state.version
    }

    /// Whether the connection is up and its essential subscription granted.
    pub fn is_ready(&self) -> bool {
        *self.state.ready.borrow()
    }

    /// Waits until the link is ready, at most `timeout`; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.state.ready.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// A future that resolves whenever readiness changes (for gauges and
    /// health endpoints); `None` once the driver has ended.
    pub fn watch_ready(&self) -> impl Future<Output = Option<bool>> + Send + 'static {
        let mut rx = self.state.ready.subscribe();
        async move { rx.changed().await.ok().map(|()| *rx.borrow()) }
    }

    /// Why the connection last failed, if it ever did.
    pub fn last_error(&self) -> Option<ConnectionError> {
        self.state
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connections made so far (CONNACKs received).
    pub fn connects(&self) -> u64 {
        self.state.connects.load(Relaxed)
    }

    /// PUBLISH packets the MQTT client has taken from its queue and
    /// written to the connection, over every connection so far. What was
    /// handed to [`publish`](Self::publish) and is not written yet waits in
    /// the client's queue (a burst faster than the connection writes).
    pub fn written(&self) -> u64 {
        self.state.written.load(Relaxed)
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> &str {
        &self.state.client_id
    }

    /// The broker endpoint in use (or being tried), as a URL without
    /// credentials or query.
    pub fn broker_url(&self) -> String {
        self.state.urls[self.state.current.load(Relaxed) % self.state.urls.len()].clone()
    }

    /// Whether the connected broker refuses topics containing `.` (known
    /// only with [`ConnectionOptions::probe_dots`], once the probe was
    /// answered; `false` while unknown).
    pub fn refuses_dots(&self) -> bool {
        self.state.dots.load(Relaxed) == 2
    }

    /// The largest packet this side sends.
    pub fn max_packet_bytes(&self) -> usize {
        self.state.max_packet_bytes
    }

    /// Asks the driver to stop: it calls [`Session::on_stopping`], sends
    /// DISCONNECT and ends. Returns at once.
    pub fn stop(&self) {
        if !self.state.stopping.swap(true, Relaxed) {
            // Gone only when the driver has ended already.
            let _ = self.state.control.send(Control::Stop);
        }
    }

    /// Adds `subscription` to this connection's, after the session's own:
    /// asked for now if the connection is ready, and again on every
    /// connection until [`Link::unsubscribe`]. Like the session's optional
    /// subscriptions, a refusal is logged and the connection goes on
    /// without it. Asking twice for one filter is asking once.
    pub fn subscribe(&self, subscription: Subscription) {
        let _ = self.state.control.send(Control::Subscribe(subscription));
    }

    /// Removes a filter added with [`Link::subscribe`]: unsubscribed now
    /// if connected, and not asked for again.
    pub fn unsubscribe(&self, filter: impl Into<String>) {
        let _ = self.state.control.send(Control::Unsubscribe(filter.into()));
    }

    /// Drops the connection and makes a new one at once, whatever state it
    /// is in: for a process that was frozen (a Lambda execution environment)
    /// and cannot trust a socket that sent no keepalive meanwhile. Requests
    /// queued and not yet written are dropped. Not ready from this call
    /// until the new connection's essential subscription is granted, so a
    /// call made meanwhile waits for the new connection, not the old one.
    pub fn reconnect(&self) {
        self.set_ready(false);
        let _ = self.state.control.send(Control::Reconnect);
    }

    /// Whether a stop was asked for.
    pub fn is_stopping(&self) -> bool {
        self.state.stopping.load(Relaxed)
    }

    fn set_ready(&self, ready: bool) {
        self.state.ready.send_if_modified(|r| {
            let changed = *r != ready;
            *r = ready;
            changed
        });
    }

    fn set_error(&self, error: ConnectionError) {
        *self
            .state
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
}

/// The running connection task.
#[derive(Debug)]
pub struct Driver {
    link: Link,
    task: JoinHandle<()>,
}

impl Driver {
    /// The connection's link.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Stops cleanly (see [`Link::stop`]) and waits for the task to end.
    pub async fn stop(self) {
        self.link.stop();
        let _ = self.task.await;
    }

    /// Drops the connection without DISCONNECT, as a crash or a lost network
    /// would: the broker then publishes the last will.
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
        self.link.set_ready(false);
    }
}
