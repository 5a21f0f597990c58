//! rumqttc settings from [`ConnectionOptions`], with the traps of
//! PITFALLS.md set right.

use rumqttc::{LastWill, MqttOptions, NetworkOptions};

use super::{ConnectionOptions, SetupError};
use crate::broker::Transport;

/// Largest incoming packet accepted at least: 1 MiB. rumqttc drops the whole
/// connection on an oversized packet, so one hostile message would cost
/// every call in flight; oversized messages are dropped one by one above.
pub(crate) const MIN_INCOMING_PACKET_BYTES: usize = 1024 * 1024;

pub(crate) fn rumqttc_options(
    options: &ConnectionOptions,
) -> Result<(MqttOptions, NetworkOptions), SetupError> {
    let broker = &options.broker;
    let client_id = options.client_id.as_str();
    let mut mqtt = match &broker.transport {
        #[cfg(feature = "websocket")]
        Transport::Ws { path } => {
            let url = format!("ws://{}:{}{path}", broker.host, broker.port);
            MqttOptions::new(client_id, url, broker.port)
        }
        // AWS IoT's SigV4 refuses a Host header with :443, so the default
        // port stays implicit.
        #[cfg(all(feature = "websocket", feature = "tls"))]
        Transport::Wss { path, .. } if broker.port == 443 => {
            MqttOptions::new(client_id, format!("wss://{}{path}", broker.host), 443)
        }
        #[cfg(all(feature = "websocket", feature = "tls"))]
        Transport::Wss { path, .. } => {
            let url = format!("wss://{}:{}{path}", broker.host, broker.port);
            MqttOptions::new(client_id, url, broker.port)
        }
        _ => MqttOptions::new(client_id, broker.host.clone(), broker.port),
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
        url: broker.url(),
        feature,
    };
    match &broker.transport {
        Transport::Tcp => {}
        #[cfg(feature = "tls")]
        Transport::Tls(tls) => {
            mqtt.set_transport(rumqttc::Transport::Tls(super::tls::rumqttc_config(tls)?));
        }
        #[cfg(not(feature = "tls"))]
        Transport::Tls(_) => return Err(unsupported("tls")),
        #[cfg(feature = "websocket")]
        Transport::Ws { .. } => {
            mqtt.set_transport(rumqttc::Transport::Ws);
        }
        #[cfg(not(feature = "websocket"))]
        Transport::Ws { .. } => return Err(unsupported("websocket")),
        #[cfg(all(feature = "websocket", feature = "tls"))]
        Transport::Wss { tls, path } => {
            mqtt.set_transport(rumqttc::Transport::Wss(super::tls::rumqttc_config(tls)?));
            if let Some(signer) = options.url_signer.clone() {
                let unsigned = match broker.port {
                    443 => format!("wss://{}{}", broker.host, strip_query(path)),
                    port => format!("wss://{}:{port}{}", broker.host, strip_query(path)),
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
    let mut net = NetworkOptions::new();
    // Without it every call pays Nagle + delayed ACK: ~88 ms instead of ~0.1 ms.
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(broker.connect_timeout.as_secs().max(1));
    Ok((mqtt, net))
}

#[cfg(all(feature = "websocket", feature = "tls"))]
fn strip_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}
