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
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let requester = Requester::connect(Options::new(BrokerOptions::new("127.0.0.1", 1883))).await?;
//! let call = Invocation::parse("VIN123", "unlock", "now")?.timeout(Duration::from_secs(3));
//! let reply = requester.invoke(call).await?;
//! println!("{} {}", reply.status, reply.response);
//! # Ok(()) }
//! ```

#[doc(hidden)]
pub mod connection;
mod error;
mod options;
mod requester;
pub mod service;
pub mod sigv4;

pub use directcall_core::{
    BrokerOptions, Field, MessageId, Method, Prefix, PresenceRoot, Target, TlsOptions, Transport,
};
pub use error::Error;
pub use options::{
    Options, PresenceSource, RequestQos, DEFAULT_MAX_IN_FLIGHT, DEFAULT_READY_TIMEOUT,
    DEFAULT_TIMEOUT,
};
pub use requester::{Invocation, Reply, Requester, Stats};
