//! Where and how to reach the MQTT broker, and the reconnect backoff: the
//! connection settings the requester and the device share, as plain data.

use std::time::Duration;

use crate::error::{Error, Field};

/// Default MQTT port.
pub const DEFAULT_MQTT_PORT: u16 = 1883;
/// Default largest packet each way: AWS IoT Core's 128 KB payload limit.
pub const DEFAULT_MAX_PACKET_BYTES: usize = 128 * 1024;
/// Default keepalive.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Default first reconnect delay.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Default longest reconnect delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Default MQTT-over-TLS port.
pub const DEFAULT_MQTTS_PORT: u16 = 8883;
/// Default path of MQTT over WebSockets (AWS IoT Core's).
pub const DEFAULT_WS_PATH: &str = "/mqtt";

/// TLS settings: PEM bytes, so the library never reads files itself.
#[derive(Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TlsOptions {
    /// CA certificates (PEM) the server's certificate must chain to; `None`
    /// trusts the platform's root store.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and private key (PEM), for mutual TLS.
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
    /// ALPN protocols to offer, e.g. `x-amzn-mqtt-ca` for AWS IoT on 443.
    pub alpn: Vec<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TlsOptions")
            .field("ca_pem_bytes", &self.ca_pem.as_ref().map(Vec::len))
            .field(
                "client_auth",
                &self.client_auth.as_ref().map(|_| "<redacted>"),
            )
            .field("alpn", &self.alpn)
            .finish()
    }
}

/// How bytes reach the broker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Transport {
    /// Plain TCP (`mqtt://`).
    #[default]
    Tcp,
    /// TLS over TCP (`mqtts://`).
    Tls(TlsOptions),
    /// WebSocket (`ws://`) at `path`.
    Ws {
        /// HTTP path, with any query.
        path: String,
    },
    /// WebSocket over TLS (`wss://`) at `path`.
    Wss {
        /// HTTP path, with any query.
        path: String,
        /// TLS settings.
        tls: TlsOptions,
    },
}

/// How to reach a broker.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerOptions {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TCP, TLS, WebSocket or secure WebSocket (default TCP).
    pub transport: Transport,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// MQTT keepalive (default 30 s).
    pub keep_alive: Duration,
    /// Largest MQTT packet sent or accepted (default 128 KiB).
    pub max_packet_bytes: usize,
    /// How long a TCP connect may take (default 5 s).
    pub connect_timeout: Duration,
    /// First reconnect delay (default 100 ms); doubles per failure.
    pub backoff_min: Duration,
    /// Longest reconnect delay (default 1 s; AWS IoT allows one CONNECT per
    /// second per client id).
    pub backoff_max: Duration,
}

impl BrokerOptions {
    /// A broker at `host:port` with every other setting at its default.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        BrokerOptions {
            host: host.into(),
            port,
            transport: Transport::Tcp,
            credentials: None,
            keep_alive: DEFAULT_KEEP_ALIVE,
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            connect_timeout: Duration::from_secs(5),
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }

    /// Parses `mqtt://host[:port]` (default port 1883), `mqtts://host[:port]`
    /// (8883), `ws://host[:port][/path]` (80) or `wss://host[:port][/path]`
    /// (443); the WebSocket path defaults to `/mqtt`. A bare `host[:port]`
    /// means `mqtt://`. TLS settings start empty (platform roots, no client
    /// certificate); set them with [`BrokerOptions::tls_mut`].
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `broker` for another scheme, an empty host or
    /// a port that is not 1-65535.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("mqtt", url));
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = match path {
            "" | "/" => DEFAULT_WS_PATH.to_owned(),
            p if p.starts_with('?') => format!("{DEFAULT_WS_PATH}{p}"),
            p => p.to_owned(),
        };
        let (transport, default_port) = match scheme {
            "mqtt" | "tcp" => (Transport::Tcp, DEFAULT_MQTT_PORT),
            "mqtts" | "ssl" | "tls" => (Transport::Tls(TlsOptions::default()), DEFAULT_MQTTS_PORT),
            "ws" => (Transport::Ws { path }, 80),
            "wss" => (
                Transport::Wss {
                    path,
                    tls: TlsOptions::default(),
                },
                443,
            ),
            other => {
                return Err(Error::invalid(
                    Field::Broker,
                    format!("scheme {other:?} is not one of mqtt, mqtts, ws, wss"),
                ))
            }
        };
        let (host, port) = match authority.rsplit_once(':') {
            // "[::1]" alone has its colons inside the brackets: no port there.
            Some((h, p)) if !h.starts_with('[') || h.ends_with(']') => {
                let port = p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    Error::invalid(Field::Broker, format!("port {p:?} is not 1-65535"))
                })?;
                (h, port)
            }
            _ => (authority, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(Error::invalid(Field::Broker, format!("no host in {url:?}")));
        }
        let mut options = Self::new(host, port);
        options.transport = transport;
        Ok(options)
    }

    /// The TLS settings, when the transport uses TLS.
    pub fn tls_mut(&mut self) -> Option<&mut TlsOptions> {
        match &mut self.transport {
            Transport::Tls(tls) | Transport::Wss { tls, .. } => Some(tls),
            _ => None,
        }
    }

    /// The broker as a URL (no credentials, no query), for logs and messages.
    pub fn url(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let port = self.port;
        match &self.transport {
            Transport::Tcp => format!("mqtt://{host}:{port}"),
            Transport::Tls(_) => format!("mqtts://{host}:{port}"),
            Transport::Ws { path } => format!("ws://{host}:{port}{}", strip_query(path)),
            Transport::Wss { path, .. } => format!("wss://{host}:{port}{}", strip_query(path)),
        }
    }
}

/// A path without its query, which may hold a signature.
fn strip_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

impl std::fmt::Debug for BrokerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password or a presigned query.
        f.debug_struct("BrokerOptions")
            .field("url", &self.url())
            .field("transport", &self.transport)
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .field("keep_alive", &self.keep_alive)
            .field("max_packet_bytes", &self.max_packet_bytes)
            .finish_non_exhaustive()
    }
}

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay before the next attempt; `unit` in `[0, 1)` picks the jitter,
    /// which spreads delays over the upper half of the current step.
    pub(crate) fn next_delay(&mut self, unit: f64) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// Back to the first step, after a successful connection.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        let b = BrokerOptions::from_url("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 1884));
        let b = BrokerOptions::from_url("localhost").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("localhost", 1883));
        let b = BrokerOptions::from_url("mqtt://[::1]:1999").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 1999));
        assert_eq!(b.url(), "mqtt://[::1]:1999");
        let b = BrokerOptions::from_url("mqtts://iot.example.com").unwrap();
        assert_eq!(b.port, 8883);
        assert!(matches!(b.transport, Transport::Tls(_)));
        let b = BrokerOptions::from_url("ws://127.0.0.1:9001").unwrap();
        assert_eq!(
            b.transport,
            Transport::Ws {
                path: "/mqtt".into()
            }
        );
        assert_eq!(b.url(), "ws://127.0.0.1:9001/mqtt");
        let b = BrokerOptions::from_url("wss://a.example/custom?x=1").unwrap();
        assert_eq!(b.port, 443);
        assert!(matches!(&b.transport, Transport::Wss { path, .. } if path == "/custom?x=1"));
        assert_eq!(b.url(), "wss://a.example:443/custom");
        let mut b = BrokerOptions::new("h", 1);
        b.credentials = Some(("user".into(), "s3cret".into()));
        assert!(!format!("{b:?}").contains("s3cret"));
        for bad in [
            "ws:///mqtt",
            "http://x",
            "mqtt://:1",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://",
        ] {
            let e = BrokerOptions::from_url(bad).unwrap_err();
            assert_eq!(e.field(), Field::Broker, "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<_> = (0..5).map(|_| b.next_delay(1.0).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 400, 400]);
        assert_eq!(b.next_delay(0.0).as_millis(), 200);
        b.reset();
        assert_eq!(b.next_delay(1.0).as_millis(), 100);
    }
}
