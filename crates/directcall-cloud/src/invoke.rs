//! The future of one call: its in-flight slot, its publish, and its wait
//! for the outcome, never past its deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use directcall_core::{MessageId, Outcome, PendingCall};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;

use crate::error::Error;
use crate::invocation::Invocation;
use crate::records::{self, CallState, Records};
use crate::reply::Reply;
use crate::session::{Shared, Slot};

/// The future of one call, returned by
/// [`Requester::invoke`](crate::Requester::invoke).
///
/// Lazy, as Rust futures are: nothing is checked or published until it is
/// first polled (awaited, or spawned), and one dropped before that
/// publishes nothing. From its first poll it owns what it needs (no borrow
/// of the requester); while it waits it holds only the call's slot, its
/// in-flight permit, its start and its id.
#[must_use = "nothing is published until the call is awaited (or spawned); dropped unpolled, it publishes nothing"]
pub struct Invoke {
    state: InvokeState,
}

impl std::fmt::Debug for Invoke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            InvokeState::Unpolled(_) => "not started",
            InvokeState::Failed(_) => "failed",
            InvokeState::Waiting(_) => "waiting",
            InvokeState::Slow { .. } => "waiting for an in-flight slot",
            InvokeState::Done => "done",
        };
        f.debug_struct("Invoke").field("state", &state).finish()
    }
}

enum InvokeState {
    /// Not polled yet: nothing checked, nothing published. Boxed, so a
    /// waiting call's future stays as small as it was.
    Unpolled(Box<(Arc<Shared>, Invocation)>),
    /// Refused before anything was published.
    Failed(Option<Box<Error>>),
    Waiting(Waiting),
    /// The in-flight limit was full, or the call has an idempotency key:
    /// the rare paths, boxed; `id` when it is known yet.
    Slow {
        id: Option<MessageId>,
        future: Pin<Box<dyn Future<Output = Result<Reply, Error>> + Send>>,
    },
    Done,
}

/// A published call waiting for its outcome. Kept small, as every pending
/// call holds one (`Invoke` is 48 bytes): the id is the pending slot's, and
/// the in-flight slot is given back by `drop`, not held as a permit.
struct Waiting {
    shared: Arc<Shared>,
    call: PendingCall<Slot>,
    start: Instant,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // The in-flight slot `send` took.
        self.shared.permits.add_permits(1);
        self.shared.metrics.pending.decrement(1.0);
    }
}

impl Invoke {
    /// The call of `invocation`, started on its first poll.
    pub(crate) fn new(shared: Arc<Shared>, invocation: Invocation) -> Self {
        Invoke {
            state: InvokeState::Unpolled(Box::new((shared, invocation))),
        }
    }

    /// Checks `invocation`, takes an in-flight slot and publishes its
    /// request (or, when every slot is taken, goes on to wait for one
    /// first): what the first poll does.
    fn start(shared: Arc<Shared>, invocation: Invocation) -> Self {
        let start = invocation.start.unwrap_or_else(Instant::now);
        if let Err(e) = shared.check(&invocation) {
            return Invoke::failed(e);
        }
        let id = invocation.id.unwrap_or_else(MessageId::new);
        let at = start + invocation.timeout;
        let state = match Arc::clone(&shared.permits).try_acquire_owned() {
            Ok(permit) => match Waiting::send(shared, invocation, permit, start, id, at) {
                Ok(waiting) => InvokeState::Waiting(waiting),
                Err(e) => return Invoke::failed(e),
            },
            Err(TryAcquireError::Closed) => return Invoke::failed(Error::Closed),
            // Only a full in-flight limit makes a call wait for a slot.
            Err(TryAcquireError::NoPermits) => InvokeState::Slow {
                id: Some(id),
                future: Box::pin(async move {
                    let permit = acquire_by(&shared.permits, at, start, id).await;
                    let permit = shared.count_timeout(permit)?;
                    let waiting =
                        Waiting::send(Arc::clone(&shared), invocation, permit, start, id, at)?;
                    Invoke {
                        state: InvokeState::Waiting(waiting),
                    }
                    .await
                }),
            },
        };
        Invoke { state }
    }

    /// A call whose outcome `outcome` will be, with no id known yet.
    pub(crate) fn from_future(
        outcome: impl Future<Output = Result<Reply, Error>> + Send + 'static,
    ) -> Self {
        Invoke {
            state: InvokeState::Slow {
                id: None,
                future: Box::pin(outcome),
            },
        }
    }

    /// The call's id, once its first poll gave it one (none for a call
    /// refused at once, or not polled yet).
    pub(crate) fn id(&self) -> Option<MessageId> {
        match &self.state {
            InvokeState::Waiting(w) => Some(w.call.id()),
            InvokeState::Slow { id, .. } => *id,
            InvokeState::Unpolled(_) | InvokeState::Failed(_) | InvokeState::Done => None,
        }
    }

    fn failed(e: Error) -> Self {
        Invoke {
            state: InvokeState::Failed(Some(Box::new(e))),
        }
    }
}

impl Waiting {
    fn send(
        shared: Arc<Shared>,
        invocation: Invocation,
        permit: OwnedSemaphorePermit,
        start: Instant,
        id: MessageId,
        at: Instant,
    ) -> Result<Self, Error> {
        let call = shared.send(invocation, id, at)?;
        shared.metrics.pending.increment(1.0);
        // Given back when the `Waiting` drops.
        permit.forget();
        Ok(Waiting {
            shared,
            call,
            start,
        })
    }
}

impl Future for Invoke {
    type Output = Result<Reply, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The first poll starts the call: check, slot, publish.
        if matches!(self.state, InvokeState::Unpolled(_)) {
            if let InvokeState::Unpolled(unpolled) =
                std::mem::replace(&mut self.state, InvokeState::Done)
            {
                let (shared, invocation) = *unpolled;
                *self = Invoke::start(shared, invocation);
            }
        }
        match &mut self.state {
            InvokeState::Failed(e) => {
                let e = e.take().map_or(Error::Closed, |e| *e);
                self.state = InvokeState::Done;
                Poll::Ready(Err(e))
            }
            InvokeState::Waiting(w) => {
                let Poll::Ready(outcome) = Pin::new(&mut w.call).poll(cx) else {
                    return Poll::Pending;
                };
                let id = w.call.id();
                let result = w.shared.count_timeout(reply_of(outcome, w.start, id));
                if let Some(records) = &w.shared.records {
                    record_outcome(records, id, &result);
                }
                // Gives back the in-flight slot and the pending gauge.
                self.state = InvokeState::Done;
                Poll::Ready(result)
            }
            InvokeState::Slow { future, .. } => {
                let result = std::task::ready!(future.as_mut().poll(cx));
                self.state = InvokeState::Done;
                Poll::Ready(result)
            }
            // Started above; a finished call polled again.
            InvokeState::Unpolled(_) | InvokeState::Done => {
                panic!("Invoke polled after it completed")
            }
        }
    }
}

/// Takes an in-flight slot, waiting for one no later than `at`.
async fn acquire_by(
    permits: &Arc<Semaphore>,
    at: Instant,
    start: Instant,
    id: MessageId,
) -> Result<OwnedSemaphorePermit, Error> {
    match Arc::clone(permits).try_acquire_owned() {
        Ok(permit) => Ok(permit),
        Err(TryAcquireError::Closed) => Err(Error::Closed),
        Err(TryAcquireError::NoPermits) => {
            match tokio::time::timeout_at(at, Arc::clone(permits).acquire_owned()).await {
                Ok(Ok(permit)) => Ok(permit),
                Ok(Err(_)) => Err(Error::Closed),
                Err(_) => Err(Error::Timeout {
                    elapsed: start.elapsed(),
                    id,
                }),
            }
        }
    }
}

/// Puts a call's outcome on its record; a late answer that came first is
/// kept.
fn record_outcome(records: &Records, id: MessageId, result: &Result<Reply, Error>) {
    records.update(&id, |r| {
        if !matches!(r.state, CallState::Sent | CallState::Delivered) {
            return;
        }
        match result {
            Ok(reply) => {
                r.state = CallState::Answered;
                r.answered_at_ms = Some(records::now_ms());
                r.delivered_by_answer();
                r.status = Some(reply.status);
                r.response = Some(reply.response.clone());
            }
            // No answer, and one may still come late.
            Err(Error::Timeout { .. } | Error::BrokerHung { .. }) => {
                r.state = CallState::TimedOut;
            }
            Err(Error::NoSubscriber { .. }) => {
                r.state = CallState::Offline;
                r.reason_code = Some(0x10);
            }
            Err(Error::Refused { code, .. }) => {
                r.state = CallState::Unavailable;
                r.reason_code = Some(*code);
            }
            // Closed: the requester shut down; the record stays `sent`.
            Err(_) => {}
        }
    });
}

/// What a call's outcome means to its caller.
fn reply_of(outcome: Outcome<Slot>, start: Instant, id: MessageId) -> Result<Reply, Error> {
    match outcome {
        Outcome::Answered(answer) => match *answer {
            Ok(reply) => Ok(Reply {
                id,
                status: reply.status,
                response: reply.response,
                elapsed: start.elapsed(),
                replayed: false,
            }),
            // A reply on the call's topic, with its id, that breaks the rules.
            Err(bad) => Err(bad),
        },
        Outcome::TimedOut => Err(Error::Timeout {
            elapsed: start.elapsed(),
            id,
        }),
        Outcome::Refused(0x10) => Err(Error::NoSubscriber { id }),
        Outcome::Refused(code) => Err(Error::Refused { id, code }),
        Outcome::Lost => Err(Error::BrokerHung {
            elapsed: start.elapsed(),
            id,
        }),
        // Closed, and what a later version of the table may add.
        _ => Err(Error::Closed),
    }
}

#[cfg(test)]
mod tests {
    //! The deadline logic on tokio's paused clock: exact and instant.
    use std::time::Duration;

    use directcall_core::{CallTopics, Method, PendingTable, Prefix, ReplyPayload, Target};
    use serde_json::Value;
    use tokio::sync::{watch, Notify};

    use super::*;
    use crate::session::sweep_deadlines;

    const SECOND: Duration = Duration::from_secs(1);

    /// A table with its sweeper running, as a requester has them.
    fn table() -> (PendingTable<Slot>, Arc<Notify>, watch::Sender<bool>) {
        let table = PendingTable::default();
        let wake = Arc::new(Notify::new());
        let stop = watch::Sender::new(false);
        tokio::spawn(sweep_deadlines(
            table.clone(),
            Arc::clone(&wake),
            stop.subscribe(),
        ));
        (table, wake, stop)
    }

    fn topics(id: MessageId) -> CallTopics {
        CallTopics::new(
            Target::new("car").unwrap(),
            Method::new("m").unwrap(),
            Prefix::default(),
            id,
        )
        .unwrap()
    }

    /// Registers a call as `send` does, telling the sweeper when it is the earliest.
    fn register(
        table: &PendingTable<Slot>,
        wake: &Notify,
        id: MessageId,
        at: Instant,
    ) -> PendingCall<Slot> {
        let (call, earliest) = table.insert(&topics(id), at.into_std());
        if earliest {
            wake.notify_one();
        }
        call
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_before_the_deadline_is_the_answer() {
        let (table, wake, _stop) = table();
        let start = Instant::now();
        let id = MessageId::new();
        let call = register(&table, &wake, id, start + SECOND);
        let t = table.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(999)).await;
            let reply = ReplyPayload::new(id.to_string(), 200, Value::from("done"));
            t.complete(&topics(id), Box::new(Ok(reply))).unwrap();
        });
        let reply = reply_of(call.await, start, id).unwrap();
        assert_eq!(reply.elapsed, Duration::from_millis(999));
        assert_eq!(reply.response, Value::from("done"));
        assert!(table.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn no_reply_times_out_exactly_at_the_deadline() {
        let (table, wake, _stop) = table();
        let start = Instant::now();
        let id = MessageId::new();
        let e = reply_of(register(&table, &wake, id, start + SECOND).await, start, id).unwrap_err();
        assert!(
            matches!(e, Error::Timeout { elapsed, .. } if elapsed == SECOND),
            "{e:?}"
        );
        assert!(table.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_counts_from_the_start_not_from_the_wait() {
        let (table, wake, _stop) = table();
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let id = MessageId::new();
        let e = reply_of(register(&table, &wake, id, start + SECOND).await, start, id).unwrap_err();
        assert!(
            matches!(e, Error::Timeout { elapsed, .. } if elapsed == SECOND),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_registered_later_still_fires_on_time() {
        let (table, wake, _stop) = table();
        let start = Instant::now();
        let (slow, quick) = (MessageId::new(), MessageId::new());
        let slow_call = register(&table, &wake, slow, start + 10 * SECOND);
        // The sweeper now sleeps towards 10 s; a 1 s call must wake it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let e = reply_of(
            register(&table, &wake, quick, start + SECOND).await,
            start,
            quick,
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Timeout { elapsed, .. } if elapsed == SECOND),
            "{e:?}"
        );
        let e = reply_of(slow_call.await, start, slow).unwrap_err();
        assert!(
            matches!(e, Error::Timeout { elapsed, .. } if elapsed == 10 * SECOND),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_table_means_closed_at_once() {
        let (table, wake, _stop) = table();
        let start = Instant::now();
        let id = MessageId::new();
        let call = register(&table, &wake, id, start + SECOND);
        let t = table.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            t.close();
        });
        let e = reply_of(call.await, start, id).unwrap_err();
        assert!(matches!(e, Error::Closed), "{e:?}");
        assert_eq!(start.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_slot_never_passes_the_deadline() {
        let permits = Arc::new(Semaphore::new(1));
        let _busy = permits.try_acquire().unwrap();
        let start = Instant::now();
        let e = acquire_by(&permits, start + SECOND, start, MessageId::new())
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Timeout { elapsed, .. } if elapsed == SECOND),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_freed_in_time_is_taken() {
        let permits = Arc::new(Semaphore::new(1));
        let busy = Arc::clone(&permits).try_acquire_owned().unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            drop(busy);
        });
        let start = Instant::now();
        let _permit = acquire_by(&permits, start + SECOND, start, MessageId::new())
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_while_waiting_for_a_slot_is_closed_not_a_timeout() {
        let permits = Arc::new(Semaphore::new(1));
        let _busy = permits.try_acquire().unwrap();
        let closer = Arc::clone(&permits);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            closer.close();
        });
        let start = Instant::now();
        let e = acquire_by(&permits, start + SECOND, start, MessageId::new())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Closed), "{e:?}");
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }
}
