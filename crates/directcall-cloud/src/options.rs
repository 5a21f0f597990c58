use std::time::Duration;

use directcall_core::mqtt::QoS;
use directcall_core::pending::DEFAULT_RECENT_CAPACITY;
use directcall_core::{BrokerOptions, Prefix, PresenceRoot};

/// Default deadline of a call that names none (the AWS sample's 10 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest number of calls in flight at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16_384;
/// Default QoS of the requester's reply subscription: 0. Replies go to a
/// clean-session requester, which loses whatever was in flight when its
/// connection drops whatever the QoS; QoS 1 would only add an acknowledgement
/// per reply (and AWS IoT Core's 100 unacknowledged QoS 1 messages per
/// connection would cap the calls in flight).
pub const DEFAULT_REPLY_QOS: QoS = QoS::AtMostOnce;
/// Default time [`Requester::connect`](crate::Requester::connect) waits to be ready.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a requester learns which devices are online.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum PresenceSource {
    /// directcall's retained `{"online": bool}` records under a root
    /// (default `directcall/presence`), kept by devices and their last wills.
    Directcall(PresenceRoot),
    /// AWS IoT Core's lifecycle events, `$aws/events/presence/+/+`.
    AwsLifecycle,
}

/// How a [`Requester`](crate::Requester) connects and behaves: a builder
/// whose setters consume and return it, each stating its default.
///
/// ```no_run
/// use std::time::Duration;
/// use directcall_cloud::{BrokerOptions, MqttVersion, Options, PresenceRoot, RecordOptions, Requester};
///
/// # async fn run() -> Result<(), directcall_cloud::Error> {
/// let broker = BrokerOptions::from_url("mqtts://broker.example.com:8883")?
///     .mqtt_version(MqttVersion::V5);
/// let options = Options::new(broker)
///     .client_id("billing-service-1")
///     .max_in_flight(10_000)
///     .presence(PresenceRoot::default())
///     .record_calls(RecordOptions::new(Duration::from_secs(600), 100_000));
/// let requester = Requester::connect(options).await?;
/// # drop(requester);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Options {
    pub(crate) broker: BrokerOptions,
    pub(crate) client_id: Option<String>,
    pub(crate) client_id_prefix: Option<String>,
    pub(crate) prefix: Prefix,
    pub(crate) shared_prefix: bool,
    /// 12 random hex digits, made once per `Options`: the per-instance part
    /// of the reply prefix and of the default client id.
    pub(crate) instance: String,
    /// `None`: 0 on MQTT 3.1.1, 1 on MQTT 5.
    pub(crate) request_qos: Option<QoS>,
    pub(crate) reply_qos: QoS,
    pub(crate) max_in_flight: usize,
    pub(crate) ready_timeout: Duration,
    pub(crate) recent_capacity: usize,
    pub(crate) presence: Option<PresenceSource>,
    pub(crate) mirror_presence: Option<PresenceRoot>,
    pub(crate) strict_presence: bool,
    pub(crate) records: Option<crate::RecordOptions>,
    pub(crate) receipts: bool,
    pub(crate) store: Option<String>,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) store_ca: Option<Vec<u8>>,
    #[cfg(feature = "websocket")]
    pub(crate) url_signer: Option<std::sync::Arc<dyn directcall_core::mqtt::UrlSigner>>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Options");
        d.field("broker", &self.broker)
            .field("client_id", &self.client_id)
            .field("client_id_prefix", &self.client_id_prefix)
            .field("prefix", &self.prefix)
            .field("shared_prefix", &self.shared_prefix)
            .field("instance", &self.instance)
            .field("request_qos", &self.request_qos)
            .field("reply_qos", &self.reply_qos)
            .field("max_in_flight", &self.max_in_flight)
            .field("ready_timeout", &self.ready_timeout)
            .field("recent_capacity", &self.recent_capacity)
            .field("presence", &self.presence)
            .field("mirror_presence", &self.mirror_presence)
            .field("strict_presence", &self.strict_presence)
            .field("records", &self.records)
            .field("receipts", &self.receipts)
            // Never the password a store URL may carry.
            .field("store", &self.store.as_deref().map(crate::store::redacted));
        #[cfg(feature = "websocket")]
        d.field("url_signer", &self.url_signer.is_some());
        d.finish()
    }
}

impl Options {
    /// Options for `broker`, every other setting at its default.
    pub fn new(broker: BrokerOptions) -> Self {
        Options {
            broker,
            client_id: None,
            client_id_prefix: None,
            prefix: Prefix::default(),
            shared_prefix: false,
            instance: format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff),
            request_qos: None,
            reply_qos: DEFAULT_REPLY_QOS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            recent_capacity: DEFAULT_RECENT_CAPACITY,
            presence: None,
            mirror_presence: None,
            strict_presence: false,
            records: None,
            receipts: false,
            store: None,
            store_ca: None,
            #[cfg(feature = "websocket")]
            url_signer: None,
        }
    }

    /// Keep a record of every published call ([`crate::CallRecord`]): its
    /// state, and the device's answer even when it came after the deadline
    /// (`answered_late`), for [`Requester::call_record`](crate::Requester::call_record).
    /// Default: no records.
    pub fn record_calls(mut self, records: crate::RecordOptions) -> Self {
        self.records = Some(records);
        self
    }

    /// How calls are recorded, if they are.
    pub fn get_record_calls(&self) -> Option<crate::RecordOptions> {
        self.records
    }

    /// Ask devices for a delivery receipt with every request (a protocol
    /// extension, PROTOCOL.md "Delivery receipts"): a directcall device
    /// acknowledges a request before its handler runs, and the call's
    /// record moves to `delivered`, so a timeout can tell "delivered, no
    /// answer" from "no sign of delivery". Devices that do not know the
    /// extension (the AWS sample's) ignore it. Costs one more message per call.
    /// Default: off.
    pub fn delivery_receipts(mut self, ask: bool) -> Self {
        self.receipts = ask;
        self
    }

    /// Whether requests ask for delivery receipts.
    pub fn get_delivery_receipts(&self) -> bool {
        self.receipts
    }

    /// Share call records and idempotency keys with every requester using
    /// the same Redis (`redis://host:port/db`, or `rediss://` over TLS,
    /// verified against the system's roots or
    /// [`redis_store_ca`](Self::redis_store_ca)), or the master that Redis
    /// Sentinels name
    /// (`redis+sentinel://[:password@]host:26379[,host:26379...]/NAME[/db]`,
    /// `rediss+sentinel://` over TLS; the password is the master's), followed
    /// through a failover: gateway replicas and Lambda
    /// instances then answer for each other's calls
    /// ([`Requester::fetch_call_record`](crate::Requester::fetch_call_record)),
    /// and a retry with a key through any of them joins the first call.
    /// Turns call records on (with their defaults) if they are off. Each
    /// requester still keeps its own records in memory and writes the store
    /// behind them. Default: none.
    #[cfg(feature = "redis")]
    pub fn redis_store(mut self, url: impl Into<String>) -> Self {
        self.store = Some(url.into());
        if self.records.is_none() {
            self.records = Some(crate::RecordOptions::default());
        }
        self
    }

    /// For a `rediss://` or `rediss+sentinel://` store (Redis over TLS): the
    /// CA (PEM) the servers' (and sentinels') certificates must chain to,
    /// instead of the system's roots. Default: the system's roots.
    #[cfg(feature = "redis")]
    pub fn redis_store_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.store_ca = Some(pem.into());
        self
    }

    /// The shared store's URL, if any.
    pub fn get_store(&self) -> Option<&str> {
        self.store.as_deref()
    }

    /// The MQTT client id, exactly. Default: `{prefix}-{instance}`, which is
    /// also the reply prefix unless [`Options::shared_prefix`] (a second
    /// connection with the same id would push the first one off the broker).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Client id `{base}-{instance}`, with the same 12 random hex digits as
    /// the reply prefix: with `base` equal to the prefix (as the SAM template
    /// sets it), the client id *is* the reply prefix, and an AWS IoT policy
    /// can confine each instance to its own replies with `${iot:ClientId}`.
    /// Default: the reply prefix.
    pub fn client_id_prefix(mut self, base: impl Into<String>) -> Self {
        self.client_id_prefix = Some(base.into());
        self
    }

    /// The requester's base prefix (default `invocation_client`). Replies
    /// come back on `{prefix}-{instance}/+/+/+/ack`, where `instance` is 12
    /// random hex digits of this requester's own, so that each instance (a
    /// gateway replica, a warm Lambda) receives only the replies to its own
    /// calls; see [`Options::shared_prefix`].
    pub fn prefix(mut self, prefix: Prefix) -> Self {
        self.prefix = prefix;
        self
    }

    /// Replies come back under the prefix itself, `{prefix}/+/+/+/ack`, as in
    /// the AWS sample: every requester sharing the prefix then receives every reply
    /// under it and drops the ones it did not ask for (counted as
    /// `dropped_unknown`). For brokers or policies that allow exactly one
    /// prefix. Default: a per-instance prefix.
    pub fn shared_prefix(mut self) -> Self {
        self.shared_prefix = true;
        self
    }

    /// QoS of request publishes. Default on MQTT 3.1.1: 0, at most once (a
    /// request is never queued for a device that comes back later). Default
    /// on MQTT 5: 1, so that the broker's PUBACK says at once when no device
    /// is subscribed ([`Error::NoSubscriber`](crate::Error::NoSubscriber)),
    /// except to a target that answered within the last 10 s, whose
    /// requests go at 0: it has a subscriber, and the PUBACK round costs the
    /// broker and the requester a message per call (about a quarter of the
    /// calls/s at 128 in flight, docs/PERFORMANCE.md). Setting a QoS here
    /// uses it for every request. The request's Message Expiry Interval
    /// keeps it from reaching a device after its deadline.
    pub fn request_qos(mut self, qos: QoS) -> Self {
        self.request_qos = Some(qos);
        self
    }

    /// QoS of the reply subscription (default [`DEFAULT_REPLY_QOS`]). A
    /// broker delivers at the lower of the publish and subscription QoS, so
    /// this caps the reply leg whatever QoS devices publish at (the AWS sample's
    /// devices publish at 1). See PERFORMANCE.md for the measurements behind
    /// the default.
    pub fn reply_qos(mut self, qos: QoS) -> Self {
        self.reply_qos = qos;
        self
    }

    /// Largest number of calls in flight at once (default 16384); further
    /// calls wait for a slot within their own deadline.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// How long [`Requester::connect`](crate::Requester::connect) waits for the
    /// connection and subscription (default 10 s).
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.ready_timeout = d;
        self
    }

    /// How many ended calls are remembered to tell late and duplicate replies
    /// from unknown ones (default 4096).
    pub fn recent_capacity(mut self, n: usize) -> Self {
        self.recent_capacity = n;
        self
    }

    /// Track device presence under `root` (PROTOCOL.md, "Presence"): a call
    /// to a target whose last record says `{"online": false}` fails at once
    /// with [`Error::Offline`](crate::Error::Offline); a target with no record
    /// is tried as usual (unless [`Options::strict_presence`]). The last
    /// record to arrive wins, whatever its `timestamp`: a record is its
    /// topic's retained state. Default: off.
    pub fn presence(mut self, root: PresenceRoot) -> Self {
        self.presence = Some(PresenceSource::Directcall(root));
        self
    }

    /// Track presence through AWS IoT Core's lifecycle events instead
    /// (`$aws/events/presence/connected/+` and `disconnected/+`; the
    /// requester's policy must allow subscribing to them). Events that arrive
    /// out of order are ignored by their timestamps (the broker's clock), and
    /// so are records mirrored from them ([`Options::mirror_presence`]).
    /// Default: off.
    pub fn aws_presence(mut self) -> Self {
        self.presence = Some(PresenceSource::AwsLifecycle);
        self
    }

    /// With AWS lifecycle presence, also keep a retained record
    /// `{"online": bool, "timestamp": ms}` under `root` for every lifecycle
    /// event seen, and read those records: lifecycle events are not
    /// retained, so without this a replica started after a device
    /// disconnected would not know it is offline. Every replica mirrors
    /// every event (one retained publish each; presence events are rare).
    /// Needs publish and subscribe rights on `{root}/+`. Default: off.
    pub fn mirror_presence(mut self, root: PresenceRoot) -> Self {
        self.mirror_presence = Some(root);
        self
    }

    /// Strict presence: a call to a target with **no** presence record
    /// fails at once with [`Error::UnknownTarget`](crate::Error::UnknownTarget)
    /// (HTTP 404 `unknown_device`), nothing published, instead of waiting
    /// out its deadline for a device that was never seen. For fleets whose
    /// every device keeps a record (a directcall device with
    /// `DeviceOptions::presence`, or a retained `{"online": true}` and a
    /// last will of its own). Needs records to read: [`Options::presence`],
    /// or [`Options::aws_presence`] with [`Options::mirror_presence`]
    /// (lifecycle events alone are not retained, so a device connected
    /// before the requester started would look unknown); else
    /// [`Requester::start`](crate::Requester::start) fails with
    /// [`Error::Config`](crate::Error::Config).
    ///
    /// The retained records arrive shortly after each connection, so the
    /// requester is strict only once it has them all: after every
    /// connection it publishes a marker (`{"snapshot": "<prefix>"}`, not
    /// retained) to `{root}/{reply prefix}` and waits for it to come back,
    /// which the broker sends after every retained record of the
    /// subscription. Until then an unknown target is tried as usual, and
    /// [`Stats::presence_snapshot`](crate::Stats::presence_snapshot) is
    /// false. So the requester needs publish rights on `{root}/+` (the ACL
    /// and policies in `deploy/` give them). Default: off.
    pub fn strict_presence(mut self, strict: bool) -> Self {
        self.strict_presence = strict;
        self
    }

    /// Whether presence is strict.
    pub fn get_strict_presence(&self) -> bool {
        self.strict_presence
    }

    /// Sign the WebSocket URL with `signer` on every connection attempt
    /// (feature `websocket`; AWS IoT Core's SigV4 signer is
    /// [`AwsSigV4`](crate::sigv4::AwsSigV4), feature `sigv4`). Default: none.
    #[cfg(feature = "websocket")]
    pub fn url_signer(
        mut self,
        signer: std::sync::Arc<dyn directcall_core::mqtt::UrlSigner>,
    ) -> Self {
        self.url_signer = Some(signer);
        self
    }

    /// The broker settings.
    pub fn get_broker(&self) -> &BrokerOptions {
        &self.broker
    }

    /// The base prefix.
    pub fn get_prefix(&self) -> &Prefix {
        &self.prefix
    }

    /// The prefix replies come back under: `{prefix}-{instance}`, or the
    /// prefix itself with [`Options::shared_prefix`].
    ///
    /// # Errors
    /// [`directcall_core::Error::Invalid`] for `prefix` when the instance part makes it
    /// longer than a topic level may be.
    pub fn get_reply_prefix(&self) -> Result<Prefix, directcall_core::Error> {
        if self.shared_prefix {
            Ok(self.prefix.clone())
        } else {
            Prefix::new(format!("{}-{}", self.prefix, self.instance))
        }
    }

    /// The MQTT client id the requester will use.
    pub fn get_client_id(&self) -> String {
        match (&self.client_id, &self.client_id_prefix) {
            (Some(id), _) => id.clone(),
            (None, Some(base)) => format!("{base}-{}", self.instance),
            // Unique per instance even with a shared prefix: a second
            // connection with the same id would push the first off.
            (None, None) => format!("{}-{}", self.prefix, self.instance),
        }
    }
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_store_password() {
        let options = Options::new(BrokerOptions::new("127.0.0.1", 1883))
            .redis_store("redis://:st0re-secret@cache:6379/0");
        let shown = format!("{options:?}");
        assert!(shown.contains("redis://cache:6379/0"), "{shown}");
        assert!(!shown.contains("st0re-secret"), "{shown}");
    }
}
