//! The board page (issue 10) over HTTP against the real stack: the page and its assets, ETags and
//! `304 Not Modified` for polling boards, the demo sign-in (off unless enabled).
use crate::common::{eventually, post_board, post_with_etag, small_seed, token, TestEnv};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_polls_cheaply_and_signs_demo_users_in_only_when_enabled() {
    let env = TestEnv::new("board-page").await;
    let seeded = env.seed(small_seed(2, 60, 101)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let url = env.serve_with(env.serve_args()).await;

    // The page and its assets, from the binary.
    let page = reqwest::get(format!("{url}/")).await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script src="/assets/board.js">"#) && html.contains(r#"href="/assets/board.css""#), "{html}");
    for (path, kind) in [("/", "text/html"), ("/assets/board.js", "text/javascript"), ("/assets/board.css", "text/css")] {
        let r = reqwest::get(format!("{url}{path}")).await.unwrap();
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert!(h["content-type"].to_str().unwrap().starts_with(kind));
        // No inline script, no other origin, never framed, never sniffed as another type.
        let csp = h["content-security-policy"].to_str().unwrap();
        for directive in ["default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "base-uri 'none'"] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
    }

    // Polling: the same answer is 304 with its ETag; a change anywhere in the answer is a new one.
    let db = env.mongo().await;
    let (org, other) = (&seeded.org_ids[0], &seeded.org_ids[1]);
    let snap = board_mongo::load_org(&db, org).await.unwrap();
    let t = token(org, &snap.users[0].id);
    let board = r#"{"size": 100}"#;
    let (status, etag, body_of_board) = post_with_etag(&url, &t, board, None).await;
    assert_eq!(status, 200, "{body_of_board}");
    let etag = etag.expect("an ETag");
    let (status, again, body) = post_with_etag(&url, &t, board, Some(&etag)).await;
    assert_eq!((status, again.as_deref(), body.as_str()), (304, Some(etag.as_str()), ""));
    let (status, _, _) = post_with_etag(&url, &t, r#"{"size": 1}"#, Some(&etag)).await;
    assert_eq!(status, 200, "another board is another answer");
    // Another org's caller never gets a 304 for this org's ETag.
    let other_snap = board_mongo::load_org(&db, other).await.unwrap();
    let (status, _, _) = post_with_etag(&url, &token(other, &other_snap.users[0].id), board, Some(&etag)).await;
    assert_eq!(status, 200);

    // A contact of the board changes name: the old ETag no longer matches.
    let shown: Value = serde_json::from_str(&body_of_board).unwrap();
    let first_id = shown["data"].as_object().unwrap().values().find_map(|b| b["contacts"][0]["_id"].as_str()).unwrap().to_string();
    let mut contact = snap.contacts.iter().find(|c| c.id == first_id).unwrap().clone();
    contact.first_name = Some("Renamed".into());
    contact.version = Some(contact.version.unwrap() + 1);
    let event = json!({"type": "contact.upserted", "eventId": "page-etag", "orgId": org,
        "occurredAt": "2026-12-01T00:00:00.000Z", "contact": contact});
    env.produce(&env.topics.topic_contacts, &contact.id, &serde_json::to_vec(&event).unwrap()).await;
    let (u, tk, old) = (url.clone(), t.clone(), etag.clone());
    eventually(Duration::from_secs(30), "a changed board answers 200 with a new ETag", move || {
        let (u, tk, old) = (u.clone(), tk.clone(), old.clone());
        async move {
            let (status, etag, _) = post_with_etag(&u, &tk, board, Some(&old)).await;
            status == 200 && etag.is_some_and(|e| e != old)
        }
    })
    .await;

    // The demo sign-in is off by default ...
    let r = reqwest::get(format!("{url}/api/demo/users")).await.unwrap();
    assert_eq!(r.status(), 404);
    // ... and, when on, lists the users of one org only and signs tokens the API accepts.
    let mut args = env.serve_args();
    args.demo_signin = true;
    let demo = env.serve_with(args.clone()).await;
    let listed: Vec<Value> = reqwest::get(format!("{demo}/api/demo/users")).await.unwrap().json().await.unwrap();
    assert!(!listed.is_empty());
    assert!(listed.iter().all(|u| u["orgId"] == listed[0]["orgId"]), "one org only: {listed:?}");
    // A user id MongoDB holds is not checked: a non-ASCII one (its last 6 bytes start inside a
    // character) is labelled, not a panic.
    db.collection::<bson::Document>("users")
        .insert_one(bson::doc! {"_id": "ünïcödé-ïd-üx", "orgId": org, "teamIds": [], "version": 1})
        .await
        .unwrap();
    let users: Vec<Value> = reqwest::get(format!("{demo}/api/demo/users?orgId={org}")).await.unwrap().json().await.unwrap();
    assert!(users.iter().all(|u| u["orgId"] == json!(org)), "{users:?}");
    assert!(users.iter().any(|u| u["label"].as_str().unwrap().ends_with("user …-ïd-üx")), "{users:?}");
    let pick = users.iter().find(|u| u["userId"] == json!(snap.users[0].id)).expect("a user of the seeded org");
    let r = reqwest::Client::new().post(format!("{demo}/api/demo/token")).json(pick).send().await.unwrap();
    let demo_token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let (status, answer) = post_board(&demo, Some(&demo_token), "{}").await;
    assert_eq!(status, 200, "{answer}");
    // A demo token is refused by a serve whose demo sign-in is off (the same JWT_SECRET).
    let (status, answer) = post_board(&url, Some(&demo_token), "{}").await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer.to_string().contains("demo"), "{answer}");
    let bad =
        reqwest::Client::new().post(format!("{demo}/api/demo/token")).json(&json!({"orgId": "x", "userId": "y"})).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    // No token for a user of another org, nor for a user that does not exist.
    let stranger = json!({"orgId": org, "userId": other_snap.users[0].id});
    let r = reqwest::Client::new().post(format!("{demo}/api/demo/token")).json(&stranger).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // The demo sign-in is refused on a non-loopback address unless asked for by name.
    args.listen_addr = "0.0.0.0:0".into();
    let refused = board_api::http::Application::build(&args).await.err().expect("refused on 0.0.0.0");
    assert!(refused.to_string().contains("--demo-signin-anywhere"), "{refused}");
    args.demo_signin_anywhere = true;
    assert!(board_api::http::Application::build(&args).await.is_ok());
    projector.stop().await.unwrap();
}
