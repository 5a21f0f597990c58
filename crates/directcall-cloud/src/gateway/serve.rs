//! Serving the gateway: [`serve`] over plain HTTP, [`serve_tls`] over
//! HTTPS, each stopping gracefully when a shutdown future resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::{Extension, Router};

use super::state::Closing;
use super::tls::ServerTls;

/// `app` with a [`Closing`] signal, and the future that fires it after
/// `shutdown`.
fn with_closing(
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Router, impl Future<Output = ()> + Send + 'static) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = tx.send(true);
    };
    (app.layer(Extension(Closing(rx))), shutdown)
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting
/// and lets requests in flight finish (each ends by its own deadline) before
/// returning.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Small JSON answers: do not let Nagle hold them back.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (app, shutdown) = with_closing(app, shutdown);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// [`serve`] over TLS: HTTP/1.1 and HTTP/2 (ALPN) on each accepted
/// connection. On `shutdown` it stops accepting and lets the connections
/// finish their requests in flight (at most 30 s).
///
/// # Errors
/// When the listener fails.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: ServerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
    let (app, shutdown) = with_closing(app, shutdown);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "TLS handshake: {e}");
                    return;
                }
            };
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().oneshot(request.map(Body::new))
                },
            );
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(connection.into_owned()).await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    Ok(())
}
