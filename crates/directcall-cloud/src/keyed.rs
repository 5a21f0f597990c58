//! Calls with an idempotency key: the first call with a key runs (here, or
//! on another requester that shares the store), a retry joins it or gets its
//! stored outcome, the same key with another call is a conflict.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use directcall_core::MessageId;
use serde_json::Value;
use tokio::time::Instant;

use crate::error::Error;
use crate::invocation::Invocation;
use crate::invoke::Invoke;
use crate::keys;
use crate::records::{CallRecord, CallState};
use crate::reply::Reply;
use crate::session::Handle;

/// Runs `invocation` as a call with its idempotency key (as a plain call
/// when it has none): its outcome, and whether that outcome is a stored one
/// of another call with the key, so that this call published nothing.
pub(crate) async fn invoke(
    handle: Arc<Handle>,
    mut invocation: Invocation,
) -> (Result<Reply, Error>, bool) {
    let Some(key) = invocation.idempotency_key.take() else {
        return (
            Invoke::new(Arc::clone(&handle.shared), invocation).await,
            false,
        );
    };
    let shared = &handle.shared;
    if let Err(e) = keys::check_key(&key).and_then(|()| shared.check(&invocation)) {
        return (Err(e), false);
    }
    let key = scoped_key(&invocation, &key);
    let start = *invocation.start.get_or_insert_with(Instant::now);
    let deadline = start + invocation.timeout;
    let id = MessageId::from_key(&key);
    let fingerprint = keys::fingerprint(
        invocation.target.as_str(),
        invocation.method.as_str(),
        &invocation.request,
    );
    let (outcome, replayed) = match shared.keys.attach(&key, fingerprint) {
        keys::Attach::Conflict => return (Err(Error::KeyConflict), false),
        keys::Attach::First(tx, rx) => {
            // Another requester may hold the key: ask the shared store.
            let claim = match &shared.store {
                Some(store) => store
                    .claim(
                        &key,
                        fingerprint,
                        shared.keys.retention(),
                        crate::store::Bounded::wait_for(
                            deadline.saturating_duration_since(Instant::now()),
                        ),
                    )
                    .await
                    .unwrap_or_else(|e| {
                        // Without the store, go on here: a device still
                        // drops a retry of the same id.
                        tracing::warn!("shared store: {e}; the key is held here only");
                        None
                    }),
                None => None,
            };
            match claim {
                Some(first) if first != fingerprint => {
                    tx.send_replace(Some(Err(Error::KeyConflict)));
                    return (Err(Error::KeyConflict), false);
                }
                Some(_) => {
                    // Another requester runs it: follow its record.
                    let follower = Arc::clone(&handle);
                    tokio::spawn(async move {
                        let record = follower
                            .shared
                            .wait_call_record(
                                &id,
                                deadline.saturating_duration_since(Instant::now()),
                            )
                            .await;
                        let result = match record {
                            Some(r) => result_of_record(r, start),
                            None => Err(Error::Timeout {
                                elapsed: start.elapsed(),
                                id,
                            }),
                        };
                        tx.send_replace(Some(result));
                    });
                    return wait_outcome(&handle, rx, true, deadline, start, id).await;
                }
                None => {}
            }
            invocation.id = Some(id);
            // Runs to its end even if this caller goes away, so that every
            // call joined to it gets its outcome; it holds the requester
            // (its connection) until then.
            let runner = Arc::clone(&handle);
            tokio::spawn(async move {
                let result = Invoke::new(Arc::clone(&runner.shared), invocation).await;
                tx.send_replace(Some(result));
            });
            (rx, false)
        }
        keys::Attach::Joined(rx) => (rx, true),
    };
    wait_outcome(&handle, outcome, replayed, deadline, start, id).await
}

/// Waits for a keyed call's shared outcome, within this caller's deadline.
async fn wait_outcome(
    handle: &Handle,
    mut outcome: keys::Shared,
    replayed: bool,
    deadline: Instant,
    start: Instant,
    id: MessageId,
) -> (Result<Reply, Error>, bool) {
    let result = match tokio::time::timeout_at(deadline, outcome.wait_for(Option::is_some)).await {
        Ok(Ok(done)) => done.clone().unwrap_or(Err(Error::Closed)),
        Ok(Err(_)) => Err(Error::Closed),
        Err(_) => Err(Error::Timeout {
            elapsed: start.elapsed(),
            id,
        }),
    };
    let result = match result {
        // A stored timeout whose late answer has come since.
        Err(Error::Timeout { id, .. }) if replayed => {
            match handle.shared.fetch_call_record(&id).await {
                Some(r) if r.state == CallState::AnsweredLate => result_of_record(r, start),
                _ => Err(Error::Timeout {
                    elapsed: start.elapsed(),
                    id,
                }),
            }
        }
        other => other,
    };
    let result = result.map(|reply| Reply { replayed, ..reply });
    (result, replayed)
}

/// The id a keyed call publishes under.
///
/// # Errors
/// [`Error::Invalid`] naming `Idempotency-Key` for a malformed key.
pub(crate) fn id(invocation: &Invocation, key: &str) -> Result<MessageId, Error> {
    keys::check_key(key)?;
    Ok(MessageId::from_key(&scoped_key(invocation, key)))
}

/// Starts a keyed call whose id is `id` and returns the id once its
/// request is published, or joined to the call that holds the key.
pub(crate) async fn submit(
    handle: Arc<Handle>,
    invocation: Invocation,
    id: MessageId,
) -> Result<MessageId, Error> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let keyed = invoke(handle, invocation);
        tokio::pin!(keyed);
        // Published (or refused) on the first poll, or joined to the call
        // that holds the key.
        let first = poll_once(keyed.as_mut()).await;
        match first {
            Some((result, _)) => {
                // An outcome at once: a refusal, or a stored one.
                let _ = tx.send(match result {
                    Ok(reply) => Ok(reply.id),
                    Err(
                        Error::Timeout { id, .. }
                        | Error::NoSubscriber { id }
                        | Error::Refused { id, .. },
                    ) => Ok(id),
                    Err(e) => Err(e),
                });
            }
            None => {
                let _ = tx.send(Ok(id));
                // Its outcome lands on its record.
                let _ = keyed.await;
            }
        }
    });
    rx.await.unwrap_or(Err(Error::Closed))
}

/// What a call's record says its outcome was, for a caller joined to it.
fn result_of_record(record: CallRecord, start: Instant) -> Result<Reply, Error> {
    let id = record.id;
    match record.state {
        CallState::Answered | CallState::AnsweredLate => Ok(Reply {
            id,
            status: record.status.unwrap_or(200),
            response: record.response.unwrap_or(Value::Null),
            elapsed: start.elapsed(),
            replayed: false,
        }),
        CallState::Offline => Err(Error::NoSubscriber { id }),
        // The record keeps why; `status` is the one field that can be bad.
        CallState::BadReply => Err(Error::BadReply {
            id,
            field: directcall_core::Field::Status,
            reason: record
                .response
                .as_ref()
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        }),
        CallState::Unavailable => Err(Error::Refused {
            id,
            code: record.reason_code.unwrap_or(0x80),
        }),
        _ => Err(Error::Timeout {
            elapsed: start.elapsed(),
            id,
        }),
    }
}

/// The key a call's idempotency key is kept under: its scope's and its own.
fn scoped_key(invocation: &Invocation, key: &str) -> String {
    match &invocation.caller {
        Some(caller) => format!("{caller}\0{key}"),
        None => key.to_owned(),
    }
}

/// Polls `f` once: its output if it is ready at once.
pub(crate) async fn poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match Pin::new(&mut f).poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}
