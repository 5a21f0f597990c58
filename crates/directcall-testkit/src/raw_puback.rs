//! The floor of "no device is subscribed": one bare rumqttc MQTT 5
//! connection publishing at QoS 1 to a topic nobody subscribes to, each
//! publish done when its PUBACK arrives, whatever its reason code.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use rumqttc::Outgoing;
use tokio::sync::{oneshot, watch};

use super::{RawCallError, RawPairError};
use directcall_core::broker::BrokerOptions;

#[derive(Debug, Default)]
struct Waiting {
    /// Publishes queued, in the order the event loop will send them.
    queued: VecDeque<oneshot::Sender<u8>>,
    /// Publishes sent, by packet id.
    sent: HashMap<u16, oneshot::Sender<u8>>,
}

/// A bare MQTT 5 publisher whose round trip is one PUBACK.
#[derive(Debug)]
pub struct RawPuback {
    client: AsyncClient,
    waiting: Arc<Mutex<Waiting>>,
    topic: String,
    /// The event loop task, aborted on drop.
    events: tokio::task::JoinHandle<()>,
}

impl RawPuback {
    /// Connects to `broker` over MQTT 5 and waits for the CONNACK.
    ///
    /// # Errors
    /// [`RawPairError`] when it cannot connect within 10 s.
    pub async fn start(broker: &BrokerOptions) -> Result<RawPuback, RawPairError> {
        let run = format!("{:08x}", fastrand::u32(..));
        let mqtt = crate::options::v5(broker, &format!("rawpuback-{run}"))
            .map_err(|e| RawPairError(e.to_string()))?;
        let (client, mut events) = AsyncClient::new(mqtt, 200_000);
        let waiting: Arc<Mutex<Waiting>> = Arc::default();
        let (ready_tx, mut ready) = watch::channel(false);
        let w = Arc::clone(&waiting);
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        ready_tx.send_replace(true);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(tx) = w.queued.pop_front() {
                            w.sent.insert(pkid, tx);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let tx = w
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .sent
                            .remove(&ack.pkid);
                        if let Some(tx) = tx {
                            let _ = tx.send(crate::options::puback_code(ack.reason));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let connected = tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r)).await;
        if !matches!(connected, Ok(Ok(_))) {
            task.abort();
            return Err(RawPairError(format!(
                "no connection to {} within 10 s",
                broker.url()
            )));
        }
        Ok(RawPuback {
            client,
            waiting,
            topic: format!("rawpuback-{run}/nobody"),
            events: task,
        })
    }

    /// One QoS 1 publish of `payload` and its PUBACK: the reason code.
    ///
    /// # Errors
    /// [`RawCallError`]: no PUBACK in time, or the publish was not queued.
    pub async fn call(&self, payload: &[u8], timeout: Duration) -> Result<u8, RawCallError> {
        let (tx, rx) = oneshot::channel();
        {
            // Queued under the lock, so that the queue's order is the order
            // in which the event loop sends them.
            let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if self
                .client
                .try_publish(
                    self.topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    payload.to_vec(),
                )
                .is_err()
            {
                return Err(RawCallError::Unavailable);
            }
            w.queued.push_back(tx);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(code)) => Ok(code),
            _ => Err(RawCallError::Timeout),
        }
    }
}

impl Drop for RawPuback {
    fn drop(&mut self) {
        self.events.abort();
    }
}
