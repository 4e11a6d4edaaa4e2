//! `bench run scale` (deploy/bench.sh): one org of `contacts` plus 3 orgs of 5,000. Ingest beside
//! the raw Kafka read rate and the raw Redis rate of the same write mix; Redis bytes per card;
//! boards (a)-(h) over HTTP with wrk at 1 and 32 connections beside the same Redis work issued
//! directly, the simplest possible board and a canned axum response of the same size;
//! freshness under load; the MongoDB path against the projection.
use super::harness::{board_summary, free_port, redis_cpu, redis_used_memory, BenchRun};
use super::wrk::{ms, Script, Wrk, WrkResult};
use crate::seed::SeedArgs;
use std::time::{Duration, Instant};

/// How long each measurement runs, in seconds.
pub struct Durations {
    pub wrk: u64,
    pub raw: u64,
    pub freshness: u64,
}

pub async fn run(r: &mut BenchRun, (contacts, small_contacts): (usize, usize), secs: Durations) -> anyhow::Result<()> {
    let rep = &r.report;
    rep.line(format!(
        "== seed: 1 org of {contacts} contacts, ~3 messages each (events only), and 3 orgs of {small_contacts} (MongoDB and events)"
    ));
    let big = r.seed(SeedArgs { orgs: 1, contacts, messages: 3.0, no_mongo: true, quiet: true, ..SeedArgs::default() }).await?;
    let small = r.seed(SeedArgs { orgs: 3, contacts: small_contacts, seed: 7, quiet: true, ..SeedArgs::default() }).await?;
    let big_org = big.org_ids[0].clone();
    // The freshness probe writes into the first small org (through Kafka only); MongoDB is
    // compared on the second, which nothing but the seed writes.
    let (probe_org, mongo_org) = (small.org_ids[0].clone(), small.org_ids[1].clone());

    r.report.line("== ingest: pipeline-board project --exit-when-caught-up");
    let mut redis = r.redis().await?;
    let (memory0, cpu0) = (redis_used_memory(&mut redis).await?, redis_cpu(&mut redis).await?);
    let usage = r.project_until_caught_up(&[])?;
    let rep = &r.report;
    rep.line(format!("projector process: {:.1} s user + {:.1} s system CPU in {:.1} s", usage.user, usage.system, usage.wall));
    rep.line(format!("redis-server: {:.1} s CPU during the ingest", redis_cpu(&mut redis).await? - cpu0));
    let grown = redis_used_memory(&mut redis).await?.saturating_sub(memory0);
    let mut total_cards = 0;
    for org in big.org_ids.iter().chain(&small.org_ids) {
        total_cards += r.cards_of(org).await?;
    }
    let big_cards = r.cards_of(&big_org).await?;
    r.report.line(format!(
        "redis used_memory grew by {} MiB for {total_cards} cards (big org: {big_cards}) with their conversations and messages: {} bytes per card",
        grown >> 20,
        grown / total_cards.max(1)
    ));

    r.report.line("== raw kafka read of the same topics");
    let out = r.output(&["bench", "kafka-read"])?;
    r.report.lines(&out);
    r.report.line("== raw redis rate of the same write mix (final writes of 200,000 cards as plain pipelined HSET/ZADD)");
    let progress: std::collections::HashMap<String, i64> =
        redis::AsyncCommands::hgetall(&mut redis, r.keys().progress(&r.sandbox.group)).await?;
    let all_events: i64 = progress.values().sum();
    let per_card = format!("{:.2}", all_events as f64 / total_cards.max(1) as f64);
    let out = r.output(&["bench", "redis-writes", "--org", &big_org, "--cards", "200000", "--events-per-card", &per_card])?;
    r.report.lines(&out);

    // The caller: a user with teams (so that `team` means something).
    let user = r.user_of(&big_org).await?;
    let token = r.token(&big_org, &user);
    let probe_user = r.user_of(&probe_org).await?;
    let probe_token = r.token(&probe_org, &probe_user);
    let api = r.start_projector_and_api().await?;
    let first = api.board_json(&token, r#"{"size":1}"#).await?;
    let first_stage =
        first["data"].as_object().and_then(|d| d.keys().next().cloned()).ok_or_else(|| anyhow::anyhow!("no stage: {first}"))?;
    // The in-memory index loads on the first board that needs it: loaded before measuring.
    let started = Instant::now();
    for _ in 0..60 {
        if api.board(&token, r#"{"size":1,"search":"jane"}"#).await?.0 == 200 {
            break;
        }
    }
    r.report.line(format!(
        "in-memory index of the big org loaded on the first index board in {:.1} s (the API process: {:.0} MiB RSS)",
        started.elapsed().as_secs_f64(),
        api.rss_mib()
    ));
    let since = (chrono::Utc::now() - chrono::Duration::days(180)).format("%Y-%m-%dT%H:%M:%S.000Z").to_string();
    let boards = [
        ("a-none", r#"{"size":25}"#.to_string()),
        ("b-my", r#"{"size":25,"ownerFilter":"my"}"#.to_string()),
        ("c-owner+created", format!(r#"{{"size":25,"owner":["{user}"],"createdDateRange":{{"start":"{since}"}}}}"#)),
        ("d-team", r#"{"size":25,"ownerFilter":"team"}"#.to_string()),
        (
            "e-my+unanswered+quiet",
            r#"{"size":25,"ownerFilter":"my","messageStatus":"unanswered","lastMessageTimeRange":{"value":7,"unit":"days"}}"#.to_string(),
        ),
        ("f-search-name", r#"{"size":25,"search":"jane"}"#.to_string()),
        ("g-search-phone", r#"{"size":25,"search":"47110"}"#.to_string()),
        ("h-page-200", format!(r#"{{"size":25,"stages":["{first_stage}"],"page":{{"{first_stage}":200}}}}"#)),
    ];
    let (duration, raw_seconds) = (Duration::from_secs(secs.wrk), secs.raw.to_string());
    r.report.line(
        "== boards on the big org, all stages, size 25: HTTP (wrk) | the same Redis work issued directly (pipeline-board bench board)",
    );
    r.report.line(format!(
        "{:<24} {:>5} | {:>9} {:>9} {:>9} {:>9} | redis work",
        "board", "conns", "http p50", "http p99", "http max", "http rps"
    ));
    let url = api.contacts_url();
    for (name, body) in &boards {
        let v = api.board_json(&token, body).await?;
        for conns in [1, 32] {
            let w = Wrk { url: &url, conns, duration, script: Script::Post, env: vec![("BODY", body.clone()), ("TOKEN", token.clone())] }
                .run()?;
            let raw = r.output(&[
                "bench",
                "board",
                "--org",
                &big_org,
                "--user",
                &user,
                "--body",
                body,
                "--conns",
                &conns.to_string(),
                "--seconds",
                &raw_seconds,
            ])?;
            r.report.line(format!("{} | {}", row(name, conns, &w), raw.trim()));
        }
        r.report.line(format!("   ({name}: {}, route {}; body {body})", board_summary(&v), v["meta"]["route"].as_str().unwrap_or("?")));
    }
    r.report.line("== the simplest possible board on the same Redis (per stage ZRANGE 0 24 REV + ZCARD, one HMGET of the page's records)");
    for conns in [1, 32] {
        let raw = r.output(&[
            "bench",
            "board",
            "--org",
            &big_org,
            "--user",
            &user,
            "--simplest",
            "--conns",
            &conns.to_string(),
            "--seconds",
            &raw_seconds,
        ])?;
        r.report.line(format!("simplest board  conns {conns} | {}", raw.trim()));
    }
    let bytes = api.board(&token, r#"{"size":25}"#).await?.2.len();
    r.report.line(format!("== a canned axum response of the same size ({bytes} bytes)"));
    let canned_addr = format!("127.0.0.1:{}", free_port()?);
    let canned = r.spawn(r.command(&["bench", "canned", "--listen", &canned_addr, "--bytes", &bytes.to_string()]))?;
    let canned_url = format!("http://{canned_addr}/api/contacts");
    wait_for_post(&canned_url).await?;
    for conns in [1, 32] {
        let w = Wrk { url: &canned_url, conns, duration, script: Script::Post, env: vec![("BODY", "{}".into()), ("TOKEN", "-".into())] }
            .run()?;
        r.report.line(row("canned", conns, &w));
    }
    r.stop(canned);
    r.report.line("== freshness: produce -> visible in an API answer, under 5,000 events/s and 500 boards/s");
    let out = r.output(&[
        "bench",
        "freshness",
        "--api",
        &api.base,
        "--org",
        &big_org,
        "--token",
        &token,
        "--probe-org",
        &probe_org,
        "--probe-token",
        &probe_token,
        "--seconds",
        &secs.freshness.to_string(),
    ])?;
    r.report.lines(&out);
    r.report.line(format!(
        "== the MongoDB path against the projection on a {small_contacts}-contact org (same process, no HTTP; identical answers checked)"
    ));
    let mongo_user = r.user_of(&mongo_org).await?;
    let out = r.output(&[
        "bench",
        "mongo-vs-projection",
        "--org",
        &mongo_org,
        "--user",
        &mongo_user,
        "--n",
        "10",
        "--body",
        r#"{"size":25}"#,
        "--body",
        r#"{"size":25,"ownerFilter":"my"}"#,
        "--body",
        r#"{"size":25,"search":"jan"}"#,
        "--body",
        r#"{"size":25,"ownerFilter":"team","messageStatus":"unanswered"}"#,
    ])?;
    r.report.lines(&out);
    r.report.line(format!(
        "== redis after the run: {} MiB used; the API process: {:.0} MiB RSS",
        redis_used_memory(&mut redis).await? >> 20,
        api.rss_mib()
    ));
    Ok(())
}

/// One table row: label, connections, p50, p99, max, requests/s, errors.
pub fn row(label: &str, conns: usize, w: &WrkResult) -> String {
    format!("{label:<24} {conns:>5} | {:>9} {:>9} {:>9} {:>9.0} {}", ms(w.p50), ms(w.p99), ms(w.max), w.rps(), w.trouble())
}

/// Waits until a POST to `url` answers (a server just started).
async fn wait_for_post(url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http.post(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{url} did not answer")
}
