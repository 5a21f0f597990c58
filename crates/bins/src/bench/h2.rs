//! The load tool's HTTP/2 client: many calls at once on one connection.

use axum::http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::http_client::{header_list, HttpError, HttpResponse};

/// One HTTP/2 connection over plain TCP (h2c, prior knowledge) carrying
/// many requests at once, as a load balancer or an API gateway in front of
/// the gateway would; cheap to clone, clones share the connection.
#[derive(Debug, Clone)]
pub struct Multiplexed {
    sender: hyper::client::conn::http2::SendRequest<Full<axum::body::Bytes>>,
    /// `http://host:port`.
    base: String,
}

impl Multiplexed {
    /// Connects to the host and port of `url` (`http://` only: h2c).
    ///
    /// # Errors
    /// [`HttpError`] when the URL is not absolute http, or connecting or
    /// the HTTP/2 handshake fails.
    pub async fn open(url: &str) -> Result<Self, HttpError> {
        let bad = |reason: &str| HttpError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("not an http:// URL (HTTP/2 here is h2c, without TLS)"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?.to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|source| HttpError::Connect {
                addr: format!("{host}:{port}"),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        let authority = uri.authority().map_or(host, |a| a.to_string());
        Ok(Multiplexed {
            sender,
            base: format!("http://{authority}"),
        })
    }

    /// Sends `GET path_and_query` and reads the whole response; many may
    /// run at once on one connection.
    ///
    /// # Errors
    /// [`HttpError`] when the connection fails.
    pub async fn get(&self, path_and_query: &str) -> Result<HttpResponse, HttpError> {
        let request = Request::builder()
            .method("GET")
            .uri(format!("{}{path_and_query}", self.base))
            .body(Full::new(axum::body::Bytes::new()))?;
        let mut sender = self.sender.clone();
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let headers = header_list(response.headers());
        let body = response.into_body().collect().await?.to_bytes();
        Ok(HttpResponse {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            headers,
        })
    }
}
