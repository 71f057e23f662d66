//! The admin's HTTP API and web console (`api.listen`), served by every coordinator
//! replica: it reads and writes Redis only, and the leader acts on what it records.
//!
//! - `/api/v1/…`: JSON resources (endpoints, batches, users, actions, reports, a live
//!   event stream), described by the OpenAPI document at `/api/v1/openapi.json`.
//! - `/`: the web console, static files compiled into the binary (nothing to build).
//!
//! Every `/api/v1` request but the OpenAPI document carries `Authorization: Bearer
//! <token>`; the token names a tenant ([`auth`]), and a tenant sees only its own
//! endpoints and batches: another tenant's object answers 404, like a missing one.
//! Errors are JSON `{"error": {"code", "message"}}` with a stable code ([`ApiError`]).
//! Passwords go in and never come out: responses say `has_source_password`, never the
//! secret.

mod auth;
mod batches;
mod console;
mod endpoints;
mod events;
mod preview;

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::DefaultBodyLimit;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Router};
use mailferry_shared::config::settings::ApiLimits;
use mailferry_shared::Error;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};

use crate::admin::Cluster;
pub use auth::Tokens;
pub use batches::{summary_view, user_view};

/// The OpenAPI document, written by hand and checked against the server by the fuzz
/// test (`tests/tests/api_fuzz.rs`): every status and body the server sends is described.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Live event streams served at once by one coordinator: each polls Redis, so they
/// are bounded; one more is refused with 429.
const MAX_STREAMS: usize = 32;

/// What every handler shares.
pub struct Api {
    pub(crate) cluster: Cluster,
    tokens: Tokens,
    streams: Arc<Semaphore>,
    /// Event streams open now, by tenant (`api.limits.streams_per_tenant` each).
    tenant_streams: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Api {
    pub(crate) fn limits(&self) -> &ApiLimits {
        &self.cluster.settings.api.limits
    }
}

/// A tenant would hold more than a limit allows.
pub(crate) fn limit_reached(what: &str, limit: usize, key: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "limit_reached",
        format!(
            "this tenant may hold at most {limit} {what} (api.limits.{key}): remove some first, \
             or ask the operator to raise the limit"
        ),
    )
}

/// An event stream's place: one of the coordinator's and one of its tenant's, both
/// given back when the stream ends.
pub(crate) struct StreamSlot {
    _global: tokio::sync::OwnedSemaphorePermit,
    tenant: String,
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

impl Api {
    /// A place for one more event stream of `tenant`, or why not.
    pub(crate) fn stream_slot(&self, tenant: &str) -> Result<StreamSlot, ApiError> {
        let limit = self.limits().streams_per_tenant;
        let mut open = self
            .tenant_streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mine = open.get(tenant).copied().unwrap_or(0);
        if mine >= limit {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!(
                    "this tenant has {mine} event streams open on this coordinator, the most \
                     allowed (api.limits.streams_per_tenant): close one first"
                ),
            ));
        }
        let global = self.streams.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                "this coordinator serves as many event streams as it can; close one or try another replica",
            )
        })?;
        *open.entry(tenant.to_string()).or_default() += 1;
        Ok(StreamSlot {
            _global: global,
            tenant: tenant.to_string(),
            open: self.tenant_streams.clone(),
        })
    }
}

pub type Shared = Arc<Api>;

impl Api {
    pub async fn new(
        cluster: Cluster,
    ) -> Result<Shared, mailferry_shared::config::settings::SettingsError> {
        let tokens = Tokens::new(cluster.settings.api.all_tokens()?);
        Ok(Arc::new(Api {
            cluster,
            tokens,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            tenant_streams: Arc::default(),
        }))
    }
}

/// The whole router: the API (authenticated but for its OpenAPI document) and the
/// console's files.
pub fn router(api: Shared) -> Router {
    let limits = api.limits().clone();
    // Each route takes the bodies it needs: a JSON object is small, an action may name
    // 100,000 users, an import is a CSV of them.
    let action = DefaultBodyLimit::max(limits.action_body_bytes);
    let v1 = Router::new()
        .route("/presets", get(endpoints::presets))
        .route("/endpoints", get(endpoints::list).post(endpoints::create))
        .route(
            "/endpoints/{endpoint}",
            get(endpoints::show).delete(endpoints::remove),
        )
        .route("/endpoints/{endpoint}/test", post(endpoints::test))
        .route("/batches", get(batches::list).post(batches::create))
        .route("/batches/{batch}", get(batches::show).patch(batches::edit))
        .route(
            "/batches/{batch}/users",
            get(batches::users).post(batches::add_user),
        )
        .route(
            "/batches/{batch}/users/import",
            post(batches::import).layer(DefaultBodyLimit::max(limits.import_bytes)),
        )
        .route(
            "/batches/{batch}/users/{user}",
            get(batches::user_detail)
                .patch(batches::edit_user)
                .delete(batches::remove_user),
        )
        .route("/batches/{batch}/start", post(batches::start).layer(action))
        .route("/batches/{batch}/stop", post(batches::stop).layer(action))
        .route(
            "/batches/{batch}/sync-now",
            post(batches::sync_now).layer(action),
        )
        .route("/batches/{batch}/close", post(batches::close).layer(action))
        .route("/batches/{batch}/preview", post(preview::preview))
        .route("/batches/{batch}/report.json", get(batches::report_json))
        .route("/batches/{batch}/report.csv", get(batches::report_csv))
        .route("/batches/{batch}/events", get(events::stream))
        .route_layer(middleware::from_fn_with_state(
            api.clone(),
            auth::require_token,
        ))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .nest("/api/v1", v1)
        .merge(console::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limits.json_body_bytes))
        .with_state(api)
}

/// Serves the API on `listener` until `shutdown` turns true. The caller binds it (the
/// process on `api.listen`, naming the setting in its error; a test on port 0).
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Shared,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving the API and the console");
    }
    axum::serve(listener, router(api))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this resource does not accept that method",
    )
}

/// An error as the API answers it: a status, a stable machine code and a message a
/// person can act on.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("a header"),
            );
        }
        response
    }
}

/// Store and configuration errors from the cluster layer. Anything naming a missing
/// object is answered by the handlers before it gets here.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Store(_) => {
                tracing::warn!(error = %e, "API request failed on the store");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the state store (Redis) did not answer; try again shortly",
                )
            }
            Error::Config(message) => ApiError::invalid(message),
            other => ApiError::new(StatusCode::BAD_GATEWAY, other.kind(), other.to_string()),
        }
    }
}

/// `axum::Json`, with its rejections answered as [`ApiError`]s.
pub struct Json<T>(pub T);

/// Every request body is a JSON object: serde would also take a struct written as an
/// array (`[null, null]`), which the document does not describe (the fuzz test found it).
/// The body is checked for its first byte and parsed straight into `T`, within the
/// route's body limit: no intermediate tree of an attacker's making.
impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ));
        }
        let Body(bytes) = Body::from_request(req, state).await?;
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => {}
            None => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    "the body is empty",
                ))
            }
            Some(_) => return Err(ApiError::invalid("the body must be a JSON object")),
        }
        serde_json::from_slice(&bytes).map(Json).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => ApiError::invalid(e.to_string()),
                _ => ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.to_string()),
            }
        })
    }
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(kind) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = kind
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// A request body within the route's limit, its rejections answered as [`ApiError`]s.
pub struct Body(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        "the body is larger than this route takes (api.limits: json_body_bytes, \
                         action_body_bytes, import_bytes)",
                    )
                } else {
                    ApiError::new(StatusCode::BAD_REQUEST, "bad_body", e.body_text())
                }
            })
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path`, with its rejections answered as [`ApiError`]s.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(path_rejection(e)),
        }
    }
}

fn path_rejection(e: PathRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_path", e.body_text())
}

/// `axum::extract::Query`, with its rejections answered as [`ApiError`]s.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(query_rejection(e)),
        }
    }
}

fn query_rejection(e: QueryRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text())
}

/// The tenant a request acts for (set by [`auth::require_token`]).
#[derive(Debug, Clone)]
pub struct Tenant(pub String);
