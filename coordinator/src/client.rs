//! A small client of the HTTP API for the `mailferry api` commands (and the tests):
//! one HTTP/1.1 connection per request over plain TCP or TLS (the same rustls set-up
//! as the IMAP connections: the public roots), JSON in and out, and the event stream
//! read line by line.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use mailferry_shared::domain::endpoint::{Endpoint, Security};
use mailferry_shared::secret::Secret;
use tokio::net::TcpStream;

/// What went wrong talking to the API: the connection, the HTTP exchange, or an
/// answer that is an error (its message and code as the API gave them).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(String);

macro_rules! client_error {
    ($($arg:tt)*) => {
        ClientError(format!($($arg)*))
    };
}

impl From<hyper::Error> for ClientError {
    fn from(e: hyper::Error) -> Self {
        client_error!("HTTP: {e}")
    }
}

impl From<hyper::http::Error> for ClientError {
    fn from(e: hyper::http::Error) -> Self {
        client_error!("a bad request: {e}")
    }
}

impl From<mailferry_shared::Error> for ClientError {
    fn from(e: mailferry_shared::Error) -> Self {
        ClientError(e.to_string())
    }
}

/// Where the API is and the token to show it.
#[derive(Debug, Clone)]
pub struct ApiClient {
    tls: bool,
    host: String,
    port: u16,
    /// The base URL's path, without its trailing slash (usually empty).
    base_path: String,
    token: Secret,
}

/// An answer of the API.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| client_error!("the API answered {} with no JSON ({e})", self.status))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The JSON body of a 2xx answer; otherwise an error with the API's code and message.
    pub fn ok(self) -> Result<serde_json::Value, ClientError> {
        if (200..300).contains(&self.status) {
            if self.body.is_empty() {
                return Ok(serde_json::Value::Null);
            }
            return self.json();
        }
        match self.json() {
            Ok(v) => {
                let code = v["error"]["code"].as_str().unwrap_or("?");
                let message = v["error"]["message"].as_str().unwrap_or("");
                Err(client_error!("{message} ({code}, HTTP {})", self.status))
            }
            Err(_) => Err(client_error!("HTTP {}: {}", self.status, self.text())),
        }
    }
}

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A connection to the API, either kind.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

impl ApiClient {
    /// `base`: `http://host:port` or `https://host[:port][/path]`.
    pub fn new(base: &str, token: Secret) -> Result<Self, ClientError> {
        let (tls, rest) = if let Some(rest) = base.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = base.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(client_error!(
                "the API URL {base:?} must start with http:// or https://"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse()
                    .map_err(|_| client_error!("the API URL {base:?} has a bad port"))?,
            ),
            _ => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(client_error!("the API URL {base:?} names no host"));
        }
        Ok(ApiClient {
            tls,
            host: host.to_string(),
            port,
            base_path: path.to_string(),
            token,
        })
    }

    async fn connect(&self) -> Result<Box<dyn IoBox>, ClientError> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(20),
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| client_error!("connecting to {}:{}: timed out", self.host, self.port))?
        .map_err(|e| client_error!("connecting to {}:{}: {e}", self.host, self.port))?;
        if !self.tls {
            return Ok(Box::new(tcp));
        }
        let endpoint = Endpoint::new(self.host.clone(), self.port, Security::Tls);
        let tls = mailferry_shared::imap::tls::handshake(&endpoint, tcp).await?;
        Ok(Box::new(tls))
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let io = TokioIo::new(self.connect().await?);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let host = if (self.tls && self.port == 443) || (!self.tls && self.port == 80) {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base_path))
            .header("host", host)
            .header("authorization", format!("Bearer {}", self.token.expose()))
            .header(
                "user-agent",
                concat!("mailferry/", env!("CARGO_PKG_VERSION")),
            );
        let body = match body {
            Some((content_type, bytes)) => {
                request = request.header("content-type", content_type);
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        Ok(sender.send_request(request.body(body)?).await?)
    }

    /// One request; the whole answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Answer, ClientError> {
        let attempt = async {
            let response = self.send(method, path, body).await?;
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, ClientError>(Answer {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, attempt)
            .await
            .map_err(|_| client_error!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.call("GET", path, None).await
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Answer, ClientError> {
        self.call(
            "POST",
            path,
            Some(("application/json", body.to_string().into_bytes())),
        )
        .await
    }

    /// Reads the server-sent events of `path`, calling `each(event, data)` until it
    /// returns false or the stream ends.
    pub async fn events(
        &self,
        path: &str,
        mut each: impl FnMut(&str, &str) -> bool,
    ) -> Result<(), ClientError> {
        let response = self.send("GET", path, None).await?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            return Answer {
                status,
                content_type: String::new(),
                body,
            }
            .ok()
            .map(|_| ());
        }
        let mut body = response.into_body();
        let mut buffer = Vec::new();
        let (mut event, mut data) = (String::new(), String::new());
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(chunk) = frame.data_ref() else {
                continue;
            };
            buffer.extend_from_slice(chunk);
            while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                if line.is_empty() {
                    if !data.is_empty() && !each(&event, &data) {
                        return Ok(());
                    }
                    event.clear();
                    data.clear();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
        }
        Ok(())
    }
}

/// A boxed connection (TCP or TLS), as hyper takes it.
trait IoBox: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: Io> IoBox for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let c = ApiClient::new("http://127.0.0.1:8080", Secret::new("t")).unwrap();
        assert_eq!(
            (c.tls, c.host.as_str(), c.port, c.base_path.as_str()),
            (false, "127.0.0.1", 8080, "")
        );
        let c = ApiClient::new("https://mail.example/migrate/", Secret::new("t")).unwrap();
        assert_eq!(
            (c.tls, c.host.as_str(), c.port, c.base_path.as_str()),
            (true, "mail.example", 443, "/migrate")
        );
        let c = ApiClient::new("http://[::1]:9", Secret::new("t")).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 9));
        assert!(ApiClient::new("ftp://x", Secret::new("t")).is_err());
        assert!(ApiClient::new("http://x:port", Secret::new("t")).is_err());
    }
}
