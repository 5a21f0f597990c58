//! The task that drives one connection.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::transport::{closed_by_a_3_1_1_broker, Endpoints, Ev, Events};

use super::error::{NoMqtt5, PingTimeout, SubscriptionRefused};
use super::{ConnectionError, Control, Link, Message, QoS, Session, Subscription};
use crate::broker::Backoff;

/// Connections in a row that may die while an optional subscription waits
/// for its SUBACK before it is given up for the life of the process. A
/// broker that refuses a filter by closing the connection (AWS IoT Core, for
/// a filter its policy denies) does it every time; a broker restart in that
/// window is a one-off and must not cost the subscription for good.
pub(crate) const OPTIONAL_GIVE_UP_AFTER: u32 = 3;

/// The second level of the dotted probe subscription.
const DOT_PROBE: &str = "directcall.probe";

#[derive(Debug)]
struct Optional {
    subscription: Subscription,
    /// Connections lost in a row while waiting for its SUBACK.
    losses: u32,
}

/// Which SUBACK the driver waits for, and what it has learnt about the
/// optional subscriptions, which are asked for one at a time after the
/// essential one, so that a broker closing the connection over one of them
/// costs that one only. Pure bookkeeping, unit-tested below.
#[derive(Debug)]
pub(crate) struct SubscriptionPlan {
    essential: Vec<Subscription>,
    optional: Vec<Optional>,
    /// The dot probe's filter while it is asked for: readiness waits for its
    /// answer, so that no name is published before the broker's rules are
    /// known.
    probe: Option<String>,
    phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Essential,
    Optional(usize),
    /// Optional filter `i` was removed while its SUBACK was awaited: the
    /// next SUBACK answers it, then the one now at `i` is asked for.
    Removed(usize),
}

/// What the driver must do after an event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Nothing,
    /// Send this SUBSCRIBE.
    Subscribe(Vec<Subscription>),
    /// The essential filter is granted: ready; then subscribe to this one.
    Ready(Option<Subscription>),
    EssentialRefused(String),
    /// An optional filter was answered (the link is ready now, if it waited
    /// for this answer); then subscribe to the next one.
    Answered {
        filter: String,
        granted: bool,
        ready: bool,
        next: Option<Subscription>,
    },
}

impl SubscriptionPlan {
    pub(crate) fn new(mut all: Vec<Subscription>) -> Self {
        let optional = if all.len() > 1 {
            all.split_off(1)
        } else {
            Vec::new()
        };
        SubscriptionPlan {
            essential: all,
            optional: optional
                .into_iter()
                .map(|subscription| Optional {
                    subscription,
                    losses: 0,
                })
                .collect(),
            probe: None,
            phase: Phase::Idle,
        }
    }

    /// Asks for the dot probe `subscription` first among the optional ones,
    /// and holds readiness until it is answered.
    pub(crate) fn probe_first(&mut self, subscription: Subscription) {
        self.probe = Some(subscription.filter.clone());
        self.optional.insert(
            0,
            Optional {
                subscription,
                losses: 0,
            },
        );
    }

    fn is_probe(&self, i: usize) -> bool {
        match (&self.probe, self.optional.get(i)) {
            (Some(probe), Some(o)) => o.subscription.filter == *probe,
            _ => false,
        }
    }

    /// Adds an optional filter (none with the same filter yet). Returns it
    /// when it is to be asked for now: the connection is `ready` and no
    /// SUBACK is awaited; otherwise it is asked for in its turn.
    pub(crate) fn add(&mut self, subscription: Subscription, ready: bool) -> Option<Subscription> {
        if self
            .essential
            .iter()
            .any(|s| s.filter == subscription.filter)
            || self
                .optional
                .iter()
                .any(|o| o.subscription.filter == subscription.filter)
        {
            return None;
        }
        self.optional.push(Optional {
            subscription,
            losses: 0,
        });
        if ready && self.phase == Phase::Idle {
            return self.optional_from(self.optional.len() - 1);
        }
        None
    }

    /// Removes an optional filter (never the essential one or the dot
    /// probe). Returns whether it was there.
    pub(crate) fn remove(&mut self, filter: &str) -> bool {
        let Some(i) = self
            .optional
            .iter()
            .position(|o| o.subscription.filter == filter)
        else {
            return false;
        };
        if self.is_probe(i) {
            return false;
        }
        self.optional.remove(i);
        self.phase = match self.phase {
            Phase::Optional(cur) if cur == i => Phase::Removed(i),
            Phase::Optional(cur) if cur > i => Phase::Optional(cur - 1),
            Phase::Removed(cur) if cur > i => Phase::Removed(cur - 1),
            other => other,
        };
        true
    }

    /// Asks for the essential filter again (after the broker refused it).
    pub(crate) fn retry_essential(&mut self) -> Step {
        self.on_connack()
    }

    /// A connection was made: subscribe to the essential filter again
    /// (clean sessions keep no subscriptions).
    pub(crate) fn on_connack(&mut self) -> Step {
        self.phase = Phase::Essential;
        Step::Subscribe(self.essential.clone())
    }

    fn optional_from(&mut self, i: usize) -> Option<Subscription> {
        match self.optional.get(i) {
            Some(o) => {
                self.phase = Phase::Optional(i);
                Some(o.subscription.clone())
            }
            None => {
                self.phase = Phase::Idle;
                None
            }
        }
    }

    /// A SUBACK arrived; `granted(i)` tells whether filter `i` was granted.
    pub(crate) fn on_suback(&mut self, granted: impl Fn(usize) -> bool) -> Step {
        match self.phase {
            Phase::Essential if granted(0) && self.is_probe(0) => {
                let probe = self.optional_from(0);
                Step::Subscribe(probe.into_iter().collect())
            }
            Phase::Essential if granted(0) => Step::Ready(self.optional_from(0)),
            Phase::Essential => {
                self.phase = Phase::Idle;
                let filter = self
                    .essential
                    .first()
                    .map(|s| s.filter.clone())
                    .unwrap_or_default();
                Step::EssentialRefused(filter)
            }
            Phase::Optional(i) => {
                let Some(o) = self.optional.get_mut(i) else {
                    self.phase = Phase::Idle;
                    return Step::Nothing;
                };
                o.losses = 0;
                let filter = o.subscription.filter.clone();
                let ready = self.is_probe(i);
                Step::Answered {
                    filter,
                    granted: granted(0),
                    ready,
                    next: self.optional_from(i + 1),
                }
            }
            Phase::Removed(i) => match self.optional_from(i) {
                Some(next) => Step::Subscribe(vec![next]),
                None => Step::Nothing,
            },
            Phase::Idle => Step::Nothing,
        }
    }

    /// The connection was lost.
    pub(crate) fn on_error(&mut self) {
        if let Phase::Optional(i) = self.phase {
            if let Some(o) = self.optional.get_mut(i) {
                o.losses += 1;
                let filter = o.subscription.filter.clone();
                if o.losses >= OPTIONAL_GIVE_UP_AFTER {
                    tracing::error!(
                        filter,
                        "the broker closed the connection over this subscription {} times in a row; going on without it",
                        o.losses
                    );
                    if self.is_probe(i) {
                        self.probe = None;
                    }
                    self.optional.remove(i);
                } else {
                    tracing::warn!(
                        filter,
                        "the connection was lost while this subscription waited for its SUBACK; asking again on the next connection"
                    );
                }
            }
        }
        self.phase = Phase::Idle;
    }

    #[cfg(test)]
    fn optional_filters(&self) -> Vec<&str> {
        self.optional
            .iter()
            .map(|o| o.subscription.filter.as_str())
            .collect()
    }
}

fn subscribe(link: &Link, subscriptions: Vec<Subscription>) {
    link.client.subscribe(subscriptions);
}

/// Which QoS 1 publish each packet id in flight is, for links that track
/// acknowledgements (MQTT 5): the link notes every QoS 1 publish it queues,
/// in queue order; the event loop writes them in that order, each with the
/// packet id it reports; its PUBACK names that id.
#[derive(Debug, Default)]
struct Acks {
    in_flight: std::collections::HashMap<u16, String>,
    /// Unwritten publishes dropped from the noted queue since the last
    /// connection (the event loop keeps them until it connects again).
    dropped: usize,
}

impl Acks {
    /// A publish was written with `pkid`.
    fn written(&mut self, link: &Link, pkid: u16) {
        let Some(unwritten) = &link.state.unwritten else {
            return;
        };
        if pkid == 0 {
            return;
        }
        if let Some(Some(topic)) = super::lock(unwritten).pop_front() {
            self.in_flight.insert(pkid, topic);
        }
    }

    /// The PUBACK of `pkid`: the refused publish's topic, if it was tracked.
    fn acked(&mut self, pkid: u16, reason: u8) -> Option<String> {
        let topic = self.in_flight.remove(&pkid)?;
        (reason != 0).then_some(topic)
    }

    /// The connection was lost: what was in flight will never be
    /// acknowledged, and the publishes the event loop took from the queue
    /// but did not write are dropped at the next (clean) connection.
    fn lost(&mut self, link: &Link, events: &Events) {
        let Some(unwritten) = &link.state.unwritten else {
            return;
        };
        self.in_flight.clear();
        let taken = events.unwritten_qos1();
        let mut queue = super::lock(unwritten);
        for _ in self.dropped..taken {
            queue.pop_front();
        }
        self.dropped = self.dropped.max(taken);
    }

    /// A new connection: the event loop dropped its own queue.
    fn connected(&mut self) {
        self.dropped = 0;
    }
}

/// Whether the broker is still there: a PINGREQ must be answered within
/// the ping timeout, and, when `silence` is set (a requester), a publish
/// that has had no packet back for that long is followed by a PINGREQ of
/// its own. Pure bookkeeping, unit-tested below.
#[derive(Debug)]
pub(crate) struct Liveness {
    ping_timeout: Duration,
    silence: Option<Duration>,
    /// When the first publish went out since the broker was last heard.
    sent_since: Option<Instant>,
    /// When the PINGREQ out must have been answered.
    answer_by: Option<Instant>,
}

/// What the liveness timer says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Check {
    Fine,
    /// Ping the broker now.
    Ping,
    /// The broker did not answer in time: the connection is lost.
    Lost,
}

impl Liveness {
    pub(crate) fn new(ping_timeout: Duration, silence: Option<Duration>) -> Self {
        Liveness {
            ping_timeout,
            silence,
            sent_since: None,
            answer_by: None,
        }
    }

    /// A packet came from the broker.
    pub(crate) fn heard(&mut self) {
        self.sent_since = None;
        self.answer_by = None;
    }

    /// A publish went out. The clock is read only when the time matters:
    /// the first publish since the broker was last heard, on a side that
    /// pings after silence (this runs for every publish).
    pub(crate) fn sent(&mut self, now: impl FnOnce() -> Instant) {
        if self.silence.is_some() && self.sent_since.is_none() {
            self.sent_since = Some(now());
        }
    }

    /// A PINGREQ went out (or was queued).
    pub(crate) fn pinged(&mut self, now: Instant) {
        self.answer_by.get_or_insert(now + self.ping_timeout);
    }

    /// A connection ended or began: nothing is awaited.
    pub(crate) fn reset(&mut self) {
        self.sent_since = None;
        self.answer_by = None;
    }

    /// When to check next, if anything is awaited.
    pub(crate) fn next_check(&self) -> Option<Instant> {
        self.answer_by
            .or_else(|| Some(self.sent_since? + self.silence?))
    }

    pub(crate) fn check(&mut self, now: Instant) -> Check {
        match (self.answer_by, self.sent_since, self.silence) {
            (Some(by), _, _) if now >= by => Check::Lost,
            (Some(_), _, _) => Check::Fine,
            (None, Some(since), Some(silence)) if now >= since + silence => {
                self.pinged(now);
                Check::Ping
            }
            _ => Check::Fine,
        }
    }
}

/// Whether `asked`, or a request queued behind it, is a stop (a closed
/// channel is one too); takes every queued request.
/// What the control channel asked of the driver, once subscriptions added
/// or removed meanwhile are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    Stop,
    Reconnect,
    /// Only subscriptions changed.
    Nothing,
}

/// Takes `first` and whatever else is queued: several reconnects asked at
/// once make one, and a stop wins over everything.
fn take_control(
    first: Option<Control>,
    control: &mut mpsc::UnboundedReceiver<Control>,
    plan: &mut SubscriptionPlan,
    link: &Link,
) -> Asked {
    let mut asked = Asked::Nothing;
    let mut next = Some(first);
    while let Some(c) = next {
        match c {
            None | Some(Control::Stop) => asked = Asked::Stop,
            Some(Control::Reconnect) if asked == Asked::Nothing => asked = Asked::Reconnect,
            Some(Control::Reconnect) => {}
            Some(Control::Subscribe(s)) => {
                if let Some(now) = plan.add(s, link.is_ready()) {
                    subscribe(link, vec![now]);
                }
            }
            Some(Control::Unsubscribe(filter)) => {
                if plan.remove(&filter) && link.is_ready() {
                    link.client.unsubscribe(filter);
                }
            }
        }
        next = control.try_recv().ok().map(Some);
    }
    asked
}

/// What the driver owns besides the link.
pub(crate) struct Parts {
    pub(crate) eventloop: Events,
    pub(crate) endpoints: Endpoints,
    pub(crate) control: mpsc::UnboundedReceiver<Control>,
    pub(crate) backoff: Backoff,
    pub(crate) probe_dots: bool,
    pub(crate) fresh_client_id_on_failover: bool,
    pub(crate) liveness: Liveness,
}

/// Drives the connection until a stop is asked for: polls the event loop,
/// hands messages to `session`, subscribes on every connection, and
/// reconnects after errors with capped, jittered backoff, moving on to the
/// next endpoint each time. Never awaits user code or a full channel.
pub(crate) async fn drive<S: Session>(session: Arc<S>, parts: Parts, link: Link) {
    let Parts {
        mut eventloop,
        endpoints,
        mut control,
        mut backoff,
        probe_dots,
        fresh_client_id_on_failover,
        mut liveness,
    } = parts;
    let mut failovers = 0u64;
    let mut acks = Acks::default();
    // Whether the broker accepted the current connection.
    let mut connacked = false;
    let mut plan = SubscriptionPlan::new(session.subscriptions());
    let probe = probe_dots
        .then(|| plan.essential.first().map(|s| s.filter.clone()))
        .flatten()
        .map(|essential| {
            let first = essential.split('/').next().unwrap_or("+").to_owned();
            format!("{first}/{DOT_PROBE}")
        });
    if let Some(filter) = &probe {
        plan.probe_first(Subscription::new(filter.clone(), QoS::AtMostOnce));
    }
    // When the broker refused the essential subscription, when to ask again
    // (NATS refuses it for a while after losing a node, for instance).
    let mut resubscribe_at: Option<tokio::time::Instant> = None;
    // The liveness timer, armed for the earliest check wanted: a check that
    // comes early finds all fine and the timer is armed again for the next
    // one. A timer made anew on every turn of the loop (every packet) cost
    // an allocation and a timer-wheel entry per packet.
    let alive_timer = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(alive_timer);
    let mut armed: Option<Instant> = None;
    loop {
        let retry = async {
            match resubscribe_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        if let Some(at) = liveness.next_check() {
            if armed.is_none_or(|armed| at < armed) {
                alive_timer.as_mut().reset(at);
                armed = Some(at);
            }
        }
        let event = tokio::select! {
            biased;
            asked = control.recv() => {
                match take_control(asked, &mut control, &mut plan, &link) {
                    Asked::Stop => break,
                    Asked::Nothing => continue,
                    Asked::Reconnect => {}
                }
                tracing::info!("making the broker connection anew, as asked");
                liveness.reset();
                plan.on_error();
                link.set_ready(false);
                // The next poll connects afresh.
                eventloop.clean();
                acks.lost(&link, &eventloop);
                continue;
            }
            () = retry => {
                resubscribe_at = None;
                if let Step::Subscribe(s) = plan.retry_essential() {
                    subscribe(&link, s);
                }
                continue;
            }
            () = &mut alive_timer, if armed.is_some() => match liveness.check({
                armed = None;
                Instant::now()
            }) {
                Check::Fine => continue,
                Check::Ping => {
                    tracing::debug!("a request had nothing back for a while: pinging the broker");
                    eventloop.ping();
                    continue;
                }
                Check::Lost => {
                    // The next poll connects afresh; this one fails over.
                    eventloop.clean();
                    Err(Arc::new(PingTimeout {
                        timeout: liveness.ping_timeout,
                    }) as super::transport::PollError)
                }
            },
            event = eventloop.poll() => event,
        };
        match &event {
            Ok(ev) if ev.is_from_broker() => liveness.heard(),
            Ok(Ev::Published { .. }) => liveness.sent(Instant::now),
            Ok(Ev::PingSent) => liveness.pinged(Instant::now()),
            Ok(_) => {}
            Err(_) => liveness.reset(),
        }
        match event {
            Ok(Ev::Message {
                topic,
                payload,
                properties,
            }) => match std::str::from_utf8(&topic) {
                Ok(topic) => session.on_message(Message {
                    topic,
                    payload: &payload,
                    properties: properties.as_ref(),
                }),
                Err(_) => tracing::debug!("dropped a message whose topic is not UTF-8"),
            },
            Ok(Ev::Published { pkid }) => {
                link.state.written.fetch_add(1, Relaxed);
                acks.written(&link, pkid);
            }
            Ok(Ev::PubAck { pkid, reason }) => {
                if let Some(topic) = acks.acked(pkid, reason) {
                    session.on_publish_refused(&topic, reason);
                }
            }
            Ok(Ev::ConnAck) => {
                connacked = true;
                acks.connected();
                backoff.reset();
                resubscribe_at = None;
                link.state.connects.fetch_add(1, Relaxed);
                tracing::debug!(broker = %link.broker_url(), "connected");
                if let Step::Subscribe(s) = plan.on_connack() {
                    subscribe(&link, s);
                }
                session.on_connected();
            }
            Ok(Ev::SubAck(codes)) => {
                let granted = |i: usize| codes.get(i).copied().unwrap_or(false);
                match plan.on_suback(granted) {
                    Step::Ready(next) => {
                        backoff.reset();
                        link.set_ready(true);
                        session.on_ready();
                        if let Some(next) = next {
                            subscribe(&link, vec![next]);
                        }
                    }
                    Step::EssentialRefused(filter) => {
                        let error = SubscriptionRefused { filter };
                        let delay = backoff.next_delay(fastrand::f64());
                        tracing::error!("{error}; asking again in {} ms", delay.as_millis());
                        link.set_error(ConnectionError::new(&link.broker_url(), error));
                        resubscribe_at = Some(tokio::time::Instant::now() + delay);
                    }
                    Step::Answered {
                        filter,
                        granted,
                        ready,
                        next,
                    } => {
                        if probe.as_deref() == Some(filter.as_str()) {
                            link.state.dots.store(if granted { 1 } else { 2 }, Relaxed);
                            if !granted {
                                tracing::info!("the broker refuses topics containing '.': names with a dot will be refused");
                            }
                        } else if !granted {
                            tracing::error!(
                                filter,
                                "the broker refused the subscription; going on without it"
                            );
                        }
                        if ready {
                            backoff.reset();
                            link.set_ready(true);
                            session.on_ready();
                        }
                        if let Some(next) = next {
                            subscribe(&link, vec![next]);
                        }
                    }
                    Step::Subscribe(s) => subscribe(&link, s),
                    Step::Nothing => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                resubscribe_at = None;
                plan.on_error();
                link.set_ready(false);
                acks.lost(&link, &eventloop);
                let error = if !connacked && closed_by_a_3_1_1_broker(&e) {
                    ConnectionError::new(&link.broker_url(), NoMqtt5 { source: e })
                } else {
                    ConnectionError::from_arc(&link.broker_url(), e)
                };
                connacked = false;
                link.set_error(error.clone());
                session.on_disconnected(&error);
                if endpoints.len() > 1 {
                    let next = (link.state.current.load(Relaxed) + 1) % endpoints.len();
                    link.state.current.store(next, Relaxed);
                    let id = fresh_client_id_on_failover.then(|| {
                        failovers += 1;
                        format!("{}-f{failovers}", link.client_id())
                    });
                    eventloop.use_endpoint(&endpoints, next, id);
                }
                let delay = backoff.next_delay(fastrand::f64());
                tracing::warn!(
                    "broker connection: {error}; trying {} in {} ms",
                    link.broker_url(),
                    delay.as_millis()
                );
                let wait = tokio::time::sleep(delay);
                tokio::pin!(wait);
                let stop = loop {
                    tokio::select! {
                        biased;
                        // A reconnect asked for now cuts the wait short.
                        asked = control.recv() => match take_control(asked, &mut control, &mut plan, &link) {
                            Asked::Stop => break true,
                            Asked::Reconnect => break false,
                            Asked::Nothing => {}
                        },
                        () = &mut wait => break false,
                    }
                };
                if stop {
                    break;
                }
            }
        }
    }
    link.set_ready(false);
    session.on_stopping();
    if link.client.try_disconnect() {
        // Let queued packets and the DISCONNECT go out, briefly.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Ev::Disconnected) {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(filter: &str) -> Subscription {
        Subscription::new(filter, QoS::AtLeastOnce)
    }

    fn plan() -> SubscriptionPlan {
        SubscriptionPlan::new(vec![sub("replies/#"), sub("presence/+"), sub("events/+")])
    }

    #[test]
    fn a_filter_added_later_is_asked_for_now_when_idle_and_on_every_connection() {
        let mut p = plan();
        // Not connected: kept for the next connection.
        assert_eq!(p.add(sub("late/+"), false), None);
        assert_eq!(p.on_connack(), Step::Subscribe(vec![sub("replies/#")]));
        assert_eq!(p.on_suback(|_| true), Step::Ready(Some(sub("presence/+"))));
        // A SUBACK is awaited: asked for in its turn, after the others.
        assert_eq!(p.add(sub("later/+"), true), None);
        assert!(
            matches!(p.on_suback(|_| true), Step::Answered { next: Some(ref n), .. } if *n == sub("events/+"))
        );
        assert!(
            matches!(p.on_suback(|_| true), Step::Answered { next: Some(ref n), .. } if *n == sub("late/+"))
        );
        assert!(
            matches!(p.on_suback(|_| true), Step::Answered { next: Some(ref n), .. } if *n == sub("later/+"))
        );
        assert!(matches!(
            p.on_suback(|_| true),
            Step::Answered { next: None, .. }
        ));
        // Idle and ready: asked for at once; twice is once.
        assert_eq!(p.add(sub("now/+"), true), Some(sub("now/+")));
        assert_eq!(p.add(sub("now/+"), true), None);
        assert_eq!(p.add(sub("replies/#"), true), None);
        assert!(matches!(
            p.on_suback(|_| true),
            Step::Answered { next: None, .. }
        ));
        assert_eq!(
            p.optional_filters(),
            ["presence/+", "events/+", "late/+", "later/+", "now/+"]
        );
    }

    #[test]
    fn a_filter_removed_while_its_suback_is_awaited_does_not_skip_the_next() {
        let mut p = plan();
        p.add(sub("late/+"), false);
        p.on_connack();
        assert_eq!(p.on_suback(|_| true), Step::Ready(Some(sub("presence/+"))));
        // presence/+ is awaited; removing it, then an earlier-asked one.
        assert!(p.remove("presence/+"));
        assert!(!p.remove("presence/+"));
        assert!(!p.remove("replies/#"));
        assert_eq!(
            p.on_suback(|_| true),
            Step::Subscribe(vec![sub("events/+")])
        );
        assert!(
            matches!(p.on_suback(|_| true), Step::Answered { ref filter, next: Some(ref n), .. } if filter == "events/+" && *n == sub("late/+"))
        );
        // Removing one before the awaited one keeps the turn right.
        assert!(p.remove("events/+"));
        assert!(
            matches!(p.on_suback(|_| true), Step::Answered { ref filter, next: None, .. } if filter == "late/+")
        );
        assert_eq!(p.optional_filters(), ["late/+"]);
        // The next connection asks for what is left.
        p.on_error();
        p.on_connack();
        assert_eq!(p.on_suback(|_| true), Step::Ready(Some(sub("late/+"))));
    }

    #[test]
    fn the_essential_filter_first_then_the_optional_ones_one_at_a_time() {
        let mut p = plan();
        assert_eq!(p.on_connack(), Step::Subscribe(vec![sub("replies/#")]));
        assert_eq!(p.on_suback(|_| true), Step::Ready(Some(sub("presence/+"))));
        assert_eq!(
            p.on_suback(|_| true),
            Step::Answered {
                filter: "presence/+".into(),
                granted: true,
                ready: false,
                next: Some(sub("events/+"))
            }
        );
        assert_eq!(
            p.on_suback(|_| false),
            Step::Answered {
                filter: "events/+".into(),
                granted: false,
                ready: false,
                next: None
            }
        );
        assert_eq!(p.on_suback(|_| true), Step::Nothing);
    }

    #[test]
    fn one_lost_connection_in_an_optional_window_keeps_the_filter() {
        let mut p = plan();
        p.on_connack();
        p.on_suback(|_| true);
        p.on_error(); // a broker restart right then
        assert_eq!(p.optional_filters(), ["presence/+", "events/+"]);
        p.on_connack();
        assert_eq!(p.on_suback(|_| true), Step::Ready(Some(sub("presence/+"))));
    }

    #[test]
    fn a_broker_that_closes_over_one_filter_every_time_loses_that_filter_only() {
        let mut p = plan();
        for _ in 0..OPTIONAL_GIVE_UP_AFTER {
            p.on_connack();
            p.on_suback(|_| true);
            p.on_suback(|_| true); // presence granted
            p.on_error(); // closed over "events/+"
        }
        assert_eq!(p.optional_filters(), ["presence/+"]);
        p.on_connack();
        assert_eq!(p.on_suback(|_| true), Step::Ready(Some(sub("presence/+"))));
    }

    #[test]
    fn a_granted_optional_suback_resets_its_count() {
        let mut p = plan();
        for _ in 0..5 {
            p.on_connack();
            p.on_suback(|_| true);
            p.on_error();
            p.on_connack();
            p.on_suback(|_| true);
            p.on_suback(|_| true);
            p.on_suback(|_| true);
        }
        assert_eq!(p.optional_filters().len(), 2);
    }

    #[test]
    fn a_refused_essential_filter_is_not_ready() {
        let mut p = plan();
        p.on_connack();
        assert_eq!(
            p.on_suback(|_| false),
            Step::EssentialRefused("replies/#".into())
        );
    }

    #[test]
    fn readiness_waits_for_the_probe_which_goes_first() {
        let mut p = plan();
        p.probe_first(sub("replies/directcall.probe"));
        p.on_connack();
        assert_eq!(
            p.on_suback(|_| true),
            Step::Subscribe(vec![sub("replies/directcall.probe")])
        );
        assert_eq!(
            p.on_suback(|_| false),
            Step::Answered {
                filter: "replies/directcall.probe".into(),
                granted: false,
                ready: true,
                next: Some(sub("presence/+"))
            }
        );
    }

    #[test]
    fn a_probe_the_broker_closes_over_every_time_stops_holding_readiness() {
        let mut p = plan();
        p.probe_first(sub("replies/directcall.probe"));
        for _ in 0..OPTIONAL_GIVE_UP_AFTER {
            p.on_connack();
            p.on_suback(|_| true);
            p.on_error();
        }
        p.on_connack();
        assert_eq!(p.on_suback(|_| true), Step::Ready(Some(sub("presence/+"))));
    }

    #[test]
    fn with_nothing_optional_the_essential_suback_means_ready() {
        let mut p = SubscriptionPlan::new(vec![sub("car/#")]);
        p.on_connack();
        assert_eq!(p.on_suback(|_| true), Step::Ready(None));
    }

    const PING: Duration = Duration::from_millis(1500);
    const SILENCE: Duration = Duration::from_millis(500);

    #[test]
    fn a_requester_pings_after_silence_and_is_lost_without_an_answer() {
        let t = Instant::now();
        let mut l = Liveness::new(PING, Some(SILENCE));
        assert_eq!(l.next_check(), None, "nothing sent, nothing awaited");
        l.sent(|| t);
        l.sent(|| t + Duration::from_millis(100)); // the first one counts
        assert_eq!(l.next_check(), Some(t + SILENCE));
        assert_eq!(l.check(t + Duration::from_millis(499)), Check::Fine);
        assert_eq!(l.check(t + SILENCE), Check::Ping);
        assert_eq!(l.next_check(), Some(t + SILENCE + PING));
        assert_eq!(
            l.check(t + SILENCE + Duration::from_millis(1499)),
            Check::Fine
        );
        assert_eq!(l.check(t + SILENCE + PING), Check::Lost);
    }

    #[test]
    fn anything_from_the_broker_answers() {
        let t = Instant::now();
        let mut l = Liveness::new(PING, Some(SILENCE));
        l.sent(|| t);
        assert_eq!(l.check(t + SILENCE), Check::Ping);
        l.heard(); // a reply, or the PINGRESP
        assert_eq!(l.next_check(), None);
        assert_eq!(l.check(t + SILENCE + PING), Check::Fine);
    }

    #[test]
    fn a_device_waits_for_its_keepalive_ping_only() {
        let t = Instant::now();
        let mut l = Liveness::new(PING, None);
        l.sent(|| t); // an answer: nothing comes back for it
        assert_eq!(l.next_check(), None);
        assert_eq!(l.check(t + Duration::from_secs(60)), Check::Fine);
        l.pinged(t + Duration::from_secs(30)); // the keepalive's PINGREQ
        assert_eq!(l.check(t + Duration::from_millis(31_499)), Check::Fine);
        assert_eq!(l.check(t + Duration::from_millis(31_500)), Check::Lost);
        l.reset();
        assert_eq!(l.next_check(), None);
    }

    #[test]
    fn a_refused_essential_filter_is_asked_for_again() {
        let mut p = plan();
        p.on_connack();
        assert!(matches!(p.on_suback(|_| false), Step::EssentialRefused(_)));
        assert_eq!(p.retry_essential(), Step::Subscribe(vec![sub("replies/#")]));
        assert_eq!(p.on_suback(|_| true), Step::Ready(Some(sub("presence/+"))));
    }
}
