//! `directcall`: the HTTP gateway, one-off calls over MQTT or HTTP, a
//! self-contained demo, and the load tool.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use directcall_bins::bench::command as bench;
use directcall_bins::cli::{shutdown_signal, AccessArgs, BoxError, BrokerArgs, RequesterArgs};
use directcall_bins::{http_client, reload, sim};
use directcall_cloud::gateway::{self, Access, Gateway, HttpReply, InvokeService, Limits};
use directcall_cloud::{Options, PresenceRoot, Requester};
use directcall_core::Target;
use directcall_testkit::EmbeddedBroker;

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
    Serve(Box<ServeArgs>),
    /// Make one call over MQTT and print the JSON the gateway would answer.
    ///
    /// Exit codes: 0 the device answered with a 2xx status, 2 invalid input,
    /// 3 timeout, 4 target offline or unknown, 5 broker unavailable, 6 the
    /// device answered with another status or a malformed reply.
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
    #[command(flatten)]
    access: AccessArgs,
    /// Logs as JSON lines (for log shippers), the audit lines included.
    #[arg(long, env = "DIRECTCALL_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "DIRECTCALL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "DIRECTCALL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require a client certificate chaining to this CA (PEM) from every
    /// HTTPS client.
    #[arg(long, env = "DIRECTCALL_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Serve no web console (no `/`, `/v1/devices` or `/v1/events`).
    #[arg(long, env = "DIRECTCALL_NO_CONSOLE")]
    no_console: bool,
    #[command(flatten)]
    shutdown: ShutdownArgs,
    /// Seconds between two looks at the credentials file and the TLS
    /// certificate and key: a change (a mounted Secret updated) is loaded
    /// without a restart or a signal.
    #[arg(long, env = "DIRECTCALL_RELOAD_INTERVAL", default_value_t = 5.0, value_parser = seconds)]
    reload_interval: f64,
    /// Also serve `GET /metrics` here, plain HTTP and without the API's
    /// token (for a Prometheus inside the cluster); `/metrics` on the API
    /// port stays behind the token.
    #[arg(long, env = "DIRECTCALL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

/// How `serve` stops on SIGTERM or Ctrl-C.
#[derive(Debug, Args)]
struct ShutdownArgs {
    /// On SIGTERM, keep serving this long (seconds) with /readyz answering
    /// 503, while load balancers and Kubernetes' endpoints stop sending.
    #[arg(long, env = "DIRECTCALL_SHUTDOWN_DELAY", default_value_t = 5.0, value_parser = seconds)]
    shutdown_delay: f64,
    /// Then stop accepting and wait at most this long (seconds) for the
    /// requests and calls in flight, those answered 202 included; calls
    /// still open after it are recorded as `unavailable`.
    #[arg(long, env = "DIRECTCALL_SHUTDOWN_TIMEOUT", default_value_t = 20.0, value_parser = seconds)]
    shutdown_timeout: f64,
}

fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=3600.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "{text:?} is not a number of seconds from 0 to 3600"
        )),
    }
}

impl ShutdownArgs {
    fn delay(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.shutdown_delay)
    }
    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.shutdown_timeout)
    }
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
    /// The URL, e.g. 'http://127.0.0.1:8080/invoke?request=r&method=m&target=Device001&timeout=3';
    /// with --targets or --group, the method to run on every device.
    url: String,
    #[command(flatten)]
    group: directcall_bins::group_cli::GroupArgs,
    /// API token, sent as `Authorization: Bearer <token>`.
    #[arg(long, env = "DIRECTCALL_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Extra header, `Name: value` (repeatable).
    #[arg(
        short = 'H',
        long = "header",
        env = "DIRECTCALL_HEADERS",
        value_delimiter = '\n',
        hide_env_values = true
    )]
    headers: Vec<String>,
    /// Sign the request with SigV4 for API Gateway's IAM auth (service
    /// execute-api), with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    /// AWS_SESSION_TOKEN from the environment.
    #[arg(long, env = "DIRECTCALL_SIGV4")]
    sigv4: bool,
    /// Region for --sigv4 [default: AWS_REGION, else the region in an
    /// *.execute-api.REGION.amazonaws.com host].
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
    /// Serve no web console.
    #[arg(long, env = "DIRECTCALL_NO_CONSOLE")]
    no_console: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    directcall_bins::cli::run("directcall", async move {
        let result = match cli.command {
            Command::Serve(args) => serve(*args).await,
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

/// After the drain's bound: how long the requests it cut get to have
/// their 503 written before the process exits.
const CUT_ANSWERS_WRITTEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

async fn run_gateway(
    requester: Requester,
    app: axum::Router,
    listen: SocketAddr,
    server: impl FnOnce(tokio::net::TcpListener) -> gateway::Server,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("--listen {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    ready(addr);
    let stopped = server(listener)
        .run(app, shutdown_signal())
        .await
        .map_err(|e| format!("HTTP server: {e}"))?;
    // Calls answered 202 have no request in flight: they get what is left.
    let open = requester.drain(stopped.time_left).await;
    requester.shutdown().await;
    // The requests the bound cut were just answered 503: write them.
    if !stopped.close(CUT_ANSWERS_WRITTEN_WITHIN).await {
        tracing::warn!("shutting down: some connections did not take their last answer");
    }
    tracing::info!(calls_cut = open, "stopped");
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<(), BoxError> {
    let limits = directcall_bins::cli::limits(args.default_timeout, args.max_timeout)?;
    let broker = args.broker.resolve()?;
    let options = args.requester.options(&broker)?;
    directcall_bins::cli::metrics_handle();
    // Start even while the broker is down: /healthz says 503 and calls get 503 until it is up.
    let requester = Requester::start(options)?;
    let access = Arc::new(args.access.access().await?);
    let auth = args.access.describe(&access);
    let app = args
        .access
        .apply(
            Gateway::new(requester.clone())
                .limits(limits)
                .metrics(directcall_bins::cli::render_metrics)
                .console(!args.no_console),
            Arc::clone(&access),
        )
        .app();
    if let Some(addr) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
        let metrics = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    directcall_bins::cli::render_metrics(),
                )
            }),
        );
        tracing::info!(addr = %listener.local_addr()?, "metrics listening");
        // Ends with the process: scraped until the last moment of a drain.
        tokio::spawn(async move { axum::serve(listener, metrics).await });
    }
    let every = std::time::Duration::from_secs_f64(args.reload_interval.max(0.1));
    if let Some(file) = &args.access.credentials {
        tokio::spawn(reload_on_sighup(Arc::clone(&access)));
        let access = Arc::clone(&access);
        reload::watch_files("credentials", vec![file.clone()], every, move || {
            access
                .reload()
                .map(|n| format!("{n} credentials"))
                .map_err(|e| e.to_string())
        });
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            };
            let tls = files.load()?;
            let (reloaded, mut paths) = (tls.clone(), vec![cert.clone(), key.clone()]);
            paths.extend(args.tls_client_ca.clone());
            reload::watch_files("tls", paths, every, move || {
                let new = files.load()?;
                reloaded.replace(&new);
                Ok("the certificate and key in use for new connections".to_owned())
            });
            Some(tls)
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let broker_url = broker.options.url();
    let shutdown = args.shutdown;
    let server = move |listener| {
        let server = gateway::Server::new(listener)
            .shutdown_delay(shutdown.delay())
            .shutdown_timeout(shutdown.timeout());
        match tls {
            Some(tls) => server.tls(tls),
            None => server,
        }
    };
    run_gateway(requester, app, args.listen, server, |addr| {
        tracing::info!(%addr, scheme, broker = %broker_url, auth, "gateway listening");
    })
    .await
}

/// The files of `--tls-cert`, `--tls-key` and `--tls-client-ca`.
struct TlsFiles {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    client_ca: Option<std::path::PathBuf>,
}

impl TlsFiles {
    /// Reads and checks them; errors name the flag and path, never a key.
    fn load(&self) -> Result<gateway::ServerTls, String> {
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
        };
        let cert = read("--tls-cert", &self.cert)?;
        let key = read("--tls-key", &self.key)?;
        let ca = match &self.client_ca {
            Some(p) => Some(read("--tls-client-ca", p)?),
            None => None,
        };
        gateway::ServerTls::from_pem(&cert, &key, ca.as_deref())
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))
    }
}

/// Reads the credentials file again on every SIGHUP; calls in flight keep
/// the credential they started with, and a bad file leaves the old rules.
async fn reload_on_sighup(access: Arc<Access>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::error!("cannot listen for SIGHUP: the credentials file will not be reloaded");
        return;
    };
    while hangups.recv().await.is_some() {
        match access.reload() {
            Ok(n) => {
                reload::count("credentials", true);
                tracing::info!(credentials = n, "credentials reloaded");
            }
            Err(e) => {
                reload::count("credentials", false);
                tracing::error!("credentials not reloaded, the old ones stay: {e}");
            }
        }
    }
}

async fn invoke(mut args: InvokeArgs) -> ExitCode {
    // A one-shot connection calls before retained presence records arrive.
    args.requester.presence = directcall_bins::cli::PresenceMode::Off;
    args.requester.strict_presence = false;
    let options = match args
        .broker
        .resolve()
        .and_then(|broker| args.requester.options(&broker))
    {
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
            requester.wait_ready(invocation.get_timeout()).await;
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
        // The device answered, with a reply that breaks the protocol.
        502 => 6,
        504 => 3,
        404 => 4,
        _ => 5,
    }
}

async fn call(args: CallArgs) -> ExitCode {
    let mut headers = Vec::new();
    if args.group.is_group() {
        if let Some(token) = &args.token {
            headers.push(("authorization".into(), format!("Bearer {token}")));
        }
        for h in &args.headers {
            match h.split_once(':') {
                Some((name, value)) => {
                    headers.push((name.trim().to_owned(), value.trim().to_owned()));
                }
                None => {
                    eprintln!("directcall: --header {h:?} is not `Name: value`");
                    return ExitCode::from(2);
                }
            }
        }
        return directcall_bins::group_cli::run(&args.group, &args.url, headers).await;
    }
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

fn sigv4_headers(url: &str, region: Option<&str>) -> Result<Vec<(String, String)>, BoxError> {
    let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let mut creds = directcall_cloud::sigv4::AwsSigV4::new(
        String::new(),
        env("AWS_ACCESS_KEY_ID")?,
        env("AWS_SECRET_ACCESS_KEY")?,
    );
    if let Ok(token) = std::env::var("AWS_SESSION_TOKEN") {
        creds = creds.session_token(token);
    }
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
    creds.region = region;
    directcall_cloud::sigv4::sign_get_headers(
        url,
        "execute-api",
        &creds,
        std::time::SystemTime::now(),
    )
    .map_err(Into::into)
}

async fn demo(args: DemoArgs) -> Result<(), BoxError> {
    let device = Target::new(args.device.as_str()).map_err(|e| format!("--device: {e}"))?;
    directcall_bins::cli::metrics_handle();
    let broker = EmbeddedBroker::start(args.broker_port)?;
    let mut sim_options = sim::SimOptions::default();
    sim_options.presence = true;
    let devices = sim::start(
        &broker.options().into(),
        std::slice::from_ref(&device),
        &sim_options,
    )
    .await?;
    // Records on, as in `serve`, and delivery receipts: the console shows
    // each call's timeline, sent, delivered, answered.
    let options = Options::new(broker.options())
        .presence(PresenceRoot::default())
        .record_calls(directcall_cloud::RecordOptions::default())
        .delivery_receipts(true);
    let requester = Requester::connect(options).await?;
    let app = Gateway::new(requester.clone())
        .metrics(directcall_bins::cli::render_metrics)
        .console(!args.no_console)
        .app();
    let broker_url = broker.url();
    run_gateway(requester, app, args.listen, gateway::Server::new, |addr| {
        println!("directcall demo");
        println!("  broker   {broker_url} (embedded rumqttd)");
        println!("  device   {device} (simulated, answers every method)");
        println!("  gateway  http://{addr}");
        if !args.no_console {
            println!("  console  http://{addr}/ (open it in a browser)");
        }
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
