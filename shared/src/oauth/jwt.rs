//! The signed JWTs mailferry sends to token endpoints: a Google service account's
//! assertion (RFC 7523 §2.1, the JWT-bearer grant) and a Microsoft certificate's client
//! assertion (RFC 7523 §2.2). Both RS256 (RSASSA-PKCS1-v1_5 with SHA-256), signed with
//! ring; the keys come as PEM, PKCS#8 (`BEGIN PRIVATE KEY`, Google's JSON key files) or
//! PKCS#1 (`BEGIN RSA PRIVATE KEY`, what `openssl genrsa` wrote for years).

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An RSA private key from PEM; the error names what was found instead.
pub fn rsa_key_from_pem(pem: &str) -> Result<RsaKeyPair, String> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| {
        "no PEM private key (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY) found".to_string()
    })?;
    let key = match &der {
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        _ => return Err("the private key is not an RSA key (RS256 needs one)".into()),
    };
    key.map_err(|e| format!("the RSA private key is unusable: {e}"))
}

/// The `x5t` of a certificate (base64url of the SHA-1 of its DER), by which Microsoft's
/// token endpoint finds the certificate uploaded to the app registration.
pub fn certificate_thumbprint(pem: &str) -> Result<String, String> {
    let cert = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "no PEM certificate (BEGIN CERTIFICATE) found".to_string())?;
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref());
    Ok(b64url(digest.as_ref()))
}

/// `header.claims.signature`, RS256.
pub fn sign_rs256(
    header: &serde_json::Value,
    claims: &serde_json::Value,
    key: &RsaKeyPair,
) -> Result<String, String> {
    let mut out = b64url(header.to_string().as_bytes());
    out.push('.');
    out.push_str(&b64url(claims.to_string().as_bytes()));
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        out.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "signing the assertion failed".to_string())?;
    out.push('.');
    out.push_str(&b64url(&signature));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{KeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};

    /// A 2048-bit test key (PKCS#8), made with `openssl genpkey -algorithm RSA`; it
    /// protects nothing.
    pub(crate) const TEST_KEY: &str = include_str!("test-key.pem");

    #[test]
    fn an_assertion_verifies_with_the_public_key_and_carries_its_claims() {
        let key = rsa_key_from_pem(TEST_KEY).unwrap();
        let jwt = sign_rs256(
            &serde_json::json!({"alg": "RS256", "typ": "JWT"}),
            &serde_json::json!({"iss": "sa@example.iam", "sub": "alice@example.org"}),
            &key,
        )
        .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let dec = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap()
        };
        let claims: serde_json::Value = serde_json::from_slice(&dec(parts[1])).unwrap();
        assert_eq!(claims["sub"], "alice@example.org");
        let signed = format!("{}.{}", parts[0], parts[1]);
        let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public_key().as_ref());
        public.verify(signed.as_bytes(), &dec(parts[2])).unwrap();
        // one changed claim and the signature no longer holds
        let forged = format!("{}.{}", parts[0], b64url(br#"{"sub":"mallory"}"#));
        assert!(public.verify(forged.as_bytes(), &dec(parts[2])).is_err());
    }

    #[test]
    fn keys_and_certificates_that_are_not_there_are_named() {
        assert!(rsa_key_from_pem("hello")
            .unwrap_err()
            .contains("no PEM private key"));
        assert!(certificate_thumbprint(TEST_KEY)
            .unwrap_err()
            .contains("no PEM certificate"));
    }
}
