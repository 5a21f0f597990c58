//! The pending-call table: who is waiting for which reply, until when.
//!
//! [`PendingTable::insert`] returns a [`PendingCall`], a future that resolves
//! to the call's [`Outcome`]: its reply, its deadline passed, or the table
//! closed. Dropping it removes the call, so every exit path of a call
//! (reply, timeout, the caller's future dropped) leaves the table as it was.
//!
//! Each slot holds what a call needs and nothing more: a waker, the reply
//! once it came, the deadline, and a keyed 64-bit hash of the call's target
//! and method (to refuse a reply on another device's topic without keeping
//! the names). Deadlines are fired by [`PendingTable::expire`], which one
//! sweeper per table calls at [`PendingTable::next_deadline`]: no timer per
//! call. Sans-IO: the sweeper's clock and sleep are the caller's.
//!
//! A reply completes a call only when its id is pending and its topic names
//! the call's target and method; anything else is refused with the reason,
//! for counting.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::hash::{BuildHasher, Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use crate::recent::RecentIds;
use crate::topic::{CallTopics, MessageId, ReplyTopic};

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

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome<R> {
    /// The reply.
    Answered(R),
    /// The deadline passed first.
    TimedOut,
    /// The table was closed (shutdown) first.
    Closed,
    /// The broker refused the request with this MQTT 5 PUBACK reason code
    /// (`0x10`: no subscriber).
    Refused(u8),
    /// The connection the request went out on was dropped because the
    /// broker stopped answering: the request may have been delivered.
    Lost,
}

#[derive(Debug, Clone, Copy)]
enum Ended {
    Completed,
    Abandoned,
}

#[derive(Debug)]
enum State<R> {
    Waiting(Option<Waker>),
    Done(Outcome<R>),
}

#[derive(Debug)]
struct Slot<R> {
    /// Keyed hash of the call's target and method.
    names: u64,
    deadline: Instant,
    state: State<R>,
}

#[derive(Debug)]
struct Inner<R> {
    calls: HashMap<MessageId, Slot<R>>,
    deadlines: BTreeSet<(Instant, MessageId)>,
    ended: RecentIds<MessageId, Ended>,
    closed: bool,
}

/// The keyed hash of a call's target and method.
fn names(hasher: &RandomState, target: &str, method: &str) -> u64 {
    let mut h = hasher.build_hasher();
    target.hash(&mut h);
    method.hash(&mut h);
    h.finish()
}

impl<R> Inner<R> {
    /// Ends a waiting call with `outcome`; `None` when it had already
    /// ended, else its waker, which the caller wakes once the lock is
    /// released (the woken task would otherwise find the table locked).
    fn finish(&mut self, id: &MessageId, outcome: Outcome<R>) -> Option<Option<Waker>> {
        let slot = self.calls.get_mut(id)?;
        let State::Waiting(waker) = &mut slot.state else {
            return None;
        };
        let waker = waker.take();
        let ended = match outcome {
            Outcome::Answered(_) => Ended::Completed,
            Outcome::TimedOut | Outcome::Closed | Outcome::Refused(_) | Outcome::Lost => {
                Ended::Abandoned
            }
        };
        slot.state = State::Done(outcome);
        let deadline = slot.deadline;
        self.deadlines.remove(&(deadline, *id));
        self.ended.insert(*id, ended);
        Some(waker)
    }
}

/// Calls waiting for a reply of type `R`, keyed by [`MessageId`]. Cheap to
/// clone: clones share the table.
#[derive(Debug)]
pub struct PendingTable<R> {
    inner: Arc<Mutex<Inner<R>>>,
    /// Keys the hash of the names; hashed before the lock is taken.
    hasher: RandomState,
}

impl<R> Clone for PendingTable<R> {
    fn clone(&self) -> Self {
        PendingTable {
            inner: Arc::clone(&self.inner),
            hasher: self.hasher.clone(),
        }
    }
}

impl<R> Default for PendingTable<R> {
    fn default() -> Self {
        Self::new(DEFAULT_RECENT_CAPACITY)
    }
}

fn lock<R>(m: &Mutex<Inner<R>>) -> MutexGuard<'_, Inner<R>> {
    // The table holds no invariant a panic elsewhere could break half-way.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<R> PendingTable<R> {
    /// An empty table remembering up to `recent_capacity` ended calls.
    pub fn new(recent_capacity: usize) -> Self {
        PendingTable {
            inner: Arc::new(Mutex::new(Inner {
                calls: HashMap::new(),
                deadlines: BTreeSet::new(),
                ended: RecentIds::new(recent_capacity),
                closed: false,
            })),
            hasher: RandomState::new(),
        }
    }

    /// Registers the call `topics` describes, to end by `deadline`. The
    /// returned [`PendingCall`] resolves to its outcome; dropping it removes
    /// the call. The second value is whether this deadline is now the
    /// earliest (the sweeper must wake sooner). A call inserted into a closed
    /// table resolves `Closed` at once.
    pub fn insert(&self, topics: &CallTopics, deadline: Instant) -> (PendingCall<R>, bool) {
        let id = topics.id();
        let names = names(
            &self.hasher,
            topics.target().as_str(),
            topics.method().as_str(),
        );
        let mut inner = lock(&self.inner);
        let state = if inner.closed {
            State::Done(Outcome::Closed)
        } else {
            State::Waiting(None)
        };
        let earliest = !inner.closed
            && inner
                .deadlines
                .first()
                .is_none_or(|(first, _)| deadline < *first);
        if !inner.closed {
            inner.deadlines.insert((deadline, id));
        }
        inner.calls.insert(
            id,
            Slot {
                names,
                deadline,
                state,
            },
        );
        (
            PendingCall {
                inner: Some(Arc::clone(&self.inner)),
                id,
            },
            earliest,
        )
    }

    /// Completes the call a reply on `reply` answers with `value`.
    ///
    /// # Errors
    /// The [`Unmatched`] reason when the reply completes no call; `value` is
    /// dropped.
    pub fn complete(&self, reply: &CallTopics, value: R) -> Result<(), Unmatched> {
        self.complete_or_return(reply, value)
            .map_err(|(why, _)| why)
    }

    /// [`PendingTable::complete`], handing `value` back when it completes no
    /// call (to keep a late answer elsewhere, for instance).
    ///
    /// # Errors
    /// The [`Unmatched`] reason, and `value`.
    pub fn complete_or_return(&self, reply: &CallTopics, value: R) -> Result<(), (Unmatched, R)> {
        self.complete_in_place_or_return(
            reply.id(),
            reply.target().as_str(),
            reply.method().as_str(),
            value,
        )
    }

    /// [`PendingTable::complete_or_return`] for a reply topic read in place.
    ///
    /// # Errors
    /// The [`Unmatched`] reason, and `value`.
    pub fn complete_reply_or_return(
        &self,
        reply: &ReplyTopic<'_>,
        value: R,
    ) -> Result<(), (Unmatched, R)> {
        self.complete_in_place_or_return(reply.id(), reply.target(), reply.method(), value)
    }

    fn complete_in_place_or_return(
        &self,
        id: MessageId,
        target: &str,
        method: &str,
        value: R,
    ) -> Result<(), (Unmatched, R)> {
        let names = names(&self.hasher, target, method);
        let mut inner = lock(&self.inner);
        match inner.calls.get(&id) {
            Some(slot) if slot.names != names => Err((Unmatched::Mismatched, value)),
            Some(Slot {
                state: State::Waiting(_),
                ..
            }) => {
                let waker = inner.finish(&id, Outcome::Answered(value)).flatten();
                drop(inner);
                if let Some(w) = waker {
                    w.wake();
                }
                Ok(())
            }
            // Ended, but its caller has not looked yet.
            Some(Slot {
                state: State::Done(Outcome::Answered(_)),
                ..
            }) => Err((Unmatched::Duplicate, value)),
            Some(_) => Err((Unmatched::Late, value)),
            None => Err((
                match inner.ended.get(&id) {
                    Some(Ended::Completed) => Unmatched::Duplicate,
                    Some(Ended::Abandoned) => Unmatched::Late,
                    None => Unmatched::Unknown,
                },
                value,
            )),
        }
    }

    /// Ends the waiting call `id` with [`Outcome::Refused`]: the broker
    /// refused its request with MQTT 5 reason code `code`. Returns whether
    /// a waiting call was ended.
    pub fn refuse(&self, id: &MessageId, code: u8) -> bool {
        let mut inner = lock(&self.inner);
        let waker = inner.finish(id, Outcome::Refused(code));
        drop(inner);
        match waker {
            Some(waker) => {
                if let Some(w) = waker {
                    w.wake();
                }
                true
            }
            None => false,
        }
    }

    /// Ends every call whose deadline is at or before `now` with
    /// [`Outcome::TimedOut`]; returns how many, and the next deadline.
    pub fn expire(&self, now: Instant) -> (usize, Option<Instant>) {
        let mut wakers = Vec::new();
        let mut inner = lock(&self.inner);
        let (mut fired, mut next) = (0, None);
        while let Some(&(at, id)) = inner.deadlines.first() {
            if at > now {
                next = Some(at);
                break;
            }
            match inner.finish(&id, Outcome::TimedOut) {
                Some(waker) => wakers.extend(waker),
                None => {
                    inner.deadlines.remove(&(at, id));
                }
            }
            fired += 1;
        }
        drop(inner);
        for w in wakers {
            w.wake();
        }
        (fired, next)
    }

    /// The earliest deadline of a waiting call.
    pub fn next_deadline(&self) -> Option<Instant> {
        lock(&self.inner).deadlines.first().map(|(at, _)| *at)
    }

    /// Calls pending now (not yet ended).
    pub fn len(&self) -> usize {
        lock(&self.inner).deadlines.len()
    }

    /// Whether no call is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every waiting call with [`Outcome::Lost`] (the connection their
    /// requests went out on is gone, the broker having stopped answering);
    /// later calls are taken as usual. Returns how many were waiting.
    pub fn lose_all(&self) -> usize {
        self.end_all(false, || Outcome::Lost)
    }

    /// Ends every waiting call with [`Outcome::Closed`] and every later one
    /// at once (for shutdown); returns how many were waiting.
    pub fn close(&self) -> usize {
        self.end_all(true, || Outcome::Closed)
    }

    /// Ends every waiting call with `outcome()`, and closes the table too
    /// when `close`; returns how many were waiting.
    fn end_all(&self, close: bool, outcome: impl Fn() -> Outcome<R>) -> usize {
        let mut inner = lock(&self.inner);
        inner.closed |= close;
        let ids: Vec<MessageId> = inner.deadlines.iter().map(|(_, id)| *id).collect();
        let wakers: Vec<Waker> = ids
            .iter()
            .filter_map(|id| inner.finish(id, outcome()).flatten())
            .collect();
        drop(inner);
        for w in wakers {
            w.wake();
        }
        ids.len()
    }
}

/// One call in a [`PendingTable`]: a future resolving to its [`Outcome`].
/// Dropping it removes the call, whatever ended it.
#[derive(Debug)]
#[must_use = "dropping the call removes it from the table at once"]
pub struct PendingCall<R> {
    /// `None` once the outcome was taken: the slot is gone already.
    inner: Option<Arc<Mutex<Inner<R>>>>,
    id: MessageId,
}

impl<R> PendingCall<R> {
    /// The call's id.
    pub fn id(&self) -> MessageId {
        self.id
    }
}

impl<R> Future for PendingCall<R> {
    type Output = Outcome<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome<R>> {
        let id = self.id;
        let Some(table) = &self.inner else {
            return Poll::Ready(Outcome::Closed);
        };
        let mut inner = lock(table);
        let outcome = match inner.calls.get_mut(&id).map(|slot| &mut slot.state) {
            Some(State::Waiting(waker)) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            Some(State::Done(_)) => match inner.calls.remove(&id).map(|slot| slot.state) {
                Some(State::Done(outcome)) => outcome,
                _ => Outcome::Closed,
            },
            None => Outcome::Closed,
        };
        drop(inner);
        self.inner = None;
        Poll::Ready(outcome)
    }
}

impl<R> Drop for PendingCall<R> {
    fn drop(&mut self) {
        let Some(table) = self.inner.take() else {
            return;
        };
        let mut inner = lock(&table);
        if let Some(slot) = inner.calls.remove(&self.id) {
            if let State::Waiting(_) = slot.state {
                inner.deadlines.remove(&(slot.deadline, self.id));
                inner.ended.insert(self.id, Ended::Abandoned);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{Method, Prefix, Target};
    use std::time::Duration;

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

    fn later(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    /// Polls once with a no-op waker.
    fn poll_once<R>(c: &mut PendingCall<R>) -> Poll<Outcome<R>> {
        let waker = std::task::Waker::noop();
        Pin::new(c).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn a_matching_reply_completes_once() {
        let t = PendingTable::default();
        let c = call("car", "unlock");
        let (mut pending, earliest) = t.insert(&c, later(1000));
        assert!(earliest);
        assert_eq!(t.len(), 1);
        assert!(poll_once(&mut pending).is_pending());
        assert_eq!(t.complete(&c, 7u8), Ok(()));
        assert!(t.is_empty());
        assert_eq!(t.complete(&c, 8), Err(Unmatched::Duplicate));
        assert_eq!(poll_once(&mut pending), Poll::Ready(Outcome::Answered(7)));
        drop(pending);
        assert_eq!(t.complete(&c, 9), Err(Unmatched::Duplicate));
    }

    #[test]
    fn dropping_the_call_removes_it_and_later_replies_are_late() {
        let t = PendingTable::default();
        let c = call("car", "unlock");
        drop(t.insert(&c, later(1000)).0);
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
        assert_eq!(t.complete(&c, ()), Err(Unmatched::Late));
        assert_eq!(
            t.complete(&call("car", "unlock"), ()),
            Err(Unmatched::Unknown)
        );
    }

    #[test]
    fn a_reply_naming_another_target_or_method_is_refused_and_the_call_stays() {
        let t = PendingTable::default();
        let c = call("car-a", "unlock");
        let (_pending, _) = t.insert(&c, later(1000));
        assert_eq!(
            t.complete(&reply_for(&c, "car-b", "unlock"), ()),
            Err(Unmatched::Mismatched)
        );
        assert_eq!(
            t.complete(&reply_for(&c, "car-a", "lock"), ()),
            Err(Unmatched::Mismatched)
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.complete(&c, ()), Ok(()));
    }

    #[test]
    fn deadlines_fire_in_order_and_late_replies_are_late() {
        let t = PendingTable::default();
        let now = Instant::now();
        let (a, b) = (call("car", "a"), call("car", "b"));
        let (mut pa, first) = t.insert(&a, now + Duration::from_millis(200));
        let (mut pb, earlier) = t.insert(&b, now + Duration::from_millis(100));
        assert!(first && earlier);
        let (_c, later_one) = t.insert(&call("car", "c"), now + Duration::from_millis(300));
        assert!(!later_one);
        assert_eq!(t.next_deadline(), Some(now + Duration::from_millis(100)));
        assert_eq!(
            t.expire(now + Duration::from_millis(150)),
            (1, Some(now + Duration::from_millis(200)))
        );
        assert_eq!(poll_once(&mut pb), Poll::Ready(Outcome::TimedOut));
        assert!(poll_once(&mut pa).is_pending());
        assert_eq!(t.complete(&b, ()), Err(Unmatched::Late));
        assert_eq!(t.expire(now + Duration::from_millis(500)), (2, None));
        assert_eq!(poll_once(&mut pa), Poll::Ready(Outcome::TimedOut));
        assert!(t.is_empty());
    }

    #[test]
    fn a_refused_request_ends_its_call_and_a_late_reply_is_late() {
        let t = PendingTable::<u8>::default();
        let c = call("car", "unlock");
        let (mut pending, _) = t.insert(&c, later(1000));
        assert!(t.refuse(&c.id(), 0x10));
        assert!(!t.refuse(&c.id(), 0x10), "only a waiting call is refused");
        assert_eq!(poll_once(&mut pending), Poll::Ready(Outcome::Refused(0x10)));
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
        assert_eq!(t.complete(&c, 1), Err(Unmatched::Late));
    }

    #[test]
    fn close_ends_every_call_and_every_later_one() {
        let t = PendingTable::<u8>::default();
        let mut calls: Vec<_> = (0..5)
            .map(|_| t.insert(&call("car", "m"), later(1000)).0)
            .collect();
        assert_eq!(t.close(), 5);
        for c in &mut calls {
            assert_eq!(poll_once(c), Poll::Ready(Outcome::Closed));
        }
        let (mut late, _) = t.insert(&call("car", "m"), later(1000));
        assert_eq!(poll_once(&mut late), Poll::Ready(Outcome::Closed));
        assert!(t.is_empty());
    }

    #[test]
    fn lose_all_ends_the_waiting_calls_and_takes_later_ones() {
        let t = PendingTable::<u8>::default();
        let c = call("car", "m");
        let (mut lost, _) = t.insert(&c, later(1000));
        assert_eq!(t.lose_all(), 1);
        assert_eq!(poll_once(&mut lost), Poll::Ready(Outcome::Lost));
        // Its answer, if it comes, is late.
        assert_eq!(t.complete(&c, 1), Err(Unmatched::Late));
        let (mut next, _) = t.insert(&call("car", "m"), later(1000));
        assert_eq!(poll_once(&mut next), Poll::Pending);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn concurrent_inserts_and_completions_leave_nothing() {
        let t = PendingTable::<usize>::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..2000 {
                        let c = call("car", "m");
                        let (mut p, _) = t.insert(&c, later(10_000));
                        if i % 2 == 0 {
                            assert_eq!(t.complete(&c, i), Ok(()));
                            assert_eq!(poll_once(&mut p), Poll::Ready(Outcome::Answered(i)));
                        }
                        drop(p);
                    }
                });
            }
        });
        assert!(t.is_empty());
        assert_eq!(lock(&t.inner).calls.len(), 0);
    }
}
