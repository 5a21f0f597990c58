//! The MQTT connection machinery the requester and `directcall-device` share:
//! rumqttc settings from [`BrokerOptions`] (with the traps of PITFALLS.md set
//! right), TLS, and the one task that drives a connection.
//!
//! Not a stable API: it exists so the two sides do not carry two copies.

use std::sync::Arc;
use std::time::Duration;

use directcall_core::{Backoff, BrokerOptions, TlsOptions, Transport};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, SubscribeFilter,
    SubscribeReasonCode, TlsConfiguration,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

/// Largest incoming packet accepted at least: 1 MiB.
pub const MIN_INCOMING_PACKET_BYTES: usize = 1024 * 1024;

/// rumqttc options for `broker` as `client_id`.
///
/// # Errors
/// A message when the TLS material cannot be used (no certificate in the CA
/// file, an unreadable key, ...).
pub fn mqtt_options(
    broker: &BrokerOptions,
    client_id: &str,
) -> Result<(MqttOptions, NetworkOptions), String> {
    let mut mqtt = match &broker.transport {
        Transport::Ws { path } => MqttOptions::new(
            client_id,
            format!("ws://{}:{}{path}", broker.host, broker.port),
            broker.port,
        ),
        // AWS IoT's SigV4 rejects a Host header with :443, so the default port stays implicit.
        Transport::Wss { path, .. } if broker.port == 443 => MqttOptions::new(
            client_id,
            format!("wss://{}{path}", broker.host),
            broker.port,
        ),
        Transport::Wss { path, .. } => MqttOptions::new(
            client_id,
            format!("wss://{}:{}{path}", broker.host, broker.port),
            broker.port,
        ),
        _ => MqttOptions::new(client_id, broker.host.clone(), broker.port),
    };
    mqtt.set_keep_alive(broker.keep_alive)
        .set_clean_session(true)
        // Incoming packets get room to spare: rumqttc drops the whole
        // connection on an oversized one, so one hostile message would cost
        // every call in flight. Oversized messages are dropped one by one above.
        .set_max_packet_size(
            broker.max_packet_bytes.max(MIN_INCOMING_PACKET_BYTES),
            broker.max_packet_bytes,
        );
    if let Some((user, pass)) = &broker.credentials {
        mqtt.set_credentials(user.clone(), pass.clone());
    }
    match &broker.transport {
        Transport::Tcp => {}
        Transport::Tls(tls) => {
            mqtt.set_transport(rumqttc::Transport::Tls(tls_configuration(tls)?));
        }
        Transport::Ws { .. } => {
            mqtt.set_transport(rumqttc::Transport::Ws);
        }
        Transport::Wss { tls, path } => {
            mqtt.set_transport(rumqttc::Transport::Wss(tls_configuration(tls)?));
            if let Some(creds) = broker.aws_sigv4.clone() {
                // Signed anew for every connection attempt: presigned URLs
                // expire, and AWS IoT ends connections after 24 h.
                let (host, path) = (broker.host.clone(), path.clone());
                mqtt.set_request_modifier(move |mut request: http::Request<()>| {
                    let signed = crate::sigv4::presign_iot_url(
                        &host,
                        &path,
                        &creds,
                        std::time::SystemTime::now(),
                    );
                    async move {
                        match signed.map(|url| url.parse::<http::Uri>()) {
                            Ok(Ok(uri)) => *request.uri_mut() = uri,
                            Ok(Err(e)) => tracing::error!("presigned URL: {e}"),
                            Err(e) => tracing::error!("{e}"),
                        }
                        request
                    }
                });
            }
        }
        other => return Err(format!("transport {other:?} is not supported")),
    }
    let mut net = NetworkOptions::new();
    // Without it every call pays Nagle + delayed ACK: ~88 ms instead of ~0.1 ms.
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(broker.connect_timeout.as_secs().max(1));
    Ok((mqtt, net))
}

/// A rustls client configuration from PEM material, with the ring provider
/// passed explicitly (no process-wide default needed).
///
/// # Errors
/// A message naming the part that could not be used.
pub fn tls_config(tls: &TlsOptions) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("CA certificate: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("CA certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err("CA file holds no PEM certificate".into());
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no CA given and no platform root certificates found".into());
            }
        }
    }
    let builder = builder.with_root_certificates(roots);
    let mut config = match &tls.client_auth {
        Some((cert_pem, key_pem)) => {
            let certs = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client certificate: {e}"))?;
            if certs.is_empty() {
                return Err("client certificate file holds no PEM certificate".into());
            }
            let key =
                PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("client key: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate and key: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

fn tls_configuration(tls: &TlsOptions) -> Result<TlsConfiguration, String> {
    Ok(TlsConfiguration::Rustls(Arc::new(tls_config(tls)?)))
}

/// What one side of directcall does with its connection's events.
pub trait Session: Send + Sync + 'static {
    /// The client that feeds the event loop.
    fn client(&self) -> &AsyncClient;
    /// Up and subscribed, or not.
    fn ready(&self) -> &watch::Sender<bool>;
    /// Subscriptions to make on every connection. The session is ready once
    /// the first is granted; the others are optional and asked for after it.
    fn filters(&self) -> Vec<SubscribeFilter>;
    /// A connection was made, before its subscriptions are acknowledged.
    fn connected(&self) {}
    /// A message arrived.
    fn publish(self: &Arc<Self>, topic: &str, payload: &[u8]);
    /// The connection failed or was lost, with why.
    fn disconnected(&self, _error: &str) {}
    /// The task is stopping, before DISCONNECT is sent.
    fn stopping(&self) {}
}

/// Queues `request` without ever blocking the caller (the driver above all):
/// when the request channel is full, a task waits for room instead.
pub fn send_nowait(client: &AsyncClient, request: Outgoing) {
    let done = match &request {
        Outgoing::Subscribe(filters) => client.try_subscribe_many(filters.clone()),
        Outgoing::Publish {
            topic,
            qos,
            retain,
            payload,
        } => client.try_publish(topic.clone(), *qos, *retain, payload.clone()),
    };
    if done.is_err() {
        let client = client.clone();
        tokio::spawn(async move {
            let _ = match request {
                Outgoing::Subscribe(filters) => client.subscribe_many(filters).await,
                Outgoing::Publish {
                    topic,
                    qos,
                    retain,
                    payload,
                } => client.publish(topic, qos, retain, payload).await,
            };
        });
    }
}

/// A request for the event loop.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// SUBSCRIBE to these filters.
    Subscribe(Vec<SubscribeFilter>),
    /// PUBLISH.
    Publish {
        /// Topic.
        topic: String,
        /// QoS.
        qos: rumqttc::QoS,
        /// Retain flag.
        retain: bool,
        /// Payload.
        payload: Vec<u8>,
    },
}

/// Drives one connection until `shutdown` turns true: polls the event loop,
/// hands messages to `session`, resubscribes on every connection, and
/// reconnects after errors with capped, jittered backoff. Never awaits user
/// code or a full channel.
pub async fn drive<S: Session>(
    session: Arc<S>,
    mut eventloop: EventLoop,
    mut backoff: Backoff,
    mut shutdown: watch::Receiver<bool>,
) {
    let filters = session.filters();
    let (essential, optional) = filters.split_at(filters.len().min(1));
    let mut optional: Vec<SubscribeFilter> = optional.to_vec();
    // Which SUBACK comes next: the essential filter's, then the optional ones'.
    let mut awaiting_optional = false;
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => session.publish(&p.topic, &p.payload),
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                awaiting_optional = false;
                // Subscriptions do not survive a clean-session reconnect.
                send_nowait(session.client(), Outgoing::Subscribe(essential.to_vec()));
                session.connected();
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = |i: usize| {
                    matches!(
                        ack.return_codes.get(i),
                        Some(SubscribeReasonCode::Success(_))
                    )
                };
                if awaiting_optional {
                    awaiting_optional = false;
                    for (i, filter) in optional.iter().enumerate() {
                        if !granted(i) {
                            tracing::error!(filter = %filter.path, "the broker refused the subscription; going on without it");
                        }
                    }
                } else if granted(0) {
                    session.ready().send_replace(true);
                    // Optional filters go in a SUBSCRIBE of their own, after:
                    // a broker that closes the connection over them (AWS IoT
                    // does, for a filter the policy denies) cannot take the
                    // essential one down with them.
                    if !optional.is_empty() {
                        awaiting_optional = true;
                        send_nowait(session.client(), Outgoing::Subscribe(optional.clone()));
                    }
                } else {
                    tracing::error!(filter = ?essential.first().map(|f| &f.path), "the broker refused the subscription");
                }
            }
            Ok(_) => {}
            Err(e) => {
                if awaiting_optional {
                    tracing::error!(
                        filters = ?optional.iter().map(|f| &f.path).collect::<Vec<_>>(),
                        "the broker closed the connection over these subscriptions; going on without them"
                    );
                    optional.clear();
                    awaiting_optional = false;
                }
                session.ready().send_replace(false);
                session.disconnected(&e.to_string());
                let delay = backoff.next_delay(fastrand::f64());
                tracing::warn!(
                    "broker connection: {e}; retrying in {} ms",
                    delay.as_millis()
                );
                tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    session.ready().send_replace(false);
    session.stopping();
    if session.client().try_disconnect().is_ok() {
        // Let queued packets and the DISCONNECT go out, briefly.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}
