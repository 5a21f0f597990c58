//! What a requester shares with its connection task: the calls in flight,
//! the checks a call passes and the publish of its request, the counters,
//! the deadline sweeper, and the driver's callbacks (a reply, a receipt, a
//! refused publish, a presence record).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use directcall_core::deadline::{unix_millis, whole_millis};
use directcall_core::mqtt::{
    ConnectionError, Driver, Link, Message, Properties, QoS, Session, Subscription,
};
use directcall_core::topic::{check_call_length, reply_filter};
use directcall_core::{
    CallTopics, Field, MessageId, MqttVersion, PendingCall, PendingTable, Prefix, Receipt,
    ReplyError, ReplyPayload, ReplyTopic, RequestPayload, Target, Unmatched,
};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

use crate::error::{Error, Unavailable};
use crate::invocation::Invocation;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::options::Options;
use crate::presence::{Known, Origin, Presence, Snapshot};
#[cfg(feature = "redis")]
use crate::records::Mirrored;
use crate::records::{CallRecord, CallState, Records};

/// Room for MQTT's fixed header, topic length and packet id around a payload.
const PUBLISH_OVERHEAD_BYTES: usize = 16;

/// Counters of a requester, read with
/// [`Requester::stats`](crate::Requester::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Calls waiting for a reply now.
    pub pending: usize,
    /// Whether the connection is up and subscribed.
    pub connected: bool,
    /// Requests published (handed to the MQTT client).
    pub published: u64,
    /// Packets the MQTT client has written to the connection: the
    /// requests, and the few other publishes a requester makes. Requests
    /// published and not yet written wait in the client's queue, as in a
    /// burst of calls faster than the connection writes.
    pub written: u64,
    /// Replies that completed a call.
    pub completed: u64,
    /// Calls that ended with a timeout.
    pub timeouts: u64,
    /// Replies dropped: the call had already ended without a reply.
    pub dropped_late: u64,
    /// Replies dropped: the call had already been answered.
    pub dropped_duplicate: u64,
    /// Replies dropped: no such call.
    pub dropped_unknown: u64,
    /// Replies dropped: the topic names another target or method than the
    /// call, or the payload's id differs from the topic's.
    pub dropped_mismatched: u64,
    /// Replies dropped: unparsable topic or payload.
    pub dropped_malformed: u64,
    /// Replies dropped: larger than the packet limit.
    pub dropped_oversized: u64,
    /// Connections made after the first one.
    pub reconnects: u64,
    /// MQTT 5: requests the broker refused in its PUBACK (no device
    /// subscribed, not authorized, ...); each ended its call at once.
    pub refused: u64,
    /// Delivery receipts received
    /// ([`Options::delivery_receipts`](crate::Options::delivery_receipts)).
    pub receipts: u64,
    /// Strict presence ([`Options::strict_presence`](crate::Options::strict_presence)):
    /// whether this connection's presence snapshot is in (every retained
    /// record has arrived), so that a target with no record is refused.
    /// Always false without strict presence.
    pub presence_snapshot: bool,
}

/// How far the requester's presence table is
/// ([`Requester::presence_state`](crate::Requester::presence_state)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PresenceState {
    /// No presence tracking.
    Off,
    /// Presence records are read as they come, without knowing when every
    /// retained one is in (no strict presence, or its snapshot marker was
    /// given up on this connection).
    BestEffort,
    /// Strict presence: the snapshot of this connection's retained records
    /// is not complete yet.
    Loading,
    /// Strict presence: every retained record of this connection is in.
    Loaded,
}

impl PresenceState {
    /// `off`, `best_effort`, `loading` or `loaded`.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceState::Off => "off",
            PresenceState::BestEffort => "best_effort",
            PresenceState::Loading => "loading",
            PresenceState::Loaded => "loaded",
        }
    }
}

/// Why a reply was dropped, in the order of `metrics::DROP_REASONS`.
#[derive(Debug, Clone, Copy)]
enum Dropped {
    Late = 0,
    Duplicate,
    Unknown,
    Mismatched,
    Malformed,
    Oversized,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    completed: AtomicU64,
    timeouts: AtomicU64,
    dropped: [AtomicU64; 6],
    refused: AtomicU64,
    receipts: AtomicU64,
}

/// What ends a waiting call: the device's reply, or one of its replies that
/// breaks the rules ([`Error::BadReply`]); boxed, so a waiting call's slot
/// stays small.
pub(crate) type Slot = Box<Result<ReplyPayload, Error>>;

/// The state of one requester, shared by its clones, its calls and its
/// connection task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) link: Link,
    pub(crate) pending: PendingTable<Slot>,
    /// Wakes the deadline sweeper when a call's deadline is the earliest.
    sweep: Arc<Notify>,
    pub(crate) sweeper_stop: watch::Sender<bool>,
    pub(crate) prefix: Prefix,
    qos: QoS,
    /// MQTT 5 with the default request QoS: the targets that answered
    /// lately, whose requests skip the PUBACK round (`known_subscribed`).
    answered_lately: Option<Mutex<AnsweredLately>>,
    reply_qos: QoS,
    /// MQTT 5: requests carry expiry, response topic and correlation data.
    v5: bool,
    pub(crate) permits: Arc<Semaphore>,
    counters: Counters,
    pub(crate) metrics: Metrics,
    pub(crate) presence: Option<Presence>,
    /// Strict presence: the snapshot marker's topic and payload.
    strict: Option<(String, Vec<u8>)>,
    /// The broker URL last reported in use, for the `broker_in_use` gauge.
    reported_broker: Mutex<Option<String>>,
    pub(crate) records: Option<Records>,
    pub(crate) keys: Keys,
    /// Requests ask for delivery receipts.
    pub(crate) receipts: bool,
    /// Where records and keys are shared with other requesters.
    pub(crate) store: Option<crate::store::Bounded>,
    pub(crate) store_url: Option<String>,
    /// How long records are kept.
    pub(crate) retention: Duration,
    /// The reply prefix is this requester's own (not shared): others take
    /// its late answers when it leaves.
    pub(crate) own_prefix: bool,
    /// With a shared store: the reply prefixes of requesters that left,
    /// whose late answers this one takes until when (ms since the epoch).
    adopted: Mutex<HashMap<Prefix, u64>>,
    /// The group calls running.
    pub(crate) groups: crate::group::Groups,
}

/// How long the store may take to give the record a late answer of a
/// requester that left goes on.
const STORE_WAIT_ADOPTED: Duration = Duration::from_secs(2);

/// How often a requester with a shared store looks for requesters that
/// left: one small read of the store each time.
pub(crate) const ADOPT_EVERY: Duration = Duration::from_secs(1);

/// With a shared store, every [`ADOPT_EVERY`]: subscribes to the replies of
/// requesters that left (their late answers go onto their records in the
/// store), and unsubscribes once their records' retention is over. Ends
/// with the requester.
pub(crate) async fn adopt_departed(
    shared: std::sync::Weak<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(ADOPT_EVERY) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(store) = &shared.store else {
            return;
        };
        let now = crate::records::now_ms();
        let departed = match store.departed(now).await {
            Ok(departed) => departed,
            Err(e) => {
                tracing::debug!("shared store: requesters that left: {e}");
                continue;
            }
        };
        let mut adopted = shared.adopted.lock().unwrap_or_else(|e| e.into_inner());
        for (prefix, until) in departed {
            let Ok(prefix) = Prefix::new(prefix) else {
                continue;
            };
            if prefix == shared.prefix {
                continue;
            }
            if adopted.insert(prefix.clone(), until).is_none() {
                tracing::info!(%prefix, "a requester left: taking the late answers to its calls");
                shared
                    .link
                    .subscribe(Subscription::new(reply_filter(&prefix), shared.reply_qos));
            }
        }
        adopted.retain(|prefix, until| {
            let keep = *until > now;
            if !keep {
                shared.link.unsubscribe(reply_filter(prefix));
            }
            keep
        });
    }
}

/// What every clone of a [`Requester`](crate::Requester) holds: the shared
/// state and the connection task. Dropping the last one stops both.
#[derive(Debug)]
pub(crate) struct Handle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) driver: Mutex<Option<Driver>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The last handle is gone: stop the driver, which disconnects, and
        // the deadline sweeper.
        self.shared.link.stop();
        self.shared.sweeper_stop.send_replace(true);
    }
}

/// The records (if kept) and the shared store (if any), with the task that
/// writes the store behind the records.
#[allow(clippy::type_complexity)]
fn records_and_store(
    options: &Options,
) -> Result<(Option<Records>, Option<crate::store::Bounded>), Error> {
    let records = options.records.map(Records::new);
    let Some(url) = options.store.as_deref() else {
        return Ok((records, None));
    };
    #[cfg(feature = "redis")]
    {
        let redis: Arc<dyn crate::store::Store> = Arc::new(
            crate::store::RedisStore::new(url, options.store_ca.as_deref()).map_err(|e| {
                Error::Config {
                    option: "Options::redis_store",
                    reason: e.to_string(),
                }
            })?,
        );
        let store = crate::store::Bounded::new(redis);
        let retention = options.records.unwrap_or_default().retention;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Mirrored>(65_536);
        let writer = store.clone();
        tokio::spawn(async move {
            // What piled up while the last write was out goes in one
            // pipeline: one round trip for many changes, in order.
            let mut received = Vec::with_capacity(512);
            let mut batch = Vec::with_capacity(512);
            let mut flushed = Vec::new();
            while rx.recv_many(&mut received, 512).await > 0 {
                for m in received.drain(..) {
                    match m {
                        Mirrored::Record(r) => batch.push(r),
                        Mirrored::Flush(done) => flushed.push(done),
                    }
                }
                if !batch.is_empty() {
                    if let Err(e) = writer.save(&batch, retention).await {
                        tracing::warn!(records = batch.len(), "shared store: {e}");
                    }
                    batch.clear();
                }
                for done in flushed.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        let records =
            records.unwrap_or_else(|| Records::new(crate::records::RecordOptions::default()));
        Ok((Some(records.mirrored(tx)), Some(store)))
    }
    #[cfg(not(feature = "redis"))]
    {
        Err(Error::Config {
            option: "Options::redis_store",
            reason: format!(
                "{}: this build has no Redis support (feature \"redis\")",
                crate::store::redacted(url)
            ),
        })
    }
}

/// Fires the table's deadlines: sleeps until the earliest, ends the calls
/// due, and starts over, or sooner when a call with an earlier deadline is
/// registered. One task per requester, instead of a timer per call.
pub(crate) async fn sweep_deadlines(
    table: PendingTable<Slot>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (_, next) = table.expire(Instant::now().into_std());
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return,
            () = wake.notified() => {}
            () = sleep => {}
        }
    }
}

/// Strict presence: publishes the snapshot marker on connection
/// `link.connects()` until it comes back (the first may go out before the
/// presence subscription does), the connection changes, or markers are
/// given up.
async fn ask_snapshot(link: Link, snapshot: Arc<Snapshot>, topic: String, marker: Vec<u8>) {
    const ATTEMPTS: u32 = 12;
    let connection = link.connects();
    let mut wait = Duration::from_millis(20);
    for _ in 0..ATTEMPTS {
        tokio::time::sleep(wait).await;
        if link.is_stopping() || link.connects() != connection || !link.is_ready() {
            return;
        }
        if snapshot.is_complete(connection) || !snapshot.marker_sent(connection) {
            return;
        }
        link.publish_or_queue(topic.clone(), marker.clone(), QoS::AtMostOnce, false);
        wait = (wait * 2).min(Duration::from_secs(2));
    }
    tokio::time::sleep(wait).await;
    if link.connects() == connection && !snapshot.is_complete(connection) && !link.is_stopping() {
        snapshot.abandon(connection);
        tracing::warn!(
            topic,
            "the presence snapshot marker never came back (may the requester publish and subscribe there?): presence is not strict on this connection"
        );
    }
}

impl Session for Shared {
    fn subscriptions(&self) -> Vec<Subscription> {
        let mut subscriptions = vec![Subscription::new(
            reply_filter(&self.prefix),
            self.reply_qos,
        )];
        if let Some(p) = &self.presence {
            // QoS 0: retained records arrive all the same, and a broker
            // that backs QoS 1 subscriptions with storage (NATS: JetStream
            // consumers) has nothing to set up.
            for filter in p.filters() {
                subscriptions.push(Subscription::new(filter, QoS::AtMostOnce));
            }
        }
        subscriptions
    }

    fn on_connected(&self) {
        if self.link.connects() > 1 {
            self.metrics.reconnects.increment(1);
        }
    }

    fn on_ready(&self) {
        self.metrics.connected.set(1.0);
        let url = self.link.broker_url();
        let mut reported = self
            .reported_broker
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if reported.as_deref() != Some(url.as_str()) {
            if let Some(old) = reported.take() {
                metrics::gauge!(crate::metrics::BROKER_IN_USE, "url" => old).set(0.0);
            }
            metrics::gauge!(crate::metrics::BROKER_IN_USE, "url" => url.clone()).set(1.0);
            *reported = Some(url);
        }
        drop(reported);
        if let (Some((topic, marker)), Some(p)) = (&self.strict, &self.presence) {
            // The presence subscription is asked for once this returns.
            tokio::spawn(ask_snapshot(
                self.link.clone(),
                Arc::clone(&p.snapshot),
                topic.clone(),
                marker.clone(),
            ));
        }
    }

    fn on_message(self: &Arc<Self>, message: Message<'_>) {
        if let Some(p) = &self.presence {
            if p.is_marker(message.topic, message.payload) {
                // Published after the subscription was made: every retained
                // record of it came before.
                if self.strict.is_some() && !p.snapshot.is_complete(self.link.connects()) {
                    tracing::debug!("presence snapshot complete");
                    p.snapshot.completed(self.link.connects());
                }
                return;
            }
            match p.parse(message.topic, message.payload) {
                Some(Some((event, origin))) => {
                    let mirror = (origin == Origin::Lifecycle)
                        .then(|| p.mirror())
                        .flatten()
                        .map(|root| (root.topic(&event.target), event.online, event.timestamp_ms));
                    if p.record(event) {
                        if let Some((topic, Some(online), timestamp)) = mirror {
                            let record =
                                serde_json::json!({"online": online, "timestamp": timestamp});
                            self.link.publish_or_queue(
                                topic,
                                record.to_string(),
                                QoS::AtLeastOnce,
                                true,
                            );
                        }
                    }
                    return;
                }
                // A presence topic with an unreadable payload.
                Some(None) => return,
                None => {}
            }
        }
        self.on_reply(message.topic, message.payload);
    }

    fn on_disconnected(&self, error: &ConnectionError) {
        self.metrics.connected.set(0.0);
        if error.is_hung() {
            // The broker stopped answering: the calls out on it end now as
            // may-have-run, instead of holding their callers (and the
            // gateway's per-target slots) to their deadlines.
            let lost = self.pending.lose_all();
            if lost > 0 {
                tracing::warn!(
                    calls = lost,
                    "the broker stopped answering: calls out on it ended as may-have-run"
                );
            }
        }
        if let (Some((topic, _)), Some(p)) = (&self.strict, &self.presence) {
            if p.snapshot.lost(self.link.connects()) {
                tracing::error!(
                    topic,
                    "the connection was lost {} times in a row while a presence snapshot marker was out (a broker that closes the connection over a denied publish does this): no more markers, so presence is not strict",
                    crate::presence::MARKER_GIVE_UP_AFTER
                );
            }
        }
    }

    fn on_publish_refused(&self, topic: &str, reason: u8) {
        // Only requests are tracked: the topic is a request topic of ours.
        if let Some(Ok(group)) = directcall_core::GroupTopics::parse_request(topic) {
            if let Some(state) = self.groups.get(&group.id()) {
                state.refused(None, reason);
            }
            return;
        }
        if let Ok(call) = CallTopics::parse_request(topic) {
            if let Some(state) = self.groups.get(&call.id()) {
                state.refused(Some(call.target()), reason);
                return;
            }
            // Counted first, so a caller reading stats after its outcome
            // sees it (refusing wakes the caller).
            self.counters.refused.fetch_add(1, Relaxed);
            if self.pending.refuse(&call.id(), reason) {
                self.metrics.refused.increment(1);
                tracing::debug!(topic, reason, "request refused by the broker");
            } else {
                self.counters.refused.fetch_sub(1, Relaxed);
            }
        }
    }

    fn on_stopping(&self) {
        self.groups.close_all();
        self.metrics.connected.set(0.0);
        // Calls still waiting end with `Closed`.
        self.pending.close();
    }
}

/// How long a target that answered counts as subscribed: its requests then
/// go at QoS 0 on MQTT 5, without the PUBACK round that could only say
/// "no matching subscribers" (PROTOCOL.md, "MQTT 5").
pub(crate) const KNOWN_SUBSCRIBED: Duration = Duration::from_secs(10);

/// When each target last answered, pruned as it grows.
#[derive(Debug, Default)]
pub(crate) struct AnsweredLately {
    at: std::collections::HashMap<String, std::time::Instant>,
    /// Its size after the last pruning.
    kept: usize,
}

impl AnsweredLately {
    fn answered(&mut self, target: &str, now: std::time::Instant) {
        match self.at.get_mut(target) {
            Some(at) => *at = now,
            None => {
                if self.at.len() >= (2 * self.kept).max(1024) {
                    self.at
                        .retain(|_, at| now.duration_since(*at) < KNOWN_SUBSCRIBED);
                    self.kept = self.at.len();
                }
                self.at.insert(target.to_owned(), now);
            }
        }
    }

    fn lately(&self, target: &str, now: std::time::Instant) -> bool {
        self.at
            .get(target)
            .is_some_and(|at| now.duration_since(*at) < KNOWN_SUBSCRIBED)
    }
}

impl Shared {
    /// The QoS of a request to `target`: the configured one, or on MQTT 5
    /// by default, 1 unless the target answered within `KNOWN_SUBSCRIBED`.
    pub(crate) fn request_qos_for(&self, target: &Target) -> QoS {
        match &self.answered_lately {
            Some(lately) => {
                let known = lately
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .lately(target.as_str(), std::time::Instant::now());
                if known {
                    QoS::AtMostOnce
                } else {
                    self.qos
                }
            }
            None => self.qos,
        }
    }

    /// `target` answered a call: it has a subscriber now.
    fn heard_from(&self, target: &str) {
        if let Some(lately) = &self.answered_lately {
            lately
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .answered(target, std::time::Instant::now());
        }
    }

    /// The state of a requester with `options` on `link`, replies coming
    /// back under `prefix`; starts its deadline sweeper (and the store's
    /// writer, if any).
    pub(crate) fn new(options: &Options, link: Link, prefix: Prefix) -> Result<Self, Error> {
        let v5 = options.broker.mqtt_version == MqttVersion::V5;
        let presence = options
            .presence
            .clone()
            .map(|source| Presence::new(source, options.mirror_presence.clone()));
        let strict = match (options.strict_presence, &presence) {
            (false, _) => None,
            (true, Some(p)) => match p.record_root() {
                Some(root) => {
                    let marker_level = Target::new(prefix.as_str())?;
                    Some((
                        root.topic(&marker_level),
                        directcall_core::presence::snapshot_marker(&prefix),
                    ))
                }
                None => return Err(Error::Config {
                    option: "Options::strict_presence",
                    reason: "AWS lifecycle events are not retained, so a device connected before the requester started would look unknown: add Options::mirror_presence".into(),
                }),
            },
            (true, None) => {
                return Err(Error::Config {
                    option: "Options::strict_presence",
                    reason: "needs presence records to read: Options::presence, or Options::aws_presence with Options::mirror_presence".into(),
                })
            }
        };
        let (records, store) = records_and_store(options)?;
        let pending = PendingTable::new(options.recent_capacity);
        let sweep = Arc::new(Notify::new());
        let sweeper_stop = watch::Sender::new(false);
        tokio::spawn(sweep_deadlines(
            pending.clone(),
            Arc::clone(&sweep),
            sweeper_stop.subscribe(),
        ));
        Ok(Shared {
            link,
            pending,
            sweep,
            sweeper_stop,
            prefix,
            qos: options.request_qos.unwrap_or(if v5 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            }),
            answered_lately: (v5 && options.request_qos.is_none())
                .then(|| Mutex::new(AnsweredLately::default())),
            reply_qos: options.reply_qos,
            v5,
            permits: Arc::new(Semaphore::new(options.max_in_flight)),
            counters: Counters::default(),
            metrics: Metrics::register(),
            presence,
            strict,
            reported_broker: Mutex::new(None),
            records,
            store,
            store_url: options.store.as_deref().map(crate::store::redacted),
            keys: Keys::new(options.records.unwrap_or_default()),
            receipts: options.receipts,
            retention: options.records.unwrap_or_default().retention,
            own_prefix: !options.shared_prefix,
            adopted: Mutex::new(HashMap::new()),
            groups: crate::group::Groups::default(),
        })
    }

    /// Whether this speaks MQTT 5.
    pub(crate) fn is_v5(&self) -> bool {
        self.v5
    }

    /// The QoS of a named group's one request: the requests' (on MQTT 5,
    /// QoS 1, so that a PUBACK says when no member is subscribed).
    pub(crate) fn group_qos(&self) -> QoS {
        self.qos
    }

    /// Strict presence with every retained record in: a target without a
    /// record is unknown.
    pub(crate) fn strict_presence_complete(&self) -> bool {
        match (&self.strict, &self.presence) {
            (Some(_), Some(p)) => p.snapshot.is_complete(self.link.connects()),
            _ => false,
        }
    }

    /// Everything that refuses a group call before anything is published.
    pub(crate) fn check_group(&self, call: &crate::group::GroupInvocation) -> Result<(), Error> {
        if let Some(t) = &call.traceparent {
            directcall_core::trace::check_traceparent(t)?;
        }
        if self.link.refuses_dots() {
            let mut names: Vec<(Field, &str)> = vec![(Field::Method, call.method.as_str())];
            match &call.targets {
                crate::group::Targets::List(list) => {
                    names.extend(list.iter().map(|t| (Field::Target, t.as_str())));
                }
                crate::group::Targets::Group(g) => names.push((Field::Group, g.as_str())),
                crate::group::Targets::Match { .. } => {}
            }
            if let Some((field, _)) = names.iter().find(|(_, n)| n.contains('.')) {
                return Err(Error::Invalid {
                    field: *field,
                    reason:
                        "contains '.', which the connected broker refuses in topics (NATS does)"
                            .into(),
                });
            }
        }
        if self.link.is_stopping() {
            return Err(Error::Closed);
        }
        if !self.link.is_ready() {
            return Err(Error::Unavailable {
                cause: Unavailable::NotConnected,
                last_error: self.link.last_error(),
            });
        }
        Ok(())
    }

    /// Everything that refuses a call before an id is made.
    pub(crate) fn check(&self, invocation: &Invocation) -> Result<(), Error> {
        if invocation.timeout.is_zero() {
            return Err(Error::Invalid {
                field: Field::Timeout,
                reason: "must be greater than zero".into(),
            });
        }
        check_call_length(&invocation.target, &invocation.method, &self.prefix)?;
        if let Some(t) = &invocation.traceparent {
            directcall_core::trace::check_traceparent(t)?;
        }
        if self.link.refuses_dots() {
            // Such a broker (NATS) would close the whole connection over the
            // publish, taking every call in flight with it.
            for (field, name) in [
                (Field::Target, invocation.target.as_str()),
                (Field::Method, invocation.method.as_str()),
            ] {
                if name.contains('.') {
                    return Err(Error::Invalid {
                        field,
                        reason:
                            "contains '.', which the connected broker refuses in topics (NATS does)"
                                .into(),
                    });
                }
            }
        }
        if self.link.is_stopping() {
            return Err(Error::Closed);
        }
        if !self.link.is_ready() {
            return Err(Error::Unavailable {
                cause: Unavailable::NotConnected,
                last_error: self.link.last_error(),
            });
        }
        if let Some(p) = &self.presence {
            match p.known(&invocation.target) {
                Known::Online => {}
                Known::Offline => {
                    return Err(Error::Offline {
                        target: invocation.target.clone(),
                    })
                }
                // Strict only once every retained record is in: until then
                // a device with a record may just not have been heard of yet.
                Known::Unknown
                    if self.strict.is_some() && p.snapshot.is_complete(self.link.connects()) =>
                {
                    return Err(Error::UnknownTarget {
                        target: invocation.target.clone(),
                    })
                }
                Known::Unknown => {}
            }
        }
        Ok(())
    }

    pub(crate) fn count_timeout<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(Error::Timeout { .. }) = &result {
            self.counters.timeouts.fetch_add(1, Relaxed);
            self.metrics.timeouts.increment(1);
        }
        result
    }

    /// Registers the call and queues its request, without waiting: the
    /// request queue holds a slot for every call in flight.
    pub(crate) fn send(
        &self,
        invocation: Invocation,
        id: MessageId,
        deadline: Instant,
    ) -> Result<PendingCall<Slot>, Error> {
        let call = CallTopics::new(
            invocation.target,
            invocation.method,
            self.prefix.clone(),
            id,
        )?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut payload = RequestPayload::new(id.to_string(), invocation.request);
        payload.timestamp = Some(unix_millis(std::time::SystemTime::now()));
        payload.timeout_ms = Some(whole_millis(remaining));
        payload.traceparent = invocation.traceparent;
        payload.receipt = invocation.receipt.unwrap_or(self.receipts);
        let receipt = payload.receipt;
        let qos = self.request_qos_for(call.target());
        let properties = self.v5.then(|| {
            let mut p = Properties::default();
            // Whole seconds, rounded up: the broker drops the request once
            // it could no longer be answered in time.
            p.message_expiry_secs = Some(
                u32::try_from(remaining.as_millis().div_ceil(1000))
                    .unwrap_or(u32::MAX)
                    .max(1),
            );
            p.response_topic = Some(call.reply_topic());
            p.correlation_data = Some(payload.id.clone().into_bytes());
            if let Some(t) = &payload.traceparent {
                p.user_properties
                    .push(("traceparent".to_owned(), t.clone()));
            }
            p
        });
        let payload = payload.to_vec();
        let topic = call.request_topic();
        let size = payload.len() + topic.len() + PUBLISH_OVERHEAD_BYTES;
        let max = self.link.max_packet_bytes();
        if size > max {
            return Err(Error::PayloadTooLarge { size, max });
        }
        let (pending, earliest) = self.pending.insert(&call, deadline.into_std());
        if earliest {
            self.sweep.notify_one();
        }
        // A shutdown that began before the insert would not close this call.
        if self.link.is_stopping() {
            return Err(Error::Closed);
        }
        // Recorded before the publish: the reply may come before it returns.
        if let Some(records) = &self.records {
            records.sent(
                id,
                call.target().clone(),
                call.method().clone(),
                invocation.caller,
                receipt,
            );
        }
        if let Err(e) = self
            .link
            .publish_with(topic, payload, qos, false, properties.as_ref())
        {
            if let Some(records) = &self.records {
                records.update(&id, |r| r.state = CallState::Unavailable);
            }
            return Err(Error::Unavailable {
                cause: Unavailable::NotQueued(e),
                last_error: None,
            });
        }
        self.counters.published.fetch_add(1, Relaxed);
        self.metrics.published.increment(1);
        Ok(pending)
    }

    pub(crate) fn presence_state(&self) -> PresenceState {
        match (&self.presence, &self.strict) {
            (None, _) => PresenceState::Off,
            (Some(_), None) => PresenceState::BestEffort,
            (Some(p), Some(_)) => {
                let connection = self.link.connects();
                if p.snapshot.is_complete(connection) {
                    PresenceState::Loaded
                } else if p.snapshot.is_settled(connection) {
                    PresenceState::BestEffort
                } else {
                    PresenceState::Loading
                }
            }
        }
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> Stats {
        let c = &self.counters;
        let dropped = |d: Dropped| c.dropped[d as usize].load(Relaxed);
        Stats {
            pending: self.pending.len(),
            connected: self.link.is_ready(),
            published: c.published.load(Relaxed),
            written: self.link.written(),
            completed: c.completed.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            dropped_late: dropped(Dropped::Late),
            dropped_duplicate: dropped(Dropped::Duplicate),
            dropped_unknown: dropped(Dropped::Unknown),
            dropped_mismatched: dropped(Dropped::Mismatched),
            dropped_malformed: dropped(Dropped::Malformed),
            dropped_oversized: dropped(Dropped::Oversized),
            reconnects: self.link.connects().saturating_sub(1),
            refused: c.refused.load(Relaxed),
            receipts: c.receipts.load(Relaxed),
            presence_snapshot: self.strict.is_some()
                && self
                    .presence
                    .as_ref()
                    .is_some_and(|p| p.snapshot.is_complete(self.link.connects())),
        }
    }

    /// The record of call `id`, if calls are recorded and it has one here.
    pub(crate) fn call_record(&self, id: &MessageId) -> Option<CallRecord> {
        self.records.as_ref()?.get(id)
    }

    /// The record of call `id` here, or else in the shared store.
    pub(crate) async fn fetch_call_record(&self, id: &MessageId) -> Option<CallRecord> {
        if let Some(record) = self.call_record(id) {
            return Some(record);
        }
        let store = self.store.as_ref()?;
        match store.load(id, crate::store::STORE_WAIT).await {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(%id, "shared store: {e}");
                None
            }
        }
    }

    /// [`Shared::fetch_call_record`], waiting up to `wait` for the call to
    /// be final.
    pub(crate) async fn wait_call_record(
        &self,
        id: &MessageId,
        wait: Duration,
    ) -> Option<CallRecord> {
        let deadline = Instant::now() + wait;
        let records = self.records.as_ref()?;
        if records.get(id).is_some() {
            return records.wait_final(id, deadline).await;
        }
        loop {
            let record = self.fetch_call_record(id).await;
            let done = record.as_ref().is_none_or(|r| r.state.is_final());
            if done || Instant::now() >= deadline {
                return record;
            }
            tokio::time::sleep_until((Instant::now() + Duration::from_millis(50)).min(deadline))
                .await;
        }
    }

    fn dropped(&self, why: Dropped) {
        self.counters.dropped[why as usize].fetch_add(1, Relaxed);
        self.metrics.dropped[why as usize].increment(1);
    }

    /// A delivery receipt for `call`: its record moves to `delivered`.
    fn on_receipt(&self, call: &CallTopics, payload: &[u8]) -> bool {
        match Receipt::from_slice(payload) {
            Ok(r) if MessageId::parse(&r.delivered).ok() == Some(call.id()) => {
                self.counters.receipts.fetch_add(1, Relaxed);
                if let Some(records) = &self.records {
                    records.delivered(&call.id());
                }
                true
            }
            _ => false,
        }
    }

    /// A reply to a call of a requester that left: its late answer goes
    /// onto the call's record in the shared store. Returns whether the
    /// reply was under an adopted prefix.
    fn take_adopted(&self, call: &CallTopics, payload: &[u8]) -> bool {
        let adopted = self
            .adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(call.prefix());
        let Some(store) = self.store.clone().filter(|_| adopted) else {
            return false;
        };
        let reply = match ReplyPayload::decode(payload) {
            Ok(r) if MessageId::parse(&r.id).ok() == Some(call.id()) => r,
            _ => {
                // Receipts, and replies that break the rules: nothing to keep.
                tracing::debug!(prefix = %call.prefix(), "dropped a reply to a requester that left");
                return true;
            }
        };
        let (id, retention) = (call.id(), self.retention);
        tokio::spawn(async move {
            let mut record = match store.load(&id, STORE_WAIT_ADOPTED).await {
                Ok(Some(record)) => record,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%id, "a late answer to a call of a requester that left is lost: shared store: {e}");
                    return;
                }
            };
            if !record.take_late_answer(reply.status, reply.response) {
                return;
            }
            let age =
                Duration::from_millis(crate::records::now_ms().saturating_sub(record.sent_at_ms));
            let ttl = retention.saturating_sub(age).max(Duration::from_secs(1));
            match store.save(std::slice::from_ref(&record), ttl).await {
                Ok(()) => {
                    metrics::counter!(crate::metrics::LATE_ANSWERS_ADOPTED).increment(1);
                    tracing::debug!(%id, "late answer to a call of a requester that left kept on its record");
                }
                Err(e) => {
                    tracing::warn!(%id, "a late answer to a call of a requester that left is lost: shared store: {e}")
                }
            }
        });
        true
    }

    fn on_reply(&self, topic: &str, payload: &[u8]) {
        if payload.len() > self.link.max_packet_bytes() {
            self.dropped(Dropped::Oversized);
            tracing::debug!(topic, bytes = payload.len(), "dropped reply: oversized");
            return;
        }
        // Read in place: the owned names are made only off the plain
        // answer's path (adopted calls, receipts, groups, bad replies).
        let Ok(call) = ReplyTopic::parse(topic) else {
            self.dropped(Dropped::Malformed);
            tracing::debug!(topic, "dropped reply: malformed topic");
            return;
        };
        if call.prefix() != self.prefix.as_str() {
            if !self.take_adopted(&call.to_call_topics(), payload) {
                self.dropped(Dropped::Unknown);
            }
            return;
        }
        let (reply_id, answer) = match ReplyPayload::decode(payload) {
            Ok(r) => (MessageId::parse(&r.id).ok(), Ok(r)),
            // Not an answer: maybe a delivery receipt (never on the hot path).
            Err(ReplyError::Malformed(_)) if self.on_receipt(&call.to_call_topics(), payload) => {
                return
            }
            Err(ReplyError::Invalid { id, error }) => (
                MessageId::parse(&id).ok(),
                Err(Error::BadReply {
                    id: call.id(),
                    field: error.field(),
                    reason: error.reason().to_owned(),
                }),
            ),
            Err(e) => {
                self.dropped(Dropped::Malformed);
                tracing::debug!(topic, "dropped reply: {e}");
                return;
            }
        };
        // Only the call's own topic and id can end it, with an answer or
        // with a bad reply: no stranger ends another's call.
        if reply_id != Some(call.id()) {
            self.dropped(Dropped::Mismatched);
            tracing::debug!(topic, "dropped reply: payload id differs from the topic's");
            return;
        }
        if let Some(group) = self.groups.get(&call.id()) {
            group.reply(&call.to_call_topics(), answer);
            return;
        }
        let bad = answer.as_ref().err().map(ToString::to_string);
        if let Some(bad) = &bad {
            tracing::debug!(topic, "{bad}");
        }
        // Counted first, so a caller reading stats after its reply sees it.
        self.counters.completed.fetch_add(1, Relaxed);
        let answered = answer.is_ok();
        match self
            .pending
            .complete_reply_or_return(&call, Box::new(answer))
        {
            Ok(()) => {
                self.metrics.completed.increment(1);
                if answered {
                    self.heard_from(call.target());
                }
                if let (Some(bad), Some(records)) = (bad, &self.records) {
                    records.bad_reply(&call.to_call_topics(), bad);
                }
            }
            Err((Unmatched::Late, reply)) if self.records.is_some() => {
                self.counters.completed.fetch_sub(1, Relaxed);
                self.dropped(Dropped::Late);
                match (*reply, &self.records) {
                    (Ok(reply), Some(records)) => {
                        if records.answered_late(&call.id(), reply.status, reply.response) {
                            tracing::debug!(topic, "late reply kept on the call's record");
                        }
                    }
                    (Err(bad), Some(records)) => {
                        records.bad_reply(&call.to_call_topics(), bad.to_string())
                    }
                    (_, None) => {}
                }
            }
            Err((reason, _)) => {
                self.counters.completed.fetch_sub(1, Relaxed);
                self.dropped(match reason {
                    Unmatched::Late => Dropped::Late,
                    Unmatched::Duplicate => Dropped::Duplicate,
                    Unmatched::Mismatched => Dropped::Mismatched,
                    // Unmatched is another crate's non-exhaustive enum.
                    _ => Dropped::Unknown,
                });
                tracing::debug!(topic, ?reason, "dropped reply");
            }
        }
    }
}
