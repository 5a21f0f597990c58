//! The two protocol versions behind the one connection layer: rumqttc's
//! 3.1.1 client and its version 5 client, each wrapped so the driver and
//! the link see one client, one event loop and one kind of event.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5p;
use rumqttc::v5::mqttbytes::QoS as QoS5;

use super::{Properties, QoS, Subscription};

impl QoS {
    fn to_v5(self) -> QoS5 {
        match self {
            QoS::AtMostOnce => QoS5::AtMostOnce,
            QoS::AtLeastOnce => QoS5::AtLeastOnce,
        }
    }
}

/// The publishing half of a connection, either version.
#[derive(Clone)]
pub(crate) enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A publish that could not be queued at once (the request queue is full):
/// what a task may wait to queue.
pub(crate) enum Deferred {
    V4(rumqttc::Publish),
    V5(Box<v5p::Publish>),
    /// Not to be tried again (an invalid topic).
    Refused,
}

impl Client {
    /// Queues a publish without waiting; properties are dropped on 3.1.1.
    pub(crate) fn try_publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        qos: QoS,
        retain: bool,
        properties: Option<&Properties>,
    ) -> Result<(), Deferred> {
        match self {
            Client::V4(c) => match c.try_publish(topic, qos.to_rumqttc(), retain, payload) {
                Ok(()) => Ok(()),
                Err(rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(p))) => {
                    Err(Deferred::V4(p))
                }
                Err(_) => Err(Deferred::Refused),
            },
            Client::V5(c) => {
                let result = match properties {
                    Some(p) => c.try_publish_with_properties(
                        topic,
                        qos.to_v5(),
                        retain,
                        payload,
                        p.to_v5(),
                    ),
                    None => c.try_publish(topic, qos.to_v5(), retain, payload),
                };
                match result {
                    Ok(()) => Ok(()),
                    Err(rumqttc::v5::ClientError::TryRequest(rumqttc::v5::Request::Publish(p))) => {
                        Err(Deferred::V5(Box::new(p)))
                    }
                    Err(_) => Err(Deferred::Refused),
                }
            }
        }
    }

    /// Waits for room and queues a publish that [`Client::try_publish`]
    /// could not.
    pub(crate) async fn publish_deferred(&self, deferred: Deferred) {
        match (self, deferred) {
            (Client::V4(c), Deferred::V4(p)) => {
                let _ = c.publish_bytes(p.topic, p.qos, p.retain, p.payload).await;
            }
            (Client::V5(c), Deferred::V5(p)) => {
                let p = *p;
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let _ = match p.properties {
                    Some(props) => {
                        c.publish_with_properties(topic, p.qos, p.retain, p.payload, props)
                            .await
                    }
                    None => c.publish(topic, p.qos, p.retain, p.payload).await,
                };
            }
            _ => {}
        }
    }

    /// Unsubscribes from `filter`, waiting for room in a task when the
    /// queue is full.
    pub(crate) fn unsubscribe(&self, filter: String) {
        match self {
            Client::V4(c) => {
                if let Err(rumqttc::ClientError::TryRequest(_)) = c.try_unsubscribe(filter.clone())
                {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let _ = c.unsubscribe(filter).await;
                    });
                }
            }
            Client::V5(c) => {
                if let Err(rumqttc::v5::ClientError::TryRequest(_)) =
                    c.try_unsubscribe(filter.clone())
                {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let _ = c.unsubscribe(filter).await;
                    });
                }
            }
        }
    }

    /// Subscribes to `subscriptions` in one SUBSCRIBE, waiting for room in
    /// a task when the queue is full.
    pub(crate) fn subscribe(&self, subscriptions: Vec<Subscription>) {
        match self {
            Client::V4(c) => {
                let filters: Vec<rumqttc::SubscribeFilter> = subscriptions
                    .into_iter()
                    .map(|s| rumqttc::SubscribeFilter::new(s.filter, s.qos.to_rumqttc()))
                    .collect();
                if let Err(rumqttc::ClientError::TryRequest(_)) =
                    c.try_subscribe_many(filters.clone())
                {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let _ = c.subscribe_many(filters).await;
                    });
                }
            }
            Client::V5(c) => {
                let filters: Vec<v5p::Filter> = subscriptions
                    .into_iter()
                    .map(|s| v5p::Filter::new(s.filter, s.qos.to_v5()))
                    .collect();
                if let Err(rumqttc::v5::ClientError::TryRequest(_)) =
                    c.try_subscribe_many(filters.clone())
                {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let _ = c.subscribe_many(filters).await;
                    });
                }
            }
        }
    }

    /// Queues a DISCONNECT.
    pub(crate) fn try_disconnect(&self) -> bool {
        match self {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        }
    }
}

impl Properties {
    fn to_v5(&self) -> v5p::PublishProperties {
        v5p::PublishProperties {
            message_expiry_interval: self.message_expiry_secs,
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone().map(Bytes::from),
            user_properties: self.user_properties.clone(),
            ..Default::default()
        }
    }

    fn from_v5(p: v5p::PublishProperties) -> Self {
        Properties {
            message_expiry_secs: p.message_expiry_interval,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data.map(|c| c.to_vec()),
            user_properties: p.user_properties,
        }
    }
}

/// Every endpoint's settings, in order, for one version.
#[derive(Clone)]
pub(crate) enum Endpoints {
    V4(Vec<rumqttc::MqttOptions>),
    V5(Vec<rumqttc::v5::MqttOptions>),
}

impl Endpoints {
    pub(crate) fn len(&self) -> usize {
        match self {
            Endpoints::V4(all) => all.len(),
            Endpoints::V5(all) => all.len(),
        }
    }
}

/// What the driver hears from the event loop, either version.
pub(crate) enum Ev {
    Message {
        topic: Bytes,
        payload: Bytes,
        properties: Option<Properties>,
    },
    ConnAck,
    /// Whether each filter of the SUBSCRIBE was granted.
    SubAck(Vec<bool>),
    /// A QoS 1 publish was acknowledged with this reason code (3.1.1: 0).
    PubAck {
        pkid: u16,
        reason: u8,
    },
    /// A publish was written with this packet id (0 for QoS 0).
    Published {
        pkid: u16,
    },
    /// The DISCONNECT was written.
    Disconnected,
    /// A PINGREQ was written (the keepalive's, or one asked for).
    PingSent,
    /// Another packet came from the broker (a PINGRESP, say).
    Heard,
    Other,
}

impl Ev {
    /// Whether the broker sent this: proof that it is alive.
    pub(crate) fn is_from_broker(&self) -> bool {
        matches!(
            self,
            Ev::Message { .. } | Ev::ConnAck | Ev::SubAck(_) | Ev::PubAck { .. } | Ev::Heard
        )
    }
}

/// The event loop of a connection, either version.
pub(crate) enum Events {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// Why polling failed: the transport's own error.
pub(crate) type PollError = Arc<dyn StdError + Send + Sync>;

impl Events {
    pub(crate) async fn poll(&mut self) -> Result<Ev, PollError> {
        use rumqttc::Outgoing;
        match self {
            Events::V4(e) => {
                use rumqttc::{Event, Packet};
                let event = e.poll().await.map_err(|e| Arc::new(e) as PollError)?;
                Ok(match event {
                    Event::Incoming(Packet::Publish(p)) => Ev::Message {
                        topic: Bytes::from(p.topic),
                        payload: p.payload,
                        properties: None,
                    },
                    Event::Incoming(Packet::ConnAck(_)) => Ev::ConnAck,
                    Event::Incoming(Packet::SubAck(ack)) => Ev::SubAck(
                        ack.return_codes
                            .iter()
                            .map(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)))
                            .collect(),
                    ),
                    Event::Incoming(Packet::PubAck(ack)) => Ev::PubAck {
                        pkid: ack.pkid,
                        reason: 0,
                    },
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ev::Published { pkid },
                    Event::Outgoing(Outgoing::Disconnect) => Ev::Disconnected,
                    Event::Outgoing(Outgoing::PingReq) => Ev::PingSent,
                    Event::Incoming(_) => Ev::Heard,
                    _ => Ev::Other,
                })
            }
            Events::V5(e) => {
                use rumqttc::v5::mqttbytes::v5::Packet;
                use rumqttc::v5::Event;
                let event = e.poll().await.map_err(|e| Arc::new(e) as PollError)?;
                Ok(match event {
                    Event::Incoming(Packet::Publish(p)) => Ev::Message {
                        topic: p.topic,
                        payload: p.payload,
                        properties: p.properties.map(Properties::from_v5),
                    },
                    Event::Incoming(Packet::ConnAck(_)) => Ev::ConnAck,
                    Event::Incoming(Packet::SubAck(ack)) => Ev::SubAck(
                        ack.return_codes
                            .iter()
                            .map(|c| matches!(c, v5p::SubscribeReasonCode::Success(_)))
                            .collect(),
                    ),
                    Event::Incoming(Packet::PubAck(ack)) => Ev::PubAck {
                        pkid: ack.pkid,
                        reason: puback_code(ack.reason),
                    },
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ev::Published { pkid },
                    Event::Outgoing(Outgoing::Disconnect) => Ev::Disconnected,
                    Event::Outgoing(Outgoing::PingReq) => Ev::PingSent,
                    Event::Incoming(_) => Ev::Heard,
                    _ => Ev::Other,
                })
            }
        }
    }

    /// Queues a PINGREQ ahead of the requests, unless one is already
    /// waiting for its PINGRESP (a second would end the connection).
    pub(crate) fn ping(&mut self) {
        match self {
            Events::V4(e) => {
                if !e.state.await_pingresp {
                    e.pending
                        .push_front(rumqttc::Request::PingReq(rumqttc::PingReq));
                }
            }
            Events::V5(e) => {
                if !e.state.await_pingresp {
                    e.pending.push_front(rumqttc::v5::Request::PingReq);
                }
            }
        }
    }

    /// Drops the network connection; the next poll connects afresh.
    pub(crate) fn clean(&mut self) {
        match self {
            Events::V4(e) => e.clean(),
            Events::V5(e) => e.clean(),
        }
    }

    /// Connects to endpoint `i` from the next connection on, as `client_id`
    /// when given.
    pub(crate) fn use_endpoint(
        &mut self,
        endpoints: &Endpoints,
        i: usize,
        client_id: Option<String>,
    ) {
        match (self, endpoints) {
            (Events::V4(e), Endpoints::V4(all)) => {
                e.mqtt_options = all[i % all.len()].clone();
                if let Some(id) = client_id {
                    e.mqtt_options.set_client_id(id);
                }
            }
            (Events::V5(e), Endpoints::V5(all)) => {
                e.options = all[i % all.len()].clone();
                if let Some(id) = client_id {
                    e.options.set_client_id(id);
                }
            }
            _ => {}
        }
    }

    /// QoS 1 publishes that were taken from the request queue but never
    /// written (they wait in the event loop's own queue, which a clean
    /// session drops at the next connection).
    pub(crate) fn unwritten_qos1(&self) -> usize {
        match self {
            Events::V4(e) => count_unwritten(&e.pending, |r| match r {
                rumqttc::Request::Publish(p) => p.qos != rumqttc::QoS::AtMostOnce && p.pkid == 0,
                _ => false,
            }),
            Events::V5(e) => count_unwritten(&e.pending, |r| match r {
                rumqttc::v5::Request::Publish(p) => p.qos != QoS5::AtMostOnce && p.pkid == 0,
                _ => false,
            }),
        }
    }
}

fn count_unwritten<R>(pending: &VecDeque<R>, unwritten: impl Fn(&R) -> bool) -> usize {
    pending.iter().filter(|r| unwritten(r)).count()
}

/// MQTT 5's number for a PUBACK reason.
pub(crate) fn puback_code(reason: v5p::PubAckReason) -> u8 {
    use v5p::PubAckReason as R;
    match reason {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// Whether `error` is a version 5 connection the broker closed (or answered
/// with something that is not an MQTT 5 packet) before accepting it: what a
/// broker that speaks only 3.1.1 does.
pub(crate) fn closed_by_a_3_1_1_broker(error: &PollError) -> bool {
    use rumqttc::v5::{ConnectionError as E, StateError as S};
    matches!(
        error.downcast_ref::<E>(),
        Some(E::MqttState(S::ConnectionAborted | S::Deserialization(_)))
    )
}
