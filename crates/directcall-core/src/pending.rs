//! The pending-call table: who is waiting for which reply.
//!
//! [`PendingTable::insert`] returns a [`PendingGuard`]; dropping the guard
//! removes the entry, so every exit path of a call (reply, timeout, the
//! caller's future dropped) leaves the table as it was. A reply completes a
//! call only when its id is pending and its topic names the call's target and
//! method; anything else is refused with the reason, for counting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::recent::RecentIds;
use crate::topic::{CallTopics, MessageId, Method, Target};

/// Default number of ended calls remembered to tell late and duplicate
/// replies from unknown ones.
pub const DEFAULT_RECENT_CAPACITY: usize = 4096;

/// Why a reply did not complete a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unmatched {
    /// No call with this id is pending or remembered.
    Unknown,
    /// The call already ended without a reply (timed out or cancelled).
    Late,
    /// The call was already completed by an earlier reply.
    Duplicate,
    /// The id is pending, but the topic names another target or method.
    /// The call stays pending.
    Mismatched,
}

#[derive(Debug, Clone, Copy)]
enum Ended {
    Completed,
    Abandoned,
}

#[derive(Debug)]
struct Entry<W> {
    target: Target,
    method: Method,
    waiter: W,
}

impl<W> Entry<W> {
    fn answers(&self, reply: &CallTopics) -> bool {
        self.target == *reply.target() && self.method == *reply.method()
    }
}

#[derive(Debug)]
struct Inner<W> {
    calls: HashMap<MessageId, Entry<W>>,
    ended: RecentIds<MessageId, Ended>,
}

/// Calls waiting for a reply, keyed by [`MessageId`]; `W` is the waiter (a
/// oneshot sender in directcall-cloud). Cheap to clone: clones share the table.
#[derive(Debug)]
pub struct PendingTable<W> {
    inner: Arc<Mutex<Inner<W>>>,
}

impl<W> Clone for PendingTable<W> {
    fn clone(&self) -> Self {
        PendingTable {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<W> Default for PendingTable<W> {
    fn default() -> Self {
        Self::new(DEFAULT_RECENT_CAPACITY)
    }
}

fn lock<W>(m: &Mutex<Inner<W>>) -> MutexGuard<'_, Inner<W>> {
    // The table holds no invariant a panic elsewhere could break half-way.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<W> PendingTable<W> {
    /// An empty table remembering up to `recent_capacity` ended calls.
    pub fn new(recent_capacity: usize) -> Self {
        PendingTable {
            inner: Arc::new(Mutex::new(Inner {
                calls: HashMap::new(),
                ended: RecentIds::new(recent_capacity),
            })),
        }
    }

    /// Registers a waiter for the call `topics` describes. The entry lives
    /// until the returned guard is dropped or a matching reply completes it.
    pub fn insert(&self, topics: CallTopics, waiter: W) -> PendingGuard<W> {
        let id = topics.id();
        let (target, method) = topics.into_target_method();
        lock(&self.inner).calls.insert(
            id,
            Entry {
                target,
                method,
                waiter,
            },
        );
        PendingGuard {
            inner: Arc::clone(&self.inner),
            id,
        }
    }

    /// Takes the waiter of the call a reply on `reply` answers.
    ///
    /// # Errors
    /// The [`Unmatched`] reason when the reply completes no call.
    pub fn complete(&self, reply: &CallTopics) -> Result<W, Unmatched> {
        let mut inner = lock(&self.inner);
        let id = reply.id();
        match inner.calls.get(&id) {
            Some(e) if e.answers(reply) => {
                let entry = inner.calls.remove(&id).ok_or(Unmatched::Unknown)?;
                inner.ended.insert(id, Ended::Completed);
                Ok(entry.waiter)
            }
            Some(_) => Err(Unmatched::Mismatched),
            None => Err(match inner.ended.get(&id) {
                Some(Ended::Completed) => Unmatched::Duplicate,
                Some(Ended::Abandoned) => Unmatched::Late,
                None => Unmatched::Unknown,
            }),
        }
    }

    /// Calls pending now.
    pub fn len(&self) -> usize {
        lock(&self.inner).calls.len()
    }

    /// Whether no call is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every pending call and returns their waiters (for shutdown).
    pub fn drain(&self) -> Vec<W> {
        let mut inner = lock(&self.inner);
        let ids: Vec<MessageId> = inner.calls.keys().copied().collect();
        let mut waiters = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(e) = inner.calls.remove(&id) {
                inner.ended.insert(id, Ended::Abandoned);
                waiters.push(e.waiter);
            }
        }
        waiters
    }
}

/// Removes its call from the table when dropped, whatever ended the call.
#[derive(Debug)]
#[must_use = "dropping the guard removes the pending call at once"]
pub struct PendingGuard<W> {
    inner: Arc<Mutex<Inner<W>>>,
    id: MessageId,
}

impl<W> PendingGuard<W> {
    /// The id of the guarded call.
    pub fn id(&self) -> MessageId {
        self.id
    }
}

impl<W> Drop for PendingGuard<W> {
    fn drop(&mut self) {
        let mut inner = lock(&self.inner);
        if inner.calls.remove(&self.id).is_some() {
            inner.ended.insert(self.id, Ended::Abandoned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Prefix;

    fn call(target: &str, method: &str) -> CallTopics {
        CallTopics::new(
            Target::new(target).unwrap(),
            Method::new(method).unwrap(),
            Prefix::default(),
            MessageId::new(),
        )
        .unwrap()
    }

    fn reply_for(c: &CallTopics, target: &str, method: &str) -> CallTopics {
        CallTopics::new(
            Target::new(target).unwrap(),
            Method::new(method).unwrap(),
            c.prefix().clone(),
            c.id(),
        )
        .unwrap()
    }

    #[test]
    fn a_matching_reply_completes_once() {
        let t = PendingTable::default();
        let c = call("car", "unlock");
        let guard = t.insert(c.clone(), 7u8);
        assert_eq!(t.len(), 1);
        assert_eq!(t.complete(&c), Ok(7));
        assert!(t.is_empty());
        assert_eq!(t.complete(&c), Err(Unmatched::Duplicate));
        drop(guard);
        assert_eq!(t.complete(&c), Err(Unmatched::Duplicate));
    }

    #[test]
    fn dropping_the_guard_removes_the_call_and_later_replies_are_late() {
        let t = PendingTable::default();
        let c = call("car", "unlock");
        drop(t.insert(c.clone(), ()));
        assert!(t.is_empty());
        assert_eq!(t.complete(&c), Err(Unmatched::Late));
        assert_eq!(t.complete(&call("car", "unlock")), Err(Unmatched::Unknown));
    }

    #[test]
    fn a_reply_naming_another_target_or_method_is_refused_and_the_call_stays() {
        let t = PendingTable::default();
        let c = call("car-a", "unlock");
        let _guard = t.insert(c.clone(), ());
        assert_eq!(
            t.complete(&reply_for(&c, "car-b", "unlock")),
            Err(Unmatched::Mismatched)
        );
        assert_eq!(
            t.complete(&reply_for(&c, "car-a", "lock")),
            Err(Unmatched::Mismatched)
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.complete(&c), Ok(()));
    }

    #[test]
    fn drain_takes_every_waiter() {
        let t = PendingTable::default();
        let guards: Vec<_> = (0..5).map(|i| t.insert(call("car", "m"), i)).collect();
        let mut w = t.drain();
        w.sort_unstable();
        assert_eq!(w, vec![0, 1, 2, 3, 4]);
        assert!(t.is_empty());
        drop(guards);
        assert!(t.is_empty());
    }

    #[test]
    fn concurrent_inserts_and_completions_leave_nothing() {
        let t = PendingTable::<usize>::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..2000 {
                        let c = call("car", "m");
                        let g = t.insert(c.clone(), i);
                        if i % 2 == 0 {
                            assert_eq!(t.complete(&c), Ok(i));
                        }
                        drop(g);
                    }
                });
            }
        });
        assert!(t.is_empty());
    }
}
