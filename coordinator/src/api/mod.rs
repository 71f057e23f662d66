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

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Router};
use mailferry_shared::Error;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};

use crate::cluster::Cluster;
pub use auth::Tokens;

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
}

pub type Shared = Arc<Api>;

impl Api {
    pub async fn new(cluster: Cluster) -> anyhow::Result<Shared> {
        let tokens = Tokens::new(cluster.settings.api.all_tokens()?);
        Ok(Arc::new(Api {
            cluster,
            tokens,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        }))
    }
}

/// The whole router: the API (authenticated but for its OpenAPI document) and the
/// console's files.
pub fn router(api: Shared) -> Router {
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
        .route("/batches/{batch}/users/import", post(batches::import))
        .route(
            "/batches/{batch}/users/{user}",
            get(batches::user_detail)
                .patch(batches::edit_user)
                .delete(batches::remove_user),
        )
        .route("/batches/{batch}/start", post(batches::start))
        .route("/batches/{batch}/stop", post(batches::stop))
        .route("/batches/{batch}/sync-now", post(batches::sync_now))
        .route("/batches/{batch}/close", post(batches::close))
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
        .layer(axum::extract::DefaultBodyLimit::max(
            batches::MAX_IMPORT_BYTES,
        ))
        .with_state(api)
}

/// Serves the API until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    api: Shared,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("api.listen {addr}: {e}"))?;
    tracing::info!(%addr, "serving the API and the console");
    axum::serve(listener, router(api))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await?;
    Ok(())
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
impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let value = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => v,
            Err(e) => return Err(json_rejection(e)),
        };
        if !value.is_object() {
            return Err(ApiError::invalid("the body must be a JSON object"));
        }
        serde_json::from_value(value)
            .map(Json)
            .map_err(|e| ApiError::invalid(e.to_string()))
    }
}

fn json_rejection(e: JsonRejection) -> ApiError {
    match e {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as application/json",
        ),
        JsonRejection::JsonDataError(e) => ApiError::invalid(e.body_text()),
        other => ApiError::new(StatusCode::BAD_REQUEST, "bad_json", other.body_text()),
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
