//! Black-box HTTP tests of `POST /api/contacts` and the service endpoints, against the real stack.
use crate::common::{eventually, free_port, post_board, small_seed, token, TestEnv, JWT_SECRET};
use board_mongo::OrgSnapshot;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::OnceCell;

struct Fixture {
    env: TestEnv,
    url: String,
    orgs: Vec<(String, OrgSnapshot)>,
}

/// One projected data set of two orgs for all tests of this file.
static FIXTURE: OnceCell<Fixture> = OnceCell::const_new();

async fn fixture() -> &'static Fixture {
    FIXTURE
        .get_or_init(|| async {
            let env = TestEnv::new("api").await;
            let seeded = env.seed(small_seed(2, 150, 3)).await;
            let db = env.mongo().await;
            let mut orgs = Vec::new();
            for org in &seeded.org_ids {
                orgs.push((org.clone(), board_mongo::load_org(&db, org).await.unwrap()));
            }
            // A server of its own (on the fixture's runtime-independent thread) for all tests.
            let args = env.serve_args();
            let settings = env.settings();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async move {
                    // A projector keeps running beside the API, as in a deployment: readiness
                    // asks for one (the ends it publishes).
                    let counters = std::sync::Arc::new(projector::RunCounters::default());
                    tokio::spawn(projector::run(settings, counters, std::future::pending()));
                    let app = board_api::http::Application::build(&args).await.unwrap();
                    tx.send(format!("http://{}", app.local_addr())).unwrap();
                    app.run(std::future::pending()).await.unwrap();
                });
            });
            let url = rx.recv().unwrap();
            env.wait_caught_up(Duration::from_secs(120)).await;
            Fixture { env, url, orgs }
        })
        .await
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

fn all_cards(body: &Value) -> Vec<&Value> {
    body["data"].as_object().map(|m| m.values().flat_map(|b| b["contacts"].as_array().unwrap().iter()).collect()).unwrap_or_default()
}

fn totals(body: &Value) -> u64 {
    body["data"].as_object().map(|m| m.values().map(|b| b["total"].as_u64().unwrap()).sum()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked() {
    let f = fixture().await;
    let (org, snap) = &f.orgs[0];
    let user = &snap.users[0].id;
    let good = token(org, user);
    assert_eq!(post_board(&f.url, Some(&good), "{}").await.0, 200);

    let expired = board_api::http::auth::sign_hs256(JWT_SECRET.as_bytes(), user, org, -3600);
    let wrong_secret = board_api::http::auth::sign_hs256(b"another secret", user, org, 3600);
    let parts: Vec<&str> = good.split('.').collect();
    let tampered_claims = {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: Value = serde_json::from_slice(&e.decode(parts[1]).unwrap()).unwrap();
        claims["orgId"] = json!(f.orgs[1].0);
        format!("{}.{}.{}", parts[0], e.encode(serde_json::to_vec(&claims).unwrap()), parts[2])
    };
    let alg_none = {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.", e.encode(br#"{"alg":"none","typ":"JWT"}"#), parts[1])
    };
    let bad_org = board_api::http::auth::sign_hs256(JWT_SECRET.as_bytes(), user, "not-an-object-id", 3600);
    for (what, t) in [
        ("garbage", "abc.def.ghi".to_string()),
        ("expired", expired),
        ("wrong secret", wrong_secret),
        ("tampered", tampered_claims),
        ("alg none", alg_none),
        ("bad orgId", bad_org),
    ] {
        let (status, body) = post_board(&f.url, Some(&t), "{}").await;
        assert_eq!((status, error_code(&body)), (401, "unauthorized"), "{what}: {body}");
    }
    let (status, body) = post_board(&f.url, None, "{}").await;
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    let resp =
        reqwest::Client::new().post(format!("{}/api/contacts", f.url)).header("authorization", "Basic dXNlcjpwdw==").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

fn fixture_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Signs any claims with any header and key (the tests' identity provider).
fn sign(header: jsonwebtoken::Header, claims: Value, key: &jsonwebtoken::EncodingKey) -> String {
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

/// `nbf`, audience, issuer, RS256 from a PEM key and from a JWKS, and the secret-length rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_time_audience_issuer_and_rs256() {
    use board_api::http::auth::AuthArgs;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let f = fixture().await;
    let (org, snap) = &f.orgs[0];
    let user = &snap.users[0].id;
    let now = chrono::Utc::now().timestamp();
    let hs = EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(fixture_path("jwt-rs256.key.pem")).unwrap()).unwrap();
    let claims = |extra: Value| {
        let mut c = json!({"sub": user, "orgId": org, "exp": now + 600});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        c
    };
    let rs_header = |kid: Option<&str>| {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = kid.map(str::to_string);
        h
    };

    // The shared fixture (HS256, no audience or issuer configured).
    let not_yet = sign(Header::new(Algorithm::HS256), claims(json!({"nbf": now + 600})), &hs);
    let (status, body) = post_board(&f.url, Some(&not_yet), "{}").await;
    assert_eq!((status, body["error"]["message"].as_str()), (401, Some("token not valid yet")), "{body}");
    let valid_since = sign(Header::new(Algorithm::HS256), claims(json!({"nbf": now - 60})), &hs);
    assert_eq!(post_board(&f.url, Some(&valid_since), "{}").await.0, 200);
    // Real identity providers set `aud`: accepted when no audience is configured.
    let with_aud = sign(Header::new(Algorithm::HS256), claims(json!({"aud": "board-ui"})), &hs);
    assert_eq!(post_board(&f.url, Some(&with_aud), "{}").await.0, 200);
    // No RS256 key configured here: an RS256 token is refused.
    let rs = sign(rs_header(None), claims(json!({})), &rsa);
    assert_eq!(post_board(&f.url, Some(&rs), "{}").await.0, 401);

    // Audience and issuer configured, plus RS256 from a PEM key and from a JWKS.
    let mut args = f.env.serve_args();
    args.auth = AuthArgs {
        jwt_secret: Some(JWT_SECRET.into()),
        jwt_public_key_file: Some(fixture_path("jwt-rs256.pub.pem")),
        jwt_jwks_file: Some(fixture_path("jwks.json")),
        jwt_audience: vec!["board-ui".into()],
        jwt_issuer: vec!["https://id.example".into()],
    };
    let url = f.env.serve_with(args.clone()).await;
    let good = json!({"aud": "board-ui", "iss": "https://id.example"});
    for (what, t) in [
        ("hs256", sign(Header::new(Algorithm::HS256), claims(good.clone()), &hs)),
        ("rs256 pem", sign(rs_header(None), claims(good.clone()), &rsa)),
        ("rs256 jwks kid", sign(rs_header(Some("test-key-1")), claims(good.clone()), &rsa)),
        ("audience list", sign(rs_header(None), claims(json!({"aud": ["other", "board-ui"], "iss": "https://id.example"})), &rsa)),
    ] {
        let (status, body) = post_board(&url, Some(&t), "{}").await;
        assert_eq!(status, 200, "{what}: {body}");
    }
    for (what, t, message) in [
        ("no aud", sign(rs_header(None), claims(json!({"iss": "https://id.example"})), &rsa), "invalid token"),
        ("other aud", sign(rs_header(None), claims(json!({"aud": "x", "iss": "https://id.example"})), &rsa), "token audience not accepted"),
        ("other iss", sign(rs_header(None), claims(json!({"aud": "board-ui", "iss": "https://evil"})), &rsa), "token issuer not accepted"),
        ("unknown kid", sign(rs_header(Some("rotated-away")), claims(good.clone()), &rsa), "unknown token key id"),
        (
            "hs256 signed with the public key",
            sign(
                Header::new(Algorithm::HS256),
                claims(good.clone()),
                &EncodingKey::from_secret(&std::fs::read(fixture_path("jwt-rs256.pub.pem")).unwrap()),
            ),
            "bad token signature",
        ),
        ("rs384", sign(Header::new(Algorithm::RS384), claims(good.clone()), &rsa), "token algorithm not accepted"),
    ] {
        let (status, body) = post_board(&url, Some(&t), "{}").await;
        assert_eq!((status, body["error"]["message"].as_str()), (401, Some(message)), "{what}: {body}");
    }

    // A short secret, or no key at all, is refused at start-up.
    args.auth = AuthArgs::hs256("thirty-one-bytes-is-not-enough!");
    let err = board_api::http::Application::build(&args).await.err().expect("short secret refused");
    assert!(err.to_string().contains("at least 32"), "{err}");
    args.auth = AuthArgs::default();
    assert!(board_api::http::Application::build(&args).await.is_err(), "no key refused");
}

/// A pipeline that MongoDB has and the projection does not (its event late or dead-lettered) is
/// answered from MongoDB, not a 404; one that neither has is a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_only_mongodb_knows_is_answered_not_404() {
    let f = fixture().await;
    let (org, snap) = &f.orgs[0];
    let t = token(org, &snap.users[0].id);
    let id = format!("{:024x}", rand::random::<u64>() as u128 | (0xabcd_u128 << 80));
    let stages = [(format!("{:024x}", rand::random::<u64>()), "Late A"), (format!("{:024x}", rand::random::<u64>()), "Late B")];
    let pipeline: board_model::model::Pipeline = serde_json::from_value(json!({
        "_id": id, "orgId": org, "name": "Only in MongoDB", "type": "Application", "isActive": false,
        "stages": [{"_id": stages[0].0, "name": stages[0].1, "order": 0}, {"_id": stages[1].0, "name": stages[1].1, "order": 1}],
        "version": 1}))
    .unwrap();
    let db = f.env.mongo().await;
    db.collection("pipelines").insert_one(board_mongo::pipeline_to_bson(&pipeline)).await.unwrap();

    let body = json!({"pipelineType": "Application", "pipelineId": id}).to_string();
    let (status, answer) = post_board(&f.url, Some(&t), &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["meta"]["answeredBy"].as_str(), answer["meta"]["reason"].as_str()),
        (Some("mongodb"), Some("pipeline_not_projected"))
    );
    let names: Vec<&str> = answer["data"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(names, ["Late A", "Late B"]);

    let unknown = json!({"pipelineId": format!("{:024x}", rand::random::<u64>())}).to_string();
    let (status, answer) = post_board(&f.url, Some(&t), &unknown).await;
    assert_eq!((status, error_code(&answer)), (404, "not_found"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error() {
    let f = fixture().await;
    let (org, snap) = &f.orgs[0];
    let t = token(org, &snap.users[0].id);
    for (body, code) in [
        (r#"{"pipelineType": "Deal"}"#, "invalid_pipeline_type"),
        (r#"{"size": 0}"#, "invalid_size"),
        (r#"{"size": 101}"#, "invalid_size"),
        (r#"{"page": {"New Lead": 0}}"#, "invalid_page"),
        (r#"{"createdDateRange": {"start": "2026-13-45"}}"#, "invalid_date"),
        (r#"{"lastMessageDateRange": {"end": "tomorrow"}}"#, "invalid_date"),
        (r#"{"lastMessageTimeRange": {"value": 2, "unit": "fortnights"}}"#, "invalid_unit"),
        (r#"{"messageStatus": "read"}"#, "invalid_message_status"),
        (r#"{"search": 5}"#, "malformed_body"),
        (r#"[1, 2"#, "malformed_body"),
        (r#"{"owner": ["bob"]}"#, "invalid_user_id"),
        (r#"{"assignee": ["65a00000000000000000000a", "x:y"]}"#, "invalid_user_id"),
        (r#"{"ownerFilter": "{owner}"}"#, "invalid_owner_filter"),
        (r#"{"pipelineId": "nope"}"#, "invalid_pipeline_id"),
    ] {
        let (status, resp) = post_board(&f.url, Some(&t), body).await;
        assert_eq!((status, error_code(&resp)), (400, code), "{body}: {resp}");
        assert!(resp["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let huge = format!(r#"{{"search": "{}"}}"#, "x".repeat(70 * 1024));
    let (status, resp) = post_board(&f.url, Some(&t), &huge).await;
    assert_eq!((status, error_code(&resp)), (413, "payload_too_large"));
    let (status, resp) = post_board(&f.url, Some(&t), r#"{"pipelineId": "000000000000000000000000"}"#).await;
    assert_eq!((status, error_code(&resp)), (404, "not_found"));
    // User text never becomes a regex: metacharacters are matched literally (nothing matches).
    let (status, resp) = post_board(&f.url, Some(&t), r#"{"search": ".*", "customFields": {"industry": "(.*"}}"#).await;
    assert_eq!((status, totals(&resp)), (200, 0), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_shape_order_and_paths() {
    let f = fixture().await;
    let (org, snap) = &f.orgs[0];
    let t = token(org, &snap.users[0].id);
    let (status, body) = post_board(&f.url, Some(&t), r#"{"size": 3}"#).await;
    assert_eq!(status, 200);
    assert_eq!(body["meta"]["answeredBy"], "projection");
    // Columns left to right in the active pipeline's stage order, in all four maps.
    let active = snap.pipelines.iter().find(|p| p.kind.as_deref() == Some("Contact") && p.is_active == Some(true)).unwrap();
    let mut stages = active.stages.clone().unwrap();
    stages.sort_by_key(|s| s.order);
    let names: Vec<String> = stages.iter().map(|s| s.name.clone().unwrap()).collect();
    let ids: Vec<String> = stages.iter().map(|s| s.id.clone()).collect();
    assert_eq!(body["data"].as_object().unwrap().keys().cloned().collect::<Vec<_>>(), names);
    assert_eq!(body["dataByStatus"].as_object().unwrap().keys().cloned().collect::<Vec<_>>(), ids);
    assert_eq!(body["stageIdByName"][&names[0]], json!(ids[0]));
    assert_eq!(body["stageNameById"][&ids[0]], json!(names[0]));
    for (name, id) in names.iter().zip(&ids) {
        assert_eq!(body["data"][name], body["dataByStatus"][id]);
        let cards = body["data"][name]["contacts"].as_array().unwrap();
        assert!(cards.len() <= 3);
        let keys: Vec<(String, String)> =
            cards.iter().map(|c| (c["createdAt"].as_str().unwrap_or("").to_string(), c["_id"].as_str().unwrap().to_string())).collect();
        let mut sorted = keys.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(keys, sorted, "createdAt desc, then _id desc");
        for c in cards {
            assert!(c.get("assignees").is_some_and(Value::is_array) && c.get("lastMessageAt").is_some());
        }
    }
    // customFields: MongoDB is asked for the matching cards' ids, the projection answers among
    // them; every card returned matches the filter.
    let (status, body) = post_board(&f.url, Some(&t), r#"{"customFields": {"industry": "ESTATE"}, "size": 100}"#).await;
    assert_eq!(
        (status, body["meta"]["answeredBy"].as_str(), body["meta"]["route"].as_str()),
        (200, Some("projection"), Some("index_among_mongodb_ids"))
    );
    assert!(totals(&body) > 0);
    for c in all_cards(&body) {
        assert_eq!(c["customFields"]["industry"], "Real estate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_reaches_another_orgs_data() {
    let f = fixture().await;
    let (org_a, snap_a) = &f.orgs[0];
    let (_, snap_b) = &f.orgs[1];
    let t = token(org_a, &snap_a.users[0].id);
    let b_pipeline = snap_b.pipelines.iter().find(|p| p.kind.as_deref() == Some("Contact") && p.is_active == Some(true)).unwrap();
    let b_stage = &b_pipeline.stages.as_ref().unwrap()[0];
    let b_user = &snap_b.users[0].id;
    let a_pipelines: BTreeSet<String> = snap_a.pipelines.iter().map(|p| p.id.clone()).collect();
    let b_names: Vec<String> = b_pipeline.stages.as_ref().unwrap().iter().map(|s| s.name.clone().unwrap()).collect();
    let b_map: serde_json::Map<String, Value> =
        b_pipeline.stages.as_ref().unwrap().iter().map(|s| (s.name.clone().unwrap(), json!(s.id))).collect();

    let (status, body) = post_board(&f.url, Some(&t), &json!({"pipelineId": b_pipeline.id}).to_string()).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"), "another org's pipeline is not found");
    let attempts = [
        json!({"status": b_stage.id}),
        json!({"stages": b_names}),
        json!({"stageIdByName": b_map}),
        json!({"stageIdByName": b_map, "stages": b_names, "size": 100}),
        json!({"owner": [b_user]}),
        json!({"assignee": [b_user]}),
        json!({"ownerFilter": b_user}),
        json!({"pipelineType": "Application", "owner": [b_user]}),
    ];
    for body in attempts {
        let (status, resp) = post_board(&f.url, Some(&t), &body.to_string()).await;
        assert_eq!(status, 200, "{body}: {resp}");
        for card in all_cards(&resp) {
            assert_eq!(card["orgId"], json!(org_a), "{body} leaked {card}");
            assert!(card["pipelineId"].is_null() || a_pipelines.contains(card["pipelineId"].as_str().unwrap()), "{body} leaked {card}");
        }
        if body.get("owner").is_some() || body.get("assignee").is_some() || body.get("ownerFilter").is_some() {
            assert_eq!(totals(&resp), 0, "{body}: another org's user matches nothing here");
        }
        if body.get("status").is_some() {
            assert_eq!(totals(&resp), 0, "{body}: another org's stage id answers an empty bucket");
        }
    }
    // stageIdByName can never widen what is visible: the same answer as without it.
    let plain = post_board(&f.url, Some(&t), r#"{"size": 100}"#).await.1;
    let with_map = post_board(&f.url, Some(&t), &json!({"size": 100, "stageIdByName": b_map}).to_string()).await.1;
    assert_eq!(plain["data"], with_map["data"]);
    // A token for an org without data sees nothing.
    let stranger = token("0123456789abcdef01234567", b_user);
    assert_eq!(post_board(&f.url, Some(&stranger), "{}").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_endpoints() {
    let f = fixture().await;
    let client = reqwest::Client::new();
    let health = client.get(format!("{}/healthz", f.url)).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    // Readiness follows the background probe: on a loaded machine one MongoDB ping may take
    // longer than its bound and count MongoDB down (`degraded`) until the next one; what is
    // meant is "both up and ready", awaited.
    let url = f.url.clone();
    eventually(Duration::from_secs(30), "readiness says ready with both dependencies up", || {
        let url = url.clone();
        async move {
            let ready: Value = reqwest::get(format!("{url}/readyz")).await.unwrap().json().await.unwrap();
            (ready["status"].as_str(), ready["redis"].as_str(), ready["mongodb"].as_str()) == (Some("ready"), Some("up"), Some("up"))
        }
    })
    .await;
    // The lag comes from Redis alone (the ends the projector published): caught up, it is 0.
    let url = f.url.clone();
    eventually(Duration::from_secs(20), "readiness reports a projection lag of 0", || {
        let url = url.clone();
        async move { reqwest::get(format!("{url}/readyz")).await.unwrap().json::<Value>().await.unwrap()["projectionLag"] == json!(0) }
    })
    .await;
    let openapi: Value = client.get(format!("{}/openapi.json", f.url)).send().await.unwrap().json().await.unwrap();
    assert!(openapi["paths"]["/api/contacts"]["post"].is_object(), "{openapi}");
    let (org, snap) = &f.orgs[0];
    post_board(&f.url, Some(&token(org, &snap.users[0].id)), "{}").await;
    let metrics = client.get(format!("{}/metrics", f.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("pb_http_requests_total"), "{metrics}");

    // METRICS_ADDR: `/metrics` moves to a listener of its own, off the public port.
    let mut args = f.env.serve_args();
    args.metrics_addr = Some("127.0.0.1:0".into());
    let app = board_api::http::Application::build(&args).await.unwrap();
    let (public, private) = (format!("http://{}", app.local_addr()), format!("http://{}", app.metrics_addr().unwrap()));
    tokio::spawn(app.run(std::future::pending()));
    assert_eq!(client.get(format!("{public}/metrics")).send().await.unwrap().status(), 404);
    assert_eq!(client.get(format!("{public}/healthz")).send().await.unwrap().status(), 200);
    let scraped = client.get(format!("{private}/metrics")).send().await.unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(scraped.text().await.unwrap().contains("pb_http_requests_total"));
    assert_eq!(client.get(format!("{private}/api/contacts")).send().await.unwrap().status(), 404, "only /metrics there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_mode_answers_from_mongodb_and_503_when_both_are_down() {
    let f = fixture().await;
    let (org, snap) = &f.orgs[0];
    let t = token(org, &snap.users[0].id);
    let request = r#"{"size": 5, "ownerFilter": "my"}"#;
    let healthy = post_board(&f.url, Some(&t), request).await.1;
    assert_eq!(healthy["meta"]["answeredBy"], "projection");

    let mut args = f.env.serve_args();
    args.redis.redis_url = format!("redis://127.0.0.1:{}", free_port());
    let no_redis = f.env.serve_with(args.clone()).await;
    let (status, degraded) = post_board(&no_redis, Some(&t), request).await;
    assert_eq!(status, 200, "{degraded}");
    assert_eq!(
        (degraded["meta"]["answeredBy"].as_str(), degraded["meta"]["reason"].as_str()),
        (Some("mongodb"), Some("projection_unavailable"))
    );
    assert_eq!(degraded["data"], healthy["data"], "MongoDB gives the projection's answer");

    args.mongo.mongodb_uri = format!("mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=500", free_port());
    let nothing = f.env.serve_with(args).await;
    // Before the health probe has found them down, both are tried: a clean 503 all the same.
    let (status, body) = post_board(&nothing, Some(&t), request).await;
    assert_eq!(status, 503, "{body}");
    assert!(!body.to_string().contains("127.0.0.1"), "internal error text never reaches the client: {body}");
    eventually(Duration::from_secs(20), "readiness names both dependencies down", || {
        let url = nothing.clone();
        async move {
            let r = reqwest::get(format!("{url}/readyz")).await.unwrap();
            r.status().as_u16() == 503 && r.json::<Value>().await.unwrap()["down"] == json!(["redis", "mongodb"])
        }
    })
    .await;
    // Known down: answered at once, saying which dependency is missing.
    let (status, body) = post_board(&nothing, Some(&t), request).await;
    assert_eq!((status, error_code(&body)), (503, "mongodb_unavailable"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_on_port_zero_and_stops_on_sigterm() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::io::BufRead;
    let f = fixture().await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline-board"))
        .arg("serve")
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("JWT_SECRET", JWT_SECRET)
        .env("REDIS_URL", &f.env.redis_url)
        .env("REDIS_PREFIX", f.env.keys.prefix())
        .env("MONGODB_URI", &f.env.mongo_uri)
        .env("MONGODB_DB", &f.env.mongo_db)
        .env("LAG_INTERVAL_MS", "0")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect("first line names the address").to_string();
    let url = format!("http://{addr}");
    assert_eq!(reqwest::get(format!("{url}/healthz")).await.unwrap().status().as_u16(), 200);
    let (org, snap) = &f.orgs[1];
    let (status, body) = post_board(&url, Some(&token(org, &snap.users[0].id)), r#"{"size": 1}"#).await;
    assert_eq!(status, 200);
    assert!(totals(&body) > 0);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "SIGTERM: graceful exit 0");
    // Its logs went to a pipe, not a terminal: plain text, no colour codes (a log file or a
    // collector would keep them as noise).
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("serving"), "{logs}");
    assert!(!logs.contains('\x1b'), "ANSI escapes in logs written to a pipe: {logs:?}");
}

/// The MongoDB path never builds an unbounded id list: a filter that needs more contact ids
/// than it may hold is a quick, clean 503, not a query that grows with the org.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mongodb_path_refuses_filters_too_broad_for_it() {
    let f = fixture().await;
    let (org, snap) = &f.orgs[0];
    let t = token(org, &snap.users[0].id);
    let mut args = f.env.serve_args();
    args.mongodb_path_max_ids = 5;
    let url = f.env.serve_with(args).await;
    // More custom-field matches than the bound send the whole request to MongoDB, where
    // `answered` needs every contact with a message.
    let body = json!({"customFields": {"vip": false}, "messageStatus": "answered"}).to_string();
    let (status, resp) = post_board(&url, Some(&t), &body).await;
    assert_eq!((status, error_code(&resp)), (503, "mongodb_filter_too_broad"), "{resp}");
    // Within the bound it answers.
    let (status, resp) = post_board(&url, Some(&t), &json!({"customFields": {"vip": false}}).to_string()).await;
    assert_eq!(
        (status, resp["meta"]["answeredBy"].as_str(), resp["meta"]["reason"].as_str()),
        (200, Some("mongodb"), Some("custom_fields_too_broad")),
        "{resp}"
    );
}
