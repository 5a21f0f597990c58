//! Starting and driving a group call on a requester's connection: the
//! targets resolved (presence, admission, a keyed retry's answers), the
//! requests published within the window, the deadline. The types and the
//! table that replies find live in [`crate::group`], below the session.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use directcall_core::deadline::{unix_millis, whole_millis};
use directcall_core::mqtt::Properties;
use directcall_core::{CallTopics, Field, GroupTopics, MessageId, RequestPayload, Target};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::time::Instant;

use crate::error::Error;
use crate::group::{
    DeviceOutcome, DeviceResult, GroupCall, GroupInvocation, GroupState, GroupSummary, Inner,
    Keyed, Targets,
};
use crate::presence::Known;
use crate::session::Shared;

/// Idempotency keys of group calls a requester remembers at most (with
/// their answers, for the records' retention); past it the oldest goes.
pub(crate) const MAX_GROUP_KEYS: usize = 1_000;

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
        if keys.len() >= MAX_GROUP_KEYS && !keys.contains_key(&scoped) {
            // The oldest key goes: memory stays bounded however many
            // keyed group calls come.
            if let Some(oldest) = keys
                .iter()
                .min_by_key(|(_, k)| k.at)
                .map(|(name, _)| name.clone())
            {
                keys.remove(&oldest);
            }
        }
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
    // What this call expects (a replay of a device it no longer names,
    // such as a group member presence does not list, is given but
    // counts for nothing).
    let resolved: std::collections::HashSet<Target> = to_call
        .iter()
        .cloned()
        .chain(at_once.iter().map(|r| r.target.clone()))
        .collect();
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
            answered: keyed_answers,
            ..Inner::default()
        }),
        tx,
        window: Semaphore::new(call.max_in_flight),
        all_in: Notify::new(),
        closing: Notify::new(),
        published_at: Mutex::new(None),
        results: DeviceOutcome::ALL
            .map(|o| metrics::counter!(crate::metrics::GROUP_RESULTS, "outcome" => o.as_str())),
    });
    shared.groups.insert(id, Arc::clone(&state))?;
    metrics::counter!(crate::metrics::GROUP_CALLS).increment(1);
    {
        let mut inner = state.lock();
        for r in answered_before {
            let expected = resolved.contains(&r.target);
            state.emit_as(&mut inner, r, expected);
        }
        for r in at_once {
            state.emit(&mut inner, r);
        }
    }
    tokio::spawn(run(shared, call, id, to_call, deadline, state));
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
                let topic = topics.request_topic();
                let publish = || {
                    shared.link.publish_with(
                        topic.clone(),
                        payload.clone(),
                        shared.group_qos(),
                        false,
                        properties.as_ref(),
                    )
                };
                let mut published = publish();
                // A full request queue: wait for room, within the deadline.
                while published.is_err() && Instant::now() < deadline && !shared.link.is_stopping()
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    published = publish();
                }
                if let Err(e) = published {
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
                    if state.lock().done.contains(target) {
                        // Its answer to an earlier call with this key came
                        // meanwhile: nothing to send.
                        state.window.add_permits(1);
                        continue;
                    }
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
    let closing = state.closing.notified();
    tokio::pin!(closing);
    closing.as_mut().enable();
    let mut shut = false;
    tokio::select! {
        () = publishing => {}
        () = closed.closed() => {}
        () = &mut closing => shut = true,
        () = tokio::time::sleep_until(deadline) => {}
    }
    // Every expected result in, the deadline, or the caller gone.
    let done_early = {
        let inner = state.lock();
        inner.left == Some(0)
    };
    if !done_early && !shut {
        tokio::select! {
            () = state.all_in.notified() => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = closed.closed() => {}
            () = &mut closing => shut = true,
        }
    }
    let (no_answer, not_sent) = if shut {
        (
            "no answer before the requester shut down",
            "not sent: the requester shut down",
        )
    } else {
        (
            "no answer before the deadline",
            "not sent before the deadline: too many requests were out",
        )
    };
    shared.groups.remove(&id);
    let mut inner = state.lock();
    let waiting: Vec<Target> = inner.waiting.drain().map(|(t, _)| t).collect();
    for t in waiting {
        state.emit(
            &mut inner,
            DeviceResult::without_answer(t, DeviceOutcome::Timeout, no_answer),
        );
    }
    for t in to_call.into_iter().skip(taken) {
        state.emit(
            &mut inner,
            DeviceResult::without_answer(t, DeviceOutcome::Timeout, not_sent),
        );
    }
    inner.open = false;
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
