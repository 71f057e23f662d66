//! Bearer tokens. Each configured token belongs to a tenant; a request's token is
//! compared with every configured one in constant time (SHA-256 digests compared
//! byte by byte without an early exit, and every token is compared), so neither the
//! time to answer nor its shape tells how much of a guess was right.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use mailferry_shared::config::settings::ApiToken;
use sha2::{Digest, Sha256};

use super::{ApiError, Shared, Tenant};

pub struct Tokens {
    /// (digest of the token, tenant).
    known: Vec<([u8; 32], String)>,
}

impl Tokens {
    pub fn new(tokens: Vec<ApiToken>) -> Self {
        Tokens {
            known: tokens
                .into_iter()
                .map(|t| (digest(t.token.expose()), t.tenant))
                .collect(),
        }
    }

    /// The tenant of `presented`, if it is a configured token.
    pub fn tenant_of(&self, presented: &str) -> Option<&str> {
        let presented = digest(presented);
        let mut found = None;
        for (known, tenant) in &self.known {
            if constant_time_eq(known, &presented) {
                found = Some(tenant.as_str());
            }
        }
        found
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Lets the request through with its [`Tenant`] when it carries a known token.
pub async fn require_token(State(api): State<Shared>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(presented) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send an API token: Authorization: Bearer <token>",
        )
        .into_response();
    };
    match api.tokens.tenant_of(presented) {
        Some(tenant) => {
            let tenant = Tenant(tenant.to_string());
            req.extensions_mut().insert(tenant);
            next.run(req).await
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this API token is not known here",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailferry_shared::secret::Secret;

    #[test]
    fn a_token_names_its_tenant_and_nothing_else_does() {
        let tokens = Tokens::new(vec![
            ApiToken {
                tenant: "acme".into(),
                token: Secret::new("acme-token-0123456789"),
            },
            ApiToken {
                tenant: "globex".into(),
                token: Secret::new("globex-token-0123456789"),
            },
        ]);
        assert_eq!(tokens.tenant_of("acme-token-0123456789"), Some("acme"));
        assert_eq!(tokens.tenant_of("globex-token-0123456789"), Some("globex"));
        assert_eq!(tokens.tenant_of("acme-token-012345678"), None);
        assert_eq!(tokens.tenant_of(""), None);
    }
}
