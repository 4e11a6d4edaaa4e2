//! The board page in a real browser (issue 10): Debian's headless Chromium driven by
//! playwright-core (tests/browser/board.spec.mjs) against the real stack — columns equal the
//! API's, scrolling loads exactly the next page, a filter and a search, the URL, an event produced
//! to Kafka appearing on the open board, 404, 503 and expired-token states. Screenshots go to
//! `$CARGO_TARGET_TMPDIR/browser-screenshots`.
use crate::common::{small_seed, token, TestEnv, JWT_SECRET};
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_page_in_chromium() {
    let root = env!("CARGO_MANIFEST_DIR");
    let spec = format!("{root}/tests/browser/board.spec.mjs");
    assert!(
        std::path::Path::new(&format!("{root}/tests/browser/node_modules/playwright-core")).exists(),
        "playwright-core is installed by deploy/install-deps.sh (npm ci in tests/browser)"
    );
    let env = TestEnv::new("browser").await;
    let seeded = env.seed(small_seed(1, 300, 111)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let url = env.serve_with(env.serve_args()).await;
    let mut nothing = env.serve_args();
    nothing.redis.redis_url = format!("redis://127.0.0.1:{}", crate::common::free_port());
    nothing.mongo.mongodb_uri = format!("mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=500", crate::common::free_port());
    let down_url = env.serve_with(nothing).await;
    let org = seeded.org_ids[0].clone();
    let snap = board_mongo::load_org(&env.mongo().await, &org).await.unwrap();
    let user = snap.users[0].id.clone();
    let shots = format!("{}/browser-screenshots", env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&shots).unwrap();

    let mut child = Command::new("node")
        .arg(&spec)
        .env("BOARD_URL", &url)
        .env("TOKEN", token(&org, &user))
        .env("EXPIRED_TOKEN", board_api::http::auth::sign_hs256(JWT_SECRET.as_bytes(), &user, &org, -3600))
        .env("SHOTS", &shots)
        .env("DOWN_URL", &down_url)
        .env("RENAMED", "Livetest Person")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node runs");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut result = None;
    while let Some(line) = rx.recv().await {
        eprintln!("browser: {line}");
        if let Some(id) = line.strip_prefix("READY_FOR_EVENT ") {
            let mut contact = snap.contacts.iter().find(|c| c.id == id).expect("the card shown is a contact of the org").clone();
            contact.full_name = Some("Livetest Person".into());
            contact.version = Some(contact.version.unwrap() + 1);
            let event = json!({"type": "contact.upserted", "eventId": "browser-live", "orgId": org,
                "occurredAt": "2026-12-01T00:00:00.000Z", "contact": contact});
            env.produce(&env.topics.topic_contacts, &contact.id, &serde_json::to_vec(&event).unwrap()).await;
            writeln!(stdin, "EVENT_SENT").unwrap();
        }
        if let Some(r) = line.strip_prefix("RESULT ") {
            result = Some(r.to_string());
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "the browser checks failed (screenshots in {shots})");
    let result = result.expect("the browser reported its result");
    eprintln!("browser timings: {result}; screenshots in {shots}");
    for shot in ["signin", "board", "filtered", "live", "error-404", "error-401", "error-503"] {
        assert!(std::path::Path::new(&format!("{shots}/{shot}.png")).exists(), "{shot}.png");
    }
    projector.stop().await.unwrap();
}
