//! The one error type of the API, rendered as `{"error": {"code", "message"}}` (CONTRACT.md 3).
//! Internal error text is logged, never sent.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// A server the API depends on (named in `/readyz` and in 503 codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dependency {
    Redis,
    Mongodb,
}

impl Dependency {
    pub fn name(self) -> &'static str {
        match self {
            Dependency::Redis => "redis",
            Dependency::Mongodb => "mongodb",
        }
    }
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Clone: a computation shared by several requests (`shared_answers`) fails for each of them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("request body larger than 64 KiB")]
    PayloadTooLarge,
    #[error("{0}")]
    Unavailable(String),
    /// The request needs a dependency that the health probe found down: answered at once.
    #[error("{0} is down and this request needs it")]
    DependencyDown(Dependency),
    #[error("the request took too long")]
    Timeout,
    /// Only MongoDB could answer, and the filter is too broad for it at this org's size.
    #[error("this filter matches more than {0} contacts, too many for the MongoDB path; retry once the projection answers")]
    TooBroadForMongodb(usize),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) | ApiError::DependencyDown(_) | ApiError::Timeout | ApiError::TooBroadForMongodb(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } => code,
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::DependencyDown(Dependency::Mongodb) => "mongodb_unavailable",
            ApiError::DependencyDown(Dependency::Redis) => "redis_unavailable",
            ApiError::Timeout => "timeout",
            ApiError::TooBroadForMongodb(_) => "mongodb_filter_too_broad",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal error".to_string()
            }
            ApiError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "no data source could answer");
                "neither the projection nor MongoDB can answer right now".to_string()
            }
            other => other.to_string(),
        };
        (self.status(), Json(json!({"error": {"code": self.code(), "message": message}}))).into_response()
    }
}
