//! The parts the directcall binaries share: the embedded broker (rumqttd)
//! behind `directcall demo` and the examples, and a harness that runs a
//! private Mosquitto for tests and benchmarks.

pub mod broker;
pub mod mosquitto;

pub use broker::{free_port, EmbeddedBroker};
pub use mosquitto::Mosquitto;
