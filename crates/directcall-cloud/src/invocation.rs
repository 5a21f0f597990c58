//! One call to make, as a builder.

use std::time::Duration;

use directcall_core::{MessageId, Method, Target};
use serde_json::Value;
use tokio::time::Instant;

use crate::error::Error;
use crate::options::DEFAULT_TIMEOUT;

/// One call to make: which method on which device, with what, for how long.
///
/// Setters consume and return the value, each stating its default; getters
/// of the same values carry `get_` (as `std::process::Command` does).
#[derive(Debug, Clone)]
pub struct Invocation {
    pub(crate) target: Target,
    pub(crate) method: Method,
    pub(crate) request: Value,
    pub(crate) timeout: Duration,
    pub(crate) start: Option<Instant>,
    pub(crate) traceparent: Option<String>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) caller: Option<String>,
    /// Ask for a delivery receipt; `None`: as the requester does.
    pub(crate) receipt: Option<bool>,
    /// The id to publish under, when it is not a fresh one (a keyed call).
    pub(crate) id: Option<MessageId>,
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
            receipt: None,
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
    /// timeout is refused by [`Requester::invoke`](crate::Requester::invoke).
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
    /// is refused by [`Requester::invoke`](crate::Requester::invoke)
    /// (`Error::Invalid` naming `traceparent`). Default: none.
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
    /// retry that reached it some other way. Default: none.
    ///
    /// [`Reply::replayed`](crate::Reply::replayed) says whether a reply is
    /// the stored one of another call with the key (this call published
    /// nothing). A stored timeout whose late answer has since arrived
    /// ([`Options::record_calls`](crate::Options::record_calls)) is
    /// replayed as that answer.
    ///
    /// ```no_run
    /// # async fn f(requester: directcall_cloud::Requester) -> Result<(), directcall_cloud::Error> {
    /// use directcall_cloud::Invocation;
    /// let call = || Invocation::parse("VIN123", "unlock", "now").map(|c| c.idempotency_key("order-4711"));
    /// let first = requester.invoke(call()?).await?; // runs
    /// let again = requester.invoke(call()?).await?; // the stored outcome
    /// assert!(!first.replayed && again.replayed);
    /// # Ok(()) }
    /// ```
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

    /// Whether this call asks the device for a delivery receipt (PROTOCOL.md,
    /// "Delivery receipts"): its record then moves to `delivered` once the
    /// device has the request, so a timeout tells "delivered, no answer"
    /// from "no sign of delivery". Default: as the requester does
    /// ([`Options::delivery_receipts`](crate::Options::delivery_receipts)).
    pub fn receipt(mut self, ask: bool) -> Self {
        self.receipt = Some(ask);
        self
    }

    /// Whether this call asks for a delivery receipt, if it says
    /// (`None`: as the requester does).
    pub fn get_receipt(&self) -> Option<bool> {
        self.receipt
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
