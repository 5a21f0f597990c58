//! The requester's metrics, recorded through the `metrics` facade so they
//! reach whatever exporter the process installed (Prometheus, StatsD,
//! OpenTelemetry, ...). Handles are registered when the requester starts:
//! install the recorder before that.

use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge};

/// MQTT 5: requests the broker refused in its PUBACK (reason 0x10: no
/// device subscribed), by reason code.
pub const REQUESTS_REFUSED: &str = "directcall_requests_refused_total";
/// Requests published.
pub const REQUESTS_PUBLISHED: &str = "directcall_requests_published_total";
/// Calls ended by a reply.
pub const REPLIES_COMPLETED: &str = "directcall_replies_completed_total";
/// Calls ended by their deadline.
pub const CALL_TIMEOUTS: &str = "directcall_call_timeouts_total";
/// Replies that completed no call, by `reason`.
pub const REPLIES_DROPPED: &str = "directcall_replies_dropped_total";
/// Calls waiting for a reply now.
pub const PENDING_CALLS: &str = "directcall_pending_calls";
/// Broker connections made after the first.
pub const BROKER_RECONNECTS: &str = "directcall_broker_reconnects_total";
/// Whether the requester's connection is up and subscribed (1 or 0).
pub const BROKER_CONNECTED: &str = "directcall_broker_connected";
/// 1 for the broker endpoint in use, by `url`; 0 for one used before.
pub const BROKER_IN_USE: &str = "directcall_broker_in_use";

/// Shared store (Redis) operations that failed or timed out, by `op`
/// (`save`, `load`, `claim`, `left`, `departed`): the calls went on
/// without the store.
pub const STORE_ERRORS: &str = "directcall_store_errors_total";
/// Targets in the presence table (with a record, online or offline).
pub const PRESENCE_DEVICES: &str = "directcall_presence_devices";
/// Group calls started ([`Requester::invoke_group`](crate::Requester::invoke_group)).
pub const GROUP_CALLS: &str = "directcall_group_calls_total";
/// Devices' results in group calls, by `outcome` (`ok`, `device_error`,
/// `timeout`, `offline`, `refused`).
pub const GROUP_RESULTS: &str = "directcall_group_results_total";
/// Late answers to calls of a requester that left, saved on their records
/// in the shared store by this one.
pub const LATE_ANSWERS_ADOPTED: &str = "directcall_late_answers_adopted_total";
/// Shared store operations and their duration, by `op` (histogram).
pub const STORE_OPERATION_SECONDS: &str = "directcall_store_operation_seconds";

/// Why a reply completed no call, as the `reason` label spells it.
pub(crate) const DROP_REASONS: [&str; 6] = [
    "late",
    "duplicate",
    "unknown",
    "mismatched",
    "malformed",
    "oversized",
];

#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) published: Counter,
    pub(crate) completed: Counter,
    pub(crate) timeouts: Counter,
    /// In the order of [`DROP_REASONS`].
    pub(crate) dropped: [Counter; 6],
    pub(crate) pending: Gauge,
    pub(crate) reconnects: Counter,
    pub(crate) connected: Gauge,
    pub(crate) refused: Counter,
}

impl Metrics {
    pub(crate) fn register() -> Self {
        describe_counter!(REQUESTS_PUBLISHED, "Requests published.");
        describe_counter!(REPLIES_COMPLETED, "Calls ended by a reply.");
        describe_counter!(CALL_TIMEOUTS, "Calls ended by their deadline.");
        describe_counter!(
            REPLIES_DROPPED,
            "Replies that completed no call, by reason."
        );
        describe_gauge!(PENDING_CALLS, "Calls waiting for a reply now.");
        describe_counter!(
            BROKER_RECONNECTS,
            "Broker connections made after the first."
        );
        describe_gauge!(
            BROKER_CONNECTED,
            "Whether the broker connection is up and subscribed."
        );
        describe_gauge!(
            BROKER_IN_USE,
            "1 for the broker endpoint in use, by url; 0 for one used before."
        );
        describe_counter!(
            REQUESTS_REFUSED,
            "MQTT 5: requests the broker refused in its PUBACK (0x10: no device subscribed)."
        );
        Metrics {
            refused: counter!(REQUESTS_REFUSED),
            published: counter!(REQUESTS_PUBLISHED),
            completed: counter!(REPLIES_COMPLETED),
            timeouts: counter!(CALL_TIMEOUTS),
            dropped: DROP_REASONS.map(|reason| counter!(REPLIES_DROPPED, "reason" => reason)),
            pending: gauge!(PENDING_CALLS),
            reconnects: counter!(BROKER_RECONNECTS),
            connected: gauge!(BROKER_CONNECTED),
        }
    }
}
