use std::sync::Arc;
use std::time::Duration;

use directcall_core::mqtt::{ConnectionError, PublishError, SetupError};
use directcall_core::{Field, MessageId, Target};
use serde_json::Value;

/// Why a call did not return the device's reply.
///
/// Two questions a caller asks of any of them: which call was it
/// ([`Error::id`], for its record or a log line), and may the device have
/// run the method ([`Error::may_have_run`]: then a retry must carry the
/// same idempotency key).
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
    /// Strict presence ([`Options::strict_presence`](crate::Options::strict_presence)):
    /// the target has no presence record, so no device of that name was
    /// ever seen (or its record was cleared); nothing was published.
    /// Distinct from [`Error::Offline`]: a device known to be away.
    #[error("target {target} is unknown: it has no presence record (strict presence)")]
    UnknownTarget {
        /// The unknown target.
        target: Target,
    },
    /// The device answered with a reply that breaks the protocol's rules
    /// (PROTOCOL.md, "Reply"): a `status` that is not an integer from 0 to
    /// 65535. The call ended at once, without an answer to give; the device
    /// may have run the method. Only a reply on the call's own topic whose
    /// payload `id` is the call's can end a call this way.
    #[error("the device's reply is malformed: invalid {field}: {reason}")]
    BadReply {
        /// The call's id.
        id: MessageId,
        /// The reply's field at fault (`status`).
        field: Field,
        /// Why it was refused, with what was there.
        reason: String,
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
    /// The broker stopped answering (no PINGRESP within the ping timeout,
    /// [`BrokerOptions::ping_timeout`](crate::BrokerOptions::ping_timeout))
    /// while this call's request was out: the connection was dropped and the
    /// call ended at once, without waiting out its deadline. The request may
    /// have reached the device before the broker hung, or may still reach it
    /// if the broker resumes: the device may have run the method.
    #[error("the broker stopped answering while the request was out (ping timeout); the device may or may not have run the method")]
    BrokerHung {
        /// Time from the call's start to giving up.
        elapsed: Duration,
        /// The call's id, as published.
        id: MessageId,
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
    /// The requester's [`Options`](crate::Options) cannot do what was
    /// asked: `option` names the setting to change. Nothing was published.
    #[error("{option}: {reason}")]
    Config {
        /// The setting at fault, as its builder method is spelled
        /// (`Options::record_calls`).
        option: &'static str,
        /// Why, and what would do.
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
    /// The requester was shut down: before the call was made, or while it
    /// waited for its answer (its request was then out).
    #[error("requester closed")]
    Closed,
}

impl Error {
    /// The id of the call this error ended, when it had one: it was
    /// published ([`Error::Timeout`], [`Error::NoSubscriber`],
    /// [`Error::Refused`], [`Error::BadReply`]) or answered
    /// ([`Error::Rejected`], [`Error::Decode`]). Its record, if calls are
    /// recorded, is [`Requester::call_record`](crate::Requester::call_record)
    /// of it. `None` for a call refused before it was published.
    ///
    /// ```no_run
    /// # async fn f(requester: directcall_cloud::Requester, call: directcall_cloud::Invocation) {
    /// if let Err(e) = requester.invoke(call).await {
    ///     tracing::warn!(id = ?e.id(), "call failed: {e}");
    /// }
    /// # }
    /// ```
    pub fn id(&self) -> Option<MessageId> {
        match self {
            Error::Timeout { id, .. }
            | Error::BrokerHung { id, .. }
            | Error::NoSubscriber { id }
            | Error::Refused { id, .. }
            | Error::BadReply { id, .. }
            | Error::Rejected { id, .. }
            | Error::Decode { id, .. } => Some(*id),
            Error::Offline { .. }
            | Error::UnknownTarget { .. }
            | Error::KeyConflict
            | Error::Unavailable { .. }
            | Error::Invalid { .. }
            | Error::Setup(_)
            | Error::Config { .. }
            | Error::PayloadTooLarge { .. }
            | Error::Closed => None,
        }
    }

    /// Whether the device may have run the method: **when to retry with
    /// the same idempotency key** ([`Invocation::idempotency_key`](crate::Invocation::idempotency_key)),
    /// so that the retry can never run it twice (it joins the first call,
    /// or gets its stored outcome, a late answer included).
    ///
    /// True when the request may have reached the device: a
    /// [`Timeout`](Error::Timeout) (no answer came, so nobody knows), a
    /// [`BadReply`](Error::BadReply) (it answered, unreadably), a
    /// [`Rejected`](Error::Rejected) or [`Decode`](Error::Decode) answer
    /// (it answered: its status says what it did), and
    /// [`Closed`](Error::Closed), which a call waiting for its answer
    /// also ends with when the requester shuts down (the error does not
    /// say which, so the answer is the safe one).
    ///
    /// False when nothing reached a device, so that any retry is safe:
    /// refused before publishing ([`Invalid`](Error::Invalid),
    /// [`PayloadTooLarge`](Error::PayloadTooLarge),
    /// [`Offline`](Error::Offline), [`UnknownTarget`](Error::UnknownTarget),
    /// [`Unavailable`](Error::Unavailable), [`KeyConflict`](Error::KeyConflict),
    /// [`Setup`](Error::Setup), [`Config`](Error::Config)), or refused by
    /// the broker ([`NoSubscriber`](Error::NoSubscriber),
    /// [`Refused`](Error::Refused): MQTT 5 says it was not delivered).
    ///
    /// ```no_run
    /// # async fn f(requester: directcall_cloud::Requester) -> Result<(), directcall_cloud::Error> {
    /// use directcall_cloud::Invocation;
    /// let unlock = || Invocation::parse("VIN123", "unlock", "now").map(|c| c.idempotency_key("order-4711"));
    /// let reply = match requester.invoke(unlock()?).await {
    ///     // Never runs twice: the retry joins the first call, or gets its outcome.
    ///     Err(e) if e.may_have_run() => requester.invoke(unlock()?).await?,
    ///     other => other?,
    /// };
    /// # Ok(()) }
    /// ```
    pub fn may_have_run(&self) -> bool {
        match self {
            Error::Timeout { .. }
            | Error::BrokerHung { .. }
            | Error::BadReply { .. }
            | Error::Rejected { .. }
            | Error::Decode { .. }
            | Error::Closed => true,
            Error::Offline { .. }
            | Error::UnknownTarget { .. }
            | Error::NoSubscriber { .. }
            | Error::Refused { .. }
            | Error::KeyConflict
            | Error::Unavailable { .. }
            | Error::Invalid { .. }
            | Error::Setup(_)
            | Error::Config { .. }
            | Error::PayloadTooLarge { .. } => false,
        }
    }
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

    /// One of each variant, with whether it has an id and whether the
    /// device may have run the method.
    fn every_error() -> Vec<(Error, bool, bool)> {
        let id = MessageId::new();
        let target = Target::new("car").unwrap();
        let decode = serde_json::from_str::<u8>("x").unwrap_err();
        vec![
            (
                Error::Timeout {
                    elapsed: Duration::from_secs(1),
                    id,
                },
                true,
                true,
            ),
            (
                Error::BrokerHung {
                    elapsed: Duration::from_secs(2),
                    id,
                },
                true,
                true,
            ),
            (
                Error::Offline {
                    target: target.clone(),
                },
                false,
                false,
            ),
            (Error::UnknownTarget { target }, false, false),
            (
                Error::BadReply {
                    id,
                    field: Field::Status,
                    reason: "must be an integer".into(),
                },
                true,
                true,
            ),
            (Error::NoSubscriber { id }, true, false),
            (Error::Refused { id, code: 0x87 }, true, false),
            (Error::KeyConflict, false, false),
            (
                Error::Unavailable {
                    cause: Unavailable::NotQueued(PublishError::NotQueued),
                    last_error: None,
                },
                false,
                false,
            ),
            (
                Error::Invalid {
                    field: Field::Target,
                    reason: "x".into(),
                },
                false,
                false,
            ),
            (Error::Setup(SetupError::NoEndpoint), false, false),
            (
                Error::Config {
                    option: "Options::record_calls",
                    reason: "x".into(),
                },
                false,
                false,
            ),
            (Error::PayloadTooLarge { size: 2, max: 1 }, false, false),
            (
                Error::Rejected {
                    id,
                    status: 500,
                    response: Value::Null,
                },
                true,
                true,
            ),
            (
                Error::Decode {
                    id,
                    source: Arc::new(decode),
                },
                true,
                true,
            ),
            (Error::Closed, false, true),
        ]
    }

    #[test]
    fn every_error_says_its_call_and_whether_it_may_have_run() {
        for (e, has_id, may_have_run) in every_error() {
            assert_eq!(e.id().is_some(), has_id, "{e:?}");
            assert_eq!(e.may_have_run(), may_have_run, "{e:?}");
        }
    }

    #[test]
    fn configuration_errors_name_the_option() {
        let e = Error::Config {
            option: "Options::record_calls",
            reason: "an asynchronous call needs call records".into(),
        };
        assert_eq!(
            e.to_string(),
            "Options::record_calls: an asynchronous call needs call records"
        );
    }

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
