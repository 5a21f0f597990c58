//! One request to many devices: a list, a glob over the devices presence
//! knows, and a named group (one publish), each device's result as it
//! comes, then the counts.
//!
//! Everything runs in this one process, on an embedded broker:
//!
//! ```text
//! cargo run -p directcall-bins --example group_call
//! ```

use std::time::Duration;

use directcall_cloud::{DeviceOutcome, GroupInvocation, Options, Requester};
use directcall_device::{serve, DeviceOptions, Group, PresenceRoot, Router, Target};
use directcall_testkit::EmbeddedBroker;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = EmbeddedBroker::start(None)?;

    // Five kiosks in the lobby, each publishing its presence (which lists
    // its groups).
    let mut kiosks = Vec::new();
    for i in 1..=5 {
        let name = format!("Kiosk-{i}");
        let router = Router::new().method("reboot", move |_| async move { Ok("rebooting") });
        let options = DeviceOptions::new(broker.options(), Target::new(name)?)
            .presence(PresenceRoot::default())
            .group(Group::new("lobby")?);
        kiosks.push(serve(router, options).await?);
    }

    let requester =
        Requester::connect(Options::new(broker.options()).presence(PresenceRoot::default()))
            .await?;
    // Presence learns of the kiosks from their retained records.
    while requester.devices().len() < 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for call in [
        GroupInvocation::targets(["Kiosk-1", "Kiosk-2", "Kiosk-9"], "reboot", "now")?,
        GroupInvocation::matching("Kiosk-*", "reboot", "now")?.online_only(true),
        GroupInvocation::group("lobby", "reboot", "now")?,
    ] {
        let call = call.timeout(Duration::from_secs(2));
        println!("{:?}", call.get_targets());
        let mut results = requester.invoke_group(call).await?;
        while let Some(r) = results.next().await {
            match r.outcome {
                DeviceOutcome::Ok => println!(
                    "  {}: {} in {:?}",
                    r.target,
                    r.response.unwrap_or_default(),
                    r.latency.unwrap_or_default()
                ),
                other => println!(
                    "  {}: {other:?} ({})",
                    r.target,
                    r.reason.unwrap_or_default()
                ),
            }
        }
        let s = results.summary();
        println!("  {} ok of {} in {} ms", s.ok, s.total, s.elapsed_ms);
    }

    requester.shutdown().await;
    for k in kiosks {
        k.shutdown().await;
    }
    Ok(())
}
