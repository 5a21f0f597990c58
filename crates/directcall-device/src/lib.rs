//! The directcall device side: answer synchronous calls from the cloud with
//! async method handlers.
//!
//! A device subscribes once to `{target}/#`, runs the handler named by each
//! request's method, and publishes the answer on the request's ack topic with
//! a `status`: 200 with the handler's value, the handler's error status (500
//! by default), 404 at once for a method it does not know. A request past its
//! deadline is neither run nor answered; one delivered twice runs once.
//!
//! ```no_run
//! use directcall_device::{serve, BrokerOptions, DeviceOptions, HandlerError, Router, Target};
//! use serde_json::json;
//!
//! # async fn run() -> Result<(), directcall_device::Error> {
//! let router = Router::new()
//!     .method("windows_down", |call| async move {
//!         let percent = call.request["percent"].as_u64().unwrap_or(100);
//!         if percent > 100 {
//!             return Err(HandlerError::bad_request("percent must be 0-100"));
//!         }
//!         Ok(json!({ "windows": "down", "percent": percent }))
//!     })
//!     .method("alarm_off", |_| async { Ok("alarm off") });
//! let broker = BrokerOptions::from_url("mqtt://127.0.0.1:1883")?;
//! let device = serve(router, DeviceOptions::new(broker, Target::new("VIN123")?)).await?;
//! // ... answers calls until:
//! device.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! [`serve`] waits for the broker; [`start`] returns at once and keeps
//! trying in the background, for firmware that boots before its network.
//! [`Router::call`] runs a handler as the device would, with no broker, for
//! unit tests.
//!
//! # Features
//!
//! Only `directcall-device` goes in a device's `Cargo.toml`; it re-exports
//! what an mTLS or WebSocket device needs ([`BrokerOptions`],
//! [`TlsOptions`], [`Transport`]).
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `tls` | no | `mqtts://` (mutual TLS with a device certificate) |
//! | `websocket` | no | `ws://`, and `wss://` with `tls` |
//!
//! # Metrics
//!
//! Counters go through the [`metrics`](https://docs.rs/metrics) facade; the
//! names are the constants of [`metrics`].

mod device;
mod error;
mod handler;
pub mod metrics;

/// Re-exported so a stateful [`Handler`] can be written without naming the crate.
pub use async_trait::async_trait;
pub use device::{
    serve, start, Device, DeviceOptions, DeviceStats, DEFAULT_DEDUP_CAPACITY,
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED, DEFAULT_READY_TIMEOUT,
    DEFAULT_REPLY_QOS, DEFAULT_REQUEST_SUBSCRIPTION_QOS,
};
pub use directcall_core::mqtt::{ConnectionError, QoS, SetupError};
pub use directcall_core::{
    BrokerOptions, Field, MessageId, Method, MqttVersion, Prefix, PresenceRoot, Target, TlsOptions,
    Transport,
};
pub use error::{Error, Unavailable};
pub use handler::{
    handler_fn, Answer, Handler, HandlerError, HandlerFn, IntoAnswer, MethodCall, Router,
};
