//! The board page at `/` (HTML, JavaScript and CSS built into the binary: no CDN, works offline)
//! and, only when `DEMO_SIGNIN` is on, the demo sign-in: a list of orgs' users and a token for
//! one of them, signed with the service's own HS256 secret.
use super::AppState;
use crate::query::error::ApiError;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/board.js");
const STYLE: &str = include_str!("page/board.css");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/assets/board.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/assets/board.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/api/demo/users", get(demo_users))
        .route("/api/demo/token", post(demo_token))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DemoUser {
    org_id: String,
    user_id: String,
    label: String,
}

/// How many users the picker lists.
const DEMO_USERS: i64 = 50;

/// The demo's users (404 unless the demo sign-in is on).
async fn demo_users(State(s): State<AppState>) -> Result<Json<Vec<DemoUser>>, ApiError> {
    if s.demo_secret.is_none() {
        return Err(ApiError::NotFound("the demo sign-in is off".into()));
    }
    let opts = mongodb::options::FindOptions::builder().limit(DEMO_USERS).max_time(std::time::Duration::from_secs(5)).build();
    let docs: Vec<bson::Document> = s
        .mongo_db
        .collection::<bson::Document>("users")
        .find(bson::doc! {})
        .with_options(opts)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .try_collect()
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let users = docs
        .iter()
        .map(crate::mongo::user_from_bson)
        .map(|u| DemoUser { label: format!("org …{} · user …{}", tail(&u.org_id), tail(&u.id)), org_id: u.org_id, user_id: u.id })
        .collect();
    Ok(Json(users))
}

fn tail(id: &str) -> &str {
    &id[id.len().saturating_sub(6)..]
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DemoTokenRequest {
    org_id: String,
    user_id: String,
}

/// A token for one demo user, valid for a day (404 unless the demo sign-in is on).
async fn demo_token(State(s): State<AppState>, Json(r): Json<DemoTokenRequest>) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(secret) = &s.demo_secret else { return Err(ApiError::NotFound("the demo sign-in is off".into())) };
    if !board_core::model::is_object_id(&r.org_id) || !board_core::model::is_object_id(&r.user_id) {
        return Err(ApiError::BadRequest { code: "invalid_id", message: "orgId and userId must be ObjectIds".into() });
    }
    Ok(Json(serde_json::json!({"token": super::auth::sign_hs256(secret.as_bytes(), &r.user_id, &r.org_id, 86_400)})))
}
