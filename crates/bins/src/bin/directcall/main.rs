//! `directcall`: the HTTP gateway, one-off calls over MQTT or HTTP, a
//! self-contained demo, and the load tool.

mod bench;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use directcall_bins::cli::BrokerArgs;
use directcall_bins::{gateway, http_client, sim, EmbeddedBroker};
use directcall_cloud::service::{HttpReply, InvokeService, Limits};
use directcall_cloud::{Options, Prefix, PresenceRoot, RequestQos, Requester};
use directcall_core::Target;

#[derive(Debug, Parser)]
#[command(
    name = "directcall",
    version,
    about = "Synchronous calls to MQTT devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP gateway.
    Serve(ServeArgs),
    /// Make one call over MQTT and print the JSON the gateway would answer.
    ///
    /// Exit codes: 0 the device answered with a 2xx status, 2 invalid input,
    /// 3 timeout, 4 target offline, 5 broker unavailable, 6 the device
    /// answered with another status.
    Invoke(InvokeArgs),
    /// Make one GET over HTTP(S) and print the status and body.
    ///
    /// Exit codes: 0 for a 2xx answer, 1 for any other HTTP status, 5 when
    /// the request could not be made.
    Call(CallArgs),
    /// Run an embedded broker, the gateway and a simulated Device001 in one
    /// process, and print a curl command to try.
    Demo(DemoArgs),
    /// Measure calls/s and latency of the requester, the HTTP gateway or the
    /// raw-MQTT floor (bounded by --calls and/or --duration).
    Bench(bench::BenchArgs),
}

#[derive(Debug, Args)]
struct RequesterArgs {
    /// Topic prefix replies come back under.
    #[arg(long, env = "DIRECTCALL_PREFIX", default_value = "invocation_client")]
    prefix: String,
    /// MQTT client id [default: <prefix>-<12 random hex digits>, unique per process].
    #[arg(long, env = "DIRECTCALL_CLIENT_ID")]
    client_id: Option<String>,
    /// QoS of request publishes: 0 (never queued) or 1.
    #[arg(long, env = "DIRECTCALL_QOS", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
}

impl RequesterArgs {
    fn options(&self, broker: &BrokerArgs) -> Result<Options, String> {
        let prefix = Prefix::new(self.prefix.as_str()).map_err(|e| format!("--prefix: {e}"))?;
        let mut options = Options::new(broker.options()?).prefix(prefix);
        if let Some(id) = &self.client_id {
            options = options.client_id(id.clone());
        }
        if self.qos == 1 {
            options = options.qos(RequestQos::AtLeastOnce);
        }
        Ok(options)
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    requester: RequesterArgs,
    /// Address the HTTP gateway listens on.
    #[arg(long, env = "DIRECTCALL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Timeout of a call that names none, in seconds.
    #[arg(long, env = "DIRECTCALL_DEFAULT_TIMEOUT", default_value_t = 10)]
    default_timeout: u64,
    /// Longest timeout a caller may ask for, in seconds; more is refused with 400.
    #[arg(long, env = "DIRECTCALL_MAX_TIMEOUT", default_value_t = 60)]
    max_timeout: u64,
    /// API tokens (comma-separated); when set, calls need `Authorization: Bearer <token>`.
    #[arg(
        long = "api-token",
        env = "DIRECTCALL_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_tokens: Vec<String>,
    /// Presence topic root: calls to a target whose last record is offline fail at once with 404.
    #[arg(
        long,
        env = "DIRECTCALL_PRESENCE_ROOT",
        default_value = "directcall/presence"
    )]
    presence_root: String,
    /// Do not track presence.
    #[arg(long, env = "DIRECTCALL_NO_PRESENCE")]
    no_presence: bool,
}

#[derive(Debug, Args)]
struct InvokeArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    requester: RequesterArgs,
    /// The device.
    #[arg(long, env = "DIRECTCALL_TARGET")]
    target: String,
    /// The method to run.
    #[arg(long, env = "DIRECTCALL_METHOD")]
    method: String,
    /// The request value, sent as a JSON string.
    #[arg(long, env = "DIRECTCALL_REQUEST", default_value = "")]
    request: String,
    /// Seconds to wait for the reply (1-60).
    #[arg(long, env = "DIRECTCALL_TIMEOUT", default_value = "10")]
    timeout: String,
}

#[derive(Debug, Args)]
struct CallArgs {
    /// The URL, e.g. 'http://127.0.0.1:8080/invoke?request=r&method=m&target=Device001&timeout=3'.
    url: String,
    /// API token, sent as `Authorization: Bearer <token>`.
    #[arg(long, env = "DIRECTCALL_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Extra header, `Name: value` (repeatable).
    #[arg(
        short = 'H',
        long = "header",
        env = "DIRECTCALL_HEADERS",
        value_delimiter = '\n'
    )]
    headers: Vec<String>,
    /// Sign the request with SigV4 for API Gateway's IAM auth (service
    /// execute-api), with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    /// AWS_SESSION_TOKEN from the environment.
    #[arg(long, env = "DIRECTCALL_SIGV4")]
    sigv4: bool,
    /// Region for --sigv4 [default: AWS_REGION, else the region in an
    /// *.execute-api.<region>.amazonaws.com host].
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Address the gateway listens on.
    #[arg(long, env = "DIRECTCALL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Port of the embedded broker on 127.0.0.1 [default: a free port].
    #[arg(long, env = "DIRECTCALL_DEMO_BROKER_PORT")]
    broker_port: Option<u16>,
    /// Name of the simulated device.
    #[arg(long, env = "DIRECTCALL_DEMO_DEVICE", default_value = "Device001")]
    device: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    directcall_bins::cli::run("directcall", async move {
        let result = match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Invoke(args) => return invoke(args).await,
            Command::Call(args) => return call(args).await,
            Command::Demo(args) => demo(args).await,
            Command::Bench(args) => bench::bench(args).await,
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("directcall: {e}");
                ExitCode::from(2)
            }
        }
    })
}

fn limits(default_timeout: u64, max_timeout: u64) -> Result<Limits, String> {
    if default_timeout == 0 || max_timeout == 0 || default_timeout > max_timeout {
        return Err(format!(
            "--default-timeout ({default_timeout}) must be from 1 to --max-timeout ({max_timeout})"
        ));
    }
    Ok(Limits {
        default_timeout: Duration::from_secs(default_timeout),
        max_timeout: Duration::from_secs(max_timeout),
    })
}

async fn run_gateway(
    service: InvokeService,
    listen: SocketAddr,
    tokens: Vec<String>,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("--listen {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    ready(addr);
    let requester = service.requester().clone();
    let app = gateway::app(service, tokens);
    gateway::serve(listener, app, gateway::shutdown_signal())
        .await
        .map_err(|e| format!("HTTP server: {e}"))?;
    requester.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let limits = limits(args.default_timeout, args.max_timeout)?;
    let mut options = args.requester.options(&args.broker)?;
    if !args.no_presence {
        let root = PresenceRoot::new(args.presence_root.as_str())
            .map_err(|e| format!("--presence-root: {e}"))?;
        options = options.presence(root);
    }
    let broker_url = options.broker().url();
    // Start even while the broker is down: /healthz says 503 and calls get 503 until it is up.
    let requester = Requester::start(options).map_err(|e| e.to_string())?;
    let tokens: Vec<String> = args
        .api_tokens
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect();
    let auth = if tokens.is_empty() {
        "off"
    } else {
        "bearer token"
    };
    run_gateway(
        InvokeService::new(requester, limits),
        args.listen,
        tokens,
        |addr| {
            tracing::info!(%addr, broker = %broker_url, auth, "gateway listening");
        },
    )
    .await
}

async fn invoke(args: InvokeArgs) -> ExitCode {
    let options = match args.requester.options(&args.broker) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("directcall: {e}");
            return ExitCode::from(2);
        }
    };
    let requester = match Requester::start(options) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("directcall: {e}");
            return ExitCode::from(2);
        }
    };
    let service = InvokeService::new(requester.clone(), Limits::default());
    let start = std::time::Instant::now();
    let pairs = [
        ("target", args.target),
        ("method", args.method),
        ("request", args.request),
        ("timeout", args.timeout),
    ];
    let reply = match service.query_invocation(pairs, start) {
        Ok(invocation) => {
            // Wait for the connection within the call's own budget.
            requester.wait_ready(invocation.timeout_duration()).await;
            service.invoke(invocation).await
        }
        Err(reply) => reply,
    };
    requester.shutdown().await;
    println!("{}", reply.body);
    ExitCode::from(invoke_exit_code(&reply))
}

fn invoke_exit_code(reply: &HttpReply) -> u8 {
    match reply.status {
        200 => match reply.body["status"].as_u64() {
            Some(200..=299) => 0,
            _ => 6,
        },
        400 | 413 => 2,
        504 => 3,
        404 => 4,
        _ => 5,
    }
}

async fn call(args: CallArgs) -> ExitCode {
    let mut headers = Vec::new();
    for h in &args.headers {
        match h.split_once(':') {
            Some((name, value)) => headers.push((name.trim().to_owned(), value.trim().to_owned())),
            None => {
                eprintln!("directcall: --header {h:?} is not `Name: value`");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(token) = &args.token {
        headers.push(("authorization".into(), format!("Bearer {token}")));
    }
    if args.sigv4 {
        match sigv4_headers(&args.url, args.region.as_deref()) {
            Ok(signed) => headers.extend(signed),
            Err(e) => {
                eprintln!("directcall: --sigv4: {e}");
                return ExitCode::from(2);
            }
        }
    }
    match http_client::get(&args.url, &headers).await {
        Ok(response) => {
            println!("HTTP {}", response.status);
            println!("{}", response.body);
            if (200..300).contains(&response.status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("directcall: {e}");
            ExitCode::from(5)
        }
    }
}

fn sigv4_headers(url: &str, region: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let region = match region {
        Some(r) => r.to_owned(),
        None => url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', ':']).next())
            .and_then(|host| host.split(".execute-api.").nth(1))
            .and_then(|rest| rest.split('.').next())
            .map(str::to_owned)
            .ok_or("no --region / AWS_REGION, and no region in the host name")?,
    };
    let creds = directcall_core::AwsSigV4 {
        region,
        access_key_id: env("AWS_ACCESS_KEY_ID")?,
        secret_access_key: env("AWS_SECRET_ACCESS_KEY")?,
        session_token: std::env::var("AWS_SESSION_TOKEN").ok(),
    };
    directcall_cloud::sigv4::sign_get_headers(
        url,
        "execute-api",
        &creds,
        std::time::SystemTime::now(),
    )
}

async fn demo(args: DemoArgs) -> Result<(), String> {
    let device = Target::new(args.device.as_str()).map_err(|e| format!("--device: {e}"))?;
    let broker = EmbeddedBroker::start(args.broker_port).map_err(|e| e.to_string())?;
    let sim_options = sim::SimOptions {
        presence: true,
        ..sim::SimOptions::default()
    };
    let devices = sim::start(
        &broker.options(),
        std::slice::from_ref(&device),
        &sim_options,
    )
    .await
    .map_err(|e| e.to_string())?;
    let options = Options::new(broker.options()).presence(PresenceRoot::default());
    let requester = Requester::connect(options)
        .await
        .map_err(|e| e.to_string())?;
    let service = InvokeService::new(requester, Limits::default());
    let broker_url = broker.url();
    run_gateway(service, args.listen, Vec::new(), |addr| {
        println!("directcall demo");
        println!("  broker   {broker_url} (embedded rumqttd)");
        println!("  device   {device} (simulated, answers every method)");
        println!("  gateway  http://{addr}");
        println!();
        println!("Try:");
        println!("  curl 'http://{addr}/invoke?request=my_request_1&method=reqid-ABCD&target={device}&timeout=3'");
        println!();
        println!("Ctrl-C stops it.");
    })
    .await?;
    for d in devices {
        d.shutdown().await;
    }
    Ok(())
}
