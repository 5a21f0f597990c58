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
    #[error("broker unavailable: {reason}")]
    Unavailable {
        /// What is wrong.
        reason: String,
        /// Why the connection last failed, when it ever did.
        #[source]
        last_error: Option<ConnectionError>,
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
