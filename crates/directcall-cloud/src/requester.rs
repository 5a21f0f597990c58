use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use directcall_core::deadline::{unix_millis, whole_millis};
use directcall_core::presence::{
    parse_aws_lifecycle, parse_directcall, PresenceEvent, AWS_PRESENCE_FILTER,
};
use directcall_core::topic::{check_call_length, reply_filter};
use directcall_core::{
    Backoff, CallTopics, Field, MessageId, Method, PendingGuard, PendingTable, Prefix,
    ReplyPayload, RequestPayload, Target, Unmatched,
};
use rumqttc::{AsyncClient, QoS, SubscribeFilter};
use serde_json::Value;
use tokio::sync::{oneshot, watch, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;

use crate::connection::{self, Session};
use crate::error::Error;
use crate::options::{Options, PresenceSource, RequestQos, DEFAULT_TIMEOUT};

/// Room for MQTT's fixed header, topic length and packet id around a payload.
const PUBLISH_OVERHEAD_BYTES: usize = 16;

/// One call to make: which method on which device, with what, for how long.
#[derive(Debug, Clone)]
pub struct Invocation {
    target: Target,
    method: Method,
    request: Value,
    timeout: Duration,
    start: Option<Instant>,
}

impl Invocation {
    /// A call of `method` on `target` with `request`, with the default
    /// 10 s timeout.
    pub fn new(target: Target, method: Method, request: impl Into<Value>) -> Self {
        Invocation {
            target,
            method,
            request: request.into(),
            timeout: DEFAULT_TIMEOUT,
            start: None,
        }
    }

    /// Validates the names and builds the call in one step.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `target` or `method` when either breaks the
    /// topic-level rule.
    pub fn parse(target: &str, method: &str, request: impl Into<Value>) -> Result<Self, Error> {
        Ok(Self::new(
            Target::new(target)?,
            Method::new(method)?,
            request,
        ))
    }

    /// The call's deadline, measured from its start (default 10 s). A zero
    /// timeout is refused by [`Requester::invoke`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// When the call started, if earlier than `invoke` (an HTTP gateway passes
    /// the request's arrival); the deadline and `elapsed` count from here.
    pub fn started_at(mut self, start: Instant) -> Self {
        self.start = Some(start);
        self
    }

    /// The device.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request value.
    pub fn request(&self) -> &Value {
        &self.request
    }

    /// The timeout.
    pub fn timeout_duration(&self) -> Duration {
        self.timeout
    }

    /// When the call started, if set with [`Invocation::started_at`].
    pub fn start_time(&self) -> Option<Instant> {
        self.start
    }
}

/// A device's answer to one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The call's id.
    pub id: MessageId,
    /// The device's verdict, HTTP-like (200 when the device sent none).
    pub status: u16,
    /// The device's answer.
    pub response: Value,
    /// Time from the call's start to the reply.
    pub elapsed: Duration,
}

/// Counters of a requester, read with [`Requester::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Calls waiting for a reply now.
    pub pending: usize,
    /// Whether the connection is up and subscribed.
    pub connected: bool,
    /// Requests published.
    pub published: u64,
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
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    completed: AtomicU64,
    timeouts: AtomicU64,
    late: AtomicU64,
    duplicate: AtomicU64,
    unknown: AtomicU64,
    mismatched: AtomicU64,
    malformed: AtomicU64,
    oversized: AtomicU64,
    connects: AtomicU64,
}

type Waiter = oneshot::Sender<ReplyPayload>;

#[derive(Debug)]
struct Shared {
    client: AsyncClient,
    pending: PendingTable<Waiter>,
    prefix: Prefix,
    qos: QoS,
    max_packet_bytes: usize,
    permits: Semaphore,
    connected: watch::Sender<bool>,
    shutdown: watch::Sender<bool>,
    counters: Counters,
    presence: Option<Presence>,
    last_error: Mutex<Option<String>>,
}

/// The last presence record of each target that has one.
#[derive(Debug)]
struct Presence {
    source: PresenceSource,
    online: RwLock<HashMap<Target, (bool, Option<u64>)>>,
}

impl Presence {
    fn filter(&self) -> String {
        match &self.source {
            PresenceSource::Directcall(root) => root.filter(),
            _ => AWS_PRESENCE_FILTER.to_owned(),
        }
    }

    fn parse(&self, topic: &str, payload: &[u8]) -> Option<Option<PresenceEvent>> {
        match &self.source {
            PresenceSource::Directcall(root) => {
                root.parse(topic)?;
                Some(parse_directcall(root, topic, payload))
            }
            _ => topic
                .starts_with("$aws/events/presence/")
                .then(|| parse_aws_lifecycle(topic, payload)),
        }
    }

    fn record(&self, event: PresenceEvent) {
        let mut online = self.online.write().unwrap_or_else(|e| e.into_inner());
        let older = match (online.get(&event.target), event.timestamp_ms) {
            (Some((_, Some(known))), Some(ts)) => ts < *known,
            _ => false,
        };
        if older {
            return;
        }
        tracing::debug!(target = %event.target, online = ?event.online, "presence");
        match event.online {
            Some(up) => {
                online.insert(event.target, (up, event.timestamp_ms));
            }
            None => {
                online.remove(&event.target);
            }
        }
    }
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    driver: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The last handle is gone: stop the driver, which disconnects.
        self.shared.shutdown.send_replace(true);
    }
}

/// Makes synchronous calls to devices over one long-lived MQTT connection.
///
/// Cheap to clone; every clone shares the connection, and [`Requester::invoke`]
/// may run from many tasks at once. One background task drives the
/// connection: it reconnects with capped backoff, resubscribes, and hands each
/// reply to the call waiting for it. The connection closes when
/// [`Requester::shutdown`] is called or the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Requester {
    handle: Arc<Handle>,
}

impl Requester {
    /// Connects and waits until the reply subscription is acknowledged.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the broker cannot be reached and subscribed
    /// within the options' ready timeout (default 10 s).
    pub async fn connect(options: Options) -> Result<Self, Error> {
        let ready_timeout = options.ready_timeout;
        let requester = Self::start(options)?;
        if requester.wait_ready(ready_timeout).await {
            Ok(requester)
        } else {
            let last = requester.last_error();
            requester.shutdown().await;
            Err(Error::Unavailable {
                reason: format!(
                    "not connected and subscribed within {} ms; last error: {}",
                    ready_timeout.as_millis(),
                    last.as_deref().unwrap_or("none (no answer)")
                ),
            })
        }
    }

    /// Starts connecting in the background and returns at once; calls fail
    /// with [`Error::Unavailable`] until the connection is ready. For services
    /// that must start while the broker is down.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `broker` when its TLS material is unusable.
    pub fn start(options: Options) -> Result<Self, Error> {
        let client_id = options.client_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{:012x}",
                options.prefix,
                fastrand::u64(..) & 0xffff_ffff_ffff
            )
        });
        let (mqtt_options, network) = connection::mqtt_options(&options.broker, &client_id)
            .map_err(|reason| Error::Invalid {
                field: Field::Broker,
                reason,
            })?;
        // Every in-flight call holds at most one request in the channel.
        let (client, mut eventloop) = AsyncClient::new(mqtt_options, options.max_in_flight + 64);
        eventloop.set_network_options(network);
        let shared = Arc::new(Shared {
            client,
            pending: PendingTable::new(options.recent_capacity),
            prefix: options.prefix.clone(),
            qos: match options.qos {
                RequestQos::AtLeastOnce => QoS::AtLeastOnce,
                _ => QoS::AtMostOnce,
            },
            max_packet_bytes: options.broker.max_packet_bytes,
            permits: Semaphore::new(options.max_in_flight),
            connected: watch::Sender::new(false),
            shutdown: watch::Sender::new(false),
            counters: Counters::default(),
            presence: options.presence.clone().map(|source| Presence {
                source,
                online: RwLock::new(HashMap::new()),
            }),
            last_error: Mutex::new(None),
        });
        let backoff = Backoff::new(options.broker.backoff_min, options.broker.backoff_max);
        tracing::debug!(broker = %options.broker.url(), client_id, "requester starting");
        let driver = tokio::spawn(connection::drive(
            Arc::clone(&shared),
            eventloop,
            backoff,
            shared.shutdown.subscribe(),
        ));
        Ok(Requester {
            handle: Arc::new(Handle {
                shared,
                driver: Mutex::new(Some(driver)),
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// Waits until the connection is up and subscribed, at most `timeout`;
    /// returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.shared().connected.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Why the connection last failed, if it ever did (TLS errors, refused
    /// credentials, ...).
    pub fn last_error(&self) -> Option<String> {
        self.shared()
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the connection is up and subscribed now.
    pub fn is_connected(&self) -> bool {
        *self.shared().connected.borrow()
    }

    /// The prefix replies come back under.
    pub fn prefix(&self) -> &Prefix {
        &self.shared().prefix
    }

    /// Calls `invocation.method` on `invocation.target` and waits for the
    /// device's reply, never past the call's deadline.
    ///
    /// A reply with a non-200 `status` (404 unknown method, 500 handler
    /// failed, ...) is still `Ok`: the device answered.
    ///
    /// # Errors
    /// - [`Error::Invalid`] for a zero timeout or topics over 256 bytes;
    /// - [`Error::PayloadTooLarge`] when the request exceeds the packet limit;
    /// - [`Error::Offline`] when presence tracking knows the target is offline;
    /// - [`Error::Unavailable`] when not connected (nothing was published);
    /// - [`Error::Timeout`] when no reply came before the deadline;
    /// - [`Error::Closed`] after [`Requester::shutdown`].
    pub async fn invoke(&self, invocation: Invocation) -> Result<Reply, Error> {
        let shared = self.shared();
        let start = invocation.start.unwrap_or_else(Instant::now);
        shared.check(&invocation)?;
        let id = MessageId::new();
        let at = tokio::time::Instant::from_std(start + invocation.timeout);
        let timeout = |shared: &Shared| {
            shared.counters.timeouts.fetch_add(1, Relaxed);
            Error::Timeout {
                elapsed: start.elapsed(),
                id,
            }
        };
        // Only a full in-flight limit makes a call wait here.
        let _permit = match shared.permits.try_acquire() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(Error::Closed),
            Err(TryAcquireError::NoPermits) => {
                // Boxed: the rare path should not grow every call's future.
                match Box::pin(tokio::time::timeout_at(at, shared.permits.acquire())).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(Error::Closed),
                    Err(_) => return Err(timeout(shared)),
                }
            }
        };
        // Everything the wait below does not need is gone before it starts,
        // which keeps each pending call's future small.
        let (_guard, rx) = shared.send(invocation, id, at.into_std())?;
        match tokio::time::timeout_at(at, rx).await {
            Ok(Ok(reply)) => Ok(Reply {
                id,
                status: reply.status,
                response: reply.response,
                elapsed: start.elapsed(),
            }),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(timeout(shared)),
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let s = self.shared();
        let c = &s.counters;
        Stats {
            pending: s.pending.len(),
            connected: *s.connected.borrow(),
            published: c.published.load(Relaxed),
            completed: c.completed.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            dropped_late: c.late.load(Relaxed),
            dropped_duplicate: c.duplicate.load(Relaxed),
            dropped_unknown: c.unknown.load(Relaxed),
            dropped_mismatched: c.mismatched.load(Relaxed),
            dropped_malformed: c.malformed.load(Relaxed),
            dropped_oversized: c.oversized.load(Relaxed),
            reconnects: c.connects.load(Relaxed).saturating_sub(1),
        }
    }

    /// Stops intake, ends pending calls with [`Error::Closed`], disconnects
    /// cleanly and waits for the connection task to finish. Every clone is
    /// closed.
    pub async fn shutdown(&self) {
        self.shared().shutdown.send_replace(true);
        let driver = self
            .handle
            .driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(driver) = driver {
            let _ = driver.await;
        }
    }
}

impl Session for Shared {
    fn client(&self) -> &AsyncClient {
        &self.client
    }

    fn ready(&self) -> &watch::Sender<bool> {
        &self.connected
    }

    fn filters(&self) -> Vec<SubscribeFilter> {
        let mut filters = vec![SubscribeFilter::new(
            reply_filter(&self.prefix),
            QoS::AtLeastOnce,
        )];
        if let Some(p) = &self.presence {
            filters.push(SubscribeFilter::new(p.filter(), QoS::AtLeastOnce));
        }
        filters
    }

    fn connected(&self) {
        self.counters.connects.fetch_add(1, Relaxed);
    }

    fn publish(self: &Arc<Self>, topic: &str, payload: &[u8]) {
        self.on_publish(topic, payload);
    }

    fn disconnected(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_owned());
    }

    fn stopping(&self) {
        // Waiters dropped here end their calls with `Closed`.
        drop(self.pending.drain());
    }
}

impl Shared {
    /// Everything that refuses a call before an id is made.
    fn check(&self, invocation: &Invocation) -> Result<(), Error> {
        if invocation.timeout.is_zero() {
            return Err(Error::Invalid {
                field: Field::Timeout,
                reason: "must be greater than zero".into(),
            });
        }
        check_call_length(&invocation.target, &invocation.method, &self.prefix)?;
        if *self.shutdown.borrow() {
            return Err(Error::Closed);
        }
        if !*self.connected.borrow() {
            return Err(Error::Unavailable {
                reason: "not connected to the broker".into(),
            });
        }
        if self.is_offline(&invocation.target) {
            return Err(Error::Offline {
                target: invocation.target.to_string(),
            });
        }
        Ok(())
    }

    /// Registers the call and queues its request, without waiting: the
    /// request channel holds a slot for every call in flight.
    fn send(
        &self,
        invocation: Invocation,
        id: MessageId,
        deadline: Instant,
    ) -> Result<(PendingGuard<Waiter>, oneshot::Receiver<ReplyPayload>), Error> {
        let call = CallTopics::new(
            invocation.target,
            invocation.method,
            self.prefix.clone(),
            id,
        )?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let payload = RequestPayload {
            id: id.to_string(),
            request: invocation.request,
            timestamp: Some(unix_millis(std::time::SystemTime::now())),
            timeout_ms: Some(whole_millis(remaining)),
        }
        .to_vec();
        let topic = call.request_topic();
        let size = payload.len() + topic.len() + PUBLISH_OVERHEAD_BYTES;
        if size > self.max_packet_bytes {
            return Err(Error::PayloadTooLarge {
                size,
                max: self.max_packet_bytes,
            });
        }
        let (tx, rx) = oneshot::channel();
        let guard = self.pending.insert(call, tx);
        self.client
            .try_publish(topic, self.qos, false, payload)
            .map_err(|e| Error::Unavailable {
                reason: format!("request not queued: {e}"),
            })?;
        self.counters.published.fetch_add(1, Relaxed);
        Ok((guard, rx))
    }

    fn is_offline(&self, target: &Target) -> bool {
        self.presence.as_ref().is_some_and(|p| {
            let online = p.online.read().unwrap_or_else(|e| e.into_inner());
            online.get(target).is_some_and(|(up, _)| !up)
        })
    }

    fn on_publish(&self, topic: &str, payload: &[u8]) {
        if let Some(p) = &self.presence {
            match p.parse(topic, payload) {
                Some(Some(event)) => return p.record(event),
                // A presence topic with an unreadable payload.
                Some(None) => return,
                None => {}
            }
        }
        self.on_reply(topic, payload);
    }

    fn on_reply(&self, topic: &str, payload: &[u8]) {
        let c = &self.counters;
        if payload.len() > self.max_packet_bytes {
            c.oversized.fetch_add(1, Relaxed);
            tracing::debug!(topic, bytes = payload.len(), "dropped reply: oversized");
            return;
        }
        let Ok(call) = CallTopics::parse_reply(topic) else {
            c.malformed.fetch_add(1, Relaxed);
            tracing::debug!(topic, "dropped reply: malformed topic");
            return;
        };
        if *call.prefix() != self.prefix {
            c.unknown.fetch_add(1, Relaxed);
            return;
        }
        let reply = match ReplyPayload::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                c.malformed.fetch_add(1, Relaxed);
                tracing::debug!(topic, "dropped reply: {e}");
                return;
            }
        };
        if MessageId::parse(&reply.id).ok() != Some(call.id()) {
            c.mismatched.fetch_add(1, Relaxed);
            tracing::debug!(topic, "dropped reply: payload id differs from the topic's");
            return;
        }
        match self.pending.complete(&call) {
            Ok(waiter) => {
                // Counted before the send, so a caller reading stats after
                // its reply sees it.
                c.completed.fetch_add(1, Relaxed);
                if waiter.send(reply).is_err() {
                    // The caller gave up between our lookup and the send.
                    c.completed.fetch_sub(1, Relaxed);
                    c.late.fetch_add(1, Relaxed);
                }
            }
            Err(reason) => {
                let counter = match reason {
                    Unmatched::Late => &c.late,
                    Unmatched::Duplicate => &c.duplicate,
                    Unmatched::Mismatched => &c.mismatched,
                    _ => &c.unknown,
                };
                counter.fetch_add(1, Relaxed);
                tracing::debug!(topic, ?reason, "dropped reply");
            }
        }
    }
}
