use std::sync::Arc;
use std::time::Duration;

use directcall_core::mqtt::{ConnectionError, PublishError, SetupError};
use directcall_core::{Field, MessageId, Target};
use serde_json::Value;

/// Why a call did not return the device's reply.
///
/// Every variant but [`Error::Timeout`] means nothing reached the device
/// (or, for [`Error::Rejected`] and [`Error::Decode`], that it answered).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No reply before the deadline. The device may or may not have run the
    /// method.
    #[error("no reply within the deadline ({} ms elapsed)", elapsed.as_millis())]
    Timeout {
        /// Time from the call's start to giving up.
        elapsed: Duration,
        /// The call's id, as published.
        id: MessageId,
    },
    /// The target is known to be offline; nothing was published.
    #[error("target {target} is offline")]
    Offline {
        /// The offline target.
        target: Target,
    },
    /// MQTT 5: the broker answered the request's publish with "no matching
    /// subscribers" (PUBACK reason code 0x10): no device is listening for
    /// the target's requests, so nothing will answer. Known in one broker
    /// round trip, with no presence records; nothing is left pending.
    #[error("no device is subscribed to the target's requests (the broker answered the publish with MQTT 5 reason code 0x10, no matching subscribers)")]
    NoSubscriber {
        /// The call's id, as published.
        id: MessageId,
    },
    /// MQTT 5: the broker refused the request's publish with another PUBACK
    /// reason code (0x87 not authorized, 0x97 quota exceeded, ...). The
    /// request was not delivered.
    #[error("the broker refused the request: {} (MQTT 5 reason code {code:#04x})", reason_text(*code))]
    Refused {
        /// The call's id, as published.
        id: MessageId,
        /// The PUBACK reason code.
        code: u8,
    },
    /// The call's idempotency key was used for another call (another
    /// target, method or request) within the retention window; nothing was
    /// published.
    #[error("the idempotency key was already used for a different call (another target, method or request)")]
    KeyConflict,
    /// No broker connection; nothing was published.
    #[error("broker unavailable: {cause}")]
    Unavailable {
        /// What is wrong.
        cause: Unavailable,
        /// Why the connection last failed, when it ever did.
        #[source]
        last_error: Option<ConnectionError>,
    },
    /// A parameter broke the protocol's rules; nothing was published.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending parameter.
        field: Field,
        /// Why it was refused.
        reason: String,
    },
    /// The broker settings cannot be used (TLS material, a transport whose
    /// feature is not compiled in).
    #[error("unusable broker settings: {0}")]
    Setup(#[from] SetupError),
    /// The encoded request is larger than the connection's packet limit.
    #[error("request is {size} bytes, the limit is {max} bytes")]
    PayloadTooLarge {
        /// Encoded size.
        size: usize,
        /// Largest allowed.
        max: usize,
    },
    /// The device answered with a status outside 2xx (only from
    /// [`Reply::into_result`](crate::Reply::into_result) and
    /// [`Reply::json`](crate::Reply::json)).
    #[error("the device answered {status}: {response}")]
    Rejected {
        /// The call's id.
        id: MessageId,
        /// The device's status.
        status: u16,
        /// The device's answer.
        response: Value,
    },
    /// The device's answer is not the type asked for (only from
    /// [`Reply::json`](crate::Reply::json)).
    #[error("the device's answer does not decode: {source}")]
    Decode {
        /// The call's id.
        id: MessageId,
        /// Why.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// The requester was shut down.
    #[error("requester closed")]
    Closed,
}

/// Why the broker is unavailable ([`Error::Unavailable`]).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// Not connected to the broker now (or not subscribed yet).
    #[error("not connected to the broker")]
    NotConnected,
    /// Not connected and subscribed within the ready timeout
    /// ([`Options::ready_timeout`](crate::Options::ready_timeout)).
    #[error("not connected and subscribed within {} ms", timeout.as_millis())]
    NotReady {
        /// The ready timeout.
        timeout: Duration,
    },
    /// The request could not be queued for the connection: the queue is
    /// full, or the connection has ended.
    #[error("request {0}")]
    NotQueued(#[source] PublishError),
}

impl From<directcall_core::Error> for Error {
    fn from(e: directcall_core::Error) -> Self {
        Error::Invalid {
            field: e.field(),
            reason: e.reason().to_owned(),
        }
    }
}

/// What an MQTT 5 PUBACK reason code means.
pub(crate) fn reason_text(code: u8) -> &'static str {
    match code {
        0x10 => "no matching subscribers",
        0x80 => "unspecified error",
        0x83 => "implementation specific error",
        0x87 => "not authorized",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x97 => "quota exceeded",
        0x99 => "payload format invalid",
        _ => "unknown reason",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_broker_reads_as_it_always_has() {
        let text = |cause| {
            Error::Unavailable {
                cause,
                last_error: None,
            }
            .to_string()
        };
        assert_eq!(
            text(Unavailable::NotConnected),
            "broker unavailable: not connected to the broker"
        );
        assert_eq!(
            text(Unavailable::NotReady {
                timeout: Duration::from_millis(300)
            }),
            "broker unavailable: not connected and subscribed within 300 ms"
        );
        assert_eq!(
            text(Unavailable::NotQueued(PublishError::NotQueued)),
            "broker unavailable: request not queued: the request queue is full or the connection has ended"
        );
    }
}
