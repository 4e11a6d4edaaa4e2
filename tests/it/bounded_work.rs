//! Bounded work per request: a request with every list at its documented limit makes Redis do
//! the same, page-sized work whatever the org's size (nothing walks the org on Redis' thread,
//! so a concurrent simple board is not delayed behind it), the filtering that must look at many
//! cards runs in the API's index under a deadline, and a concurrent simple board is answered as
//! it is alone. Redis work is counted with `INFO commandstats` on a Redis of the test's own.
use crate::common::{env_with_own_redis, post_board, small_seed, token};
use board_api::query::request::{MAX_PAGES, MAX_SEARCH_CHARS, MAX_STAGES, MAX_USER_IDS};
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
async fn command_calls(r: &mut board_redis::redis_conn::RedisConn) -> BTreeMap<String, u64> {
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
        let snap = board_mongo::load_org(&db, org).await.unwrap();
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
        let (status, during) = post_board_owned(url.clone(), bearer.clone(), simple.to_string()).await;
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
    let snap = board_mongo::load_org(&db, &large).await.unwrap();
    let bearer = token(&large, &snap.users[0].id);
    let (status, err) = post_board(&strict, Some(&bearer), &worst_case(&[])).await;
    assert_eq!((status, err["error"]["code"].as_str()), (503, Some("timeout")), "{err}");
    let (status, _) = post_board(&strict, Some(&bearer), r#"{"size": 25, "ownerFilter": "my"}"#).await;
    assert_eq!(status, 200);

    // An idle org's index is dropped and loaded again, with the same answer, on its next board.
    let reader =
        board_api::query::projection::ProjectionReader::new(env.redis().await, env.keys.clone(), std::time::Duration::from_secs(10));
    let q = board_api::query::request::ContactsRequest::parse(br#"{"ownerFilter": "team"}"#).unwrap().into_query().unwrap();
    let user = snap.users[0].id.clone();
    let (first, route) = reader.answer(&large, &user, &q, 0).await.unwrap();
    assert_eq!(route.name(), "index");
    assert_eq!(reader.evict_idle_indexes(std::time::Duration::ZERO), 1, "the org's index is dropped");
    assert_eq!(reader.evict_idle_indexes(std::time::Duration::ZERO), 0);
    let (again, _) = reader.answer(&large, &user, &q, 0).await.unwrap();
    assert_eq!(first, again, "reloaded, same answer");
    own.stop();
}

/// A board computed for this request (`Cache-Control: no-cache`): concurrent identical boards
/// would otherwise share one computation, and these tests count computations.
async fn post_board_owned(url: String, bearer: String, body: String) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{url}/api/contacts"))
        .header("content-type", "application/json")
        .header("cache-control", "no-cache")
        .bearer_auth(bearer)
        .body(body)
        .send()
        .await
        .expect("request sent");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Index boards that wait for an index walk never hold the API's async workers. On a runtime of
/// one worker: a walk is held in flight (its read lock), a change is committed so the next index
/// boards must catch up (the index's write lock, which waits for the walk); while 8 such boards
/// wait, `/healthz` and a sorted-set board answer, and none of the 8 has; once the walk ends they
/// all answer, with the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn index_boards_waiting_for_a_walk_leave_health_and_sorted_set_boards_free() {
    use std::time::Duration;
    let env = crate::common::TestEnv::new("index-locks").await;
    let seeded = env.seed(small_seed(1, 120, 43)).await;
    let org = seeded.org_ids[0].clone();
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let app = board_api::http::Application::build(&env.serve_args()).await.unwrap();
    let (url, projection) = (format!("http://{}", app.local_addr()), app.projection());
    tokio::spawn(app.run(std::future::pending()));
    let snap = board_mongo::load_org(&env.mongo().await, &org).await.unwrap();
    let t = token(&org, &snap.users[0].id);
    let search = r#"{"search": "a", "size": 100}"#;
    let (status, first) = post_board(&url, Some(&t), search).await;
    assert_eq!((status, first["meta"]["route"].as_str()), (200, Some("index")), "{first}");
    let shown = first["data"].as_object().unwrap().values().find_map(|b| b["contacts"][0]["_id"].as_str()).unwrap().to_string();

    // A walk in flight: the index's read lock, held on a thread of its own until released.
    let slot = projection.loaded_index(&org).expect("the search board loaded the org's index");
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let walk = std::thread::spawn(move || {
        let index = slot.index();
        let _walking = index.read().unwrap();
        held_tx.send(()).unwrap();
        release_rx.recv().unwrap();
    });
    held_rx.recv().unwrap();

    // A change the next index boards must catch up on.
    let mut contact = snap.contacts.iter().find(|c| c.id == shown).unwrap().clone();
    contact.first_name = Some("Aaron-after-the-walk".into());
    contact.version = Some(contact.version.unwrap() + 1);
    let event = json!({"type": "contact.upserted", "eventId": "index-locks", "orgId": org,
        "occurredAt": "2026-12-01T00:00:00.000Z", "contact": contact});
    env.produce(&env.topics.topic_contacts, &contact.id, &serde_json::to_vec(&event).unwrap()).await;
    env.wait_caught_up(Duration::from_secs(60)).await;

    // The clients run on runtimes of their own and are awaited with std channels: the bounds
    // hold even if the server's one worker were blocked (then these would fail, not hang).
    let boards: Vec<_> = (0..8).map(|_| on_own_runtime(post_board_owned(url.clone(), t.clone(), search.into()))).collect();
    let bound = Duration::from_secs(30); // a bound, not a measurement
    let u = url.clone();
    let health = on_own_runtime(async move { reqwest::get(format!("{u}/healthz")).await.unwrap().status().as_u16() });
    assert_eq!(health.recv_timeout(bound).expect("/healthz answers while index boards wait"), 200);
    let (status, plain) = on_own_runtime(post_board_owned(url.clone(), t.clone(), "{}".into()))
        .recv_timeout(bound)
        .expect("a sorted-set board answers meanwhile");
    assert_eq!((status, plain["meta"]["route"].as_str()), (200, Some("sorted_sets")), "{plain}");
    assert!(boards.iter().all(|b| b.try_recv().is_err()), "the index boards wait for the walk");

    release_tx.send(()).unwrap();
    walk.join().unwrap();
    for b in boards {
        let (status, body) = b.recv_timeout(bound).expect("an index board answers once the walk ended");
        assert_eq!(status, 200, "{body}");
        assert!(body.to_string().contains("Aaron-after-the-walk"), "caught up with the change: {body}");
    }
    projector.stop().await.unwrap();
}

/// Runs `f` on a thread and runtime of its own; its output arrives on the channel.
fn on_own_runtime<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> std::sync::mpsc::Receiver<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _ = tx.send(rt.block_on(f));
    });
    rx
}

/// A byte budget; under a budget, every org walks on the background pool (`walk_pool`), so the
/// answers compared below also compare that path with the ordinary one.
fn limits(memory: usize) -> board_api::query::projection::IndexLimits {
    let background_cards = if memory == usize::MAX { usize::MAX } else { 0 };
    board_api::query::projection::IndexLimits { memory, background_cards, ..Default::default() }
}

/// The in-memory indexes stay under their byte budget (`INDEX_MEMORY_LIMIT`): boards of more
/// orgs than fit are answered, each as with no budget, while the least recently used orgs'
/// indexes are dropped; an org alone over the budget answers and is not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_indexes_stay_under_their_memory_budget() {
    use board_api::query::projection::ProjectionReader;
    use std::time::Duration;
    let env = crate::common::TestEnv::new("index-budget").await;
    let seeded = env.seed_and_project(small_seed(6, 300, 19)).await;
    let db = env.mongo().await;
    let q = board_api::query::request::ContactsRequest::parse(br#"{"ownerFilter": "team", "search": "an"}"#).unwrap().into_query().unwrap();
    let mut users = Vec::new();
    for org in &seeded.org_ids {
        users.push(board_mongo::load_org(&db, org).await.unwrap().users[0].id.clone());
    }

    // Without a budget to speak of: every org's answer and index size.
    let unbounded =
        ProjectionReader::new(env.redis().await, env.keys.clone(), Duration::from_secs(10)).with_index_limits(limits(usize::MAX));
    let (mut answers, mut sizes) = (Vec::new(), Vec::new());
    for (org, user) in seeded.org_ids.iter().zip(&users) {
        let before = unbounded.index_bytes();
        let (answer, route) = unbounded.answer(org, user, &q, 0).await.unwrap();
        assert_eq!(route.name(), "index");
        sizes.push(unbounded.index_bytes() - before);
        answers.push(answer);
    }
    let largest = *sizes.iter().max().unwrap();
    assert!(largest > 0, "an index accounts its bytes");

    // A budget for two and a half orgs: every answer the same, the bytes always under it.
    let budget = largest * 5 / 2;
    let bounded = ProjectionReader::new(env.redis().await, env.keys.clone(), Duration::from_secs(10)).with_index_limits(limits(budget));
    for round in 0..2 {
        for ((org, user), want) in seeded.org_ids.iter().zip(&users).zip(&answers) {
            let (answer, _) = bounded.answer(org, user, &q, 0).await.unwrap();
            assert_eq!(&answer, want, "round {round}, org {org}: another answer under the budget");
            let held = bounded.index_bytes();
            assert!(held <= budget, "round {round}, org {org}: {held} bytes held, budget {budget}");
        }
    }
    let kept = seeded.org_ids.iter().filter(|o| bounded.loaded_index(o).is_some()).count();
    assert!((1..=2).contains(&kept), "{kept} of 6 indexes kept under a budget for 2.5");
    let last = seeded.org_ids.last().unwrap();
    assert!(bounded.loaded_index(last).is_some(), "the most recently used org is kept");

    // An org over the budget on a warm cache evicts nobody else: with room for the smallest org
    // only, the smallest stays loaded while the largest is answered and not kept.
    let (small, large) = ((0..6).min_by_key(|i| sizes[*i]).unwrap(), (0..6).max_by_key(|i| sizes[*i]).unwrap());
    assert!(sizes[small] < sizes[large], "the seeded orgs differ in size: {sizes:?}");
    let between = ProjectionReader::new(env.redis().await, env.keys.clone(), Duration::from_secs(10))
        .with_index_limits(limits((sizes[small] + sizes[large]) / 2));
    for i in [small, large] {
        assert_eq!(between.answer(&seeded.org_ids[i], &users[i], &q, 0).await.unwrap().0, answers[i]);
    }
    assert!(between.loaded_index(&seeded.org_ids[small]).is_some(), "the org that fits was not evicted for one that cannot");
    assert!(between.loaded_index(&seeded.org_ids[large]).is_none());

    // An org alone over the budget is answered from the index it loaded, which is not kept.
    let tiny = ProjectionReader::new(env.redis().await, env.keys.clone(), Duration::from_secs(10)).with_index_limits(limits(1));
    let (answer, _) = tiny.answer(&seeded.org_ids[0], &users[0], &q, 0).await.unwrap();
    assert_eq!(answer, answers[0]);
    assert_eq!(tiny.index_bytes(), 0);
    assert!(tiny.loaded_index(&seeded.org_ids[0]).is_none());
}

/// One org's index walks run under its bound (`INDEX_WALKS_PER_ORG`), counted by the walks
/// themselves: 24 concurrent expensive boards (a one-letter search over 10,000 cards) of one org
/// run more than 2 walks at once without a bound to speak of, and at most 2 with a bound of 2;
/// all of them answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_orgs_index_walks_run_under_its_bound() {
    let env = crate::common::TestEnv::new("walk-bound").await;
    let seeded = env.seed_and_project(small_seed(1, 10_000, 23)).await;
    let org = seeded.org_ids[0].clone();
    let user = board_mongo::load_org(&env.mongo().await, &org).await.unwrap().users[0].id.clone();
    let t = token(&org, &user);
    let body = r#"{"search": "a", "size": 100}"#;
    let mut most = Vec::new();
    for bound in [64, 2] {
        let mut args = env.serve_args();
        args.index_walks_per_org = bound;
        let app = board_api::http::Application::build(&args).await.unwrap();
        let (url, projection) = (format!("http://{}", app.local_addr()), app.projection());
        tokio::spawn(app.run(std::future::pending()));
        let (status, first) = post_board(&url, Some(&t), body).await;
        assert_eq!((status, first["meta"]["route"].as_str()), (200, Some("index")), "{first}");
        // Several rounds: walks of a few milliseconds overlap only now and then.
        for _ in 0..3 {
            let boards: Vec<_> = (0..24).map(|_| tokio::spawn(post_board_owned(url.clone(), t.clone(), body.into()))).collect();
            for b in boards {
                let (status, answer) = b.await.unwrap();
                assert_eq!(status, 200, "{answer}");
                assert_eq!(answer["data"], first["data"]);
            }
        }
        let counts = projection.loaded_index(&org).unwrap().walks();
        assert_eq!((counts.running, counts.waiting), (0, 0), "every walk ended");
        most.push(counts.most_running);
    }
    eprintln!("most walks at once: {most:?} (bounds 64, 2)");
    assert!(most[0] > 2, "without a bound, more than 2 walks ran at once ({most:?}): the bound below is not vacuous");
    assert!(most[1] <= 2, "with a bound of 2, at most 2 walks ran at once ({most:?})");
}
