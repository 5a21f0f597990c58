//! A small HTTP/1.1 client (hyper) for `directcall call` and the load tool:
//! keep-alive connections over TCP or TLS.

use std::sync::Arc;

use axum::http::{Request, Uri};
use directcall_core::TlsOptions;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why an HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL is not an absolute http(s) URL.
    #[error("bad URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The TCP connection could not be made.
    #[error("connect {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be set up or the handshake failed.
    #[error("TLS with {host}: {reason}")]
    Tls {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// The request could not be built.
    #[error("request: {0}")]
    Request(#[from] http::Error),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
}

/// One HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body as text (lossy UTF-8).
    pub body: String,
    /// Response headers, names lowercase, in order.
    pub headers: Vec<(String, String)>,
}

impl HttpResponse {
    /// The first value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub(crate) fn header_list(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// One keep-alive HTTP/1.1 connection to a host.
#[derive(Debug)]
pub struct Connection {
    sender: SendRequest<Full<axum::body::Bytes>>,
    authority: String,
}

impl Connection {
    /// Connects to the scheme, host and port of `url` (`http://` or `https://`).
    ///
    /// # Errors
    /// [`HttpError`] when the URL is not absolute http(s), or connecting fails.
    pub async fn open(url: &str) -> Result<Self, HttpError> {
        Self::open_with(url, &TlsOptions::default()).await
    }

    /// [`Connection::open`], trusting `tls`'s CA (and showing its client
    /// certificate) for `https://`.
    ///
    /// # Errors
    /// [`HttpError`] when the URL is not absolute http(s), or connecting fails.
    pub async fn open_with(url: &str, tls_options: &TlsOptions) -> Result<Self, HttpError> {
        let bad = |reason: &str| HttpError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let host = uri.host().ok_or_else(|| bad("no host"))?.to_owned();
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("not an http:// or https:// URL")),
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|source| HttpError::Connect {
                addr: format!("{host}:{port}"),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let authority = uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or(host.clone());
        let sender = if tls {
            let tls_error = |reason: String| HttpError::Tls {
                host: host.clone(),
                reason,
            };
            let mut config = directcall_core::mqtt::tls::client_config(tls_options)
                .map_err(|e| tls_error(e.to_string()))?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| tls_error(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| tls_error(e.to_string()))?;
            handshake(stream).await?
        } else {
            handshake(tcp).await?
        };
        Ok(Connection { sender, authority })
    }

    /// Sends `GET path_and_query` with `headers` and reads the whole response.
    ///
    /// # Errors
    /// [`HttpError`] when the connection fails.
    pub async fn get(
        &mut self,
        path_and_query: &str,
        headers: &[(String, String)],
    ) -> Result<HttpResponse, HttpError> {
        self.send("GET", path_and_query, headers, Vec::new()).await
    }

    /// Sends `GET path_and_query` with `headers` and returns once the
    /// response's head is in, its body unread: for a response that may
    /// never end (an event stream).
    ///
    /// # Errors
    /// [`HttpError`] when the connection fails.
    pub async fn get_streaming(
        &mut self,
        path_and_query: &str,
        headers: &[(String, String)],
    ) -> Result<hyper::Response<hyper::body::Incoming>, HttpError> {
        self.request("GET", path_and_query, headers, Vec::new())
            .await
    }

    async fn request(
        &mut self,
        method: &str,
        path_and_query: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, HttpError> {
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", &self.authority);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request.body(Full::new(axum::body::Bytes::from(body)))?;
        self.sender.ready().await?;
        Ok(self.sender.send_request(request).await?)
    }

    /// Sends any request and returns once the response's head is in, its
    /// body unread: to read a streamed answer (NDJSON) as it comes.
    ///
    /// # Errors
    /// [`HttpError`] when the request cannot be built or the connection fails.
    pub async fn send_streaming(
        &mut self,
        method: &str,
        path_and_query: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, HttpError> {
        self.request(method, path_and_query, headers, body).await
    }

    /// Sends any request and reads the whole response.
    ///
    /// # Errors
    /// [`HttpError`] when the request cannot be built or the connection fails.
    pub async fn send(
        &mut self,
        method: &str,
        path_and_query: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<HttpResponse, HttpError> {
        let response = self.request(method, path_and_query, headers, body).await?;
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

async fn handshake<S>(stream: S) -> Result<SendRequest<Full<axum::body::Bytes>>, HttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One GET of `url` with `headers` on a fresh connection.
///
/// # Errors
/// [`HttpError`] when the URL is bad or the request fails.
pub async fn get(url: &str, headers: &[(String, String)]) -> Result<HttpResponse, HttpError> {
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| HttpError::Url {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Connection::open(url).await?.get(&path, headers).await
}
