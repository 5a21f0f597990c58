//! The HTTP floor of `directcall bench --mode http --compare-raw`: the
//! least any HTTP gateway in front of MQTT can do per request. A bare
//! hyper HTTP/1.1 server that, for each request, publishes one request on
//! the AWS sample's topics (`{target}/bench/{prefix}/{id}`, QoS 0) over one
//! long-lived rumqttc connection, awaits the echo by id on
//! `{prefix}/{id}/{target}/bench/ack` (subscribed at QoS 0), and answers
//! 200 `{"status":200,"response":"pong"}`: no validation, records,
//! audit, metrics or console.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use directcall_core::BrokerOptions;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::cli::BoxError;

type Waiters = Arc<Mutex<HashMap<u128, oneshot::Sender<()>>>>;

/// A running bridge; dropping it stops the server.
pub struct Bridge {
    /// `http://127.0.0.1:{port}`.
    pub base: String,
    _stop: oneshot::Sender<()>,
}

/// Starts a bridge on a free loopback port, connected to `broker`'s first
/// endpoint (plain TCP).
///
/// # Errors
/// When the broker cannot be reached or the port bound.
pub async fn start(broker: &BrokerOptions) -> Result<Bridge, BoxError> {
    let prefix = format!("bridge-{:06x}", fastrand::u32(..) & 0xff_ffff);
    let (client, mut eventloop) = super::floor_client(broker, &prefix)?;
    let waiters: Waiters = Arc::default();
    let (ready_tx, ready) = oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn({
        let waiters = Arc::clone(&waiters);
        async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // {prefix}/{id}/{target}/bench/ack
                        let id = p
                            .topic
                            .split('/')
                            .nth(1)
                            .and_then(|id| Uuid::parse_str(id).ok());
                        let waiter = id.and_then(|id| {
                            waiters
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&id.as_u128())
                        });
                        if let Some(w) = waiter {
                            let _ = w.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    });
    client
        .subscribe(format!("{prefix}/+/+/+/ack"), QoS::AtMostOnce)
        .await?;
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .map_err(|_| "the HTTP floor's subscription was not answered in 10 s")??;

    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, mut stopped) = oneshot::channel::<()>();
    let prefix: Arc<str> = prefix.into();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = &mut stopped => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            let _ = stream.set_nodelay(true);
            let (client, waiters, prefix) =
                (client.clone(), Arc::clone(&waiters), Arc::clone(&prefix));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let (client, waiters, prefix) =
                        (client.clone(), Arc::clone(&waiters), Arc::clone(&prefix));
                    async move {
                        Ok::<_, Infallible>(answer(&request, &client, &waiters, &prefix).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Bridge { base, _stop: stop })
}

/// One request: publish, await the echo, answer.
async fn answer<B>(
    request: &Request<B>,
    client: &AsyncClient,
    waiters: &Waiters,
    prefix: &str,
) -> Response<Full<Bytes>> {
    let target = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("target=")))
        .unwrap_or("Device001");
    let id = Uuid::new_v4();
    let (tx, rx) = oneshot::channel();
    waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.as_u128(), tx);
    let payload = format!(
        r#"{{"id":"{id}","request":"x","timestamp":"{}"}}"#,
        directcall_core::deadline::unix_millis(std::time::SystemTime::now())
    );
    let published = client
        .publish(
            format!("{target}/bench/{prefix}/{id}"),
            QoS::AtMostOnce,
            false,
            payload,
        )
        .await;
    let echoed = published.is_ok()
        && matches!(
            tokio::time::timeout(Duration::from_secs(5), rx).await,
            Ok(Ok(()))
        );
    if !echoed {
        waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id.as_u128());
    }
    let (status, body) = if echoed {
        (200, r#"{"status":200,"response":"pong"}"#)
    } else {
        (504, r#"{"result":"timeout"}"#)
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
