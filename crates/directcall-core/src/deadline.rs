//! Deadline arithmetic: call budgets on the requester, expiry on the device.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default clock skew a device allows before dropping a late request.
pub const DEFAULT_SKEW: Duration = Duration::from_millis(1000);

/// When one call must be finished, fixed when the call starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    start: Instant,
    at: Instant,
}

impl Deadline {
    /// A deadline `timeout` after `start`.
    pub fn new(start: Instant, timeout: Duration) -> Self {
        Deadline {
            start,
            at: start + timeout,
        }
    }

    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self::new(Instant::now(), timeout)
    }

    /// When the call started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// When the call must be finished.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Time left at `now` (zero once passed).
    pub fn remaining_at(&self, now: Instant) -> Duration {
        self.at.saturating_duration_since(now)
    }

    /// Time left now.
    pub fn remaining(&self) -> Duration {
        self.remaining_at(Instant::now())
    }

    /// Time since the call started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Whether the deadline has passed at `now`.
    pub fn is_past(&self, now: Instant) -> bool {
        now >= self.at
    }
}

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

/// Whole milliseconds of `d`, saturating (the seed's `elapsed` unit).
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
    fn deadline_arithmetic() {
        let start = Instant::now();
        let d = Deadline::new(start, Duration::from_millis(50));
        assert_eq!(d.remaining_at(start), Duration::from_millis(50));
        assert_eq!(
            d.remaining_at(start + Duration::from_secs(1)),
            Duration::ZERO
        );
        assert!(!d.is_past(start + Duration::from_millis(49)));
        assert!(d.is_past(start + Duration::from_millis(50)));
    }

    #[test]
    fn unix_millis_of_epoch() {
        assert_eq!(unix_millis(UNIX_EPOCH + Duration::from_millis(1234)), 1234);
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
