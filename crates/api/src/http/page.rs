//! The board page at `/` (HTML, JavaScript and CSS built into the binary: no CDN, works offline)
//! and, only when `DEMO_SIGNIN` is on, the demo sign-in: the users of one org and a token for
//! one of them, signed with the service's own HS256 secret as the demo's own issuer (refused by
//! any `serve` whose demo sign-in is off).
use super::AppState;
use crate::query::error::ApiError;
use axum::extract::{Query, State};
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

/// The page loads only its own script, style and API: no inline script, no other origin, no
/// frame around it (clickjacking), no `<base>` or form target an injected tag could redirect.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DemoUsersQuery {
    org_id: Option<String>,
}

fn unavailable(e: mongodb::error::Error) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

/// The users of one org (404 unless the demo sign-in is on): `?orgId=` or, without it, the
/// org of the first user. Never a list across orgs: the picker shows one tenant.
async fn demo_users(State(s): State<AppState>, Query(q): Query<DemoUsersQuery>) -> Result<Json<Vec<DemoUser>>, ApiError> {
    if s.demo_secret.is_none() {
        return Err(ApiError::NotFound("the demo sign-in is off".into()));
    }
    let users = s.mongo_db.collection::<bson::Document>("users");
    let deadline = std::time::Duration::from_secs(5);
    let org = match q.org_id {
        Some(org) if board_model::model::is_object_id(&org) => org,
        Some(_) => return Err(ApiError::BadRequest { code: "invalid_id", message: "orgId must be an ObjectId".into() }),
        None => {
            let first = users
                .find_one(bson::doc! {})
                .with_options(mongodb::options::FindOneOptions::builder().sort(bson::doc! {"_id": 1}).max_time(deadline).build())
                .await
                .map_err(unavailable)?;
            match first.as_ref().map(board_mongo::user_from_bson) {
                Some(u) => u.org_id,
                None => return Ok(Json(Vec::new())),
            }
        }
    };
    let opts = mongodb::options::FindOptions::builder().limit(DEMO_USERS).max_time(deadline).build();
    let docs: Vec<bson::Document> =
        users.find(bson::doc! {"orgId": &org}).with_options(opts).await.map_err(unavailable)?.try_collect().await.map_err(unavailable)?;
    let users = docs
        .iter()
        .map(board_mongo::user_from_bson)
        .filter(|u| u.org_id == org)
        .map(|u| DemoUser { label: format!("org …{} · user …{}", tail(&u.org_id), tail(&u.id)), org_id: u.org_id, user_id: u.id })
        .collect();
    Ok(Json(users))
}

/// The last 6 characters of an id, for a label: whole characters, whatever the id holds.
fn tail(id: &str) -> &str {
    let start = id.char_indices().rev().nth(5).map_or(0, |(i, _)| i);
    &id[start..]
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DemoTokenRequest {
    org_id: String,
    user_id: String,
}

/// A token for one demo user, valid for a day (404 unless the demo sign-in is on): only for a
/// user MongoDB holds in that org.
async fn demo_token(State(s): State<AppState>, Json(r): Json<DemoTokenRequest>) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(secret) = &s.demo_secret else { return Err(ApiError::NotFound("the demo sign-in is off".into())) };
    if !board_model::model::is_object_id(&r.org_id) || !board_model::model::is_object_id(&r.user_id) {
        return Err(ApiError::BadRequest { code: "invalid_id", message: "orgId and userId must be ObjectIds".into() });
    }
    // A user id is kept as a string or as an ObjectId.
    let ids = bson::bson!([
        &r.user_id,
        bson::oid::ObjectId::parse_str(&r.user_id)
            .map_err(|_| ApiError::BadRequest { code: "invalid_id", message: "userId must be an ObjectId".into() })?
    ]);
    let opts = mongodb::options::FindOneOptions::builder().max_time(std::time::Duration::from_secs(5)).build();
    let user = s
        .mongo_db
        .collection::<bson::Document>("users")
        .find_one(bson::doc! {"_id": {"$in": ids}, "orgId": &r.org_id})
        .with_options(opts)
        .await
        .map_err(unavailable)?;
    if user.is_none() {
        return Err(ApiError::NotFound("no such user in that org".into()));
    }
    let token = super::auth::sign_hs256_as(secret.as_bytes(), &r.user_id, &r.org_id, 86_400, Some(super::auth::DEMO_ISSUER));
    Ok(Json(serde_json::json!({ "token": token })))
}

#[cfg(test)]
mod tests {
    use super::tail;
    use proptest::prelude::*;

    #[test]
    fn tail_keeps_the_last_six_characters() {
        assert_eq!(tail("5f0c1b2a3d4e5f6a7b8c9d0e"), "8c9d0e");
        assert_eq!(tail("abc"), "abc");
        assert_eq!(tail(""), "");
        assert_eq!(tail("ééééééé"), "éééééé");
        let family = "ab\u{1F469}\u{200D}\u{1F469}\u{200D}\u{1F467}";
        assert_eq!(tail(family), &family[1..]);
    }

    proptest! {
        /// Any string (a user id from MongoDB is not checked): no panic, at most 6 characters,
        /// a suffix of the id.
        #[test]
        fn tail_never_panics_and_is_a_suffix(id in any::<String>()) {
            let t = tail(&id);
            prop_assert!(id.ends_with(t));
            prop_assert_eq!(t.chars().count(), id.chars().count().min(6));
        }
    }
}
