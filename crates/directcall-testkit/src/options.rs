//! rumqttc options for the bare peers, from directcall's broker settings:
//! the first endpoint, its transport (TCP, TLS, WebSockets; no URL
//! signing), TCP_NODELAY, a clean session and none of directcall's checks.
//!
//! directcall-core builds its own options for its connection layer and
//! keeps them to itself (no rumqttc type in its API); a bare peer only
//! needs to reach the broker the same way.

use std::sync::Arc;

use directcall_core::broker::{BrokerOptions, Endpoint, Transport};
use directcall_core::mqtt::{tls, QoS, SetupError};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use rumqttc::{MqttOptions, NetworkOptions, TlsConfiguration};

/// Largest incoming packet a bare peer accepts at least: 1 MiB, as
/// directcall's own sides.
const MIN_INCOMING_PACKET_BYTES: usize = 1024 * 1024;

/// MQTT 3.1.1 options for the first endpoint of `broker`, as `client_id`,
/// and the network options to give its event loop.
pub(crate) fn v311(
    broker: &BrokerOptions,
    client_id: &str,
) -> Result<(MqttOptions, NetworkOptions), SetupError> {
    let endpoint = first(broker)?;
    let (host, transport) = host_and_transport(broker, endpoint)?;
    let mut mqtt = MqttOptions::new(client_id, host, endpoint.port);
    mqtt.set_transport(transport)
        .set_keep_alive(broker.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(
            broker.max_packet_bytes.max(MIN_INCOMING_PACKET_BYTES),
            broker.max_packet_bytes,
        );
    if let Some((user, pass)) = &broker.credentials {
        mqtt.set_credentials(user.clone(), pass.clone());
    }
    Ok((mqtt, network(broker)))
}

/// MQTT 5 options for the first endpoint of `broker`, as `client_id`, with
/// the network options set.
pub(crate) fn v5(
    broker: &BrokerOptions,
    client_id: &str,
) -> Result<rumqttc::v5::MqttOptions, SetupError> {
    let endpoint = first(broker)?;
    let (host, transport) = host_and_transport(broker, endpoint)?;
    let mut mqtt = rumqttc::v5::MqttOptions::new(client_id, host, endpoint.port);
    mqtt.set_transport(transport)
        .set_keep_alive(broker.keep_alive)
        .set_clean_start(true)
        .set_connection_timeout(broker.connect_timeout.as_secs().max(1))
        .set_max_packet_size(Some(
            u32::try_from(broker.max_packet_bytes.max(MIN_INCOMING_PACKET_BYTES))
                .unwrap_or(u32::MAX),
        ));
    if let Some((user, pass)) = &broker.credentials {
        mqtt.set_credentials(user.clone(), pass.clone());
    }
    mqtt.set_network_options(network(broker));
    Ok(mqtt)
}

/// rumqttc's QoS for directcall's.
pub(crate) fn qos(qos: QoS) -> rumqttc::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        // AtLeastOnce, and anything higher (directcall has no QoS 2).
        _ => rumqttc::QoS::AtLeastOnce,
    }
}

/// The number of an MQTT 5 PUBACK reason code.
pub(crate) fn puback_code(reason: PubAckReason) -> u8 {
    use PubAckReason as R;
    match reason {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn first(broker: &BrokerOptions) -> Result<&Endpoint, SetupError> {
    broker.endpoints.first().ok_or(SetupError::NoEndpoint)
}

fn network(broker: &BrokerOptions) -> NetworkOptions {
    let mut net = NetworkOptions::new();
    // Without it every exchange pays Nagle and the peer's delayed ACK
    // (up to 40 ms on Linux).
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(broker.connect_timeout.as_secs().max(1));
    net
}

/// The host argument rumqttc wants (a whole URL for WebSockets) and the
/// transport.
fn host_and_transport(
    broker: &BrokerOptions,
    endpoint: &Endpoint,
) -> Result<(String, rumqttc::Transport), SetupError> {
    let (host, port) = (&endpoint.host, endpoint.port);
    let tls = || -> Result<TlsConfiguration, SetupError> {
        Ok(TlsConfiguration::Rustls(Arc::new(tls::client_config(
            &broker.tls,
        )?)))
    };
    Ok(match &endpoint.transport {
        Transport::Ws { path } => (format!("ws://{host}:{port}{path}"), rumqttc::Transport::Ws),
        Transport::Wss { path } => (
            format!("wss://{host}:{port}{path}"),
            rumqttc::Transport::Wss(tls()?),
        ),
        Transport::Tls => (host.clone(), rumqttc::Transport::Tls(tls()?)),
        Transport::Tcp => (host.clone(), rumqttc::Transport::Tcp),
        other => panic!("a bare peer cannot use {other:?} yet: add it to the test kit"),
    })
}
