//! rumqttc settings from [`ConnectionOptions`], with the traps of
//! PITFALLS.md set right, one set per broker endpoint.

use rumqttc::{LastWill, MqttOptions, NetworkOptions};

use super::{ConnectionOptions, SetupError};
use crate::broker::{Endpoint, Transport};

/// Largest incoming packet accepted at least: 1 MiB. rumqttc drops the whole
/// connection on an oversized packet, so one hostile message would cost
/// every call in flight; oversized messages are dropped one by one above.
pub(crate) const MIN_INCOMING_PACKET_BYTES: usize = 1024 * 1024;

/// The rumqttc options of every endpoint, in order, and the network options
/// they share.
pub(crate) fn all_endpoints(
    options: &ConnectionOptions,
) -> Result<(Vec<MqttOptions>, NetworkOptions), SetupError> {
    if options.broker.endpoints.is_empty() {
        return Err(SetupError::NoEndpoint);
    }
    let all = options
        .broker
        .endpoints
        .iter()
        .map(|e| endpoint_options(options, e))
        .collect::<Result<Vec<_>, _>>()?;
    let mut net = NetworkOptions::new();
    // Without it every call pays Nagle + delayed ACK: ~88 ms instead of ~0.1 ms.
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(options.broker.connect_timeout.as_secs().max(1));
    Ok((all, net))
}

/// The rumqttc options of the first endpoint (for bare test clients).
#[cfg(feature = "testkit")]
pub(crate) fn rumqttc_options(
    options: &ConnectionOptions,
) -> Result<(MqttOptions, NetworkOptions), SetupError> {
    let (mut all, net) = all_endpoints(options)?;
    Ok((all.swap_remove(0), net))
}

fn endpoint_options(
    options: &ConnectionOptions,
    endpoint: &Endpoint,
) -> Result<MqttOptions, SetupError> {
    let broker = &options.broker;
    let client_id = options.client_id.as_str();
    let (host, port) = (&endpoint.host, endpoint.port);
    let mut mqtt = match &endpoint.transport {
        #[cfg(feature = "websocket")]
        Transport::Ws { path } => {
            MqttOptions::new(client_id, format!("ws://{host}:{port}{path}"), port)
        }
        // AWS IoT's SigV4 refuses a Host header with :443, so the default
        // port stays implicit.
        #[cfg(all(feature = "websocket", feature = "tls"))]
        Transport::Wss { path } if port == 443 => {
            MqttOptions::new(client_id, format!("wss://{host}{path}"), port)
        }
        #[cfg(all(feature = "websocket", feature = "tls"))]
        Transport::Wss { path } => {
            MqttOptions::new(client_id, format!("wss://{host}:{port}{path}"), port)
        }
        Transport::Tcp | Transport::Tls => MqttOptions::new(client_id, host.clone(), port),
        // Refused below: the feature is not compiled in.
        #[cfg(not(all(feature = "websocket", feature = "tls")))]
        Transport::Wss { .. } => MqttOptions::new(client_id, host.clone(), port),
        #[cfg(not(feature = "websocket"))]
        Transport::Ws { .. } => MqttOptions::new(client_id, host.clone(), port),
    };
    mqtt.set_keep_alive(broker.keep_alive)
        .set_clean_session(true)
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
    #[allow(unused_variables)]
    let unsupported = |feature| SetupError::Unsupported {
        url: endpoint.url(),
        feature,
    };
    match &endpoint.transport {
        Transport::Tcp => {}
        #[cfg(feature = "tls")]
        Transport::Tls => {
            mqtt.set_transport(rumqttc::Transport::Tls(super::tls::rumqttc_config(
                &broker.tls,
            )?));
        }
        #[cfg(not(feature = "tls"))]
        Transport::Tls => return Err(unsupported("tls")),
        #[cfg(feature = "websocket")]
        Transport::Ws { .. } => {
            mqtt.set_transport(rumqttc::Transport::Ws);
        }
        #[cfg(not(feature = "websocket"))]
        Transport::Ws { .. } => return Err(unsupported("websocket")),
        #[cfg(all(feature = "websocket", feature = "tls"))]
        Transport::Wss { path } => {
            mqtt.set_transport(rumqttc::Transport::Wss(super::tls::rumqttc_config(
                &broker.tls,
            )?));
            if let Some(signer) = options.url_signer.clone() {
                let unsigned = match port {
                    443 => format!("wss://{host}{}", strip_query(path)),
                    port => format!("wss://{host}:{port}{}", strip_query(path)),
                };
                mqtt.set_request_modifier(move |mut request: http::Request<()>| {
                    // Signed anew for every attempt: presigned URLs expire.
                    let signed = signer.sign(&unsigned);
                    async move {
                        match signed.map(|url| url.parse::<http::Uri>()) {
                            Ok(Ok(uri)) => *request.uri_mut() = uri,
                            Ok(Err(e)) => tracing::error!("signed URL does not parse: {e}"),
                            Err(e) => tracing::error!("URL signing failed: {e}"),
                        }
                        request
                    }
                });
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
