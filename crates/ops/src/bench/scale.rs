//! `bench run scale` (deploy/bench.sh): one org of `contacts` plus 3 orgs of 5,000. Ingest beside
//! the raw Kafka read rate and the raw Redis rate of the same write mix; Redis bytes per card;
//! boards (a)-(h) over HTTP with wrk at 1 and 32 connections beside the same Redis work issued
//! directly, the simplest possible board and a canned axum response of the same size;
//! freshness under load; the MongoDB path against the projection.
use super::harness::{board_summary, free_port, process_cpu, redis_cpu, redis_used_memory, wait_answering, Api, BenchRun};
use super::wrk::{ms, Script, Wrk, WrkResult};
use crate::seed::SeedArgs;
use std::time::{Duration, Instant};

/// How long each measurement runs, in seconds.
pub struct Durations {
    pub wrk: u64,
    pub raw: u64,
    pub freshness: u64,
}

/// The run's data set: the big org and the three small ones.
struct DataSet {
    big_org: String,
    /// The freshness probe writes into it (through Kafka only).
    probe_org: String,
    /// Compared with MongoDB: nothing but the seed writes it.
    mongo_org: String,
    small_contacts: usize,
    orgs: Vec<String>,
}

/// A user of the big org with teams (so that `team` means something) and the running API.
struct Caller {
    user: String,
    token: String,
    api: Api,
}

pub async fn run(r: &mut BenchRun, (contacts, small_contacts): (usize, usize), secs: Durations) -> anyhow::Result<()> {
    r.report.line(format!("== durations: wrk {} s per row, raw Redis boards {} s, freshness {} s", secs.wrk, secs.raw, secs.freshness));
    // `bench redis-writes` writes a scratch key space of its own.
    let scratch = board_model::keys::KeySpace::new(format!("{}-rawwrites", r.keys().prefix()));
    r.extra_keys.push((r.sandbox.redis_url.clone(), scratch.pattern()));
    let data = seed(r, contacts, small_contacts).await?;
    let cards = ingest(r, &data).await?;
    raw_rates(r, &data, cards).await?;
    let user = r.user_of(&data.big_org).await?;
    let caller = Caller { token: r.token(&data.big_org, &user), user, api: r.start_projector_and_api().await? };
    load_index(r, &caller).await?;
    let mut rates = Rates::default();
    boards(r, &data, &caller, &secs, &mut rates).await?;
    serving(r, &caller, Duration::from_secs(secs.wrk), &mut rates).await?;
    canned(r, &caller, Duration::from_secs(secs.wrk), &mut rates).await?;
    ratios(r, &rates);
    freshness(r, &data, &caller, secs.freshness).await?;
    custom_fields(r, &data, &caller, Duration::from_secs(secs.wrk)).await?;
    mongo_path(r, &data).await?;
    r.report.line(format!(
        "== redis after the run: {} MiB used; the API process: {:.0} MiB RSS",
        redis_used_memory(&mut r.redis().await?).await? >> 20,
        caller.api.rss_mib()
    ));
    Ok(())
}

async fn seed(r: &BenchRun, contacts: usize, small_contacts: usize) -> anyhow::Result<DataSet> {
    r.report.line(format!(
        "== seed: 1 org of {contacts} contacts, ~3 messages each (events only), and 3 orgs of {small_contacts} (MongoDB and events)"
    ));
    let big = r.seed(SeedArgs { orgs: 1, contacts, messages: 3.0, no_mongo: true, quiet: true, ..SeedArgs::default() }).await?;
    let small = r.seed(SeedArgs { orgs: 3, contacts: small_contacts, seed: 7, quiet: true, ..SeedArgs::default() }).await?;
    Ok(DataSet {
        big_org: big.org_ids[0].clone(),
        probe_org: small.org_ids[0].clone(),
        mongo_org: small.org_ids[1].clone(),
        small_contacts,
        orgs: big.org_ids.iter().chain(&small.org_ids).cloned().collect(),
    })
}

/// The projector until caught up: its CPU, Redis' CPU and bytes per card. Returns the cards.
async fn ingest(r: &BenchRun, data: &DataSet) -> anyhow::Result<u64> {
    r.report.line("== ingest: pipeline-board project --exit-when-caught-up");
    let mut redis = r.redis().await?;
    let (memory0, cpu0) = (redis_used_memory(&mut redis).await?, redis_cpu(&mut redis).await?);
    let usage = r.project_until_caught_up(&[]).await?;
    r.report.line(format!("projector process: {:.1} s user + {:.1} s system CPU in {:.1} s", usage.user, usage.system, usage.wall));
    r.report.line(format!("redis-server: {:.1} s CPU during the ingest", redis_cpu(&mut redis).await? - cpu0));
    let grown = redis_used_memory(&mut redis).await?.saturating_sub(memory0);
    let mut cards = 0;
    for org in &data.orgs {
        cards += r.cards_of(org).await?;
    }
    r.report.line(format!(
        "redis used_memory grew by {} MiB for {cards} cards (big org: {}) with their conversations and messages: {} bytes per card",
        grown >> 20,
        r.cards_of(&data.big_org).await?,
        grown / cards.max(1)
    ));
    Ok(cards)
}

/// The raw Kafka read of the same topics and the raw Redis rate of the same write mix.
async fn raw_rates(r: &BenchRun, data: &DataSet, cards: u64) -> anyhow::Result<()> {
    r.report.line("== raw kafka read of the same topics");
    r.report.lines(&r.output(&["bench", "kafka-read"])?);
    r.report.line("== raw redis rate of the same write mix (final writes of 200,000 cards as plain pipelined HSET/ZADD)");
    let progress: std::collections::HashMap<String, i64> =
        redis::AsyncCommands::hgetall(&mut r.redis().await?, r.keys().progress(&r.sandbox.group)).await?;
    let per_card = format!("{:.2}", progress.values().sum::<i64>() as f64 / cards.max(1) as f64);
    r.report.lines(&r.output(&["bench", "redis-writes", "--org", &data.big_org, "--cards", "200000", "--events-per-card", &per_card])?);
    Ok(())
}

/// The in-memory index loads on the first board that needs it: loaded before measuring.
async fn load_index(r: &BenchRun, c: &Caller) -> anyhow::Result<()> {
    let started = Instant::now();
    for _ in 0..60 {
        if c.api.board(&c.token, r#"{"size":1,"search":"jane"}"#).await?.0 == 200 {
            break;
        }
    }
    r.report.line(format!(
        "in-memory index of the big org loaded on the first index board in {:.1} s (the API process: {:.0} MiB RSS)",
        started.elapsed().as_secs_f64(),
        c.api.rss_mib()
    ));
    Ok(())
}

/// Requests/s at 32 connections of what the ratios compare.
#[derive(Default)]
struct Rates {
    /// Boards (a)-(h), each computed for its request (`Cache-Control: no-cache`).
    computed: Vec<(&'static str, f64)>,
    simplest: f64,
    /// Board (a) as clients get it (shared answers), by coding; then the many viewers.
    served: Vec<(&'static str, f64)>,
    many_viewers: f64,
    canned: f64,
}

/// What a wrk run cost per board: the API process's CPU and Redis' CPU.
struct Cost {
    api_us: f64,
    redis_us: f64,
}

/// Computed for each request: what a board costs to compute (not a shared answer).
const COMPUTED: &str = "Cache-Control: no-cache";

/// `body` from wrk at `conns` connections with `headers` (`Name: value|...`), and its cost.
async fn http_run(
    r: &BenchRun,
    c: &Caller,
    body: &str,
    conns: usize,
    duration: Duration,
    headers: &str,
) -> anyhow::Result<(WrkResult, Cost)> {
    let mut redis = r.redis().await?;
    let (api0, redis0) = (process_cpu(c.api.pid), redis_cpu(&mut redis).await?);
    let env = vec![("BODY", body.to_string()), ("TOKEN", c.token.clone()), ("HEADERS", headers.to_string())];
    let url = c.api.contacts_url();
    let w = Wrk { url: &url, conns, duration, script: Script::Post, env, timeout: None }.run()?;
    let n = w.requests.max(1) as f64;
    let cost = Cost { api_us: (process_cpu(c.api.pid) - api0) / n * 1e6, redis_us: (redis_cpu(&mut redis).await? - redis0) / n * 1e6 };
    Ok((w, cost))
}

/// Boards (a)-(h) over HTTP at 1 and 32 connections, each computed for its request, with the
/// API's and Redis' CPU per board, beside the same Redis work issued directly; then the simplest
/// possible board.
async fn boards(r: &BenchRun, data: &DataSet, c: &Caller, secs: &Durations, rates: &mut Rates) -> anyhow::Result<()> {
    let first = c.api.board_json(&c.token, r#"{"size":1}"#).await?;
    let first_stage =
        first["data"].as_object().and_then(|d| d.keys().next().cloned()).ok_or_else(|| anyhow::anyhow!("no stage: {first}"))?;
    let since = (chrono::Utc::now() - chrono::Duration::days(180)).format("%Y-%m-%dT%H:%M:%S.000Z").to_string();
    let user = &c.user;
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
        "== boards on the big org, all stages, size 25, each computed for its request (Cache-Control: no-cache): HTTP (wrk) with the API's and \
         Redis' CPU per board | the same Redis work issued directly (pipeline-board bench board)",
    );
    r.report.line(format!("{} | redis work", header("board")));
    for (name, body) in &boards {
        let v = c.api.board_json(&c.token, body).await?;
        for conns in [1, 32] {
            let (w, cost) = http_run(r, c, body, conns, duration, COMPUTED).await?;
            let raw = r.output(&raw_board(&data.big_org, user, &["--body", body], conns, &raw_seconds))?;
            r.report.line(format!("{} | {}", costed_row(name, conns, &w, &cost), raw.trim()));
            if conns == 32 {
                rates.computed.push((name, w.rps()));
            }
        }
        r.report.line(format!("   ({name}: {}, route {}; body {body})", board_summary(&v), v["meta"]["route"].as_str().unwrap_or("?")));
    }
    r.report.line("== the simplest possible board on the same Redis (per stage ZRANGE 0 24 REV + ZCARD, one HMGET of the page's records)");
    for conns in [1, 32] {
        let raw = r.output(&raw_board(&data.big_org, user, &["--simplest"], conns, &raw_seconds))?;
        r.report.line(format!("simplest board  conns {conns} | {}", raw.trim()));
        if conns == 32 {
            rates.simplest = raw.split_whitespace().skip_while(|w| *w != "rps").nth(1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        }
    }
    Ok(())
}

/// Board (a) as clients get it: shared answers (one computation per change token) in each
/// coding, one coding computed for every request, and 50 viewers polling it.
async fn serving(r: &BenchRun, c: &Caller, duration: Duration, rates: &mut Rates) -> anyhow::Result<()> {
    let board = r#"{"size":25}"#;
    r.report.line(
        "== board (a) as clients get it, 32 connections: shared answers in each coding (bytes per board on the wire, headers included)",
    );
    r.report.line(format!("{} | bytes/board", header("coding")));
    let codings: [(&'static str, &str); 5] = [
        ("identity", ""),
        ("gzip", "Accept-Encoding: gzip"),
        ("br", "Accept-Encoding: br"),
        ("zstd", "Accept-Encoding: zstd"),
        ("zstd, computed each time", "Accept-Encoding: zstd|Cache-Control: no-cache"),
    ];
    for (label, headers) in codings {
        let (w, cost) = http_run(r, c, board, 32, duration, headers).await?;
        r.report.line(format!("{} | {}", costed_row(label, 32, &w, &cost), w.bytes_per_request()));
        rates.served.push((label, w.rps()));
    }
    r.report.line("== many viewers: 50 connections polling board (a) (shared answers, identity, no If-None-Match)");
    let (w, cost) = http_run(r, c, board, 50, duration, "").await?;
    r.report.line(costed_row("50 viewers", 50, &w, &cost));
    rates.many_viewers = w.rps();
    Ok(())
}

/// A canned axum response of board (a)'s size: what this box serves at all.
async fn canned(r: &mut BenchRun, c: &Caller, duration: Duration, rates: &mut Rates) -> anyhow::Result<()> {
    let bytes = c.api.board(&c.token, r#"{"size":25}"#).await?.2.len();
    r.report.line(format!("== a canned axum response of the same size ({bytes} bytes)"));
    let addr = format!("127.0.0.1:{}", free_port()?);
    let canned = r.spawn(r.command(&["bench", "canned", "--listen", &addr, "--bytes", &bytes.to_string()]))?;
    let url = format!("http://{addr}/api/contacts");
    let http = reqwest::Client::new();
    wait_answering(|| http.post(&url), Duration::from_secs(10)).await?;
    for conns in [1, 32] {
        let env = vec![("BODY", "{}".into()), ("TOKEN", "-".into())];
        let w = Wrk { url: &url, conns, duration, script: Script::Post, env, timeout: None }.run()?;
        r.report.line(row("canned", conns, &w));
        rates.canned = w.rps();
    }
    r.stop(canned).await;
    Ok(())
}

/// The ratios the targets are stated in, from this run's rates at 32 connections.
fn ratios(r: &BenchRun, rates: &Rates) {
    let of = |rps: f64, base: f64| format!("{rps:.0}/s = {:.2}x", rps / base.max(1e-9));
    r.report.line(format!(
        "== ratios (32 connections): against the simplest board ({:.0}/s) and the canned response ({:.0}/s)",
        rates.simplest, rates.canned
    ));
    for (name, rps) in &rates.computed {
        r.report.line(format!("{name:<26} computed: {} of the simplest", of(*rps, rates.simplest)));
    }
    for (name, rps) in &rates.served {
        r.report.line(format!("(a) {name:<22} served: {} of the simplest", of(*rps, rates.simplest)));
    }
    r.report.line(format!("50 viewers of (a)          served: {} of the canned response", of(rates.many_viewers, rates.canned)));
}

async fn freshness(r: &BenchRun, data: &DataSet, c: &Caller, seconds: u64) -> anyhow::Result<()> {
    r.report.line("== freshness: produce -> visible in an API answer, under 5,000 events/s and 500 boards/s");
    if seconds == 0 {
        r.report.line("skipped (--freshness-seconds 0)");
        return Ok(());
    }
    let probe_token = r.token(&data.probe_org, &r.user_of(&data.probe_org).await?);
    let seconds = seconds.to_string();
    let args = ["bench", "freshness", "--api", &c.api.base, "--org", &data.big_org, "--token", &c.token];
    let probe = ["--probe-org", &data.probe_org, "--probe-token", &probe_token, "--seconds", &seconds];
    r.report.lines(&r.output(&[&args[..], &probe[..]].concat())?);
    Ok(())
}

/// Custom-field boards over HTTP on the org MongoDB holds: MongoDB's ids of the matching cards,
/// the projection among them.
async fn custom_fields(r: &BenchRun, data: &DataSet, c: &Caller, duration: Duration) -> anyhow::Result<()> {
    r.report.line(format!(
        "== custom-field boards on the {}-contact org MongoDB holds, 1 connection (MongoDB: the ids the custom fields match; the projection: the rest)",
        data.small_contacts
    ));
    let token = r.token(&data.mongo_org, &r.user_of(&data.mongo_org).await?);
    for body in [r#"{"size":25,"customFields":{"industry":"estate"}}"#, r#"{"size":25,"customFields":{"vip":true}}"#] {
        let v = c.api.board_json(&token, body).await?;
        let env = vec![("BODY", body.to_string()), ("TOKEN", token.clone())];
        let url = c.api.contacts_url();
        let w = Wrk { url: &url, conns: 1, duration, script: Script::Post, env, timeout: Some(Duration::from_secs(15)) }.run()?;
        r.report.line(format!(
            "{} | {}, route {}; body {body}",
            row("custom fields", 1, &w),
            board_summary(&v),
            v["meta"]["route"].as_str().unwrap_or("?")
        ));
    }
    Ok(())
}

async fn mongo_path(r: &BenchRun, data: &DataSet) -> anyhow::Result<()> {
    r.report.line(format!(
        "== the MongoDB path against the projection on a {}-contact org (same process, no HTTP; identical answers checked)",
        data.small_contacts
    ));
    let user = r.user_of(&data.mongo_org).await?;
    let mut args = vec!["bench", "mongo-vs-projection", "--org", &data.mongo_org, "--user", &user, "--n", "10"];
    for body in [
        r#"{"size":25}"#,
        r#"{"size":25,"ownerFilter":"my"}"#,
        r#"{"size":25,"search":"jan"}"#,
        r#"{"size":25,"ownerFilter":"team","messageStatus":"unanswered"}"#,
    ] {
        args.extend(["--body", body]);
    }
    r.report.lines(&r.output(&args)?);
    Ok(())
}

/// `bench board` on the big org: the same Redis work as a row's board, issued directly.
fn raw_board<'a>(org: &'a str, user: &'a str, what: &[&'a str], conns: usize, seconds: &'a str) -> Vec<String> {
    let mut args: Vec<String> = ["bench", "board", "--org", org, "--user", user].iter().map(|s| s.to_string()).collect();
    args.extend(what.iter().map(|s| s.to_string()));
    args.extend(["--conns".to_string(), conns.to_string(), "--seconds".to_string(), seconds.to_string()]);
    args
}

/// The header of the tables' rows (`costed_row`).
fn header(first: &str) -> String {
    format!(
        "{first:<24} {:>5} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9}",
        "conns", "http p50", "http p99", "http max", "http rps", "api/board", "redis/b."
    )
}

/// A row with the API's and Redis' CPU per board, in microseconds.
fn costed_row(label: &str, conns: usize, w: &WrkResult, cost: &Cost) -> String {
    let trouble = w.trouble();
    let row = format!(
        "{label:<24} {conns:>5} | {:>9} {:>9} {:>9} {:>9.0} | {:>7.0}us {:>7.0}us",
        ms(w.p50),
        ms(w.p99),
        ms(w.max),
        w.rps(),
        cost.api_us,
        cost.redis_us
    );
    if trouble.is_empty() {
        row
    } else {
        format!("{row} {trouble}")
    }
}

/// One table row: label, connections, p50, p99, max, requests/s, errors.
pub fn row(label: &str, conns: usize, w: &WrkResult) -> String {
    format!("{label:<24} {conns:>5} | {:>9} {:>9} {:>9} {:>9.0} {}", ms(w.p50), ms(w.p99), ms(w.max), w.rps(), w.trouble())
}
