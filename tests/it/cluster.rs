//! Past one machine (issue: Redis Cluster with replicas and failover, several projectors and API
//! instances). Real clusters of 3 primaries + 3 replicas (deploy/redis-cluster.sh): the stack's
//! on 7000-7005 for tests that only use it, a cluster of the test's own for tests that kill a
//! node or move a slot.
use crate::common::{cluster_url, eventually, post_board, primary_of, signal, small_seed, token, TestEnv};
use board_api::query::mongo_path::MongoReader;
use board_api::query::request::ContactsRequest;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Boards asked in these tests: every stage's first page, filters, a search, the other kind.
const BOARDS: &[&str] = &[
    r#"{"size": 10}"#,
    r#"{"size": 5, "messageStatus": "answered"}"#,
    r#"{"size": 10, "search": "a"}"#,
    r#"{"size": 10, "ownerFilter": "unassigned"}"#,
    r#"{"size": 10, "pipelineType": "Application"}"#,
];

fn without_meta(mut v: Value) -> Value {
    v.as_object_mut().map(|o| o.remove("meta"));
    v
}

/// The MongoDB path's answer to `body` for the org's first user, as the API would send it.
async fn mongodb_answer(db: &mongodb::Database, org: &str, user: &str, body: &str) -> (u16, Value) {
    let query = ContactsRequest::parse(body.as_bytes()).unwrap().into_query().expect("valid request");
    let reader = MongoReader::new(db.clone(), board_api::query::mongo_path::DEFAULT_MAX_IDS);
    match reader.answer(org, user, &query, chrono::Utc::now().timestamp_millis()).await {
        Ok(a) => (200, crate::common::answer_data(&a)),
        Err(e) => (404, Value::String(e.to_string())),
    }
}

/// Every board of every org from `api` equals MongoDB's answer, answered by the projection.
async fn assert_api_equals_mongodb(api: &str, db: &mongodb::Database, orgs: &[String]) -> usize {
    let mut compared = 0;
    for org in orgs {
        let snap = board_mongo::load_org(db, org).await.unwrap();
        let user = &snap.users[0].id;
        for body in BOARDS {
            let (status, got) = post_board(api, Some(&token(org, user)), body).await;
            let (want_status, want) = mongodb_answer(db, org, user, body).await;
            assert_eq!(status, want_status, "{api} org {org} {body}: {got}");
            if status == 200 {
                assert_eq!(got["meta"]["answeredBy"], "projection", "{api} org {org} {body}: {}", got["meta"]);
                assert_eq!(without_meta(got), want, "{api} org {org} {body}");
                compared += 1;
            }
        }
    }
    compared
}

/// `pipeline-board serve` as a child process on the cluster; returns it and its base URL.
fn serve_process(env: &TestEnv, extra_env: &[(&str, &str)]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut cmd = env.cli(&["serve"]);
    cmd.env("LISTEN_ADDR", "127.0.0.1:0").env("JWT_SECRET", crate::common::JWT_SECRET).stdout(std::process::Stdio::piped());
    if std::env::var("TEST_LOG").is_err() {
        cmd.stderr(std::process::Stdio::null());
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect("first line names the address").to_string();
    (child, format!("http://{addr}"))
}

/// SIGKILLs the processes it names when dropped (a test that fails midway included).
struct Reaper(Vec<u32>);
impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
}

/// A cross-slot pipeline is refused by the cluster client: the check every cluster test relies
/// on to catch an operation that is not single-slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_slot_pipeline_is_refused_so_the_cluster_tests_would_catch_one() {
    let mut conn = board_redis::config::redis_connection(&cluster_url()).await.unwrap();
    assert!(conn.is_cluster());
    let keys = board_model::keys::KeySpace::new(format!("t:crossslot-{}", std::process::id()));
    let (a, b) = (keys.generation_pointer("64f0a1b2c3d4e5f6a7b8c9d1"), keys.generation_pointer("64f0a1b2c3d4e5f6a7b8c9d4"));
    let mut node = redis::Client::open("redis://127.0.0.1:7000").unwrap().get_connection().unwrap();
    assert_ne!(primary_of(&mut node, &a).1, primary_of(&mut node, &b).1, "two slots");
    let err = redis::pipe().get(&a).get(&b).query_async::<Vec<Option<String>>>(&mut conn).await.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("cross"), "{err}");
    // The same reads split by slot go through.
    let both: Vec<Option<String>> = conn
        .query_by_slot(vec![(a.clone(), redis::cmd("GET").arg(&a).clone()), (b.clone(), redis::cmd("GET").arg(&b).clone())])
        .await
        .unwrap();
    assert_eq!(both, vec![None, None]);
}

/// A primary SIGKILLed while the projector ingests; its replica is promoted. Every batch was
/// acknowledged by a replica before its offsets were recorded (WAIT), so the promoted replica
/// holds everything the projection recorded as applied: it resumes, catches up, and the
/// projection equals MongoDB — nothing lost, nothing counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_ingest_loses_nothing_the_projection_acknowledged() {
    let (env, cluster) = crate::common::env_with_own_cluster("failover").await;
    let seeded = env.seed(small_seed(3, 1200, 41)).await;
    let mut node = cluster.node(cluster.base);
    // The shard of the first org's data (and, maybe, the projection's own state).
    let (victim, _) = primary_of(&mut node, &env.keys.generation_pointer(&seeded.org_ids[0]));
    let mut settings = env.settings();
    settings.max_batch = 50;
    let projector = env.spawn_projector_with(settings);
    let total: i64 = seeded.events as i64;
    eventually(Duration::from_secs(120), "a quarter applied", || async { env.applied_offsets().await >= total / 4 }).await;
    let before = env.applied_offsets().await;
    assert!(before < total, "still ingesting when the primary dies ({before} of {total})");
    let killed = Instant::now();
    cluster.kill(victim);
    // The replica is promoted (2 s node timeout) and the projector resumes on it.
    let survivor = cluster.ports().find(|p| *p != victim).unwrap();
    let mut node = cluster.node(survivor);
    let (promoted, _) = {
        let mut owner = (victim, 0);
        while owner.0 == victim {
            assert!(killed.elapsed() < Duration::from_secs(60), "no replica promoted within 60 s");
            tokio::task::yield_now().await;
            owner = crate::common::serving_primary(&mut node, &env.keys.generation_pointer(&seeded.org_ids[0])).unwrap_or(owner);
        }
        owner
    };
    let promoted_after = killed.elapsed();
    let resumed_at = env.applied_offsets().await;
    eventually(Duration::from_secs(120), "the projector applies again", || async { env.applied_offsets().await > resumed_at }).await;
    let applying_after = killed.elapsed();
    env.wait_caught_up(Duration::from_secs(180)).await;
    let caught_up_after = killed.elapsed();
    projector.stop().await.unwrap();
    eprintln!(
        "primary {victim} killed at {before}/{total} applied offsets: replica {promoted} promoted after {:.2} s, \
         projection applying again after {:.2} s, caught up after {:.2} s",
        promoted_after.as_secs_f64(),
        applying_after.as_secs_f64(),
        caught_up_after.as_secs_f64()
    );
    let report = env.verify(&seeded.org_ids).await;
    assert!(report.is_clean(), "after the failover: {:#?}", report.samples);
    assert_eq!(report.cards as u64, seeded.contacts + seeded.applications, "every card projected once");

    // The killed node comes back (empty) as a replica of the promoted one; the API answers
    // every board like MongoDB.
    cluster.restart(victim);
    let api = env.serve_with(env.serve_args()).await;
    let compared = assert_api_equals_mongodb(&api, &env.mongo().await, &seeded.org_ids).await;
    assert!(compared > 0);
}

/// An org's slot moved to another primary (MIGRATE twenty keys at a time, then SETSLOT NODE) while a
/// client asks the org's boards in a loop: every answer is a 200 equal to the answer before
/// the move (a read that meets a half-moved slot follows ASK / retries TRYAGAIN, or falls back
/// to MongoDB), and afterwards the projection answers from the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_slot_migrated_while_boards_are_served_gives_no_failed_answer() {
    let (env, cluster) = crate::common::env_with_own_cluster("reshard").await;
    let seeded = env.seed_and_project(small_seed(2, 400, 43)).await;
    let org = seeded.org_ids[0].clone();
    let db = env.mongo().await;
    let user = board_mongo::load_org(&db, &org).await.unwrap().users[0].id.clone();
    let api = env.serve_with(env.serve_args()).await;
    let bearer = token(&org, &user);
    let mut before = Vec::new();
    for body in BOARDS {
        let (status, v) = post_board(&api, Some(&bearer), body).await;
        assert_eq!(status, 200);
        assert_eq!(v["meta"]["answeredBy"], "projection");
        before.push(without_meta(v));
    }

    // A client asking the boards in a loop until the move is done.
    let (asked, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let client = {
        let (api, bearer, before, asked, done) = (api.clone(), bearer.clone(), before.clone(), asked.clone(), done.clone());
        tokio::spawn(async move {
            let mut by: std::collections::BTreeMap<String, usize> = Default::default();
            while !done.load(Ordering::Relaxed) {
                for (body, want) in BOARDS.iter().zip(&before) {
                    let (status, v) = post_board(&api, Some(&bearer), body).await;
                    assert_eq!(status, 200, "during the move {body}: {v}");
                    *by.entry(v["meta"]["answeredBy"].as_str().unwrap_or_default().to_string()).or_default() += 1;
                    assert_eq!(&without_meta(v), want, "during the move {body}");
                    asked.fetch_add(1, Ordering::Relaxed);
                }
            }
            by
        })
    };

    let mut any = cluster.node(cluster.base);
    let (source, slot) = primary_of(&mut any, &env.keys.generation_pointer(&org));
    let target = cluster
        .ports()
        .find(|p| {
            let mut n = cluster.node(*p);
            let r: Vec<redis::Value> = redis::cmd("ROLE").query(&mut n).unwrap();
            *p != source && matches!(&r[0], redis::Value::BulkString(b) if b == b"master")
        })
        .expect("another primary");
    let id = |port: u16| -> String { redis::cmd("CLUSTER").arg("MYID").query(&mut cluster.node(port)).unwrap() };
    let (source_id, target_id) = (id(source), id(target));
    let (mut src, mut dst) = (cluster.node(source), cluster.node(target));
    let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("IMPORTING").arg(&source_id).query(&mut dst).unwrap();
    let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("MIGRATING").arg(&target_id).query(&mut src).unwrap();
    let mut moved = 0;
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(20).query(&mut src).unwrap();
        if keys.is_empty() {
            break;
        }
        // Twenty keys at a time, each step after the client has asked a board: boards meet the
        // slot half moved.
        let seen = asked.load(Ordering::Relaxed);
        eventually(Duration::from_secs(30), "the client asks a board", || async { asked.load(Ordering::Relaxed) > seen }).await;
        let _: redis::Value =
            redis::cmd("MIGRATE").arg("127.0.0.1").arg(target).arg("").arg(0).arg(5000).arg("KEYS").arg(&keys).query(&mut src).unwrap();
        moved += keys.len();
    }
    for port in cluster.ports() {
        let mut n = cluster.node(port);
        let r: Vec<redis::Value> = redis::cmd("ROLE").query(&mut n).unwrap();
        if matches!(&r[0], redis::Value::BulkString(b) if b == b"master") {
            let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("NODE").arg(&target_id).query(&mut n).unwrap();
        }
    }
    let seen = asked.load(Ordering::Relaxed);
    eventually(Duration::from_secs(30), "boards asked after the move", || async { asked.load(Ordering::Relaxed) > seen + BOARDS.len() })
        .await;
    done.store(true, Ordering::Relaxed);
    let by = client.await.expect("no failed or different answer during the move");
    assert_eq!(primary_of(&mut any, &env.keys.generation_pointer(&org)).0, target, "the slot moved");
    assert!(moved > 100, "the org's keys moved in many steps ({moved})");
    eprintln!(
        "slot {slot} of org {org} moved {source} -> {target} ({moved} keys) while {} boards were asked: {by:?}",
        asked.load(Ordering::Relaxed)
    );
    // After the move the projection answers from the new primary.
    for (body, want) in BOARDS.iter().zip(&before) {
        let (status, v) = post_board(&api, Some(&bearer), body).await;
        assert_eq!((status, &v["meta"]["answeredBy"]), (200, &Value::from("projection")));
        assert_eq!(&without_meta(v), want);
    }
    let report = env.verify(&seeded.org_ids).await;
    assert!(report.is_clean(), "{:#?}", report.samples);
}

/// Two `project` and two `serve` processes on the cluster; one of each SIGKILLed mid-ingest and
/// started again while more events arrive: both APIs answer every board like MongoDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projectors_and_two_apis_one_of_each_killed_and_restarted() {
    let env = TestEnv::on_cluster("instances").await;
    let first = env.seed(small_seed(3, 500, 45)).await;
    let slow = ["--max-batch", "20", "--linger-ms", "0"];
    let mut projector_a = env.projector_process(&slow, &[]);
    let mut projector_b = env.projector_process(&slow, &[]);
    let (mut api_a, url_a) = serve_process(&env, &[]);
    let (mut api_b, url_b) = serve_process(&env, &[]);
    // A failing assertion must not leave them writing to the shared cluster.
    let mut reaper = Reaper(vec![projector_a.id(), projector_b.id(), api_a.id(), api_b.id()]);
    eventually(Duration::from_secs(60), "both projectors applied something", || async { env.applied_offsets().await > 100 }).await;
    signal(&projector_a, Signal::SIGKILL);
    signal(&api_a, Signal::SIGKILL);
    let _ = (projector_a.wait(), api_a.wait());
    // More events while one of each is gone; the other API keeps answering.
    let second = env.seed(small_seed(2, 200, 46)).await;
    let db = env.mongo().await;
    let user = board_mongo::load_org(&db, &first.org_ids[0]).await.unwrap().users[0].id.clone();
    // While the projection is not whole yet its boards come from MongoDB, whose speed on a
    // loaded machine is no part of this test: a whole answer or the documented 503 `timeout`.
    let (status, body) = post_board(&url_b, Some(&token(&first.org_ids[0], &user)), r#"{"size": 1}"#).await;
    assert!(
        status == 200 || (status == 503 && body["error"]["code"] == "timeout"),
        "the surviving API answers (a board, or the documented timeout of the MongoDB path): {status} {body}"
    );
    projector_a = env.projector_process(&slow, &[]);
    let (api_a2, url_a2) = serve_process(&env, &[]);
    api_a = api_a2;
    reaper.0.extend([projector_a.id(), api_a.id()]);
    env.wait_caught_up(Duration::from_secs(180)).await;
    let orgs: Vec<String> = first.org_ids.iter().chain(&second.org_ids).cloned().collect();
    let report = env.verify(&orgs).await;
    assert!(report.is_clean(), "{:#?}", report.samples);
    assert_eq!(report.cards as u64, first.contacts + first.applications + second.contacts + second.applications);
    let compared = assert_api_equals_mongodb(&url_a2, &db, &orgs).await + assert_api_equals_mongodb(&url_b, &db, &orgs).await;
    assert!(compared >= orgs.len() * 2);
    let _ = url_a;
    for child in [&mut projector_a, &mut projector_b] {
        signal(child, Signal::SIGTERM);
        assert!(child.wait().unwrap().success(), "SIGTERM exits 0");
    }
    for child in [&mut api_a, &mut api_b] {
        signal(child, Signal::SIGTERM);
        let _ = child.wait();
    }
    reaper.0.clear();
}

/// `REDIS_READ_FROM=replica`: boards are read from the replicas (their read counters move, the
/// primaries' do not), answer like the primary, and say how stale the replicas were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_reads_answer_like_mongodb_and_report_their_staleness() {
    // A cluster of its own: the primaries' read counters must move only with this test's reads.
    let (env, cluster) = crate::common::env_with_own_cluster("replica-reads").await;
    let seeded = env.seed_and_project(small_seed(2, 300, 47)).await;
    let mut args = env.serve_args();
    args.redis_read_from = board_api::http::ReadFrom::Replica;
    args.lag_interval_ms = 200;
    let api = env.serve_with(args).await;
    let org = &seeded.org_ids[0];
    let db = env.mongo().await;
    let user = board_mongo::load_org(&db, org).await.unwrap().users[0].id.clone();
    let bearer = token(org, &user);
    eventually(Duration::from_secs(30), "staleness measured", || async {
        post_board(&api, Some(&bearer), r#"{"size": 1}"#).await.1["meta"]["replicaStalenessMs"].is_i64()
    })
    .await;
    // Which node serves the org's slot as primary, which as replica: count their reads.
    let mut node = cluster.node(cluster.base);
    let (primary, slot) = primary_of(&mut node, &env.keys.generation_pointer(org));
    let shards: redis::Value = redis::cmd("CLUSTER").arg("SHARDS").query(&mut node).unwrap();
    let nodes = board_redis::redis_conn::cluster_nodes(&shards).unwrap();
    let replica = nodes.iter().find(|n| !n.primary && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))).expect("a replica").port;
    let reads = |port: u16| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().unwrap())
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_zrange:") || l.starts_with("cmdstat_fcall_ro:") || l.starts_with("cmdstat_hmget:"))
            .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
            .sum()
    };
    let (primary_before, replica_before) = (reads(primary), reads(replica));
    let compared = assert_api_equals_mongodb(&api, &db, &seeded.org_ids[..1]).await;
    let (primary_after, replica_after) = (reads(primary), reads(replica));
    assert!(replica_after >= replica_before + compared as u64, "boards read from the replica ({replica_before} -> {replica_after})");
    assert!(
        primary_after - primary_before < (replica_after - replica_before) / 4,
        "not from the primary ({primary_before} -> {primary_after})"
    );
    let (_, body) = post_board(&api, Some(&bearer), r#"{"size": 1}"#).await;
    let staleness = body["meta"]["replicaStalenessMs"].as_i64().unwrap();
    assert!((0..1_000).contains(&staleness), "an idle loopback replica is behind by well under a second: {staleness} ms");
    let metrics = reqwest::get(format!("{api}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("pb_replica_staleness_seconds{shard="), "staleness per shard exported");

    // A second replica for the org's shard (1 primary + 2 replicas): every read of one org goes
    // to one of them, so one answer's token, index position and cards are of one node's moment.
    let port = loop {
        let p = crate::common::free_port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            break p;
        }
    };
    cluster.restart(port); // starts a node of the cluster's directory on that port: empty, alone
    let mut newcomer = cluster.node(port);
    let _: () = redis::cmd("CLUSTER").arg("MEET").arg("127.0.0.1").arg(cluster.base).query(&mut newcomer).unwrap();
    let primary_id: String = redis::cmd("CLUSTER").arg("MYID").query(&mut cluster.node(primary)).unwrap();
    eventually(Duration::from_secs(30), "the new node replicates the org's primary", || {
        let ok = redis::cmd("CLUSTER").arg("REPLICATE").arg(&primary_id).query::<()>(&mut cluster.node(port)).is_ok();
        async move { ok }
    })
    .await;
    eventually(Duration::from_secs(30), "the shard has two linked replicas, as every node sees it", || {
        let shards: redis::Value = redis::cmd("CLUSTER").arg("SHARDS").query(&mut cluster.node(cluster.base)).unwrap();
        let nodes = board_redis::redis_conn::cluster_nodes(&shards).unwrap();
        let replicas = nodes.iter().filter(|n| !n.primary && n.healthy && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))).count();
        let info: String = redis::cmd("INFO").arg("replication").query(&mut cluster.node(port)).unwrap();
        async move { replicas == 2 && info.contains("master_link_status:up") }
    })
    .await;
    let mut args = env.serve_args();
    args.redis_read_from = board_api::http::ReadFrom::Replica;
    let api = env.serve_with(args).await;
    // Commands only this org's boards send: the change token's XREVRANGE, the index's HSCAN.
    let board_reads = |port: u16| -> u64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut cluster.node(port)).unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_xrevrange:") || l.starts_with("cmdstat_hscan:"))
            .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = [board_reads(replica), board_reads(port)];
    assert_api_equals_mongodb(&api, &db, &seeded.org_ids[..1]).await;
    for body in [r#"{"size": 3}"#, r#"{"search": "a", "size": 3}"#] {
        for _ in 0..10 {
            assert_eq!(post_board(&api, Some(&bearer), body).await.0, 200);
        }
    }
    let read = [board_reads(replica) - before[0], board_reads(port) - before[1]];
    assert!(read.iter().filter(|n| **n > 0).count() == 1 && read.iter().sum::<u64>() >= 20, "one replica serves the org: {read:?}");

    // One replica at a time is held back (`CLIENT PAUSE WRITE` on it: it answers reads but
    // applies no replication) while contacts of the board are renamed and clients poll boards
    // with ETags. An answer whose change token came from the current replica and whose cards came
    // from the held-back one would be named fresh and kept stale through 304s: once quiet, every
    // client's last board must equal MongoDB's answer.
    let projector = env.spawn_projector();
    let snap = board_mongo::load_org(&db, org).await.unwrap();
    let bodies = [r#"{"size": 100}"#, r#"{"search": "e", "size": 50}"#, r#"{"size": 7}"#];
    let pollers = crate::common::BoardPollers::start(&api, &bearer, &bodies);
    let contacts = db.collection::<bson::Document>("contacts");
    for (round, held) in [replica, port, replica, port].into_iter().enumerate() {
        let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(120_000).arg("WRITE").query(&mut cluster.node(held)).unwrap();
        for c in snap.contacts.iter().take(20) {
            let mut c = c.clone();
            c.first_name = Some(format!("Held{round}e{}", &c.id[18..]));
            c.version = Some(c.version.unwrap_or_default() + 1 + round as i64);
            let set = bson::doc! {"$set": {"firstName": c.first_name.as_deref().unwrap(), "version": c.version.unwrap()}};
            contacts.update_one(bson::doc! {"_id": &c.id}, set).await.unwrap();
            let event = serde_json::json!({"type": "contact.upserted", "eventId": format!("held-{round}-{}", c.id), "orgId": org,
                "occurredAt": "2026-12-01T00:00:00.000Z", "contact": c});
            env.produce(&env.topics.topic_contacts, &c.id, &serde_json::to_vec(&event).unwrap()).await;
        }
        env.wait_caught_up(Duration::from_secs(60)).await;
        let seen = pollers.polls();
        eventually(Duration::from_secs(60), "boards are polled while the replica is held back", || {
            let polls = pollers.polls();
            async move { polls >= seen + 30 }
        })
        .await;
        let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query(&mut cluster.node(held)).unwrap();
    }
    eventually(Duration::from_secs(30), "both replicas caught up with their primary", || {
        let offset = |port: u16, field: &str| -> Option<i64> {
            let info: String = redis::cmd("INFO").arg("replication").query(&mut cluster.node(port)).ok()?;
            info.lines().find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
        };
        let primary_at = offset(primary, "master_repl_offset:");
        let done = primary_at.is_some() && [replica, port].iter().all(|r| offset(*r, "slave_repl_offset:") == primary_at);
        async move { done }
    })
    .await;
    for last in pollers.last_boards().await {
        assert!(last.polls > 3, "the client polled while replicas were held back");
        let want = crate::common::mongodb_answer(&db, org, &user, last.body).await;
        assert!(last.data == want, "{}: the client's last board (status {}) differs from MongoDB's answer", last.body, last.status);
    }
    projector.stop().await.unwrap();
}

/// `rebuild` and `verify` as commands on the cluster: a rebuild replays into a new generation
/// on every shard, switches every org, removes the old generation's keys from every primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_and_verify_run_on_the_cluster() {
    let env = TestEnv::on_cluster("rebuild-cluster").await;
    let seeded = env.seed_and_project(small_seed(4, 150, 49)).await;
    let mut conn = env.redis().await;
    let base_keys = conn.scan_match(&format!("{}:{{*", env.keys.prefix())).await.unwrap();
    assert!(!base_keys.is_empty());
    let out = env.cli(&["rebuild", "--grace-ms", "0"]).output().unwrap();
    assert!(out.status.success(), "rebuild: {}", String::from_utf8_lossy(&out.stderr));
    for org in &seeded.org_ids {
        let generation: Option<String> = redis::cmd("GET").arg(env.keys.generation_pointer(org)).query_async(&mut conn).await.unwrap();
        assert!(generation.is_some_and(|g| g.starts_with('g')), "org {org} switched");
    }
    // Only the pointers are left of the base generation (and the projection's own `{meta}`
    // keys and the per-node write marks, which belong to no generation), on whichever shard
    // they live.
    let is_write_mark =
        |k: &str| k.strip_suffix("}:mark").and_then(|k| k.rsplit_once(":{")).is_some_and(|(_, tag)| tag.starts_with("mark-"));
    let left: Vec<String> = conn
        .scan_match(&format!("{}:{{*", env.keys.prefix()))
        .await
        .unwrap()
        .into_iter()
        .filter(|k| !k.ends_with(":generation") && !k.contains(":{meta}:") && !is_write_mark(k))
        .collect();
    assert!(left.is_empty(), "old generation removed: {left:?}");
    let out = env.cli(&["verify"]).output().unwrap();
    assert!(out.status.success(), "verify on the cluster: {}", String::from_utf8_lossy(&out.stdout));
}

/// A primary SIGKILLed and started again at once, before its replica could be promoted: it
/// comes back empty (no persistence) holding its slots, and its replica resyncs to empty — its
/// orgs are gone while the projection's state, on another shard, still says whole. The projector
/// notices the restart (a new run id, nothing loaded), forgets the projection and builds it again
/// from the topics; `verify` then finds it whole and equal to MongoDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restarted_empty_is_noticed_and_the_projection_built_again() {
    let (env, cluster) = crate::common::env_with_own_cluster("shard-loss").await;
    // Orgs (random ids) until one lives on another shard than `{meta}`: its loss leaves the
    // projection's state in place.
    let mut node = cluster.node(cluster.base);
    let (meta_shard, _) = primary_of(&mut node, &env.keys.state());
    let mut orgs: Vec<String> = Vec::new();
    let (mut cards, mut round) = (0u64, 0u64);
    let org = loop {
        let seeded = env.seed(small_seed(3, 200, 51 + round)).await;
        cards += seeded.contacts + seeded.applications;
        orgs.extend(seeded.org_ids);
        if let Some(o) = orgs.iter().find(|o| primary_of(&mut node, &env.keys.generation_pointer(o)).0 != meta_shard) {
            break o.clone();
        }
        round += 1;
        assert!(round < 8, "an org off the {{meta}} shard");
    };
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let mut conn = env.redis().await;
    let instance = |mut c: board_redis::redis_conn::RedisConn, key: String| async move {
        redis::cmd("HMGET").arg(key).arg("instance").arg("status").query_async::<(Option<String>, Option<String>)>(&mut c).await.unwrap()
    };
    let (before, status) = instance(conn.clone(), env.keys.state()).await;
    assert_eq!(status.as_deref(), Some("whole"));
    let (victim, _) = primary_of(&mut node, &env.keys.generation_pointer(&org));
    let restarted = Instant::now();
    cluster.kill(victim);
    cluster.restart(victim);
    let pointer_keys: i64 = redis::cmd("DBSIZE").query(&mut cluster.node(victim)).unwrap();
    assert!(pointer_keys < 10, "the restarted primary is empty ({pointer_keys} keys)");
    eventually(Duration::from_secs(60), "the projection built again under a new instance", || {
        let (c, k, before) = (conn.clone(), env.keys.state(), before.clone());
        async move { instance(c, k).await.0.is_some_and(|i| Some(i) != before) }
    })
    .await;
    let noticed = restarted.elapsed();
    eventually(Duration::from_secs(120), "whole again", || {
        let (c, k) = (conn.clone(), env.keys.state());
        async move { instance(c, k).await.1.as_deref() == Some("whole") }
    })
    .await;
    eprintln!(
        "primary {victim} restarted empty: noticed and a new projection started after {:.2} s, whole after {:.2} s",
        noticed.as_secs_f64(),
        restarted.elapsed().as_secs_f64()
    );
    projector.stop().await.unwrap();
    let report = env.verify(&orgs).await;
    assert!(report.is_clean(), "{:#?}", report.samples);
    assert_eq!(report.cards as u64, cards);
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
}

/// The API starts while no node of its cluster answers (the cluster connection is made in the
/// background) and answers boards from MongoDB meanwhile, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_starts_and_answers_from_mongodb_while_the_cluster_is_unreachable() {
    let mut env = TestEnv::new("cluster-down").await;
    let seeded = env.seed(small_seed(1, 30, 53)).await;
    let reachable = std::mem::replace(
        &mut env.redis_url,
        format!("redis+cluster://127.0.0.1:{},127.0.0.1:{}", crate::common::free_port(), crate::common::free_port()),
    );
    let api = env.serve_with(env.serve_args()).await;
    let org = &seeded.org_ids[0];
    let user = board_mongo::load_org(&env.mongo().await, org).await.unwrap().users[0].id.clone();
    let (status, body) = post_board(&api, Some(&token(org, &user)), r#"{"size": 5}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["meta"]["answeredBy"], "mongodb");
    assert_eq!(body["meta"]["reason"], "projection_unavailable");
    env.redis_url = reachable;
}

/// A primary off the `{meta}` shard reloads an older snapshot (`SAVE`, orgs applied to it,
/// `DEBUG RELOAD NOSAVE`): its data went back while `{meta}`'s progress did not. The write mark on
/// that node went back with it: the projector lowers the progress to what the mark held and
/// replays forward; `verify` clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_reloaded_from_an_older_snapshot_is_noticed_and_replayed() {
    let (env, cluster) = crate::common::env_with_own_cluster("shard-rewind").await;
    let mut node = cluster.node(cluster.base);
    let (meta_shard, _) = primary_of(&mut node, &env.keys.state());
    let on_shard = |node: &mut redis::Connection, orgs: &[String], shard: Option<u16>| {
        orgs.iter()
            .find(|o| {
                let (p, _) = primary_of(node, &env.keys.generation_pointer(o));
                shard.map_or(p != meta_shard, |s| p == s)
            })
            .cloned()
    };
    let mut orgs: Vec<String> = Vec::new();
    let mut round = 0u64;
    let victim = loop {
        let seeded = env.seed(small_seed(2, 30, 181 + round)).await;
        orgs.extend(seeded.org_ids);
        if let Some(o) = on_shard(&mut node, &orgs, None) {
            break primary_of(&mut node, &env.keys.generation_pointer(&o)).0;
        }
        round += 1;
        assert!(round < 8, "an org off the {{meta}} shard");
    };
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    // The victim's mark carries the progress of now.
    let progress: std::collections::BTreeMap<String, i64> =
        redis::AsyncCommands::hgetall(&mut env.redis().await, env.keys.progress(&env.group)).await.unwrap();
    eventually(Duration::from_secs(10), "the victim's write mark carries the current progress", || {
        let mut victim_node = cluster.node(victim);
        let progress = progress.clone();
        async move {
            let marks: Vec<String> = redis::cmd("KEYS").arg("*:mark").query(&mut victim_node).unwrap();
            marks.iter().any(|m| {
                let held: Option<String> = redis::cmd("HGET").arg(m).arg("progress").query(&mut victim_node).unwrap();
                held.and_then(|h| serde_json::from_str::<std::collections::BTreeMap<String, i64>>(&h).ok()) == Some(progress.clone())
            })
        }
    })
    .await;
    let _: () = redis::cmd("SAVE").query(&mut cluster.node(victim)).unwrap();
    // Orgs until one more lands on the victim: its cards exist only after the snapshot.
    let mut round = 0u64;
    loop {
        let seeded = env.seed(small_seed(1, 20, 191 + round)).await;
        orgs.extend(seeded.org_ids.clone());
        if on_shard(&mut node, &seeded.org_ids, Some(victim)).is_some() {
            break;
        }
        round += 1;
        assert!(round < 12, "an org on the victim shard");
    }
    env.wait_caught_up(Duration::from_secs(120)).await;
    let before = board_redis::projection::instance(&mut env.redis().await, &env.keys).await.unwrap();
    let reloaded = Instant::now();
    let _: () = redis::cmd("DEBUG").arg("RELOAD").arg("NOSAVE").query(&mut cluster.node(victim)).unwrap();
    let drift = env.verify(&orgs).await;
    let seeded = env.seed(small_seed(1, 1, 199)).await;
    orgs.extend(seeded.org_ids);
    // The shard's progress lives in `{meta}`, which did not go back: "caught up" holds at once.
    // What is awaited is the projector noticing (a new instance replays) and then catching up.
    let keys = env.keys.clone();
    let redis_url = env.redis_url.clone();
    eventually(Duration::from_secs(60), "the rewind is noticed (a new projection instance)", || {
        let (keys, redis_url, before) = (keys.clone(), redis_url.clone(), before.clone());
        async move {
            let mut conn = board_redis::config::redis_connection(&redis_url).await.unwrap();
            board_redis::projection::instance(&mut conn, &keys).await.unwrap() != before
        }
    })
    .await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    eprintln!(
        "shard {victim} reloaded an older snapshot (drift right after: {} differences): whole and caught up again after {:.2} s",
        drift.drift_count,
        reloaded.elapsed().as_secs_f64()
    );
    let report = env.verify(&orgs).await;
    assert!(report.is_clean(), "{}", report.summary());
    projector.stop().await.unwrap();
}
