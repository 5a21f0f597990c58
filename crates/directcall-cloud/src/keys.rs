//! Idempotency keys: one execution per key. The first call with a key runs;
//! a call with the same key and the same call (target, method, request)
//! while it runs waits for its outcome, and after it gets the stored
//! outcome; the same key with another call is a conflict.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use directcall_core::{Error as CoreError, Field};
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::records::RecordOptions;
use crate::{Error, Reply};

/// The outcome of a keyed call, once known.
pub(crate) type Shared = watch::Receiver<Option<Result<Reply, Error>>>;

/// The longest key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// Checks an idempotency key: 1 to 255 visible ASCII characters.
///
/// # Errors
/// [`Error::Invalid`] naming `Idempotency-Key`.
pub(crate) fn check_key(key: &str) -> Result<(), Error> {
    let reason = if key.is_empty() {
        "is empty"
    } else if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        "is longer than 255 bytes"
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        "may hold only visible ASCII characters (no spaces)"
    } else {
        return Ok(());
    };
    Err(CoreError::invalid(Field::IdempotencyKey, reason.to_owned()).into())
}

/// What a call is, for telling a retry from another call under one key.
pub(crate) fn fingerprint(target: &str, method: &str, request: &serde_json::Value) -> Uuid {
    let mut bytes = Vec::with_capacity(target.len() + method.len() + 64);
    bytes.extend_from_slice(target.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(method.as_bytes());
    bytes.push(0);
    // serde_json's maps are sorted by key: the same value writes the same.
    let _ = serde_json::to_writer(&mut bytes, request);
    Uuid::new_v5(&Uuid::NAMESPACE_OID, &bytes)
}

/// Where a keyed call stands for its caller.
pub(crate) enum Attach {
    /// The first call with this key: run it and send its outcome.
    First(watch::Sender<Option<Result<Reply, Error>>>, Shared),
    /// A call with this key ran or runs: wait for (or take) its outcome.
    Joined(Shared),
    /// The key was used for another call.
    Conflict,
}

/// The keys of one requester, in memory, for a retention window.
#[derive(Debug)]
pub(crate) struct Keys {
    options: RecordOptions,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_key: HashMap<String, (Uuid, Shared)>,
    order: VecDeque<(Instant, String)>,
}

impl Keys {
    pub(crate) fn new(options: RecordOptions) -> Self {
        Keys {
            options,
            inner: Mutex::default(),
        }
    }

    /// How long a key is kept.
    pub(crate) fn retention(&self) -> std::time::Duration {
        self.options.retention
    }

    /// Attaches a call with `fingerprint` to `key`.
    pub(crate) fn attach(&self, key: &str, fingerprint: Uuid) -> Attach {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((at, _)) = inner.order.front() {
            let expired = now.saturating_duration_since(*at) >= self.options.retention;
            if !expired && inner.by_key.len() < self.options.max_records {
                break;
            }
            if let Some((_, old)) = inner.order.pop_front() {
                inner.by_key.remove(&old);
            }
        }
        match inner.by_key.get(key) {
            Some((f, _)) if *f != fingerprint => Attach::Conflict,
            Some((_, outcome)) => Attach::Joined(outcome.clone()),
            None => {
                let (tx, rx) = watch::channel(None);
                inner
                    .by_key
                    .insert(key.to_owned(), (fingerprint, rx.clone()));
                inner.order.push_back((now, key.to_owned()));
                Attach::First(tx, rx)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn keys_are_checked() {
        assert!(check_key("a-1_B.c~").is_ok());
        for bad in ["", "has space", "tab\t", "é", &"k".repeat(256)] {
            let e = check_key(bad).unwrap_err();
            assert!(e.to_string().contains("Idempotency-Key"), "{e}");
        }
    }

    #[test]
    fn a_fingerprint_tells_calls_apart_and_ignores_key_order() {
        let a = fingerprint("car", "unlock", &json!({"a": 1, "b": 2}));
        assert_eq!(a, fingerprint("car", "unlock", &json!({"b": 2, "a": 1})));
        assert_ne!(a, fingerprint("car", "lock", &json!({"a": 1, "b": 2})));
        assert_ne!(a, fingerprint("car2", "unlock", &json!({"a": 1, "b": 2})));
        assert_ne!(a, fingerprint("car", "unlock", &json!({"a": 1, "b": 3})));
    }

    #[tokio::test(start_paused = true)]
    async fn one_key_runs_once_conflicts_and_expires() {
        let keys = Keys::new(RecordOptions::new(Duration::from_secs(60), 10));
        let f = fingerprint("car", "unlock", &json!(null));
        let Attach::First(tx, _) = keys.attach("k", f) else {
            panic!("first")
        };
        assert!(matches!(keys.attach("k", f), Attach::Joined(_)));
        let other = fingerprint("car", "lock", &json!(null));
        assert!(matches!(keys.attach("k", other), Attach::Conflict));
        drop(tx);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(matches!(keys.attach("k", other), Attach::First(..)));
    }
}
