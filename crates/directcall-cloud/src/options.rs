use std::time::Duration;

use directcall_core::pending::DEFAULT_RECENT_CAPACITY;
use directcall_core::{BrokerOptions, Prefix, PresenceRoot};

/// Default deadline of a call that names none (the seed's 10 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest number of calls in flight at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16_384;
/// Default time [`Requester::connect`](crate::Requester::connect) waits to be ready.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Delivery guarantee of request publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RequestQos {
    /// At most once (default): a request is never queued for later.
    #[default]
    AtMostOnce,
    /// At least once: the broker acknowledges each request.
    AtLeastOnce,
}

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
#[derive(Debug, Clone)]
pub struct Options {
    pub(crate) broker: BrokerOptions,
    pub(crate) client_id: Option<String>,
    pub(crate) prefix: Prefix,
    pub(crate) qos: RequestQos,
    pub(crate) max_in_flight: usize,
    pub(crate) ready_timeout: Duration,
    pub(crate) recent_capacity: usize,
    pub(crate) presence: Option<PresenceSource>,
    #[cfg(feature = "websocket")]
    pub(crate) url_signer: Option<std::sync::Arc<dyn directcall_core::mqtt::UrlSigner>>,
}

impl Options {
    /// Options for `broker`, every other setting at its default.
    pub fn new(broker: BrokerOptions) -> Self {
        Options {
            broker,
            client_id: None,
            prefix: Prefix::default(),
            qos: RequestQos::default(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            recent_capacity: DEFAULT_RECENT_CAPACITY,
            presence: None,
            #[cfg(feature = "websocket")]
            url_signer: None,
        }
    }

    /// MQTT client id. Default: `{prefix}-` plus 12 random hex digits, unique
    /// per process (a second connection with the same id would push the first
    /// one off the broker).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// The requester's prefix (default `invocation_client`). Replies come back
    /// on `{prefix}/+/+/+/ack`.
    pub fn prefix(mut self, prefix: Prefix) -> Self {
        self.prefix = prefix;
        self
    }

    /// QoS of request publishes (default at most once).
    pub fn qos(mut self, qos: RequestQos) -> Self {
        self.qos = qos;
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
    /// is tried as usual. Default: off.
    pub fn presence(mut self, root: PresenceRoot) -> Self {
        self.presence = Some(PresenceSource::Directcall(root));
        self
    }

    /// Track presence through AWS IoT Core's lifecycle events instead
    /// (`$aws/events/presence/connected/+` and `disconnected/+`; the
    /// requester's policy must allow subscribing to them). Events that arrive
    /// out of order are ignored by their timestamps. Default: off.
    pub fn aws_presence(mut self) -> Self {
        self.presence = Some(PresenceSource::AwsLifecycle);
        self
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

    /// The prefix.
    pub fn get_prefix(&self) -> &Prefix {
        &self.prefix
    }
}
