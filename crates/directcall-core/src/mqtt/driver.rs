//! The task that drives one connection.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{Event, EventLoop, Packet, SubscribeFilter, SubscribeReasonCode};

use super::{ConnectionError, Link, Message, Session, Subscription};
use crate::broker::Backoff;

/// Connections in a row that may die while the optional subscriptions wait
/// for their SUBACK before they are given up for the life of the process. A
/// broker that refuses a filter by closing the connection (AWS IoT Core, for
/// a filter its policy denies) does it every time; a broker restart in that
/// window is a one-off and must not cost the subscriptions for good.
pub(crate) const OPTIONAL_GIVE_UP_AFTER: u32 = 3;

/// Which SUBACK the driver waits for, and what it has learnt about the
/// optional subscriptions. Pure bookkeeping, unit-tested below.
#[derive(Debug)]
pub(crate) struct SubscriptionPlan {
    essential: Vec<Subscription>,
    optional: Vec<Subscription>,
    phase: Phase,
    /// Connections lost in a row while waiting for the optional SUBACK.
    optional_losses: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Essential,
    Optional,
}

/// What the driver must do after an event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Nothing,
    Subscribe(Vec<Subscription>),
    /// The essential filter is granted; subscribe to these optional ones next.
    Ready(Vec<Subscription>),
    EssentialRefused,
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
            optional,
            phase: Phase::Idle,
            optional_losses: 0,
        }
    }

    /// A connection was made: subscribe to the essential filter again
    /// (clean sessions keep no subscriptions).
    pub(crate) fn on_connack(&mut self) -> Step {
        self.phase = Phase::Essential;
        Step::Subscribe(self.essential.clone())
    }

    /// A SUBACK arrived; `granted(i)` tells whether filter `i` was granted.
    pub(crate) fn on_suback(&mut self, granted: impl Fn(usize) -> bool) -> Step {
        match self.phase {
            Phase::Essential if granted(0) => {
                if self.optional.is_empty() {
                    self.phase = Phase::Idle;
                } else {
                    self.phase = Phase::Optional;
                }
                Step::Ready(self.optional.clone())
            }
            Phase::Essential => {
                self.phase = Phase::Idle;
                Step::EssentialRefused
            }
            Phase::Optional => {
                self.phase = Phase::Idle;
                self.optional_losses = 0;
                for (i, s) in self.optional.iter().enumerate() {
                    if !granted(i) {
                        tracing::error!(filter = %s.filter, "the broker refused the subscription; going on without it");
                    }
                }
                Step::Nothing
            }
            Phase::Idle => Step::Nothing,
        }
    }

    /// The connection was lost.
    pub(crate) fn on_error(&mut self) {
        if self.phase == Phase::Optional {
            self.optional_losses += 1;
            let filters: Vec<&str> = self.optional.iter().map(|s| s.filter.as_str()).collect();
            if self.optional_losses >= OPTIONAL_GIVE_UP_AFTER {
                tracing::error!(
                    ?filters,
                    "the broker closed the connection over these subscriptions {} times in a row; going on without them",
                    self.optional_losses
                );
                self.optional.clear();
            } else {
                tracing::warn!(
                    ?filters,
                    "the connection was lost while these subscriptions waited for their SUBACK; asking again on the next connection"
                );
            }
        }
        self.phase = Phase::Idle;
    }

    #[cfg(test)]
    fn optional(&self) -> &[Subscription] {
        &self.optional
    }
}

fn filters(subscriptions: Vec<Subscription>) -> Vec<SubscribeFilter> {
    subscriptions
        .into_iter()
        .map(|s| SubscribeFilter::new(s.filter, s.qos.to_rumqttc()))
        .collect()
}

fn subscribe(link: &Link, subscriptions: Vec<Subscription>) {
    let filters = filters(subscriptions);
    if let Err(rumqttc::ClientError::TryRequest(_)) =
        link.client.try_subscribe_many(filters.clone())
    {
        let client = link.client.clone();
        tokio::spawn(async move {
            let _ = client.subscribe_many(filters).await;
        });
    }
}

/// Drives the connection until a stop is asked for: polls the event loop,
/// hands messages to `session`, subscribes on every connection, and
/// reconnects after errors with capped, jittered backoff. Never awaits user
/// code or a full channel.
pub(crate) async fn drive<S: Session>(
    session: Arc<S>,
    mut eventloop: EventLoop,
    link: Link,
    mut backoff: Backoff,
) {
    let mut plan = SubscriptionPlan::new(session.subscriptions());
    let mut stop = link.state.stop.subscribe();
    let mut reconnect = link.state.reconnect.subscribe();
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            Ok(()) = reconnect.changed() => {
                tracing::info!("making the broker connection anew, as asked");
                plan.on_error();
                link.set_ready(false);
                // The next poll connects afresh.
                eventloop.clean();
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => session.on_message(Message {
                topic: &p.topic,
                payload: &p.payload,
            }),
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                link.state.connects.fetch_add(1, Relaxed);
                if let Step::Subscribe(s) = plan.on_connack() {
                    subscribe(&link, s);
                }
                session.on_connected();
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = |i: usize| {
                    matches!(
                        ack.return_codes.get(i),
                        Some(SubscribeReasonCode::Success(_))
                    )
                };
                match plan.on_suback(granted) {
                    Step::Ready(optional) => {
                        link.set_ready(true);
                        session.on_ready();
                        if !optional.is_empty() {
                            subscribe(&link, optional);
                        }
                    }
                    Step::EssentialRefused => {
                        tracing::error!("the broker refused the essential subscription");
                    }
                    Step::Nothing | Step::Subscribe(_) => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                plan.on_error();
                link.set_ready(false);
                let error = ConnectionError::new(link.broker_url(), e);
                link.set_error(error.clone());
                session.on_disconnected(&error);
                let delay = backoff.next_delay(fastrand::f64());
                tracing::warn!(
                    "broker connection: {error}; retrying in {} ms",
                    delay.as_millis()
                );
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|stop| *stop) => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    link.set_ready(false);
    session.on_stopping();
    if link.client.try_disconnect().is_ok() {
        // Let queued packets and the DISCONNECT go out, briefly.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
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
    use crate::mqtt::QoS;

    fn plan() -> SubscriptionPlan {
        SubscriptionPlan::new(vec![
            Subscription::new("replies/#", QoS::AtLeastOnce),
            Subscription::new("presence/+", QoS::AtLeastOnce),
        ])
    }

    #[test]
    fn the_essential_filter_first_then_the_optional_ones() {
        let mut p = plan();
        assert_eq!(
            p.on_connack(),
            Step::Subscribe(vec![Subscription::new("replies/#", QoS::AtLeastOnce)])
        );
        assert_eq!(
            p.on_suback(|_| true),
            Step::Ready(vec![Subscription::new("presence/+", QoS::AtLeastOnce)])
        );
        assert_eq!(p.on_suback(|_| true), Step::Nothing);
    }

    #[test]
    fn one_lost_connection_in_the_optional_window_keeps_the_optional_filters() {
        let mut p = plan();
        p.on_connack();
        p.on_suback(|_| true);
        p.on_error(); // a broker restart right then
        assert_eq!(p.optional().len(), 1);
        p.on_connack();
        assert!(matches!(p.on_suback(|_| true), Step::Ready(o) if o.len() == 1));
    }

    #[test]
    fn a_broker_that_closes_over_them_every_time_loses_them() {
        let mut p = plan();
        for _ in 0..OPTIONAL_GIVE_UP_AFTER {
            p.on_connack();
            p.on_suback(|_| true);
            p.on_error();
        }
        assert!(p.optional().is_empty());
        p.on_connack();
        assert_eq!(p.on_suback(|_| true), Step::Ready(vec![]));
    }

    #[test]
    fn a_granted_optional_suback_resets_the_count() {
        let mut p = plan();
        for _ in 0..5 {
            p.on_connack();
            p.on_suback(|_| true);
            p.on_error();
            p.on_connack();
            p.on_suback(|_| true);
            p.on_suback(|_| true);
        }
        assert_eq!(p.optional().len(), 1);
    }

    #[test]
    fn a_refused_essential_filter_is_not_ready() {
        let mut p = plan();
        p.on_connack();
        assert_eq!(p.on_suback(|_| false), Step::EssentialRefused);
    }
}
