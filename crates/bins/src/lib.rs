//! The parts the directcall binaries share: configuration (broker and
//! requester flags, logging, metrics), the HTTP mapping and the gateway
//! that `directcall serve` and `directcall-lambda` both run, the device
//! simulator, the web console, a small HTTP client, SigV4 request signing for `directcall
//! call`, and the load tool.

pub mod access;
pub mod bench;
pub mod cli;
pub mod console;
pub mod gateway;
pub mod http_client;
pub mod jwt;
pub mod lambda;
pub mod service;
pub mod sigv4;
pub mod sim;
