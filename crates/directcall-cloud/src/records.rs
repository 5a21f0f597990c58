//! Call records: what became of each published call, kept for a retention
//! window so that a caller who got a timeout can still learn what the
//! device did (a reply that arrives after the deadline is stored as
//! `answered_late`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use directcall_core::{CallTopics, MessageId, Method, Target};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

/// Where a call stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CallState {
    /// Published; no answer yet.
    Sent,
    /// The device acknowledged receipt (it was asked to, and knows how);
    /// no answer yet.
    Delivered,
    /// The device answered before the deadline.
    Answered,
    /// No answer before the deadline (yet: it may become `AnsweredLate`).
    TimedOut,
    /// The device answered after the deadline; its answer is on the record.
    AnsweredLate,
    /// The broker refused the request (MQTT 5 PUBACK reason code): not
    /// delivered.
    Unavailable,
    /// MQTT 5: no device was subscribed to the target's requests.
    Offline,
    /// The device answered with a reply that breaks the protocol's rules
    /// (a `status` that is not an integer from 0 to 65535); `response` says
    /// what was wrong. In time or late: the call ended on it, or would have.
    BadReply,
}

impl CallState {
    /// Whether nothing more will change it: the device answered (in time
    /// or late), or never can (offline, unavailable). `TimedOut` is not:
    /// a late answer may still come.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CallState::Sent | CallState::Delivered | CallState::TimedOut
        )
    }
}

/// The record of one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CallRecord {
    /// The call's id (the `m_id` of its topics).
    #[serde(serialize_with = "as_text", deserialize_with = "id_from_text")]
    pub id: MessageId,
    /// The device called.
    #[serde(serialize_with = "as_text", deserialize_with = "target_from_text")]
    pub target: Target,
    /// The method called.
    #[serde(serialize_with = "as_text", deserialize_with = "method_from_text")]
    pub method: Method,
    /// Where it stands.
    pub state: CallState,
    /// When it was published, in milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// When the device's delivery receipt arrived, in milliseconds since
    /// the Unix epoch; for a call that asked for one and was answered
    /// before the device sent it (a device answering within its
    /// `RECEIPT_AFTER`, 10 ms, sends none), when the answer did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at_ms: Option<u64>,
    /// When its answer arrived (in time or late), in milliseconds since the
    /// Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered_at_ms: Option<u64>,
    /// The device's status, once it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The device's answer, once it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// MQTT 5: the broker's PUBACK reason code when it refused the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<u8>,
    /// Who made the call ([`Invocation::caller`](crate::Invocation::caller)),
    /// if it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// Why the call is `unavailable` when the broker did not say: the
    /// gateway that made it shut down before it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request asked for a delivery receipt.
    #[serde(skip)]
    pub(crate) receipt: bool,
}

impl CallRecord {
    /// Takes an answer that came after the deadline, if the call is still
    /// open to one: timed out (or about to be told so), or left open by a
    /// gateway that shut down. Returns whether it took it.
    pub(crate) fn take_late_answer(&mut self, status: u16, response: Value) -> bool {
        let open = match self.state {
            CallState::TimedOut | CallState::Sent | CallState::Delivered => true,
            CallState::Unavailable => self.reason.as_deref() == Some(SHUT_DOWN_REASON),
            _ => false,
        };
        if open {
            self.state = CallState::AnsweredLate;
            self.answered_at_ms = Some(now_ms());
            self.delivered_by_answer();
            self.status = Some(status);
            self.response = Some(response);
        }
        open
    }

    /// An answer to a call that asked for a receipt and got none is its
    /// delivery too.
    pub(crate) fn delivered_by_answer(&mut self) {
        if self.receipt && self.delivered_at_ms.is_none() {
            self.delivered_at_ms = self.answered_at_ms;
        }
    }
}

fn as_text<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    String::deserialize(d)
}

fn id_from_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<MessageId, D::Error> {
    MessageId::parse(&text(d)?).map_err(serde::de::Error::custom)
}

fn target_from_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Target, D::Error> {
    Target::new(text(d)?).map_err(serde::de::Error::custom)
}

fn method_from_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Method, D::Error> {
    Method::new(text(d)?).map_err(serde::de::Error::custom)
}

/// How long records are kept, and how many at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordOptions {
    /// A record is forgotten this long after its call was sent.
    pub retention: Duration,
    /// At most this many records; the oldest go first.
    pub max_records: usize,
}

impl Default for RecordOptions {
    /// 10 minutes, 100,000 records.
    fn default() -> Self {
        RecordOptions {
            retention: Duration::from_secs(600),
            max_records: 100_000,
        }
    }
}

impl RecordOptions {
    /// Records kept for `retention`, at most `max_records` of them.
    pub fn new(retention: Duration, max_records: usize) -> Self {
        RecordOptions {
            retention,
            max_records: max_records.max(1),
        }
    }
}

/// The records of one requester, in memory.
#[derive(Debug)]
pub(crate) struct Records {
    options: RecordOptions,
    inner: Mutex<Inner>,
    /// Every change, for the shared store's writer (when there is a store).
    mirror: Option<tokio::sync::mpsc::Sender<Mirrored>>,
    /// Woken whenever a record changes state.
    changed: tokio::sync::Notify,
}

/// What the shared store's writer is sent.
#[derive(Debug)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum Mirrored {
    /// A record as it now stands.
    Record(CallRecord),
    /// Answer once everything sent before is written (or failed).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The reason on the record of a call its gateway did not see end.
pub const SHUT_DOWN_REASON: &str = "the gateway shut down before the call ended";

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<MessageId, (Instant, CallRecord)>,
    /// Ids in the order they were recorded, for expiry.
    order: VecDeque<(Instant, MessageId)>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Records {
    pub(crate) fn new(options: RecordOptions) -> Self {
        Records {
            options,
            inner: Mutex::default(),
            mirror: None,
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Sends every change of a record to `mirror` too.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn mirrored(mut self, mirror: tokio::sync::mpsc::Sender<Mirrored>) -> Self {
        self.mirror = Some(mirror);
        self
    }

    fn mirror(&self, record: &CallRecord) {
        if let Some(m) = &self.mirror {
            if m.try_send(Mirrored::Record(record.clone())).is_err() {
                tracing::warn!(id = %record.id, "the shared store is behind: a record change was not written");
            }
        }
    }

    pub(crate) fn options(&self) -> RecordOptions {
        self.options
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a call just published.
    pub(crate) fn sent(
        &self,
        id: MessageId,
        target: Target,
        method: Method,
        caller: Option<String>,
        receipt: bool,
    ) {
        let now = Instant::now();
        let record = CallRecord {
            id,
            target,
            method,
            state: CallState::Sent,
            sent_at_ms: now_ms(),
            delivered_at_ms: None,
            answered_at_ms: None,
            status: None,
            response: None,
            reason_code: None,
            caller,
            reason: None,
            receipt,
        };
        self.mirror(&record);
        let mut inner = self.lock();
        inner.prune(now, &self.options, true);
        inner.by_id.insert(id, (now, record));
        inner.order.push_back((now, id));
    }

    /// The device answered `call` with a reply that breaks the rules,
    /// `why`: its record says so, unless it holds an answer already, or
    /// the reply's topic names another target or method than the record.
    pub(crate) fn bad_reply(&self, call: &CallTopics, why: String) {
        self.update(&call.id(), |r| {
            let own = r.target == *call.target() && r.method == *call.method();
            if own
                && matches!(
                    r.state,
                    CallState::Sent | CallState::Delivered | CallState::TimedOut
                )
            {
                r.state = CallState::BadReply;
                r.answered_at_ms = Some(now_ms());
                r.response = Some(Value::String(why));
            }
        });
    }

    /// Changes the record of `id`, if it is still kept.
    pub(crate) fn update(&self, id: &MessageId, change: impl FnOnce(&mut CallRecord)) {
        let changed = self.lock().by_id.get_mut(id).map(|(_, record)| {
            change(record);
            self.mirror.is_some().then(|| record.clone())
        });
        if let Some(Some(record)) = changed {
            self.mirror(&record);
        }
        self.changed.notify_waiters();
    }

    /// The record of `id` once it is final ([`CallState::is_final`]), waiting at most until
    /// `deadline`; then as it stands. `None` when there is no record.
    pub(crate) async fn wait_final(&self, id: &MessageId, deadline: Instant) -> Option<CallRecord> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so no change can slip between.
            changed.as_mut().enable();
            let record = self.get(id)?;
            if record.state.is_final() {
                return Some(record);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.get(id);
            }
        }
    }

    /// A late answer: stored on a call that timed out (or is about to be
    /// told so). Returns whether a record took it.
    pub(crate) fn answered_late(&self, id: &MessageId, status: u16, response: Value) -> bool {
        let mut taken = false;
        self.update(id, |r| taken = r.take_late_answer(status, response));
        taken
    }

    /// The device acknowledged receipt of `id`.
    pub(crate) fn delivered(&self, id: &MessageId) {
        self.update(id, |r| {
            if r.delivered_at_ms.is_none() {
                r.delivered_at_ms = Some(now_ms());
            }
            if r.state == CallState::Sent {
                r.state = CallState::Delivered;
            }
        });
    }

    /// Ends every call still open (`sent`, `delivered`) as `unavailable`
    /// with `reason`, for a requester that stops before they end. Returns
    /// how many.
    pub(crate) fn abandon_open(&self, reason: &str) -> usize {
        let mut changed = Vec::new();
        for (_, r) in self.lock().by_id.values_mut() {
            if matches!(r.state, CallState::Sent | CallState::Delivered) {
                r.state = CallState::Unavailable;
                r.reason = Some(reason.to_owned());
                changed.push(r.clone());
            }
        }
        for r in &changed {
            self.mirror(r);
        }
        self.changed.notify_waiters();
        changed.len()
    }

    /// Waits (at most `within`) until every change so far is in the
    /// shared store; at once without one. Returns whether it got there.
    pub(crate) async fn flush(&self, within: std::time::Duration) -> bool {
        let Some(m) = &self.mirror else {
            return true;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::time::timeout(within, async {
            m.send(Mirrored::Flush(tx)).await.is_ok() && rx.await.is_ok()
        })
        .await
        .unwrap_or(false)
    }

    /// The record of `id`, unless it expired.
    pub(crate) fn get(&self, id: &MessageId) -> Option<CallRecord> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.prune(now, &self.options, false);
        inner.by_id.get(id).map(|(_, r)| r.clone())
    }

    /// How many records are kept now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().by_id.len()
    }
}

impl Inner {
    /// Forgets the records past retention, and with `room` the oldest
    /// beyond the bound, leaving room for one more.
    fn prune(&mut self, now: Instant, options: &RecordOptions, room: bool) {
        while let Some(&(at, id)) = self.order.front() {
            let expired = now.saturating_duration_since(at) >= options.retention;
            let full = room && self.by_id.len() >= options.max_records;
            if !expired && !full {
                break;
            }
            self.order.pop_front();
            self.by_id.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> (Target, Method) {
        (Target::new("car").unwrap(), Method::new("m").unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn records_expire_after_the_retention_window() {
        let records = Records::new(RecordOptions::new(Duration::from_secs(10), 100));
        let id = MessageId::new();
        let (t, m) = names();
        records.sent(id, t, m, None, false);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(records.get(&id).unwrap().state, CallState::Sent);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(records.get(&id).is_none());
        assert_eq!(records.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_records_go_beyond_the_bound() {
        let records = Records::new(RecordOptions::new(Duration::from_secs(600), 3));
        let ids: Vec<_> = (0..5).map(|_| MessageId::new()).collect();
        for id in &ids {
            let (t, m) = names();
            records.sent(*id, t, m, None, false);
        }
        assert_eq!(records.len(), 3);
        assert!(records.get(&ids[0]).is_none() && records.get(&ids[1]).is_none());
        assert!(records.get(&ids[4]).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_answer_is_kept_on_a_timed_out_call_only() {
        let records = Records::new(RecordOptions::default());
        let (late, answered) = (MessageId::new(), MessageId::new());
        for id in [late, answered] {
            let (t, m) = names();
            records.sent(id, t, m, None, false);
        }
        records.update(&late, |r| r.state = CallState::TimedOut);
        records.update(&answered, |r| r.state = CallState::Answered);
        assert!(records.answered_late(&late, 200, Value::from("done")));
        assert!(!records.answered_late(&answered, 200, Value::from("again")));
        let r = records.get(&late).unwrap();
        assert_eq!(
            (r.state, r.status, r.response),
            (
                CallState::AnsweredLate,
                Some(200),
                Some(Value::from("done"))
            )
        );
        assert_eq!(records.get(&answered).unwrap().state, CallState::Answered);
    }
}
