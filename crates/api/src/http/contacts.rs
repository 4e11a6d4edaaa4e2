//! `POST /api/contacts`: authenticate, parse, answer from the projection (or MongoDB), render.
use super::auth::Caller;
use super::encoding::Encoding;
use super::health::Dependency;
use super::shared_answers::{AnswerName, Rendered, ShareKey};
use super::AppState;
use crate::query::board::{AnswerMeta, BoardAnswer, CardJson};
use crate::query::error::ApiError;
use crate::query::mongo_path::MongoPathError;
use crate::query::projection::ProjectionError;
use crate::query::request::{BoardQuery, ContactsRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
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
        ("Accept-Encoding" = Option<String>, Header, description = "zstd, br or gzip: the answer compressed (a board compresses ~10x); `Vary: Accept-Encoding`"),
        ("Cache-Control" = Option<String>, Header, description = "`no-cache`: an answer computed for this request rather than one shared with other viewers of the same board and change token"),
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
    let encoding = Encoding::negotiate(&headers);
    // The org's change token now, when it may name the answer and someone will use it: the
    // shared answers, or a poll holding a change-token ETag (one round trip, no answer).
    let shared = s.shared.as_ref().filter(|_| !asks_for_no_cache(&headers));
    let polled_with_token = if_none_match.is_some_and(|v| v.as_bytes().starts_with(CHANGE_ETAG_START.as_bytes()));
    let token = if change_token_applies(&s, &query) && (shared.is_some() || polled_with_token) {
        s.projection.change_token(&caller.org_id).await.ok().flatten()
    } else {
        None
    };
    if let Some(token) = token {
        let etag = coded(change_etag(token, &caller, &body), encoding);
        if if_none_match.is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
            crate::events::BoardNotModified { check: "change_token" }.emit();
            return Ok(not_modified(etag));
        }
    }
    let compute = render(&s, &caller, &query);
    let answer = match (shared, token) {
        (Some(shared), Some(token)) => {
            let caller_id = query.depends_on_caller().then(|| caller.user_id.clone());
            // A copy: the request's bytes are a view of the connection's read buffer.
            let key = ShareKey { org: caller.org_id.clone(), token, caller: caller_id, body: Bytes::copy_from_slice(&body) };
            shared.get(key, encoding, compute).await?
        }
        _ => {
            let plain = compute.await?;
            let bytes = encoding.encode_off_thread(plain.bytes).await?;
            std::sync::Arc::new(Rendered { bytes, name: plain.name, computed_at: plain.computed_at })
        }
    };
    let etag = match &answer.name {
        AnswerName::Token(t) => change_etag(*t, &caller, &body),
        AnswerName::Content(hash) => hash.clone(),
    };
    let etag = coded(etag, encoding);
    if if_none_match.is_some_and(|v| v.as_bytes() == etag.as_bytes()) {
        crate::events::BoardNotModified { check: "answer" }.emit();
        return Ok(not_modified(etag));
    }
    let mut response = (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json")), (header::VARY, HeaderValue::from_static("accept-encoding"))],
        answer.bytes.clone(),
    )
        .into_response();
    let h = response.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_str(&etag).expect("an ETag is ASCII"));
    if let Some(coding) = encoding.content_encoding() {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
    }
    Ok(response)
}

/// The ETag of an answer in `encoding`: each coding is another representation (RFC 9110 8.8.3),
/// so a compressed answer's tag names its coding.
fn coded(etag: String, encoding: Encoding) -> String {
    match (encoding.content_encoding(), etag.strip_suffix('"')) {
        (Some(coding), Some(open)) => format!("{open}-{coding}\""),
        _ => etag,
    }
}

fn not_modified(etag: String) -> Response {
    (StatusCode::NOT_MODIFIED, [(header::ETAG, etag), (header::VARY, "accept-encoding".into())]).into_response()
}

/// `Cache-Control: no-cache` (or `no-store`): the client wants an answer computed for it, not
/// a shared one (the benchmark measures the computation so).
fn asks_for_no_cache(headers: &HeaderMap) -> bool {
    headers.get_all(header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|d| {
        let d = d.trim();
        d.eq_ignore_ascii_case("no-cache") || d.eq_ignore_ascii_case("no-store")
    })
}

/// The answer computed for this request, rendered, and what names it: the change token read
/// with it (before its cards: a change in between makes the next poll a 200, never a stale
/// 304) when the query may be named so; otherwise (and for an answer an index of another
/// generation computed — a switched org's new index still loading) its content.
async fn render(s: &AppState, caller: &Caller, query: &BoardQuery) -> Result<Rendered, ApiError> {
    let now = board_model::time::now_millis();
    let (answer, meta, token) = tokio::time::timeout(s.request_timeout, answer(s, &caller.org_id, &caller.user_id, query, now))
        .await
        .map_err(|_| ApiError::Timeout)??;
    crate::events::BoardAnswered { path: meta.answered_by }.emit();
    let name = match token {
        Some(t) if change_token_applies(s, query) => AnswerName::Token(t),
        _ => AnswerName::Content(answer_etag(&answer, &meta)),
    };
    Ok(Rendered::new(answer.to_json_bytes(&meta), name))
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
pub fn answer_etag(answer: &BoardAnswer<CardJson>, meta: &AnswerMeta) -> String {
    use std::hash::Hasher;
    let stable = AnswerMeta { projection_lag: None, replica_staleness_ms: None, ..meta.clone() };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&answer.to_json_bytes(&stable));
    format!("\"{:016x}\"", h.finish())
}

/// Projection first; MongoDB whenever the projection cannot answer. Custom fields, which only
/// MongoDB holds, are asked of it alone (the ids of the cards that match) and the projection
/// answers among those. A dependency the health probe found down is not tried: the
/// projection's absence sends the request to MongoDB at once, MongoDB's gives a 503 at once.
/// With a projection answer, the org's change token read with it.
pub async fn answer(
    s: &AppState,
    org: &str,
    user: &str,
    q: &BoardQuery,
    now: i64,
) -> Result<(BoardAnswer<CardJson>, AnswerMeta, Option<u64>), ApiError> {
    let reason = match projection_answer(s, org, user, q, now).await? {
        Ok(answered) => return Ok(answered),
        Err(reason) => reason,
    };
    if !s.health.is_up(Dependency::Mongodb) {
        return Err(ApiError::DependencyDown(Dependency::Mongodb));
    }
    match s.mongo.answer(org, user, q, now).await {
        Ok(a) => Ok((
            a.rendered(),
            AnswerMeta {
                answered_by: "mongodb",
                route: None,
                reason: Some(reason),
                projection_lag: s.projection_lag(),
                replica_staleness_ms: None,
            },
            None,
        )),
        Err(e) => Err(mongo_error(e)),
    }
}

/// The projection's answer, or why MongoDB answers instead.
async fn projection_answer(
    s: &AppState,
    org: &str,
    user: &str,
    q: &BoardQuery,
    now: i64,
) -> Result<Result<(BoardAnswer<CardJson>, AnswerMeta, Option<u64>), &'static str>, ApiError> {
    if !s.health.is_up(Dependency::Redis) {
        return Ok(Err("projection_unavailable"));
    }
    let among = if q.filters.custom_fields.is_empty() {
        None
    } else {
        if !s.health.is_up(Dependency::Mongodb) {
            return Err(ApiError::DependencyDown(Dependency::Mongodb));
        }
        // MongoDB's ids are asked only of a projection that can use them (one round trip):
        // on FerretDB the query reads the org's every card.
        if let Err(e) = s.projection.plan_of(org, q).await {
            return fallback_reason(e).map(Err);
        }
        match s.mongo.custom_field_ids(org, q).await {
            Ok(ids) => Some(ids),
            // Too many to carry over: MongoDB computes the board itself.
            Err(MongoPathError::TooBroad(_)) => return Ok(Err("custom_fields_too_broad")),
            Err(e) => return Err(mongo_error(e)),
        }
    };
    match s.projection.rendered_answer(org, user, q, now, among).await {
        Ok((a, route, token)) => {
            let meta = AnswerMeta {
                answered_by: "projection",
                route: Some(route.name()),
                reason: None,
                projection_lag: s.projection_lag(),
                replica_staleness_ms: s.replica_staleness_ms(),
            };
            Ok(Ok((a, meta, token)))
        }
        Err(e) => fallback_reason(e).map(Err),
    }
}

/// Why MongoDB answers when the projection could not, or the error to answer with.
fn fallback_reason(e: ProjectionError) -> Result<&'static str, ApiError> {
    match e {
        // The projection may not know the pipeline yet (its event is late or dead-lettered):
        // only the source of truth may say it does not exist.
        ProjectionError::Api(ApiError::NotFound(_)) => Ok("pipeline_not_projected"),
        ProjectionError::Api(e) => Err(e),
        ProjectionError::NotBuilt => Ok("projection_not_built"),
        ProjectionError::NotWhole(reason) => Ok(reason),
        // A filter the index could not finish in time would not be cheaper for MongoDB.
        ProjectionError::Index(e) => {
            tracing::warn!(error = %e, "index deadline");
            Err(ApiError::Timeout)
        }
        ProjectionError::Unavailable(e) => {
            tracing::warn!(error = %e, "projection unavailable; answering from MongoDB");
            Ok("projection_unavailable")
        }
    }
}

fn mongo_error(e: MongoPathError) -> ApiError {
    match e {
        MongoPathError::Api(e) => e,
        MongoPathError::Unavailable(e) => ApiError::Unavailable(e),
        MongoPathError::TooBroad(n) => ApiError::TooBroadForMongodb(n),
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
