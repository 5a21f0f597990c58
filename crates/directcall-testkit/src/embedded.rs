//! The embedded broker: rumqttd in-process, so the tests, the demo and the
//! examples need nothing installed.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use directcall_core::broker::{BrokerOptions, MqttVersion};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// No free port could be found.
    #[error("no free port: {0}")]
    Port(#[source] std::io::Error),
    /// The broker thread did not accept connections in time.
    #[error("embedded broker did not listen on {0} within 5 s")]
    NotListening(SocketAddr),
}

/// An MQTT broker running on its own thread for the life of the process
/// (rumqttd has no shutdown): MQTT 3.1.1 on one port, MQTT 5 on another
/// (rumqttd serves one version per listener).
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    addr_v5: SocketAddr,
}

/// A free TCP port on 127.0.0.1, found by binding port 0.
///
/// # Errors
/// When binding fails.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EmbeddedBroker {
    /// Starts a broker on 127.0.0.1 at `port`, or on a free port when `None`,
    /// and returns once it accepts connections.
    ///
    /// # Errors
    /// [`BrokerError`] when no port is free or the broker does not listen.
    pub fn start(port: Option<u16>) -> Result<Self, BrokerError> {
        let port = match port {
            Some(p) => p,
            None => free_port().map_err(BrokerError::Port)?,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let addr_v5 = SocketAddr::from(([127, 0, 0, 1], free_port().map_err(BrokerError::Port)?));
        let mut broker = Broker::new(config(addr, addr_v5));
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!("embedded broker stopped: {e}");
                }
            })
            .map_err(BrokerError::Port)?;
        let until = Instant::now() + Duration::from_secs(5);
        while !answers_mqtt(addr) {
            if Instant::now() > until {
                return Err(BrokerError::NotListening(addr));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(EmbeddedBroker { addr, addr_v5 })
    }

    /// Where it listens for MQTT 3.1.1.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it listens for MQTT 5.
    pub fn addr_v5(&self) -> SocketAddr {
        self.addr_v5
    }

    /// Its MQTT 5 URL, `mqtt://127.0.0.1:PORT` (give the client version 5).
    pub fn url_v5(&self) -> String {
        format!("mqtt://{}", self.addr_v5)
    }

    /// Connection settings for its MQTT 5 listener.
    pub fn options_v5(&self) -> BrokerOptions {
        let mut options = BrokerOptions::new(self.addr_v5.ip().to_string(), self.addr_v5.port());
        options.mqtt_version = MqttVersion::V5;
        options
    }

    /// Its URL, `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// Connection settings for it.
    pub fn options(&self) -> BrokerOptions {
        BrokerOptions::new(self.addr.ip().to_string(), self.addr.port())
    }
}

/// Whether an MQTT broker at `addr` accepts a CONNECT. A full exchange
/// (CONNECT, CONNACK, DISCONNECT) rather than a bare TCP connect, which
/// rumqttd would log as an error.
fn answers_mqtt(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    // CONNECT, MQTT 3.1.1, clean session, keepalive 60 s, client id "probe"
    const CONNECT: [u8; 19] = [
        0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 5, b'p', b'r', b'o', b'b', b'e',
    ];
    const DISCONNECT: [u8; 2] = [0xe0, 0];
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut connack = [0u8; 4];
    let ok = stream.write_all(&CONNECT).is_ok()
        && stream.read_exact(&mut connack).is_ok()
        && connack == [0x20, 2, 0, 0];
    let _ = stream.write_all(&DISCONNECT);
    ok
}

fn config(addr: SocketAddr, addr_v5: SocketAddr) -> Config {
    // RouterConfig::default() is all zeros: every limit is set here.
    let router = RouterConfig {
        max_connections: 10_010,
        max_outgoing_packet_count: 1024,
        max_segment_size: 100 * 1024 * 1024,
        max_segment_count: 10,
        ..RouterConfig::default()
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            // Above any directcall limit: the broker is never the one refusing.
            max_payload_size: 2 * 1024 * 1024,
            max_inflight_count: 1024,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("1".to_owned(), server("v4-1", addr))])),
        v5: Some(HashMap::from([("1".to_owned(), server("v5-1", addr_v5))])),
        ..Config::default()
    }
}
