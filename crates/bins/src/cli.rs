//! Command-line pieces every binary shares: broker flags and logging.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use directcall_core::BrokerOptions;

/// How to reach the broker. Every flag has an environment fallback.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Broker URL: mqtt://host:port, mqtts://host:port (with --ca, --cert,
    /// --key), ws://host:port/path or wss://host:port/path.
    #[arg(
        long,
        env = "DIRECTCALL_BROKER",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub broker: String,
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
    /// MQTT keepalive, in seconds.
    #[arg(long, env = "DIRECTCALL_KEEP_ALIVE", default_value_t = 30)]
    pub keep_alive: u64,
}

impl BrokerArgs {
    /// Broker settings from the flags, reading the TLS files.
    ///
    /// # Errors
    /// A message naming the flag when the URL is bad, a file cannot be read,
    /// or TLS files are given for a transport without TLS.
    pub fn options(&self) -> Result<BrokerOptions, String> {
        let mut options =
            BrokerOptions::from_url(&self.broker).map_err(|e| format!("--broker: {e}"))?;
        options.keep_alive = Duration::from_secs(self.keep_alive.max(1));
        if let Some(user) = &self.username {
            options.credentials = Some((user.clone(), self.password.clone().unwrap_or_default()));
        }
        let wants_tls = self.ca.is_some() || self.cert.is_some() || self.alpn.is_some();
        match options.tls_mut() {
            Some(tls) => {
                if let Some(ca) = &self.ca {
                    tls.ca_pem = Some(read(ca, "--ca")?);
                }
                if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                    tls.client_auth = Some((read(cert, "--cert")?, read(key, "--key")?));
                }
                tls.alpn = self.alpn.iter().cloned().collect();
            }
            None if wants_tls => {
                return Err(format!(
                "--ca, --cert, --key and --alpn need a TLS broker URL (mqtts:// or wss://), not {}",
                self.broker
            ))
            }
            None => {}
        }
        Ok(options)
    }
}

fn read(path: &PathBuf, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info,rumqttd=off`: the embedded broker logs a normal disconnect as an error; `RUST_LOG=info,rumqttd=info` shows its logs).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Sets up logging and a tokio runtime, then runs `main` to its exit code;
/// `name` prefixes the one error a failed start prints.
pub fn run<F>(name: &str, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = std::process::ExitCode>,
{
    init_tracing();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
