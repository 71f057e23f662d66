//! One HTTPS POST of a form to a token endpoint, and nothing more: HTTP/1.1 (hyper's
//! connection layer) over the same TCP and TLS code as the IMAP connections, so the
//! token endpoint gets the same address policy (`public_only`, checked on the addresses
//! connected to) and the same trust (web roots plus the endpoint's CA file, else the
//! installation's `oauth_ca_file`). No
//! redirects are followed, no cookies kept, no proxy used; the answer is capped at
//! [`MAX_ANSWER`] bytes and the whole exchange at [`TIMEOUT`].

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

use crate::domain::endpoint::{Endpoint, Security};
use crate::error::Error;

/// A token answer is a few kilobytes; anything past this is not one.
pub const MAX_ANSWER: usize = 64 * 1024;
/// Connect, TLS, request and answer, all of it.
pub const TIMEOUT: Duration = Duration::from_secs(30);

static EXTRA_CA: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
static PUBLIC_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Connects to token endpoints on public addresses only, whatever the server they are
/// for (the installation's `api.forbid_private_sources`): a token URL is a tenant's
/// choice too, and a POST to an internal service is what that setting forbids. Set
/// once, at start.
pub fn require_public_token_endpoints() {
    PUBLIC_ONLY.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Trusts the CAs of this PEM file too for token endpoints reached for a server with no
/// CA file of its own (the installation's `oauth_ca_file`). Set once, at start.
pub fn trust_ca_file(path: std::path::PathBuf) {
    let _ = EXTRA_CA.set(path);
}

/// An `https://host[:port]/path` URL, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl HttpsUrl {
    pub fn parse(url: &str) -> Result<HttpsUrl, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("token URL {url:?} must start with https://"))?;
        if rest.contains(['#', ' ', '\\']) || rest.chars().any(|c| c.is_control()) {
            return Err(format!("token URL {url:?} holds a character a URL may not"));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(format!(
                "token URL {url:?}: credentials in the URL are not accepted"
            ));
        }
        // [v6]:port, [v6], host:port, host
        let (host, port) = match authority.strip_prefix('[') {
            Some(rest) => {
                let (h, after) = rest
                    .split_once(']')
                    .ok_or_else(|| format!("token URL {url:?}: unclosed [ in the host"))?;
                (h, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("token URL {url:?}: bad port {p:?}"))?,
            None => 443,
        };
        if host.is_empty() {
            return Err(format!("token URL {url:?} names no host"));
        }
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        Ok(HttpsUrl {
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }
}

/// What the endpoint answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// `Retry-After` in seconds, where given.
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// POSTs `form` (already `application/x-www-form-urlencoded`) to `url`. `via` is the IMAP
/// endpoint the token is for: its CA file, timeouts and address policy apply.
pub async fn post_form(url: &HttpsUrl, form: Bytes, via: &Endpoint) -> Result<Answer, Error> {
    let what = format!("the token endpoint https://{}:{}", url.host, url.port);
    match tokio::time::timeout(TIMEOUT, exchange(url, form, via)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout {
            what: format!("waiting for {what} ({} s)", TIMEOUT.as_secs()),
        }),
    }
}

async fn exchange(url: &HttpsUrl, form: Bytes, via: &Endpoint) -> Result<Answer, Error> {
    let mut server = Endpoint::new(url.host.clone(), url.port, Security::Tls);
    server.ca_file = via.ca_file.clone().or_else(|| EXTRA_CA.get().cloned());
    server.public_only = via.public_only || PUBLIC_ONLY.load(std::sync::atomic::Ordering::Relaxed);
    server.connect_timeout = via.connect_timeout;
    let tcp = crate::imap::client::tcp_connect(&server).await?;
    let tls = crate::imap::tls::handshake(&server, tcp).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| Error::lost(format!("HTTP with {}: {e}", url.host)))?;
    let driver = tokio::spawn(connection);
    let host_header = if url.port == 443 {
        url.host.clone()
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let request = hyper::Request::post(&url.path)
        .header(hyper::header::HOST, host_header)
        .header(
            hyper::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "mailferry")
        .body(Full::new(form))
        .map_err(|e| Error::Config(format!("token request: {e}")))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Error::lost(format!("token request to {}: {e}", url.host)))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(3600)));
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| {
                Error::lost(format!(
                    "the answer of {} (at most {MAX_ANSWER} bytes): {e}",
                    url.host
                ))
            })?
            .to_bytes();
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
    .await;
    driver.abort();
    result
}

/// `application/x-www-form-urlencoded` (the WHATWG form serializer: unreserved bytes
/// as they are, space as `+`, the rest `%XX`).
pub fn form_encode(pairs: &[(&str, &str)]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(Vec::new());
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        encode_component(k, &mut out);
        out.push(b'=');
        encode_component(v, &mut out);
    }
    out
}

fn encode_component(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(b),
            b' ' => out.push(b'+'),
            _ => out.extend_from_slice(&[b'%', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_urls_are_https_with_a_host_and_nothing_hidden() {
        let u =
            HttpsUrl::parse("https://login.microsoftonline.com/contoso/oauth2/v2.0/token").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            (
                "login.microsoftonline.com",
                443,
                "/contoso/oauth2/v2.0/token"
            )
        );
        let u = HttpsUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8443, "/")
        );
        let u = HttpsUrl::parse("https://[::1]:9000/t?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 9000, "/t?x=1")
        );
        let u = HttpsUrl::parse("https://[2001:db8::1]/token").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("2001:db8::1", 443));
        for (bad, says) in [
            ("http://example.com/token", "https://"),
            ("https://user:pw@example.com/token", "credentials"),
            ("https:///token", "no host"),
            ("https://example.com:99999/", "bad port"),
            ("https://example.com:0/", "bad port"),
            ("https://[::1/token", "unclosed"),
            ("https://example.com/a b", "may not"),
            ("https://example.com/\r\nX: y", "may not"),
        ] {
            let e = HttpsUrl::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn forms_encode_every_reserved_byte() {
        let form = form_encode(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("scope", "https://mail.google.com/ offline_access"),
            ("secret", "a+b&c=d%é"),
        ]);
        assert_eq!(
            std::str::from_utf8(&form).unwrap(),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer\
             &scope=https%3A%2F%2Fmail.google.com%2F+offline_access\
             &secret=a%2Bb%26c%3Dd%25%C3%A9"
        );
    }
}
