//! An OAuth2 authorization server for tests: a token endpoint over HTTPS (the test CA)
//! that follows RFC 6749 and RFC 7523 — the client-credentials grant with a client
//! secret or a certificate's signed assertion, the refresh-token grant with rotation,
//! the JWT-bearer grant of a service account — and answers refusals as the RFC says.
//! Its access tokens are JWTs signed with HS256 and valid for a few seconds, which a
//! Dovecot with the `oauth2` passdb validates itself ([`crate::dovecot::OAuth2Validation`]).
//! Every request is logged, so a test can say which grant was used how often, and
//! which refresh tokens were presented.
//!
//! What the issued tokens say: `sub` is the user (refresh token, service account) or
//! the app's principal (client credentials, an address in the organisation's domain:
//! a Dovecot comparing only domains accepts it for every mailbox there, as Exchange
//! accepts an app's token for the mailboxes it may access).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dovecot::temp_dir;
use crate::tls::{openssl, TestCa};

/// One registered app.
#[derive(Debug, Clone, Default)]
pub struct App {
    pub client_id: String,
    /// For the client-secret grant and a confidential client's refresh.
    pub secret: Option<String>,
    /// The certificate's x5t and its public key (PKCS#1 DER), for signed assertions.
    pub certificate: Option<(String, Vec<u8>)>,
    /// The `sub` of this app's client-credentials tokens.
    pub principal: String,
}

/// A service account: its email and public key (PKCS#1 DER).
#[derive(Debug, Clone)]
pub struct ServiceAccount {
    pub client_email: String,
    pub public_key: Vec<u8>,
}

/// One request the endpoint answered.
#[derive(Debug, Clone)]
pub struct Logged {
    pub grant_type: String,
    /// The refresh token presented, if any.
    pub refresh_token: Option<String>,
    /// 200, or the error code answered.
    pub outcome: String,
    /// Who the issued token is for.
    pub sub: Option<String>,
}

#[derive(Default)]
struct State {
    apps: Vec<App>,
    service_accounts: Vec<ServiceAccount>,
    /// Valid refresh tokens: token → (user, client id).
    refresh_tokens: HashMap<String, (String, String)>,
    /// Answer each refresh with a new refresh token (the old one stays valid, as
    /// Microsoft's do).
    rotate: bool,
    /// Seconds an access token lives.
    lifetime: u64,
    /// The next requests are answered with these HTTP statuses (an outage).
    fail_next: Vec<u16>,
    log: Vec<Logged>,
    issued: u64,
}

pub struct TokenEndpoint {
    pub port: u16,
    pub ca: TestCa,
    /// The key the access tokens are signed with (HS256).
    pub key: Vec<u8>,
    pub dir: PathBuf,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

impl TokenEndpoint {
    /// Starts the endpoint on a free loopback port; tokens live `lifetime` seconds.
    pub async fn start(lifetime: u64) -> TokenEndpoint {
        let dir = temp_dir("oauth");
        let ca = TestCa::create(&dir.join("ssl"));
        let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        let state = Arc::new(Mutex::new(State {
            lifetime,
            ..State::default()
        }));
        let config = server_config(&ca);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the token endpoint");
        let port = listener.local_addr().expect("address").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (st, k) = (state.clone(), key.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, st, k) = (acceptor.clone(), st.clone(), k.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve(tls, &st, &k, port).await;
                    }
                });
            }
        });
        TokenEndpoint {
            port,
            ca,
            key,
            dir,
            state,
            task,
        }
    }

    /// The token endpoint's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/tenant/oauth2/v2.0/token", self.port)
    }

    pub fn register_app(&self, app: App) {
        self.state.lock().unwrap().apps.push(app);
    }

    pub fn register_service_account(&self, account: ServiceAccount) {
        self.state.lock().unwrap().service_accounts.push(account);
    }

    /// A refresh token for `user` and the app `client_id`, as a user's consent gives one.
    pub fn grant_refresh_token(&self, user: &str, client_id: &str) -> String {
        let token = format!("rt-{:016x}", fastrand::u64(..));
        self.state
            .lock()
            .unwrap()
            .refresh_tokens
            .insert(token.clone(), (user.into(), client_id.into()));
        token
    }

    /// [`grant_refresh_token`](Self::grant_refresh_token) with a token of the test's
    /// choosing (a canary that must never show).
    pub fn grant_refresh_token_as(&self, user: &str, client_id: &str, token: &str) {
        self.state
            .lock()
            .unwrap()
            .refresh_tokens
            .insert(token.into(), (user.into(), client_id.into()));
    }

    pub fn set_rotation(&self, on: bool) {
        self.state.lock().unwrap().rotate = on;
    }

    /// Answers the next `n` requests with `status`.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.state
            .lock()
            .unwrap()
            .fail_next
            .extend(std::iter::repeat_n(status, n));
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    /// The key Dovecot validates tokens with, as its key dict holds it (base64).
    pub fn key_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.key)
    }
}

fn server_config(ca: &TestCa) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca.server_cert)
        .expect("server cert")
        .collect::<Result<_, _>>()
        .expect("server cert");
    let key = PrivateKeyDer::from_pem_file(&ca.server_key).expect("server key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config"),
    )
}

/// One HTTP/1.1 exchange (the client says nothing after it): head, body by
/// Content-Length, one JSON answer, close.
async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
    state: &Mutex<State>,
    key: &[u8],
    port: u16,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    let form: HashMap<String, String> = body
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((form_decode(k), form_decode(v)))
        })
        .collect();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let url = format!("https://127.0.0.1:{port}{path}");
    let (status, json) = answer(state, key, &url, &head, &form);
    let body = json.to_string();
    let reason = if status == 200 { "OK" } else { "Error" };
    // An endpoint that is down says when to come back, as Microsoft's does.
    let retry_after = if status >= 500 {
        "Retry-After: 1\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\n{retry_after}Connection: close\r\n\r\n{body}",
        body.len()
    );
    io.write_all(response.as_bytes()).await?;
    io.shutdown().await
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn error(code: &str, description: &str) -> (u16, serde_json::Value) {
    let status = if code == "invalid_client" { 401 } else { 400 };
    (
        status,
        serde_json::json!({"error": code, "error_description": description}),
    )
}

/// Verifies a compact RS256 JWT with a PKCS#1 public key; its header and claims.
fn verify_rs256(jwt: &str, public_key: &[u8]) -> Option<(serde_json::Value, serde_json::Value)> {
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
    let mut parts = jwt.split('.');
    let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
    let signature = b64url_decode(s)?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public_key)
        .verify(format!("{h}.{c}").as_bytes(), &signature)
        .ok()?;
    let header = serde_json::from_slice(&b64url_decode(h)?).ok()?;
    let claims = serde_json::from_slice(&b64url_decode(c)?).ok()?;
    Some((header, claims))
}

/// An assertion's claims are for this endpoint and current.
fn assertion_current(claims: &serde_json::Value, url: &str) -> Result<(), &'static str> {
    let t = now();
    if claims["aud"].as_str() != Some(url) {
        return Err("the assertion's aud is not this token endpoint");
    }
    match claims["exp"].as_u64() {
        Some(exp) if exp >= t && exp <= t + 3700 => Ok(()),
        _ => Err("the assertion has expired or lives too long"),
    }
}

fn answer(
    state: &Mutex<State>,
    key: &[u8],
    url: &str,
    head: &str,
    form: &HashMap<String, String>,
) -> (u16, serde_json::Value) {
    let mut st = state.lock().unwrap();
    let grant_type = form.get("grant_type").cloned().unwrap_or_default();
    let presented = form.get("refresh_token").cloned();
    let (status, json, sub) = if !head.starts_with("POST ") {
        let (s, j) = error("invalid_request", "POST only");
        (s, j, None)
    } else if !st.fail_next.is_empty() {
        let status = st.fail_next.remove(0);
        (
            status,
            serde_json::json!({"error": "temporarily_unavailable"}),
            None,
        )
    } else {
        match decide(&mut st, url, form) {
            Ok((sub, scope, refresh)) => {
                st.issued += 1;
                let t = now();
                let lifetime = st.lifetime;
                let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
                let claims = b64url(
                    serde_json::json!({
                        "sub": sub, "iat": t, "nbf": t, "exp": t + lifetime,
                        "iss": "mailferry-test-idp", "scope": scope, "n": st.issued,
                    })
                    .to_string()
                    .as_bytes(),
                );
                let signing = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
                let tag = ring::hmac::sign(&signing, format!("{header}.{claims}").as_bytes());
                let token = format!("{header}.{claims}.{}", b64url(tag.as_ref()));
                let mut json = serde_json::json!({
                    "access_token": token, "token_type": "Bearer", "expires_in": lifetime,
                    "scope": scope,
                });
                if let Some(r) = refresh {
                    json["refresh_token"] = r.into();
                }
                (200, json, Some(sub))
            }
            Err((code, description)) => {
                let (s, j) = error(code, description);
                (s, j, None)
            }
        }
    };
    st.log.push(Logged {
        grant_type,
        refresh_token: presented,
        outcome: if status == 200 {
            "200".into()
        } else {
            json["error"].as_str().unwrap_or("?").to_string()
        },
        sub,
    });
    (status, json)
}

type Decision = Result<(String, String, Option<String>), (&'static str, &'static str)>;

/// Who the token is for, its scope, and a new refresh token if one is issued.
fn decide(st: &mut State, url: &str, form: &HashMap<String, String>) -> Decision {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let scope = field("scope").to_string();
    match field("grant_type") {
        "client_credentials" => {
            let app = st
                .apps
                .iter()
                .find(|a| a.client_id == field("client_id"))
                .ok_or(("invalid_client", "unknown client"))?;
            if field("client_assertion_type")
                == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            {
                let (x5t, public_key) = app.certificate.as_ref().ok_or((
                    "invalid_client",
                    "no certificate is registered for this app",
                ))?;
                let (header, claims) =
                    verify_rs256(field("client_assertion"), public_key).ok_or((
                        "invalid_client",
                        "the client assertion's signature is wrong",
                    ))?;
                if header["x5t"].as_str() != Some(x5t) {
                    return Err(("invalid_client", "no certificate with this x5t"));
                }
                if claims["iss"].as_str() != Some(&app.client_id)
                    || claims["sub"].as_str() != Some(&app.client_id)
                {
                    return Err((
                        "invalid_client",
                        "the assertion's iss and sub must be the client",
                    ));
                }
                assertion_current(&claims, url).map_err(|d| ("invalid_client", d))?;
            } else if app.secret.as_deref() != Some(field("client_secret"))
                || field("client_secret").is_empty()
            {
                return Err((
                    "invalid_client",
                    "AADSTS7000215: Invalid client secret provided.",
                ));
            }
            if !scope.ends_with("/.default") {
                return Err(("invalid_scope", "client credentials need a /.default scope"));
            }
            Ok((app.principal.clone(), scope, None))
        }
        "refresh_token" => {
            let presented = field("refresh_token");
            let (user, client) = st
                .refresh_tokens
                .get(presented)
                .cloned()
                .ok_or(("invalid_grant", "the refresh token is not valid"))?;
            if client != field("client_id") {
                return Err((
                    "invalid_grant",
                    "the refresh token was issued to another client",
                ));
            }
            if let Some(app) = st.apps.iter().find(|a| a.client_id == client) {
                if let Some(secret) = &app.secret {
                    if secret != field("client_secret") {
                        return Err(("invalid_client", "wrong client secret"));
                    }
                }
            }
            let rotated = st.rotate.then(|| {
                let next = format!("rt-{:016x}", fastrand::u64(..));
                st.refresh_tokens
                    .insert(next.clone(), (user.clone(), client));
                next
            });
            Ok((user, scope, rotated))
        }
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            let assertion = field("assertion");
            let claims_part = assertion.split('.').nth(1).unwrap_or("");
            let unverified: serde_json::Value = b64url_decode(claims_part)
                .and_then(|c| serde_json::from_slice(&c).ok())
                .ok_or(("invalid_grant", "the assertion is not a JWT"))?;
            let account = st
                .service_accounts
                .iter()
                .find(|a| unverified["iss"].as_str() == Some(&a.client_email))
                .ok_or(("invalid_grant", "Invalid JWT Signature."))?;
            let (_, claims) = verify_rs256(assertion, &account.public_key)
                .ok_or(("invalid_grant", "Invalid JWT Signature."))?;
            assertion_current(&claims, url).map_err(|d| ("invalid_grant", d))?;
            let sub = claims["sub"].as_str().ok_or((
                "unauthorized_client",
                "no sub: domain-wide delegation names a user",
            ))?;
            let scope = claims["scope"].as_str().unwrap_or("").to_string();
            if scope.is_empty() {
                return Err(("invalid_scope", "no scope"));
            }
            Ok((sub.to_string(), scope, None))
        }
        _ => Err(("unsupported_grant_type", "unknown grant_type")),
    }
}

/// An RSA key pair and a self-signed certificate, made with openssl as an admin would:
/// `key.pem` (PKCS#8), `cert.pem`, the public key (PKCS#1 DER) and the certificate's
/// x5t (base64url SHA-1 of its DER, from openssl's fingerprint).
pub struct AppKey {
    pub key_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub public_key: Vec<u8>,
    pub x5t: String,
}

impl AppKey {
    pub fn create(dir: &Path) -> AppKey {
        std::fs::create_dir_all(dir).expect("mkdir");
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "key.pem",
            ],
            dir,
        );
        openssl(
            &[
                "req",
                "-x509",
                "-key",
                "key.pem",
                "-subj",
                "/CN=mailferry test app",
                "-days",
                "2",
                "-out",
                "cert.pem",
            ],
            dir,
        );
        let public_key = openssl(
            &[
                "rsa",
                "-in",
                "key.pem",
                "-RSAPublicKey_out",
                "-outform",
                "DER",
            ],
            dir,
        );
        let fingerprint = String::from_utf8(openssl(
            &["x509", "-in", "cert.pem", "-noout", "-fingerprint", "-sha1"],
            dir,
        ))
        .expect("fingerprint");
        let hex: String = fingerprint
            .split('=')
            .nth(1)
            .expect("openssl prints NAME=FINGERPRINT")
            .trim()
            .replace(':', "");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        AppKey {
            key_pem: dir.join("key.pem"),
            cert_pem: dir.join("cert.pem"),
            public_key,
            x5t: b64url(&bytes),
        }
    }

    /// A Google service account key file (JSON) for this key.
    pub fn service_account_json(&self, client_email: &str, token_uri: &str) -> String {
        let pem = std::fs::read_to_string(&self.key_pem).expect("key");
        serde_json::json!({
            "type": "service_account",
            "project_id": "mailferry-test",
            "private_key_id": "k1",
            "private_key": pem,
            "client_email": client_email,
            "client_id": "1234567890",
            "token_uri": token_uri,
        })
        .to_string()
    }
}
