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

/// How to reach a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerOptions {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
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
            credentials: None,
            keep_alive: DEFAULT_KEEP_ALIVE,
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            connect_timeout: Duration::from_secs(5),
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }

    /// Parses `mqtt://host[:port]` (or a bare `host[:port]`).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `broker` when the scheme is not `mqtt`, the
    /// host is empty or the port is not a number 1–65535.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let rest = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some((scheme, _)) => {
                return Err(Error::invalid(
                    Field::Broker,
                    format!("scheme {scheme:?} is not supported here; use mqtt://host:port"),
                ))
            }
            None => url,
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    Error::invalid(Field::Broker, format!("port {p:?} is not 1-65535"))
                })?;
                (h, port)
            }
            _ => (rest, DEFAULT_MQTT_PORT),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(Error::invalid(Field::Broker, format!("no host in {url:?}")));
        }
        Ok(Self::new(host, port))
    }
}

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay before the next attempt; `unit` in `[0, 1)` picks the jitter,
    /// which spreads delays over the upper half of the current step.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// Back to the first step, after a successful connection.
    pub fn reset(&mut self) {
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
        for bad in [
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
