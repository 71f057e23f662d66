//! Credential sealing (DESIGN.md invariant 7): passwords and tokens are stored only as
//! AEAD ciphertext bound to where they may be used.
//!
//! A sealed value reads `v2:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>`. The key id
//! makes rotation possible: a [`Keyring`] seals with its current key and opens with any
//! key it holds, so adding a new key and re-sealing ([`Keyring::reseal`]) loses nothing.
//!
//! The associated data is a [`Binding`]: the batch and user (or tenant and endpoint), the
//! side, and the server the secret is sent to (host, port, TLS mode, CA file, whether
//! invalid certificates are accepted, whether only public addresses may be used). Redis
//! holds the server beside the sealed secret; whoever can write to Redis could otherwise
//! point a batch at a server of their own and have the workers send it every user's
//! password. With the server bound, a changed server makes the secret not open, and a
//! source password does not open as a target one.
//!
//! `v1` values (bound to batch and user only) are not opened: `batch reseal` opens them
//! once with the old binding and seals them again as `v2` for the server stored beside
//! them at that moment.

use std::collections::BTreeMap;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::domain::endpoint::{Endpoint, Security};
use crate::error::Side;
use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealing key {id:?}: {reason}")]
    BadKey { id: String, reason: String },
    #[error("sealed value uses key {0:?}, which this keyring does not hold")]
    UnknownKey(String),
    #[error("sealed value is malformed")]
    Malformed,
    #[error(
        "sealed value does not open: wrong key, or sealed for another batch, user, side or \
         server (a server changed since the password was given needs the password again)"
    )]
    Forged,
    #[error(
        "sealed by an earlier mailferry that did not bind the server; run \
         `mailferry batch reseal` once to bind it"
    )]
    Unbound,
    #[error("no random numbers available")]
    Random,
}

/// Sealing keys by id; the current one seals.
pub struct Keyring {
    keys: BTreeMap<String, LessSafeKey>,
    current: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish()
    }
}

/// What a secret is sealed for; it opens only where every part is the same.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// The batch id for a user's secret; `endpoint:<tenant>` for an endpoint's admin
    /// password ([`crate::redis::directory::endpoint_seal_scope`]).
    pub scope: &'a str,
    /// The user id, or the endpoint id.
    pub who: &'a str,
    pub side: Side,
    /// The server the secret is sent to.
    pub server: &'a Endpoint,
    /// With OAuth2, the token endpoint the secret (a refresh token, a client secret, a
    /// signed assertion's key) is sent to as well: a token URL changed in Redis gets no
    /// secret either.
    pub token_url: Option<&'a str>,
}

impl<'a> Binding<'a> {
    pub fn new(scope: &'a str, who: &'a str, side: Side, server: &'a Endpoint) -> Self {
        Binding {
            scope,
            who,
            side,
            server,
            token_url: None,
        }
    }

    /// Bound to the token endpoint too when `method` is OAuth2 (what every secret of an
    /// account logging in with `method` is sealed with).
    pub fn logging_in_with(mut self, method: &'a crate::domain::login::AuthMethod) -> Self {
        if let crate::domain::login::AuthMethod::OAuth2(client) = method {
            self.token_url = Some(&client.token_url);
        }
        self
    }

    /// The associated data: every part length-prefixed, so no two bindings share bytes.
    fn aad(&self) -> Vec<u8> {
        let s = self.server;
        let security = match s.security {
            Security::Tls => "tls",
            Security::StartTls => "starttls",
            Security::Plain => "plain",
        };
        let ca = s
            .ca_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let port = s.port.to_string();
        let side = self.side.to_string();
        let parts: [&[u8]; 9] = [
            self.scope.as_bytes(),
            self.who.as_bytes(),
            side.as_bytes(),
            s.host.as_bytes(),
            port.as_bytes(),
            security.as_bytes(),
            ca.as_bytes(),
            if s.accept_invalid_certs { b"1" } else { b"0" },
            if s.public_only { b"1" } else { b"0" },
        ];
        let mut a = b"mailferry-seal-v2".to_vec();
        // The token endpoint is a tenth part only where there is one, so the values
        // sealed for password logins before OAuth2 existed still open.
        for part in parts.into_iter().chain(self.token_url.map(str::as_bytes)) {
            a.extend_from_slice(&(part.len() as u32).to_be_bytes());
            a.extend_from_slice(part);
        }
        a
    }

    /// What `v1` values were bound to.
    fn legacy_aad(&self) -> Vec<u8> {
        let mut a = self.scope.as_bytes().to_vec();
        a.push(0);
        a.extend_from_slice(self.who.as_bytes());
        a
    }
}

impl Keyring {
    /// Parses keys written as `id:base64-of-32-bytes`, one per line or comma-separated
    /// (the format of the mounted secret or environment variable). The last key is the
    /// current one.
    pub fn parse(text: &Secret) -> Result<Self, SealError> {
        let mut keys = BTreeMap::new();
        let mut current = None;
        for entry in text
            .expose()
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (id, material) = entry.split_once(':').ok_or_else(|| SealError::BadKey {
                id: String::new(),
                reason: "expected ID:BASE64".into(),
            })?;
            let bad = |reason: &str| SealError::BadKey {
                id: id.to_string(),
                reason: reason.to_string(),
            };
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad("ids are letters, digits, '-' and '_'"));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(material.trim())
                .map_err(|_| bad("not base64"))?;
            if bytes.len() != 32 {
                return Err(bad("a key is 32 bytes"));
            }
            let key =
                UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| bad("unusable key"))?;
            keys.insert(id.to_string(), LessSafeKey::new(key));
            current = Some(id.to_string());
        }
        let current = current.ok_or_else(|| SealError::BadKey {
            id: String::new(),
            reason: "no key given".into(),
        })?;
        Ok(Keyring {
            keys,
            current,
            rng: SystemRandom::new(),
        })
    }

    /// A fresh random key in the `id:base64` form [`parse`](Self::parse) reads.
    pub fn generate(id: &str) -> Result<Secret, SealError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SealError::Random)?;
        Ok(Secret::new(format!(
            "{id}:{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )))
    }

    pub fn current_key_id(&self) -> &str {
        &self.current
    }

    pub fn seal(&self, secret: &Secret, to: Binding) -> Result<String, SealError> {
        let key = &self.keys[&self.current];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut data = secret.expose().as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(to.aad()),
            &mut data,
        )
        .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!(
            "v2:{}:{}",
            self.current,
            base64::engine::general_purpose::STANDARD.encode(out)
        ))
    }

    /// Opens a `v2` value sealed for exactly this binding.
    pub fn open(&self, sealed: &str, to: Binding) -> Result<Secret, SealError> {
        match version(sealed)? {
            Version::V2 => self.open_with(sealed, &to.aad()),
            Version::V1 => Err(SealError::Unbound),
        }
    }

    fn open_with(&self, sealed: &str, aad: &[u8]) -> Result<Secret, SealError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some(_), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SealError::Malformed);
        };
        let key = self
            .keys
            .get(id)
            .ok_or_else(|| SealError::UnknownKey(id.to_string()))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| SealError::Malformed)?;
        if raw.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(SealError::Malformed);
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Malformed)?;
        let mut data = rest.to_vec();
        let opened = key
            .open_in_place(nonce, Aad::from(aad), &mut data)
            .map(|plain| String::from_utf8(plain.to_vec()).map_err(|_| SealError::Malformed))
            .map_err(|_| SealError::Forged);
        crate::secret::wipe(&mut data);
        Ok(Secret::new(opened??))
    }

    /// Seals again with the current key (for rotation), and `v1` values as `v2` bound to
    /// `to`; `None` if the value is `v2` under the current key already.
    pub fn reseal(&self, sealed: &str, to: Binding) -> Result<Option<String>, SealError> {
        let secret = match version(sealed)? {
            Version::V2 if sealed.split(':').nth(1) == Some(self.current.as_str()) => {
                return Ok(None)
            }
            Version::V2 => self.open(sealed, to)?,
            Version::V1 => self.open_with(sealed, &to.legacy_aad())?,
        };
        self.seal(&secret, to).map(Some)
    }
}

enum Version {
    V1,
    V2,
}

fn version(sealed: &str) -> Result<Version, SealError> {
    match sealed.split(':').next() {
        Some("v2") => Ok(Version::V2),
        Some("v1") => Ok(Version::V1),
        _ => Err(SealError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[&Secret]) -> Keyring {
        let joined = keys
            .iter()
            .map(|k| k.expose())
            .collect::<Vec<_>>()
            .join("\n");
        Keyring::parse(&Secret::new(joined)).unwrap()
    }

    fn server() -> Endpoint {
        Endpoint::new("imap.example.com", 993, Security::Tls)
    }

    fn alice(server: &Endpoint) -> Binding<'_> {
        Binding::new("b1", "alice@example.com", Side::Source, server)
    }

    #[test]
    fn sealed_values_open_only_for_their_batch_user_side_and_server() {
        let k = Keyring::generate("k1").unwrap();
        let keys = ring(&[&k]);
        let imap = server();
        let sealed = keys.seal(&Secret::new("hunter2"), alice(&imap)).unwrap();
        assert!(sealed.starts_with("v2:k1:"));
        assert!(!sealed.contains("hunter2"));
        assert_eq!(
            keys.open(&sealed, alice(&imap)).unwrap().expose(),
            "hunter2"
        );
        // Every part of the binding counts: another user, batch or side, or any change
        // to where the password would be sent, and it does not open.
        let mut elsewhere: Vec<(&str, Endpoint)> = Vec::new();
        let mut change = |what, f: fn(&mut Endpoint)| {
            let mut e = server();
            f(&mut e);
            elsewhere.push((what, e));
        };
        change("host", |e| e.host = "imap.attacker.example".into());
        change("port", |e| e.port = 143);
        change("security", |e| e.security = Security::Plain);
        change("ca file", |e| {
            e.ca_file = Some("/tmp/attacker-ca.pem".into())
        });
        change("invalid certificates", |e| e.accept_invalid_certs = true);
        change("internal addresses", |e| e.public_only = true);
        for (what, e) in &elsewhere {
            assert_eq!(
                keys.open(&sealed, alice(e)),
                Err(SealError::Forged),
                "{what} changed, and it opened"
            );
        }
        let others = [
            Binding::new("b1", "bob@example.com", Side::Source, &imap),
            Binding::new("b2", "alice@example.com", Side::Source, &imap),
            Binding::new("b1", "alice@example.com", Side::Target, &imap),
            // the parts are length-prefixed: moving a byte between two does not match
            Binding::new("b1a", "lice@example.com", Side::Source, &imap),
        ];
        for other in others {
            assert_eq!(
                keys.open(&sealed, other),
                Err(SealError::Forged),
                "{other:?}"
            );
        }
        // Settings that do not say where the password goes may change.
        let mut slower = server();
        slower.command_timeout = std::time::Duration::from_secs(5);
        slower.read_timeout = std::time::Duration::from_secs(5);
        assert!(keys.open(&sealed, alice(&slower)).is_ok());
        // two seals of the same secret differ (random nonce)
        assert_ne!(
            sealed,
            keys.seal(&Secret::new("hunter2"), alice(&imap)).unwrap()
        );
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(keys
            .open(std::str::from_utf8(&tampered).unwrap(), alice(&imap))
            .is_err());
    }

    /// What an earlier build stored: bound to batch and user only.
    fn seal_v1(keys: &Keyring, secret: &str, batch: &str, user: &str) -> String {
        let imap = server();
        let legacy = Binding::new(batch, user, Side::Source, &imap).legacy_aad();
        let key = &keys.keys[&keys.current];
        let nonce = [7u8; NONCE_LEN];
        let mut data = secret.as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(legacy),
            &mut data,
        )
        .unwrap();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!(
            "v1:{}:{}",
            keys.current,
            base64::engine::general_purpose::STANDARD.encode(out)
        )
    }

    #[test]
    fn unbound_values_do_not_open_until_resealed_for_their_server() {
        let keys = ring(&[&Keyring::generate("k1").unwrap()]);
        let imap = server();
        let old = seal_v1(&keys, "hunter2", "b1", "alice@example.com");
        assert_eq!(keys.open(&old, alice(&imap)), Err(SealError::Unbound));
        assert!(SealError::Unbound
            .to_string()
            .contains("mailferry batch reseal"));
        // Same key, but v1: reseal binds it (not "already current").
        let bound = keys.reseal(&old, alice(&imap)).unwrap().unwrap();
        assert!(bound.starts_with("v2:k1:"));
        assert_eq!(keys.open(&bound, alice(&imap)).unwrap().expose(), "hunter2");
        let mut other = server();
        other.host = "imap.attacker.example".into();
        assert_eq!(keys.open(&bound, alice(&other)), Err(SealError::Forged));
        // A v1 value of another user does not reseal as this one.
        let bobs = seal_v1(&keys, "bobpass", "b1", "bob@example.com");
        assert_eq!(keys.reseal(&bobs, alice(&imap)), Err(SealError::Forged));
    }

    #[test]
    fn an_oauth2_secret_opens_only_for_the_token_endpoint_it_was_sealed_for() {
        use crate::domain::login::AuthMethod;
        use crate::oauth::{Grant, Mechanism, OAuthClient};
        let keys = ring(&[&Keyring::generate("k1").unwrap()]);
        let imap = server();
        let method = |url: &str| {
            AuthMethod::OAuth2(OAuthClient {
                token_url: url.into(),
                client_id: "app".into(),
                scope: "s".into(),
                grant: Grant::RefreshToken,
                mechanism: Mechanism::Xoauth2,
            })
        };
        let real = method("https://login.microsoftonline.com/t/oauth2/v2.0/token");
        let forged = method("https://tokens.attacker.example/token");
        let to =
            |m| Binding::new("b1", "alice@example.com", Side::Source, &imap).logging_in_with(m);
        let sealed = keys.seal(&Secret::new("refresh"), to(&real)).unwrap();
        assert_eq!(keys.open(&sealed, to(&real)).unwrap().expose(), "refresh");
        assert_eq!(keys.open(&sealed, to(&forged)), Err(SealError::Forged));
        assert_eq!(keys.open(&sealed, alice(&imap)), Err(SealError::Forged));
        // a password login's binding is what it was before OAuth2 existed
        let password = keys.seal(&Secret::new("pw"), alice(&imap)).unwrap();
        let as_before = Binding::new("b1", "alice@example.com", Side::Source, &imap)
            .logging_in_with(&AuthMethod::Password);
        assert_eq!(keys.open(&password, as_before).unwrap().expose(), "pw");
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_reseals_them() {
        let old = Keyring::generate("2025").unwrap();
        let new = Keyring::generate("2026").unwrap();
        let imap = server();
        let to = Binding::new("b", "u", Side::Target, &imap);
        let before = ring(&[&old]);
        let sealed = before.seal(&Secret::new("app-password"), to).unwrap();
        let after = ring(&[&old, &new]);
        assert_eq!(after.current_key_id(), "2026");
        assert_eq!(after.open(&sealed, to).unwrap().expose(), "app-password");
        let resealed = after.reseal(&sealed, to).unwrap().unwrap();
        assert!(resealed.starts_with("v2:2026:"));
        assert_eq!(after.reseal(&resealed, to).unwrap(), None);
        // once the old key is gone, only resealed values open
        let only_new = ring(&[&new]);
        assert_eq!(
            only_new.open(&sealed, to),
            Err(SealError::UnknownKey("2025".into()))
        );
        assert_eq!(
            only_new.open(&resealed, to).unwrap().expose(),
            "app-password"
        );
    }

    #[test]
    fn bad_keys_are_named_and_debug_shows_no_key_material() {
        let err = Keyring::parse(&Secret::new("k1:c2hvcnQ=")).unwrap_err();
        assert!(
            err.to_string().contains("\"k1\"") && err.to_string().contains("32 bytes"),
            "{err}"
        );
        assert!(Keyring::parse(&Secret::new("")).is_err());
        let k = Keyring::generate("k1").unwrap();
        let material = k.expose().split_once(':').unwrap().1.to_string();
        assert!(!format!("{:?}", ring(&[&k])).contains(&material));
    }
}
