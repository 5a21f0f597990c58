//! The records of group calls answered 202 (`GET /v1/groups/{id}`): in
//! this gateway's memory, for the record retention, at most
//! `max_records` of them and [`MAX_GROUP_RECORD_BYTES`] of results in all,
//! the oldest going first. Below the state, which holds them, and the
//! group routes, which fill and read them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use directcall_core::{MessageId, Method};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{DeviceResult, GroupSummary, RecordOptions};

/// The most bytes of results the records of group calls answered 202 hold
/// in all, in memory (64 MiB); past it, the oldest records go first.
pub const MAX_GROUP_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// The records of group calls answered 202, in this gateway's memory.
#[derive(Debug)]
pub(crate) struct GroupRecords {
    options: RecordOptions,
    max_bytes: usize,
    bytes: AtomicUsize,
    inner: Mutex<RecordsInner>,
}

#[derive(Debug, Default)]
struct RecordsInner {
    /// Oldest first; an entry whose record was replaced (a keyed retry)
    /// is skipped.
    order: VecDeque<Arc<GroupRecord>>,
    by_id: HashMap<MessageId, Arc<GroupRecord>>,
}

/// One group call's record.
#[derive(Debug)]
pub(crate) struct GroupRecord {
    id: MessageId,
    method: Method,
    caller: Option<String>,
    started: Instant,
    state: Mutex<RecordState>,
    done: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct RecordState {
    results: Vec<Value>,
    bytes: usize,
    summary: GroupSummary,
    done: bool,
    /// Pushed out (its retention, the bounds): takes no more results.
    evicted: bool,
}

impl GroupRecords {
    pub(crate) fn new(options: RecordOptions, max_bytes: usize) -> Self {
        GroupRecords {
            options,
            max_bytes,
            bytes: AtomicUsize::new(0),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecordsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new record (replacing one of the same id: a keyed retry).
    /// How long a finished record is kept.
    pub(crate) fn retention(&self) -> std::time::Duration {
        self.options.retention
    }

    pub(crate) fn insert(
        &self,
        id: MessageId,
        method: Method,
        caller: Option<String>,
    ) -> Arc<GroupRecord> {
        let record = Arc::new(GroupRecord {
            id,
            method,
            caller,
            started: Instant::now(),
            state: Mutex::default(),
            done: watch::channel(false).0,
        });
        let mut inner = self.lock();
        if let Some(old) = inner.by_id.insert(id, Arc::clone(&record)) {
            self.evict(&old);
        }
        inner.order.push_back(Arc::clone(&record));
        self.prune(&mut inner);
        record
    }

    fn evict(&self, record: &GroupRecord) {
        let mut state = record.lock();
        if !state.evicted {
            state.evicted = true;
            self.bytes.fetch_sub(state.bytes, Relaxed);
            state.results = Vec::new();
        }
    }

    /// Drops records past their retention, and the oldest past the
    /// bounds.
    fn prune(&self, inner: &mut RecordsInner) {
        while let Some(oldest) = inner.order.front() {
            let current = inner
                .by_id
                .get(&oldest.id)
                .is_some_and(|r| Arc::ptr_eq(r, oldest));
            let expired = oldest.lock().done && oldest.started.elapsed() > self.options.retention;
            let over = inner.by_id.len() > self.options.max_records
                || self.bytes.load(Relaxed) > self.max_bytes;
            if current && !expired && !over {
                break;
            }
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if current {
                inner.by_id.remove(&oldest.id);
                self.evict(&oldest);
            }
        }
    }

    pub(crate) fn get(&self, id: &MessageId) -> Option<Arc<GroupRecord>> {
        let mut inner = self.lock();
        self.prune(&mut inner);
        inner.by_id.get(id).cloned()
    }

    pub(crate) fn push(&self, record: &GroupRecord, result: &DeviceResult, summary: &GroupSummary) {
        let value = serde_json::to_value(result).unwrap_or(Value::Null);
        let size = value.to_string().len();
        {
            let mut state = record.lock();
            state.summary = summary.clone();
            if state.evicted {
                return;
            }
            state.results.push(value);
            state.bytes += size;
        }
        if self.bytes.fetch_add(size, Relaxed) + size > self.max_bytes {
            let mut inner = self.lock();
            self.prune(&mut inner);
        }
    }

    pub(crate) fn finish(&self, record: &GroupRecord, summary: &GroupSummary) {
        {
            let mut state = record.lock();
            state.summary = summary.clone();
            state.done = true;
        }
        record.done.send_replace(true);
    }
}

impl GroupRecord {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecordState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Who made the call, when the gateway knows its callers.
    pub(crate) fn caller(&self) -> Option<&str> {
        self.caller.as_deref()
    }

    /// Turns `true` when the call is done.
    pub(crate) fn watch_done(&self) -> watch::Receiver<bool> {
        self.done.subscribe()
    }

    pub(crate) fn body(&self) -> Value {
        let state = self.lock();
        let mut summary = state.summary.clone();
        if !state.done {
            summary.elapsed_ms = directcall_core::deadline::whole_millis(self.started.elapsed());
        }
        let mut body = json!({
            "id": self.id.to_string(),
            "method": self.method.as_str(),
            "state": if state.done { "done" } else { "running" },
            "results": state.results,
            "summary": summary,
        });
        if let Some(c) = &self.caller {
            body["caller"] = json!(c);
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use directcall_core::Target;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn records_keep_their_retention_and_bounds() {
        let options = RecordOptions {
            retention: Duration::from_secs(10),
            max_records: 2,
        };
        let records = GroupRecords::new(options, 300);
        let m = Method::new("m").unwrap();
        let result = |name: &str| DeviceResult {
            target: Target::new(name).unwrap(),
            outcome: crate::DeviceOutcome::Ok,
            status: Some(200),
            response: Some(json!("done")),
            latency: None,
            reason: None,
            replayed: false,
        };
        let (a, b, c) = (MessageId::new(), MessageId::new(), MessageId::new());
        let ra = records.insert(a, m.clone(), None);
        records.push(&ra, &result("x"), &GroupSummary::default());
        records.finish(&ra, &GroupSummary::default());
        let rb = records.insert(b, m.clone(), Some("ops".into()));
        assert_eq!(records.get(&a).unwrap().body()["state"], "done");
        assert_eq!(records.get(&b).unwrap().body()["state"], "running");
        assert_eq!(records.get(&b).unwrap().body()["caller"], "ops");
        // A third: the oldest goes.
        let _rc = records.insert(c, m.clone(), None);
        assert!(records.get(&a).is_none());
        assert!(records.get(&b).is_some());
        // Past the bytes bound, the oldest goes too, and takes no more.
        for i in 0..10 {
            records.push(&rb, &result(&format!("d{i}")), &GroupSummary::default());
        }
        assert!(records.get(&b).is_none());
        assert!(records.bytes.load(Relaxed) <= 300);
        // Past the retention, a finished record goes.
        records.finish(&_rc, &GroupSummary::default());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(records.get(&c).is_none());
    }
}
