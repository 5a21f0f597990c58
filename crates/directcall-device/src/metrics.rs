//! The device's metrics, recorded through the `metrics` facade so they reach
//! whatever exporter the process installed. Handles are registered when the
//! device starts: install the recorder before that.

use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge};

/// Requests received, by `outcome`: `executed`, `unknown_method`, `busy`,
/// `expired`, `duplicate`, `malformed`.
pub const DEVICE_REQUESTS: &str = "directcall_device_requests_total";
/// Replies published.
pub const DEVICE_REPLIES: &str = "directcall_device_replies_total";
/// Whether the device's connection is up and subscribed (1 or 0).
pub const DEVICE_CONNECTED: &str = "directcall_device_connected";

#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) executed: Counter,
    pub(crate) unknown_method: Counter,
    pub(crate) busy: Counter,
    pub(crate) expired: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) malformed: Counter,
    pub(crate) replied: Counter,
    pub(crate) connected: Gauge,
}

impl Metrics {
    pub(crate) fn register() -> Self {
        describe_counter!(
            DEVICE_REQUESTS,
            "Requests received by the device, by outcome."
        );
        describe_counter!(DEVICE_REPLIES, "Replies the device published.");
        describe_gauge!(
            DEVICE_CONNECTED,
            "Whether the device's connection is up and subscribed."
        );
        let outcome = |o: &'static str| counter!(DEVICE_REQUESTS, "outcome" => o);
        Metrics {
            executed: outcome("executed"),
            unknown_method: outcome("unknown_method"),
            busy: outcome("busy"),
            expired: outcome("expired"),
            duplicates: outcome("duplicate"),
            malformed: outcome("malformed"),
            replied: counter!(DEVICE_REPLIES),
            connected: gauge!(DEVICE_CONNECTED),
        }
    }
}
