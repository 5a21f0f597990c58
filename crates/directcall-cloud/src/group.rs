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

use directcall_core::deadline::{unix_millis, whole_millis};
use directcall_core::mqtt::Properties;
use directcall_core::{
    CallTopics, Field, Group, GroupTopics, MessageId, Method, ReplyPayload, RequestPayload, Target,
};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::Error;
use crate::presence::Known;
use crate::session::Shared;

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
        self.max_in_flight = n.max(1);
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

    fn fingerprint(&self) -> Uuid {
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

    const ALL: [DeviceOutcome; 5] = [
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
    fn without_answer(target: Target, outcome: DeviceOutcome, reason: impl Into<String>) -> Self {
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
    id: MessageId,
    rx: mpsc::UnboundedReceiver<DeviceResult>,
    summary: GroupSummary,
    started: Instant,
    ended: bool,
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
    method: Method,
    inner: Mutex<Inner>,
    tx: mpsc::UnboundedSender<DeviceResult>,
    /// Room for one more request published and not answered.
    window: Semaphore,
    /// Every expected device has its result.
    all_in: Notify,
    /// When the named group's single request went out.
    published_at: Mutex<Option<Instant>>,
    results: [metrics::Counter; 5],
}

#[derive(Debug, Default)]
struct Inner {
    /// Published and not answered: when each was published.
    waiting: HashMap<Target, Instant>,
    /// With a result already.
    done: std::collections::HashSet<Target>,
    /// Expected devices without a result yet; `None`: unknown (a group of
    /// unknown membership).
    left: Option<usize>,
    /// Whether it still takes results.
    open: bool,
    /// With an idempotency key: the answers so far, for a retry.
    answered: Option<Vec<DeviceResult>>,
}

impl GroupState {
    /// Gives `result` to the caller, once per target, while the call is
    /// open. Returns whether it was taken.
    fn emit(&self, inner: &mut Inner, result: DeviceResult) -> bool {
        if !inner.open || !inner.done.insert(result.target.clone()) {
            return false;
        }
        if let Some(left) = &mut inner.left {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.all_in.notify_one();
            }
        }
        if let (Some(answered), true) = (&mut inner.answered, result.answered()) {
            answered.push(result.clone());
        }
        let i = DeviceOutcome::ALL
            .iter()
            .position(|o| *o == result.outcome)
            .unwrap_or(0);
        self.results[i].increment(1);
        let _ = self.tx.send(result);
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
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
        if self.emit(&mut inner, result) && sent.is_some() {
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
    by_id: Mutex<HashMap<MessageId, Arc<GroupState>>>,
    /// How many run: a reply checks the table only when some do.
    running: std::sync::atomic::AtomicUsize,
    /// With idempotency keys: each key's fingerprint, call id and answers.
    keys: Mutex<HashMap<String, Keyed>>,
}

#[derive(Debug, Clone)]
struct Keyed {
    fingerprint: Uuid,
    at: Instant,
    answered: Arc<Mutex<Vec<DeviceResult>>>,
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

    fn insert(&self, id: MessageId, state: Arc<GroupState>) -> Result<(), Error> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        if by_id.contains_key(&id) {
            // A retry under the same key while the first still runs.
            return Err(Error::KeyConflict);
        }
        by_id.insert(id, state);
        self.running.fetch_add(1, Relaxed);
        Ok(())
    }

    fn remove(&self, id: &MessageId) {
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

/// Starts a group call: resolves the targets, publishes, and returns the
/// stream of results.
pub(crate) async fn start(shared: Arc<Shared>, call: GroupInvocation) -> Result<GroupCall, Error> {
    let started = Instant::now();
    if call.timeout.is_zero() {
        return Err(Error::Invalid {
            field: Field::Timeout,
            reason: "must be greater than zero".into(),
        });
    }
    shared.check_group(&call)?;
    let deadline = started + call.timeout;

    // The devices, and those reported at once.
    let mut at_once: Vec<DeviceResult> = Vec::new();
    let presence = shared.presence.as_ref();
    let (mut to_call, expected): (Vec<Target>, Option<usize>) = match &call.targets {
        Targets::List(list) => (list.clone(), Some(list.len())),
        Targets::Match {
            pattern,
            online_only,
        } => {
            let Some(p) = presence else {
                return Err(Error::Invalid {
                    field: Field::Target,
                    reason: "a pattern needs presence records (Options::presence) to match against"
                        .into(),
                });
            };
            let found = p.matching(&wildmatch::WildMatch::new(pattern));
            let found: Vec<Target> = found
                .into_iter()
                .filter(|(t, online)| {
                    (*online || !online_only) && call.within.as_ref().is_none_or(|w| w(t))
                })
                .map(|(t, _)| t)
                .collect();
            let n = found.len();
            (found, Some(n))
        }
        Targets::Group(group) => match presence.and_then(|p| p.members(group)) {
            Some(members) => {
                let n = members.len();
                (members.into_iter().map(|(t, _)| t).collect(), Some(n))
            }
            None => (Vec::new(), None),
        },
    };

    // Access, then presence, for every named device.
    if let Some(admit) = &call.admit {
        to_call.retain(|t| match admit(t) {
            Ok(()) => true,
            Err(why) => {
                at_once.push(DeviceResult::without_answer(
                    t.clone(),
                    DeviceOutcome::Refused,
                    why,
                ));
                false
            }
        });
    }
    if let Some(p) = presence {
        let strict = shared.strict_presence_complete();
        to_call.retain(|t| match p.known(t) {
            Known::Online => true,
            Known::Offline => {
                at_once.push(DeviceResult::without_answer(
                    t.clone(),
                    DeviceOutcome::Offline,
                    "presence says the device is offline",
                ));
                false
            }
            Known::Unknown if strict => {
                at_once.push(DeviceResult::without_answer(
                    t.clone(),
                    DeviceOutcome::Offline,
                    "presence has no record of the device",
                ));
                false
            }
            Known::Unknown => true,
        });
    }

    // A keyed retry: who answered already.
    let id;
    let mut answered_before: Vec<DeviceResult> = Vec::new();
    let mut keyed_answers = None;
    if let Some(key) = &call.idempotency_key {
        crate::keys::check_key(key)?;
        let scoped = match &call.caller {
            Some(c) => format!("group\0{c}\0{key}"),
            None => format!("group\0{key}"),
        };
        id = MessageId::from_key(&scoped);
        let fingerprint = call.fingerprint();
        let retention = shared.keys.retention();
        let mut keys = shared.groups.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.retain(|_, k| k.at.elapsed() < retention);
        let entry = keys.entry(scoped).or_insert_with(|| Keyed {
            fingerprint,
            at: Instant::now(),
            answered: Arc::default(),
        });
        if entry.fingerprint != fingerprint {
            return Err(Error::KeyConflict);
        }
        answered_before = entry
            .answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        keyed_answers = Some(Arc::clone(&entry.answered));
    } else {
        id = MessageId::new();
    }
    for r in &mut answered_before {
        r.replayed = true;
    }
    let replayed: std::collections::HashSet<Target> =
        answered_before.iter().map(|r| r.target.clone()).collect();
    to_call.retain(|t| !replayed.contains(t));
    at_once.retain(|r| !replayed.contains(&r.target));

    let (tx, rx) = mpsc::unbounded_channel();
    let state = Arc::new(GroupState {
        method: call.method.clone(),
        inner: Mutex::new(Inner {
            left: expected,
            open: true,
            answered: keyed_answers.is_some().then(Vec::new),
            ..Inner::default()
        }),
        tx,
        window: Semaphore::new(call.max_in_flight),
        all_in: Notify::new(),
        published_at: Mutex::new(None),
        results: DeviceOutcome::ALL
            .map(|o| metrics::counter!(crate::metrics::GROUP_RESULTS, "outcome" => o.as_str())),
    });
    shared.groups.insert(id, Arc::clone(&state))?;
    metrics::counter!(crate::metrics::GROUP_CALLS).increment(1);
    {
        let mut inner = state.lock();
        for r in answered_before.into_iter().chain(at_once) {
            state.emit(&mut inner, r);
        }
    }
    tokio::spawn(run(
        shared,
        call,
        id,
        to_call,
        deadline,
        state,
        keyed_answers,
    ));
    Ok(GroupCall {
        id,
        rx,
        summary: GroupSummary {
            expected,
            ..GroupSummary::default()
        },
        started,
        ended: false,
    })
}

/// Publishes the requests (within the window), waits for the answers or
/// the deadline, and reports the rest as timed out.
async fn run(
    shared: Arc<Shared>,
    call: GroupInvocation,
    id: MessageId,
    to_call: Vec<Target>,
    deadline: Instant,
    state: Arc<GroupState>,
    keyed_answers: Option<Arc<Mutex<Vec<DeviceResult>>>>,
) {
    let closed = state.tx.clone();
    // How many of `to_call` were taken for publishing: the rest, at the
    // end, were never sent.
    let mut taken = 0usize;
    let next = &mut taken;
    let (shared_ref, state_ref, call_ref, targets_ref) = (&shared, &state, &call, &to_call);
    let publishing = async move {
        let (shared, state, call, to_call) = (shared_ref, state_ref, call_ref, targets_ref);
        match &call.targets {
            Targets::Group(group) => {
                {
                    let mut inner = state.lock();
                    let now = Instant::now();
                    for t in to_call {
                        inner.waiting.insert(t.clone(), now);
                    }
                }
                *state.published_at.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Instant::now());
                let topics = match GroupTopics::new(
                    group.clone(),
                    call.method.clone(),
                    shared.prefix.clone(),
                    id,
                ) {
                    Ok(t) => t,
                    Err(e) => {
                        refuse_all(state, to_call, &e.to_string());
                        return;
                    }
                };
                let (payload, properties) = request(shared, call, id, deadline, None);
                if let Err(e) = shared.link.publish_with(
                    topics.request_topic(),
                    payload,
                    shared.group_qos(),
                    false,
                    properties.as_ref(),
                ) {
                    refuse_all(state, to_call, &format!("not published: {e}"));
                }
            }
            _ => {
                for target in to_call {
                    match tokio::time::timeout_at(deadline, state.window.acquire()).await {
                        Ok(Ok(permit)) => permit.forget(),
                        _ => return,
                    }
                    *next += 1;
                    let topics = match CallTopics::new(
                        target.clone(),
                        call.method.clone(),
                        shared.prefix.clone(),
                        id,
                    ) {
                        Ok(t) => t,
                        Err(e) => {
                            let mut inner = state.lock();
                            state.emit(
                                &mut inner,
                                DeviceResult::without_answer(
                                    target.clone(),
                                    DeviceOutcome::Refused,
                                    e.to_string(),
                                ),
                            );
                            state.window.add_permits(1);
                            continue;
                        }
                    };
                    let (payload, properties) = request(shared, call, id, deadline, Some(&topics));
                    state.lock().waiting.insert(target.clone(), Instant::now());
                    let mut published = shared.link.publish_with(
                        topics.request_topic(),
                        payload.clone(),
                        shared.request_qos_for(target),
                        false,
                        properties.as_ref(),
                    );
                    // A full request queue: wait for room, within the deadline.
                    while published.is_err() {
                        if Instant::now() >= deadline || shared.link.is_stopping() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        published = shared.link.publish_with(
                            topics.request_topic(),
                            payload.clone(),
                            shared.request_qos_for(target),
                            false,
                            properties.as_ref(),
                        );
                    }
                    if let Err(e) = published {
                        let mut inner = state.lock();
                        if inner.waiting.remove(target).is_some() {
                            state.window.add_permits(1);
                        }
                        state.emit(
                            &mut inner,
                            DeviceResult::without_answer(
                                target.clone(),
                                DeviceOutcome::Refused,
                                format!("not published: {e}"),
                            ),
                        );
                    }
                }
            }
        }
    };
    tokio::select! {
        () = publishing => {}
        () = closed.closed() => {}
        () = tokio::time::sleep_until(deadline) => {}
    }
    // Every expected result in, the deadline, or the caller gone.
    let done_early = {
        let inner = state.lock();
        inner.left == Some(0)
    };
    if !done_early {
        tokio::select! {
            () = state.all_in.notified() => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = closed.closed() => {}
        }
    }
    shared.groups.remove(&id);
    let mut inner = state.lock();
    let waiting: Vec<Target> = inner.waiting.drain().map(|(t, _)| t).collect();
    for t in waiting {
        state.emit(
            &mut inner,
            DeviceResult::without_answer(
                t,
                DeviceOutcome::Timeout,
                "no answer before the deadline",
            ),
        );
    }
    for t in to_call.into_iter().skip(taken) {
        state.emit(
            &mut inner,
            DeviceResult::without_answer(
                t,
                DeviceOutcome::Timeout,
                "not sent before the deadline: too many requests were out",
            ),
        );
    }
    inner.open = false;
    if let (Some(keyed), Some(answered)) = (keyed_answers, inner.answered.take()) {
        keyed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(answered);
    }
    // Dropping the state's sender (the last one) ends the caller's stream.
}

fn refuse_all(state: &GroupState, targets: &[Target], why: &str) {
    let mut inner = state.lock();
    for t in targets {
        inner.waiting.remove(t);
        state.emit(
            &mut inner,
            DeviceResult::without_answer(t.clone(), DeviceOutcome::Refused, why),
        );
    }
    if inner.left.is_none() {
        inner.left = Some(0);
        state.all_in.notify_one();
    }
}

/// A request's payload and (MQTT 5) properties: for one device (`topics`)
/// with its response topic, or for a group without one (each member
/// answers on its own).
fn request(
    shared: &Shared,
    call: &GroupInvocation,
    id: MessageId,
    deadline: Instant,
    topics: Option<&CallTopics>,
) -> (Vec<u8>, Option<Properties>) {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let mut payload = RequestPayload::new(id.to_string(), call.request.clone());
    payload.timestamp = Some(unix_millis(std::time::SystemTime::now()));
    payload.timeout_ms = Some(whole_millis(remaining));
    payload.traceparent.clone_from(&call.traceparent);
    let properties = shared.is_v5().then(|| {
        let mut p = Properties::default();
        p.message_expiry_secs = Some(
            u32::try_from(remaining.as_millis().div_ceil(1000))
                .unwrap_or(u32::MAX)
                .max(1),
        );
        if let Some(topics) = topics {
            p.response_topic = Some(topics.reply_topic());
            p.correlation_data = Some(payload.id.clone().into_bytes());
        }
        if let Some(t) = &payload.traceparent {
            p.user_properties
                .push(("traceparent".to_owned(), t.clone()));
        }
        p
    });
    (payload.to_vec(), properties)
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
