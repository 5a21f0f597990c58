//! What the directcall binaries share: their configuration (broker,
//! requester and access flags, logging, metrics), the device simulator, a
//! small HTTP client, the Lambda front end (feature `lambda`) and the load tool. The libraries
//! do the work: the gateway is `directcall_cloud::gateway`.

pub mod bench;
pub mod cli;
pub mod group_cli;
pub mod http_client;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod log_thread;
pub mod reload;
pub mod sim;
