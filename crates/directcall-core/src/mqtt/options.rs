//! rumqttc settings from [`ConnectionOptions`], with rumqttc's traps set
//! right (TCP_NODELAY, packet sizes, clean sessions), one set per broker
//! endpoint.

#[cfg(all(feature = "websocket", feature = "tls"))]
use std::sync::Arc;

use rumqttc::{LastWill, MqttOptions, NetworkOptions};

use super::transport::Endpoints;
use super::{ConnectionOptions, SetupError};
use crate::broker::{Endpoint, MqttVersion, Transport};

/// Largest incoming packet accepted at least: 1 MiB. rumqttc drops the whole
/// connection on an oversized packet, so one hostile message would cost
/// every call in flight; oversized messages are dropped one by one above.
pub(crate) const MIN_INCOMING_PACKET_BYTES: usize = 1024 * 1024;

/// The rumqttc options of every endpoint, in order, for the broker's MQTT
/// version, and the network options they share.
pub(crate) fn all_endpoints(
    options: &ConnectionOptions,
) -> Result<(Endpoints, NetworkOptions), SetupError> {
    if options.broker.endpoints.is_empty() {
        return Err(SetupError::NoEndpoint);
    }
    let mut net = NetworkOptions::new();
    // Without it every call pays Nagle + delayed ACK: ~88 ms instead of ~0.1 ms.
    net.set_tcp_nodelay(true);
    // And the broker's side: one that leaves Nagle on (Mosquitto as shipped)
    // holds the second of two small packets it sends back to back (a PUBACK
    // or a receipt, then the reply) until this side's delayed ACK: 44 ms per
    // call. Acknowledging every read at once removes that (Linux, Android).
    net.set_tcp_quickack(true);
    net.set_connection_timeout(options.broker.connect_timeout.as_secs().max(1));
    let endpoints = &options.broker.endpoints;
    let all = match options.broker.mqtt_version {
        MqttVersion::V311 => Endpoints::V4(
            endpoints
                .iter()
                .map(|e| endpoint_options(options, e))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        MqttVersion::V5 => Endpoints::V5(
            endpoints
                .iter()
                .map(|e| {
                    let mut mqtt = endpoint_options_v5(options, e)?;
                    mqtt.set_network_options(net.clone());
                    Ok(mqtt)
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok((all, net))
}

/// What both versions' options can be told: the transport and the URL
/// signing hook.
trait Settable {
    fn new_options(client_id: &str, host: String, port: u16) -> Self;
    #[cfg(any(feature = "tls", feature = "websocket"))]
    fn transport(&mut self, transport: rumqttc::Transport);
    #[cfg(all(feature = "websocket", feature = "tls"))]
    fn sign_with(&mut self, signer: Arc<dyn super::UrlSigner>, unsigned: String);
}

#[cfg(all(feature = "websocket", feature = "tls"))]
fn signing(
    signer: Arc<dyn super::UrlSigner>,
    unsigned: String,
) -> impl Fn(
    http::Request<()>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = http::Request<()>> + Send>>
       + Send
       + Sync
       + 'static {
    move |mut request: http::Request<()>| {
        // Signed anew for every attempt: presigned URLs expire.
        let signed = signer.sign(&unsigned);
        Box::pin(async move {
            match signed.map(|url| url.parse::<http::Uri>()) {
                Ok(Ok(uri)) => *request.uri_mut() = uri,
                Ok(Err(e)) => tracing::error!("signed URL does not parse: {e}"),
                Err(e) => tracing::error!("URL signing failed: {e}"),
            }
            request
        })
    }
}

impl Settable for MqttOptions {
    fn new_options(client_id: &str, host: String, port: u16) -> Self {
        MqttOptions::new(client_id, host, port)
    }
    #[cfg(any(feature = "tls", feature = "websocket"))]
    fn transport(&mut self, transport: rumqttc::Transport) {
        self.set_transport(transport);
    }
    #[cfg(all(feature = "websocket", feature = "tls"))]
    fn sign_with(&mut self, signer: Arc<dyn super::UrlSigner>, unsigned: String) {
        self.set_request_modifier(signing(signer, unsigned));
    }
}

impl Settable for rumqttc::v5::MqttOptions {
    fn new_options(client_id: &str, host: String, port: u16) -> Self {
        rumqttc::v5::MqttOptions::new(client_id, host, port)
    }
    #[cfg(any(feature = "tls", feature = "websocket"))]
    fn transport(&mut self, transport: rumqttc::Transport) {
        self.set_transport(transport);
    }
    #[cfg(all(feature = "websocket", feature = "tls"))]
    fn sign_with(&mut self, signer: Arc<dyn super::UrlSigner>, unsigned: String) {
        self.set_request_modifier(signing(signer, unsigned));
    }
}

fn endpoint_options(
    options: &ConnectionOptions,
    endpoint: &Endpoint,
) -> Result<MqttOptions, SetupError> {
    let broker = &options.broker;
    let mut mqtt: MqttOptions = with_transport(options, endpoint)?;
    mqtt.set_keep_alive(broker.keep_alive)
        .set_clean_session(options.session_expiry.is_none())
        .set_max_packet_size(
            broker.max_packet_bytes.max(MIN_INCOMING_PACKET_BYTES),
            broker.max_packet_bytes,
        );
    if let Some((user, pass)) = &broker.credentials {
        mqtt.set_credentials(user.clone(), pass.clone());
    }
    if let Some(will) = &options.will {
        mqtt.set_last_will(LastWill::new(
            will.topic.clone(),
            will.payload.clone(),
            will.qos.to_rumqttc(),
            will.retain,
        ));
    }
    Ok(mqtt)
}

fn endpoint_options_v5(
    options: &ConnectionOptions,
    endpoint: &Endpoint,
) -> Result<rumqttc::v5::MqttOptions, SetupError> {
    use rumqttc::v5::mqttbytes::{v5::LastWill as LastWill5, QoS as QoS5};
    let broker = &options.broker;
    let mut mqtt: rumqttc::v5::MqttOptions = with_transport(options, endpoint)?;
    mqtt.set_keep_alive(broker.keep_alive)
        .set_clean_start(options.session_expiry.is_none())
        .set_connection_timeout(broker.connect_timeout.as_secs().max(1))
        // What this side accepts; what it sends is checked before publishing.
        .set_max_packet_size(Some(
            u32::try_from(broker.max_packet_bytes.max(MIN_INCOMING_PACKET_BYTES))
                .unwrap_or(u32::MAX),
        ));
    if let Some(expiry) = options.session_expiry {
        mqtt.set_session_expiry_interval(Some(u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX)));
    }
    if let Some((user, pass)) = &broker.credentials {
        mqtt.set_credentials(user.clone(), pass.clone());
    }
    if let Some(will) = &options.will {
        let qos = match will.qos {
            super::QoS::AtMostOnce => QoS5::AtMostOnce,
            super::QoS::AtLeastOnce => QoS5::AtLeastOnce,
        };
        mqtt.set_last_will(LastWill5::new(
            will.topic.clone(),
            will.payload.clone(),
            qos,
            will.retain,
            None,
        ));
    }
    Ok(mqtt)
}

/// Options for `endpoint` with its transport set (TLS, WebSockets, the URL
/// signer), either version.
fn with_transport<O: Settable>(
    options: &ConnectionOptions,
    endpoint: &Endpoint,
) -> Result<O, SetupError> {
    #[allow(unused_variables)]
    let broker = &options.broker;
    let client_id = options.client_id.as_str();
    let (host, port) = (&endpoint.host, endpoint.port);
    #[allow(unused_mut)]
    let mut mqtt = match &endpoint.transport {
        #[cfg(feature = "websocket")]
        Transport::Ws { path } => {
            O::new_options(client_id, format!("ws://{host}:{port}{path}"), port)
        }
        // AWS IoT's SigV4 refuses a Host header with :443, so the default
        // port stays implicit.
        #[cfg(all(feature = "websocket", feature = "tls"))]
        Transport::Wss { path } if port == 443 => {
            O::new_options(client_id, format!("wss://{host}{path}"), port)
        }
        #[cfg(all(feature = "websocket", feature = "tls"))]
        Transport::Wss { path } => {
            O::new_options(client_id, format!("wss://{host}:{port}{path}"), port)
        }
        Transport::Tcp | Transport::Tls => O::new_options(client_id, host.clone(), port),
        // Refused below: the feature is not compiled in.
        #[cfg(not(all(feature = "websocket", feature = "tls")))]
        Transport::Wss { .. } => O::new_options(client_id, host.clone(), port),
        #[cfg(not(feature = "websocket"))]
        Transport::Ws { .. } => O::new_options(client_id, host.clone(), port),
    };
    #[allow(unused_variables)]
    let unsupported = |feature| SetupError::Unsupported {
        url: endpoint.url(),
        feature,
    };
    match &endpoint.transport {
        Transport::Tcp => {}
        #[cfg(feature = "tls")]
        Transport::Tls => {
            mqtt.transport(rumqttc::Transport::Tls(super::tls::rumqttc_config(
                &broker.tls,
            )?));
        }
        #[cfg(not(feature = "tls"))]
        Transport::Tls => return Err(unsupported("tls")),
        #[cfg(feature = "websocket")]
        Transport::Ws { .. } => {
            mqtt.transport(rumqttc::Transport::Ws);
        }
        #[cfg(not(feature = "websocket"))]
        Transport::Ws { .. } => return Err(unsupported("websocket")),
        #[cfg(all(feature = "websocket", feature = "tls"))]
        Transport::Wss { path } => {
            mqtt.transport(rumqttc::Transport::Wss(super::tls::rumqttc_config(
                &broker.tls,
            )?));
            if let Some(signer) = options.url_signer.clone() {
                let unsigned = match port {
                    443 => format!("wss://{host}{}", strip_query(path)),
                    port => format!("wss://{host}:{port}{}", strip_query(path)),
                };
                mqtt.sign_with(signer, unsigned);
            }
        }
        #[cfg(not(all(feature = "websocket", feature = "tls")))]
        Transport::Wss { .. } => return Err(unsupported("websocket\" and \"tls")),
    }
    Ok(mqtt)
}

#[cfg(all(feature = "websocket", feature = "tls"))]
fn strip_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}
