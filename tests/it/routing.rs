//! Several API instances behind the org router (`deploy/org-router.sh`: HAProxy hashing the
//! `x-org-id` header): each org's boards reach one instance, so each org's index is loaded once
//! in the fleet, not once per instance; a header that names another org than the token is
//! refused, directly and through the router.
use crate::common::{small_seed, token, TempDir, TestEnv};
use std::time::Duration;

const TEAM_BOARD: &str = r#"{"size": 10, "ownerFilter": "team"}"#;

async fn board_via(client: &reqwest::Client, url: &str, bearer: &str, org_header: Option<&str>) -> (u16, serde_json::Value) {
    let mut req =
        client.post(format!("{url}/api/contacts")).bearer_auth(bearer).header("content-type", "application/json").body(TEAM_BOARD);
    if let Some(org) = org_header {
        req = req.header("x-org-id", org);
    }
    let r = req.send().await.expect("the router answers");
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orgs_boards_reach_one_instance_through_the_org_router() {
    let env = TestEnv::new("routing").await;
    let seeded = env.seed_and_project(small_seed(16, 40, 61)).await;
    let db = env.mongo().await;
    let mut apps = Vec::new();
    for _ in 0..2 {
        let app = board_api::http::Application::build(&env.serve_args()).await.unwrap();
        let (addr, projection) = (app.local_addr().to_string(), app.projection());
        tokio::spawn(app.run(std::future::pending()));
        apps.push((addr, projection));
    }
    let dir = TempDir::new("router");
    let port = crate::common::free_port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/org-router.sh");
    let up = std::process::Command::new("bash")
        .arg(&script)
        .args(["up", &dir.0.display().to_string(), &port.to_string(), &apps[0].0, &apps[1].0])
        .status()
        .unwrap();
    assert!(up.success(), "deploy/org-router.sh up");
    let _down = Down(script.clone(), dir.0.clone());
    let router = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();

    for org in &seeded.org_ids {
        let user = board_mongo::load_org(&db, org).await.unwrap().users[0].id.clone();
        let bearer = token(org, &user);
        for _ in 0..3 {
            let (status, body) = board_via(&client, &router, &bearer, Some(org)).await;
            assert_eq!((status, body["meta"]["route"].as_str()), (200, Some("index")), "{body}");
        }
        // Another org named in the header: refused, whoever the router sends it to.
        let other = seeded.org_ids.iter().find(|o| *o != org).unwrap();
        let (status, body) = board_via(&client, &router, &bearer, Some(other)).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("org_header_mismatch")), "{body}");
    }
    // Each org's index lives on exactly one instance, and both instances serve orgs.
    let held: Vec<usize> =
        apps.iter().map(|(_, projection)| seeded.org_ids.iter().filter(|o| projection.loaded_index(o).is_some()).count()).collect();
    for org in &seeded.org_ids {
        let on: Vec<&String> = apps.iter().filter(|(_, p)| p.loaded_index(org).is_some()).map(|(addr, _)| addr).collect();
        assert_eq!(on.len(), 1, "org {org}'s index is on {on:?}");
    }
    assert_eq!(held.iter().sum::<usize>(), seeded.org_ids.len());
    assert!(held.iter().all(|n| *n > 0), "both instances serve some of the 16 orgs: {held:?}");
}

/// Stops the router however the test ends.
struct Down(std::path::PathBuf, std::path::PathBuf);
impl Drop for Down {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash").arg(&self.0).arg("down").arg(&self.1).status();
    }
}
