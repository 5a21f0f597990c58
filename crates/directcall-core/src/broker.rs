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
/// Default ping timeout: how long a PINGREQ may wait for its PINGRESP
/// before the connection counts as lost.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a requester's connection may stay silent after a request
/// before it pings the broker to learn whether it is still there.
pub const SILENCE_BEFORE_PING: Duration = Duration::from_millis(500);
/// A requester's default first backoff step: one connection per gateway,
/// which should be back fast and cannot storm a broker.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A requester's default largest backoff step.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A device's default first backoff step: with [`BackoffJitter::Full`], the
/// window a fleet's first reconnects after a loss spread over, so that even
/// a broker back at once (a restart, a load balancer moving connections) is
/// not met by every device in the same 100 ms.
pub const DEFAULT_DEVICE_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// A device's default largest backoff step: after a long outage a fleet's
/// reconnects spread over 30 s (measured with 10,000 devices after 60 s
/// down: at most 673 connects a second, against 4,116 with the requester's
/// backoff; 200,000 devices would make about 13,000 connects and TLS
/// handshakes a second rather than all at once), and no device waits more
/// than 30 s once the broker is back, no longer than a 30 s keepalive (AWS
/// IoT Core's shortest) can take to notice a dead link.
pub const DEFAULT_DEVICE_BACKOFF_MAX: Duration = Duration::from_secs(30);

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

/// How bytes reach a broker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Transport {
    /// Plain TCP (`mqtt://`).
    #[default]
    Tcp,
    /// TLS over TCP (`mqtts://`), with the broker settings' [`TlsOptions`].
    Tls,
    /// WebSocket (`ws://`) at `path`.
    Ws {
        /// HTTP path, with any query.
        path: String,
    },
    /// WebSocket over TLS (`wss://`) at `path`.
    Wss {
        /// HTTP path, with any query.
        path: String,
    },
}

impl Transport {
    /// Whether it runs over TLS.
    pub fn uses_tls(&self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss { .. })
    }
}

/// One broker node: where, and over what.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TCP, TLS, WebSocket or secure WebSocket.
    pub transport: Transport,
}

impl Endpoint {
    /// A plain-TCP endpoint at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Endpoint {
            host: host.into(),
            port,
            transport: Transport::Tcp,
        }
    }

    /// Parses one broker URL: `mqtt://host[:port]` (default port 1883),
    /// `mqtts://host[:port]` (8883), `ws://host[:port][/path]` (80) or
    /// `wss://host[:port][/path]` (443); the WebSocket path defaults to
    /// `/mqtt`. A bare `host[:port]` means `mqtt://`.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `broker` for another scheme, an empty host or
    /// a port that is not 1-65535.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let url = url.trim();
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
            "mqtts" | "ssl" | "tls" => (Transport::Tls, DEFAULT_MQTTS_PORT),
            "ws" => (Transport::Ws { path }, 80),
            "wss" => (Transport::Wss { path }, 443),
            other => {
                return Err(Error::invalid(
                    Field::Broker,
                    format!("scheme {other:?} is not one of mqtt, mqtts, ws, wss"),
                ))
            }
        };
        if authority.contains('@') {
            // Never echo the URL: it holds a password.
            return Err(Error::invalid(
                Field::Broker,
                "a user or password in the URL is not taken (it would end up in logs); give them as BrokerOptions::credentials (--username, --password)",
            ));
        }
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
        Ok(Endpoint {
            host: host.to_owned(),
            port,
            transport,
        })
    }

    /// The endpoint as a URL (no query, which may hold a signature).
    pub fn url(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let port = self.port;
        match &self.transport {
            Transport::Tcp => format!("mqtt://{host}:{port}"),
            Transport::Tls => format!("mqtts://{host}:{port}"),
            Transport::Ws { path } => format!("ws://{host}:{port}{}", strip_query(path)),
            Transport::Wss { path } => format!("wss://{host}:{port}{}", strip_query(path)),
        }
    }
}

/// How to reach a broker, or a cluster of them: one or more endpoints tried
/// in turn (the connection uses the first it can reach and moves on to the
/// next when that one is lost), and the settings they share.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerOptions {
    /// The broker nodes, in the order they are tried; never empty.
    pub endpoints: Vec<Endpoint>,
    /// TLS settings of the `mqtts://` and `wss://` endpoints (default: the
    /// platform's roots, no client certificate, no ALPN).
    pub tls: TlsOptions,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// MQTT keepalive (default 30 s).
    pub keep_alive: Duration,
    /// How long a PINGREQ may wait for an answer (default 1.5 s): a broker
    /// that stays silent longer is taken for hung, and the connection for
    /// lost, so it moves on to the next endpoint. A side pings at its
    /// keepalive when it has sent nothing else, so a hung broker is noticed
    /// at most `keep_alive + ping_timeout` after it hangs; a requester also
    /// pings when a request has had nothing back for
    /// [`SILENCE_BEFORE_PING`], and so notices within about 2 s while calls
    /// are waiting (docs/RELIABILITY.md).
    ///
    /// ```
    /// use std::time::Duration;
    /// use directcall_core::BrokerOptions;
    ///
    /// // A device that must notice a hung broker within about 6.5 s.
    /// let mut broker = BrokerOptions::from_url("mqtt://a:1883,mqtt://b:1883")?;
    /// broker.keep_alive = Duration::from_secs(5);
    /// broker.ping_timeout = Duration::from_millis(1500);
    /// # Ok::<(), directcall_core::Error>(())
    /// ```
    pub ping_timeout: Duration,
    /// Largest MQTT packet sent or accepted (default 128 KiB).
    pub max_packet_bytes: usize,
    /// How long connecting may take, from the TCP connect to the broker's
    /// CONNACK (default 5 s). A slower connect counts as failed: with several
    /// endpoints the next one is tried.
    pub connect_timeout: Duration,
    /// The first backoff step; it doubles with each failed attempt up to
    /// `backoff_max` and starts over once connected. `None` (the default)
    /// takes the side's: 100 ms for a requester ([`DEFAULT_BACKOFF_MIN`]),
    /// 1 s for a device ([`DEFAULT_DEVICE_BACKOFF_MIN`]). With
    /// [`BackoffJitter::Full`] the first reconnect after a loss waits
    /// anywhere from 0 to this step: the window a fleet's reconnects spread
    /// over when the broker is back at once.
    pub backoff_min: Option<Duration>,
    /// The largest backoff step. `None` (the default) takes the side's: 1 s
    /// for a requester ([`DEFAULT_BACKOFF_MAX`]; AWS IoT allows one CONNECT
    /// per second per client id), 30 s for a device
    /// ([`DEFAULT_DEVICE_BACKOFF_MAX`]), so that a fleet's reconnects after
    /// a broker restart are spread over up to that long (docs/RELIABILITY.md,
    /// "Reconnect storms").
    ///
    /// ```
    /// use std::time::Duration;
    /// use directcall_core::BrokerOptions;
    ///
    /// // Devices of a large fleet: spread reconnects over a minute.
    /// let mut broker = BrokerOptions::from_url("mqtts://iot.example.com")?;
    /// broker.backoff_max = Some(Duration::from_secs(60));
    /// # Ok::<(), directcall_core::Error>(())
    /// ```
    pub backoff_max: Option<Duration>,
    /// How each delay is drawn from its step. `None` (the default) takes the
    /// side's: [`BackoffJitter::UpperHalf`] for a requester,
    /// [`BackoffJitter::Full`] for a device.
    pub backoff_jitter: Option<BackoffJitter>,
    /// When the connection moves on to another endpoint, connect there as
    /// `{client id}-f{n}` (n counting failovers) instead of the same client
    /// id. NATS hands a client id over to another node only after it gave up
    /// on the dead node's session (about 8 s measured here); a fresh id is
    /// taken at once. Leave it off where ACLs are keyed on the client id
    /// (EMQX `${clientid}`, AWS `${iot:ClientId}`). Default: off.
    pub fresh_client_id_on_failover: bool,
    /// The MQTT protocol version spoken (default 3.1.1); set it with
    /// [`BrokerOptions::mqtt_version`](BrokerOptions::mqtt_version()).
    pub mqtt_version: MqttVersion,
}

/// How a reconnect delay is drawn from the current backoff step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum BackoffJitter {
    /// Anywhere in the upper half of the step, never less than half of it: a
    /// requester's, one connection per gateway that should be back fast.
    #[default]
    UpperHalf,
    /// Anywhere from 0 to the whole step ("full jitter", as AWS's
    /// architecture blog names it): spreads many clients' reconnects the
    /// most; a device's.
    Full,
}

/// The MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum MqttVersion {
    /// MQTT 3.1.1: every broker directcall runs on speaks it (NATS speaks
    /// nothing else).
    #[default]
    V311,
    /// MQTT 5: reason codes on acknowledgements (a request nobody is
    /// subscribed to is known at once), message expiry, response topic and
    /// correlation data, user properties.
    V5,
}

impl MqttVersion {
    /// `3.1.1` or `5`, as a flag spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5",
        }
    }

    /// Parses `3.1.1` (or `3`, `4`, `311`) and `5`.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `mqtt_version` for anything else.
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s.trim() {
            "3.1.1" | "311" | "3" | "4" => Ok(MqttVersion::V311),
            "5" | "5.0" => Ok(MqttVersion::V5),
            other => Err(Error::invalid(
                Field::MqttVersion,
                format!("{other:?} is not 3.1.1 or 5"),
            )),
        }
    }
}

impl std::fmt::Display for MqttVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl BrokerOptions {
    /// A broker at `host:port` over plain TCP, every other setting at its
    /// default.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self::with_endpoints(vec![Endpoint::new(host, port)])
    }

    fn with_endpoints(endpoints: Vec<Endpoint>) -> Self {
        BrokerOptions {
            endpoints,
            tls: TlsOptions::default(),
            credentials: None,
            keep_alive: DEFAULT_KEEP_ALIVE,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            connect_timeout: Duration::from_secs(5),
            backoff_min: None,
            backoff_max: None,
            backoff_jitter: None,
            fresh_client_id_on_failover: false,
            mqtt_version: MqttVersion::V311,
        }
    }

    /// Parses one broker URL or several, comma-separated (a cluster's nodes):
    /// each `mqtt://host[:port]` (default port 1883), `mqtts://host[:port]`
    /// (8883), `ws://host[:port][/path]` (80) or `wss://host[:port][/path]`
    /// (443); the WebSocket path defaults to `/mqtt`. A bare `host[:port]`
    /// means `mqtt://`. TLS settings start empty (platform roots, no client
    /// certificate); set them in [`BrokerOptions::tls`].
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `broker` for another scheme, an empty host,
    /// a port that is not 1-65535, or no URL at all.
    pub fn from_url(urls: &str) -> Result<Self, Error> {
        Self::from_urls(urls.split(',').filter(|u| !u.trim().is_empty()))
    }

    /// Like [`BrokerOptions::from_url`], from separate URLs.
    ///
    /// # Errors
    /// As [`BrokerOptions::from_url`].
    pub fn from_urls<'a>(urls: impl IntoIterator<Item = &'a str>) -> Result<Self, Error> {
        let endpoints = urls
            .into_iter()
            .map(Endpoint::from_url)
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(Error::invalid(Field::Broker, "no broker URL given"));
        }
        Ok(Self::with_endpoints(endpoints))
    }

    /// Speak MQTT `version` (default [`MqttVersion::V311`]); the one way
    /// to choose MQTT 5, for a requester and a device alike:
    ///
    /// ```
    /// use directcall_core::{BrokerOptions, MqttVersion};
    ///
    /// let broker = BrokerOptions::from_url("mqtt://127.0.0.1:1883")?.mqtt_version(MqttVersion::V5);
    /// assert_eq!(broker.mqtt_version, MqttVersion::V5);
    /// # Ok::<(), directcall_core::Error>(())
    /// ```
    #[must_use]
    pub fn mqtt_version(mut self, version: MqttVersion) -> Self {
        self.mqtt_version = version;
        self
    }

    /// The first endpoint, the one tried first.
    ///
    /// # Panics
    /// When `endpoints` was emptied by hand.
    pub fn primary(&self) -> &Endpoint {
        &self.endpoints[0]
    }

    /// Whether any endpoint runs over TLS (and so uses [`BrokerOptions::tls`]).
    pub fn uses_tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.transport.uses_tls())
    }

    /// The TLS settings, when an endpoint uses TLS.
    pub fn tls_mut(&mut self) -> Option<&mut TlsOptions> {
        if self.uses_tls() {
            Some(&mut self.tls)
        } else {
            None
        }
    }

    /// The broker as URLs, comma-separated (no credentials, no query), for
    /// logs and messages.
    pub fn url(&self) -> String {
        self.endpoints
            .iter()
            .map(Endpoint::url)
            .collect::<Vec<_>>()
            .join(",")
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
            .field("tls", &self.tls)
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .field("keep_alive", &self.keep_alive)
            .field("ping_timeout", &self.ping_timeout)
            .field("max_packet_bytes", &self.max_packet_bytes)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("backoff_jitter", &self.backoff_jitter)
            .finish_non_exhaustive()
    }
}

/// Capped exponential backoff with jitter (the connection layer's): step
/// `n` (from 0) is `min(max, min_step * 2^n)`, and each delay is drawn from
/// its step as [`BackoffJitter`] says.
#[cfg(feature = "mqtt")]
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    jitter: BackoffJitter,
    next: Duration,
}

#[cfg(feature = "mqtt")]
impl Backoff {
    /// The backoff of `broker`, the requester's defaults where it says
    /// nothing (a device fills in its own before it connects); a default
    /// first step never exceeds a maximum that was set.
    pub(crate) fn of(broker: &BrokerOptions) -> Self {
        let max = broker.backoff_max.unwrap_or(DEFAULT_BACKOFF_MAX);
        Backoff::new(
            broker.backoff_min.unwrap_or(DEFAULT_BACKOFF_MIN.min(max)),
            max,
            broker.backoff_jitter.unwrap_or_default(),
        )
    }

    /// Starts at `min`, doubles up to `max`. A zero `min` would never
    /// grow, and retry in a busy loop: it is taken as 1 ms.
    pub(crate) fn new(min: Duration, max: Duration, jitter: BackoffJitter) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            jitter,
            next: min,
        }
    }

    /// The delay before the next attempt; `unit` in `[0, 1)` picks where in
    /// the current step it falls.
    pub(crate) fn next_delay(&mut self, unit: f64) -> Duration {
        let step = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        let unit = unit.clamp(0.0, 1.0);
        match self.jitter {
            BackoffJitter::UpperHalf => step.mul_f64(0.5 + 0.5 * unit),
            BackoffJitter::Full => step.mul_f64(unit),
        }
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
    fn a_password_in_a_broker_url_is_refused_without_being_shown() {
        for url in [
            "mqtt://user:s3cret@127.0.0.1:1883",
            "mqtts://:s3cret@broker.example",
            "wss://user:s3cret@broker.example/mqtt",
            "mqtt://a,mqtt://user:s3cret@b",
        ] {
            let e = BrokerOptions::from_url(url).unwrap_err();
            assert_eq!(e.field(), Field::Broker);
            assert!(!e.to_string().contains("s3cret"), "{e}");
            assert!(e.to_string().contains("--password"), "{e}");
        }
    }

    #[test]
    fn parses_broker_urls() {
        let b = BrokerOptions::from_url("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!(
            (b.primary().host.as_str(), b.primary().port),
            ("127.0.0.1", 1884)
        );
        let b = BrokerOptions::from_url("localhost").unwrap();
        assert_eq!(
            (b.primary().host.as_str(), b.primary().port),
            ("localhost", 1883)
        );
        let b = BrokerOptions::from_url("mqtt://[::1]:1999").unwrap();
        assert_eq!((b.primary().host.as_str(), b.primary().port), ("::1", 1999));
        assert_eq!(b.url(), "mqtt://[::1]:1999");
        let b = BrokerOptions::from_url("mqtts://iot.example.com").unwrap();
        assert_eq!(b.primary().port, 8883);
        assert_eq!(b.primary().transport, Transport::Tls);
        assert!(b.uses_tls());
        let b = BrokerOptions::from_url("ws://127.0.0.1:9001").unwrap();
        assert_eq!(
            b.primary().transport,
            Transport::Ws {
                path: "/mqtt".into()
            }
        );
        assert_eq!(b.url(), "ws://127.0.0.1:9001/mqtt");
        let b = BrokerOptions::from_url("wss://a.example/custom?x=1").unwrap();
        assert_eq!(b.primary().port, 443);
        assert!(matches!(&b.primary().transport, Transport::Wss { path } if path == "/custom?x=1"));
        assert_eq!(b.url(), "wss://a.example:443/custom");
        let mut b = BrokerOptions::new("h", 1);
        b.credentials = Some(("user".into(), "s3cret".into()));
        assert!(!format!("{b:?}").contains("s3cret"));
        assert!(b.tls_mut().is_none());
        for bad in [
            "ws:///mqtt",
            "http://x",
            "mqtt://:1",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://",
            "",
            " , ",
            "mqtt://a:1,http://b",
        ] {
            let e = BrokerOptions::from_url(bad).unwrap_err();
            assert_eq!(e.field(), Field::Broker, "{bad}");
        }
    }

    #[test]
    fn a_cluster_is_a_comma_separated_list_tried_in_order() {
        let b = BrokerOptions::from_url("mqtt://n1:1883, mqtts://n2,ws://n3:8080/mqtt").unwrap();
        let urls: Vec<String> = b.endpoints.iter().map(Endpoint::url).collect();
        assert_eq!(
            urls,
            ["mqtt://n1:1883", "mqtts://n2:8883", "ws://n3:8080/mqtt"]
        );
        assert_eq!(b.url(), urls.join(","));
        assert!(b.uses_tls());
        let b = BrokerOptions::from_urls(["mqtt://a", "mqtt://b:2"]).unwrap();
        assert_eq!(b.endpoints[1].port, 2);
    }

    #[test]
    #[cfg(feature = "mqtt")]
    fn backoff_doubles_caps_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(400), BackoffJitter::UpperHalf);
        let d: Vec<_> = (0..5).map(|_| b.next_delay(1.0).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 400, 400]);
        assert_eq!(b.next_delay(0.0).as_millis(), 200);
        b.reset();
        assert_eq!(b.next_delay(1.0).as_millis(), 100);
    }

    #[test]
    #[cfg(feature = "mqtt")]
    fn full_jitter_draws_from_zero_to_the_step() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(1000), ms(30_000), BackoffJitter::Full);
        let top: Vec<_> = (0..8).map(|_| b.next_delay(1.0).as_millis()).collect();
        assert_eq!(
            top,
            [1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
        );
        b.reset();
        // The first reconnect after a loss: anywhere in the first window.
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
        assert_eq!(b.next_delay(0.25).as_millis(), 500);
        assert_eq!(b.next_delay(0.5).as_millis(), 2000);
        // Out-of-range units are clamped, never negative or past the step.
        assert_eq!(b.next_delay(-3.0), Duration::ZERO);
        assert_eq!(b.next_delay(7.0).as_millis(), 16_000);
        // A zero first step still grows.
        let mut b = Backoff::new(Duration::ZERO, ms(4), BackoffJitter::Full);
        let top: Vec<_> = (0..4).map(|_| b.next_delay(1.0).as_millis()).collect();
        assert_eq!(top, [1, 2, 4, 4]);
        // A maximum below the first step is the first step.
        let mut b = Backoff::new(ms(500), ms(100), BackoffJitter::Full);
        assert_eq!(b.next_delay(1.0).as_millis(), 500);
        assert_eq!(b.next_delay(1.0).as_millis(), 500);
    }

    #[test]
    #[cfg(feature = "mqtt")]
    fn unset_backoff_fields_are_the_requesters_defaults() {
        let mut o = BrokerOptions::new("h", 1);
        let top = |o: &BrokerOptions| {
            let mut b = Backoff::of(o);
            (0..5)
                .map(|_| b.next_delay(1.0).as_millis())
                .collect::<Vec<_>>()
        };
        assert_eq!(top(&o), [100, 200, 400, 800, 1000]);
        assert_eq!(Backoff::of(&o).next_delay(0.0).as_millis(), 50);
        o.backoff_max = Some(Duration::from_millis(60));
        assert_eq!(top(&o), [60, 60, 60, 60, 60]);
        o.backoff_min = Some(Duration::from_millis(50));
        o.backoff_max = Some(Duration::from_millis(300));
        o.backoff_jitter = Some(BackoffJitter::Full);
        assert_eq!(top(&o), [50, 100, 200, 300, 300]);
        assert_eq!(Backoff::of(&o).next_delay(0.0), Duration::ZERO);
    }

    /// When each of `n` clients, cut off at 0 by a broker that is back at
    /// `outage`, connects again: each tries after its backoff delays (an
    /// attempt while the broker is down fails at once, as a refused TCP
    /// connect does) until one lands at or after `outage`. Sorted, relative
    /// to the broker's return.
    #[cfg(feature = "mqtt")]
    fn model_reconnects(backoff: &Backoff, n: usize, outage: Duration) -> Vec<Duration> {
        let mut rng = fastrand::Rng::with_seed(23);
        let mut back: Vec<Duration> = (0..n)
            .map(|_| {
                let mut b = backoff.clone();
                let mut t = Duration::ZERO;
                loop {
                    t += b.next_delay(rng.f64());
                    if t >= outage {
                        return t - outage;
                    }
                }
            })
            .collect();
        back.sort();
        back
    }

    /// Time to 10, 50, 90 and 100 % back, in ms, and the most in any
    /// 1-second bucket.
    #[cfg(feature = "mqtt")]
    fn curve(back: &[Duration]) -> ([u128; 4], usize) {
        let at = |p: usize| back[(back.len() * p / 100).min(back.len() - 1)].as_millis();
        let mut buckets = std::collections::BTreeMap::new();
        for t in back {
            *buckets.entry(t.as_secs()).or_insert(0usize) += 1;
        }
        let peak = buckets.values().copied().max().unwrap_or(0);
        ([at(10), at(50), at(90), at(100)], peak)
    }

    #[test]
    #[cfg(feature = "mqtt")]
    fn a_fleet_with_full_jitter_comes_back_spread_out() {
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        let device = Backoff::new(
            DEFAULT_DEVICE_BACKOFF_MIN,
            DEFAULT_DEVICE_BACKOFF_MAX,
            BackoffJitter::Full,
        );
        let requester = Backoff::new(
            DEFAULT_BACKOFF_MIN,
            DEFAULT_BACKOFF_MAX,
            BackoffJitter::UpperHalf,
        );
        for outage in [Duration::ZERO, secs(5), secs(60)] {
            for (name, b) in [("requester's", &requester), ("device's", &device)] {
                let (p, peak) = curve(&model_reconnects(b, 10_000, outage));
                println!(
                    "model, 10,000 clients, {name} backoff, broker back after {outage:?}: 10/50/90/100 % back in {p:?} ms, at most {peak} in one second"
                );
            }
        }
        // The requester's backoff, which devices had too: a 5 s outage is
        // followed by every client within a second.
        let (p, peak) = curve(&model_reconnects(&requester, 10_000, secs(5)));
        assert!(p[3] <= 1000, "{p:?}");
        assert_eq!(peak, 10_000);
        // A device's: spread over seconds, none later than the cap.
        let (p, peak) = curve(&model_reconnects(&device, 10_000, secs(5)));
        assert!(p[1] >= 1000 && p[3] <= 30_000, "{p:?}");
        assert!(peak < 5_000, "{peak}");
        let (p, peak) = curve(&model_reconnects(&device, 10_000, secs(60)));
        assert!(p[1] >= 5_000 && p[3] <= 30_000, "{p:?}");
        assert!(peak < 1_000, "{peak}");
        // A blip (the broker back at once): spread over the first window,
        // not all in the first 100 ms.
        let back = model_reconnects(&device, 10_000, Duration::ZERO);
        let early = back.iter().filter(|t| **t <= ms(100)).count();
        assert!(early < 1_500, "{early}");
        assert!(back[back.len() - 1] <= DEFAULT_DEVICE_BACKOFF_MIN);
    }
}
