//! A car that lowers its windows on request, and a cloud service calling it.
//!
//! Everything runs in this one process, on an embedded broker, so it needs
//! nothing installed:
//!
//! ```text
//! cargo run -p directcall-bins --example car
//! ```

use std::time::Duration;

use directcall_cloud::{Invocation, Options, Requester};
use directcall_device::{serve, DeviceOptions, HandlerError, Router, Target};
use directcall_testkit::EmbeddedBroker;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = EmbeddedBroker::start(None)?;
    println!("embedded broker on {}", broker.url());

    // The device side: a car with two methods.
    let car = Router::new()
        .method("windows_down", |call| async move {
            let percent = call.request["percent"].as_u64().unwrap_or(100);
            if percent > 100 {
                return Err(HandlerError::bad_request("percent must be 0-100"));
            }
            Ok(json!({ "windows": "down", "percent": percent }))
        })
        .method("alarm_off", |_| async { Ok("alarm off") });
    let device = serve(
        car,
        DeviceOptions::new(broker.options(), Target::new("VIN123")?),
    )
    .await?;

    // The cloud side: one requester, any number of calls.
    let requester = Requester::connect(Options::new(broker.options())).await?;
    for (method, request) in [
        ("windows_down", json!({ "percent": 50 })),
        ("alarm_off", json!(null)),
        ("windows_down", json!({ "percent": 150 })),
        ("open_sunroof", json!(null)),
    ] {
        let call = Invocation::parse("VIN123", method, request)?.timeout(Duration::from_secs(3));
        match requester.invoke(call).await {
            Ok(reply) => println!(
                "{method}: status {} response {} in {} µs",
                reply.status,
                reply.response,
                reply.elapsed.as_micros()
            ),
            Err(e) => println!("{method}: {e}"),
        }
    }

    requester.shutdown().await;
    device.shutdown().await;
    Ok(())
}
