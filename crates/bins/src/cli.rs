//! Configuration every binary shares, parsed once: the broker flags
//! (`serve`, `invoke`, `bench`, `directcall-sim` and `directcall-lambda` take
//! the same ones, with the same environment variables), the requester
//! flags, logging and the runtime.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use directcall_cloud::gateway::{Access, AccessError, Gateway, JwtVerifier, Limits};
use directcall_cloud::sigv4::AwsSigV4;
use directcall_cloud::{Options, Prefix, PresenceRoot, QoS, RecordOptions};
use directcall_core::mqtt::UrlSigner;
use directcall_core::{BrokerOptions, MqttVersion};

/// Why a configuration cannot be used. Each names the flag (and its
/// environment variable) at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value breaks a rule.
    #[error("{flag}: {source}")]
    Invalid {
        /// The flag, e.g. `--broker`.
        flag: &'static str,
        /// Why.
        #[source]
        source: directcall_core::Error,
    },
    /// A file named by a flag cannot be read.
    #[error("{flag} {}: {source}", path.display())]
    File {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Flags that do not go together, or a value out of range.
    #[error("{0}")]
    Conflict(String),
    /// An environment variable SigV4 signing needs is not set.
    #[error("{0} is not set (needed for SigV4 signing)")]
    MissingEnv(&'static str),
    /// The credentials file cannot be used.
    #[error("--credentials {0}")]
    Credentials(#[source] AccessError),
}

/// Why a JWKS cannot be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The file cannot be read.
    #[error(transparent)]
    Read(#[from] std::io::Error),
    /// The URL cannot be fetched.
    #[error(transparent)]
    Fetch(#[from] crate::http_client::HttpError),
    /// The URL did not answer in time.
    #[error("no answer within {} s", JWKS_FETCH_TIMEOUT.as_secs())]
    Timeout,
    /// The URL answered with another status than 200.
    #[error("HTTP {0}")]
    Status(u16),
}

/// How to authenticate to AWS IoT Core when `--iot-endpoint` is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AwsAuth {
    /// MQTT over WebSockets on 443, signed with SigV4 from the environment's
    /// credentials (a Lambda's role).
    Sigv4,
    /// Mutual TLS on 8883 with --cert and --key.
    Mtls,
    /// Mutual TLS on 443 with ALPN `x-amzn-mqtt-ca`.
    Mtls443,
}

/// The error of a binary's top-level function: any error, reported once
/// at the edge (exit code and message).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Default broker when none is given.
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";

/// How to reach the broker. Every flag has an environment fallback.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct BrokerArgs {
    /// Broker URL: mqtt://host:port, mqtts://host:port (with --ca, --cert,
    /// --key), ws://host:port/path or wss://host:port/path; several,
    /// comma-separated, for a cluster's nodes: the first that answers is
    /// used, and the next when it is lost [default: mqtt://127.0.0.1:1883].
    #[arg(long, env = "DIRECTCALL_BROKER", conflicts_with = "iot_endpoint")]
    pub broker: Option<String>,
    /// AWS IoT Core data endpoint (…-ats.iot.REGION.amazonaws.com), instead
    /// of --broker; see --auth.
    #[arg(long, env = "DIRECTCALL_IOT_ENDPOINT")]
    pub iot_endpoint: Option<String>,
    /// How to authenticate to --iot-endpoint.
    #[arg(long, env = "DIRECTCALL_AUTH", value_enum, default_value_t = AwsAuth::Sigv4)]
    pub auth: AwsAuth,
    /// CA certificate (PEM) the broker's certificate must chain to; without
    /// it, TLS trusts the platform's roots.
    #[arg(long, env = "DIRECTCALL_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --key.
    #[arg(long, env = "DIRECTCALL_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS; needs --cert.
    #[arg(long, env = "DIRECTCALL_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// ALPN protocol to offer over TLS (e.g. x-amzn-mqtt-ca for AWS IoT on 443).
    #[arg(long, env = "DIRECTCALL_ALPN")]
    pub alpn: Option<String>,
    /// MQTT user name.
    #[arg(long, env = "DIRECTCALL_USERNAME")]
    pub username: Option<String>,
    /// MQTT password (never logged).
    #[arg(
        long,
        env = "DIRECTCALL_PASSWORD",
        hide_env_values = true,
        requires = "username"
    )]
    pub password: Option<String>,
    /// A file holding the MQTT password (a mounted secret; a trailing
    /// newline is dropped), instead of --password.
    #[arg(
        long,
        env = "DIRECTCALL_PASSWORD_FILE",
        requires = "username",
        conflicts_with = "password"
    )]
    pub password_file: Option<PathBuf>,
    /// MQTT keepalive, in seconds.
    #[arg(long, env = "DIRECTCALL_KEEP_ALIVE", default_value_t = 30)]
    pub keep_alive: u64,
    /// How long a PINGREQ may wait for its PINGRESP, in milliseconds,
    /// before the broker is taken for hung and the next one of the list is
    /// tried (a hung broker is noticed within keepalive + ping timeout; a
    /// requester with calls waiting pings after 500 ms of silence).
    #[arg(
        long = "ping-timeout",
        value_name = "MS",
        env = "DIRECTCALL_PING_TIMEOUT_MS",
        default_value_t = 1500,
        value_parser = clap::value_parser!(u64).range(100..=60_000)
    )]
    pub ping_timeout_ms: u64,
    /// When moving on to another broker of the list, connect there with a
    /// fresh client id (CLIENT_ID-fN): NATS hands a client id to another
    /// node only after giving up on the dead node's session. Not with
    /// client-id-keyed ACLs.
    #[arg(long, env = "DIRECTCALL_FAILOVER_FRESH_CLIENT_ID")]
    pub failover_fresh_client_id: bool,
    /// MQTT protocol version: 3.1.1 or 5. With 5 a requester knows at once
    /// when no device is subscribed (404), requests expire in the broker at
    /// their deadline, and devices answer plain MQTT 5 requests.
    #[arg(long, env = "DIRECTCALL_MQTT_VERSION", default_value = "3.1.1")]
    pub mqtt_version: String,
}

/// Broker settings and, for AWS IoT Core over SigV4, the URL signer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Broker {
    /// Where and how.
    pub options: BrokerOptions,
    /// Signs the WebSocket URL on every connection attempt.
    pub signer: Option<Arc<dyn UrlSigner>>,
}

impl From<BrokerOptions> for Broker {
    fn from(options: BrokerOptions) -> Self {
        Broker {
            options,
            signer: None,
        }
    }
}

impl BrokerArgs {
    /// Broker settings from the flags, reading the TLS files and, for
    /// `--auth sigv4`, the AWS credentials from the environment.
    ///
    /// # Errors
    /// [`ConfigError`] naming the flag when the URL is bad, a file cannot be
    /// read, TLS files are given for a transport without TLS, or SigV4
    /// credentials are missing.
    pub fn resolve(&self) -> Result<Broker, ConfigError> {
        let invalid = |flag, source| ConfigError::Invalid { flag, source };
        let (mut options, signer) = match &self.iot_endpoint {
            Some(endpoint) => {
                let url = match self.auth {
                    AwsAuth::Sigv4 => format!("wss://{endpoint}/mqtt"),
                    AwsAuth::Mtls => format!("mqtts://{endpoint}:8883"),
                    AwsAuth::Mtls443 => format!("mqtts://{endpoint}:443"),
                };
                let mut options =
                    BrokerOptions::from_url(&url).map_err(|e| invalid("--iot-endpoint", e))?;
                if self.auth == AwsAuth::Mtls443 {
                    if let Some(tls) = options.tls_mut() {
                        tls.alpn = vec!["x-amzn-mqtt-ca".into()];
                    }
                }
                let signer: Option<Arc<dyn UrlSigner>> = match self.auth {
                    AwsAuth::Sigv4 => Some(Arc::new(aws_credentials()?)),
                    AwsAuth::Mtls | AwsAuth::Mtls443 => None,
                };
                (options, signer)
            }
            None => {
                let url = self.broker.as_deref().unwrap_or(DEFAULT_BROKER);
                let options = BrokerOptions::from_url(url).map_err(|e| invalid("--broker", e))?;
                (options, None)
            }
        };
        options.keep_alive = Duration::from_secs(self.keep_alive.max(1));
        options.ping_timeout = Duration::from_millis(self.ping_timeout_ms);
        options.fresh_client_id_on_failover = self.failover_fresh_client_id;
        options.mqtt_version =
            MqttVersion::parse(&self.mqtt_version).map_err(|e| invalid("--mqtt-version", e))?;
        if let Some(user) = &self.username {
            let password = match &self.password_file {
                Some(path) => secret_file(path, "--password-file")?,
                None => self.password.clone().unwrap_or_default(),
            };
            options.credentials = Some((user.clone(), password));
        }
        let wants_tls = self.ca.is_some() || self.cert.is_some() || self.alpn.is_some();
        match options.tls_mut() {
            Some(tls) => {
                if let Some(ca) = &self.ca {
                    tls.ca_pem = Some(read(ca, "--ca")?);
                }
                match (&self.cert, &self.key) {
                    (Some(cert), Some(key)) => {
                        tls.client_auth = Some((read(cert, "--cert")?, read(key, "--key")?));
                    }
                    // clap's `requires` catches this for flags; environment
                    // variables set one without the other must fail too.
                    (Some(_), None) | (None, Some(_)) => {
                        return Err(ConfigError::Conflict(
                            "--cert (DIRECTCALL_CERT) and --key (DIRECTCALL_KEY) go together: give both or neither".into(),
                        ))
                    }
                    (None, None) => {}
                }
                if let Some(alpn) = &self.alpn {
                    tls.alpn = vec![alpn.clone()];
                }
            }
            None if wants_tls => {
                return Err(ConfigError::Conflict(format!(
                "--ca, --cert, --key and --alpn need a TLS broker URL (mqtts:// or wss://), not {}",
                options.url()
            )))
            }
            None => {}
        }
        Ok(Broker { options, signer })
    }
}

/// A secret kept in a file (a Kubernetes Secret or a Docker secret
/// mounted as one): its text without the trailing newline. Errors name the
/// flag and the path, never the content.
fn secret_file(path: &Path, flag: &'static str) -> Result<String, ConfigError> {
    let bytes = read(path, flag)?;
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::File {
        flag,
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

fn read(path: &Path, flag: &'static str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::File {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// SigV4 credentials from the environment: `AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and, for temporary
/// credentials, `AWS_SESSION_TOKEN` (what Lambda sets from its role).
///
/// # Errors
/// [`ConfigError::MissingEnv`] naming the first one missing.
pub fn aws_credentials() -> Result<AwsSigV4, ConfigError> {
    let need = |name: &'static str| std::env::var(name).map_err(|_| ConfigError::MissingEnv(name));
    let mut creds = AwsSigV4::new(
        need("AWS_REGION")?,
        need("AWS_ACCESS_KEY_ID")?,
        need("AWS_SECRET_ACCESS_KEY")?,
    );
    if let Ok(token) = std::env::var("AWS_SESSION_TOKEN") {
        creds = creds.session_token(token);
    }
    Ok(creds)
}

/// Where the requester learns which devices are online.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresenceMode {
    /// directcall's retained records under --presence-root.
    Directcall,
    /// AWS IoT Core's lifecycle events.
    Aws,
    /// No presence: every call is tried.
    Off,
}

/// The requester's identity and behaviour.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct RequesterArgs {
    /// Topic prefix: replies come back under PREFIX-INSTANCE, INSTANCE being
    /// 12 random hex digits of this process's own.
    #[arg(long, env = "DIRECTCALL_PREFIX", default_value = "invocation_client")]
    pub prefix: String,
    /// MQTT client id, exactly [default: the reply prefix, PREFIX-INSTANCE].
    #[arg(
        long,
        env = "DIRECTCALL_CLIENT_ID",
        conflicts_with = "client_id_prefix"
    )]
    pub client_id: Option<String>,
    /// Client id BASE-INSTANCE, with the reply prefix's INSTANCE [default: the prefix].
    #[arg(long, env = "DIRECTCALL_CLIENT_ID_PREFIX")]
    pub client_id_prefix: Option<String>,
    /// Replies under the prefix itself, as in the AWS sample, instead of
    /// PREFIX-INSTANCE: every instance sharing the prefix then receives every
    /// reply (for policies that allow exactly one prefix).
    #[arg(long, env = "DIRECTCALL_SHARED_PREFIX")]
    pub shared_prefix: bool,
    /// QoS of every request publish: 0 (never queued) or 1 [default: 0 on
    /// MQTT 3.1.1; on MQTT 5, 1 (whose PUBACK tells at once that no device
    /// is subscribed) but 0 to a target that answered within 10 s].
    #[arg(long, env = "DIRECTCALL_QOS", value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: Option<u8>,
    /// QoS of the reply subscription: 0 or 1 (replies are delivered at the
    /// lower of this and the device's publish QoS).
    #[arg(long, env = "DIRECTCALL_REPLY_QOS", default_value_t = directcall_cloud::DEFAULT_REPLY_QOS.level(), value_parser = clap::value_parser!(u8).range(0..=1))]
    pub reply_qos: u8,
    /// Calls in flight at once; beyond it a call waits for a slot within its
    /// own timeout.
    #[arg(long, env = "DIRECTCALL_MAX_IN_FLIGHT", default_value_t = directcall_cloud::DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Where presence comes from: calls to a target known offline fail at once with 404.
    #[arg(long, env = "DIRECTCALL_PRESENCE", value_enum, default_value_t = PresenceMode::Directcall)]
    pub presence: PresenceMode,
    /// Topic root of directcall presence records.
    #[arg(
        long,
        env = "DIRECTCALL_PRESENCE_ROOT",
        default_value = "directcall/presence"
    )]
    pub presence_root: String,
    /// With --presence aws: keep retained records of the lifecycle events
    /// under --presence-root, and read them, so that a replica started late
    /// knows who is offline (needs publish and subscribe rights there).
    #[arg(long, env = "DIRECTCALL_PRESENCE_MIRROR")]
    pub presence_mirror: bool,
    /// A call to a target with no presence record (a device never seen)
    /// fails at once with 404 `unknown_device` instead of waiting out its
    /// timeout; for fleets whose every device keeps a record. Strict once
    /// each connection's retained records are all in (the requester
    /// publishes a marker under --presence-root to learn when, so it needs
    /// publish rights there); with --presence aws it needs --presence-mirror.
    #[arg(long, env = "DIRECTCALL_STRICT_PRESENCE")]
    pub strict_presence: bool,
    /// Seconds to keep each call's record (`GET /v1/calls/{id}`, a late
    /// answer after a 504); 0 keeps none.
    #[arg(long, env = "DIRECTCALL_RECORD_RETENTION", default_value_t = 600)]
    pub record_retention: u64,
    /// At most this many call records; the oldest go first.
    #[arg(long, env = "DIRECTCALL_MAX_RECORDS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_records: u64,
    /// Ask devices for a delivery receipt with every request (a protocol
    /// extension): a call's record then says `delivered` once the device
    /// has it, and a 504 says whether it was delivered.
    #[arg(long, env = "DIRECTCALL_DELIVERY_RECEIPTS")]
    pub delivery_receipts: bool,
    /// Where call records and idempotency keys live: `memory` (this
    /// process), or `redis://host:port/db` (`rediss://` over TLS), or the
    /// master that Redis Sentinels name,
    /// `redis+sentinel://[:password@]host:26379[,host:26379...]/NAME[/db]`
    /// (`rediss+sentinel://` over TLS), shared by every gateway and Lambda
    /// using it.
    #[arg(
        long,
        env = "DIRECTCALL_STORE",
        default_value = "memory",
        hide_env_values = true
    )]
    pub store: String,
    /// A file holding the --store URL (it may carry a password), instead of
    /// --store.
    #[arg(long, env = "DIRECTCALL_STORE_FILE")]
    pub store_file: Option<PathBuf>,
    /// For a rediss:// or rediss+sentinel:// store: the CA (PEM) the
    /// servers' certificates must chain to [default: the system's roots].
    #[arg(long, env = "DIRECTCALL_STORE_CA")]
    pub store_ca: Option<PathBuf>,
}

impl RequesterArgs {
    /// Requester options for `broker`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the flag with an invalid value.
    pub fn options(&self, broker: &Broker) -> Result<Options, ConfigError> {
        let invalid = |flag, source| ConfigError::Invalid { flag, source };
        let prefix = Prefix::new(self.prefix.as_str()).map_err(|e| invalid("--prefix", e))?;
        let mut options = Options::new(broker.options.clone()).prefix(prefix);
        if let Some(signer) = &broker.signer {
            options = options.url_signer(Arc::clone(signer));
        }
        match (&self.client_id, &self.client_id_prefix) {
            (Some(id), _) => options = options.client_id(id.clone()),
            (None, Some(base)) => options = options.client_id_prefix(base.clone()),
            (None, None) => {}
        }
        if self.shared_prefix {
            options = options.shared_prefix();
        }
        if let Some(level) = self.qos {
            options = options.request_qos(qos(level));
        }
        options = options
            .reply_qos(qos(self.reply_qos))
            .max_in_flight(self.max_in_flight);
        let root = PresenceRoot::new(self.presence_root.as_str())
            .map_err(|e| invalid("--presence-root", e))?;
        options = match self.presence {
            PresenceMode::Directcall => options.presence(root),
            PresenceMode::Aws if self.presence_mirror => {
                options.aws_presence().mirror_presence(root)
            }
            PresenceMode::Aws => options.aws_presence(),
            PresenceMode::Off => options,
        };
        if self.strict_presence {
            let records = match self.presence {
                PresenceMode::Directcall => true,
                PresenceMode::Aws => self.presence_mirror,
                PresenceMode::Off => false,
            };
            if !records {
                return Err(ConfigError::Conflict(
                    "--strict-presence (DIRECTCALL_STRICT_PRESENCE) needs presence records to read: --presence directcall, or --presence aws with --presence-mirror".into(),
                ));
            }
            options = options.strict_presence(true);
        }
        if let Err(e) = options.get_reply_prefix() {
            return Err(invalid("--prefix", e));
        }
        options = options.delivery_receipts(self.delivery_receipts);
        if self.record_retention > 0 {
            options = options.record_calls(RecordOptions::new(
                Duration::from_secs(self.record_retention),
                usize::try_from(self.max_records).unwrap_or(usize::MAX),
            ));
        }
        let store = match &self.store_file {
            Some(path) => secret_file(path, "--store-file")?,
            None => self.store.clone(),
        };
        match store.as_str() {
            "memory" => {}
            url if STORE_SCHEMES.iter().any(|s| url.starts_with(s)) => {
                if self.record_retention == 0 {
                    return Err(ConfigError::Conflict(
                        "--store redis://… shares call records: it needs --record-retention above 0"
                            .into(),
                    ));
                }
                options = options.redis_store(url);
                if let Some(ca) = &self.store_ca {
                    options = options.redis_store_ca(read(ca, "--store-ca")?);
                }
            }
            _ => {
                return Err(ConfigError::Conflict(format!(
                    "--store {}: give `memory`, a redis:// (rediss://) URL, or redis+sentinel://HOST:26379/NAME (rediss+sentinel://)",
                    redact_url(&store)
                )))
            }
        }
        Ok(options)
    }
}

/// The QoS of level 0 or 1 (flags are range-checked by clap).
pub fn qos(level: u8) -> QoS {
    QoS::from_level(level).unwrap_or(QoS::AtLeastOnce)
}

/// How log lines (the audit line of every call among them) reach stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogWriter {
    /// Handed to a thread of their own ([`crate::log_thread`]), which
    /// writes what has piled up in one write, at most
    /// [`log_thread::GATHER`](crate::log_thread::GATHER) after the first
    /// line of a batch: no request waits for a write. None is dropped:
    /// past [`log_thread::MAX_WAITING_BYTES`](crate::log_thread::MAX_WAITING_BYTES)
    /// waiting, the logging thread waits.
    Thread,
    /// Written by the thread that logs, before it goes on: for the Lambda,
    /// whose execution environment is frozen between invocations, with a
    /// writer thread's lines still unwritten.
    Direct,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info,rumqttd=off`: the
/// embedded broker logs a normal disconnect as an error;
/// `RUST_LOG=info,rumqttd=info` shows its logs). With
/// [`LogWriter::Thread`], the guard returned writes what is left when
/// dropped: keep it until the process ends. When the thread cannot start,
/// lines are written directly.
pub fn init_tracing(writer: LogWriter) -> Option<crate::log_thread::LogGuard> {
    if writer == LogWriter::Thread {
        if let Ok((writer, guard)) = crate::log_thread::start(std::io::stderr()) {
            install_logs(writer);
            return Some(guard);
        }
    }
    install_logs(std::io::stderr);
    None
}

fn install_logs<W>(writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = if json_logs() {
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}

/// Whether logs are JSON lines: `--log-format json` (or `=json`) among the
/// arguments, or `DIRECTCALL_LOG_FORMAT=json`. Read before the arguments
/// are parsed, so that the first lines are in the right format.
fn json_logs() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let flag = args.iter().enumerate().find_map(|(i, a)| {
        if a == "--log-format" {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix("--log-format=").map(str::to_owned)
        }
    });
    flag.or_else(|| std::env::var("DIRECTCALL_LOG_FORMAT").ok())
        .is_some_and(|f| f == "json")
}

/// Sets up logging (written by a thread of their own) and a tokio runtime,
/// then runs `main` to its exit code; `name` prefixes the one error a
/// failed start prints.
pub fn run<F>(name: &str, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = std::process::ExitCode>,
{
    run_with(name, LogWriter::Thread, main)
}

/// [`run`], its log lines written as `writer` says.
pub fn run_with<F>(name: &str, writer: LogWriter, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = std::process::ExitCode>,
{
    // Dropped last: writes the lines still waiting.
    let _logs = init_tracing(writer);
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The Prometheus recorder of this process, installed on first use as the
/// global `metrics` recorder (with the call duration histogram's buckets),
/// and its handle to render `/metrics`.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(directcall_cloud::gateway::CALL_DURATION.to_owned()),
                    &directcall_cloud::gateway::CALL_DURATION_BUCKETS,
                )
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed: /metrics stays empty");
            }
            // Histogram samples pile up until drained: by a scrape of
            // /metrics, or here, so that a gateway nobody scrapes does not
            // grow by every call's latency.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(METRICS_UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!(
                    "metrics upkeep not started ({e}): histograms drain only when /metrics is read"
                );
            }
            metrics::describe_gauge!(BUILD_INFO, "Always 1; the version in its label.");
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            process_collector().describe();
            handle
        })
        .clone()
}

/// How often the histograms' samples are drained into their buckets when
/// nobody reads `/metrics` (the exporter's own default).
pub const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// `directcall_build_info{version="…"} 1`.
pub const BUILD_INFO: &str = "directcall_build_info";

fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The Prometheus text of [`metrics_handle`]'s recorder, the process's
/// own metrics (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
/// `process_open_fds`, ... read now) included.
pub fn render_metrics() -> String {
    let handle = metrics_handle();
    process_collector().collect();
    handle.render()
}

/// The timeouts a caller may ask for, from `--default-timeout` and
/// `--max-timeout`.
///
/// # Errors
/// [`ConfigError::Conflict`] naming both flags when they do not fit.
pub fn limits(default_timeout: u64, max_timeout: u64) -> Result<Limits, ConfigError> {
    Limits::new(default_timeout, max_timeout).map_err(|_| {
        ConfigError::Conflict(format!(
            "--default-timeout ({default_timeout}) must be from 1 to --max-timeout ({max_timeout})"
        ))
    })
}

/// How long a JWKS fetched from a URL may take: an identity provider that
/// stalls must not stall the gateway's start (or a Lambda's init).
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may call what, as flags: `directcall serve` and `directcall-lambda`
/// take the same ones.
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct AccessArgs {
    /// API tokens (comma-separated); when set, calls need `Authorization: Bearer <token>`.
    #[arg(
        long = "api-token",
        env = "DIRECTCALL_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_tokens: Vec<String>,
    /// A file of API tokens, one a line (or comma-separated), added to
    /// --api-token: for tokens kept in a mounted secret.
    #[arg(long, env = "DIRECTCALL_API_TOKENS_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// A credentials file (TOML: names, secrets, the targets and methods each
    /// may call, rates; docs/SECURITY.md), read again by `serve` when its
    /// content changes (and on SIGHUP).
    #[arg(long, env = "DIRECTCALL_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Accept bearer JWTs signed by a key of this JWKS (a file, or an
    /// http(s):// URL, each fetch within 10 s), read at start and every
    /// --jwks-refresh; needs --jwt-issuer and --jwt-audience. While it
    /// cannot be had, JWTs get 401 and it is tried again (1 s, doubling to
    /// 60 s): the gateway never exits for it.
    #[arg(long, env = "DIRECTCALL_JWKS", requires_all = ["jwt_issuer", "jwt_audience"], hide_env_values = true)]
    pub jwks: Option<String>,
    /// Seconds between two reads of the JWKS.
    #[arg(long, env = "DIRECTCALL_JWKS_REFRESH", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub jwks_refresh: u64,
    /// The `iss` a JWT must carry.
    #[arg(long, env = "DIRECTCALL_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The `aud` a JWT must carry.
    #[arg(long, env = "DIRECTCALL_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The claim listing what a JWT may call, as `target/method` globs
    /// (space-separated, or an array).
    #[arg(long, env = "DIRECTCALL_JWT_SCOPE_CLAIM", default_value = "scope")]
    pub jwt_scope_claim: String,
    /// At most this many calls in flight per target; more get 429 (0: no bound).
    #[arg(long, env = "DIRECTCALL_MAX_IN_FLIGHT_PER_TARGET", default_value_t = 8)]
    pub max_in_flight_per_target: usize,
    /// Put request and response bodies in the audit lines (never by default).
    #[arg(long, env = "DIRECTCALL_AUDIT_BODIES")]
    pub audit_bodies: bool,
}

/// The credential-rate gauge: one per credential with a rate.
pub const LIMIT_CREDENTIAL_RATE: &str = "directcall_limit_credential_calls_per_second";

impl AccessArgs {
    /// The access rules these flags describe (the JWKS read now, a URL
    /// within [`JWKS_FETCH_TIMEOUT`]), and the gauge of each credential's
    /// rate set.
    ///
    /// # Errors
    /// A credentials file or JWKS that cannot be read or used, naming the flag.
    pub async fn access(&self) -> Result<Access, ConfigError> {
        let mut tokens = self.api_tokens.clone();
        if let Some(path) = &self.api_token_file {
            let text = secret_file(path, "--api-token-file")?;
            tokens.extend(
                text.split(['\n', ','])
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned),
            );
        }
        let mut access =
            Access::new(tokens, self.credentials.clone()).map_err(ConfigError::Credentials)?;
        if let (Some(jwks), Some(iss), Some(aud)) =
            (&self.jwks, &self.jwt_issuer, &self.jwt_audience)
        {
            let verifier = Arc::new(JwtVerifier::without_keys(
                iss.as_str(),
                aud.as_str(),
                self.jwt_scope_claim.as_str(),
            ));
            let source = jwks.clone();
            crate::reload::refresh_jwks(
                Arc::clone(&verifier),
                redact_url(jwks),
                Duration::from_secs(self.jwks_refresh),
                move || {
                    let source = source.clone();
                    async move { fetch_jwks(&source).await.map_err(|e| e.to_string()) }
                },
            )
            .await;
            access = access.with_jwt(verifier);
        }
        for caller in access.current().callers() {
            if let Some((rate, _)) = caller.get_rate() {
                metrics::gauge!(LIMIT_CREDENTIAL_RATE, "credential" => caller.name().to_owned())
                    .set(f64::from(rate));
            }
        }
        Ok(access)
    }

    /// `gateway` with `access` and these flags' limits and audit setting.
    pub fn apply(&self, gateway: Gateway, access: Arc<Access>) -> Gateway {
        let gateway = gateway.authenticate(access).audit_bodies(self.audit_bodies);
        if self.max_in_flight_per_target > 0 {
            gateway.max_in_flight_per_target(self.max_in_flight_per_target)
        } else {
            gateway
        }
    }

    /// How callers are checked, in words, for the start-up log line.
    pub fn describe(&self, access: &Access) -> String {
        match (access.current().len(), access.accepts_jwt()) {
            (0, false) => "off".to_owned(),
            (n, false) => format!("{n} credentials"),
            (n, true) => format!("{n} credentials and JWTs"),
        }
    }
}

/// The JWKS document at `source`: a file, or an http(s) URL fetched within
/// [`JWKS_FETCH_TIMEOUT`].
async fn fetch_jwks(source: &str) -> Result<String, JwksError> {
    if source.starts_with("http://") || source.starts_with("https://") {
        let fetched =
            tokio::time::timeout(JWKS_FETCH_TIMEOUT, crate::http_client::get(source, &[]))
                .await
                .map_err(|_| JwksError::Timeout)??;
        if fetched.status != 200 {
            return Err(JwksError::Status(fetched.status));
        }
        Ok(fetched.body)
    } else {
        Ok(std::fs::read_to_string(source)?)
    }
}

/// `url` without a user, password or query (they may hold secrets).
/// Everything up to the last `@` goes, so a password with an unescaped
/// `/`, `?` or `#` in it goes too.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    format!("{scheme}://{rest}")
}

/// What `--store` takes besides `memory`.
const STORE_SCHEMES: [&str; 4] = [
    "redis://",
    "rediss://",
    "redis+sentinel://",
    "rediss+sentinel://",
];

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: not ready from now on");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        requester: RequesterArgs,
    }

    fn parse(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("test").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn the_password_can_come_from_a_file_without_its_newline() {
        let path = std::env::temp_dir().join(format!("directcall-pw-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let path_text = path.to_str().unwrap();
        let flags = parse(&["--username", "gw", "--password-file", path_text]);
        let broker = flags.broker.resolve().unwrap();
        assert_eq!(
            broker.options.credentials,
            Some(("gw".to_owned(), "s3cret".to_owned()))
        );
        std::fs::remove_file(&path).unwrap();
        // Both forms at once are refused by clap.
        let e = Flags::try_parse_from([
            "test",
            "--username",
            "gw",
            "--password",
            "x",
            "--password-file",
            path_text,
        ])
        .err()
        .unwrap();
        assert!(e.to_string().contains("--password-file"), "{e}");
    }

    #[test]
    fn a_certificate_without_its_key_is_a_start_up_error() {
        // Flags: clap refuses it.
        let e = Flags::try_parse_from(["test", "--broker", "mqtts://h", "--cert", "c.pem"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("--key"), "{e}");
        // Environment variables reach the same check in `resolve`.
        let mut flags = parse(&["--broker", "mqtts://h"]);
        flags.broker.cert = Some("c.pem".into());
        let e = flags.broker.resolve().unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
    }

    #[test]
    fn tls_flags_need_a_tls_url_and_bad_values_name_their_flag() {
        let e = parse(&["--broker", "mqtt://h", "--alpn", "x"])
            .broker
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("need a TLS broker URL"), "{e}");
        let e = parse(&["--broker", "gopher://h"])
            .broker
            .resolve()
            .unwrap_err();
        assert!(e.to_string().starts_with("--broker: invalid broker"), "{e}");
        let flags = parse(&["--prefix", "a/b"]);
        let broker = flags.broker.resolve().unwrap();
        let e = flags.requester.options(&broker).unwrap_err();
        assert!(e.to_string().starts_with("--prefix: invalid prefix"), "{e}");
    }

    #[test]
    fn strict_presence_needs_records_to_read() {
        let options = |args: &[&str]| {
            let flags = parse(args);
            let broker = flags.broker.resolve().unwrap();
            flags.requester.options(&broker)
        };
        assert!(options(&["--strict-presence"])
            .unwrap()
            .get_strict_presence());
        assert!(options(&[
            "--strict-presence",
            "--presence",
            "aws",
            "--presence-mirror"
        ])
        .unwrap()
        .get_strict_presence());
        assert!(!options(&[]).unwrap().get_strict_presence());
        for args in [
            &["--strict-presence", "--presence", "off"][..],
            &["--strict-presence", "--presence", "aws"],
        ] {
            let e = options(args).unwrap_err();
            assert!(
                e.to_string().starts_with("--strict-presence"),
                "{args:?}: {e}"
            );
        }
    }

    #[test]
    fn the_aws_endpoint_builds_the_url_for_each_auth() {
        let flags = parse(&[
            "--iot-endpoint",
            "abc-ats.iot.eu-west-1.amazonaws.com",
            "--auth",
            "mtls443",
        ]);
        let broker = flags.broker.resolve().unwrap();
        assert_eq!(
            broker.options.url(),
            "mqtts://abc-ats.iot.eu-west-1.amazonaws.com:443"
        );
        assert_eq!(
            broker.options.primary().transport,
            directcall_core::Transport::Tls
        );
        assert_eq!(broker.options.tls.alpn, ["x-amzn-mqtt-ca"]);
        assert!(broker.signer.is_none());
        let e = Flags::try_parse_from(["test", "--broker", "mqtt://h", "--iot-endpoint", "e"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
    }

    #[test]
    fn a_sentinel_store_is_taken_and_shown_without_its_password() {
        let options = |store: &str| {
            let flags = parse(&["--store", store]);
            let broker = flags.broker.resolve().unwrap();
            flags.requester.options(&broker)
        };
        for store in [
            "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26379/mymaster/0",
            "rediss+sentinel://s1:26379/mymaster",
        ] {
            assert_eq!(options(store).unwrap().get_store(), Some(store));
        }
        let e = options("redis+sentinal://:s3/cr?et@s1:26379/mymaster").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--store redis+sentinal://s1:26379/mymaster: give"),
            "{e}"
        );
        assert!(!e.to_string().contains("s3"), "{e}");
    }
}
