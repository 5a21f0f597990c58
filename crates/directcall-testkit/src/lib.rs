//! The directcall test kit: real servers on free ports, bare MQTT peers and
//! small helpers, for the tests and benches of every directcall crate, and
//! the embedded broker behind `directcall demo`. Never published: a
//! published crate has no test-only feature, so this lives apart.
//!
//! Nothing here is a mock: [`TestBroker`] is the embedded rumqttd
//! ([`EmbeddedBroker`], the vendored copy with this project's fixes) or a
//! Mosquitto process started from the `mosquitto` binary on a free port
//! (never the machine's 1883), and [`Raw`] is a bare MQTT client, what a device of the AWS sample,
//! a requester of its kind or a hostile peer would be. [`NatsCluster`] and [`RedisServer`]
//! start private `nats-server` and `redis-server` processes the same way
//! (replicas, and a [`RedisSentinel`] watching them, too).
//!
//! A test that needs a program from outside (a server, a client, a
//! browser) skips in one way, [`Program::or_skip`]: loudly when it is
//! missing, and failing under `CI`. A test waits for what it can observe,
//! never for a fixed time: [`eventually`] and [`wait_for`] poll a
//! condition, [`within`] bounds an await.
//!
//! ```no_run
//! use directcall_testkit::{within, Kind, Raw, TestBroker};
//!
//! # async fn run() {
//! let broker = TestBroker::start(Kind::Mosquitto).expect("mosquitto installed");
//! let mut peer = Raw::connect(&broker.options(), "peer-1").await;
//! peer.subscribe("car/#").await;
//! peer.publish("car/unlock", "{}").await;
//! let (topic, _payload) = within(5, peer.next_raw()).await;
//! assert_eq!(topic, "car/unlock");
//! # }
//! ```

mod embedded;
mod mosquitto;
mod nats;
mod options;
mod process;
pub mod program;
mod raw;
mod raw_pair;
mod raw_puback;
mod redis;
mod relay;

use std::future::Future;
use std::time::Duration;

pub use embedded::{free_port, BrokerError, EmbeddedBroker};
pub use mosquitto::Mosquitto;
pub use nats::NatsCluster;
pub use program::{required, Program};
pub use raw::Raw;
pub use raw_pair::{Legs, RawCallError, RawPair, RawPairError};
pub use raw_puback::RawPuback;
pub use redis::{RedisSentinel, RedisServer};
pub use relay::Relay;

use directcall_core::broker::{BrokerOptions, MqttVersion};

/// Which real broker a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// The embedded rumqttd, in this process, a broker per test.
    Embedded,
    /// A Mosquitto process on a free port.
    Mosquitto,
}

/// A broker of the test's own.
#[derive(Debug)]
#[non_exhaustive]
pub struct TestBroker {
    /// Which one.
    pub kind: Kind,
    /// The Mosquitto process, when it is one (to kill, restart, read its log).
    pub mosquitto: Option<Mosquitto>,
    options: BrokerOptions,
    /// Its MQTT 3.1.1 listener, for bare peers.
    options_v311: BrokerOptions,
}

impl TestBroker {
    /// The broker, or `None` when Mosquitto is not installed and the test
    /// is skipped ([`Program::or_skip`]). Panics when it is installed but
    /// does not start, and under `CI` when it is missing.
    pub fn start(kind: Kind) -> Option<Self> {
        match kind {
            // A broker per test: one test's trouble (rumqttd closing a
            // connection over a `$` filter, say) never reaches another.
            Kind::Embedded => {
                let b = EmbeddedBroker::start(None).expect("embedded broker");
                let options = match mqtt_version() {
                    MqttVersion::V5 => b.options_v5(),
                    _ => b.options(),
                };
                Some(TestBroker {
                    kind,
                    mosquitto: None,
                    options,
                    options_v311: b.options(),
                })
            }
            Kind::Mosquitto => {
                let m = program::MOSQUITTO
                    .or_skip(Mosquitto::start("").expect("mosquitto failed to start"))?;
                Some(TestBroker {
                    kind,
                    options: {
                        let mut o = m.options();
                        o.mqtt_version = mqtt_version();
                        o
                    },
                    options_v311: m.options(),
                    mosquitto: Some(m),
                })
            }
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        self.options.url()
    }

    /// Settings for it, with fast reconnects (50 ms to 500 ms) so restart
    /// tests stay short, in the MQTT version of [`mqtt_version`].
    pub fn options(&self) -> BrokerOptions {
        fast_reconnects(self.options.clone())
    }

    /// Settings for its MQTT 3.1.1 listener, whatever [`mqtt_version`]
    /// says: for bare peers ([`Raw`]), which speak only 3.1.1.
    pub fn options_v311(&self) -> BrokerOptions {
        fast_reconnects(self.options_v311.clone())
    }

    /// Whether directcall's sides speak MQTT 5 in this run.
    pub fn is_v5(&self) -> bool {
        self.options.mqtt_version == MqttVersion::V5
    }

    /// Whether a call to a target nobody subscribes to ends at once as
    /// `NoSubscriber` in this run: MQTT 5 on Mosquitto, whose PUBACK says
    /// 0x10. rumqttd 0.20 never sends that code; on 3.1.1 there is none.
    pub fn answers_no_subscriber(&self) -> bool {
        self.is_v5() && self.kind == Kind::Mosquitto
    }

    /// A bare client subscribed to every topic that never answers: with it,
    /// a call to any target waits for its deadline on MQTT 5 too, since the
    /// broker then has a subscriber and never says "no matching
    /// subscribers". Keep it alive for as long as calls should wait.
    pub async fn black_hole(&self) -> Raw {
        let mut hole = Raw::connect(&self.options_v311(), &unique("black-hole")).await;
        hole.subscribe("#").await;
        hole
    }
}

fn fast_reconnects(mut o: BrokerOptions) -> BrokerOptions {
    o.backoff_min = Some(Duration::from_millis(50));
    o.backoff_max = Some(Duration::from_millis(500));
    o
}

/// Runs the async fn `$name(broker: TestBroker)` against both brokers, as two
/// tests `$name::embedded` and `$name::mosquitto` (the caller needs tokio's
/// `macros` and `rt-multi-thread` features).
#[macro_export]
macro_rules! both_brokers {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                if let Some(b) = $crate::TestBroker::start($crate::Kind::Embedded) {
                    super::$name(b).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                if let Some(b) = $crate::TestBroker::start($crate::Kind::Mosquitto) {
                    super::$name(b).await;
                }
            }
        }
    };
}

/// The MQTT version directcall's own sides speak in the tests:
/// `DIRECTCALL_MQTT_VERSION` (the variable the binaries read too), 3.1.1
/// when unset. CI runs the whole suite once per version; bare peers
/// ([`Raw`], the AWS sample's devices) stay 3.1.1 either way.
///
/// # Panics
/// When the variable holds something other than `3.1.1` or `5`.
pub fn mqtt_version() -> MqttVersion {
    match std::env::var("DIRECTCALL_MQTT_VERSION") {
        Ok(v) => MqttVersion::parse(&v).expect("DIRECTCALL_MQTT_VERSION is 3.1.1 or 5"),
        Err(_) => MqttVersion::V311,
    }
}

/// A name unique to this test run: `{base}-` and 8 random hex digits.
pub fn unique(base: &str) -> String {
    format!("{base}-{:08x}", fastrand::u32(..))
}

/// Bounds an await: a hung test fails instead of hanging CI.
///
/// # Panics
/// When `fut` does not finish within `secs` seconds.
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
}

/// How often [`eventually`] and [`wait_for`] look again.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `check` every 10 ms until it returns true, at most `secs` seconds.
///
/// # Panics
/// When `check` is still false after `secs` seconds.
pub async fn eventually(secs: u64, mut check: impl FnMut() -> bool) {
    within(secs, async {
        while !check() {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await;
}

/// Runs the async `probe` until it returns `Some`, 10 ms apart, at most
/// `secs` seconds; its value. For conditions only an await can see: an
/// HTTP answer, a call's outcome, a server that takes connections. What a
/// probe awaits counts towards `secs`.
///
/// ```no_run
/// use directcall_testkit::wait_for;
///
/// # async fn run() {
/// let stream = wait_for(10, "a listener on 8080", || async {
///     tokio::net::TcpStream::connect("127.0.0.1:8080").await.ok()
/// })
/// .await;
/// # drop(stream);
/// # }
/// ```
///
/// # Panics
/// When `probe` has not returned `Some` within `secs` seconds; the message
/// names `what` was awaited.
pub async fn wait_for<T, F, Fut>(secs: u64, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let polls = async {
        loop {
            if let Some(value) = probe().await {
                return value;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), polls)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {secs} s"))
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    directcall_core::deadline::unix_millis(std::time::SystemTime::now())
}
