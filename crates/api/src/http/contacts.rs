//! `POST /api/contacts`: authenticate, parse, answer from the projection (or MongoDB), render.
use super::auth::Caller;
use super::health::Dependency;
use super::AppState;
use crate::query::board::{AnswerMeta, BoardAnswer};
use crate::query::error::ApiError;
use crate::query::mongo_path::MongoPathError;
use crate::query::projection::ProjectionError;
use crate::query::request::{BoardQuery, ContactsRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use std::time::Instant;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/contacts", post(contacts))
}

/// List contacts (or applications) of a pipeline, bucketed by stage.
#[utoipa::path(
    post,
    path = "/api/contacts",
    request_body = ContactsRequest,
    params(
        ("X-Org-Id" = Option<String>, Header, description = "The token's org, for a load balancer that routes by org (deploy/org-router.sh); optional, refused when it names another org"),
    ),
    responses(
        (status = 200, description = "Cards by stage: data, dataByStatus, stageIdByName, stageNameById, meta; an ETag of the answer"),
        (status = 304, description = "If-None-Match carries the ETag of this same answer: unchanged"),
        (status = 400, description = "Malformed body or out-of-range value; `org_header_mismatch`: X-Org-Id names another org than the token"),
        (status = 401, description = "Missing, malformed, badly signed or expired token"),
        (status = 404, description = "No such pipeline in the caller's org"),
        (status = 413, description = "Body over 64 KiB"),
        (status = 503, description = "Neither the projection nor MongoDB can answer"),
    ),
    security(("bearer" = []))
)]
pub async fn contacts(
    caller: Caller,
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::BadRequest { code: "malformed_body", message: e.body_text() },
    })?;
    let query = ContactsRequest::parse(&body)?.into_query()?;
    let if_none_match = headers.get(header::IF_NONE_MATCH);
    let tokened = change_token_applies(&s, &query);
    // A poll carrying a change-token ETag of an unchanged board is answered 304 before any
    // answer is computed (the token's reads only: two round trips).
    if tokened && if_none_match.is_some_and(|v| v.as_bytes().starts_with(CHANGE_ETAG_START.as_bytes())) {
        if let Ok(Some(token)) = s.projection.change_token(&caller.org_id).await {
            let etag = change_etag(token, &caller, &body);
            if if_none_match.is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
                crate::events::BoardNotModified { check: "change_token" }.emit();
                return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
            }
        }
    }
    let now = board_model::time::now_millis();
    let (answer, meta, token) = tokio::time::timeout(s.request_timeout, answer(&s, &caller.org_id, &caller.user_id, &query, now))
        .await
        .map_err(|_| ApiError::Timeout)??;
    crate::events::BoardAnswered { path: meta.answered_by }.emit();
    // The change token read with the answer (before its cards: a change in between makes the
    // next poll a 200, never a stale 304) names it; the projection gives none for an answer an
    // index of another generation computed (a switched org's new index still loading): that
    // one is named by its content.
    let etag = match token {
        Some(t) if tokened => change_etag(t, &caller, &body),
        _ => answer_etag(&answer, &meta),
    };
    if if_none_match.is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
        crate::events::BoardNotModified { check: "answer" }.emit();
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok(([(header::CONTENT_TYPE, "application/json".to_string()), (header::ETAG, etag)], answer.to_json_bytes(&meta)).into_response())
}

/// How a change-token ETag starts (never equal to an answer hash).
const CHANGE_ETAG_START: &str = "\"v-";

/// Whether a projection answer to `q` may be named by the org's change token
/// (`BoardQuery::nameable_by_change_token`), with Redis not known down.
fn change_token_applies(s: &AppState, q: &BoardQuery) -> bool {
    q.nameable_by_change_token() && s.health.is_up(Dependency::Redis)
}

/// The ETag of a projection answer: the org's change token, the caller and the request as sent.
fn change_etag(token: u64, caller: &Caller, body: &[u8]) -> String {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write_u64(token);
    h.write(caller.user_id.as_bytes());
    h.write(body);
    format!("{CHANGE_ETAG_START}{:016x}\"", h.finish())
}

/// The ETag of an answer: a hash of everything it says except the projection's lag and the
/// replicas' staleness (which move
/// every second without the board changing), so it changes exactly when the board a client
/// would draw changes — including which path answered. The same on every API instance (a fixed
/// hash of the same bytes), so a poll may go to any of them.
pub fn answer_etag(answer: &BoardAnswer, meta: &AnswerMeta) -> String {
    use std::hash::Hasher;
    let stable = AnswerMeta { projection_lag: None, replica_staleness_ms: None, ..meta.clone() };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&answer.to_json_bytes(&stable));
    format!("\"{:016x}\"", h.finish())
}

/// Projection first; MongoDB for custom fields and whenever the projection cannot answer.
/// A dependency the health probe found down is not tried: the projection's absence sends the
/// request to MongoDB at once, MongoDB's gives a 503 at once.
/// With a projection answer, the org's change token read with it.
pub async fn answer(
    s: &AppState,
    org: &str,
    user: &str,
    q: &BoardQuery,
    now: i64,
) -> Result<(BoardAnswer, AnswerMeta, Option<u64>), ApiError> {
    let reason = if !q.filters.custom_fields.is_empty() {
        "custom_fields"
    } else if !s.health.is_up(Dependency::Redis) {
        "projection_unavailable"
    } else {
        match s.projection.answer_with_token(org, user, q, now).await {
            Ok((a, route, token)) => {
                let meta = AnswerMeta {
                    answered_by: "projection",
                    route: Some(route.name()),
                    reason: None,
                    projection_lag: s.projection_lag(),
                    replica_staleness_ms: s.replica_staleness_ms(),
                };
                return Ok((a, meta, token));
            }
            // The projection may not know the pipeline yet (its event is late or dead-lettered):
            // only the source of truth may say it does not exist.
            Err(ProjectionError::Api(ApiError::NotFound(_))) => "pipeline_not_projected",
            Err(ProjectionError::Api(e)) => return Err(e),
            Err(ProjectionError::NotBuilt) => "projection_not_built",
            Err(ProjectionError::NotWhole(reason)) => reason,
            // A filter the index could not finish in time would not be cheaper for MongoDB.
            Err(ProjectionError::Index(e)) => {
                tracing::warn!(error = %e, "index deadline");
                return Err(ApiError::Timeout);
            }
            Err(ProjectionError::Unavailable(e)) => {
                tracing::warn!(error = %e, "projection unavailable; answering from MongoDB");
                "projection_unavailable"
            }
        }
    };
    if !s.health.is_up(Dependency::Mongodb) {
        return Err(ApiError::DependencyDown(Dependency::Mongodb));
    }
    match s.mongo.answer(org, user, q, now).await {
        Ok(a) => Ok((
            a,
            AnswerMeta {
                answered_by: "mongodb",
                route: None,
                reason: Some(reason),
                projection_lag: s.projection_lag(),
                replica_staleness_ms: None,
            },
            None,
        )),
        Err(MongoPathError::Api(e)) => Err(e),
        Err(MongoPathError::Unavailable(e)) => Err(ApiError::Unavailable(e)),
        Err(MongoPathError::TooBroad(n)) => Err(ApiError::TooBroadForMongodb(n)),
    }
}

/// Request count and latency per route and status.
pub async fn record_metrics(req: Request, next: Next) -> Response {
    let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(req).await;
    crate::events::HttpRequest { path: &path, status: response.status().as_u16(), seconds: started.elapsed().as_secs_f64() }.emit();
    response
}
