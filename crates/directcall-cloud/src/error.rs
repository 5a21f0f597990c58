use std::sync::Arc;
use std::time::Duration;

use directcall_core::mqtt::{ConnectionError, SetupError};
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
    /// No broker connection; nothing was published.
    #[error("broker unavailable: {reason}")]
    Unavailable {
        /// What is wrong.
        reason: String,
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

impl From<directcall_core::Error> for Error {
    fn from(e: directcall_core::Error) -> Self {
        Error::Invalid {
            field: e.field(),
            reason: e.reason().to_owned(),
        }
    }
}
