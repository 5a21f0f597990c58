//! The sans-IO core of directcall: everything about a call that needs no
//! network.
//!
//! - [`topic`]: the names ([`Target`], [`Method`], [`Prefix`], [`MessageId`]),
//!   their validation, and the request and reply topics of PROTOCOL.md;
//! - [`wire`]: the JSON request and reply payloads;
//! - [`deadline`]: call budgets and the device's expiry rule;
//! - [`pending`]: the table of calls waiting for a reply, with a drop guard;
//! - [`recent`]: a bounded memory of recent ids;
//! - [`broker`]: broker address, connection settings and reconnect backoff;
//! - [`presence`]: directcall presence records and AWS IoT lifecycle events.
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

pub mod broker;
pub mod deadline;
pub mod error;
pub mod pending;
pub mod presence;
pub mod recent;
pub mod topic;
pub mod wire;

pub use broker::{AwsSigV4, Backoff, BrokerOptions, TlsOptions, Transport};
pub use deadline::Deadline;
pub use error::{Error, Field};
pub use pending::{PendingGuard, PendingTable, Unmatched};
pub use topic::{CallTopics, MessageId, Method, Prefix, PresenceRoot, Target};
pub use wire::{ReplyPayload, RequestPayload};
