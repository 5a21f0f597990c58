//! `directcall-sim`: simulated devices that answer like the reference sample's
//! simulator, with latency and failure knobs, for demos and load tests.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use directcall_bins::cli::BrokerArgs;
use directcall_bins::sim::{self, SimOptions};
use directcall_core::{Group, Method, Target};

#[derive(Debug, Parser)]
#[command(
    name = "directcall-sim",
    version,
    about = "Simulated directcall devices"
)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The device's name (its MQTT client id), when --devices is 1.
    #[arg(long, env = "DIRECTCALL_SIM_CLIENT_ID", default_value = "Device001")]
    client_id: String,
    /// Number of devices, each on its own connection: ID_PREFIX001, ID_PREFIX002, ...
    #[arg(long, env = "DIRECTCALL_SIM_DEVICES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    devices: u32,
    /// Name prefix of the devices when --devices is more than 1.
    #[arg(long, env = "DIRECTCALL_SIM_ID_PREFIX", default_value = "Device")]
    id_prefix: String,
    /// Milliseconds added to every answer.
    #[arg(long, env = "DIRECTCALL_SIM_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// Up to this many more milliseconds, uniformly at random.
    #[arg(long, env = "DIRECTCALL_SIM_JITTER_MS", default_value_t = 0)]
    jitter_ms: u64,
    /// Share of calls answered with status 500, from 0.0 to 1.0.
    #[arg(long, env = "DIRECTCALL_SIM_FAIL_RATE", default_value_t = 0.0)]
    fail_rate: f64,
    /// Only these methods are known (comma-separated); others get 404 [default: every method is answered].
    #[arg(long, env = "DIRECTCALL_SIM_METHODS", value_delimiter = ',')]
    methods: Vec<String>,
    /// Publish presence: a retained online record and a last will.
    #[arg(long, env = "DIRECTCALL_SIM_PRESENCE")]
    presence: bool,
    /// A group every device joins: each answers the calls to it too, and
    /// its presence record lists it. Repeat it for several groups (the
    /// variable takes them comma-separated).
    #[arg(
        long = "group",
        value_name = "NAME",
        env = "DIRECTCALL_SIM_GROUPS",
        value_delimiter = ','
    )]
    groups: Vec<String>,
    /// Answer requests to every target, each as the target addressed: for
    /// contract tests whose targets are generated (not a real device's mode).
    #[arg(long, env = "DIRECTCALL_SIM_ANY_TARGET", conflicts_with = "presence")]
    any_target: bool,
    /// Answer with the request itself instead of the reference's sentence.
    #[arg(long, env = "DIRECTCALL_SIM_ECHO")]
    echo: bool,
    /// Handlers running at once per device.
    #[arg(long, env = "DIRECTCALL_SIM_MAX_CONCURRENT", default_value_t = directcall_device::DEFAULT_MAX_CONCURRENT)]
    max_concurrent: usize,
    /// QoS of reply publishes: 0 or 1.
    #[arg(long, env = "DIRECTCALL_SIM_REPLY_QOS", default_value_t = directcall_device::DEFAULT_REPLY_QOS.level(), value_parser = clap::value_parser!(u8).range(0..=1))]
    reply_qos: u8,
    /// QoS of the request subscription: 0 or 1.
    #[arg(long, env = "DIRECTCALL_SIM_SUBSCRIPTION_QOS", default_value_t = directcall_device::DEFAULT_REQUEST_SUBSCRIPTION_QOS.level(), value_parser = clap::value_parser!(u8).range(0..=1))]
    subscription_qos: u8,
    /// Seconds each device's first reconnect after a loss is spread over: it
    /// waits a random time from 0 to this, doubled after each failed
    /// attempt, up to --reconnect-max.
    #[arg(long, value_name = "SECONDS", env = "DIRECTCALL_SIM_RECONNECT_WINDOW", default_value_t = directcall_core::broker::DEFAULT_DEVICE_BACKOFF_MIN.as_secs_f64(), value_parser = seconds)]
    reconnect_window: f64,
    /// Longest wait between two reconnect attempts, in seconds: after a
    /// broker restart the devices come back spread over up to this long.
    #[arg(long, value_name = "SECONDS", env = "DIRECTCALL_SIM_RECONNECT_MAX", default_value_t = directcall_core::broker::DEFAULT_DEVICE_BACKOFF_MAX.as_secs_f64(), value_parser = seconds)]
    reconnect_max: f64,
}

/// A number of seconds from 0.001 to 3600.
fn seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.001..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds from 0.001 to 3600"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    directcall_bins::cli::run("directcall-sim", async move {
        match run(cli).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("directcall-sim: {e}");
                ExitCode::from(2)
            }
        }
    })
}

async fn run(cli: Cli) -> Result<(), directcall_bins::cli::BoxError> {
    if !(0.0..=1.0).contains(&cli.fail_rate) {
        return Err(format!("--fail-rate {} is not from 0.0 to 1.0", cli.fail_rate).into());
    }
    let broker = cli.broker.resolve().map_err(|e| e.to_string())?;
    let targets = if cli.devices == 1 {
        vec![Target::new(cli.client_id.as_str()).map_err(|e| format!("--client-id: {e}"))?]
    } else {
        sim::device_names(&cli.id_prefix, cli.devices as usize)
            .map_err(|e| format!("--id-prefix: {e}"))?
    };
    let methods = if cli.methods.is_empty() {
        None
    } else {
        Some(
            cli.methods
                .iter()
                .map(|m| Method::new(m.as_str()).map_err(|e| format!("--methods: {e}")))
                .collect::<Result<Vec<_>, _>>()?,
        )
    };
    let groups = cli
        .groups
        .iter()
        .map(|g| Group::new(g.as_str()).map_err(|e| format!("--group: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = SimOptions::default();
    options.latency = Duration::from_millis(cli.latency_ms);
    options.jitter = Duration::from_millis(cli.jitter_ms);
    options.fail_rate = cli.fail_rate;
    options.methods = methods;
    options.presence = cli.presence;
    options.groups = groups;
    options.any_target = cli.any_target;
    options.echo = cli.echo;
    options.max_concurrent = Some(cli.max_concurrent.max(1));
    options.reply_qos = Some(directcall_bins::cli::qos(cli.reply_qos));
    options.subscription_qos = Some(directcall_bins::cli::qos(cli.subscription_qos));
    options.reconnect_window = Some(Duration::from_secs_f64(cli.reconnect_window));
    options.reconnect_max = Some(Duration::from_secs_f64(cli.reconnect_max));
    let devices = sim::start(&broker, &targets, &options)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(devices = devices.len(), broker = %broker.options.url(), "connected");
    println!("Waiting for command ...");
    directcall_bins::cli::shutdown_signal().await;
    for device in devices {
        device.shutdown().await;
    }
    Ok(())
}
