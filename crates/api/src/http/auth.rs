//! Bearer JWT → the caller, as an axum extractor. Everything a request can see is scoped to
//! `orgId` from the verified token, never from the body.
//!
//! Accepted: HS256 with a shared secret of at least 32 bytes, and RS256 with a configured public
//! key (PEM) or a JWKS file (key chosen by the token's `kid`). Required claims: `sub`, `orgId`,
//! `exp`; `nbf` is honoured when present; `aud` and `iss` are checked when configured (a token
//! from a real identity provider carries an `aud`, accepted as-is when none is configured).
use super::AppState;
use crate::query::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use board_model::model::is_object_id;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;

/// Shortest HS256 secret accepted: RFC 7518 3.2 asks for a key at least as long as the hash.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// HS256 secret of the bearer tokens (at least 32 bytes).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// RS256 public key (PEM) of the bearer tokens.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// RS256 keys as a JWKS document (the identity provider's `jwks_uri` content); the token's
    /// `kid` picks the key.
    #[arg(long, env = "JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// Accepted audiences (`aud`), comma-separated; none: `aud` is not checked.
    #[arg(long, env = "JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,
    /// Accepted issuers (`iss`), comma-separated; none: `iss` is not checked.
    #[arg(long, env = "JWT_ISSUER", value_delimiter = ',')]
    pub jwt_issuer: Vec<String>,
}

impl AuthArgs {
    pub fn hs256(secret: &str) -> Self {
        AuthArgs { jwt_secret: Some(secret.to_string()), ..Default::default() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(rename = "orgId")]
    pub org_id: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// The issuer of the tokens the demo sign-in signs. They are signed with `JWT_SECRET` like a
/// real identity provider's, so only this claim tells them apart: `serve` refuses them whenever
/// the demo sign-in is off, and a token signed during a demo dies with the demo.
pub const DEMO_ISSUER: &str = "pipeline-board-demo";

#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub user_id: String,
    pub org_id: String,
}

#[derive(Clone)]
pub struct Verifier {
    hs256: Option<DecodingKey>,
    rs256_pem: Option<DecodingKey>,
    rs256_by_kid: HashMap<String, DecodingKey>,
    audience: Vec<String>,
    issuer: Vec<String>,
    /// Demo sign-in on: tokens issued by [`DEMO_ISSUER`] are accepted.
    demo_tokens: bool,
}

impl Verifier {
    /// Accepts the demo sign-in's tokens too (refused unless this is called).
    pub fn accepting_demo_tokens(mut self) -> Self {
        self.demo_tokens = true;
        if !self.issuer.is_empty() {
            self.issuer.push(DEMO_ISSUER.to_string());
        }
        self
    }

    /// Refuses to start with no key, a short secret, or a key file that does not parse.
    pub fn from_args(args: &AuthArgs) -> anyhow::Result<Self> {
        let hs256 = match args.jwt_secret.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => {
                anyhow::ensure!(s.len() >= MIN_SECRET_BYTES, "JWT_SECRET is {} bytes; at least {MIN_SECRET_BYTES} are required", s.len());
                Some(DecodingKey::from_secret(s.as_bytes()))
            }
            None => None,
        };
        let rs256_pem = match &args.jwt_public_key_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("JWT_PUBLIC_KEY_FILE {}: {e}", path.display()))?;
                Some(DecodingKey::from_rsa_pem(&pem).map_err(|e| anyhow::anyhow!("JWT_PUBLIC_KEY_FILE is not an RSA public key: {e}"))?)
            }
            None => None,
        };
        let mut rs256_by_kid = HashMap::new();
        if let Some(path) = &args.jwt_jwks_file {
            let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("JWT_JWKS_FILE {}: {e}", path.display()))?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("JWT_JWKS_FILE is not a JWKS document: {e}"))?;
            for jwk in &set.keys {
                let kid = jwk.common.key_id.clone().ok_or_else(|| anyhow::anyhow!("a key in JWT_JWKS_FILE has no kid"))?;
                rs256_by_kid.insert(kid, DecodingKey::from_jwk(jwk).map_err(|e| anyhow::anyhow!("JWT_JWKS_FILE key: {e}"))?);
            }
        }
        anyhow::ensure!(
            hs256.is_some() || rs256_pem.is_some() || !rs256_by_kid.is_empty(),
            "no token key configured: set JWT_SECRET, JWT_PUBLIC_KEY_FILE or JWT_JWKS_FILE"
        );
        Ok(Verifier {
            hs256,
            rs256_pem,
            rs256_by_kid,
            audience: args.jwt_audience.clone(),
            issuer: args.jwt_issuer.clone(),
            demo_tokens: false,
        })
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        let mut required = vec!["exp", "sub"];
        v.validate_nbf = true;
        v.leeway = 5;
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audience);
            required.push("aud");
        }
        if !self.issuer.is_empty() {
            v.set_issuer(&self.issuer);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v
    }

    /// The key for the token's algorithm (and `kid`); a token of any other algorithm, `none`
    /// included, has no key and is refused.
    fn key(&self, token: &str) -> Result<(&DecodingKey, Algorithm), ApiError> {
        let header = decode_header(token).map_err(|_| ApiError::Unauthorized("invalid token".into()))?;
        let refused = || ApiError::Unauthorized("token algorithm not accepted".into());
        match header.alg {
            Algorithm::HS256 => self.hs256.as_ref().map(|k| (k, Algorithm::HS256)).ok_or_else(refused),
            // A `kid` names a JWKS key and nothing else: an unknown one (a rotated-away key) is
            // refused rather than tried against the PEM key.
            Algorithm::RS256 => match (&header.kid, self.rs256_by_kid.is_empty()) {
                (Some(kid), false) => self
                    .rs256_by_kid
                    .get(kid)
                    .map(|k| (k, Algorithm::RS256))
                    .ok_or_else(|| ApiError::Unauthorized("unknown token key id".into())),
                _ => self.rs256_pem.as_ref().map(|k| (k, Algorithm::RS256)).ok_or_else(refused),
            },
            _ => Err(refused()),
        }
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
        let (key, alg) = self.key(token)?;
        let data = decode::<Claims>(token, key, &self.validation(alg)).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            let why = match e.kind() {
                ErrorKind::ExpiredSignature => "token expired",
                ErrorKind::ImmatureSignature => "token not valid yet",
                ErrorKind::InvalidSignature => "bad token signature",
                ErrorKind::InvalidAlgorithm => "token algorithm not accepted",
                ErrorKind::InvalidAudience => "token audience not accepted",
                ErrorKind::InvalidIssuer => "token issuer not accepted",
                _ => "invalid token",
            };
            ApiError::Unauthorized(why.into())
        })?;
        let c = data.claims;
        if c.iss.as_deref() == Some(DEMO_ISSUER) && !self.demo_tokens {
            return Err(ApiError::Unauthorized("demo token refused: the demo sign-in is off".into()));
        }
        if !is_object_id(&c.org_id) || c.sub.trim().is_empty() {
            return Err(ApiError::Unauthorized("token lacks a valid orgId or sub".into()));
        }
        let named: Vec<&axum::http::HeaderValue> = headers.get_all(ORG_HEADER).iter().collect();
        if !named.is_empty() && (named.len() > 1 || named[0].as_bytes() != c.org_id.as_bytes()) {
            return Err(ApiError::BadRequest {
                code: "org_header_mismatch",
                message: format!("the {ORG_HEADER} header must name the token's org"),
            });
        }
        Ok(Caller { user_id: c.sub, org_id: c.org_id })
    }
}

/// The header a load balancer routes by (README, Scaling: `deploy/org-router.sh`): every request
/// of one org goes to the same API instance, whose in-memory indexes then hold only its orgs.
/// Optional; when sent it must be one header naming the token's org. Routing grants no access
/// (every read uses the token's org): the check keeps a client from being routed by one org and
/// answered for another. A client that leaves the header out is spread round robin, loading its
/// org's index on several instances: the page and the documented clients send it.
pub const ORG_HEADER: &str = "x-org-id";

/// Handlers that take a `Caller` are authenticated before anything else of the request is read.
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        state.verifier.caller(&parts.headers)
    }
}

/// Signs a token (tests and the bench use it).
pub fn sign_hs256(secret: &[u8], user_id: &str, org_id: &str, ttl_secs: i64) -> String {
    sign_hs256_as(secret, user_id, org_id, ttl_secs, None)
}

/// Signs a token naming its issuer (the demo sign-in signs as [`DEMO_ISSUER`]).
pub fn sign_hs256_as(secret: &[u8], user_id: &str, org_id: &str, ttl_secs: i64, issuer: Option<&str>) -> String {
    let exp = (chrono::Utc::now().timestamp() + ttl_secs).max(0) as u64;
    let claims = Claims { sub: user_id.to_string(), org_id: org_id.to_string(), exp, iss: issuer.map(str::to_string) };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, &jsonwebtoken::EncodingKey::from_secret(secret))
        .expect("HS256 signing cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
    const ORG: &str = "5f0c1b2a3d4e5f6a7b8c9d0e";

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        h
    }

    #[test]
    fn demo_tokens_are_refused_unless_the_demo_sign_in_is_on() {
        let demo = sign_hs256_as(SECRET.as_bytes(), "u1", ORG, 60, Some(DEMO_ISSUER));
        let plain = sign_hs256(SECRET.as_bytes(), "u1", ORG, 60);
        let off = Verifier::from_args(&AuthArgs::hs256(SECRET)).unwrap();
        assert!(matches!(off.caller(&bearer(&demo)), Err(ApiError::Unauthorized(m)) if m.contains("demo")));
        assert_eq!(off.caller(&bearer(&plain)).unwrap().org_id, ORG);
        let on = off.accepting_demo_tokens();
        assert_eq!(on.caller(&bearer(&demo)).unwrap(), Caller { user_id: "u1".into(), org_id: ORG.into() });
    }

    #[test]
    fn an_org_header_must_name_the_tokens_org() {
        let verifier = Verifier::from_args(&AuthArgs::hs256(SECRET)).unwrap();
        let token = sign_hs256(SECRET.as_bytes(), "u1", ORG, 60);
        let with = |org: &str| {
            let mut h = bearer(&token);
            h.insert(ORG_HEADER, org.parse().unwrap());
            verifier.caller(&h)
        };
        assert_eq!(with(ORG).unwrap().org_id, ORG);
        assert!(verifier.caller(&bearer(&token)).is_ok(), "the header is optional");
        let mut twice = bearer(&token);
        twice.append(ORG_HEADER, ORG.parse().unwrap());
        twice.append(ORG_HEADER, "5f0c1b2a3d4e5f6a7b8c9d0f".parse().unwrap());
        assert!(verifier.caller(&twice).is_err(), "two headers: refused");
        for other in ["5f0c1b2a3d4e5f6a7b8c9d0f", "", "5F0C1B2A3D4E5F6A7B8C9D0E"] {
            assert!(matches!(with(other), Err(ApiError::BadRequest { code: "org_header_mismatch", .. })), "{other:?}");
        }
        let mut unsigned = HeaderMap::new();
        unsigned.insert(ORG_HEADER, ORG.parse().unwrap());
        assert!(matches!(verifier.caller(&unsigned), Err(ApiError::Unauthorized(_))), "the token is checked first");
    }

    #[test]
    fn with_configured_issuers_the_demo_issuer_is_one_more_only_while_the_demo_is_on() {
        let args = AuthArgs { jwt_issuer: vec!["https://idp.example".into()], ..AuthArgs::hs256(SECRET) };
        let demo = sign_hs256_as(SECRET.as_bytes(), "u1", ORG, 60, Some(DEMO_ISSUER));
        let idp = sign_hs256_as(SECRET.as_bytes(), "u1", ORG, 60, Some("https://idp.example"));
        let off = Verifier::from_args(&args).unwrap();
        assert!(off.caller(&bearer(&demo)).is_err());
        assert!(off.caller(&bearer(&idp)).is_ok());
        let on = Verifier::from_args(&args).unwrap().accepting_demo_tokens();
        assert!(on.caller(&bearer(&demo)).is_ok() && on.caller(&bearer(&idp)).is_ok());
    }
}
