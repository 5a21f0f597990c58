//! Errors of the connection layer. None carries a rumqttc type in its public
//! shape; the underlying error is reachable through `source()`.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// Why a connection could not be set up (before any network traffic).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The transport needs a cargo feature of directcall-core that is not
    /// compiled in.
    #[error("{url} needs the `{feature}` feature")]
    Unsupported {
        /// The broker URL.
        url: String,
        /// The feature to enable.
        feature: &'static str,
    },
    /// No broker endpoint is configured.
    #[error("no broker endpoint to connect to")]
    NoEndpoint,
    /// TLS material that cannot be used.
    #[error("TLS {what}: {source}")]
    Tls {
        /// Which part: `CA certificate`, `client key`, ...
        what: &'static str,
        /// Why.
        #[source]
        source: Arc<dyn StdError + Send + Sync>,
    },
}

impl SetupError {
    /// A TLS error about `what`, caused by `source`.
    pub fn tls(what: &'static str, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        SetupError::Tls {
            what,
            source: Arc::from(source.into()),
        }
    }
}

/// Why a connection failed or was lost: the broker it was to, and the
/// transport's error as the source.
#[derive(Debug, Clone)]
pub struct ConnectionError {
    broker: String,
    source: Arc<dyn StdError + Send + Sync>,
}

impl ConnectionError {
    pub(crate) fn new(broker: &str, source: impl StdError + Send + Sync + 'static) -> Self {
        ConnectionError {
            broker: broker.to_owned(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn from_arc(broker: &str, source: Arc<dyn StdError + Send + Sync>) -> Self {
        ConnectionError {
            broker: broker.to_owned(),
            source,
        }
    }

    /// The broker URL the connection was to.
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// Whether the connection was dropped because the broker stopped
    /// answering (no PINGRESP within the ping timeout): it is hung, not
    /// gone, and what was sent to it may still be delivered.
    pub fn is_hung(&self) -> bool {
        self.source.downcast_ref::<PingTimeout>().is_some()
    }
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.broker, self.source)
    }
}

impl StdError for ConnectionError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// A version 5 connection lost before any CONNACK: what a broker that
/// speaks only MQTT 3.1.1 does to it (NATS answers a 3.1.1 CONNACK
/// "unacceptable protocol version" and closes).
#[derive(Debug, thiserror::Error)]
#[error("{source} (lost before the broker accepted an MQTT 5 connection: a broker that speaks only MQTT 3.1.1, NATS among them, does this; try MQTT 3.1.1)")]
pub(crate) struct NoMqtt5 {
    pub(crate) source: Arc<dyn StdError + Send + Sync>,
}

/// The broker did not answer a PINGREQ in time: taken for hung (a stopped
/// process, a black-holed link), so the connection is dropped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no answer to a PINGREQ within {} ms (ping timeout): the broker is taken for hung", timeout.as_millis())]
pub(crate) struct PingTimeout {
    pub(crate) timeout: std::time::Duration,
}

/// The broker refused a subscription a side cannot work without.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the broker refused the subscription to {filter}{}", dot_hint(filter))]
pub(crate) struct SubscriptionRefused {
    pub(crate) filter: String,
}

fn dot_hint(filter: &str) -> &'static str {
    if filter.contains('.') {
        " (some brokers, NATS among them, refuse topics containing '.')"
    } else {
        ""
    }
}

/// A publish that was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The request queue is full, the connection has ended, or the topic is
    /// not a valid MQTT topic name.
    #[error("not queued: the request queue is full or the connection has ended")]
    NotQueued,
}
