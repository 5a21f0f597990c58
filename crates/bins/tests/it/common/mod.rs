//! Shared helpers of the end-to-end tests: the testkit's real brokers and
//! peers, plus requesters and devices wired the way every test wants them.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::time::Duration;

pub mod pki;

pub use directcall_testkit::{eventually, now_ms, unique, wait_for, within, Kind, Raw, TestBroker};

use directcall_cloud::{Invocation, Options, Prefix, Requester};
use directcall_core::Target;
use directcall_device::{serve, Device, DeviceOptions, Router};
use serde_json::{json, Value};

/// One call of `method` on `target` with `request`, `timeout_ms` long.
pub fn call(target: &str, method: &str, request: Value, timeout_ms: u64) -> Invocation {
    Invocation::parse(target, method, request)
        .unwrap()
        .timeout(Duration::from_millis(timeout_ms))
}

/// A requester with its own prefix, so parallel tests never see each other's replies.
pub async fn requester(b: &TestBroker) -> Requester {
    requester_with(b, |o| o).await
}

pub async fn requester_with(
    b: &TestBroker,
    configure: impl FnOnce(Options) -> Options,
) -> Requester {
    let prefix = Prefix::new(unique("test")).unwrap();
    let options = configure(Options::new(b.options()).prefix(prefix));
    within(15, Requester::connect(options))
        .await
        .expect("requester connects")
}

/// The example car: `windows_down` and `alarm_off`.
pub fn car_router() -> Router {
    Router::new()
        .method("windows_down", |call| async move {
            Ok(json!({"windows": "down", "device": call.target.as_str(), "asked": call.request}))
        })
        .method("alarm_off", |_| async { Ok("alarm off") })
}

pub async fn device(b: &TestBroker, target: &str, router: Router) -> Device {
    device_with(b, target, router, |o| o).await
}

pub async fn device_with(
    b: &TestBroker,
    target: &str,
    router: Router,
    configure: impl FnOnce(DeviceOptions) -> DeviceOptions,
) -> Device {
    let options = configure(DeviceOptions::new(
        b.options(),
        Target::new(target).unwrap(),
    ));
    within(15, serve(router, options))
        .await
        .expect("device connects")
}
