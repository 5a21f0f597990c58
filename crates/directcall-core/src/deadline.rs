//! Deadline arithmetic: the device's expiry rule and the units of the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Default clock skew a device allows before dropping a late request.
pub const DEFAULT_SKEW: Duration = Duration::from_millis(1000);

/// Milliseconds since the Unix epoch (0 for a clock before 1970).
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The device rule of PROTOCOL.md: a request sent at `timestamp_ms` with
/// `timeout_ms` left is expired when `now > timestamp + timeout_ms + skew`.
/// Never overflows; without a budget a request never expires.
pub fn is_expired(
    timestamp_ms: Option<u64>,
    timeout_ms: Option<u64>,
    now_ms: u64,
    skew: Duration,
) -> bool {
    let (Some(ts), Some(budget)) = (timestamp_ms, timeout_ms) else {
        return false;
    };
    let skew_ms = u64::try_from(skew.as_millis()).unwrap_or(u64::MAX);
    now_ms > ts.saturating_add(budget).saturating_add(skew_ms)
}

/// Whole milliseconds of `d`, saturating (the AWS sample's `elapsed` unit).
pub fn whole_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_rule() {
        let skew = Duration::from_millis(1000);
        assert!(!is_expired(Some(1000), Some(3000), 5000, skew));
        assert!(is_expired(Some(1000), Some(3000), 5001, skew));
        assert!(!is_expired(None, Some(3000), u64::MAX, skew));
        assert!(!is_expired(Some(1000), None, u64::MAX, skew));
        assert!(!is_expired(Some(u64::MAX), Some(u64::MAX), u64::MAX, skew));
        assert!(is_expired(Some(0), Some(0), 1, Duration::ZERO));
    }

    #[test]
    fn unix_millis_of_epoch() {
        assert_eq!(unix_millis(UNIX_EPOCH + Duration::from_millis(1234)), 1234);
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
