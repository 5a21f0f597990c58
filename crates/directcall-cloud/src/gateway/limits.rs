//! A bound on calls in flight per target: a device answers one call at a
//! time or a few, and callers piling onto one target would only wait out
//! their deadlines. Per process: N replicas allow N times the bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::auth::Refusal;

/// At most `max` calls in flight per target.
#[derive(Debug)]
pub(crate) struct TargetLimit {
    max: usize,
    in_flight: Mutex<HashMap<String, usize>>,
}

/// A call's place under its target's limit, given back on drop.
#[derive(Debug)]
pub(crate) struct TargetSlot {
    limit: Arc<TargetLimit>,
    target: String,
}

impl TargetLimit {
    /// At most `max` calls in flight per target.
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(TargetLimit {
            max,
            in_flight: Mutex::default(),
        })
    }

    /// A place for a call to `target`.
    pub(crate) fn enter(self: &Arc<Self>, target: &str) -> Result<TargetSlot, Refusal> {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(target.to_owned()).or_insert(0);
        if *n >= self.max {
            return Err(Refusal::Limited {
                message: format!(
                    "target '{target}' has {} calls in flight, its limit (--max-in-flight-per-target)",
                    self.max
                ),
                retry_after: Duration::from_secs(1),
            });
        }
        *n += 1;
        Ok(TargetSlot {
            limit: Arc::clone(self),
            target: target.to_owned(),
        })
    }
}

impl Drop for TargetSlot {
    fn drop(&mut self) {
        let mut map = self
            .limit
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.target) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.target);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_takes_at_most_its_limit() {
        let limit = TargetLimit::new(2);
        let a = limit.enter("car").unwrap();
        let _b = limit.enter("car").unwrap();
        assert!(matches!(limit.enter("car"), Err(Refusal::Limited { .. })));
        assert!(limit.enter("other").is_ok());
        drop(a);
        assert!(limit.enter("car").is_ok());
    }
}
