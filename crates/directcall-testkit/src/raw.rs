//! A bare MQTT client for tests: a device or a requester of the AWS sample, a spy or a
//! hostile peer, with none of directcall's checks.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

use super::within;
use directcall_core::broker::BrokerOptions;

/// A bare MQTT 3.1.1 client; every await is bounded.
#[derive(Debug)]
pub struct Raw {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    subacks: mpsc::UnboundedReceiver<()>,
}

impl Raw {
    /// Connects to `broker` (TLS and client certificates included) as `id`.
    ///
    /// # Panics
    /// When it is not connected within 10 s.
    pub async fn connect(broker: &BrokerOptions, id: &str) -> Raw {
        let (mut mqtt, net) = crate::options::v311(broker, id).expect("raw client options");
        mqtt.set_keep_alive(Duration::from_secs(30));
        // rumqttc's default is 10 KiB; hostile tests send far more.
        mqtt.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(mqtt, 1024);
        eventloop.set_network_options(net);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut connected = false;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        let _ = conn_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(_) => {}
                    // Until the first CONNACK a failed attempt is tried
                    // again (within `connect`'s 10 s): a busy broker may
                    // drop a connection it has just accepted. After it, the
                    // peer's connection is gone for good.
                    Err(e) if !connected && !conn_tx.is_closed() => {
                        eprintln!("raw client: connecting: {e}; trying again");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(_) => break,
                }
            }
        });
        within(10, conn_rx.recv())
            .await
            .expect("raw client connects");
        Raw {
            client,
            rx,
            subacks,
        }
    }

    /// Subscribes to `filter` at QoS 1 and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        within(10, self.subacks.recv()).await.expect("suback");
    }

    /// Publishes at QoS 1, not retained.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.publish_with(topic, payload, 1, false).await;
    }

    /// Publishes at QoS `qos` (0 or 1), retained or not.
    pub async fn publish_with(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: u8,
        retain: bool,
    ) {
        let qos = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        self.client
            .publish(topic, qos, retain, payload.into())
            .await
            .expect("publish queued");
    }

    /// The next message: its topic and payload parsed as JSON.
    ///
    /// # Panics
    /// When none arrives within 10 s or it is not JSON.
    pub async fn next(&mut self) -> (String, Value) {
        let (topic, payload) = self.next_raw().await;
        let value = serde_json::from_slice(&payload)
            .unwrap_or_else(|e| panic!("payload on {topic} is not JSON: {e}"));
        (topic, value)
    }

    /// The next message as bytes.
    ///
    /// # Panics
    /// When none arrives within 10 s.
    pub async fn next_raw(&mut self) -> (String, Vec<u8>) {
        within(10, self.rx.recv()).await.expect("raw client open")
    }

    /// Asserts that nothing arrives for `ms` milliseconds.
    ///
    /// # Panics
    /// When something does.
    pub async fn nothing_for(&mut self, ms: u64) {
        if let Ok(Some((topic, _))) =
            tokio::time::timeout(Duration::from_millis(ms), self.rx.recv()).await
        {
            panic!("unexpected message on {topic}");
        }
    }

    /// Messages received so far and not yet read.
    pub fn drain(&mut self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            out.push(m);
        }
        out
    }
}
