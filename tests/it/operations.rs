//! Trust under operations (issue 17), against the real Kafka, Redis and FerretDB: after any
//! fault the projection is either right or says it is not. A projector starts again on a healed
//! projection, readiness notices a projection nobody advances, and a Redis that went back to an
//! older snapshot is noticed and replayed forward.
use crate::common::{env_with_own_redis, eventually, small_seed, OwnRedis, TestEnv};
use redis::AsyncCommands;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

async fn readyz(url: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{url}/readyz")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A FLUSHALL healed by the running projector, then a second projector started on the healed
/// projection (a deploy, an OOM kill): it starts and keeps the projection moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_starts_on_a_projection_healed_after_a_flushall() {
    let (env, own, _dir) = env_with_own_redis("ops-heal-restart").await;
    let seeded = env.seed(small_seed(1, 40, 171)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    redis::cmd("FLUSHALL").query_async::<()>(&mut env.redis().await).await.unwrap();
    // Healed: a new instance, whole again.
    eventually(Duration::from_secs(120), "the projection is whole again after the flush", || async {
        let mut conn = env.redis().await;
        let instance: Option<String> = conn.hget(env.keys.state(), "instance").await.unwrap();
        let lag = env.lag().await;
        instance.is_some()
            && lag.total() == 0
            && board_redis::projection::status(&mut conn, &env.keys).await.unwrap() == board_redis::projection::Status::Whole
    })
    .await;
    projector.stop().await.unwrap();

    // New events, and a projector process started on the healed projection.
    let more = env.seed(small_seed(1, 10, 172)).await;
    let out = env.cli(&["project", "--exit-when-caught-up", "--metrics-addr", ""]).output().expect("project runs");
    assert!(out.status.success(), "a projector starts on a healed projection: {}", String::from_utf8_lossy(&out.stderr));
    let report = env.verify(&[seeded.org_ids[0].clone(), more.org_ids[0].clone()]).await;
    assert!(report.is_clean(), "{}", report.summary());
    own.stop();
}

/// With every projector stopped while the topics grow, readiness stops saying ready within
/// `READY_MAX_ENDS_AGE_MS`: nobody advances the projection nor says how far behind it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_when_nobody_advances_the_projection() {
    let env = TestEnv::new("ops-unattended").await;
    env.seed(small_seed(1, 30, 173)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let mut args = env.serve_args();
    args.ready_max_ends_age_ms = 3_000;
    let url = env.serve_with(args).await;
    eventually(Duration::from_secs(30), "ready while a projector runs", || async { readyz(&url).await.0 == 200 }).await;

    projector.stop().await.unwrap();
    let stopped = Instant::now();
    env.seed(small_seed(1, 20, 174)).await;
    eventually(Duration::from_secs(30), "readiness says the projection is unattended", || async {
        let (code, body) = readyz(&url).await;
        code == 503 && body["status"] == "projection_not_ready" && body["reason"] == "unattended"
    })
    .await;
    eprintln!("every projector stopped -> /readyz 503 unattended after {:?} (bound 3 s + one probe)", stopped.elapsed());

    // A projector again: applied, attended, ready.
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    eventually(Duration::from_secs(30), "ready again once a projector runs", || async {
        let (code, body) = readyz(&url).await;
        code == 200 && body["projectionLag"] == 0
    })
    .await;
    projector.stop().await.unwrap();
}

async fn progress_of(env: &TestEnv) -> BTreeMap<String, i64> {
    env.redis().await.hgetall(env.keys.progress(&env.group)).await.unwrap()
}

/// Sums of two progress maps compared: the reload took the progress back.
fn total(p: &BTreeMap<String, i64>) -> i64 {
    p.values().sum()
}

/// Awaits a write mark that carries the progress Redis holds now (marks are raised every second).
async fn mark_holds_the_progress(env: &TestEnv) {
    eventually(Duration::from_secs(10), "the write mark carries the current progress", || async {
        let held: Option<String> = env.redis().await.hget(env.keys.write_mark("meta"), "progress").await.unwrap();
        held.and_then(|h| serde_json::from_str::<BTreeMap<String, i64>>(&h).ok()) == Some(progress_of(env).await)
    })
    .await;
}

async fn debug_reload_nosave(own: &OwnRedis) {
    let mut c = redis::Client::open(own.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    redis::cmd("DEBUG").arg("RELOAD").arg("NOSAVE").query_async::<()>(&mut c).await.unwrap();
}

async fn save(own: &OwnRedis) {
    let mut c = redis::Client::open(own.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    redis::cmd("SAVE").query_async::<()>(&mut c).await.unwrap();
}

/// A projection of 30 contacts caught up and `SAVE`d, then 50 more applied after the snapshot:
/// what both rewind tests start from. Returns the running projector and the two seeds' orgs.
async fn saved_then_fifty_more(env: &TestEnv, own: &OwnRedis, seeds: (u64, u64)) -> (crate::common::RunningProjector, String, String) {
    let first = env.seed(small_seed(1, 30, seeds.0)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    mark_holds_the_progress(env).await;
    save(own).await;
    let fifty = env.seed(small_seed(1, 50, seeds.1)).await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    (projector, first.org_ids[0].clone(), fifty.org_ids[0].clone())
}

/// `SAVE`, 50 contacts applied, `DEBUG RELOAD NOSAVE` (Redis back at the snapshot, data and
/// progress), one more event: the running projector notices, replays from what Redis holds, and
/// the 50 are on the board again — `verify` clean. Then the same with the projector stopped over
/// the reload and started after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_reloaded_from_an_older_snapshot_is_noticed_and_replayed() {
    let (env, own, _dir) = env_with_own_redis("ops-rewind").await;
    let (projector, first, fifty) = saved_then_fifty_more(&env, &own, (175, 176)).await;
    let before = progress_of(&env).await;
    let pre = env.verify(&[first.clone(), fifty.clone()]).await;
    assert!(pre.is_clean(), "before the reload: {} {:#?}", pre.summary(), &pre.samples[..pre.samples.len().min(4)]);
    debug_reload_nosave(&own).await;
    let after = progress_of(&env).await;
    assert!(total(&after) < total(&before), "the reload took the progress back: {after:?} < {before:?}");
    let noticed = Instant::now();
    let one_more = env.seed(small_seed(1, 1, 177)).await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    eprintln!("reload to an older snapshot -> whole and caught up again after {:?}", noticed.elapsed());
    let orgs = [first, fifty, one_more.org_ids[0].clone()];
    let report = env.verify(&orgs).await;
    assert!(report.is_clean(), "the same projector process: {} {:#?}", report.summary(), &report.samples[..report.samples.len().min(8)]);
    let rewinds = env.redis().await.hget::<_, _, Option<String>>(env.keys.state(), "status").await.unwrap();
    assert_eq!(rewinds.as_deref(), Some("whole"));

    // The same with the projector stopped over the reload and a new one started after it.
    mark_holds_the_progress(&env).await;
    save(&own).await;
    let more = env.seed(small_seed(1, 50, 178)).await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    projector.stop().await.unwrap();
    debug_reload_nosave(&own).await;
    let projector = env.spawn_projector();
    let last = env.seed(small_seed(1, 1, 179)).await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    let mut all = orgs.to_vec();
    all.extend([more.org_ids[0].clone(), last.org_ids[0].clone()]);
    let report = env.verify(&all).await;
    assert!(report.is_clean(), "after a restart: {}", report.summary());
    projector.stop().await.unwrap();
    own.stop();
}

/// A Redis gone back to offsets that retention has since passed: replaying forward from what it
/// holds would skip the deleted events, so the projection must not turn whole again. It stays
/// `building`, says why (`incomplete`), and readiness answers 503; `rebuild --source mongodb`
/// then makes it whole and right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_past_the_topics_retention_is_reported_not_replayed_with_holes() {
    let (env, own, _dir) = env_with_own_redis("ops-rewind-trimmed").await;
    let (projector, first, later) = saved_then_fifty_more(&env, &own, (181, 182)).await;
    // Retention passes everything applied: the events after the snapshot are gone from Kafka.
    env.delete_records_below(|high| high).await;
    let url = env.serve_with(env.serve_args()).await;
    debug_reload_nosave(&own).await;
    env.seed(small_seed(1, 1, 183)).await;
    eventually(Duration::from_secs(60), "the rewound projection says it cannot be made whole from the topics", || async {
        let incomplete: Option<String> = env.redis().await.hget(env.keys.state(), "incomplete").await.unwrap();
        incomplete.is_some_and(|why| why.contains("no longer hold") && why.contains("--source mongodb"))
    })
    .await;
    // Every event the topics still hold is applied (`wait_caught_up` would also await `whole`).
    eventually(Duration::from_secs(120), "the projector applied what the topics hold", || async { env.lag().await.total() == 0 }).await;
    let status: Option<String> = env.redis().await.hget(env.keys.state(), "status").await.unwrap();
    assert_eq!(status.as_deref(), Some("building"), "never whole with the deleted events missing");
    eventually(Duration::from_secs(30), "readiness says the projection is not whole", || async {
        let (code, body) = readyz(&url).await;
        code == 503 && body["reason"] == "not_whole"
    })
    .await;

    let out = env.cli(&["rebuild", "--source", "mongodb", "--grace-ms", "0", "--metrics-addr", ""]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually(Duration::from_secs(60), "whole again after the snapshot rebuild", || async {
        let status: Option<String> = env.redis().await.hget(env.keys.state(), "status").await.unwrap();
        status.as_deref() == Some("whole")
    })
    .await;
    let report = env.verify(&[first, later]).await;
    assert!(report.is_clean(), "{}", report.summary());
    projector.stop().await.unwrap();
    own.stop();
}
