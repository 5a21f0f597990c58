//! The car of `car.rs` on MQTT 5: a trace context from the caller to the
//! handler, a device whose session outlives a disconnect, and a call to a
//! car nobody serves.
//!
//! On the embedded broker (nothing installed):
//!
//! ```text
//! cargo run -p directcall-bins --example mqtt5
//! ```
//!
//! On a Mosquitto (or any MQTT 5 broker), where the call to the missing car
//! ends at once with "no device is subscribed":
//!
//! ```text
//! cargo run -p directcall-bins --example mqtt5 -- mqtt://127.0.0.1:1883
//! ```

use std::time::Duration;

use directcall_cloud::{BrokerOptions, Error, Invocation, MqttVersion, Options, Requester};
use directcall_device::{serve, DeviceOptions, Router, Target};
use directcall_testkit::EmbeddedBroker;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_embedded, broker) = match std::env::args().nth(1) {
        Some(url) => (None, BrokerOptions::from_url(&url)?),
        None => {
            let embedded = EmbeddedBroker::start(None)?;
            // rumqttd speaks version 5 on a listener of its own.
            let options = embedded.options_v5();
            (Some(embedded), options)
        }
    };
    // Both sides speak MQTT 5 with these settings.
    let broker = broker.mqtt_version(MqttVersion::V5);
    println!("broker {} (MQTT {})", broker.url(), broker.mqtt_version);

    let car = Router::new().method("windows_down", |call| async move {
        println!(
            "  handler: traceparent {:?}, answering to {:?}",
            call.traceparent, call.reply_to
        );
        Ok(json!({ "windows": "down", "percent": call.request["percent"] }))
    });
    // The broker keeps the car's subscription for a minute after a
    // disconnect; each request's Message Expiry still drops it at the
    // caller's deadline.
    let options = DeviceOptions::new(broker.clone(), Target::new("VIN123")?)
        .persistent_session(Duration::from_secs(60));
    let device = serve(car, options).await?;

    let requester = Requester::connect(Options::new(broker)).await?;
    let call = Invocation::parse("VIN123", "windows_down", json!({ "percent": 50 }))?
        .timeout(Duration::from_secs(3))
        .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    let reply = requester.invoke(call).await?;
    println!(
        "VIN123: status {} response {}",
        reply.status, reply.response
    );

    let call = Invocation::parse("VIN999", "windows_down", json!({ "percent": 50 }))?
        .timeout(Duration::from_secs(1));
    match requester.invoke(call).await {
        Err(Error::NoSubscriber { id }) => println!("VIN999: offline at once ({id})"),
        Err(Error::Timeout { elapsed, .. }) => {
            println!("VIN999: timeout after {elapsed:?} (this broker does not say \"no matching subscribers\")")
        }
        other => println!("VIN999: {other:?}"),
    }

    requester.shutdown().await;
    device.shutdown().await;
    Ok(())
}
