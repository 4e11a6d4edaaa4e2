//! `pipeline-board bench run`, the benchmarks' orchestration, at a tiny size: every section of
//! the scale run comes out with its rows, and the run's sandbox (topics, keys, database) is gone
//! afterwards. The figures themselves are not checked here (benchmarks, not tests); the
//! freshness step is skipped (`--freshness-seconds 0`: it fails a probe unseen for 10 s, which
//! a loaded machine running the debug build may not meet).
use crate::common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_run_reports_every_section_and_leaves_nothing_behind() {
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pipeline-board"))
            .args(["bench", "run", "--no-doc", "scale", "--contacts", "300", "--small-contacts", "60"])
            .args(["--seconds", "1", "--raw-seconds", "1", "--freshness-seconds", "0"])
            .output()
            .expect("bench run")
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bench run failed:\n{stdout}\n{stderr}");
    for section in [
        "== machine:",
        "== ingest",
        "projector process:",
        "redis-server:",
        "bytes per card",
        "kafka read:",
        "== boards on the big org",
        "simplest board  conns 32",
        "== board (a) as clients get it",
        "== many viewers",
        "== a canned axum response",
        "== ratios",
        "50 viewers of (a)",
        "== custom-field boards",
        "route index_among_mongodb_ids",
        "== freshness",
        "skipped (--freshness-seconds 0)",
        "== the MongoDB path",
        "identical answers",
        "== redis after the run",
    ] {
        assert!(stdout.contains(section), "{section:?} missing from:\n{stdout}");
    }
    for board in ["a-none", "b-my", "c-owner+created", "d-team", "e-my+unanswered+quiet", "f-search-name", "g-search-phone", "h-page-200"] {
        let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with(board) && l.contains('|')).collect();
        assert_eq!(rows.len(), 2, "{board}: one row per connection count in:\n{stdout}");
        for row in rows {
            let [_, http, cost, raw] = row.split(" | ").collect::<Vec<_>>()[..] else { panic!("{board}: not http | cost | raw: {row}") };
            let rps: f64 = http.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            assert!(rps > 0.0 && !http.contains("non-2xx"), "{board}: wrk measured nothing or errors: {row}");
            assert!(cost.split_whitespace().all(|c| c.ends_with("us")), "{board}: no CPU per board: {row}");
            assert!(raw.starts_with("p50 ") && raw.contains(" rps "), "{board}: no raw Redis figures: {row}");
        }
    }
    // Board (a) in each coding: the compressed ones are smaller on the wire.
    let wire = |coding: &str| -> u64 {
        let row = stdout.lines().find(|l| l.starts_with(&format!("{coding:<24} "))).unwrap_or_else(|| panic!("no {coding} row:\n{stdout}"));
        row.rsplit(" | ").next().and_then(|b| b.trim().parse().ok()).unwrap_or_else(|| panic!("no bytes in {row}"))
    };
    for coding in ["gzip", "br", "zstd"] {
        assert!(wire(coding) < wire("identity"), "{coding} is not smaller than identity:\n{stdout}");
    }

    // Nothing of the run is left on the stack.
    let name = stderr.lines().find_map(|l| l.strip_prefix("sandbox: ")).expect("the run names its sandbox").to_string();
    let mut redis = board_redis::config::redis_connection(&env_or("REDIS_URL", "redis://127.0.0.1:6379")).await.unwrap();
    let keys = redis.scan_match(&format!("bench:{name}:*")).await.unwrap();
    assert!(keys.is_empty(), "keys left: {:?}", &keys[..keys.len().min(5)]);
    let client = mongodb::Client::with_uri_str(env_or("MONGODB_URI", "mongodb://127.0.0.1:27017")).await.unwrap();
    let db = format!("bench{}", name.replace('-', "_"));
    assert!(!client.list_database_names().await.unwrap().contains(&db), "database {db} left");
    // Deleted topics leave the brokers' metadata a moment later.
    eventually(Duration::from_secs(30), "the run's topics deleted", || {
        let (brokers, prefix) = (env_or("KAFKA_BROKERS", "127.0.0.1:9092"), format!("{name}."));
        async move {
            tokio::task::spawn_blocking(move || {
                use rdkafka::consumer::Consumer;
                let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
                let md = c.fetch_metadata(None, Duration::from_secs(10)).unwrap();
                !md.topics().iter().any(|t| t.name().starts_with(&prefix))
            })
            .await
            .unwrap()
        }
    })
    .await;
}
