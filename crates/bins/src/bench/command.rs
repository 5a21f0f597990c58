//! `directcall bench`: load and latency against directcall, the HTTP gateway
//! and the raw-MQTT floor, in one run.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use directcall_cloud::gateway::{self, Gateway};

use super::{Failure, LoadOptions, LoadReport};
use crate::cli::{BoxError, BrokerArgs};
use crate::http_client::Connection;
use crate::sim;
use directcall_cloud::{Invocation, Options, Prefix, Requester};
use directcall_core::mqtt;
use directcall_core::{BrokerOptions, Method, Target};
use directcall_testkit::{EmbeddedBroker, Legs, Mosquitto, NatsCluster, RawPair, RawPuback};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use serde_json::{json, Value};

/// What `directcall bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Drive the requester library directly.
    Requester,
    /// Drive an HTTP gateway over keep-alive HTTP/1.1 connections.
    Http,
    /// A bare rumqttc request/echo pair correlated by id: the floor.
    Raw,
    /// Calls to a target nobody answers: how late timeouts fire, and memory.
    Timeouts,
    /// Where the memory of a pending call goes, piece by piece (no broker).
    Memory,
    /// A gateway (a child process) holding --slow-calls HTTP/2 calls to a
    /// device that answers after --slow-latency-ms, while fast calls run
    /// beside them: its memory per waiting call, and the fast calls' latency
    /// against the same gateway before the slow calls came.
    Slow,
    /// MQTT 5 only: calls to a target nobody subscribes to, each ended by
    /// the broker's PUBACK "no matching subscribers"; its floor
    /// (--compare-raw) is a bare MQTT 5 QoS 1 publish and its PUBACK.
    NoSubscriber,
    /// Group calls to every device (--group-form), each until every device
    /// answered; its floor (--compare-raw) is bare rumqttc at QoS 0: one
    /// publish and N echoes, or N publishes.
    Group,
}

/// The flags of `directcall bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to drive.
    #[arg(long, env = "DIRECTCALL_BENCH_MODE", value_enum, default_value_t = Mode::Requester)]
    mode: Mode,
    #[command(flatten)]
    broker: BrokerArgs,
    /// Start an embedded broker in this process and use it instead of --broker.
    #[arg(long, env = "DIRECTCALL_BENCH_EMBEDDED", conflicts_with_all = ["mosquitto", "mosquitto_as_shipped"])]
    embedded: bool,
    /// Start a private Mosquitto (set_tcp_nodelay true) on a free port and use it.
    #[arg(
        long,
        env = "DIRECTCALL_BENCH_MOSQUITTO",
        conflicts_with = "mosquitto_as_shipped"
    )]
    mosquitto: bool,
    /// Start a private Mosquitto as shipped (set_tcp_nodelay false) and use it.
    #[arg(long, env = "DIRECTCALL_BENCH_MOSQUITTO_AS_SHIPPED")]
    mosquitto_as_shipped: bool,
    /// Start a private NATS cluster of this many nodes (nats-server, MQTT and
    /// JetStream) and use it: devices, gateways and the raw floor's two ends
    /// are spread over its nodes.
    #[arg(long, env = "DIRECTCALL_BENCH_NATS", conflicts_with_all = ["embedded", "mosquitto", "mosquitto_as_shipped"])]
    nats: Option<usize>,
    /// Gateway base URLs for --mode http, comma-separated; connections are
    /// spread over them in turn [default: --gateways gateways in this process].
    #[arg(long, env = "DIRECTCALL_BENCH_URL")]
    url: Option<String>,
    /// Gateways to start in this process for --mode http (gateway k on
    /// broker node k, with every node to fail over to).
    #[arg(
        long,
        env = "DIRECTCALL_BENCH_GATEWAYS",
        default_value_t = 1,
        conflicts_with = "url"
    )]
    gateways: usize,
    /// Simulated devices in this process, each on its own connection; calls are spread over them.
    #[arg(long, env = "DIRECTCALL_BENCH_DEVICES", default_value_t = 1)]
    devices: usize,
    /// Call running devices (e.g. directcall-sim --devices N) instead of starting any.
    #[arg(long, env = "DIRECTCALL_BENCH_EXTERNAL_DEVICES")]
    external_devices: bool,
    /// Name prefix of the devices: PREFIX001, PREFIX002, ...
    #[arg(long, env = "DIRECTCALL_BENCH_DEVICE_PREFIX", default_value = "Device")]
    device_prefix: String,
    /// Calls in flight at once (HTTP: concurrent connections).
    #[arg(long, env = "DIRECTCALL_BENCH_CONCURRENCY", default_value_t = 1)]
    concurrency: usize,
    /// Calls to measure [default: 10000 when --duration is not given].
    #[arg(long, env = "DIRECTCALL_BENCH_CALLS")]
    calls: Option<u64>,
    /// Seconds to run (the run stops at whichever of --calls and --duration comes first).
    #[arg(long, env = "DIRECTCALL_BENCH_DURATION")]
    duration: Option<f64>,
    /// Unmeasured calls first.
    #[arg(long, env = "DIRECTCALL_BENCH_WARMUP", default_value_t = 500)]
    warmup: u64,
    /// QoS of requests: 0 or 1 [default: 0 on MQTT 3.1.1, 1 on MQTT 5].
    #[arg(long, env = "DIRECTCALL_BENCH_QOS", value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: Option<u8>,
    /// QoS of the requester's reply subscription: 0 or 1.
    #[arg(long, env = "DIRECTCALL_BENCH_REPLY_QOS", default_value_t = directcall_cloud::DEFAULT_REPLY_QOS.level(), value_parser = clap::value_parser!(u8).range(0..=1))]
    reply_qos: u8,
    /// QoS of the simulated devices' reply publishes: 0 or 1.
    #[arg(long, env = "DIRECTCALL_BENCH_DEVICE_REPLY_QOS", default_value_t = directcall_device::DEFAULT_REPLY_QOS.level(), value_parser = clap::value_parser!(u8).range(0..=1))]
    device_reply_qos: u8,
    /// QoS of the simulated devices' request subscriptions: 0 or 1.
    #[arg(long, env = "DIRECTCALL_BENCH_DEVICE_SUBSCRIPTION_QOS", default_value_t = directcall_device::DEFAULT_REQUEST_SUBSCRIPTION_QOS.level(), value_parser = clap::value_parser!(u8).range(0..=1))]
    device_subscription_qos: u8,
    /// QoS of every leg of the raw floor: 0 (the broker's true floor), 1, or
    /// `same` (directcall's legs).
    #[arg(long, env = "DIRECTCALL_BENCH_RAW_QOS", default_value = "0", value_parser = ["0", "1", "same"])]
    raw_qos: String,
    /// Bytes of request payload.
    #[arg(long, env = "DIRECTCALL_BENCH_PAYLOAD_BYTES", default_value_t = 16)]
    payload_bytes: usize,
    /// Deadline of each call, in milliseconds.
    #[arg(long, env = "DIRECTCALL_BENCH_TIMEOUT_MS", default_value_t = 5000)]
    timeout_ms: u64,
    /// --mode slow: calls waiting at once on the slow device.
    #[arg(long, env = "DIRECTCALL_BENCH_SLOW_CALLS", default_value_t = 20_000)]
    slow_calls: usize,
    /// --mode slow: how long the slow device takes to answer, in milliseconds.
    #[arg(long, env = "DIRECTCALL_BENCH_SLOW_LATENCY_MS", default_value_t = 5000)]
    slow_latency_ms: u64,
    /// --mode slow: HTTP/2 connections carrying the slow calls.
    #[arg(long, env = "DIRECTCALL_BENCH_H2_CONNECTIONS", default_value_t = 128)]
    h2_connections: usize,
    /// Measure this many times, alternating with the floor under
    /// --compare-raw; the median round of each side is reported, and the
    /// ratios are the median of the rounds' own ratios.
    #[arg(long, env = "DIRECTCALL_BENCH_ROUNDS", default_value_t = 1)]
    rounds: usize,
    /// --mode group: how the devices are named: a list of all, a glob, or
    /// a named group (one publish).
    #[arg(long, env = "DIRECTCALL_BENCH_GROUP_FORM", value_enum, default_value_t = super::group::GroupForm::Group)]
    group_form: super::group::GroupForm,
    /// --mode group: the group the devices are members of
    /// (`directcall-sim --group NAME`).
    #[arg(long, env = "DIRECTCALL_BENCH_GROUP", default_value = "bench")]
    group: String,
    /// --mode group with --external-devices: of the --devices, this many
    /// are known to be stopped (presence says offline); the run waits for
    /// the others only.
    #[arg(long, env = "DIRECTCALL_BENCH_OFFLINE_DEVICES", default_value_t = 0)]
    offline_devices: usize,
    /// Measure the raw-MQTT floor in the same run and report ratios.
    #[arg(long, env = "DIRECTCALL_BENCH_COMPARE_RAW")]
    compare_raw: bool,
    /// One JSON object on stdout instead of text.
    #[arg(long, env = "DIRECTCALL_BENCH_JSON")]
    json: bool,
    /// Serve the HTTP floor (the bare HTTP→MQTT bridge of `--mode http
    /// --compare-raw`) on the broker until interrupted, printing its URL,
    /// so that it can be loaded and profiled in a process of its own
    /// (`benches/gateway-budget.sh --floor`).
    #[arg(long, env = "DIRECTCALL_BENCH_SERVE_FLOOR")]
    serve_floor: bool,
    /// Keep a record of every call (in memory, default retention), as the
    /// gateway does by default.
    #[arg(long, env = "DIRECTCALL_BENCH_RECORDS")]
    records: bool,
    /// --mode http: the in-process gateway as `directcall serve` runs it by
    /// default: call records kept (--records), the web console's live log
    /// and tally (--console), and the Prometheus recorder counting every
    /// call. The audit line is written in any case (to stderr, at info).
    /// Presence stays off and the per-target bound unlimited, as the HTTP
    /// floor has neither.
    #[arg(long, env = "DIRECTCALL_BENCH_AS_SERVED")]
    as_served: bool,
    /// Share records through a private Redis this run starts on a free port
    /// (implies --records).
    #[arg(long, env = "DIRECTCALL_BENCH_REDIS")]
    redis: bool,
    /// Ask devices for delivery receipts.
    #[arg(long, env = "DIRECTCALL_BENCH_DELIVERY_RECEIPTS")]
    delivery_receipts: bool,
    /// The private Redis's URL, once started.
    #[arg(skip)]
    store: Option<String>,
    /// --mode http: the gateways in this process serve HTTPS with this
    /// certificate (PEM), needs --tls-key and --tls-ca.
    #[arg(long, env = "DIRECTCALL_BENCH_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// --mode http: a header sent with every call, `Name: value`
    /// (repeatable), e.g. `Authorization: Bearer …` for a gateway with
    /// credentials.
    #[arg(
        long = "http-header",
        env = "DIRECTCALL_BENCH_HTTP_HEADERS",
        value_delimiter = '\n'
    )]
    http_headers: Vec<String>,
    /// --mode http: the key of --tls-cert.
    #[arg(long, env = "DIRECTCALL_BENCH_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// --mode http: the CA the HTTP client trusts (for --tls-cert, or an
    /// external --url https://).
    #[arg(long, env = "DIRECTCALL_BENCH_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// --mode http: the in-process gateway keeps the web console's live
    /// log and per-second tally, as `directcall serve` does by default.
    #[arg(long, env = "DIRECTCALL_BENCH_CONSOLE")]
    console: bool,
    /// --mode http: this many open consoles: readers of each gateway's
    /// event stream (`/v1/events`, plain HTTP), every byte read and dropped.
    #[arg(long, env = "DIRECTCALL_BENCH_CONSOLE_READERS", default_value_t = 0)]
    console_readers: usize,
}

impl BenchArgs {
    /// directcall's legs as the flags set them.
    fn legs(&self) -> Legs {
        let q = crate::cli::qos;
        let v5 = self.mqtt_version() == directcall_core::MqttVersion::V5;
        let mut legs = Legs::uniform(q(self.qos.unwrap_or(u8::from(v5))));
        legs.request_subscription = q(self.device_subscription_qos);
        legs.reply = q(self.device_reply_qos);
        legs.reply_subscription = q(self.reply_qos);
        legs
    }

    /// The MQTT version directcall's side speaks (the floor speaks 3.1.1).
    fn mqtt_version(&self) -> directcall_core::MqttVersion {
        directcall_core::MqttVersion::parse(&self.broker.mqtt_version).unwrap_or_default()
    }

    /// The raw floor's legs.
    fn raw_legs(&self) -> Legs {
        match self.raw_qos.as_str() {
            "same" => self.legs(),
            "1" => Legs::uniform(mqtt::QoS::AtLeastOnce),
            _ => Legs::ALL_QOS_0,
        }
    }
}

fn legs_json(legs: Legs) -> Value {
    json!({
        "request": legs.request.level(),
        "request_subscription": legs.request_subscription.level(),
        "reply": legs.reply.level(),
        "reply_subscription": legs.reply_subscription.level(),
    })
}

fn legs_text(legs: Legs) -> String {
    format!(
        "request {}/{} reply {}/{}",
        legs.request.level(),
        legs.request_subscription.level(),
        legs.reply.level(),
        legs.reply_subscription.level()
    )
}

/// Runs `directcall bench` to the end, printing its figures.
///
/// # Errors
/// A broker, gateway or device that cannot be started or reached.
pub async fn bench(mut args: BenchArgs) -> Result<(), BoxError> {
    args.records |= args.as_served;
    let _redis = if args.redis {
        let redis = directcall_testkit::RedisServer::start()
            .map_err(|e| format!("redis-server: {e}"))?
            .ok_or("--redis needs redis-server (apt-get install -y redis-server)")?;
        args.store = Some(redis.url());
        Some(redis)
    } else {
        None
    };
    let nodes = nodes(&args).await?;
    let (broker, broker_label) = (nodes.node(0), nodes.label.clone());
    if args.serve_floor {
        let bridge = super::bridge::start(&broker).await?;
        println!("{}", bridge.base);
        tokio::signal::ctrl_c().await?;
        return Ok(());
    }
    let calls = match (args.calls, args.duration) {
        (None, None) => Some(10_000),
        (c, _) => c,
    };
    let load = LoadOptions::new(
        args.concurrency.max(1),
        calls,
        args.duration.map(Duration::from_secs_f64),
        args.warmup,
    );
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let payload = "x".repeat(args.payload_bytes);
    let qos = args.legs();

    if args.mode == Mode::Memory {
        return memory(&args, calls.unwrap_or(100_000));
    }

    if args.mode == Mode::Slow {
        let fast = LoadOptions::new(
            args.concurrency.max(1),
            Some(args.calls.unwrap_or(2000)),
            None,
            args.warmup,
        );
        return slow(&args, &nodes, &fast).await;
    }

    if args.mode == Mode::Group {
        return group(&args, &nodes, calls.unwrap_or(5), timeout, &payload).await;
    }

    if args.mode == Mode::Timeouts {
        return timeouts(
            &args,
            &broker,
            &broker_label,
            calls.unwrap_or(10_000),
            timeout,
        )
        .await;
    }

    // Devices for the directcall modes.
    let targets = sim::device_names(&args.device_prefix, args.devices.max(1))
        .map_err(|e| format!("--device-prefix: {e}"))?;
    let mut devices = Vec::new();
    if args.mode == Mode::NoSubscriber && args.mqtt_version() != directcall_core::MqttVersion::V5 {
        return Err(
            "--mode no-subscriber needs --mqtt-version 5 (3.1.1 has no PUBACK reason codes)".into(),
        );
    }
    if !matches!(args.mode, Mode::Raw | Mode::NoSubscriber) && !args.external_devices {
        // Device i on node i: spread over a cluster as a fleet would be.
        let echo = sim::SimOptions {
            echo: true,
            reply_qos: Some(qos.reply),
            subscription_qos: Some(qos.request_subscription),
            ..Default::default()
        };
        for (i, target) in targets.iter().enumerate() {
            devices.extend(
                sim::start(&nodes.node(i).into(), std::slice::from_ref(target), &echo)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
    }

    // Rounds alternate directcall and the floor, so that a machine whose
    // speed drifts during the run weighs on both alike.
    let mut rounds = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let report = measure(&args, &nodes, &load, &targets, &payload, timeout).await?;
        let raw_report = if args.compare_raw && args.mode == Mode::NoSubscriber {
            Some(raw_puback(&nodes.node(0), &load, payload.clone(), timeout, args.json).await?)
        } else if args.compare_raw && args.mode == Mode::Http {
            Some(http_floor(&args, &nodes, &load, &targets, &payload, timeout).await?)
        } else if args.compare_raw && args.mode != Mode::Raw {
            Some(
                raw(
                    &nodes,
                    &load,
                    args.raw_legs(),
                    payload.clone(),
                    timeout,
                    args.json,
                )
                .await?,
            )
        } else {
            None
        };
        rounds.push((report, raw_report));
    }
    for d in devices {
        d.shutdown().await;
    }
    print(&args, &broker_label, &rounds);
    Ok(())
}

/// One measured run of `args.mode`.
async fn measure(
    args: &BenchArgs,
    nodes: &Nodes,
    load: &LoadOptions,
    targets: &[Target],
    payload: &str,
    timeout: Duration,
) -> Result<LoadReport, BoxError> {
    let qos = args.legs();
    Ok(match args.mode {
        Mode::Raw => {
            raw(
                nodes,
                load,
                args.raw_legs(),
                payload.to_owned(),
                timeout,
                args.json,
            )
            .await?
        }
        Mode::Requester => {
            let requester = requester(&nodes.node(0), qos, load.concurrency, args).await?;
            let targets = Arc::new(targets.to_vec());
            let method = Method::new("bench").map_err(|e| e.to_string())?;
            let payload = Value::String(payload.to_owned());
            let progress = progress_bar(load, args.json);
            let r = requester.clone();
            let report = super::run("requester", load, progress, move |n| {
                let call = Invocation::new(
                    targets[n as usize % targets.len()].clone(),
                    method.clone(),
                    payload.clone(),
                )
                .timeout(timeout);
                let r = r.clone();
                async move {
                    match r.invoke(call).await {
                        Ok(reply) if reply.status == 200 => Ok(()),
                        Ok(reply) => Err(Failure(format!("status_{}", reply.status))),
                        Err(e) => Err(Failure(error_kind(&e))),
                    }
                }
            })
            .await;
            requester.shutdown().await;
            report
        }
        Mode::Http => http(args, nodes, load, qos, targets, payload, timeout).await?,
        Mode::NoSubscriber => {
            let requester = requester(&nodes.node(0), qos, load.concurrency, args).await?;
            let (target, method) = (
                Target::new("NoSuchDevice").map_err(|e| e.to_string())?,
                Method::new("bench").map_err(|e| e.to_string())?,
            );
            let payload = Value::String(payload.to_owned());
            let progress = progress_bar(load, args.json);
            let r = requester.clone();
            let report = super::run("no-subscriber", load, progress, move |_| {
                let call = Invocation::new(target.clone(), method.clone(), payload.clone())
                    .timeout(timeout);
                let r = r.clone();
                async move {
                    match r.invoke(call).await {
                        Err(directcall_cloud::Error::NoSubscriber { .. }) => Ok(()),
                        Ok(reply) => Err(Failure(format!("status_{}", reply.status))),
                        Err(e) => Err(Failure(error_kind(&e))),
                    }
                }
            })
            .await;
            requester.shutdown().await;
            report
        }
        Mode::Timeouts | Mode::Memory | Mode::Slow | Mode::Group => unreachable!("handled before"),
    })
}

/// The broker nodes to use, and what keeps the ones the bench started alive.
struct Nodes {
    /// Settings per node; node k lists every node, starting with k.
    per_node: Vec<BrokerOptions>,
    label: String,
    _mosquitto: Option<Mosquitto>,
    _nats: Option<NatsCluster>,
}

impl Nodes {
    /// Node `i` (round robin).
    fn node(&self, i: usize) -> BrokerOptions {
        self.per_node[i % self.per_node.len()].clone()
    }

    fn single(options: BrokerOptions, label: String, mosquitto: Option<Mosquitto>) -> Self {
        // A list given with --broker: node k starts at endpoint k.
        let n = options.endpoints.len();
        let per_node = (0..n)
            .map(|k| {
                let mut o = options.clone();
                o.endpoints.rotate_left(k);
                o
            })
            .collect();
        Nodes {
            per_node,
            label,
            _mosquitto: mosquitto,
            _nats: None,
        }
    }
}

async fn nodes(args: &BenchArgs) -> Result<Nodes, BoxError> {
    let version = directcall_core::MqttVersion::parse(&args.broker.mqtt_version)
        .map_err(|e| format!("--mqtt-version: {e}"))?;
    let mut nodes = started_nodes(args).await?;
    for node in &mut nodes.per_node {
        node.mqtt_version = version;
    }
    if version == directcall_core::MqttVersion::V5 {
        nodes.label.push_str(", MQTT 5");
    }
    Ok(nodes)
}

async fn started_nodes(args: &BenchArgs) -> Result<Nodes, BoxError> {
    if args.embedded {
        if args.mqtt_version() == directcall_core::MqttVersion::V5 {
            // rumqttd serves MQTT 5 on a port of its own, and the floor
            // speaks 3.1.1: one node cannot carry both here.
            return Err(
                "--embedded runs on MQTT 3.1.1 only; use --mosquitto for --mqtt-version 5".into(),
            );
        }
        let b = EmbeddedBroker::start(None).map_err(|e| e.to_string())?;
        // rumqttd runs until the process exits.
        return Ok(Nodes::single(
            b.options(),
            "embedded rumqttd (TCP_NODELAY patch)".into(),
            None,
        ));
    }
    if args.mosquitto || args.mosquitto_as_shipped {
        let nodelay = args.mosquitto;
        let m = Mosquitto::start_with(nodelay, "")
            .map_err(|e| e.to_string())?
            .ok_or("--mosquitto needs the mosquitto binary (apt-get install -y mosquitto)")?;
        let label = format!("private Mosquitto, set_tcp_nodelay {nodelay}");
        return Ok(Nodes::single(m.options(), label, Some(m)));
    }
    if let Some(n) = args.nats {
        let cluster = NatsCluster::start(n.max(1))
            .map_err(|e| e.to_string())?
            .ok_or("--nats needs the nats-server binary (apt-get install -y nats-server)")?;
        if !cluster.wait_ready(Duration::from_secs(30)).await {
            return Err("the NATS cluster never took subscriptions".into());
        }
        let per_node = (0..cluster.len())
            .map(|k| cluster.options_from(k))
            .collect();
        return Ok(Nodes {
            per_node,
            label: format!("private NATS cluster, {} nodes", cluster.len()),
            _mosquitto: None,
            _nats: Some(cluster),
        });
    }
    let options = args.broker.resolve().map_err(|e| e.to_string())?.options;
    let label = options.url();
    Ok(Nodes::single(options, label, None))
}

async fn requester(
    broker: &BrokerOptions,
    qos: Legs,
    concurrency: usize,
    args: &BenchArgs,
) -> Result<Requester, BoxError> {
    let prefix = Prefix::new(format!("bench-{:06x}", fastrand::u32(..) & 0xff_ffff))
        .map_err(|e| e.to_string())?;
    let mut options = Options::new(broker.clone())
        .prefix(prefix)
        .max_in_flight(concurrency.max(16_384))
        .delivery_receipts(args.delivery_receipts);
    if args.records {
        options = options.record_calls(directcall_cloud::RecordOptions::default());
    }
    if let Some(url) = &args.store {
        options = options.redis_store(url.clone());
    }
    // The library's own default unless --qos says (on MQTT 5 it is 1 but
    // to targets that answered lately, as a user's requester does).
    if args.qos.is_some() {
        options = options.request_qos(qos.request);
    }
    options = options.reply_qos(qos.reply_subscription);
    Ok(Requester::connect(options).await?)
}

fn error_kind(e: &directcall_cloud::Error) -> String {
    match e {
        directcall_cloud::Error::Timeout { .. } => "timeout".into(),
        directcall_cloud::Error::Unavailable { .. } => "unavailable".into(),
        directcall_cloud::Error::Offline { .. } => "offline".into(),
        directcall_cloud::Error::NoSubscriber { .. } => "no_subscriber".into(),
        directcall_cloud::Error::Refused { code, .. } => format!("refused_{code:#04x}"),
        directcall_cloud::Error::Invalid { .. } => "invalid".into(),
        directcall_cloud::Error::PayloadTooLarge { .. } => "payload_too_large".into(),
        _ => "closed".into(),
    }
}

fn progress_bar(load: &LoadOptions, json: bool) -> Option<indicatif::ProgressBar> {
    if json || !std::io::stdout().is_terminal() {
        return None;
    }
    let bar = match load.calls {
        Some(n) if load.duration.is_none() => indicatif::ProgressBar::new(n),
        _ => indicatif::ProgressBar::new_spinner(),
    };
    Some(bar)
}

async fn raw(
    nodes: &Nodes,
    load: &LoadOptions,
    legs: Legs,
    payload: String,
    timeout: Duration,
    json: bool,
) -> Result<LoadReport, BoxError> {
    // On a cluster the echoing end sits on another node than the
    // requesting end, as a device and a gateway would.
    let pair = Arc::new(
        RawPair::start_between(&nodes.node(0), &nodes.node(1), legs)
            .await
            .map_err(|e| e.to_string())?,
    );
    let payload = Arc::new(payload.into_bytes());
    let progress = progress_bar(load, json);
    Ok(super::run("raw", load, progress, move |_| {
        let (pair, payload) = (Arc::clone(&pair), Arc::clone(&payload));
        async move { Ok(pair.call(&payload, timeout).await?) }
    })
    .await)
}

/// The floor of `--mode no-subscriber`: a bare MQTT 5 QoS 1 publish to a
/// topic nobody subscribes to, and its PUBACK.
async fn raw_puback(
    broker: &BrokerOptions,
    load: &LoadOptions,
    payload: String,
    timeout: Duration,
    json: bool,
) -> Result<LoadReport, BoxError> {
    let publisher = Arc::new(RawPuback::start(broker).await.map_err(|e| e.to_string())?);
    let payload = Arc::new(payload.into_bytes());
    let progress = progress_bar(load, json);
    Ok(super::run("raw puback", load, progress, move |_| {
        let (publisher, payload) = (Arc::clone(&publisher), Arc::clone(&payload));
        async move {
            match publisher.call(&payload, timeout).await? {
                0x10 => Ok(()),
                code => Err(Failure(format!("puback_{code:#04x}"))),
            }
        }
    })
    .await)
}

async fn http(
    args: &BenchArgs,
    nodes: &Nodes,
    load: &LoadOptions,
    qos: Legs,
    targets: &[Target],
    payload: &str,
    timeout: Duration,
) -> Result<LoadReport, BoxError> {
    // External gateways, or gateways in this process on free ports
    // (gateway k on node k).
    let mut stops = Vec::new();
    let bases: Vec<String> = match &args.url {
        Some(urls) => urls
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect(),
        None => {
            let mut bases = Vec::new();
            for k in 0..args.gateways.max(1) {
                let requester = requester(&nodes.node(k), qos, load.concurrency, args).await?;
                let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                    .await
                    .map_err(|e| e.to_string())?;
                let addr = listener.local_addr().map_err(|e| e.to_string())?;
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let mut gateway = Gateway::new(requester).console(args.console || args.as_served);
                if args.as_served {
                    crate::cli::metrics_handle();
                    gateway = gateway.metrics(crate::cli::render_metrics);
                }
                let app = gateway.app();
                let stopped = async move {
                    let _ = stop_rx.await;
                };
                match server_tls(args)? {
                    Some(tls) => {
                        tokio::spawn(gateway::serve_tls(listener, app, tls, stopped));
                        bases.push(format!("https://localhost:{}", addr.port()));
                    }
                    None => {
                        tokio::spawn(gateway::serve(listener, app, stopped));
                        bases.push(format!("http://{addr}"));
                    }
                }
                stops.push(stop_tx);
            }
            bases
        }
    };
    let paths = invoke_paths(targets, payload, timeout);
    let progress = progress_bar(load, args.json);
    let headers = args
        .http_headers
        .iter()
        .map(|h| match h.split_once(':') {
            Some((n, v)) => Ok((n.trim().to_owned(), v.trim().to_owned())),
            None => Err(format!("--http-header {h}: give `Name: value`")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut readers = Vec::new();
    for base in &bases {
        for _ in 0..args.console_readers {
            readers.push(tokio::spawn(read_events(base.clone(), headers.clone())));
        }
    }
    let report = http_load(
        "http",
        &bases,
        paths,
        load,
        progress,
        &client_tls(args)?,
        headers,
    )
    .await;
    for r in readers {
        r.abort();
    }
    drop(stops);
    report
}

/// The `GET /invoke` of each target, as both sides of `--mode http` call
/// them (whole seconds, 1 to 60).
fn invoke_paths(targets: &[Target], payload: &str, timeout: Duration) -> Vec<String> {
    let secs = timeout.as_secs().clamp(1, 60);
    targets
        .iter()
        .map(|t| format!("/invoke?request={payload}&method=bench&target={t}&timeout={secs}"))
        .collect()
}

/// The floor of `--mode http`: the same load, the same paths, against a
/// bare HTTP→MQTT bridge in this process (`bench::bridge`) on node 0.
async fn http_floor(
    args: &BenchArgs,
    nodes: &Nodes,
    load: &LoadOptions,
    targets: &[Target],
    payload: &str,
    timeout: Duration,
) -> Result<LoadReport, BoxError> {
    let bridge = super::bridge::start(&nodes.node(0)).await?;
    let paths = invoke_paths(targets, payload, timeout);
    let report = http_load(
        "http-floor",
        std::slice::from_ref(&bridge.base),
        paths,
        load,
        progress_bar(load, args.json),
        &directcall_core::TlsOptions::default(),
        Vec::new(),
    )
    .await;
    drop(bridge);
    report
}

/// An open console: reads `base`'s event stream and drops it, until aborted.
async fn read_events(base: String, headers: Vec<(String, String)>) {
    use http_body_util::BodyExt;
    let stream = match Connection::open(&base).await {
        Ok(mut c) => c.get_streaming("/v1/events", &headers).await,
        Err(e) => Err(e),
    };
    match stream {
        Ok(response) => {
            let mut body = response.into_body();
            while let Some(Ok(_)) = body.frame().await {}
        }
        Err(e) => tracing::warn!("--console-readers: {base}: {e}"),
    }
}

/// The gateways' TLS, from --tls-cert and --tls-key.
fn server_tls(args: &BenchArgs) -> Result<Option<gateway::ServerTls>, BoxError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    gateway::ServerTls::from_pem(&read(cert)?, &read(key)?, None)
        .map(Some)
        .map_err(Into::into)
}

/// What the HTTP client trusts: --tls-ca, else the platform's roots.
fn client_tls(args: &BenchArgs) -> Result<directcall_core::TlsOptions, BoxError> {
    let mut tls = directcall_core::TlsOptions::default();
    if let Some(ca) = &args.tls_ca {
        tls.ca_pem = Some(std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?);
    }
    Ok(tls)
}

/// Closed-loop GETs of `paths` (in turn) over `load.concurrency` keep-alive
/// HTTP/1.1 connections, spread over `bases` in turn; a call succeeds when
/// the gateway answers 200 with the device's status 200.
async fn http_load(
    mode: &str,
    bases: &[String],
    paths: Vec<String>,
    load: &LoadOptions,
    progress: Option<indicatif::ProgressBar>,
    tls: &directcall_core::TlsOptions,
    headers: Vec<(String, String)>,
) -> Result<LoadReport, BoxError> {
    let headers = Arc::new(headers);
    let mut connections = Vec::new();
    for i in 0..load.concurrency {
        let base = &bases[i % bases.len()];
        connections.push(
            Connection::open_with(base, tls)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    // A plain mutex: held for a pop or a push, never across an await.
    let pool = Arc::new(std::sync::Mutex::new(connections));
    let paths = Arc::new(paths);
    Ok(super::run(mode, load, progress, move |n| {
        let (pool, paths, headers) = (Arc::clone(&pool), Arc::clone(&paths), Arc::clone(&headers));
        async move {
            let taken = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut conn = taken.ok_or(Failure::from("no connection"))?;
            let result = conn.get(&paths[n as usize % paths.len()], &headers).await;
            pool.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
            match result {
                Ok(r) if r.status == 200 && r.body.contains("\"status\":200") => Ok(()),
                Ok(r) => Err(Failure(format!("http_{}", r.status))),
                Err(_) => Err(Failure::from("connection")),
            }
        }
    })
    .await)
}

/// A gateway in a child process (`directcall serve`), killed on drop.
struct ChildGateway {
    child: std::process::Child,
    base: String,
}

impl ChildGateway {
    async fn start(
        broker: &BrokerOptions,
        args: &BenchArgs,
        max_in_flight: usize,
    ) -> Result<Self, BoxError> {
        let port = directcall_testkit::free_port().map_err(|e| e.to_string())?;
        let urls: Vec<String> = broker.endpoints.iter().map(|e| e.url()).collect();
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = std::process::Command::new(exe)
            .args(["serve", "--broker", &urls.join(","), "--presence", "off"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--max-in-flight", &max_in_flight.to_string()])
            // Thousands of calls to one slow device, on purpose.
            .args(["--max-in-flight-per-target", "0"])
            .args(["--qos", &args.legs().request.level().to_string()])
            .args(["--mqtt-version", args.mqtt_version().as_str()])
            .args(["--reply-qos", &args.reply_qos.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the gateway: {e}"))?;
        let gateway = ChildGateway {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let health = crate::http_client::get(&format!("{}/healthz", gateway.base), &[]).await;
            if health.is_ok_and(|r| r.status == 200) {
                return Ok(gateway);
            }
            if Instant::now() > until {
                return Err("the gateway was not healthy within 15 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn rss_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/statm", self.child.id()))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * 4096)
    }

    /// The gateway's own count of calls waiting for a reply.
    async fn pending(&self) -> Option<u64> {
        let metrics = crate::http_client::get(&format!("{}/metrics", self.base), &[])
            .await
            .ok()?;
        metrics.body.lines().find_map(|line| {
            let value = line.strip_prefix(directcall_cloud::metrics::PENDING_CALLS)?;
            value.trim().parse::<f64>().ok().map(|v| v as u64)
        })
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--mode slow`: see [`Mode::Slow`].
async fn slow(args: &BenchArgs, nodes: &Nodes, fast: &LoadOptions) -> Result<(), BoxError> {
    let n = args.slow_calls.max(1);
    let latency = Duration::from_millis(args.slow_latency_ms.max(1));
    let qos = args.legs();
    let echo = sim::SimOptions {
        echo: true,
        reply_qos: Some(qos.reply),
        subscription_qos: Some(qos.request_subscription),
        ..Default::default()
    };
    let fast_target = Target::new("Fast001").map_err(|e| e.to_string())?;
    let slow_target = Target::new("Slow001").map_err(|e| e.to_string())?;
    let mut slow_options = echo.clone();
    slow_options.latency = latency;
    slow_options.max_concurrent = Some(n + 64);
    let broker = nodes.node(0);
    let mut devices = sim::start(
        &broker.clone().into(),
        std::slice::from_ref(&fast_target),
        &echo,
    )
    .await
    .map_err(|e| e.to_string())?;
    devices.extend(
        sim::start(
            &nodes.node(1).into(),
            std::slice::from_ref(&slow_target),
            &slow_options,
        )
        .await
        .map_err(|e| e.to_string())?,
    );
    let gateway = ChildGateway::start(&broker, args, n + 1024).await?;
    let bases = vec![gateway.base.clone()];
    let fast_paths = vec![format!(
        "/invoke?request=fast&method=bench&target={fast_target}&timeout=10"
    )];

    // 1. The fast calls alone.
    let unloaded = http_load(
        "alone",
        &bases,
        fast_paths.clone(),
        fast,
        None,
        &Default::default(),
        Vec::new(),
    )
    .await?;
    let rss_idle = gateway.rss_bytes();

    // 2. The slow calls, sent at once over HTTP/2.
    let slow_timeout = (latency.as_secs() * 2 + 5).clamp(1, 60);
    let mut h2 = Vec::new();
    for _ in 0..args.h2_connections.max(1) {
        h2.push(
            super::h2::Multiplexed::open(&gateway.base)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let sent_at = Instant::now();
    let mut slow_tasks = Vec::new();
    for (k, conn) in h2.iter().enumerate() {
        let share = n / h2.len() + usize::from(k < n % h2.len());
        let (conn, target) = (conn.clone(), slow_target.clone());
        slow_tasks.push(tokio::spawn(async move {
            let calls: FuturesUnordered<_> = (0..share)
                .map(|i| {
                    let conn = conn.clone();
                    let path = format!(
                        "/invoke?request=s{k}-{i}&method=slow&target={target}&timeout={slow_timeout}"
                    );
                    async move { conn.get(&path).await.map(|r| r.status).unwrap_or(0) }
                })
                .collect();
            calls.collect::<Vec<u16>>().await
        }));
    }
    // Wait until the gateway holds them all.
    let mut waiting = 0;
    while sent_at.elapsed() < latency {
        waiting = gateway.pending().await.unwrap_or(0);
        if waiting >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp = sent_at.elapsed();
    if waiting < n as u64 {
        return Err(format!(
            "only {waiting} of {n} slow calls were waiting before the first could be answered ({} ms); \
             give a longer --slow-latency-ms",
            latency.as_millis()
        )
        .into());
    }
    let rss_loaded = gateway.rss_bytes();

    // 3. The fast calls again, before the first slow call is answered.
    let window = latency.saturating_sub(sent_at.elapsed() + Duration::from_millis(200));
    let mut beside = fast.clone();
    beside.warmup = 0;
    beside.duration = Some(window);
    let loaded = http_load(
        "beside",
        &bases,
        fast_paths,
        &beside,
        None,
        &Default::default(),
        Vec::new(),
    )
    .await?;
    let waiting_after = gateway.pending().await.unwrap_or(0);
    let measured_by = sent_at.elapsed();

    let mut slow_status = std::collections::BTreeMap::<u16, u64>::new();
    for t in slow_tasks {
        for status in t.await.unwrap_or_default() {
            *slow_status.entry(status).or_default() += 1;
        }
    }
    drop(gateway);
    for d in devices {
        d.shutdown().await;
    }

    let per_call = rss_loaded.saturating_sub(rss_idle) as f64 / n as f64;
    let (p50_a, p99_a) = (unloaded.latency_us[0], unloaded.latency_us[2]);
    let (p50_b, p99_b) = (loaded.latency_us[0], loaded.latency_us[2]);
    let out = json!({
        "mode": "slow",
        "broker": nodes.label,
        "slow_calls": n,
        "slow_latency_ms": latency.as_millis() as u64,
        "h2_connections": h2.len(),
        "ramp_ms": ramp.as_millis() as u64,
        "waiting_before_fast": waiting,
        "waiting_after_fast": waiting_after,
        "fast_measured_by_ms": measured_by.as_millis() as u64,
        "slow_status": slow_status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
        "gateway_rss_idle_mb": rss_idle as f64 / 1e6,
        "gateway_rss_loaded_mb": rss_loaded as f64 / 1e6,
        "gateway_bytes_per_waiting_call": per_call.round(),
        "fast_alone": unloaded.to_json(),
        "fast_beside": loaded.to_json(),
        "ratio_fast_p50": ratio(p50_b as f64, p50_a as f64),
        "ratio_fast_p99": ratio(p99_b as f64, p99_a as f64),
    });
    if args.json {
        println!("{out}");
    } else {
        println!("broker     {}", nodes.label);
        println!(
            "slow       {n} calls over {} HTTP/2 connections, answered after {} ms; all waiting {} ms after the first was sent",
            h2.len(),
            latency.as_millis(),
            ramp.as_millis()
        );
        println!("           statuses {slow_status:?}; waiting before/after the fast calls {waiting}/{waiting_after}");
        println!(
            "gateway    RSS {:.1} MB idle, {:.1} MB with the slow calls waiting: {per_call:.0} B per waiting call",
            rss_idle as f64 / 1e6,
            rss_loaded as f64 / 1e6
        );
        print!("{}", unloaded.to_text());
        print!("{}", loaded.to_text());
        println!(
            "ratio      fast p50 {:.3} × alone   fast p99 {:.3} × alone",
            ratio(p50_b as f64, p50_a as f64),
            ratio(p99_b as f64, p99_a as f64)
        );
    }
    Ok(())
}

/// `--mode memory`: the resident memory of `n` of each piece of a pending
/// call, measured alone (RSS growth over `n`), and the sizes of the fixed
/// parts.
fn memory(args: &BenchArgs, n: u64) -> Result<(), BoxError> {
    use directcall_core::{CallTopics, MessageId, PendingTable, Prefix, ReplyPayload};
    use std::collections::BTreeSet;
    let n = n.max(1);
    let per = |before: u64| (super::rss_bytes().saturating_sub(before)) as f64 / n as f64;
    let target = Target::new("nobody-answers").map_err(|e| e.to_string())?;
    let method = Method::new("bench").map_err(|e| e.to_string())?;
    let topics: Vec<CallTopics> = (0..n)
        .map(|_| {
            CallTopics::new(
                target.clone(),
                method.clone(),
                Prefix::default(),
                MessageId::new(),
            )
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let at = std::time::Instant::now() + Duration::from_secs(60);
    // The table: slot (hash map) and deadline (B-tree) of each call.
    let table = PendingTable::<Box<ReplyPayload>>::default();
    let before = super::rss_bytes();
    let held: Vec<_> = topics.iter().map(|t| table.insert(t, at).0).collect();
    let table_and_handles = per(before);
    let handle = std::mem::size_of_val(&held[0]) as f64;
    // The deadline index alone (a second one, beside the table's).
    let before = super::rss_bytes();
    let index: BTreeSet<(std::time::Instant, MessageId)> =
        topics.iter().map(|t| (at, t.id())).collect();
    let deadline = per(before);
    // A future of the call's size, driven by FuturesUnordered as the
    // timeouts mode drives calls.
    // One byte less than `Invoke`: the async block's own state byte makes
    // up the rest.
    const PAD: usize = std::mem::size_of::<directcall_cloud::Invoke>() - 1;
    let sized = || {
        let pad = [0u8; PAD];
        async move {
            std::future::pending::<()>().await;
            std::hint::black_box(pad);
        }
    };
    let padded = std::mem::size_of_val(&sized());
    let before = super::rss_bytes();
    let driven: FuturesUnordered<_> = (0..n).map(|_| sized()).collect();
    let future_in_set = per(before);
    // Everything stays alive until here, so no step reuses another's memory.
    drop((held, index, driven));
    let invoke = std::mem::size_of::<directcall_cloud::Invoke>();
    let out = json!({
        "mode": "memory",
        "calls": n,
        "invoke_future_bytes": invoke,
        "table_slot_and_deadline_bytes": (table_and_handles - handle).round(),
        "of_which_deadline_index_bytes": deadline.round(),
        "future_of_that_size_in_futures_unordered_bytes": future_in_set.round(),
        "sized_like": padded,
    });
    if args.json {
        println!("{out}");
    } else {
        println!("per pending call, {n} of each, measured alone (RSS growth / {n}):");
        println!("  the call's future (Invoke, size_of)          {invoke} B");
        println!(
            "  a future of {padded} B in FuturesUnordered      {:.0} B",
            future_in_set
        );
        println!(
            "  table slot + deadline (hash map, B-tree)     {:.0} B",
            table_and_handles - handle
        );
        println!("    of which the deadline B-tree               {deadline:.0} B");
    }
    Ok(())
}

/// `--mode timeouts`: `calls` calls at once to a target nobody answers.
async fn timeouts(
    args: &BenchArgs,
    broker: &BrokerOptions,
    label: &str,
    calls: u64,
    timeout: Duration,
) -> Result<(), BoxError> {
    let requester = requester(broker, args.legs(), calls as usize, args).await?;
    let target = Target::new("nobody-answers").map_err(|e| e.to_string())?;
    let method = Method::new("bench").map_err(|e| e.to_string())?;
    let rss_before = super::rss_bytes();
    let started = Instant::now();
    // The calls are driven in chunks of 1000 in FuturesUnordered rather than
    // one task each, so the figure is the requester's memory, not tokio's.
    let mut tasks = Vec::new();
    let mut queued_peak = 0;
    let mut left = calls;
    while left > 0 {
        let chunk = left.min(1000);
        left -= chunk;
        // `invoke` does its work when called and returns the waiting future
        // itself: nothing else is kept per call.
        let calls: FuturesUnordered<_> = (0..chunk)
            .map(|_| {
                let call =
                    Invocation::new(target.clone(), method.clone(), json!("x")).timeout(timeout);
                requester.invoke(call).map(|result| match result {
                    Err(directcall_cloud::Error::Timeout { elapsed, .. }) => Ok(elapsed),
                    Err(e) => Err(error_kind(&e)),
                    Ok(_) => Err("answered".to_owned()),
                })
            })
            .collect();
        tasks.push(tokio::spawn(calls.collect::<Vec<_>>()));
        // Paced launch: the calls pile up as pending, not as requests
        // queued in the MQTT client faster than the connection writes
        // them. The next chunk goes once the queue holds at most one chunk.
        tokio::time::sleep(Duration::from_millis(2)).await;
        loop {
            let s = requester.stats();
            let queued = s.published.saturating_sub(s.written);
            queued_peak = queued_peak.max(queued);
            if queued <= 1000 || started.elapsed() >= timeout / 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let all_pending_after = started.elapsed();
    let mut peak_pending = 0;
    let mut rss_peak = super::rss_bytes();
    while started.elapsed() < timeout.saturating_sub(Duration::from_millis(100)) {
        peak_pending = peak_pending.max(requester.stats().pending);
        rss_peak = rss_peak.max(super::rss_bytes());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lateness = Vec::with_capacity(calls as usize);
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    for t in tasks {
        for outcome in t.await.unwrap_or_default() {
            match outcome {
                Ok(elapsed) => lateness.push(elapsed.saturating_sub(timeout).as_micros() as u64),
                Err(kind) => *errors.entry(kind).or_default() += 1,
            }
        }
    }
    let stats = requester.stats();
    requester.shutdown().await;
    let fired = lateness.len();
    let [p50, p90, p99, p999, max] = super::percentiles(&mut lateness);
    let growth_mb = (rss_peak.saturating_sub(rss_before)) as f64 / 1e6;
    let out = json!({
        "mode": "timeouts",
        "broker": label,
        "calls": calls,
        "timeout_ms": timeout.as_millis() as u64,
        "timeouts_fired": fired,
        "errors": errors,
        "peak_pending": peak_pending,
        "pending_after": stats.pending,
        "launch_ms": all_pending_after.as_millis() as u64,
        "queued_peak": queued_peak,
        "lateness_p50_us": p50,
        "lateness_p90_us": p90,
        "lateness_p99_us": p99,
        "lateness_p999_us": p999,
        "lateness_max_us": max,
        "rss_before_mb": rss_before as f64 / 1e6,
        "rss_peak_mb": rss_peak as f64 / 1e6,
        "rss_growth_mb": growth_mb,
    });
    if args.json {
        println!("{out}");
    } else {
        println!("broker     {label}");
        println!(
            "timeouts   {fired} of {calls} fired ({} pending at peak, {} after); errors {errors:?}",
            peak_pending, stats.pending
        );
        println!("lateness µs  p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}");
        println!(
            "launch     {} ms, at most {queued_peak} requests queued in the MQTT client",
            all_pending_after.as_millis()
        );
        println!(
            "RSS        {:.1} MB before, {:.1} MB at peak: +{growth_mb:.1} MB",
            rss_before as f64 / 1e6,
            rss_peak as f64 / 1e6
        );
    }
    Ok(())
}

/// The median of `values` (the upper one of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The report with the median calls/s.
fn median_report(reports: &[&LoadReport]) -> LoadReport {
    let mut sorted = reports.to_vec();
    sorted.sort_by(|a, b| a.calls_per_s().total_cmp(&b.calls_per_s()));
    sorted[sorted.len() / 2].clone()
}

fn print(args: &BenchArgs, label: &str, rounds: &[(LoadReport, Option<LoadReport>)]) {
    let report = median_report(&rounds.iter().map(|(r, _)| r).collect::<Vec<_>>());
    let raws: Vec<&LoadReport> = rounds.iter().filter_map(|(_, raw)| raw.as_ref()).collect();
    let raw = (!raws.is_empty()).then(|| median_report(&raws));
    // Ratios are taken round by round (each against the floor measured
    // right after it), then their median.
    let ratios = |f: fn(&LoadReport) -> f64| {
        median(
            rounds
                .iter()
                .filter_map(|(r, raw)| raw.as_ref().map(|raw| ratio(f(r), f(raw))))
                .collect(),
        )
    };
    let ratio_p50 = ratios(|r| r.latency_us[0] as f64);
    let ratio_calls = ratios(LoadReport::calls_per_s);
    if args.json {
        let mut out = report.to_json();
        out["broker"] = json!(label);
        out["qos"] = legs_json(args.legs());
        if args.mode == Mode::Http && raw.is_some() {
            out["floor"] = json!("bridge");
        } else if raw.is_some() || args.mode == Mode::Raw {
            out["raw_qos"] = legs_json(args.raw_legs());
        }
        out["payload_bytes"] = json!(args.payload_bytes);
        out["records"] = json!(match (&args.store, args.records) {
            (Some(_), _) => "redis",
            (None, true) => "memory",
            (None, false) => "off",
        });
        out["delivery_receipts"] = json!(args.delivery_receipts);
        if args.mode == Mode::Http {
            out["as_served"] = json!(args.as_served);
        }
        if let Some(raw) = &raw {
            out["raw"] = raw.to_json();
            out["ratio_p50"] = json!(ratio_p50);
            out["ratio_calls_per_s"] = json!(ratio_calls);
        }
        if rounds.len() > 1 {
            out["rounds"] = rounds
                .iter()
                .map(|(r, raw)| {
                    let mut round =
                        json!({"calls_per_s": r.calls_per_s().round(), "p50_us": r.latency_us[0]});
                    if let Some(raw) = raw {
                        round["raw_calls_per_s"] = json!(raw.calls_per_s().round());
                        round["raw_p50_us"] = json!(raw.latency_us[0]);
                    }
                    round
                })
                .collect();
        }
        println!("{out}");
        return;
    }
    if args.mode == Mode::Http && raw.is_some() {
        println!(
            "broker     {label}  ({} payload bytes)\nqos        directcall {}   floor a bare HTTP→MQTT bridge (hyper, rumqttc, every leg QoS 0)",
            args.payload_bytes,
            legs_text(args.legs()),
        );
    } else if args.mode == Mode::NoSubscriber {
        println!(
            "broker     {label}  ({} payload bytes)\nqos        directcall request 1, ended by its PUBACK   raw floor a QoS 1 publish and its PUBACK",
            args.payload_bytes
        );
    } else {
        println!(
            "broker     {label}  ({} payload bytes)\nqos        directcall {}   raw floor {}",
            args.payload_bytes,
            legs_text(args.legs()),
            legs_text(args.raw_legs())
        );
    }
    if args.records || args.store.is_some() || args.delivery_receipts {
        println!(
            "records    {}{}",
            if args.store.is_some() {
                "shared through a private Redis"
            } else {
                "in memory"
            },
            if args.delivery_receipts {
                ", delivery receipts asked"
            } else {
                ""
            }
        );
    }
    if rounds.len() > 1 {
        println!(
            "rounds     {} (the median round of each side below)",
            rounds.len()
        );
    }
    print!("{}", report.to_text());
    if let Some(raw) = &raw {
        print!("{}", raw.to_text());
        println!("ratio      p50 {ratio_p50:.3} × floor   calls/s {ratio_calls:.3} × floor");
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        (a / b * 1000.0).round() / 1000.0
    }
}

/// `--mode group`: `calls` group calls to every device per round, and the
/// floor's fan-out after each round under --compare-raw.
async fn group(
    args: &BenchArgs,
    nodes: &Nodes,
    calls: u64,
    timeout: Duration,
    payload: &str,
) -> Result<(), BoxError> {
    use super::group::{self as g, Fanout};
    let n = args.devices.max(1);
    let targets =
        sim::device_names(&args.device_prefix, n).map_err(|e| format!("--device-prefix: {e}"))?;
    let group =
        directcall_core::Group::new(args.group.clone()).map_err(|e| format!("--group: {e}"))?;
    let mut devices = Vec::new();
    if !args.external_devices {
        let options = sim::SimOptions {
            echo: true,
            presence: true,
            groups: vec![group.clone()],
            ..Default::default()
        };
        devices = sim::start(&nodes.node(0).into(), &targets, &options)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut requester_options = Options::new(nodes.node(0))
        .prefix(
            Prefix::new(format!("bench-{:06x}", fastrand::u32(..) & 0xff_ffff))
                .map_err(|e| e.to_string())?,
        )
        .presence(directcall_core::PresenceRoot::default());
    if args.records {
        requester_options =
            requester_options.record_calls(directcall_cloud::RecordOptions::default());
    }
    let requester = Requester::connect(requester_options).await?;
    // Presence knows every device (their members too) before the first call.
    let known = tokio::time::Instant::now() + Duration::from_secs(60);
    while requester.devices().iter().filter(|d| d.online).count()
        < n.saturating_sub(args.offline_devices)
    {
        if tokio::time::Instant::now() > known {
            return Err(format!(
                "presence knows {} of the {n} devices online after 60 s (are they started with --presence?)",
                requester.devices().iter().filter(|d| d.online).count()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut raw = if args.compare_raw {
        Some(g::RawFanout::connect(&nodes.node(0)).await?)
    } else {
        None
    };
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    let mut rss_per_result = Vec::new();
    // One unmeasured call each, to warm the connections up.
    let _ = g::directcall(
        &requester,
        g::invocation(
            args.group_form,
            &group,
            &args.device_prefix,
            &targets,
            payload,
            timeout,
        )?,
    )
    .await?;
    if let Some(raw) = &mut raw {
        raw.call(args.group_form, &group, &targets, payload, timeout)
            .await?;
    }
    for _ in 0..args.rounds.max(1) {
        for _ in 0..calls.max(1) {
            let before = super::rss_bytes();
            let call = g::invocation(
                args.group_form,
                &group,
                &args.device_prefix,
                &targets,
                payload,
                timeout,
            )?;
            let (f, results) = g::directcall(&requester, call).await?;
            // The results are all held here: what they cost.
            let after = super::rss_bytes();
            rss_per_result.push(after.saturating_sub(before) as f64 / results.len().max(1) as f64);
            drop(results);
            ours.push(f);
        }
        if let Some(raw) = &mut raw {
            for _ in 0..calls.max(1) {
                floor.push(
                    raw.call(args.group_form, &group, &targets, payload, timeout)
                        .await?,
                );
            }
        }
    }
    requester.shutdown().await;
    for d in devices {
        d.shutdown().await;
    }
    let mine = g::median(&ours);
    let raw_median = (!floor.is_empty()).then(|| g::median(&floor));
    rss_per_result.sort_by(f64::total_cmp);
    let rss = rss_per_result
        .get(rss_per_result.len() / 2)
        .copied()
        .unwrap_or(0.0);
    let ratio =
        raw_median.map(|r: Fanout| mine.last.as_secs_f64() / r.last.as_secs_f64().max(1e-9));
    if args.json {
        println!(
            "{}",
            json!({
                "mode": "group",
                "form": format!("{:?}", args.group_form).to_lowercase(),
                "devices": n,
                "calls": ours.len(),
                "directcall": g::fanout_json(&mine),
                "raw": raw_median.as_ref().map(g::fanout_json),
                "ratio_last": ratio,
                "rss_bytes_per_result": rss,
            })
        );
    } else {
        println!(
            "group calls ({:?}) to {n} devices, {} calls: median first result {:.1} ms, all results {:.1} ms, {} answered, {} offline",
            args.group_form,
            ours.len(),
            mine.first.as_secs_f64() * 1e3,
            mine.last.as_secs_f64() * 1e3,
            mine.answered,
            mine.offline
        );
        if let (Some(r), Some(ratio)) = (raw_median, ratio) {
            println!(
                "raw floor (QoS 0): first {:.1} ms, all {:.1} ms, {} answered; directcall / floor = {ratio:.2}",
                r.first.as_secs_f64() * 1e3,
                r.last.as_secs_f64() * 1e3,
                r.answered
            );
        }
        println!("RSS growth per result held: {rss:.0} B (median)");
    }
    Ok(())
}
