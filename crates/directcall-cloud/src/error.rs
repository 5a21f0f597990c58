use std::time::Duration;

use directcall_core::{Field, MessageId};

/// Why a call did not return the device's reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
        target: String,
    },
    /// No broker connection; nothing was published.
    #[error("broker unavailable: {reason}")]
    Unavailable {
        /// What is wrong with the connection.
        reason: String,
    },
    /// A parameter broke the protocol's rules; nothing was published.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending parameter.
        field: Field,
        /// Why it was refused.
        reason: String,
    },
    /// The encoded request is larger than the connection's packet limit.
    #[error("request is {size} bytes, the limit is {max} bytes")]
    PayloadTooLarge {
        /// Encoded size.
        size: usize,
        /// Largest allowed.
        max: usize,
    },
    /// The requester was shut down.
    #[error("requester closed")]
    Closed,
}

impl From<directcall_core::Error> for Error {
    fn from(e: directcall_core::Error) -> Self {
        match e {
            directcall_core::Error::Invalid { field, reason } => Error::Invalid { field, reason },
            // core::Error is non_exhaustive; any future kind is still the caller's input.
            other => Error::Invalid {
                field: other.field(),
                reason: other.to_string(),
            },
        }
    }
}
