//! A bounded memory of recently seen ids: the oldest is forgotten first.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Remembers up to `capacity` keys with a value each, forgetting the oldest.
///
/// Used by the pending table (which calls ended recently, and how) and by the
/// device (which requests it already ran), so memory stays bounded however
/// long the process lives.
#[derive(Debug)]
pub struct RecentIds<K, V> {
    capacity: usize,
    order: VecDeque<K>,
    values: HashMap<K, V>,
}

impl<K: Hash + Eq + Copy, V> RecentIds<K, V> {
    /// An empty memory of at most `capacity` keys (0 remembers nothing).
    pub fn new(capacity: usize) -> Self {
        RecentIds {
            capacity,
            order: VecDeque::with_capacity(capacity.min(4096)),
            values: HashMap::with_capacity(capacity.min(4096)),
        }
    }

    /// Remembers `key`; returns `false` (and keeps the old value) when it was
    /// already remembered.
    pub fn insert(&mut self, key: K, value: V) -> bool {
        if self.capacity == 0 || self.values.contains_key(&key) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.values.remove(&old);
            }
        }
        self.order.push_back(key);
        self.values.insert(key, value);
        true
    }

    /// The value remembered for `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.values.get(key)
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_and_stays_bounded() {
        let mut r = RecentIds::new(3);
        for i in 0..10u32 {
            assert!(r.insert(i, i * 2));
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.get(&6), None);
        assert_eq!(r.get(&9), Some(&18));
        assert!(!r.insert(9, 0));
        assert_eq!(r.get(&9), Some(&18));
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut r = RecentIds::new(0);
        assert!(!r.insert(1u8, ()));
        assert!(r.is_empty());
    }
}
