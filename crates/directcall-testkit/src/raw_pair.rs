//! The floor every directcall figure is compared with: one requester
//! connection and one responder connection of bare rumqttc (TCP_NODELAY,
//! nothing of directcall's), correlated by an id in the topic through a map
//! of oneshots.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet};
use tokio::sync::{oneshot, watch};

use directcall_core::broker::BrokerOptions;
use directcall_core::mqtt::QoS;

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

/// The QoS of each leg of a request/reply round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Legs {
    /// The requester's request publish.
    pub request: QoS,
    /// The responder's subscription to requests.
    pub request_subscription: QoS,
    /// The responder's reply publish.
    pub reply: QoS,
    /// The requester's subscription to replies.
    pub reply_subscription: QoS,
}

impl Legs {
    /// Every leg at QoS 0: the fastest MQTT request/reply can go.
    pub const ALL_QOS_0: Legs = Legs::uniform(QoS::AtMostOnce);

    /// Every leg at `qos`.
    pub const fn uniform(qos: QoS) -> Self {
        Legs {
            request: qos,
            request_subscription: qos,
            reply: qos,
            reply_subscription: qos,
        }
    }

    /// The request publish at `qos`.
    pub const fn request(mut self, qos: QoS) -> Self {
        self.request = qos;
        self
    }

    /// The reply publish and the reply subscription at `qos`.
    pub const fn reply(mut self, qos: QoS) -> Self {
        self.reply = qos;
        self.reply_subscription = qos;
        self
    }
}

/// A bare request/echo pair on one broker.
#[derive(Debug)]
pub struct RawPair {
    client: AsyncClient,
    waiters: Waiters,
    next_id: AtomicU64,
    request_root: String,
    legs: Legs,
    stop: watch::Sender<bool>,
}

impl RawPair {
    /// Connects both ends to `broker` and waits for their subscriptions.
    ///
    /// # Errors
    /// [`RawPairError`] when either end cannot connect within 10 s.
    pub async fn start(broker: &BrokerOptions, legs: Legs) -> Result<RawPair, RawPairError> {
        Self::start_between(broker, broker, legs).await
    }

    /// Connects the requesting end to `requester` and the echoing end to
    /// `responder` (two nodes of a cluster, as a gateway and a device would
    /// be), and waits for their subscriptions.
    ///
    /// # Errors
    /// [`RawPairError`] when either end cannot connect within 10 s.
    pub async fn start_between(
        requester: &BrokerOptions,
        responder: &BrokerOptions,
        legs: Legs,
    ) -> Result<RawPair, RawPairError> {
        let run = format!("{:08x}", fastrand::u32(..));
        let request_root = format!("rawbench-{run}/req");
        let reply_root = format!("rawbench-{run}/rep");
        let (stop, _) = watch::channel(false);
        let waiters: Waiters = Arc::default();
        let (ready_tx, mut ready_rx) = watch::channel(0u8);

        // Responder: echo every request to the reply topic with the same id.
        raw_client(
            responder,
            &format!("rawbench-{run}-responder"),
            (format!("{request_root}/+"), legs.request_subscription),
            &ready_tx,
            &stop,
            {
                let reply_root = reply_root.clone();
                move |client: &AsyncClient, topic: &str, payload: &[u8]| {
                    let id = topic.rsplit('/').next().unwrap_or_default();
                    let _ = client.try_publish(
                        format!("{reply_root}/{id}"),
                        crate::options::qos(legs.reply),
                        false,
                        payload.to_vec(),
                    );
                }
            },
        )?;

        // Requester: complete the waiter named by the reply topic.
        let client = raw_client(
            requester,
            &format!("rawbench-{run}-requester"),
            (format!("{reply_root}/+"), legs.reply_subscription),
            &ready_tx,
            &stop,
            {
                let waiters = Arc::clone(&waiters);
                move |_: &AsyncClient, topic: &str, _: &[u8]| {
                    let id = topic.rsplit('/').next().and_then(|i| i.parse::<u64>().ok());
                    let waiter = id.and_then(|id| {
                        waiters
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id)
                    });
                    if let Some(w) = waiter {
                        let _ = w.send(());
                    }
                }
            },
        )?;
        tokio::time::timeout(Duration::from_secs(10), ready_rx.wait_for(|n| *n >= 2))
            .await
            .map_err(|_| {
                RawPairError(format!(
                    "no connection to {} and {} within 10 s",
                    requester.url(),
                    responder.url()
                ))
            })?
            .map_err(|e| RawPairError(e.to_string()))?;
        Ok(RawPair {
            client,
            waiters,
            next_id: AtomicU64::new(0),
            request_root,
            legs,
            stop,
        })
    }

    /// The QoS of each leg.
    pub fn legs(&self) -> Legs {
        self.legs
    }

    /// One request/echo round trip carrying `payload`.
    ///
    /// # Errors
    /// [`RawCallError`]: no echo in time, or the request was not queued.
    pub async fn call(&self, payload: &[u8], timeout: Duration) -> Result<(), RawCallError> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let topic = format!("{}/{id}", self.request_root);
        if self
            .client
            .try_publish(
                topic,
                crate::options::qos(self.legs.request),
                false,
                payload.to_vec(),
            )
            .is_err()
        {
            self.forget(id);
            return Err(RawCallError::Unavailable);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                self.forget(id);
                Err(RawCallError::Timeout)
            }
        }
    }

    fn forget(&self, id: u64) {
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// Why one raw round trip failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RawCallError {
    /// No echo before the timeout.
    #[error("timeout")]
    Timeout,
    /// The request was not queued.
    #[error("unavailable")]
    Unavailable,
}

/// The raw pair could not start.
#[derive(Debug, Clone, thiserror::Error)]
#[error("raw pair: {0}")]
pub struct RawPairError(pub(crate) String);

/// A bare rumqttc client with TCP_NODELAY, subscribed to `filter` on every
/// connection, handing each message to `on_message` from its event loop.
fn raw_client(
    broker: &BrokerOptions,
    client_id: &str,
    (filter, qos): (String, QoS),
    ready: &watch::Sender<u8>,
    stop: &watch::Sender<bool>,
    on_message: impl Fn(&AsyncClient, &str, &[u8]) + Send + 'static,
) -> Result<AsyncClient, RawPairError> {
    let (mqtt, net) =
        crate::options::v311(broker, client_id).map_err(|e| RawPairError(e.to_string()))?;
    let (client, mut events) = AsyncClient::new(mqtt, 200_000);
    events.set_network_options(net);
    let (me, ready) = (client.clone(), ready.clone());
    let mut stop = stop.subscribe();
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                e = events.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = me.try_subscribe(filter.clone(), crate::options::qos(qos));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => ready.send_modify(|n| *n += 1),
                Ok(Event::Incoming(Packet::Publish(p))) => on_message(&me, &p.topic, &p.payload),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Ok(client)
}

impl Drop for RawPair {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
