//! Credential sealing (DESIGN.md invariant 7): passwords and tokens are stored only as
//! AEAD ciphertext bound to their batch and user.
//!
//! A sealed value reads `v1:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>`. The key id
//! makes rotation possible: a [`Keyring`] seals with its current key and opens with any
//! key it holds, so adding a new key and re-sealing ([`Keyring::reseal`]) loses nothing.
//! The associated data is the batch id and the user id, so a sealed password copied to
//! another user's record does not open.

use std::collections::BTreeMap;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealing key {id:?}: {reason}")]
    BadKey { id: String, reason: String },
    #[error("sealed value uses key {0:?}, which this keyring does not hold")]
    UnknownKey(String),
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value does not open: wrong key, or not sealed for this batch and user")]
    Forged,
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

fn aad(batch: &str, user: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(batch.len() + user.len() + 1);
    a.extend_from_slice(batch.as_bytes());
    a.push(0);
    a.extend_from_slice(user.as_bytes());
    a
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

    pub fn seal(&self, secret: &Secret, batch: &str, user: &str) -> Result<String, SealError> {
        let key = &self.keys[&self.current];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut data = secret.expose().as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(batch, user)),
            &mut data,
        )
        .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!(
            "v1:{}:{}",
            self.current,
            base64::engine::general_purpose::STANDARD.encode(out)
        ))
    }

    pub fn open(&self, sealed: &str, batch: &str, user: &str) -> Result<Secret, SealError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some("v1"), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
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
        let plain = key
            .open_in_place(nonce, Aad::from(aad(batch, user)), &mut data)
            .map_err(|_| SealError::Forged)?;
        let text = String::from_utf8(plain.to_vec()).map_err(|_| SealError::Malformed)?;
        Ok(Secret::new(text))
    }

    /// Re-seals with the current key (for rotation); `None` if it already uses it.
    pub fn reseal(
        &self,
        sealed: &str,
        batch: &str,
        user: &str,
    ) -> Result<Option<String>, SealError> {
        if sealed.split(':').nth(1) == Some(self.current.as_str()) {
            return Ok(None);
        }
        let secret = self.open(sealed, batch, user)?;
        self.seal(&secret, batch, user).map(Some)
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

    #[test]
    fn sealed_values_open_only_for_their_batch_and_user() {
        let k = Keyring::generate("k1").unwrap();
        let keys = ring(&[&k]);
        let sealed = keys
            .seal(&Secret::new("hunter2"), "b1", "alice@example.com")
            .unwrap();
        assert!(sealed.starts_with("v1:k1:"));
        assert!(!sealed.contains("hunter2"));
        assert_eq!(
            keys.open(&sealed, "b1", "alice@example.com")
                .unwrap()
                .expose(),
            "hunter2"
        );
        assert_eq!(
            keys.open(&sealed, "b1", "bob@example.com"),
            Err(SealError::Forged)
        );
        assert_eq!(
            keys.open(&sealed, "b2", "alice@example.com"),
            Err(SealError::Forged)
        );
        // two seals of the same secret differ (random nonce)
        assert_ne!(
            sealed,
            keys.seal(&Secret::new("hunter2"), "b1", "alice@example.com")
                .unwrap()
        );
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(keys
            .open(
                std::str::from_utf8(&tampered).unwrap(),
                "b1",
                "alice@example.com"
            )
            .is_err());
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_reseals_them() {
        let old = Keyring::generate("2025").unwrap();
        let new = Keyring::generate("2026").unwrap();
        let before = ring(&[&old]);
        let sealed = before.seal(&Secret::new("app-password"), "b", "u").unwrap();
        let after = ring(&[&old, &new]);
        assert_eq!(after.current_key_id(), "2026");
        assert_eq!(
            after.open(&sealed, "b", "u").unwrap().expose(),
            "app-password"
        );
        let resealed = after.reseal(&sealed, "b", "u").unwrap().unwrap();
        assert!(resealed.starts_with("v1:2026:"));
        assert_eq!(after.reseal(&resealed, "b", "u").unwrap(), None);
        // once the old key is gone, only resealed values open
        let only_new = ring(&[&new]);
        assert_eq!(
            only_new.open(&sealed, "b", "u"),
            Err(SealError::UnknownKey("2025".into()))
        );
        assert_eq!(
            only_new.open(&resealed, "b", "u").unwrap().expose(),
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
