//! Shared test harness: real brokers on free ports, raw MQTT peers, helpers.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::time::Duration;

use directcall_bins::{EmbeddedBroker, Mosquitto};
use directcall_cloud::{Options, Requester};
use directcall_core::{BrokerOptions, Prefix, Target};
use directcall_device::{serve, Device, DeviceOptions, HandlerError, MethodCall, Router};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Which real broker a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Embedded,
    Mosquitto,
}

pub struct TestBroker {
    pub kind: Kind,
    pub mosquitto: Option<Mosquitto>,
    options: BrokerOptions,
}

impl TestBroker {
    /// The broker, or `None` (loudly) when Mosquitto is not installed outside CI.
    pub fn start(kind: Kind) -> Option<Self> {
        match kind {
            // A broker per test: one test's trouble (rumqttd closing a
            // connection over a `$` filter, say) never reaches another.
            Kind::Embedded => Some(Self::own_embedded()),
            Kind::Mosquitto => match Mosquitto::start("").expect("mosquitto failed to start") {
                Some(m) => Some(TestBroker {
                    kind,
                    options: m.options(),
                    mosquitto: Some(m),
                }),
                None => {
                    assert!(
                        std::env::var_os("CI").is_none(),
                        "the mosquitto binary is required in CI (apt-get install -y mosquitto)"
                    );
                    eprintln!(
                        "\n*** SKIPPED: the mosquitto binary is not installed; \
                         `apt-get install -y mosquitto` to run the Mosquitto half of this test ***\n"
                    );
                    None
                }
            },
        }
    }

    /// A broker of the test's own (not the shared embedded one).
    pub fn own_embedded() -> Self {
        let b = EmbeddedBroker::start(None).expect("embedded broker");
        TestBroker {
            kind: Kind::Embedded,
            mosquitto: None,
            options: b.options(),
        }
    }

    pub fn url(&self) -> String {
        self.options.url()
    }

    pub fn options(&self) -> BrokerOptions {
        let mut o = self.options.clone();
        // Fast reconnects keep the broker-restart tests short.
        o.backoff_min = Duration::from_millis(50);
        o.backoff_max = Duration::from_millis(500);
        o
    }
}

/// Runs `scenario` against both brokers, one test each.
#[macro_export]
macro_rules! both_brokers {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                if let Some(b) = $crate::common::TestBroker::start($crate::common::Kind::Embedded) {
                    super::$name(b).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                if let Some(b) = $crate::common::TestBroker::start($crate::common::Kind::Mosquitto)
                {
                    super::$name(b).await;
                }
            }
        }
    };
}

/// A name unique to this test run.
pub fn unique(base: &str) -> String {
    format!("{base}-{:08x}", fastrand::u32(..))
}

/// Bounds every await: a hung test fails instead of hanging CI.
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
}

/// A requester with its own prefix, so parallel tests never see each other's replies.
pub async fn requester(b: &TestBroker) -> Requester {
    requester_with(b, |o| o).await
}

pub async fn requester_with(
    b: &TestBroker,
    configure: impl FnOnce(Options) -> Options,
) -> Requester {
    let prefix = Prefix::new(unique("test")).unwrap();
    let options = configure(Options::new(b.options()).prefix(prefix));
    within(15, Requester::connect(options))
        .await
        .expect("requester connects")
}

/// The example car: `windows_down` and `alarm_off`.
pub fn car_router() -> Router {
    Router::new()
        .method("windows_down", |call: MethodCall| async move {
            Ok::<_, HandlerError>(
                json!({"windows": "down", "device": call.target.as_str(), "asked": call.request}),
            )
        })
        .method("alarm_off", |_call: MethodCall| async {
            Ok::<_, HandlerError>(json!("alarm off"))
        })
}

pub async fn device(b: &TestBroker, target: &str, router: Router) -> Device {
    device_with(b, target, router, |o| o).await
}

pub async fn device_with(
    b: &TestBroker,
    target: &str,
    router: Router,
    configure: impl FnOnce(DeviceOptions) -> DeviceOptions,
) -> Device {
    let options = configure(DeviceOptions::new(
        b.options(),
        Target::new(target).unwrap(),
    ));
    within(15, serve(router, options))
        .await
        .expect("device connects")
}

/// A bare MQTT client: what a seed device or a hostile peer would be.
pub struct Raw {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    subacks: mpsc::UnboundedReceiver<()>,
}

impl Raw {
    pub async fn connect(b: &TestBroker, id: &str) -> Raw {
        Self::connect_to(&b.options(), id).await
    }

    /// Connects with `o`'s transport (TLS and client certificates included).
    pub async fn connect_to(o: &BrokerOptions, id: &str) -> Raw {
        let (mut mqtt, _) = directcall_cloud::connection::mqtt_options(o, id).expect("options");
        mqtt.set_keep_alive(Duration::from_secs(30));
        // rumqttc's default is 10 KiB; hostile tests send far more.
        mqtt.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(mqtt, 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = conn_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(_) => {}
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

    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        within(10, self.subacks.recv()).await.expect("suback");
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .unwrap();
    }

    pub async fn next(&mut self) -> (String, Value) {
        let (topic, payload) = within(10, self.rx.recv()).await.expect("raw client open");
        (
            topic,
            serde_json::from_slice(&payload).expect("JSON payload"),
        )
    }

    /// Asserts nothing arrives for `ms`.
    pub async fn nothing_for(&mut self, ms: u64) {
        if let Ok(Some((topic, _))) =
            tokio::time::timeout(Duration::from_millis(ms), self.rx.recv()).await
        {
            panic!("unexpected message on {topic}");
        }
    }
}
