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
//! use directcall_device::{serve, BrokerOptions, DeviceOptions, HandlerError, MethodCall, Router, Target};
//! use serde_json::json;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let router = Router::new().method("windows_down", |call: MethodCall| async move {
//!     Ok::<_, HandlerError>(json!({ "windows": "down", "asked": call.request }))
//! });
//! let options = DeviceOptions::new(BrokerOptions::new("127.0.0.1", 1883), Target::new("VIN123")?);
//! let device = serve(router, options).await?;
//! // ... answers calls until:
//! device.shutdown().await;
//! # Ok(()) }
//! ```

mod device;
mod handler;

/// Re-exported so a stateful [`Handler`] can be written without naming the crate.
pub use async_trait::async_trait;
pub use device::{
    serve, Device, DeviceOptions, DeviceStats, Error, DEFAULT_DEDUP_CAPACITY,
    DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED,
};
pub use directcall_core::{BrokerOptions, MessageId, Method, Prefix, PresenceRoot, Target};
pub use handler::{Handler, HandlerError, MethodCall, Router};
