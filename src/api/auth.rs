//! Bearer JWT (HS256) → the caller. Everything a request can see is scoped to `orgId` from the
//! verified token, never from the body.
use crate::query::error::ApiError;
use axum::http::HeaderMap;
use board_core::model::is_object_id;
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(rename = "orgId")]
    pub org_id: String,
    pub exp: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub user_id: String,
    pub org_id: String,
}

#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn hs256(secret: &[u8]) -> Self {
        // Only HS256: a token signed otherwise, or `alg: none`, is refused by the algorithm check.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Verifier { key: DecodingKey::from_secret(secret), validation }
    }

    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("missing Authorization header".into()))?
            .to_str()
            .map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("expected a Bearer token".into()))?;
        let data = decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
            let why = match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "token expired",
                jsonwebtoken::errors::ErrorKind::InvalidSignature => "bad token signature",
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => "token algorithm not accepted",
                _ => "invalid token",
            };
            ApiError::Unauthorized(why.into())
        })?;
        let c = data.claims;
        if !is_object_id(&c.org_id) || c.sub.trim().is_empty() {
            return Err(ApiError::Unauthorized("token lacks a valid orgId or sub".into()));
        }
        Ok(Caller { user_id: c.sub, org_id: c.org_id })
    }
}

/// Signs a token (tests, the demo and the bench use it).
pub fn sign_hs256(secret: &[u8], user_id: &str, org_id: &str, ttl_secs: i64) -> String {
    let exp = (chrono::Utc::now().timestamp() + ttl_secs).max(0) as u64;
    let claims = Claims { sub: user_id.to_string(), org_id: org_id.to_string(), exp };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, &jsonwebtoken::EncodingKey::from_secret(secret))
        .expect("HS256 signing cannot fail")
}
