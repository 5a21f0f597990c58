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
//! use std::sync::Arc;
//! use directcall_device::{serve, BrokerOptions, DeviceOptions, HandlerError, Router, Target};
//! use serde::Deserialize;
//! use serde_json::json;
//!
//! /// The request of `windows_down`.
//! #[derive(Deserialize)]
//! struct WindowsDown {
//!     percent: u8,
//! }
//!
//! /// What the handlers share: the car's own state and handles.
//! struct Car {
//!     windows: tokio::sync::Mutex<u8>,
//! }
//!
//! # async fn run() -> Result<(), directcall_device::Error> {
//! let car = Arc::new(Car { windows: tokio::sync::Mutex::new(0) });
//! let router = Router::with_state(car)
//!     .method_with_state("windows_down", |call, car| async move {
//!         // Not a `WindowsDown`: answered 400 with serde's message.
//!         let WindowsDown { percent } = call.json()?;
//!         if percent > 100 {
//!             return Err(HandlerError::bad_request("percent must be 0-100"));
//!         }
//!         *car.windows.lock().await = percent;
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
//! # Handlers
//!
//! A handler is an async closure given the [`MethodCall`] (and, with
//! [`Router::method_with_state`], a clone of the state of
//! [`Router::with_state`]); it needs no type annotations. It returns
//! `Ok(value)` for any value that converts into JSON, answered 200, or a
//! [`HandlerError`]:
//!
//! - [`MethodCall::json`] reads the request as a type, and with `?` answers
//!   400 with serde's message when it is not one (as axum's `Json<T>`).
//! - `?` turns any `std::error::Error`, and with the `anyhow` feature any
//!   `anyhow::Error`, into a 500 with its text.
//! - [`HandlerError::bad_request`], [`HandlerError::with_status`] answer
//!   a status with a text; [`HandlerError::json`] with a JSON body.
//!
//! A type implementing [`Handler`] ([`Router::handler`]) is the other way.
//!
//! All of it at once (docs/guide.md's example; `?` on the `anyhow::Result`
//! of `lower_windows` needs the `anyhow` feature):
//!
//! ```no_run
//! # #[cfg(feature = "anyhow")]
//! # mod guide {
//! # use directcall_device::{async_trait, BrokerOptions, Handler, MethodCall};
//! # pub struct Bus;
//! # pub struct Car;
//! # impl Car {
//! #     fn open(_: &Bus) -> std::io::Result<Car> { Ok(Car) }
//! #     async fn lower_windows(&self, _: u8) -> anyhow::Result<()> { Ok(()) }
//! # }
//! # struct HornHandler;
//! # impl HornHandler { fn new(_: &Bus) -> Self { HornHandler } }
//! # #[async_trait]
//! # impl Handler for HornHandler {
//! #     async fn call(&self, _: MethodCall) -> Result<serde_json::Value, directcall_device::HandlerError> { Ok("honk".into()) }
//! # }
//! # async fn run(bus: Bus, broker: BrokerOptions) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use directcall_device::{serve, DeviceOptions, HandlerError, Router, Target};
//! use serde::Deserialize;
//! use serde_json::json;
//!
//! #[derive(Deserialize)]
//! struct WindowsDown {
//!     percent: u8,
//! }
//!
//! let car = Arc::new(Car::open(&bus)?); // the state the handlers share: yours
//! let router = Router::with_state(car)
//!     .method_with_state("windows_down", |call, car| async move {
//!         let WindowsDown { percent } = call.json()?; // not one: 400, serde's message
//!         if percent > 100 {
//!             return Err(HandlerError::bad_request("percent must be 0-100"));
//!         }
//!         car.lower_windows(percent).await?; // an anyhow::Result: its error is a 500
//!         Ok(json!({ "windows": "down", "percent": percent }))
//!     })
//!     .method("alarm_off", |_| async { Ok("alarm off") })
//!     .handler("horn", HornHandler::new(&bus)); // any type implementing `Handler`
//! let device = serve(router, DeviceOptions::new(broker, Target::new("VIN123")?)).await?;
//! # let _ = device;
//! # Ok(()) }
//! # }
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
//! | `anyhow` | no | `?` on an `anyhow::Error` in a handler: a 500 with its text |
//!
//! # Metrics
//!
//! Counters go through the [`metrics`](https://docs.rs/metrics) facade; the
//! names are the constants of [`metrics`].

#![cfg_attr(docsrs, feature(doc_cfg))]

mod call;
mod device;
mod error;
mod handler;
pub mod metrics;
mod router;

/// Re-exported so a stateful [`Handler`] can be written without naming the crate.
pub use async_trait::async_trait;
pub use call::MethodCall;
pub use device::{
    serve, start, Device, DeviceOptions, DeviceStats, DEFAULT_DEDUP_CAPACITY,
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED, DEFAULT_READY_TIMEOUT,
    DEFAULT_REPLY_QOS, DEFAULT_REQUEST_SUBSCRIPTION_QOS, RECEIPT_AFTER,
};
pub use directcall_core::mqtt::{ConnectionError, QoS, SetupError};
pub use directcall_core::{
    BrokerOptions, Field, Group, MessageId, Method, MqttVersion, Prefix, PresenceRoot, Target,
    TlsOptions, Transport,
};
pub use error::{Error, HandlerError, Unavailable};
pub use handler::{handler_fn, Handler, HandlerFn, IntoAnswer};
pub use router::{Answer, Router};
