//! The sans-IO core of directcall: everything about a call that needs no
//! network.
//!
//! - [`topic`]: the names ([`Target`], [`Method`], [`Prefix`], [`MessageId`]),
//!   their validation, and the request and reply topics of PROTOCOL.md;
//! - [`wire`]: the JSON request and reply payloads;
//! - [`deadline`]: call budgets and the device's expiry rule;
//! - [`pending`]: the table of calls waiting for a reply, their deadlines,
//!   with a drop guard;
//! - [`recent`]: a bounded memory of recent ids;
//! - [`broker`]: broker address, connection settings and reconnect backoff;
//! - [`presence`]: directcall presence records and AWS IoT lifecycle events.
//!
//! Without features the crate does no I/O (it is what the fuzz targets and
//! the property tests exercise). Features add what both sides share:
//!
//! | feature | adds |
//! |---|---|
//! | `mqtt` | [`mqtt`]: the one connection layer of the requester and the device (rumqttc, tokio) |
//! | `tls` | `mqtts://` and `wss://` (rustls, ring) |
//! | `websocket` | `ws://` and `wss://`, with a URL signing hook ([`mqtt::UrlSigner`]) |
//!
//! ```
//! use directcall_core::{CallTopics, MessageId, Method, Prefix, Target};
//!
//! let call = CallTopics::new(
//!     Target::new("VIN123")?,
//!     Method::new("unlock")?,
//!     Prefix::default(),
//!     MessageId::new(),
//! )?;
//! assert!(call.request_topic().starts_with("VIN123/unlock/invocation_client/"));
//! assert!(Target::new("VIN123/#").is_err());
//! # Ok::<(), directcall_core::Error>(())
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod broker;
pub mod deadline;
pub mod error;
#[cfg(feature = "mqtt")]
#[cfg_attr(docsrs, doc(cfg(feature = "mqtt")))]
pub mod mqtt;
pub mod pending;
pub mod presence;
pub mod recent;
pub mod topic;
pub mod trace;
pub mod wire;

pub use broker::{BackoffJitter, BrokerOptions, Endpoint, MqttVersion, TlsOptions, Transport};
pub use error::{Error, Field};
pub use pending::{Outcome, PendingCall, PendingTable, Unmatched};
pub use topic::{
    CallTopics, Group, GroupTopics, MessageId, Method, Prefix, PresenceRoot, ReplyTopic, Target,
};
pub use wire::{Receipt, ReplyError, ReplyPayload, RequestPayload};
