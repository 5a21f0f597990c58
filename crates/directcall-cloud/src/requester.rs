use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use directcall_core::deadline::{unix_millis, whole_millis};
use directcall_core::mqtt::{
    Connection, ConnectionError, ConnectionOptions, Driver, Link, Message, Properties, QoS,
    Session, Subscription,
};
use directcall_core::topic::{check_call_length, reply_filter};
use directcall_core::{
    CallTopics, Field, MessageId, Method, MqttVersion, Outcome, PendingCall, PendingTable, Prefix,
    Receipt, ReplyPayload, RequestPayload, Target, Unmatched,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;

use crate::error::Error;
use crate::keys::{self, Keys};
use crate::metrics::Metrics;
use crate::options::{Options, DEFAULT_TIMEOUT};
use crate::presence::{DeviceState, Origin, Presence};
use crate::records::{self, CallRecord, CallState, RecordOptions, Records};
use crate::store::Store;

/// Room for MQTT's fixed header, topic length and packet id around a payload.
const PUBLISH_OVERHEAD_BYTES: usize = 16;

/// One call to make: which method on which device, with what, for how long.
///
/// Setters consume and return the value, each stating its default; getters
/// of the same values carry `get_` (as `std::process::Command` does).
#[derive(Debug, Clone)]
pub struct Invocation {
    target: Target,
    method: Method,
    request: Value,
    timeout: Duration,
    start: Option<Instant>,
    traceparent: Option<String>,
    idempotency_key: Option<String>,
    caller: Option<String>,
    /// The id to publish under, when it is not a fresh one (a keyed call).
    id: Option<MessageId>,
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
            traceparent: None,
            idempotency_key: None,
            caller: None,
            id: None,
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
    /// Default: when `invoke` is called.
    pub fn started_at(mut self, start: impl Into<Instant>) -> Self {
        self.start = Some(start.into());
        self
    }

    /// The caller's W3C trace context (`00-{trace id}-{parent id}-{flags}`),
    /// passed on to the device: as the `traceparent` user property on MQTT 5
    /// and the `traceparent` payload field on both versions. A malformed one
    /// is refused by [`Requester::invoke`] (`Error::Invalid` naming
    /// `traceparent`). Default: none.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// The trace context, if set.
    pub fn get_traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// Makes the call idempotent under `key` (1 to 255 visible ASCII
    /// characters), the key of its [`caller`](Self::caller) when it names
    /// one. While a call with this key runs, another with the same
    /// key and the same target, method and request waits for its outcome
    /// instead of publishing; after it, gets the stored outcome, for the
    /// requester's record retention (10 minutes by default). The same key
    /// with another call is [`Error::KeyConflict`]. The call's id is derived
    /// from the key ([`MessageId::from_key`]), so a device also drops a
    /// retry that reached it some other way. [`Requester::invoke_keyed`]
    /// says whether an outcome was replayed. Default: none.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The idempotency key, if set.
    pub fn get_idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// Who makes the call: a tenant, a credential's name. Its idempotency
    /// key is this caller's own (the same key from two callers names two
    /// calls), and its record says who made it
    /// ([`CallRecord::caller`](crate::CallRecord::caller)); the gateway
    /// lets only that caller read it. Default: none (one caller).
    pub fn caller(mut self, caller: impl Into<String>) -> Self {
        self.caller = Some(caller.into());
        self
    }

    /// Who makes the call, if set.
    pub fn get_caller(&self) -> Option<&str> {
        self.caller.as_deref()
    }

    /// The device.
    pub fn get_target(&self) -> &Target {
        &self.target
    }

    /// The method.
    pub fn get_method(&self) -> &Method {
        &self.method
    }

    /// The request value.
    pub fn get_request(&self) -> &Value {
        &self.request
    }

    /// The timeout.
    pub fn get_timeout(&self) -> Duration {
        self.timeout
    }

    /// When the call started, if set with [`Invocation::started_at`].
    pub fn get_started_at(&self) -> Option<Instant> {
        self.start
    }
}

/// The records (if kept) and the shared store (if any), with the task that
/// writes the store behind the records.
#[allow(clippy::type_complexity)]
fn records_and_store(
    options: &Options,
) -> Result<(Option<Records>, Option<Arc<dyn Store>>), Error> {
    let records = options.records.map(Records::new);
    let Some(url) = options.store.as_deref() else {
        return Ok((records, None));
    };
    #[cfg(feature = "redis")]
    {
        let store: Arc<dyn Store> = Arc::new(crate::store::RedisStore::new(url).map_err(|e| {
            Error::from(directcall_core::Error::invalid(Field::Store, e.to_string()))
        })?);
        let retention = options.records.unwrap_or_default().retention;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<CallRecord>(65_536);
        let writer = Arc::clone(&store);
        tokio::spawn(async move {
            // What piled up while the last write was out goes in one
            // pipeline: one round trip for many changes, in order.
            let mut batch = Vec::with_capacity(512);
            while rx.recv_many(&mut batch, 512).await > 0 {
                if let Err(e) = writer.save(&batch, retention).await {
                    tracing::warn!(records = batch.len(), "shared store: {e}");
                }
                batch.clear();
            }
        });
        let records = records.unwrap_or_else(|| Records::new(RecordOptions::default()));
        Ok((Some(records.mirrored(tx)), Some(store)))
    }
    #[cfg(not(feature = "redis"))]
    {
        Err(directcall_core::Error::invalid(
            Field::Store,
            format!(
                "{}: this build has no Redis support (feature \"redis\")",
                crate::store::redacted(url)
            ),
        )
        .into())
    }
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
        }),
        CallState::Offline => Err(Error::NoSubscriber { id }),
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
async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match Pin::new(&mut f).poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// What a call made by [`Requester::invoke_keyed`] came to.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Keyed {
    /// Its outcome.
    pub result: Result<Reply, Error>,
    /// Whether the outcome is another call's with the same idempotency key
    /// (this call published nothing).
    pub replayed: bool,
}

/// A device's answer to one call.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
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

impl Reply {
    /// Whether the device's status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The response when the status is 2xx.
    ///
    /// # Errors
    /// [`Error::Rejected`] with the status and response otherwise.
    pub fn into_result(self) -> Result<Value, Error> {
        if self.is_success() {
            Ok(self.response)
        } else {
            Err(Error::Rejected {
                id: self.id,
                status: self.status,
                response: self.response,
            })
        }
    }

    /// The response, decoded as `T`, when the status is 2xx.
    ///
    /// ```
    /// # use directcall_cloud::Reply;
    /// # fn demo(reply: Reply) -> Result<(), directcall_cloud::Error> {
    /// #[derive(serde::Deserialize)]
    /// struct Windows { percent: u8 }
    /// let windows: Windows = reply.json()?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Rejected`] for a status outside 2xx, [`Error::Decode`] when
    /// the response is not a `T`.
    pub fn json<T: DeserializeOwned>(self) -> Result<T, Error> {
        let id = self.id;
        serde_json::from_value(self.into_result()?).map_err(|e| Error::Decode {
            id,
            source: Arc::new(e),
        })
    }
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
    /// MQTT 5: requests the broker refused in its PUBACK (no device
    /// subscribed, not authorized, ...); each ended its call at once.
    pub refused: u64,
    /// Delivery receipts received ([`Options::delivery_receipts`]).
    pub receipts: u64,
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

/// A reply as a pending call holds it: boxed, so a waiting call's slot stays
/// small.
type Slot = Box<ReplyPayload>;

#[derive(Debug)]
struct Shared {
    link: Link,
    pending: PendingTable<Slot>,
    /// Wakes the deadline sweeper when a call's deadline is the earliest.
    sweep: Arc<Notify>,
    sweeper_stop: watch::Sender<bool>,
    prefix: Prefix,
    qos: QoS,
    reply_qos: QoS,
    /// MQTT 5: requests carry expiry, response topic and correlation data.
    v5: bool,
    permits: Arc<Semaphore>,
    counters: Counters,
    metrics: Metrics,
    presence: Option<Presence>,
    /// The broker URL last reported in use, for the `broker_in_use` gauge.
    reported_broker: Mutex<Option<String>>,
    records: Option<Records>,
    keys: Keys,
    /// Requests ask for delivery receipts.
    receipts: bool,
    /// Where records and keys are shared with other requesters.
    store: Option<Arc<dyn Store>>,
    store_url: Option<String>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    driver: Mutex<Option<Driver>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The last handle is gone: stop the driver, which disconnects, and
        // the deadline sweeper.
        self.shared.link.stop();
        self.shared.sweeper_stop.send_replace(true);
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
    /// [`Error::Setup`] for unusable broker settings; [`Error::Unavailable`]
    /// when the broker cannot be reached and subscribed within the options'
    /// ready timeout (default 10 s).
    pub async fn connect(options: Options) -> Result<Self, Error> {
        let ready_timeout = options.ready_timeout;
        let requester = Self::start(options)?;
        if requester.wait_ready(ready_timeout).await {
            Ok(requester)
        } else {
            let last_error = requester.last_error();
            requester.shutdown().await;
            Err(Error::Unavailable {
                reason: format!(
                    "not connected and subscribed within {} ms",
                    ready_timeout.as_millis()
                ),
                last_error,
            })
        }
    }

    /// Starts connecting in the background and returns at once; calls fail
    /// with [`Error::Unavailable`] until the connection is ready. For services
    /// that must start while the broker is down.
    ///
    /// # Errors
    /// [`Error::Setup`] when the TLS material is unusable or the transport
    /// needs a feature that is not compiled in.
    pub fn start(options: Options) -> Result<Self, Error> {
        let prefix = options.get_reply_prefix()?;
        let client_id = options.get_client_id();
        // Every in-flight call holds at most one request in the queue.
        #[allow(unused_mut)]
        let mut connection_options = ConnectionOptions::new(options.broker.clone(), client_id)
            .capacity(options.max_in_flight)
            .probe_dots();
        let v5 = options.broker.mqtt_version == MqttVersion::V5;
        if v5 {
            // A PUBACK that says "no matching subscribers" ends its call.
            connection_options = connection_options.track_acks();
        }
        #[cfg(feature = "websocket")]
        if let Some(signer) = options.url_signer.clone() {
            connection_options = connection_options.url_signer(signer);
        }
        let connection = Connection::new(connection_options)?;
        let (records, store) = records_and_store(&options)?;
        let pending = PendingTable::new(options.recent_capacity);
        let sweep = Arc::new(Notify::new());
        let sweeper_stop = watch::Sender::new(false);
        tokio::spawn(sweep_deadlines(
            pending.clone(),
            Arc::clone(&sweep),
            sweeper_stop.subscribe(),
        ));
        let shared = Arc::new(Shared {
            link: connection.link(),
            pending,
            sweep,
            sweeper_stop,
            prefix,
            qos: options.request_qos.unwrap_or(if v5 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            }),
            reply_qos: options.reply_qos,
            v5,
            permits: Arc::new(Semaphore::new(options.max_in_flight)),
            counters: Counters::default(),
            metrics: Metrics::register(),
            presence: options
                .presence
                .clone()
                .map(|source| Presence::new(source, options.mirror_presence.clone())),
            reported_broker: Mutex::new(None),
            records,
            store,
            store_url: options.store.as_deref().map(crate::store::redacted),
            keys: Keys::new(options.records.unwrap_or_default()),
            receipts: options.receipts,
        });
        tracing::debug!(broker = %options.broker.url(), client_id = shared.link.client_id(), "requester starting");
        let driver = connection.run(Arc::clone(&shared));
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
        self.shared().link.wait_ready(timeout).await
    }

    /// Why the connection last failed, if it ever did (TLS errors, refused
    /// credentials, ...).
    pub fn last_error(&self) -> Option<ConnectionError> {
        self.shared().link.last_error()
    }

    /// Whether the connection is up and subscribed now.
    pub fn is_connected(&self) -> bool {
        self.shared().link.is_ready()
    }

    /// The broker endpoint in use (or being tried), as a URL without
    /// credentials or query.
    pub fn broker_url(&self) -> String {
        self.shared().link.broker_url()
    }

    /// Drops the connection and makes a new one at once: for a process that
    /// was frozen (a Lambda execution environment thawed after an idle spell)
    /// and cannot trust a socket that sent no keepalive meanwhile. Calls
    /// fail with [`Error::Unavailable`] until the new connection is ready.
    pub fn reconnect(&self) {
        self.shared().link.reconnect();
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> &str {
        self.shared().link.client_id()
    }

    /// The prefix replies come back under: `{prefix}-{instance}`, or the
    /// base prefix with [`Options::shared_prefix`](crate::Options::shared_prefix).
    pub fn prefix(&self) -> &Prefix {
        &self.shared().prefix
    }

    /// Calls `invocation`'s method on its target and waits for the device's
    /// reply, never past the call's deadline.
    ///
    /// A reply with a non-2xx `status` (404 unknown method, 500 handler
    /// failed, ...) is still `Ok`: the device answered
    /// ([`Reply::into_result`] turns it into an error).
    ///
    /// # Errors
    /// - [`Error::Invalid`] for a zero timeout or topics over 256 bytes;
    /// - [`Error::PayloadTooLarge`] when the request exceeds the packet limit;
    /// - [`Error::Offline`] when presence tracking knows the target is offline;
    /// - [`Error::Unavailable`] when not connected (nothing was published);
    /// - [`Error::Timeout`] when no reply came before the deadline;
    /// - [`Error::Closed`] after [`Requester::shutdown`], also for a call
    ///   that was waiting when it came.
    pub fn invoke(&self, invocation: Invocation) -> Invoke {
        if invocation.idempotency_key.is_some() {
            let requester = self.clone();
            return Invoke {
                state: InvokeState::Slow(Box::pin(async move {
                    requester.invoke_keyed(invocation).await.result
                })),
                id: None,
            };
        }
        Invoke::start(Arc::clone(&self.handle.shared), invocation)
    }

    /// [`Requester::invoke`], saying whether the outcome is a stored one:
    /// for a call with an idempotency key, `replayed` is true when another
    /// call with the key ran (or runs) and this one published nothing. A
    /// stored timeout whose late answer has since arrived
    /// ([`Options::record_calls`]) is replayed as that answer.
    ///
    /// ```no_run
    /// # async fn f(requester: directcall_cloud::Requester) -> Result<(), directcall_cloud::Error> {
    /// use directcall_cloud::Invocation;
    /// let call = || Invocation::parse("VIN123", "unlock", "now").map(|c| c.idempotency_key("order-4711"));
    /// let first = requester.invoke_keyed(call()?).await; // runs
    /// let again = requester.invoke_keyed(call()?).await; // the stored outcome
    /// assert!(!first.replayed && again.replayed);
    /// # Ok(()) }
    /// ```
    pub async fn invoke_keyed(&self, mut invocation: Invocation) -> Keyed {
        let Some(key) = invocation.idempotency_key.take() else {
            return Keyed {
                result: self.invoke(invocation).await,
                replayed: false,
            };
        };
        let shared = self.shared();
        if let Err(e) = keys::check_key(&key).and_then(|()| shared.check(&invocation)) {
            return Keyed {
                result: Err(e),
                replayed: false,
            };
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
            keys::Attach::Conflict => {
                return Keyed {
                    result: Err(Error::KeyConflict),
                    replayed: false,
                }
            }
            keys::Attach::First(tx, rx) => {
                // Another requester may hold the key: ask the shared store.
                let claim = match &shared.store {
                    Some(store) => store
                        .claim(&key, fingerprint, shared.keys.retention())
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
                        return Keyed {
                            result: Err(Error::KeyConflict),
                            replayed: false,
                        };
                    }
                    Some(_) => {
                        // Another requester runs it: follow its record.
                        let requester = self.clone();
                        tokio::spawn(async move {
                            let record = requester
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
                        return self.keyed_outcome(rx, true, deadline, start, id).await;
                    }
                    None => {}
                }
                invocation.id = Some(id);
                // Runs to its end even if this caller goes away, so that
                // every call joined to it gets its outcome.
                let requester = self.clone();
                tokio::spawn(async move {
                    let result = requester.invoke(invocation).await;
                    tx.send_replace(Some(result));
                });
                (rx, false)
            }
            keys::Attach::Joined(rx) => (rx, true),
        };
        self.keyed_outcome(outcome, replayed, deadline, start, id)
            .await
    }

    /// Waits for a keyed call's shared outcome, within this caller's
    /// deadline.
    async fn keyed_outcome(
        &self,
        mut outcome: keys::Shared,
        replayed: bool,
        deadline: Instant,
        start: Instant,
        id: MessageId,
    ) -> Keyed {
        let result =
            match tokio::time::timeout_at(deadline, outcome.wait_for(Option::is_some)).await {
                Ok(Ok(done)) => done.clone().unwrap_or(Err(Error::Closed)),
                Ok(Err(_)) => Err(Error::Closed),
                Err(_) => Err(Error::Timeout {
                    elapsed: start.elapsed(),
                    id,
                }),
            };
        let result = match result {
            // A stored timeout whose late answer has come since.
            Err(Error::Timeout { id, .. }) if replayed => match self.fetch_call_record(&id).await {
                Some(r) if r.state == CallState::AnsweredLate => result_of_record(r, start),
                _ => Err(Error::Timeout {
                    elapsed: start.elapsed(),
                    id,
                }),
            },
            other => other,
        };
        Keyed { result, replayed }
    }

    /// The record of call `id` ([`Options::record_calls`]): what became of
    /// it, with the device's answer even when it came after the deadline.
    /// `None` when calls are not recorded, for an id this requester never
    /// published, and once the record's retention has passed.
    ///
    /// ```no_run
    /// # async fn f(requester: directcall_cloud::Requester, call: directcall_cloud::Invocation) {
    /// use directcall_cloud::{CallState, Error};
    /// if let Err(Error::Timeout { id, .. }) = requester.invoke(call).await {
    ///     tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    ///     match requester.call_record(&id) {
    ///         Some(r) if r.state == CallState::AnsweredLate => println!("it ran after all: {:?}", r.response),
    ///         Some(r) => println!("still {:?}", r.state),
    ///         None => println!("no record"),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn call_record(&self, id: &MessageId) -> Option<CallRecord> {
        self.shared().records.as_ref()?.get(id)
    }

    /// [`Requester::call_record`], or, for a call another requester made,
    /// its record in the shared store ([`Options::redis_store`]).
    pub async fn fetch_call_record(&self, id: &MessageId) -> Option<CallRecord> {
        if let Some(record) = self.call_record(id) {
            return Some(record);
        }
        let store = self.shared().store.as_ref()?;
        match store.load(id).await {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(%id, "shared store: {e}");
                None
            }
        }
    }

    /// [`Requester::fetch_call_record`], waiting up to `wait` for the call
    /// to be final: answered (in time or late), or never answerable
    /// (offline, unavailable). A long poll: a call that timed out is
    /// waited on for its late answer until `wait` ends. A call of this requester's is watched in memory; one of
    /// another's is read from the shared store every 50 ms.
    pub async fn wait_call_record(&self, id: &MessageId, wait: Duration) -> Option<CallRecord> {
        let deadline = Instant::now() + wait;
        let records = self.shared().records.as_ref()?;
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

    /// Starts a call and returns its id at once, once its request is
    /// published; the call goes on in a task of its own, and its outcome
    /// lands on its record ([`Requester::call_record`],
    /// [`Requester::wait_call_record`]), so calls must be recorded
    /// ([`Options::record_calls`]).
    ///
    /// # Errors
    /// What [`Requester::invoke`] would refuse before publishing (invalid
    /// names, no broker, a conflicting idempotency key...), and
    /// `Error::Invalid` naming `request` when calls are not recorded.
    pub async fn submit(&self, invocation: Invocation) -> Result<MessageId, Error> {
        if self.shared().records.is_none() {
            return Err(directcall_core::Error::invalid(
                Field::Request,
                "an asynchronous call needs call records (Options::record_calls)",
            )
            .into());
        }
        if let Some(key) = invocation.idempotency_key.as_deref() {
            keys::check_key(key)?;
            let id = MessageId::from_key(&scoped_key(&invocation, key));
            let requester = self.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let keyed = requester.invoke_keyed(invocation);
                tokio::pin!(keyed);
                // Published (or refused) on the first poll, or joined to
                // the call that holds the key.
                let first = futures_poll_once(keyed.as_mut()).await;
                match first {
                    Some(done) => {
                        // An outcome at once: a refusal, or a stored one.
                        let _ = tx.send(match done.result {
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
                        keyed.await;
                    }
                }
            });
            return rx.await.unwrap_or(Err(Error::Closed));
        }
        let invoke = self.invoke(invocation);
        match invoke.id {
            Some(id) => {
                tokio::spawn(invoke);
                Ok(id)
            }
            None => invoke.await.map(|r| r.id),
        }
    }

    /// The shared store's URL ([`Options::redis_store`]), if any, without
    /// its password.
    pub fn get_store(&self) -> Option<&str> {
        self.shared().store_url.as_deref()
    }

    /// Whether requests ask for delivery receipts
    /// ([`Options::delivery_receipts`]).
    pub fn asks_receipts(&self) -> bool {
        self.shared().receipts
    }

    /// How calls are recorded, if they are.
    pub fn record_options(&self) -> Option<RecordOptions> {
        self.shared().records.as_ref().map(Records::options)
    }

    /// Whether the requester tracks presence ([`Options::presence`],
    /// [`Options::aws_presence`]).
    pub fn tracks_presence(&self) -> bool {
        self.shared().presence.is_some()
    }

    /// Every target with a presence record, online or offline and since
    /// when, sorted by name. Empty without presence tracking.
    ///
    /// ```no_run
    /// # async fn run(requester: directcall_cloud::Requester) {
    /// for device in requester.devices() {
    ///     println!("{} online={} since={}", device.target, device.online, device.since_ms);
    /// }
    /// # }
    /// ```
    pub fn devices(&self) -> Vec<DeviceState> {
        self.shared()
            .presence
            .as_ref()
            .map(Presence::devices)
            .unwrap_or_default()
    }

    /// The presence changes from now on: a target going online or offline.
    /// A watcher more than 1,024 changes behind gets
    /// [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged)
    /// (read [`devices`](Self::devices) again); without presence tracking
    /// the receiver is closed at once.
    ///
    /// ```no_run
    /// # async fn run(requester: directcall_cloud::Requester) {
    /// let mut changes = requester.watch_devices();
    /// while let Ok(device) = changes.recv().await {
    ///     println!("{} is {}", device.target, if device.online { "online" } else { "offline" });
    /// }
    /// # }
    /// ```
    pub fn watch_devices(&self) -> tokio::sync::broadcast::Receiver<DeviceState> {
        match &self.shared().presence {
            Some(p) => p.watch(),
            None => tokio::sync::broadcast::channel(1).1,
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let s = self.shared();
        let c = &s.counters;
        let dropped = |d: Dropped| c.dropped[d as usize].load(Relaxed);
        Stats {
            pending: s.pending.len(),
            connected: s.link.is_ready(),
            published: c.published.load(Relaxed),
            completed: c.completed.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            dropped_late: dropped(Dropped::Late),
            dropped_duplicate: dropped(Dropped::Duplicate),
            dropped_unknown: dropped(Dropped::Unknown),
            dropped_mismatched: dropped(Dropped::Mismatched),
            dropped_malformed: dropped(Dropped::Malformed),
            dropped_oversized: dropped(Dropped::Oversized),
            reconnects: s.link.connects().saturating_sub(1),
            refused: c.refused.load(Relaxed),
            receipts: c.receipts.load(Relaxed),
        }
    }

    /// Stops intake, ends every call in flight with [`Error::Closed`] (those
    /// waiting for a slot too), disconnects cleanly and waits for the
    /// connection task to finish. Every clone is closed.
    pub async fn shutdown(&self) {
        let shared = self.shared();
        shared.permits.close();
        shared.pending.close();
        shared.link.stop();
        shared.sweeper_stop.send_replace(true);
        let driver = self
            .handle
            .driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(driver) = driver {
            driver.stop().await;
        }
    }
}

/// The future of one call, returned by [`Requester::invoke`]. It owns what
/// it needs (no borrow of the requester), and while it waits it holds only
/// the call's slot, its in-flight permit, its start and its id: everything
/// else (validation, encoding, the publish) was done when it was made.
#[must_use = "a call does nothing unless awaited; dropping it abandons the call"]
pub struct Invoke {
    state: InvokeState,
    /// The call's id, once it has one.
    id: Option<MessageId>,
}

impl std::fmt::Debug for Invoke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            InvokeState::Failed(_) => "failed",
            InvokeState::Waiting(_) => "waiting",
            InvokeState::Slow(_) => "waiting for an in-flight slot",
            InvokeState::Done => "done",
        };
        f.debug_struct("Invoke").field("state", &state).finish()
    }
}

enum InvokeState {
    /// Refused before anything was published.
    Failed(Option<Box<Error>>),
    Waiting(Waiting),
    /// The in-flight limit was full: the rare path, boxed.
    Slow(Pin<Box<dyn Future<Output = Result<Reply, Error>> + Send>>),
    Done,
}

/// A published call waiting for its outcome.
struct Waiting {
    shared: Arc<Shared>,
    call: PendingCall<Slot>,
    _permit: OwnedSemaphorePermit,
    start: Instant,
    id: MessageId,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.shared.metrics.pending.decrement(1.0);
    }
}

impl Invoke {
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
            Err(TryAcquireError::NoPermits) => InvokeState::Slow(Box::pin(async move {
                let permit = acquire_by(&shared.permits, at, start, id).await;
                let permit = shared.count_timeout(permit)?;
                let waiting =
                    Waiting::send(Arc::clone(&shared), invocation, permit, start, id, at)?;
                Invoke {
                    state: InvokeState::Waiting(waiting),
                    id: Some(id),
                }
                .await
            })),
        };
        Invoke {
            state,
            id: Some(id),
        }
    }

    fn failed(e: Error) -> Self {
        Invoke {
            state: InvokeState::Failed(Some(Box::new(e))),
            id: None,
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
        Ok(Waiting {
            shared,
            call,
            _permit: permit,
            start,
            id,
        })
    }
}

impl Future for Invoke {
    type Output = Result<Reply, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
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
                let result = w.shared.count_timeout(reply_of(outcome, w.start, w.id));
                if let Some(records) = &w.shared.records {
                    record_outcome(records, w.id, &result);
                }
                // Releases the permit and the pending gauge.
                self.state = InvokeState::Done;
                Poll::Ready(result)
            }
            InvokeState::Slow(f) => {
                let result = std::task::ready!(f.as_mut().poll(cx));
                self.state = InvokeState::Done;
                Poll::Ready(result)
            }
            InvokeState::Done => panic!("Invoke polled after it completed"),
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
                r.status = Some(reply.status);
                r.response = Some(reply.response.clone());
            }
            Err(Error::Timeout { .. }) => r.state = CallState::TimedOut,
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
        Outcome::Answered(reply) => Ok(Reply {
            id,
            status: reply.status,
            response: reply.response,
            elapsed: start.elapsed(),
        }),
        Outcome::TimedOut => Err(Error::Timeout {
            elapsed: start.elapsed(),
            id,
        }),
        Outcome::Refused(0x10) => Err(Error::NoSubscriber { id }),
        Outcome::Refused(code) => Err(Error::Refused { id, code }),
        // Closed, and what a later version of the table may add.
        _ => Err(Error::Closed),
    }
}

/// Fires the table's deadlines: sleeps until the earliest, ends the calls
/// due, and starts over, or sooner when a call with an earlier deadline is
/// registered. One task per requester, instead of a timer per call.
async fn sweep_deadlines(
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
    }

    fn on_message(self: &Arc<Self>, message: Message<'_>) {
        if let Some(p) = &self.presence {
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

    fn on_disconnected(&self, _error: &ConnectionError) {
        self.metrics.connected.set(0.0);
    }

    fn on_publish_refused(&self, topic: &str, reason: u8) {
        // Only requests are tracked: the topic is a request topic of ours.
        if let Ok(call) = CallTopics::parse_request(topic) {
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
        self.metrics.connected.set(0.0);
        // Calls still waiting end with `Closed`.
        self.pending.close();
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
                reason: "not connected to the broker".into(),
                last_error: self.link.last_error(),
            });
        }
        if self
            .presence
            .as_ref()
            .is_some_and(|p| p.is_offline(&invocation.target))
        {
            return Err(Error::Offline {
                target: invocation.target.clone(),
            });
        }
        Ok(())
    }

    fn count_timeout<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(Error::Timeout { .. }) = &result {
            self.counters.timeouts.fetch_add(1, Relaxed);
            self.metrics.timeouts.increment(1);
        }
        result
    }

    /// Registers the call and queues its request, without waiting: the
    /// request queue holds a slot for every call in flight.
    fn send(
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
        payload.receipt = self.receipts;
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
            );
        }
        if let Err(e) = self
            .link
            .publish_with(topic, payload, self.qos, false, properties.as_ref())
        {
            if let Some(records) = &self.records {
                records.update(&id, |r| r.state = CallState::Unavailable);
            }
            return Err(Error::Unavailable {
                reason: format!("request {e}"),
                last_error: None,
            });
        }
        self.counters.published.fetch_add(1, Relaxed);
        self.metrics.published.increment(1);
        Ok(pending)
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

    fn on_reply(&self, topic: &str, payload: &[u8]) {
        if payload.len() > self.link.max_packet_bytes() {
            self.dropped(Dropped::Oversized);
            tracing::debug!(topic, bytes = payload.len(), "dropped reply: oversized");
            return;
        }
        let Ok(call) = CallTopics::parse_reply(topic) else {
            self.dropped(Dropped::Malformed);
            tracing::debug!(topic, "dropped reply: malformed topic");
            return;
        };
        if *call.prefix() != self.prefix {
            self.dropped(Dropped::Unknown);
            return;
        }
        let reply = match ReplyPayload::from_slice(payload) {
            Ok(r) => r,
            // Not an answer: maybe a delivery receipt (never on the hot path).
            Err(_) if self.on_receipt(&call, payload) => return,
            Err(e) => {
                self.dropped(Dropped::Malformed);
                tracing::debug!(topic, "dropped reply: {e}");
                return;
            }
        };
        if MessageId::parse(&reply.id).ok() != Some(call.id()) {
            self.dropped(Dropped::Mismatched);
            tracing::debug!(topic, "dropped reply: payload id differs from the topic's");
            return;
        }
        // Counted first, so a caller reading stats after its reply sees it.
        self.counters.completed.fetch_add(1, Relaxed);
        match self.pending.complete_or_return(&call, Box::new(reply)) {
            Ok(()) => self.metrics.completed.increment(1),
            Err((Unmatched::Late, reply)) if self.records.is_some() => {
                self.counters.completed.fetch_sub(1, Relaxed);
                self.dropped(Dropped::Late);
                let reply = *reply;
                if let Some(records) = &self.records {
                    if records.answered_late(&call.id(), reply.status, reply.response) {
                        tracing::debug!(topic, "late reply kept on the call's record");
                    }
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

#[cfg(test)]
mod tests {
    //! The deadline logic on tokio's paused clock: exact and instant.
    use super::*;

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
            t.complete(&topics(id), Box::new(reply)).unwrap();
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
