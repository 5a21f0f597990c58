//! The cheap-to-clone handle that makes calls over one connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use directcall_core::mqtt::{Connection, ConnectionError, ConnectionOptions};
use directcall_core::{MessageId, MqttVersion, Prefix};

use crate::error::{Error, Unavailable};
use crate::invocation::Invocation;
use crate::invoke::Invoke;
use crate::keyed;
use crate::options::Options;
use crate::presence::{DeviceState, Presence};
use crate::records::{CallRecord, RecordOptions, Records};
#[cfg(feature = "gateway")]
use crate::reply::Reply;
use crate::session::{Handle, Shared, Stats};

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
    /// ```no_run
    /// use directcall_cloud::{BrokerOptions, Options, Requester};
    ///
    /// # async fn run() -> Result<(), directcall_cloud::Error> {
    /// let broker = BrokerOptions::from_url("mqtt://127.0.0.1:1883")?;
    /// let requester = Requester::connect(Options::new(broker)).await?;
    /// // Clone it into every task that makes calls: one connection carries them all.
    /// let for_a_task = requester.clone();
    /// # drop(for_a_task);
    /// requester.shutdown().await;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Setup`] for unusable broker settings; [`Error::Unavailable`]
    /// ([`Unavailable::NotReady`]) when the broker cannot be reached and
    /// subscribed within the options' ready timeout (default 10 s).
    pub async fn connect(options: Options) -> Result<Self, Error> {
        let ready_timeout = options.ready_timeout;
        let requester = Self::start(options)?;
        if requester.wait_ready(ready_timeout).await {
            Ok(requester)
        } else {
            let last_error = requester.last_error();
            requester.shutdown().await;
            Err(Error::Unavailable {
                cause: Unavailable::NotReady {
                    timeout: ready_timeout,
                },
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
            .probe_dots()
            // A call's request expects an answer: silence after it is a
            // reason to ask whether the broker is still there.
            .ping_after_silence();
        if options.broker.mqtt_version == MqttVersion::V5 {
            // A PUBACK that says "no matching subscribers" ends its call.
            connection_options = connection_options.track_acks();
        }
        #[cfg(feature = "websocket")]
        if let Some(signer) = options.url_signer.clone() {
            connection_options = connection_options.url_signer(signer);
        }
        let connection = Connection::new(connection_options)?;
        let shared = Arc::new(Shared::new(&options, connection.link(), prefix)?);
        tracing::debug!(broker = %options.broker.url(), client_id = shared.link.client_id(), "requester starting");
        let driver = connection.run(Arc::clone(&shared));
        if shared.store.is_some() {
            tokio::spawn(crate::session::adopt_departed(
                Arc::downgrade(&shared),
                shared.sweeper_stop.subscribe(),
            ));
        }
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
    /// base prefix with [`Options::shared_prefix`].
    pub fn prefix(&self) -> &Prefix {
        &self.shared().prefix
    }

    /// Calls `invocation`'s method on its target and waits for the device's
    /// reply, never past the call's deadline.
    ///
    /// The call is a lazy future, as async-nats' `request` is: nothing is
    /// checked or published until it is first polled (awaited, or given to
    /// `tokio::spawn`), and a call dropped before that publishes nothing.
    /// [`Requester::submit`] starts a call at once and tracks it without
    /// waiting.
    ///
    /// A reply with a non-2xx `status` (404 unknown method, 500 handler
    /// failed, ...) is still `Ok`: the device answered
    /// ([`Reply::into_result`](crate::Reply::into_result) turns it into an
    /// error). A call with an
    /// [`idempotency_key`](Invocation::idempotency_key) may get the stored
    /// outcome of another call with the key instead of publishing: a reply
    /// then says [`replayed`](crate::Reply::replayed).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use directcall_cloud::{Error, Invocation, Requester};
    ///
    /// # async fn run(requester: Requester) -> Result<(), Error> {
    /// let call = Invocation::parse("VIN123", "unlock", "now")?.timeout(Duration::from_secs(3));
    /// match requester.invoke(call).await {
    ///     Ok(reply) if reply.status == 200 => println!("unlocked: {}", reply.response),
    ///     Ok(reply) => println!("the car said no: {} {}", reply.status, reply.response),
    ///     Err(e @ (Error::Offline { .. } | Error::NoSubscriber { .. })) => println!("not there: {e}"),
    ///     Err(e) if e.may_have_run() => println!("call {:?} may have run: {e}", e.id()),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Nothing was published for these:
    /// - [`Error::Invalid`] for a zero timeout or topics over 256 bytes;
    /// - [`Error::PayloadTooLarge`] when the request exceeds the packet limit;
    /// - [`Error::Offline`] when presence tracking knows the target is offline;
    /// - [`Error::UnknownTarget`] when presence is strict and the target has
    ///   no presence record;
    /// - [`Error::Unavailable`] when not connected;
    /// - [`Error::KeyConflict`] when the idempotency key was used for
    ///   another call;
    ///
    /// and these come after publishing:
    /// - [`Error::NoSubscriber`] (MQTT 5) when the broker's PUBACK says no
    ///   device is subscribed;
    /// - [`Error::Refused`] (MQTT 5) when the broker refused the request
    ///   with another reason code;
    /// - [`Error::BadReply`] when the device's reply broke the rules (a
    ///   `status` that is not an integer from 0 to 65535);
    /// - [`Error::Timeout`] when no reply came before the deadline;
    /// - [`Error::Closed`] after [`Requester::shutdown`], also for a call
    ///   that was waiting when it came.
    ///
    /// [`Error::may_have_run`] says which leave the command maybe run.
    pub fn invoke(&self, invocation: Invocation) -> Invoke {
        if invocation.idempotency_key.is_some() {
            let handle = Arc::clone(&self.handle);
            return Invoke::from_future(async move { keyed::invoke(handle, invocation).await.0 });
        }
        Invoke::new(Arc::clone(&self.handle.shared), invocation)
    }

    /// Calls one method on many devices within one deadline
    /// ([`GroupInvocation`](crate::GroupInvocation): a list, a glob over the targets presence
    /// knows, or a named group) and yields each device's result as it
    /// comes, then a summary. Nothing is published until it is awaited;
    /// the requests are out (within [`GroupInvocation::max_in_flight`](crate::GroupInvocation::max_in_flight) at
    /// a time) once it returns.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use directcall_cloud::{DeviceOutcome, Error, GroupInvocation, Requester};
    ///
    /// # async fn run(requester: Requester) -> Result<(), Error> {
    /// let call = GroupInvocation::matching("Kiosk-*", "reboot", "now")?
    ///     .online_only(true)
    ///     .timeout(Duration::from_secs(5));
    /// let mut results = requester.invoke_group(call).await?;
    /// while let Some(r) = results.next().await {
    ///     if r.outcome != DeviceOutcome::Ok {
    ///         println!("{}: {:?} {:?}", r.target, r.outcome, r.reason);
    ///     }
    /// }
    /// let s = results.summary();
    /// println!("{} of {} rebooted in {} ms", s.ok, s.total, s.elapsed_ms);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Nothing was published for these:
    /// - [`Error::Invalid`] for a zero timeout, a bad trace context, a
    ///   pattern without presence, or a name with `.` on a broker that
    ///   refuses them;
    /// - [`Error::Unavailable`] when not connected, [`Error::Closed`] after
    ///   [`Requester::shutdown`];
    /// - [`Error::KeyConflict`] when the idempotency key was used for
    ///   another group call, or its first call still runs.
    ///
    /// A device's own failure (an error status, no answer, offline, not in
    /// the caller's scope) is its [`DeviceResult`](crate::DeviceResult),
    /// not an error of the call.
    pub async fn invoke_group(
        &self,
        call: crate::GroupInvocation,
    ) -> Result<crate::GroupCall, Error> {
        crate::fanout::start(Arc::clone(&self.handle.shared), call).await
    }

    /// [`Requester::invoke`], saying also whether the outcome is a stored
    /// one, for an error too (the gateway's `Idempotent-Replayed`).
    #[cfg(feature = "gateway")]
    pub(crate) async fn invoke_replayed(
        &self,
        invocation: Invocation,
    ) -> (Result<Reply, Error>, bool) {
        // A plain call waits in its own small future; the keyed path's
        // larger state (the store's claim, the wait for another's
        // outcome) is boxed, so that it does not size every call's future.
        if invocation.idempotency_key.is_none() {
            return (self.invoke(invocation).await, false);
        }
        Box::pin(keyed::invoke(Arc::clone(&self.handle), invocation)).await
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
        self.shared().call_record(id)
    }

    /// [`Requester::call_record`], or, for a call another requester made,
    /// its record in the shared store ([`Options::redis_store`]).
    pub async fn fetch_call_record(&self, id: &MessageId) -> Option<CallRecord> {
        self.shared().fetch_call_record(id).await
    }

    /// [`Requester::fetch_call_record`], waiting up to `wait` for the call
    /// to be final: answered (in time or late), or never answerable
    /// (offline, unavailable). A long poll: a call that timed out is
    /// waited on for its late answer until `wait` ends. A call of this requester's is watched in memory; one of
    /// another's is read from the shared store every 50 ms.
    pub async fn wait_call_record(&self, id: &MessageId, wait: Duration) -> Option<CallRecord> {
        self.shared().wait_call_record(id, wait).await
    }

    /// Starts a call and returns its id at once, once its request is
    /// published; the call goes on in a task of its own, and its outcome
    /// lands on its record ([`Requester::call_record`],
    /// [`Requester::wait_call_record`]), so calls must be recorded
    /// ([`Options::record_calls`]).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use directcall_cloud::{BrokerOptions, CallState, Invocation, Options, RecordOptions, Requester};
    ///
    /// # async fn run() -> Result<(), directcall_cloud::Error> {
    /// let options = Options::new(BrokerOptions::from_url("mqtt://127.0.0.1:1883")?)
    ///     .record_calls(RecordOptions::default());
    /// let requester = Requester::connect(options).await?;
    /// let call = Invocation::parse("VIN123", "update_firmware", "v2")?.timeout(Duration::from_secs(30));
    /// let id = requester.submit(call).await?;
    /// // Later, or from another request handler:
    /// if let Some(record) = requester.wait_call_record(&id, Duration::from_secs(30)).await {
    ///     if record.state == CallState::Answered {
    ///         println!("{:?} {:?}", record.status, record.response);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// What [`Requester::invoke`] would refuse before publishing (invalid
    /// names, no broker, a conflicting idempotency key...), and
    /// [`Error::Config`] naming `Options::record_calls` when calls are not
    /// recorded.
    pub async fn submit(&self, invocation: Invocation) -> Result<MessageId, Error> {
        if self.shared().records.is_none() {
            return Err(Error::Config {
                option: "Options::record_calls",
                reason: "an asynchronous call needs call records, to hold its outcome".into(),
            });
        }
        if let Some(key) = invocation.idempotency_key.as_deref() {
            let id = keyed::id(&invocation, key)?;
            return keyed::submit(Arc::clone(&self.handle), invocation, id).await;
        }
        // Published on its first poll, here; then it goes on in a task of
        // its own.
        let mut invoke = self.invoke(invocation);
        match keyed::poll_once(&mut invoke).await {
            // Refused (or, impossibly soon, answered) at once.
            Some(result) => result.map(|r| r.id),
            None => match invoke.id() {
                Some(id) => {
                    tokio::spawn(invoke);
                    Ok(id)
                }
                None => invoke.await.map(|r| r.id),
            },
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

    /// How far the presence table is: whether a gateway may call itself
    /// ready (`/readyz` waits for
    /// [`PresenceState::Loading`](crate::PresenceState::Loading) to end).
    pub fn presence_state(&self) -> crate::PresenceState {
        self.shared().presence_state()
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

    /// The presence table, when presence is tracked (the console pages it).
    #[cfg(feature = "console")]
    pub(crate) fn presence(&self) -> Option<&Presence> {
        self.shared().presence.as_ref()
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

    /// Waits, at most `within`, for the calls in flight (those answered
    /// 202 among them) to end; returns how many are still open. Calls made
    /// meanwhile are taken as usual: stop taking new ones first (the
    /// gateway's `Server` stops accepting before). Then [`shutdown`](Self::shutdown) records the rest as
    /// `unavailable`.
    ///
    /// ```no_run
    /// # async fn run(requester: directcall_cloud::Requester) {
    /// use std::time::Duration;
    /// let open = requester.drain(Duration::from_secs(10)).await;
    /// if open > 0 {
    ///     eprintln!("{open} calls did not end in time; their records say so");
    /// }
    /// requester.shutdown().await;
    /// # }
    /// ```
    pub async fn drain(&self, within: Duration) -> usize {
        let shared = self.shared();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let open = shared.pending.len();
            let now = tokio::time::Instant::now();
            if open == 0 || now >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(20).min(deadline - now)).await;
        }
    }

    /// A snapshot of the counters.
    ///
    /// A burst of calls can be made faster than the connection writes
    /// them; what waits in the MQTT client's queue is the requests
    /// published and not yet written:
    ///
    /// ```no_run
    /// # async fn run(requester: directcall_cloud::Requester) {
    /// let s = requester.stats();
    /// let queued = s.published.saturating_sub(s.written);
    /// println!("{} calls pending, {queued} requests not yet written", s.pending);
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        self.shared().stats()
    }

    /// Stops intake, ends every call in flight with [`Error::Closed`] (those
    /// waiting for a slot too), disconnects cleanly and waits for the
    /// connection task to finish. Every clone is closed.
    ///
    /// A call still open then (an asynchronous one, answered 202) ends on
    /// its record as `unavailable`, with [`CallRecord::reason`] saying the
    /// gateway shut down, and the shared store gets that change (within
    /// 2 s) before the connection closes: never lost in silence. Give
    /// open calls time to end first with [`drain`](Self::drain).
    ///
    /// With a shared store, the requester then notes in it that it left:
    /// the other requesters sharing the store subscribe to its replies and
    /// put a late answer to one of its calls (timed out, or left open by
    /// this shutdown) on the call's record, as long as records are kept.
    pub async fn shutdown(&self) {
        let shared = self.shared();
        shared.permits.close();
        shared.pending.close();
        shared.groups.close_all();
        if let Some(records) = &shared.records {
            let abandoned = records.abandon_open(crate::records::SHUT_DOWN_REASON);
            if abandoned > 0 {
                tracing::warn!(
                    calls = abandoned,
                    "shutting down with calls still open: their records say unavailable ({})",
                    crate::records::SHUT_DOWN_REASON
                );
            }
            if !records.flush(Duration::from_secs(2)).await {
                tracing::warn!("shutting down: the shared store did not take the last record changes within 2 s");
            }
        }
        if let (Some(store), true) = (&shared.store, shared.own_prefix) {
            // The others take the late answers to this one's calls while
            // their records are kept.
            let until = crate::records::now_ms()
                .saturating_add(u64::try_from(shared.retention.as_millis()).unwrap_or(u64::MAX));
            if let Err(e) = store.left(shared.prefix.as_str(), until).await {
                tracing::warn!("shutting down: late answers to this gateway's calls will be lost: shared store: {e}");
            }
        }
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
