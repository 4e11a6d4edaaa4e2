//! Bounded work per request: a request with every list at its documented limit makes Redis do
//! the same, page-sized work whatever the org's size (nothing walks the org on Redis' thread,
//! so a concurrent simple board is not delayed behind it), the filtering that must look at many
//! cards runs in the API's index under a deadline, and a concurrent simple board is answered as
//! it is alone. Redis work is counted with `INFO commandstats` on a Redis of the test's own.
mod common;

use common::{env_with_own_redis, post_board, small_seed, token};
use pipeline_board::query::request::{MAX_PAGES, MAX_SEARCH_CHARS, MAX_STAGES, MAX_USER_IDS};
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn oid(n: usize) -> String {
    format!("{:024x}", 0xabc000 + n)
}

/// Every list and string at its limit, every filter set (customFields aside: MongoDB's).
fn worst_case(stage_names: &[String]) -> String {
    let ids = |base: usize| (0..MAX_USER_IDS).map(|i| oid(base + i)).collect::<Vec<_>>();
    let mut stages: Vec<String> = stage_names.to_vec();
    stages.extend((stages.len()..MAX_STAGES).map(|i| format!("no such stage {i}")));
    let pages: serde_json::Map<String, Value> = stages.iter().take(MAX_PAGES).map(|s| (s.clone(), json!(3))).collect();
    json!({
        "size": 100,
        "owner": ids(0),
        "assignee": ids(100),
        "stages": stages,
        "page": pages,
        "search": "a".repeat(MAX_SEARCH_CHARS),
        "source": "web",
        "bulkOnly": true,
        "messageStatus": "answered",
        "createdDateRange": {"start": "2020-01-01T00:00:00Z", "end": "2030-01-01T00:00:00Z"},
        "lastMessageDateRange": {"start": "2020-01-01T00:00:00Z"},
        "lastMessageTimeRange": {"value": 1, "unit": "hours"},
    })
    .to_string()
}

/// command -> calls since the last CONFIG RESETSTAT
async fn command_calls(r: &mut pipeline_board::core::redis_conn::RedisConn) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(r).await.unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worst_case_request_costs_redis_the_same_on_a_small_and_a_large_org() {
    let (env, own, _dir) = env_with_own_redis("bounded").await;
    let small = env.seed_and_project(small_seed(1, 150, 5)).await.org_ids[0].clone();
    let large = env.seed_and_project(small_seed(1, 900, 6)).await.org_ids[0].clone();
    // The health probe's own pings and state reads would land among the counted commands:
    // it runs once, at start, here.
    let mut quiet = env.serve_args();
    quiet.health_interval_ms = 3_600_000;
    let url = env.serve_with(quiet).await;
    let db = env.mongo().await;
    let mut r = env.redis().await;
    let mut per_org = Vec::new();
    for org in [&small, &large] {
        let snap = pipeline_board::mongo::load_org(&db, org).await.unwrap();
        let user = snap.users[0].id.clone();
        let bearer = token(org, &user);
        let stages: Vec<String> = snap
            .pipelines
            .iter()
            .filter(|p| p.is_active == Some(true) && p.kind.as_deref() == Some("Contact"))
            .flat_map(|p| p.stages.clone().unwrap_or_default())
            .filter_map(|s| s.name)
            .collect();
        let body = worst_case(&stages);
        // The first index board loads the org's index (once per org and API process).
        let (status, warm) = post_board(&url, Some(&bearer), &body).await;
        assert_eq!(status, 200, "{warm}");
        assert_eq!(warm["meta"]["route"], "index", "{}", warm["meta"]);
        let simple = r#"{"size": 25}"#;
        let (_, alone) = post_board(&url, Some(&bearer), simple).await;

        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut r).await.unwrap();
        let (status, answer) = post_board(&url, Some(&bearer), &body).await;
        assert_eq!(status, 200, "{answer}");
        let calls = command_calls(&mut r).await;
        // The org's generation and the projection's state, reads of the pipelines, the index's
        // freshness check and the page's records: none of them grows with the org.
        for name in calls.keys() {
            assert!(
                ["get", "hgetall", "xinfo|stream", "hmget", "config|resetstat", "info", "ping"].contains(&name.as_str()),
                "a worst-case board ran {name} on Redis: {calls:?}"
            );
        }
        per_org.push(calls);

        // A simple board asked while worst-case boards run is answered as it is alone.
        let worst: Vec<_> = (0..4).map(|_| tokio::spawn(post_board_owned(url.clone(), bearer.clone(), body.clone()))).collect();
        let (status, during) = post_board(&url, Some(&bearer), simple).await;
        assert_eq!(status, 200);
        assert_eq!(during["data"], alone["data"], "the simple board changed under load");
        for w in worst {
            assert_eq!(w.await.unwrap().0, 200);
        }
    }
    assert_eq!(per_org[0], per_org[1], "the same Redis commands for a 150- and a 900-contact org");

    // The index's deadline bounds the rest: at zero every index board is a 503 `timeout`, and
    // the sorted-set boards still answer.
    let mut args = env.serve_args();
    args.index_deadline_ms = 0;
    let strict = env.serve_with(args).await;
    let snap = pipeline_board::mongo::load_org(&db, &large).await.unwrap();
    let bearer = token(&large, &snap.users[0].id);
    let (status, err) = post_board(&strict, Some(&bearer), &worst_case(&[])).await;
    assert_eq!((status, err["error"]["code"].as_str()), (503, Some("timeout")), "{err}");
    let (status, _) = post_board(&strict, Some(&bearer), r#"{"size": 25, "ownerFilter": "my"}"#).await;
    assert_eq!(status, 200);

    // An idle org's index is dropped and loaded again, with the same answer, on its next board.
    let reader =
        pipeline_board::query::projection::ProjectionReader::new(env.redis().await, env.keys.clone(), std::time::Duration::from_secs(10));
    let q = pipeline_board::query::request::ContactsRequest::parse(br#"{"ownerFilter": "team"}"#).unwrap().into_query().unwrap();
    let user = snap.users[0].id.clone();
    let (first, route) = reader.answer(&large, &user, &q, 0).await.unwrap();
    assert_eq!(route.name(), "index");
    assert_eq!(reader.evict_idle_indexes(std::time::Duration::ZERO), 1, "the org's index is dropped");
    assert_eq!(reader.evict_idle_indexes(std::time::Duration::ZERO), 0);
    let (again, _) = reader.answer(&large, &user, &q, 0).await.unwrap();
    assert_eq!(first, again, "reloaded, same answer");
    env.cleanup().await;
    own.stop();
}

async fn post_board_owned(url: String, bearer: String, body: String) -> (u16, Value) {
    post_board(&url, Some(&bearer), &body).await
}
