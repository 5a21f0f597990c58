//! The one error type of the core: what was wrong with a name, a topic or a payload.

use std::fmt;

/// Which part of a call a validation error is about.
///
/// The names are the ones a caller sees (`target`, `method`, `prefix`, ...),
/// so an HTTP edge can put them straight into its error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Field {
    /// The device name.
    Target,
    /// The method name.
    Method,
    /// The requester's client prefix.
    Prefix,
    /// The per-call message id.
    Id,
    /// A whole MQTT topic.
    Topic,
    /// The caller's timeout.
    Timeout,
    /// The request value.
    Request,
    /// A JSON payload on the wire.
    Payload,
    /// The broker address.
    Broker,
    /// The MQTT protocol version.
    MqttVersion,
    /// The W3C trace context of a call.
    Traceparent,
    /// A caller's idempotency key (the `Idempotency-Key` header).
    IdempotencyKey,
    /// Where call records are shared (a Redis URL).
    Store,
    /// A reply's `status`.
    Status,
    /// The name of a group of devices.
    Group,
}

impl Field {
    /// The field's name as callers spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Target => "target",
            Field::Method => "method",
            Field::Prefix => "prefix",
            Field::Id => "id",
            Field::Topic => "topic",
            Field::Timeout => "timeout",
            Field::Request => "request",
            Field::Payload => "payload",
            Field::Broker => "broker",
            Field::MqttVersion => "mqtt_version",
            Field::Traceparent => "traceparent",
            Field::IdempotencyKey => "Idempotency-Key",
            Field::Store => "store",
            Field::Status => "status",
            Field::Group => "group",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the sans-IO core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value broke the protocol's rules; nothing was or may be published.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: Field,
        /// Why it was refused, in words a caller can act on.
        reason: String,
    },
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(field: Field, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The field this error is about.
    pub fn field(&self) -> Field {
        match self {
            Error::Invalid { field, .. } => *field,
        }
    }

    /// Why it was refused, without the field's name (for a caller that
    /// names the field itself).
    pub fn reason(&self) -> &str {
        match self {
            Error::Invalid { reason, .. } => reason,
        }
    }
}
