//! Group calls: one method on many devices within one deadline, each
//! device's result yielded as it arrives, and a summary at the end.
//!
//! Three ways to name the devices ([`GroupInvocation`]): a list, a glob
//! over the targets presence knows, or a named group, which is one publish
//! on the group's topic (PROTOCOL.md, "Groups"). A list or a glob is one
//! request per device, on the device's own topic, so devices that know
//! nothing of groups (the AWS sample's) take part.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use directcall_core::deadline::whole_millis;
use directcall_core::{CallTopics, Field, Group, MessageId, Method, ReplyPayload, Target};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::Error;

/// Requests of one group call published and not yet answered, at most, by
/// default ([`GroupInvocation::max_in_flight`]): a call to 100,000 devices
/// sends the next request as an answer comes, instead of flooding the
/// broker with all of them at once.
pub const DEFAULT_GROUP_IN_FLIGHT: usize = 1_000;

/// The longest glob of [`GroupInvocation::matching`], in characters: every
/// known name is matched against it.
pub const MAX_GLOB_CHARS: usize = 64;

/// Which devices a group call reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Targets {
    /// These devices, in this order (duplicates dropped).
    List(Vec<Target>),
    /// The targets presence knows whose names match a glob (`*` any run of
    /// characters, `?` one; case-sensitive), optionally only those online.
    Match {
        /// The glob.
        pattern: String,
        /// Only the targets presence says are online.
        online_only: bool,
    },
    /// The members of a named group: one publish on the group's topic.
    Group(Group),
}

/// Admits or refuses one target of a group call: `Err` carries why, and
/// the target is reported [`DeviceOutcome::Refused`] with it, never
/// published to.
pub(crate) type Admit = Arc<dyn Fn(&Target) -> Result<(), String> + Send + Sync>;

/// Which targets a glob may reach at all ([`GroupInvocation::within`]).
pub(crate) type Within = Arc<dyn Fn(&Target) -> bool + Send + Sync>;

/// A call of one method on many devices ([`Requester::invoke_group`](crate::Requester::invoke_group)).
///
/// ```
/// use std::time::Duration;
/// use directcall_cloud::GroupInvocation;
///
/// # fn main() -> Result<(), directcall_cloud::Error> {
/// let cars = GroupInvocation::targets(["Car1", "Car2", "Car3"], "unlock", "now")?
///     .timeout(Duration::from_secs(3));
/// let kiosks = GroupInvocation::matching("Kiosk-*", "reboot", serde_json::Value::Null)?
///     .online_only(true);
/// let station = GroupInvocation::group("station-7", "firmware", "")?;
/// # let _ = (cars, kiosks, station);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct GroupInvocation {
    pub(crate) targets: Targets,
    pub(crate) method: Method,
    pub(crate) request: Value,
    pub(crate) timeout: Duration,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) caller: Option<String>,
    pub(crate) traceparent: Option<String>,
    pub(crate) max_in_flight: usize,
    pub(crate) admit: Option<Admit>,
    pub(crate) within: Option<Within>,
}

impl std::fmt::Debug for GroupInvocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupInvocation")
            .field("targets", &self.targets)
            .field("method", &self.method)
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl GroupInvocation {
    fn new(targets: Targets, method: &str, request: Value) -> Result<Self, Error> {
        Ok(GroupInvocation {
            targets,
            method: Method::new(method)?,
            request,
            timeout: crate::options::DEFAULT_TIMEOUT,
            idempotency_key: None,
            caller: None,
            traceparent: None,
            max_in_flight: DEFAULT_GROUP_IN_FLIGHT,
            admit: None,
            within: None,
        })
    }

    /// A call to each of `targets` (duplicates are called once).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `target` for an empty list or a name that
    /// breaks the topic level rule (the message says which), `method` for
    /// a bad method.
    pub fn targets<I>(targets: I, method: &str, request: impl Into<Value>) -> Result<Self, Error>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut seen = std::collections::HashSet::new();
        let mut list = Vec::new();
        for (i, name) in targets.into_iter().enumerate() {
            let name = name.as_ref();
            let target = Target::new(name).map_err(|e| Error::Invalid {
                field: Field::Target,
                reason: format!("targets[{i}] ({name:?}): {}", e.reason()),
            })?;
            if seen.insert(target.clone()) {
                list.push(target);
            }
        }
        if list.is_empty() {
            return Err(Error::Invalid {
                field: Field::Target,
                reason: "a group call needs at least one target".into(),
            });
        }
        Self::new(Targets::List(list), method, request.into())
    }

    /// A call to every target presence knows whose name matches `pattern`
    /// (`*` any run of characters, `?` one): offline ones are reported
    /// [`DeviceOutcome::Offline`] at once, or left out with
    /// [`online_only`](Self::online_only). Needs presence
    /// ([`Options::presence`](crate::Options::presence)).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `target` for an empty pattern, one longer
    /// than [`MAX_GLOB_CHARS`], or with a character no target can have.
    pub fn matching(pattern: &str, method: &str, request: impl Into<Value>) -> Result<Self, Error> {
        check_glob(pattern)?;
        Self::new(
            Targets::Match {
                pattern: pattern.to_owned(),
                online_only: false,
            },
            method,
            request.into(),
        )
    }

    /// A call to the members of group `name`: one publish on the group's
    /// topic that every member receives (devices join with
    /// `DeviceOptions::group`). When presence records name groups, the
    /// members are known: offline ones are reported at once and the call
    /// ends when every online member answered; otherwise it counts the
    /// answers that come until the deadline.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `group` or `method` for a name that breaks
    /// the topic level rule.
    pub fn group(name: &str, method: &str, request: impl Into<Value>) -> Result<Self, Error> {
        Self::new(Targets::Group(Group::new(name)?), method, request.into())
    }

    /// How long the whole call may take, every device included (default
    /// 10 s, as a single call's).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// With [`matching`](Self::matching): only the targets presence says
    /// are online (default: all it knows, offline ones reported offline).
    pub fn online_only(mut self, online_only: bool) -> Self {
        if let Targets::Match { online_only: o, .. } = &mut self.targets {
            *o = online_only;
        }
        self
    }

    /// At most `n` requests published and not yet answered at once
    /// (default [`DEFAULT_GROUP_IN_FLIGHT`]; at least 1). A named group is
    /// one publish and ignores it.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self
    }

    /// An idempotency key: a retry with the same key and the same call
    /// (targets, method, request) within the records' retention runs no
    /// device that already answered (their answers are replayed) and calls
    /// the rest again, under the same call id (so a device that got the
    /// first request drops the second).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Who makes the call: scopes the idempotency key, and is kept on the
    /// group's record.
    pub fn caller(mut self, caller: impl Into<String>) -> Self {
        self.caller = Some(caller.into());
        self
    }

    /// The caller's W3C trace context, passed to every device.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Decides for each target whether this caller may call it: a target
    /// refused is reported [`DeviceOutcome::Refused`] with the reason, not
    /// dropped. The gateway admits by the caller's scope.
    pub fn admit(
        mut self,
        admit: impl Fn(&Target) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.admit = Some(Arc::new(admit));
        self
    }

    /// With [`matching`](Self::matching): the glob reaches only the targets
    /// for which `within` is true; the others are neither called, nor
    /// reported, nor counted, as if presence did not know them (the gateway
    /// keeps a scoped caller's glob to the targets its scope names, as its
    /// device list does). Default: every target presence knows.
    pub fn within(mut self, within: impl Fn(&Target) -> bool + Send + Sync + 'static) -> Self {
        self.within = Some(Arc::new(within));
        self
    }

    /// Which devices.
    pub fn get_targets(&self) -> &Targets {
        &self.targets
    }

    /// The method.
    pub fn get_method(&self) -> &Method {
        &self.method
    }

    /// The request.
    pub fn get_request(&self) -> &Value {
        &self.request
    }

    /// The timeout.
    pub fn get_timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn fingerprint(&self) -> Uuid {
        let what = match &self.targets {
            Targets::List(list) => {
                let names: Vec<&str> = list.iter().map(Target::as_str).collect();
                format!("list\0{}", names.join("\0"))
            }
            Targets::Match {
                pattern,
                online_only,
            } => format!("match\0{pattern}\0{online_only}"),
            Targets::Group(g) => format!("group\0{g}"),
        };
        crate::keys::fingerprint(&what, self.method.as_str(), &self.request)
    }
}

/// Checks a glob: 1 to [`MAX_GLOB_CHARS`] characters of a topic level's
/// set plus `*` and `?`.
///
/// # Errors
/// [`Error::Invalid`] naming `target`.
pub(crate) fn check_glob(pattern: &str) -> Result<(), Error> {
    let reason = if pattern.is_empty() {
        "a pattern must not be empty".to_owned()
    } else if pattern.chars().count() > MAX_GLOB_CHARS {
        format!("a pattern is at most {MAX_GLOB_CHARS} characters")
    } else if let Some(c) = pattern
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '*' | '?')))
    {
        format!("a pattern has {c:?}; only A-Z a-z 0-9 _ - . : and the wildcards * ? are allowed")
    } else {
        return Ok(());
    };
    Err(Error::Invalid {
        field: Field::Target,
        reason,
    })
}

/// What became of one device in a group call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeviceOutcome {
    /// It answered with a 2xx status.
    Ok,
    /// It answered with another status, or a reply that broke the rules.
    DeviceError,
    /// No answer before the group's deadline (or not sent before it).
    Timeout,
    /// Presence says it is offline, or (MQTT 5) no device was subscribed.
    Offline,
    /// Not called: the caller may not call it, or the broker refused the
    /// request.
    Refused,
}

impl DeviceOutcome {
    /// As the wire and the metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceOutcome::Ok => "ok",
            DeviceOutcome::DeviceError => "device_error",
            DeviceOutcome::Timeout => "timeout",
            DeviceOutcome::Offline => "offline",
            DeviceOutcome::Refused => "refused",
        }
    }

    pub(crate) const ALL: [DeviceOutcome; 5] = [
        DeviceOutcome::Ok,
        DeviceOutcome::DeviceError,
        DeviceOutcome::Timeout,
        DeviceOutcome::Offline,
        DeviceOutcome::Refused,
    ];
}

/// One device's result in a group call.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DeviceResult {
    /// The device.
    #[serde(serialize_with = "as_text")]
    pub target: Target,
    /// What became of it.
    pub outcome: DeviceOutcome,
    /// The device's status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The device's response, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// From the request's publish to the answer, when it answered.
    #[serde(
        rename = "latency_ms",
        serialize_with = "as_millis",
        skip_serializing_if = "Option::is_none"
    )]
    pub latency: Option<Duration>,
    /// Why, for an outcome that is not an answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Replayed from an earlier call with the same idempotency key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

fn as_text<S: serde::Serializer>(t: &Target, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(t)
}

#[allow(clippy::ref_option)]
fn as_millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3),
        None => s.serialize_none(),
    }
}

impl DeviceResult {
    pub(crate) fn without_answer(
        target: Target,
        outcome: DeviceOutcome,
        reason: impl Into<String>,
    ) -> Self {
        DeviceResult {
            target,
            outcome,
            status: None,
            response: None,
            latency: None,
            reason: Some(reason.into()),
            replayed: false,
        }
    }

    /// Whether the device answered (in any status).
    pub fn answered(&self) -> bool {
        self.status.is_some()
    }
}

/// The counts of a group call's results by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupSummary {
    /// Answered with a 2xx status.
    pub ok: usize,
    /// Answered with another status.
    pub device_error: usize,
    /// No answer in time.
    pub timeout: usize,
    /// Offline.
    pub offline: usize,
    /// Not called.
    pub refused: usize,
    /// Results in all.
    pub total: usize,
    /// How many devices the call expected, when it knew (a list, a glob,
    /// a group whose members presence records name); `None` for a group
    /// of unknown membership, whose `total` counts the answers that came.
    pub expected: Option<usize>,
    /// From the start of the call to its end (or to now, while it runs),
    /// in milliseconds.
    pub elapsed_ms: u64,
}

impl GroupSummary {
    fn count(&mut self, outcome: DeviceOutcome) {
        self.total += 1;
        *match outcome {
            DeviceOutcome::Ok => &mut self.ok,
            DeviceOutcome::DeviceError => &mut self.device_error,
            DeviceOutcome::Timeout => &mut self.timeout,
            DeviceOutcome::Offline => &mut self.offline,
            DeviceOutcome::Refused => &mut self.refused,
        } += 1;
    }
}

/// A group call's results, all of them ([`GroupCall::collect`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct GroupOutcome {
    /// The call's id: every device's request carries it.
    #[serde(serialize_with = "id_text")]
    pub id: MessageId,
    /// One per device, in the order they came.
    pub results: Vec<DeviceResult>,
    /// The counts.
    pub summary: GroupSummary,
}

fn id_text<S: serde::Serializer>(id: &MessageId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// A group call under way ([`Requester::invoke_group`](crate::Requester::invoke_group)):
/// each device's result as it comes, then `None` once every device has
/// one or the deadline passed. Dropping it ends the call (no more
/// requests are published).
#[derive(Debug)]
pub struct GroupCall {
    pub(crate) id: MessageId,
    pub(crate) rx: mpsc::UnboundedReceiver<DeviceResult>,
    pub(crate) summary: GroupSummary,
    pub(crate) started: Instant,
    pub(crate) ended: bool,
}

impl GroupCall {
    /// The call's id, in every request it published.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The next device's result, as it comes; `None` at the end.
    pub async fn next(&mut self) -> Option<DeviceResult> {
        if self.ended {
            return None;
        }
        match self.rx.recv().await {
            Some(result) => {
                self.summary.count(result.outcome);
                self.summary.elapsed_ms = whole_millis(self.started.elapsed());
                Some(result)
            }
            None => {
                self.ended = true;
                self.summary.elapsed_ms = whole_millis(self.started.elapsed());
                None
            }
        }
    }

    /// The counts so far; final once [`next`](Self::next) returned `None`.
    pub fn summary(&self) -> &GroupSummary {
        &self.summary
    }

    /// Waits for every result.
    pub async fn collect(mut self) -> GroupOutcome {
        let mut results = Vec::with_capacity(self.summary.expected.unwrap_or(0));
        while let Some(r) = self.next().await {
            results.push(r);
        }
        GroupOutcome {
            id: self.id,
            results,
            summary: self.summary,
        }
    }
}

/// One running group call, as replies find it.
#[derive(Debug)]
pub(crate) struct GroupState {
    pub(crate) method: Method,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) tx: mpsc::UnboundedSender<DeviceResult>,
    /// Room for one more request published and not answered.
    pub(crate) window: Semaphore,
    /// Every expected device has its result.
    pub(crate) all_in: Notify,
    /// The requester is shutting down: the call ends now.
    pub(crate) closing: Notify,
    /// When the named group's single request went out.
    pub(crate) published_at: Mutex<Option<Instant>>,
    pub(crate) results: [metrics::Counter; 5],
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    /// Published and not answered: when each was published.
    pub(crate) waiting: HashMap<Target, Instant>,
    /// With a result already.
    pub(crate) done: std::collections::HashSet<Target>,
    /// Expected devices without a result yet; `None`: unknown (a group of
    /// unknown membership).
    pub(crate) left: Option<usize>,
    /// Whether it still takes results.
    pub(crate) open: bool,
    /// With an idempotency key: the answers so far, for a retry.
    pub(crate) answered: Option<Arc<Mutex<Vec<DeviceResult>>>>,
}

impl GroupState {
    /// Gives `result` to the caller, once per target, while the call is
    /// open. Returns whether it was taken.
    pub(crate) fn emit(&self, inner: &mut Inner, result: DeviceResult) -> bool {
        self.emit_as(inner, result, true)
    }

    /// [`emit`](Self::emit); `expected` says whether the device is one of
    /// those the call waits for (an answer from a device the call did not
    /// know of, such as a group member presence does not list, is given
    /// to the caller but never ends the call early).
    pub(crate) fn emit_as(&self, inner: &mut Inner, result: DeviceResult, expected: bool) -> bool {
        if !inner.open || !inner.done.insert(result.target.clone()) {
            return false;
        }
        if let (Some(left), true) = (&mut inner.left, expected) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.all_in.notify_one();
            }
        }
        if let (Some(answered), true, false) = (&inner.answered, result.answered(), result.replayed)
        {
            // Kept for a retry under the same key at once, not at the end:
            // a retry that comes while this call ends still sees it.
            answered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(result.clone());
        }
        let i = DeviceOutcome::ALL
            .iter()
            .position(|o| *o == result.outcome)
            .unwrap_or(0);
        self.results[i].increment(1);
        let _ = self.tx.send(result);
        true
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reply from `call.target()`: its answer, or a reply that broke the
    /// rules.
    pub(crate) fn reply(&self, call: &CallTopics, answer: Result<ReplyPayload, Error>) {
        if *call.method() != self.method {
            return;
        }
        let mut inner = self.lock();
        let target = call.target().clone();
        let sent = inner.waiting.remove(&target);
        let latency = sent
            .or(*self.published_at.lock().unwrap_or_else(|e| e.into_inner()))
            .map(|at| at.elapsed());
        let result = match answer {
            Ok(reply) => DeviceResult {
                outcome: if (200..300).contains(&reply.status) {
                    DeviceOutcome::Ok
                } else {
                    DeviceOutcome::DeviceError
                },
                target,
                status: Some(reply.status),
                response: Some(reply.response),
                latency,
                reason: None,
                replayed: false,
            },
            Err(e) => DeviceResult {
                latency,
                ..DeviceResult::without_answer(target, DeviceOutcome::DeviceError, e.to_string())
            },
        };
        if self.emit_as(&mut inner, result, sent.is_some()) && sent.is_some() {
            self.window.add_permits(1);
        }
    }

    /// The broker refused the request to `target` (MQTT 5 PUBACK).
    pub(crate) fn refused(&self, target: Option<&Target>, reason: u8) {
        let mut inner = self.lock();
        let (outcome, why) = if reason == 0x10 {
            (
                DeviceOutcome::Offline,
                "no device is subscribed (MQTT 5 reason code 0x10)".to_owned(),
            )
        } else {
            (
                DeviceOutcome::Refused,
                format!("the broker refused the request (MQTT 5 reason code {reason:#04x})"),
            )
        };
        let targets: Vec<Target> = match target {
            Some(t) => vec![t.clone()],
            // The named group's one request: every member still waiting.
            None => inner.waiting.keys().cloned().collect(),
        };
        for t in targets {
            if inner.waiting.remove(&t).is_some() {
                self.window.add_permits(1);
            }
            self.emit(
                &mut inner,
                DeviceResult::without_answer(t, outcome, why.clone()),
            );
        }
        if target.is_none() && inner.left.is_none() {
            // Nobody will answer a group nobody subscribes to.
            inner.left = Some(0);
            self.all_in.notify_one();
        }
    }
}

/// The running group calls of one requester, by id.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    pub(crate) by_id: Mutex<HashMap<MessageId, Arc<GroupState>>>,
    /// How many run: a reply checks the table only when some do.
    pub(crate) running: std::sync::atomic::AtomicUsize,
    /// With idempotency keys: each key's fingerprint, call id and answers.
    pub(crate) keys: Mutex<HashMap<String, Keyed>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Keyed {
    pub(crate) fingerprint: Uuid,
    pub(crate) at: Instant,
    pub(crate) answered: Arc<Mutex<Vec<DeviceResult>>>,
}

impl Groups {
    /// The running call `id`, if any.
    pub(crate) fn get(&self, id: &MessageId) -> Option<Arc<GroupState>> {
        if self.running.load(Relaxed) == 0 {
            return None;
        }
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    pub(crate) fn insert(&self, id: MessageId, state: Arc<GroupState>) -> Result<(), Error> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        if by_id.contains_key(&id) {
            // A retry under the same key while the first still runs.
            return Err(Error::KeyConflict);
        }
        by_id.insert(id, state);
        self.running.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Ends every running call now (the requester shuts down): devices
    /// without a result get one saying so.
    pub(crate) fn close_all(&self) {
        let running: Vec<Arc<GroupState>> = self
            .by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for state in running {
            state.closing.notify_one();
        }
    }

    pub(crate) fn remove(&self, id: &MessageId) {
        if self
            .by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
            .is_some()
        {
            self.running.fetch_sub(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_drops_duplicates_and_names_the_bad_entry() {
        let g = GroupInvocation::targets(["a", "b", "a"], "m", Value::Null).unwrap();
        assert_eq!(
            g.get_targets(),
            &Targets::List(vec![Target::new("a").unwrap(), Target::new("b").unwrap()])
        );
        let e = GroupInvocation::targets(["a", "b/c"], "m", Value::Null).unwrap_err();
        assert!(e.to_string().contains("targets[1]"), "{e}");
        let e = GroupInvocation::targets(Vec::<String>::new(), "m", Value::Null).unwrap_err();
        assert!(e.to_string().contains("at least one target"), "{e}");
    }

    #[test]
    fn a_pattern_is_checked() {
        assert!(GroupInvocation::matching("Kiosk-*", "m", Value::Null).is_ok());
        assert!(GroupInvocation::matching("K?osk-1*", "m", Value::Null).is_ok());
        for bad in ["", "a/b", "#", "+", &"*".repeat(65)] {
            let e = GroupInvocation::matching(bad, "m", Value::Null).unwrap_err();
            assert!(e.to_string().contains("target"), "{bad}: {e}");
        }
    }

    #[test]
    fn results_serialize_as_the_wire_spells_them() {
        let r = DeviceResult {
            latency: Some(Duration::from_micros(1500)),
            status: Some(200),
            response: Some(Value::from("done")),
            reason: None,
            ..DeviceResult::without_answer(Target::new("Car1").unwrap(), DeviceOutcome::Ok, "")
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"target":"Car1","outcome":"ok","status":200,"response":"done","latency_ms":1.5})
        );
        let t = DeviceResult::without_answer(
            Target::new("Car2").unwrap(),
            DeviceOutcome::Timeout,
            "late",
        );
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            serde_json::json!({"target":"Car2","outcome":"timeout","reason":"late"})
        );
    }
}
