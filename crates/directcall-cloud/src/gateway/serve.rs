//! Serving the gateway: [`Server`], over plain HTTP or HTTPS, with the
//! shutdown sequence an orchestrator expects (not ready, a delay, then a
//! bounded drain); [`serve`] and [`serve_tls`] are its short forms.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::Router;
use tokio::time::Instant;

use super::state::Lifecycle;
use super::tls::ServerTls;

/// The drain's default bound ([`Server::shutdown_timeout`]).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// A listener and how it shuts down.
///
/// When the shutdown future resolves, `/readyz` answers 503 at once and
/// the server goes on serving for [`shutdown_delay`](Self::shutdown_delay)
/// (a load balancer or Kubernetes' endpoints take that long to stop
/// sending new requests); then it stops accepting, ends the console's event
/// streams and `?wait` long polls, and waits for the requests in flight for
/// at most [`shutdown_timeout`](Self::shutdown_timeout), the same over
/// HTTP and HTTPS. [`Server::run`] returns then, with what is left of the
/// bound, for the requester's own drain
/// ([`Requester::drain`](crate::Requester::drain)).
///
/// ```no_run
/// # async fn run(
/// #     app: axum::Router,
/// #     requester: directcall_cloud::Requester,
/// #     sigterm: impl std::future::Future<Output = ()> + Send + 'static,
/// # ) -> std::io::Result<()> {
/// use std::time::Duration;
/// use directcall_cloud::gateway::Server;
///
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
/// // `sigterm`: resolves on SIGTERM (tokio::signal, in the application).
/// let stopped = Server::new(listener)
///     .shutdown_delay(Duration::from_secs(5))
///     .shutdown_timeout(Duration::from_secs(20))
///     .run(app, sigterm)
///     .await?;
/// // Calls answered 202 get what is left of the 20 s; the rest are
/// // recorded as `unavailable` (the gateway shut down).
/// requester.drain(stopped.time_left).await;
/// requester.shutdown().await;
/// // Requests the bound cut now have their 503: let them be written.
/// stopped.close(Duration::from_secs(1)).await;
/// # Ok(()) }
/// ```
#[must_use = "a server does nothing until it is run"]
pub struct Server {
    listener: tokio::net::TcpListener,
    tls: Option<ServerTls>,
    delay: Duration,
    timeout: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .field("delay", &self.delay)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// How a [`Server`] stopped.
///
/// When the bound cut requests still waiting for a call, their
/// connections are still open: [`Requester::shutdown`](crate::Requester::shutdown)
/// ends those calls (each request is answered 503, saying the call may or
/// may not have run), and [`close`](Self::close) waits for those answers
/// to be written before the process exits.
#[non_exhaustive]
pub struct Stopped {
    /// What is left of the shutdown timeout after the HTTP requests in
    /// flight ended (zero when they did not end in time and were cut).
    pub time_left: Duration,
    /// Whether every request in flight ended on its own.
    pub drained: bool,
    /// The connections still open when the bound was up, closing.
    cut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stopped")
            .field("time_left", &self.time_left)
            .field("drained", &self.drained)
            .finish_non_exhaustive()
    }
}

impl Stopped {
    /// Waits at most `within` for the connections the bound cut to write
    /// their last answers and close; call it after
    /// [`Requester::shutdown`](crate::Requester::shutdown), which gives
    /// those requests their answer. Returns whether every connection
    /// closed (at once when the drain ended on its own).
    pub async fn close(self, within: Duration) -> bool {
        match self.cut {
            None => true,
            Some(cut) => tokio::time::timeout(within, cut).await.is_ok(),
        }
    }
}

impl Server {
    /// Plain HTTP on `listener`; no delay before the drain, a drain of at
    /// most [`DEFAULT_SHUTDOWN_TIMEOUT`].
    pub fn new(listener: tokio::net::TcpListener) -> Self {
        Server {
            listener,
            tls: None,
            delay: Duration::ZERO,
            timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }

    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN).
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How long to go on serving, not ready, once shutdown begins.
    /// Default: none.
    pub fn shutdown_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The longest wait for requests in flight once the server stops
    /// accepting. Default: [`DEFAULT_SHUTDOWN_TIMEOUT`].
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Serves `app` until `shutdown` resolves, then runs the shutdown
    /// sequence.
    ///
    /// # Errors
    /// When the listener fails.
    pub async fn run(
        self,
        app: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<Stopped> {
        let (draining_tx, draining_rx) = tokio::sync::watch::channel(false);
        let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
        let lifecycle = Lifecycle {
            draining: draining_rx,
            closing: closing_rx,
        };
        let delay = self.delay;
        // Resolves when the server must stop accepting; the drain's clock
        // starts then.
        let stop_accepting = async move {
            shutdown.await;
            let _ = draining_tx.send(true);
            if !delay.is_zero() {
                tracing::info!(
                    delay_s = delay.as_secs_f64(),
                    "shutting down: not ready, still serving while load balancers catch up"
                );
                tokio::time::sleep(delay).await;
            }
            tracing::info!("shutting down: no new requests, letting calls in flight finish");
            let _ = closing_tx.send(true);
        };
        match self.tls {
            Some(tls) => {
                serve_tls_inner(
                    self.listener,
                    app,
                    lifecycle,
                    tls,
                    stop_accepting,
                    self.timeout,
                )
                .await
            }
            None => serve_plain(self.listener, app, lifecycle, stop_accepting, self.timeout).await,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops
/// accepting and lets requests in flight finish for at most
/// [`DEFAULT_SHUTDOWN_TIMEOUT`]. [`Server`] sets a delay and the bound.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    Server::new(listener).run(app, shutdown).await.map(|_| ())
}

/// [`serve`] over TLS: HTTP/1.1 and HTTP/2 (ALPN) on each accepted
/// connection.
///
/// # Errors
/// When the listener fails.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: ServerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    Server::new(listener)
        .tls(tls)
        .run(app, shutdown)
        .await
        .map(|_| ())
}

/// After `stop` has resolved: how the drain went, given its start;
/// `cut`, when it did not end in time, is the connections still open.
fn stopped(
    started: Option<Instant>,
    timeout: Duration,
    cut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
) -> Stopped {
    let used = started.map_or(Duration::ZERO, |s| s.elapsed());
    let drained = cut.is_none();
    Stopped {
        time_left: if drained {
            timeout.saturating_sub(used)
        } else {
            Duration::ZERO
        },
        drained,
        cut,
    }
}

/// Tells every request of the server's shutdown: one extension, inserted
/// around the whole router (as `Router::layer`s it would box and clone each
/// route's service per request).
fn mark<B>(lifecycle: &Lifecycle, request: &mut axum::http::Request<B>) {
    request.extensions_mut().insert(lifecycle.clone());
}

async fn serve_plain(
    listener: tokio::net::TcpListener,
    app: Router,
    lifecycle: Lifecycle,
    stop: impl Future<Output = ()> + Send + 'static,
    timeout: Duration,
) -> std::io::Result<Stopped> {
    use axum::serve::ListenerExt;
    // Small JSON answers: do not let Nagle hold them back.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (started_tx, mut started_rx) = tokio::sync::watch::channel(None::<Instant>);
    let stop = async move {
        stop.await;
        let _ = started_tx.send(Some(Instant::now()));
    };
    // Boxed: when the bound cuts the drain, it goes on (in `Stopped`) to
    // let the cut requests write their answers.
    let mut server = Box::pin(
        axum::serve(
            listener,
            axum::ServiceExt::<Request>::into_make_service_with_connect_info::<SocketAddr>(
                tower::ServiceExt::<Request>::map_request(app, move |mut request: Request| {
                    mark(&lifecycle, &mut request);
                    request
                }),
            ),
        )
        .with_graceful_shutdown(stop)
        .into_future(),
    );
    // Serve until the drain starts, then give it `timeout`.
    let result = tokio::select! {
        result = &mut server => return result.map(|()| stopped(None, timeout, None)),
        () = async { drop(started_rx.wait_for(Option::is_some).await) } => {
            tokio::time::timeout(timeout, &mut server).await
        }
    };
    let started = *started_rx.borrow();
    match result {
        Ok(served) => served.map(|()| stopped(started, timeout, None)),
        Err(_) => {
            tracing::warn!(
                timeout_s = timeout.as_secs_f64(),
                "shutting down: requests still in flight after the shutdown timeout were cut"
            );
            let cut = async move { drop(server.await) };
            Ok(stopped(started, timeout, Some(Box::pin(cut))))
        }
    }
}

async fn serve_tls_inner(
    listener: tokio::net::TcpListener,
    app: Router,
    lifecycle: Lifecycle,
    tls: ServerTls,
    stop: impl Future<Output = ()> + Send + 'static,
    timeout: Duration,
) -> std::io::Result<Stopped> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        // The configuration in use now: a replaced certificate serves
        // the next connection.
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
        let (app, lifecycle) = (app.clone(), lifecycle.clone());
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
                    mark(&lifecycle, &mut request);
                    app.clone().oneshot(request.map(Body::new))
                },
            );
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(connection.into_owned()).await;
        });
    }
    drop(listener);
    let started = Instant::now();
    let mut closing = Box::pin(graceful.shutdown());
    if tokio::time::timeout(timeout, &mut closing).await.is_ok() {
        return Ok(stopped(Some(started), timeout, None));
    }
    tracing::warn!(
        timeout_s = timeout.as_secs_f64(),
        "shutting down: requests still in flight after the shutdown timeout were cut"
    );
    Ok(stopped(Some(started), timeout, Some(closing)))
}
