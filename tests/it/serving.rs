//! Serving a board at the cost of its bytes (issue 20) against the real stack: answers in the
//! coding the client accepts, one computation shared by the viewers of a board — never a stale
//! one, never another caller's or another org's.
use crate::common::{small_seed, token, TestEnv};
use serde_json::{json, Value};
use std::io::Read;
use std::time::Duration;

/// One board request with extra headers: status, headers, raw body bytes.
async fn post(url: &str, bearer: &str, body: &str, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/api/contacts"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {bearer}"))
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

/// The board a client would draw: the answer without `meta` (the projection's lag in it moves).
fn board_of(bytes: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)));
    v.as_object_mut().unwrap().remove("meta");
    v
}

fn decode(coding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => drop(flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap()),
        "br" => drop(brotli::Decompressor::new(bytes, 4096).read_to_end(&mut out).unwrap()),
        "zstd" => out = zstd::decode_all(bytes).unwrap(),
        other => panic!("unexpected coding {other}"),
    }
    out
}

fn h_etag(h: &reqwest::header::HeaderMap) -> String {
    h["etag"].to_str().unwrap().to_string()
}

fn card_ids(board: &Value) -> Vec<String> {
    let mut ids: Vec<String> = board["dataByStatus"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|b| b["contacts"].as_array().unwrap().iter().map(|c| c["_id"].as_str().unwrap().to_string()))
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boards_are_compressed_and_shared_but_never_stale_nor_another_callers() {
    let env = TestEnv::new("serving").await;
    let seeded = env.seed(small_seed(2, 120, 303)).await;
    let _projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    // Answers shared for a minute: a missed change shows as a stale board, not hidden by expiry.
    let mut args = env.serve_args();
    args.shared_answers_max_age_ms = 60_000;
    let url = env.serve_with(args).await;
    let db = env.mongo().await;
    let (org, other) = (&seeded.org_ids[0], &seeded.org_ids[1]);
    let snap = board_mongo::load_org(&db, org).await.unwrap();
    let alice = token(org, &snap.users[0].id);
    let board = r#"{"size": 100}"#;

    // Every coding decodes to the board the identity answer is; each is announced and varies.
    let (status, h, plain) = post(&url, &alice, board, &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&plain));
    assert!(h.get("content-encoding").is_none());
    assert_eq!(h["vary"], "accept-encoding");
    let drawn = board_of(&plain);
    assert!(card_ids(&drawn).len() > 50, "a board worth compressing: {drawn}");
    for coding in ["zstd", "br", "gzip"] {
        let (status, h, bytes) = post(&url, &alice, board, &[("accept-encoding", coding)]).await;
        assert_eq!((status, h["content-encoding"].to_str().unwrap()), (200, coding));
        assert_eq!(h["vary"], "accept-encoding");
        assert!(bytes.len() * 4 < plain.len(), "{coding}: {} bytes of {}", bytes.len(), plain.len());
        assert_eq!(board_of(&decode(coding, &bytes)), drawn, "{coding}");
    }
    let (_, h, _) = post(&url, &alice, board, &[("accept-encoding", "gzip, br;q=0.5")]).await;
    assert_eq!(h["content-encoding"], "gzip", "the client's preference wins");
    // Each coding is its own representation: its own ETag, a 304 for it alone.
    let (_, plain_h, _) = post(&url, &alice, board, &[]).await;
    let zstd_etag = h_etag(&post(&url, &alice, board, &[("accept-encoding", "zstd")]).await.1);
    assert_ne!(zstd_etag, h_etag(&plain_h));
    let (status, _, _) = post(&url, &alice, board, &[("accept-encoding", "zstd"), ("if-none-match", &zstd_etag)]).await;
    assert_eq!(status, 304);
    let (status, _, _) = post(&url, &alice, board, &[("if-none-match", &zstd_etag)]).await;
    assert_eq!(status, 200, "the identity answer is another representation");

    // Concurrent viewers get the same board.
    let many = futures::future::join_all((0..16).map(|_| post(&url, &alice, board, &[("accept-encoding", "zstd")]))).await;
    for (status, _, bytes) in &many {
        assert_eq!((*status, board_of(&decode("zstd", bytes))), (200, drawn.clone()));
    }

    // A change the projection has applied is in the very next answer, though the answer before
    // it is shared for up to a second: the shared answer is keyed by the change token.
    for round in 0..3 {
        let (_, _, before) = post(&url, &alice, board, &[]).await;
        let shown = board_of(&before);
        let id = card_ids(&shown)[round].clone();
        let mut contact = serde_json::to_value(snap.contacts.iter().find(|c| c.id == id).unwrap()).unwrap();
        contact["firstName"] = json!(format!("Renamed{round}"));
        contact["version"] = json!(contact["version"].as_i64().unwrap() + 1 + round as i64);
        let event = json!({"type": "contact.upserted", "eventId": format!("serving-{round}"), "orgId": org,
            "occurredAt": "2026-12-01T00:00:00.000Z", "contact": contact});
        env.produce(&env.topics.topic_contacts, &id, &serde_json::to_vec(&event).unwrap()).await;
        env.wait_caught_up(Duration::from_secs(60)).await;
        for coding in ["identity", "zstd"] {
            let (status, h, after) = post(&url, &alice, board, &[("accept-encoding", coding)]).await;
            assert_eq!(status, 200);
            let after = if h.get("content-encoding").is_some() { decode(coding, &after) } else { after };
            let names: Vec<Value> = board_of(&after)["dataByStatus"]
                .as_object()
                .unwrap()
                .values()
                .flat_map(|b| b["contacts"].as_array().unwrap().clone())
                .filter(|c| c["_id"] == json!(id))
                .map(|c| c["firstName"].clone())
                .collect();
            assert_eq!(names, [json!(format!("Renamed{round}"))], "round {round}, {coding}: a stale shared answer");
        }
    }

    // `my` depends on who asks: each user's shared answer is the one computed for them alone,
    // and another org's caller with the same body gets their own org's board.
    let mut mine = Vec::new();
    for user in snap.users.iter().take(3) {
        let t = token(org, &user.id);
        let my = r#"{"size": 100, "ownerFilter": "my"}"#;
        let (_, _, shared) = post(&url, &t, my, &[]).await;
        let (_, _, own) = post(&url, &t, my, &[("cache-control", "no-cache")]).await;
        assert_eq!(board_of(&shared), board_of(&own), "user {}", user.id);
        mine.push(card_ids(&board_of(&shared)));
    }
    assert!(mine.windows(2).any(|w| w[0] != w[1]), "the users' own boards differ: {mine:?}");
    let other_snap = board_mongo::load_org(&db, other).await.unwrap();
    let (status, _, theirs) = post(&url, &token(other, &other_snap.users[0].id), board, &[]).await;
    assert_eq!(status, 200);
    let theirs = card_ids(&board_of(&theirs));
    let other_ids: std::collections::HashSet<&str> = other_snap.contacts.iter().map(|c| c.id.as_str()).collect();
    assert!(!theirs.is_empty() && theirs.iter().all(|id| other_ids.contains(id.as_str())), "another org's board: {theirs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_the_api_document_are_compressed_too() {
    let env = TestEnv::new("serving-assets").await;
    let url = env.serve_with(env.serve_args()).await;
    for path in ["/", "/assets/board.js", "/openapi.json"] {
        let plain = reqwest::get(format!("{url}{path}")).await.unwrap().bytes().await.unwrap();
        let r = reqwest::Client::new().get(format!("{url}{path}")).header("accept-encoding", "gzip").send().await.unwrap();
        assert_eq!(r.headers()["content-encoding"], "gzip", "{path}");
        let bytes = r.bytes().await.unwrap();
        assert_eq!(decode("gzip", &bytes), plain, "{path}");
    }
}
