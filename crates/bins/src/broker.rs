//! The embedded broker: rumqttd in-process, so the demo and the examples need
//! nothing installed.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use directcall_core::BrokerOptions;
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

/// An MQTT 3.1.1 broker running on its own thread for the life of the
/// process (rumqttd has no shutdown).
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
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
        let mut broker = Broker::new(config(addr));
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!("embedded broker stopped: {e}");
                }
            })
            .map_err(BrokerError::Port)?;
        let until = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > until {
                return Err(BrokerError::NotListening(addr));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(EmbeddedBroker { addr })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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

fn config(addr: SocketAddr) -> Config {
    // RouterConfig::default() is all zeros: every limit is set here.
    let router = RouterConfig {
        max_connections: 10_010,
        max_outgoing_packet_count: 1024,
        max_segment_size: 100 * 1024 * 1024,
        max_segment_count: 10,
        ..RouterConfig::default()
    };
    let server = ServerSettings {
        name: "v4-1".into(),
        listen: addr,
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
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Config::default()
    }
}
