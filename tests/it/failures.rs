//! Failures that real servers make possible (issue: real servers under every test). Each test
//! ends with `verify` finding the projection identical to MongoDB: nothing lost, nothing counted
//! twice. Brokers and MongoDB-wire servers that a test stops are its own, so the tests running
//! beside it keep their stack.
use crate::common::{eventually, post_board, signal, small_seed, token, OwnFerretDb, OwnKafka, TestEnv};
use nix::sys::signal::Signal;
use rand::Rng;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A projector this slow (one round trip per 10 events) is still mid-ingest when the test acts.
const SLOW: &[&str] = &["--max-batch", "10", "--linger-ms", "0"];

/// Holds `projector` still (SIGSTOP) once it has applied something and asserts that it is then
/// mid-ingest: a fact the test can build on, not a race.
async fn stop_mid_ingest(env: &TestEnv, projector: &std::process::Child) {
    await_applied(env, 1, Duration::from_secs(60)).await;
    signal(projector, Signal::SIGSTOP);
    let lag = env.lag().await;
    assert!(lag.applied() > 0 && lag.total() > 0, "projector stopped mid-ingest: {lag:?}");
}

/// Awaits `applied_offsets() >= at_least`; returns what it was then.
async fn await_applied(env: &TestEnv, at_least: i64, within: Duration) -> i64 {
    let deadline = std::time::Instant::now() + within;
    loop {
        let applied = env.applied_offsets().await;
        if applied >= at_least {
            return applied;
        }
        assert!(std::time::Instant::now() < deadline, "projection never reached {at_least} applied offsets (at {applied})");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn assert_identical_to_mongodb(env: &TestEnv, orgs: &[String], cards: u64) {
    let report = env.verify(orgs).await;
    assert!(report.is_clean(), "drift: {:#?}", report.samples);
    assert_eq!(report.cards as u64, cards, "every card projected once");
}

/// The broker stops (cleanly) while the projector is mid-ingest and starts again on the same
/// data directory: the projector rides it out, resumes, and takes new events too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_stopped_mid_ingest_and_started_again() {
    let kafka = OwnKafka::start().await;
    let env = TestEnv::on_brokers("broker-restart", &kafka.brokers()).await;
    let first = env.seed(small_seed(1, 800, 31)).await;
    let mut projector = env.projector_process(SLOW, &[]);
    stop_mid_ingest(&env, &projector).await;
    kafka.stop().await;
    signal(&projector, Signal::SIGCONT);
    // With the broker gone the projector cannot finish: it must not exit either.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(projector.try_wait().unwrap().is_none(), "the projector keeps running while the broker is down");

    kafka.restart().await;
    // Topics, offsets and the group survived the restart; new events arrive too.
    let second = env.seed(small_seed(1, 200, 32)).await;
    env.wait_caught_up(Duration::from_secs(180)).await;
    signal(&projector, Signal::SIGTERM);
    assert!(projector.wait().unwrap().success(), "SIGTERM exits 0");

    let orgs: Vec<String> = first.org_ids.iter().chain(&second.org_ids).cloned().collect();
    assert_identical_to_mongodb(&env, &orgs, first.contacts + first.applications + second.contacts + second.applications).await;
}

/// SIGKILL at 20 random points of one long ingest, restarted each time (with static group
/// membership, as a Kubernetes pod would, so each restart takes the partitions over at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_killed_at_twenty_random_points_loses_nothing() {
    let env = TestEnv::new("sigkill20").await;
    let seeded = env.seed(small_seed(1, 1500, 11)).await;
    // The sum of the partitions' end offsets: what `applied_offsets` reaches when caught up.
    let end: i64 = env.lag().await.partitions.values().map(|(_, high)| high).sum();
    assert_eq!(end as u64, seeded.events);
    let mut points: Vec<i64> = (0..20).map(|_| rand::rng().random_range(end / 50..end * 19 / 20)).collect();
    points.sort();
    let instance = format!("group.instance.id={}", env.name);
    let options = [("KAFKA_OPTIONS", instance.as_str())];
    let mut kills_mid_ingest = 0;
    let mut reached = 0;
    for (i, point) in points.iter().enumerate() {
        let mut child = env.projector_process(SLOW, &options);
        // Past the point, and past where the last one was killed: every restart does some work.
        reached = await_applied(&env, (*point).max(reached + 1), Duration::from_secs(120)).await;
        signal(&child, Signal::SIGKILL);
        child.wait().unwrap();
        let applied = env.applied_offsets().await;
        assert!(applied < end, "kill {i} at {point} came after the end ({applied} of {end}): not mid-ingest");
        kills_mid_ingest += 1;
        eprintln!("kill {i}: at {reached} applied offsets (point {point} of {end})");
    }
    assert_eq!(kills_mid_ingest, 20);

    let mut child = env.projector_process(&[], &options);
    env.wait_caught_up(Duration::from_secs(180)).await;
    signal(&child, Signal::SIGTERM);
    assert!(child.wait().unwrap().success(), "SIGTERM exits 0");
    assert_identical_to_mongodb(&env, &seeded.org_ids, seeded.contacts + seeded.applications).await;
}

/// A second consumer joins while the first has batches in flight, then the first leaves while
/// the second has: two rebalances mid-ingest, nothing lost. The first is a process the test can
/// hold still (SIGSTOP), so "mid-ingest" is a fact at each step rather than a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_joining_and_leaving_mid_ingest() {
    let env = TestEnv::new("rebalance").await;
    let seeded = env.seed(small_seed(1, 4000, 41)).await;
    let mut a = env.projector_process(SLOW, &[]);
    stop_mid_ingest(&env, &a).await;

    // The second joins; the first resumes with its batch in flight and must rejoin.
    let mut settings = env.settings();
    settings.max_batch = 10;
    settings.linger = Duration::ZERO;
    let b = env.spawn_projector_with(settings);
    signal(&a, Signal::SIGCONT);
    let cb = b.counters.clone();
    eventually(Duration::from_secs(60), "the joining consumer holds partitions and applies events", || {
        let cb = cb.clone();
        async move { cb.applied.load(Ordering::Relaxed) > 0 && cb.assigned_partitions.load(Ordering::Relaxed) > 0 }
    })
    .await;
    assert!(cb.assigned_partitions.load(Ordering::Relaxed) < 24, "the partitions are shared after the join");

    // The first leaves (SIGTERM: its in-flight batch finishes, offsets committed on revoke).
    let lag = env.lag().await;
    assert!(lag.total() > 0, "the leave happens mid-ingest: {lag:?}");
    signal(&a, Signal::SIGTERM);
    assert!(a.wait().unwrap().success(), "SIGTERM exits 0");
    env.wait_caught_up(Duration::from_secs(180)).await;
    assert_eq!(cb.assigned_partitions.load(Ordering::Relaxed), 24, "the one left holds every partition");
    b.stop().await.unwrap();

    assert_identical_to_mongodb(&env, &seeded.org_ids, seeded.contacts + seeded.applications).await;
}

/// MongoDB (FerretDB) goes away: every request the projection can answer still gets its
/// answer, a request that needs MongoDB gets a clean 503 at once, readiness names the missing
/// dependency; when it is back, everything answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_projection_keeps_answering() {
    let mut ferret = OwnFerretDb::start().await;
    let mut env = TestEnv::new("mongo-down").await;
    env.mongo_uri = ferret.uri();
    let seeded = env.seed(small_seed(1, 150, 51)).await;
    // Running beside the API, as deployed: readiness asks for an attended projection.
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let url = env.serve_with(env.serve_args()).await;
    let org = &seeded.org_ids[0];
    let db = env.mongo().await;
    let snap = board_mongo::load_org(&db, org).await.expect("snapshot");
    let t = token(org, &snap.users[0].id);
    let boards = [r#"{"size": 10}"#, r#"{"size": 5, "ownerFilter": "my", "messageStatus": "answered"}"#, r#"{"search": "a"}"#];
    let mut before = Vec::new();
    for b in boards {
        let (status, body) = post_board(&url, Some(&t), b).await;
        assert_eq!((status, body["meta"]["answeredBy"].as_str()), (200, Some("projection")), "{body}");
        before.push(body["data"].clone());
    }
    let custom = json!({"customFields": {"industry": "Retail"}}).to_string();
    assert_eq!(post_board(&url, Some(&t), &custom).await.0, 200);

    ferret.stop();
    let ready_url = url.clone();
    eventually(Duration::from_secs(20), "readiness names mongodb as down", || {
        let url = ready_url.clone();
        async move {
            let r = reqwest::get(format!("{url}/readyz")).await.unwrap();
            let (code, body) = (r.status().as_u16(), r.json::<Value>().await.unwrap());
            code == 200 && body["status"] == "degraded" && body["down"] == json!(["mongodb"])
        }
    })
    .await;
    for (b, expected) in boards.iter().zip(&before) {
        let (status, body) = post_board(&url, Some(&t), b).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(&body["data"], expected, "the projection answers as before");
    }
    let (status, body) = post_board(&url, Some(&t), &custom).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("mongodb_unavailable")), "{body}");
    // An org the projection does not have needs MongoDB too.
    let stranger = token("0123456789abcdef01234567", &snap.users[0].id);
    let (status, body) = post_board(&url, Some(&stranger), "{}").await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("mongodb_unavailable")), "{body}");

    ferret.restart().await;
    let ready_url = url.clone();
    eventually(Duration::from_secs(30), "readiness says ready again", || {
        let url = ready_url.clone();
        async move { reqwest::get(format!("{url}/readyz")).await.unwrap().json::<Value>().await.unwrap()["status"] == "ready" }
    })
    .await;
    // Custom fields answer again: MongoDB's ids, the projection's board.
    let (status, body) = post_board(&url, Some(&t), &custom).await;
    assert_eq!(
        (status, body["meta"]["answeredBy"].as_str(), body["meta"]["route"].as_str()),
        (200, Some("projection"), Some("index_among_mongodb_ids")),
        "{body}"
    );
    projector.stop().await.unwrap();
}

/// A consumer of the test's that polls (stays in its group, holds what it is given) and applies
/// nothing; stopped when dropped, pass or fail.
struct Squatter {
    polling: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Squatter {
    /// Joins `env`'s group with `options` and returns once it holds a partition.
    fn join(env: &TestEnv, options: &[(&str, &str)]) -> Squatter {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let mut config = vec![("group.id", env.group.as_str()), ("enable.auto.commit", "false")];
        config.extend_from_slice(options);
        let consumer: BaseConsumer = env.kafka().client_config(&config).create().unwrap();
        let inputs = env.topics.inputs();
        consumer.subscribe(&inputs.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while consumer.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
            assert!(std::time::Instant::now() < deadline, "the squatter joined the group");
            let _ = consumer.poll(Duration::from_millis(100));
        }
        let polling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let keep = polling.clone();
        let thread = std::thread::spawn(move || {
            while keep.load(Ordering::Relaxed) {
                let _ = consumer.poll(Duration::from_millis(100));
            }
        });
        Squatter { polling, thread: Some(thread) }
    }
}

impl Drop for Squatter {
    /// Stops polling and closes the consumer (a dynamic member leaves the group).
    fn drop(&mut self) {
        self.polling.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A group that leaves the projector out (here: a member speaking an assignment protocol the
/// projector's consumer does not holds every partition and applies nothing; in the chaos run:
/// librdkafka after the coordinator restarted) is noticed by the group watch, which makes new
/// consumers; once the group lets one in, it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_leaves_the_projector_out_is_noticed_and_rejoined() {
    let env = TestEnv::new("group-stall").await;
    let seeded = env.seed(small_seed(1, 40, 5)).await;
    let squatter = Squatter::join(&env, &[("partition.assignment.strategy", "cooperative-sticky")]);
    let mut settings = env.settings();
    // Raised to twice max.poll.interval.ms (30 s with the tests' 6 s sessions).
    settings.group_stall_after = Duration::from_secs(1);
    let projector = env.spawn_projector_with(settings);
    eventually(Duration::from_secs(120), "the group watch makes a new consumer", || {
        let renewed = projector.counters.consumers_renewed.load(Ordering::Relaxed);
        async move { renewed >= 1 }
    })
    .await;
    assert_eq!(projector.counters.assigned_partitions.load(Ordering::Relaxed), 0, "the squatter still holds everything");
    assert_eq!(env.applied_offsets().await, 0, "nothing applied while left out");

    drop(squatter); // leaves the group
    env.wait_caught_up(Duration::from_secs(120)).await;
    assert!(!projector.ended(), "the projector kept running");
    projector.stop().await.expect("projector ran cleanly");
    assert_identical_to_mongodb(&env, &seeded.org_ids, seeded.contacts + seeded.applications).await;
}

/// A consumer librdkafka fails for good never consumes again. Here a static member fenced by a
/// newer one with its `group.instance.id` (a deployment that started a second projector with the
/// same id, say): the projector makes a new consumer, which takes the id back, and catches up —
/// without it the projection would wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_failed_for_good_is_replaced() {
    let env = TestEnv::new("consumer-fatal").await;
    let instance_id = format!("{}-static", env.group);
    let mut settings = env.settings();
    settings.kafka = settings.kafka.with_option("group.instance.id", &instance_id);
    let projector = env.spawn_projector_with(settings);
    let seeded = env.seed(small_seed(1, 20, 3)).await;
    env.wait_caught_up(Duration::from_secs(120)).await;

    let _squatter = Squatter::join(&env, &[("group.instance.id", &instance_id)]);
    let more = env.seed(small_seed(1, 20, 4)).await;
    eventually(Duration::from_secs(60), "a new consumer replaces the fenced one", || {
        let renewed = projector.counters.consumers_renewed.load(Ordering::Relaxed);
        async move { renewed >= 1 }
    })
    .await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    assert!(!projector.ended(), "the projector kept running");
    projector.stop().await.expect("projector ran cleanly");
    let orgs: Vec<String> = seeded.org_ids.iter().chain(&more.org_ids).cloned().collect();
    assert_identical_to_mongodb(&env, &orgs, seeded.contacts + seeded.applications + more.contacts + more.applications).await;
}
