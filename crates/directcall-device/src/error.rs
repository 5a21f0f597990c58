use std::time::Duration;

use directcall_core::mqtt::{ConnectionError, SetupError};
use directcall_core::Field;

/// Errors of the device side: the same shapes as the requester's
/// (`directcall_cloud::Error`) for the same failures.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name or setting broke the protocol's rules (a bad broker URL, a
    /// target that is not a topic level, ...).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: Field,
        /// Why it was refused.
        reason: String,
    },
    /// The broker settings cannot be used (TLS material, a transport whose
    /// feature is not compiled in).
    #[error("unusable broker settings: {0}")]
    Setup(#[from] SetupError),
    /// The broker could not be reached and subscribed in time.
    #[error("broker unavailable: {cause}")]
    Unavailable {
        /// What is wrong.
        cause: Unavailable,
        /// Why the connection last failed, when it ever did.
        #[source]
        last_error: Option<ConnectionError>,
    },
}

/// Why the broker is unavailable ([`Error::Unavailable`]); the requester's
/// `directcall_cloud::Unavailable` has the same causes for the same failures.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// Not connected and subscribed within the ready timeout
    /// ([`DeviceOptions::ready_timeout`](crate::DeviceOptions::ready_timeout)).
    #[error("not connected and subscribed within {} ms", timeout.as_millis())]
    NotReady {
        /// The ready timeout.
        timeout: Duration,
    },
}

impl From<directcall_core::Error> for Error {
    fn from(e: directcall_core::Error) -> Self {
        Error::Invalid {
            field: e.field(),
            reason: e.reason().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_broker_reads_as_the_requesters_does() {
        let e = Error::Unavailable {
            cause: Unavailable::NotReady {
                timeout: Duration::from_millis(300),
            },
            last_error: None,
        };
        assert_eq!(
            e.to_string(),
            "broker unavailable: not connected and subscribed within 300 ms"
        );
    }
}
