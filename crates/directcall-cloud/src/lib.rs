//! The directcall requester: call a method on an MQTT device and get its
//! answer, or a clear failure, as if it were a function call.
//!
//! One [`Requester`] keeps one long-lived MQTT connection with one
//! subscription (`{prefix}/+/+/+/ack`) and carries any number of concurrent
//! calls over it. Each call publishes one request on
//! `{target}/{method}/{prefix}/{id}` and waits for the reply with that id,
//! never past its deadline.
//!
//! ```no_run
//! use std::time::Duration;
//! use directcall_cloud::{BrokerOptions, Invocation, Options, Requester};
//!
//! # async fn run() -> Result<(), directcall_cloud::Error> {
//! let requester = Requester::connect(Options::new(BrokerOptions::from_url("mqtt://127.0.0.1:1883")?)).await?;
//! let call = Invocation::parse("VIN123", "unlock", "now")?.timeout(Duration::from_secs(3));
//! let reply = requester.invoke(call).await?;
//! println!("{} {}", reply.status, reply.response);
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `tls` | yes | `mqtts://` and `wss://` brokers |
//! | `websocket` | no | `ws://` and `wss://`, [`Options::url_signer`] |
//! | `sigv4` | no | [`sigv4::AwsSigV4`]: AWS IoT Core over `wss://` with SigV4 |
//! | `redis` | no | [`Options::redis_store`]: call records and idempotency keys shared through Redis |
//! | `gateway` | no | [`gateway`]: the HTTP API (axum routes to mount, or the whole app) |
//! | `console` | no | [`gateway::Gateway::console`]: the web console (implies `gateway`) |
//!
//! # Metrics
//!
//! Counters and gauges go through the [`metrics`](https://docs.rs/metrics)
//! facade, to whatever exporter the process installs (install it before
//! starting a requester); their names are the constants of [`metrics`].

#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod fanout;
#[cfg(feature = "gateway")]
#[cfg_attr(docsrs, doc(cfg(feature = "gateway")))]
pub mod gateway;
mod group;
mod invocation;
mod invoke;
mod keyed;
mod keys;
pub mod metrics;
mod options;
mod presence;
mod records;
mod reply;
mod requester;
mod session;
#[cfg(feature = "sigv4")]
pub mod sigv4;
mod store;
pub use store::STORE_KEY_PREFIX;

pub use directcall_core::mqtt::{ConnectionError, PublishError, QoS, SetupError};
pub use directcall_core::{
    BrokerOptions, Field, MessageId, Method, MqttVersion, Prefix, PresenceRoot, Target, TlsOptions,
    Transport,
};
pub use error::{Error, Unavailable};
pub use group::{
    DeviceOutcome, DeviceResult, GroupCall, GroupInvocation, GroupOutcome, GroupSummary, Targets,
    DEFAULT_GROUP_IN_FLIGHT, MAX_GLOB_CHARS,
};
pub use invocation::Invocation;
pub use invoke::Invoke;
pub use keys::MAX_IDEMPOTENCY_KEY_BYTES;
pub use options::{
    Options, DEFAULT_MAX_IN_FLIGHT, DEFAULT_READY_TIMEOUT, DEFAULT_REPLY_QOS, DEFAULT_TIMEOUT,
};
pub use presence::DeviceState;
pub use records::{CallRecord, CallState, RecordOptions, SHUT_DOWN_REASON};
pub use reply::Reply;
pub use requester::Requester;
pub use session::{PresenceState, Stats};
