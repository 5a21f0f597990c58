//! The end-to-end tests of directcall-bins, one module per area, built as
//! one test binary: each test binary links the whole dependency graph, and
//! this one replaces seventeen.
//!
//! Everything here shares one process. A test that changes process-wide
//! state (the global `metrics` recorder, environment variables, the
//! process's memory as the soak test measures it) must stay correct beside
//! the others; the modules say where that matters.
//!
//! Run one area with a filter: `cargo test -p directcall-bins --test it
//! fleet::`.

mod common;
mod e2e;

mod access;
mod binaries;
mod calls;
mod console;
mod deploy;
mod embed;
mod faults;
mod fleet;
mod groups;
mod hostile;
mod https;
mod idempotency;
mod jwt;
mod lambda;
mod lifecycle;
mod mqtt5;
mod network;
mod presence;
mod python_device;
mod records;
mod reload;
mod replies;
mod restart;
mod secrets;
mod security;
mod silent;
mod store;
