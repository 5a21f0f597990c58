//! The parts the directcall binaries share: broker flags and logging, the
//! HTTP gateway, the Lambda front end, the device simulator, a small HTTP client, the embedded
//! broker (rumqttd) behind `directcall demo` and the examples, and a harness
//! that runs a private Mosquitto for tests and benchmarks.

pub mod bench;
pub mod broker;
pub mod cli;
pub mod gateway;
pub mod http_client;
pub mod lambda;
pub mod mosquitto;
pub mod sim;

pub use broker::{free_port, EmbeddedBroker};
pub use mosquitto::Mosquitto;
