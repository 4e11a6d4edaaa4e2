//! `pipeline-board bench ...`: the raw costs our numbers are compared against, measured with the
//! same clients on the same data, the end-to-end measurements that need a program rather than
//! `wrk`, and `bench run <scenario>`, the orchestration of a whole benchmark run in its own
//! sandbox on the stack (`harness.rs`; one module per scenario; `deploy/*bench.sh` start the
//! stack, build the release binary and call it).
mod cluster;
mod harness;
mod page;
mod rebuild;
mod saas;
mod scale;
mod wrk;
use board_api::query::index::IndexBucket;
use board_api::query::mongo_path::MongoReader;
use board_api::query::projection::ProjectionReader;
use board_api::query::request::{BoardQuery, ContactsRequest};
use board_model::keys::KeySpace;
use board_model::model::CardKind;
use board_model::record::{index_entries, CardRecord};
use board_mongo::MongoArgs;
use board_redis::config::RedisArgs;
use board_redis::LiveOrg;
use projector::config::KafkaArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// A whole benchmark run in a sandbox of its own on the stack (its topics, keys, consumer
    /// groups and database, removed at the end): printed as it goes and written into
    /// `--doc` (docs/benchmarks.md). Run the release build (deploy/bench.sh and its siblings).
    Run(RunArgs),
    /// Removes what interrupted runs left on the stack: keys under `bench:`, databases named
    /// `bench...`, topics of sandboxes named after a scenario.
    Clean,
    /// Read every input topic from the start without processing: the raw Kafka read rate.
    KafkaRead {
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// The raw Redis rate of the projector's write mix: the final writes of `--cards` projected
    /// cards of the org (record, index entries, contact state) replayed as plain pipelined
    /// HSET/ZADD into a scratch key space, 1,000 cards a round trip — no reads, guards or Lua.
    RedisWrites {
        #[command(flatten)]
        redis: RedisArgs,
        #[arg(long)]
        org: String,
        #[arg(long, default_value_t = 200_000)]
        cards: usize,
        /// Events per card of the data set (events / cards), to express the rate in events/s.
        #[arg(long, default_value_t = 1.0)]
        events_per_card: f64,
    },
    /// Runs a board's Redis work directly (no HTTP, no decoding, no JSON) in a closed loop:
    /// `--simplest` replaces it by the simplest possible board on the same data (per stage one
    /// ZRANGE + ZCARD over the stage's plain sorted set, then one HMGET of the page's records).
    Board {
        #[command(flatten)]
        redis: RedisArgs,
        #[arg(long)]
        org: String,
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "{}")]
        body: String,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long)]
        simplest: bool,
    },
    /// Serves one canned response of `--bytes` bytes at `POST /api/contacts` with axum: what this
    /// box can serve at all for a board of that size.
    Canned {
        #[arg(long, default_value = "127.0.0.1:18182")]
        listen: String,
        #[arg(long)]
        bytes: usize,
    },
    /// Freshness: produces `--rate` events/s (messages to cards of `--org`) while `--query-rate`
    /// boards/s are asked, and every 100 ms a probe card into `--probe-org`, timing from its
    /// produce call to the first API answer that shows it.
    Freshness {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        redis: RedisArgs,
        #[arg(long)]
        api: String,
        #[arg(long)]
        org: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        probe_org: String,
        #[arg(long)]
        probe_token: String,
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        #[arg(long, default_value_t = 500)]
        query_rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// The MongoDB path against the projection on the same org, in-process (no HTTP), for each
    /// body: median of `--n` answers each.
    MongoVsProjection {
        #[command(flatten)]
        redis: RedisArgs,
        #[command(flatten)]
        mongo: MongoArgs,
        #[arg(long)]
        org: String,
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 20)]
        n: usize,
        /// Request bodies (JSON), one per flag.
        #[arg(long = "body")]
        bodies: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
    /// Where the run's output is written (its section replaced).
    #[arg(long, default_value = "docs/benchmarks.md", global = true)]
    pub doc: std::path::PathBuf,
    /// Print only; leave the doc as it is.
    #[arg(long, global = true)]
    pub no_doc: bool,
    /// Keep the run's topics, keys and database (to look at afterwards).
    #[arg(long, global = true)]
    pub keep: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Scenario {
    /// One org of `--contacts` plus 3 of 5,000: ingest against the raw Kafka and Redis rates,
    /// bytes per card, boards (a)-(h) against the same Redis work, the simplest board and a canned
    /// response, freshness under load, the MongoDB path (section "Latest run").
    Scale {
        #[arg(long, default_value_t = 1_000_000)]
        contacts: usize,
        /// Seconds of wrk per table row.
        #[arg(long, env = "BENCH_SECONDS", default_value_t = 8)]
        seconds: u64,
        /// Seconds of each raw Redis board (`bench board`) beside a row.
        #[arg(long, default_value_t = 3)]
        raw_seconds: u64,
        /// Seconds of the freshness measurement.
        #[arg(long, default_value_t = 20)]
        freshness_seconds: u64,
        /// Contacts of each of the 3 small orgs (in MongoDB too).
        #[arg(long, default_value_t = 5000)]
        small_contacts: usize,
    },
    /// A rebuild under a live projector, API and client, then FLUSHALL and the heal (section
    /// "Rebuild and heal"). FLUSHALL empties the whole Redis.
    Rebuild {
        #[arg(long, default_value_t = 1_000_000)]
        contacts: usize,
    },
    /// The board page in headless Chromium and the cost of its polls (section "The board page").
    Page {
        #[arg(long, default_value_t = 1_000_000)]
        contacts: usize,
        #[arg(long, default_value_t = 60)]
        idle_seconds: u64,
    },
    /// The many-org shape: `seed --profile saas` scaled by `--scale`, ingest, first boards per size
    /// class, a sweep of every org's index board, boards per class, fair sharing (section
    /// "Many orgs").
    Saas {
        /// Multiplies every group's contacts (1: 1 x 1M + 20 x 50k + 2,000 x 500 + 10,000 x 20).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        #[arg(long, env = "BENCH_SECONDS", default_value_t = 8)]
        seconds: u64,
        /// The API's INDEX_MEMORY_LIMIT (its default when absent).
        #[arg(long)]
        index_memory_limit: Option<String>,
        /// Other groups than the profile's (`seed --sizes`, e.g. `1x1000000,5x50000,50x500`).
        #[arg(long)]
        sizes: Option<crate::seed::OrgSizes>,
    },
    /// One Redis against the stack's Redis Cluster: ingest and boards (section "Redis Cluster").
    Cluster {
        /// Contacts per org (6 orgs).
        #[arg(long, default_value_t = 50_000)]
        contacts: usize,
        #[arg(long, env = "BENCH_SECONDS", default_value_t = 10)]
        seconds: u64,
        #[arg(long, env = "REDIS_CLUSTER_URL", default_value = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002")]
        cluster_url: String,
    },
}

impl Scenario {
    /// The doc section it writes: marker and title.
    fn section(&self) -> (&'static str, &'static str) {
        match self {
            Scenario::Scale { .. } => ("latest-run", "Latest run"),
            Scenario::Rebuild { .. } => ("rebuild-run", "Rebuild and heal"),
            Scenario::Page { .. } => ("board-run", "The board page"),
            Scenario::Cluster { .. } => ("cluster-run", "Redis Cluster"),
            Scenario::Saas { .. } => ("saas-run", "Many orgs"),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Scenario::Scale { .. } => "scale",
            Scenario::Rebuild { .. } => "rebuild",
            Scenario::Page { .. } => "page",
            Scenario::Cluster { .. } => "cluster",
            Scenario::Saas { .. } => "saas",
        }
    }
}

/// `bench run`: the scenario in its own sandbox; the sandbox removed however the run ends (an
/// error, Ctrl-C or SIGTERM included).
async fn run_scenario(args: RunArgs) -> anyhow::Result<()> {
    let mut run = harness::BenchRun::start(args.scenario.name(), args.keep).await?;
    let command = format!("pipeline-board bench run {}", std::env::args().skip_while(|a| a != "run").skip(1).collect::<Vec<_>>().join(" "));
    // Not in the report: names of a run are not results.
    eprintln!("sandbox: {}", run.sandbox.name);
    let mut terminated = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        r = run_in(&mut run, &args.scenario, &command) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminated.recv() => Err(anyhow::anyhow!("terminated")),
    };
    let written = match (&result, args.no_doc) {
        (Ok(()), false) => {
            let (marker, title) = args.scenario.section();
            run.report.write_into(&args.doc, marker, title, &command)
        }
        _ => Ok(()),
    };
    run.finish().await;
    result.and(written)
}

async fn run_in(run: &mut harness::BenchRun, scenario: &Scenario, command: &str) -> anyhow::Result<()> {
    run.report.line(harness::machine_line(&mut run.redis().await?).await);
    run.report.line(format!("== command: {command}"));
    match scenario.clone() {
        Scenario::Scale { contacts, seconds, raw_seconds, freshness_seconds, small_contacts } => {
            let durations = scale::Durations { wrk: seconds, raw: raw_seconds, freshness: freshness_seconds };
            scale::run(run, (contacts, small_contacts), durations).await
        }
        Scenario::Rebuild { contacts } => rebuild::run(run, contacts).await,
        Scenario::Page { contacts, idle_seconds } => page::run(run, contacts, idle_seconds).await,
        Scenario::Cluster { contacts, seconds, cluster_url } => cluster::run(run, contacts, seconds, &cluster_url).await,
        Scenario::Saas { scale, seconds, index_memory_limit, sizes } => saas::run(run, scale, sizes, seconds, index_memory_limit).await,
    }
}

/// Whether `name` is a `bench run` sandbox's (`<scenario>-<pid>-<random>`), or one of the key
/// spaces a run adds to it (`-s`, `-c`, `-c2`: the cluster run's; `-rawwrites`).
fn is_sandbox_name(name: &str) -> bool {
    let name = ["-rawwrites", "-c2", "-s", "-c"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name);
    let mut parts = name.split('-');
    let scenario = parts.next().unwrap_or_default();
    let numbers: Vec<&str> = parts.collect();
    ["scale", "rebuild", "page", "cluster", "saas"].contains(&scenario)
        && numbers.len() == 2
        && numbers.iter().all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether a topic belongs to a `bench run` sandbox (`<sandbox>.crm.<name>`).
fn is_bench_topic(topic: &str) -> bool {
    topic.split_once(".crm.").is_some_and(|(sandbox, _)| is_sandbox_name(sandbox))
}

/// Whether a key belongs to a `bench run` sandbox (`bench:<sandbox>:...`).
fn is_bench_key(key: &str) -> bool {
    key.strip_prefix("bench:").and_then(|k| k.split(':').next()).is_some_and(is_sandbox_name)
}

/// Whether a MongoDB database belongs to a `bench run` sandbox (`bench<sandbox with _>`).
fn is_bench_database(db: &str) -> bool {
    db.strip_prefix("bench").is_some_and(|rest| !rest.contains('-') && is_sandbox_name(&rest.replace('_', "-")))
}

/// What interrupted runs left: keys (on the Redis and, if it answers, the cluster), databases,
/// topics. Run it while no benchmark runs (a running one's sandbox looks the same).
async fn clean() -> anyhow::Result<()> {
    let stack = crate::sandbox::Stack::from_env();
    let cluster =
        std::env::var("REDIS_CLUSTER_URL").unwrap_or_else(|_| "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002".into());
    let mut keys = 0;
    for url in [stack.redis_url.as_str(), cluster.as_str()] {
        let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(10), board_redis::config::redis_connection(url)).await else {
            continue;
        };
        let left: Vec<String> = conn.scan_match("bench:*").await?.into_iter().filter(|k| is_bench_key(k)).collect();
        conn.unlink(&left).await?;
        keys += left.len();
    }
    let client = mongodb::Client::with_uri_str(&stack.mongo_uri).await?;
    let mut databases = 0;
    for name in client.list_database_names().await?.into_iter().filter(|n| is_bench_database(n)) {
        client.database(&name).drop().await?;
        databases += 1;
    }
    let brokers = stack.brokers.clone();
    let topics: Vec<String> = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create()?;
        let md = c.fetch_metadata(None, Duration::from_secs(10))?;
        Ok(md.topics().iter().map(|t| t.name().to_string()).filter(|t| is_bench_topic(t)).collect())
    })
    .await??;
    if !topics.is_empty() {
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.brokers).create()?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        admin.delete_topics(&names, &rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))).await?;
    }
    println!("removed {keys} keys, {databases} databases, {} topics", topics.len());
    Ok(())
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Run(args) => run_scenario(args).await?,
        BenchCommand::Clean => clean().await?,
        BenchCommand::KafkaRead { kafka } => {
            let (messages, bytes, secs) = tokio::task::spawn_blocking(move || kafka_read(&kafka)).await??;
            println!(
                "kafka read: {messages} messages, {:.1} MB in {secs:.2} s = {:.0} messages/s",
                bytes as f64 / 1e6,
                messages as f64 / secs.max(1e-9)
            );
        }
        BenchCommand::RedisWrites { redis, org, cards, events_per_card } => redis_writes(&redis, &org, cards, events_per_card).await?,
        BenchCommand::Board { redis, org, user, body, conns, seconds, simplest } => {
            board(&redis, &org, &user, &body, conns, Duration::from_secs(seconds), simplest).await?
        }
        BenchCommand::Canned { listen, bytes } => {
            let body = axum::body::Bytes::from(vec![b' '; bytes]);
            let app = axum::Router::new().route("/api/contacts", axum::routing::post(move || std::future::ready(body.clone())));
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            axum::serve(listener, app).await?;
        }
        BenchCommand::Freshness { kafka, redis, api, org, token, probe_org, probe_token, rate, query_rate, seconds } => {
            freshness(&kafka, &redis, &api, (&org, &token), (&probe_org, &probe_token), rate, query_rate, Duration::from_secs(seconds))
                .await?
        }
        BenchCommand::MongoVsProjection { redis, mongo, org, user, n, bodies } => {
            mongo_vs_projection(&redis, &mongo, &org, &user, n, &bodies).await?
        }
    }
    Ok(())
}

/// p50, p99, max and rate of a closed-loop run.
fn summary(mut lat: Vec<Duration>, elapsed: Duration) -> String {
    lat.sort();
    let at = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or_default();
    let ms = |d: Duration| format!("{:.3}ms", d.as_secs_f64() * 1e3);
    format!(
        "p50 {} p99 {} max {} rps {:.0} (n {})",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(lat.last().copied().unwrap_or_default()),
        lat.len() as f64 / elapsed.as_secs_f64(),
        lat.len()
    )
}

async fn reader(redis: &RedisArgs) -> anyhow::Result<ProjectionReader> {
    let conn = board_redis::config::redis_connection(&redis.url()).await?;
    Ok(ProjectionReader::new(conn, KeySpace::new(&redis.redis_prefix), Duration::from_secs(30)))
}

fn query(body: &str) -> anyhow::Result<BoardQuery> {
    Ok(ContactsRequest::parse(body.as_bytes())?.into_query()?)
}

/// The board plan the API would make for `q`, from the projection's pipelines.
async fn board_plan(reader: &ProjectionReader, org: &str, q: &BoardQuery) -> anyhow::Result<board_api::query::board::BoardPlan> {
    let pipelines = reader.pipelines(org).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(board_api::query::board::plan(&pipelines, q)?)
}

async fn board(redis: &RedisArgs, org: &str, user: &str, body: &str, conns: usize, length: Duration, simplest: bool) -> anyhow::Result<()> {
    let reader = Arc::new(reader(redis).await?);
    let q = Arc::new(query(body)?);
    let now = chrono::Utc::now().timestamp_millis();
    // The index's answer, computed once: its CPU work is not Redis work.
    let (_, pages, _) = reader.pages(org, user, &q, now).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let pages: Arc<Vec<IndexBucket>> = Arc::new(pages);
    let simplest_keys = if simplest { Some(Arc::new(simplest_board_keys(&reader, redis, org, &q).await?)) } else { None };
    let mut conn = board_redis::config::redis_connection(&redis.url()).await?;
    let cards_key = Arc::new(KeySpace::new(&redis.redis_prefix).live_org(&mut conn, org).await?.cards(q.kind));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (reader, q, pages, simplest_keys, org, user) =
            (reader.clone(), q.clone(), pages.clone(), simplest_keys.clone(), org.to_string(), user.to_string());
        let (mut conn, cards_key) = (conn.clone(), cards_key.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while started.elapsed() < length {
                let t = Instant::now();
                match &simplest_keys {
                    Some(stages) => simplest_board(&mut conn, stages, &cards_key).await?,
                    None => {
                        reader.redis_work(&org, &user, &q, Some(&pages)).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    }
                }
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    println!("{}", summary(all, started.elapsed()));
    Ok(())
}

/// The plain sorted set of each stage of the board's pipeline (all its cards).
async fn simplest_board_keys(reader: &ProjectionReader, redis: &RedisArgs, org: &str, q: &BoardQuery) -> anyhow::Result<Vec<String>> {
    let mut conn = board_redis::config::redis_connection(&redis.url()).await?;
    let keys = KeySpace::new(&redis.redis_prefix).live_org(&mut conn, org).await?;
    let plan = board_plan(reader, org, q).await?;
    Ok(plan.buckets.iter().filter_map(|b| plan.raw_keys(b).first().map(|rk| keys.stage(q.kind, rk))).collect())
}

async fn simplest_board(conn: &mut board_redis::redis_conn::RedisConn, stages: &[String], cards_key: &str) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    for s in stages {
        pipe.cmd("ZRANGE").arg(s).arg(0).arg(24).arg("REV").cmd("ZCARD").arg(s);
    }
    let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let ids: Vec<String> =
        replies.into_iter().step_by(2).flat_map(|v| redis::from_redis_value::<Vec<String>>(v).unwrap_or_default()).collect();
    if !ids.is_empty() {
        let _: Vec<Option<Vec<u8>>> = redis::cmd("HMGET").arg(cards_key).arg(&ids).query_async(conn).await?;
    }
    Ok(())
}

async fn redis_writes(redis: &RedisArgs, org: &str, cards: usize, events_per_card: f64) -> anyhow::Result<()> {
    let mut conn = board_redis::config::redis_connection(&redis.url()).await?;
    let keys = KeySpace::new(&redis.redis_prefix).live_org(&mut conn, org).await?;
    let scratch = KeySpace::new(format!("{}-rawwrites", redis.redis_prefix)).org(org);
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    let mut cursor = 0u64;
    while records.len() < cards {
        let (next, chunk): (u64, Vec<(String, Vec<u8>)>) =
            redis::cmd("HSCAN").arg(keys.cards(CardKind::Contact)).arg(cursor).arg("COUNT").arg(5000).query_async(&mut conn).await?;
        records.extend(chunk);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    records.truncate(cards);
    let states: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
        .arg(keys.contact_states())
        .arg(records.iter().map(|(id, _)| id).collect::<Vec<_>>())
        .query_async(&mut conn)
        .await?;
    // Build every round trip first: the measurement is Redis taking the writes.
    let mut pipes = Vec::new();
    let mut ops = 0usize;
    for (chunk, states) in records.chunks(1000).zip(states.chunks(1000)) {
        let mut pipe = redis::pipe();
        for ((id, bytes), state) in chunk.iter().zip(states) {
            let rec = CardRecord::decode(bytes)?;
            for (key, score) in index_entries(&scratch, CardKind::Contact, &rec) {
                pipe.cmd("ZADD").arg(key).arg(board_redis::functions::score_arg(score)).arg(id).ignore();
                ops += 1;
            }
            pipe.cmd("HSET").arg(scratch.cards(CardKind::Contact)).arg(id).arg(bytes).ignore();
            ops += 1;
            if let Some(s) = state {
                pipe.cmd("HSET").arg(scratch.contact_states()).arg(id).arg(s).ignore();
                ops += 1;
            }
        }
        pipes.push(pipe);
    }
    let started = Instant::now();
    for pipe in &pipes {
        pipe.query_async::<()>(&mut conn).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "raw redis writes: {} cards ({ops} HSET/ZADD) in {secs:.2} s = {:.0} cards/s, {:.0} ops/s = {:.0} events/s at {events_per_card:.2} events per card",
        records.len(),
        records.len() as f64 / secs,
        ops as f64 / secs,
        records.len() as f64 * events_per_card / secs
    );
    let names = conn.scan_match(&format!("{}-rawwrites:*", redis.redis_prefix)).await?;
    conn.unlink(&names).await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn freshness(
    kafka: &KafkaArgs,
    redis: &RedisArgs,
    api: &str,
    (org, token): (&str, &str),
    (probe_org, probe_token): (&str, &str),
    rate: u64,
    query_rate: u64,
    length: Duration,
) -> anyhow::Result<()> {
    let topics = kafka.topics.clone();
    let producer: FutureProducer = projector::KafkaConnection::from_args(kafka)?.client_config(&[("linger.ms", "1")]).create()?;
    let mut conn = board_redis::config::redis_connection(&redis.url()).await?;
    let keys = KeySpace::new(&redis.redis_prefix);
    let (_, records): (u64, Vec<(String, Vec<u8>)>) = redis::cmd("HSCAN")
        .arg(keys.live_org(&mut conn, org).await?.cards(CardKind::Contact))
        .arg(0)
        .arg("COUNT")
        .arg(2000)
        .query_async(&mut conn)
        .await?;
    let contact_ids: Vec<String> = records.into_iter().map(|(id, _)| id).collect();
    anyhow::ensure!(!contact_ids.is_empty(), "org {org} has no contacts in the projection");
    // The probe card goes to the first column of the probe org's board.
    let plan = board_plan(&reader(redis).await?, probe_org, &query("{}")?).await?;
    let pipeline = plan.pipeline.clone();
    let stage = plan.buckets.first().and_then(|b| b.stage.clone()).ok_or_else(|| anyhow::anyhow!("probe org {probe_org}: no stage"))?;
    let stage_name = stage.name.clone().unwrap_or_default();
    let http = reqwest::Client::new();
    let url = format!("{api}/api/contacts");
    let started = Instant::now();

    // Background ingest: messages to the big org's contacts at `rate`/s.
    let load = {
        let (producer, topic, org, ids) = (producer.clone(), topics.topic_messages.clone(), org.to_string(), contact_ids.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let per_tick = (rate / 100).max(1);
            let mut n = 0u64;
            while started.elapsed() < length {
                tick.tick().await;
                for _ in 0..per_tick {
                    n += 1;
                    let cid = &ids[(n as usize * 7919) % ids.len()];
                    let now = chrono::Utc::now();
                    let ev = serde_json::json!({"type": "message.created", "eventId": format!("fresh-{n}-{}", now.timestamp_nanos_opt().unwrap_or_default()),
                        "orgId": org, "occurredAt": board_model::time::format_millis(now.timestamp_millis()),
                        "message": {"_id": format!("{:024x}", (now.timestamp_nanos_opt().unwrap_or_default() as u128) << 8 | (n as u128 & 0xff)),
                            "orgId": org, "contactId": cid, "direction": "inbound", "createdAt": board_model::time::format_millis(now.timestamp_millis())}});
                    let payload = serde_json::to_vec(&ev).expect("json");
                    let _ = producer.send_result(FutureRecord::to(&topic).key(cid.as_str()).payload(&payload));
                }
            }
            n
        })
    };
    // Background queries at `query_rate`/s: the big org's unfiltered board.
    let queries = {
        let (http, url, token) = (http.clone(), url.clone(), token.to_string());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / query_rate.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let (mut ok, mut failed) = (0u64, 0u64);
            let inflight = Arc::new(tokio::sync::Semaphore::new(64));
            while started.elapsed() < length {
                tick.tick().await;
                let Ok(permit) = inflight.clone().try_acquire_owned() else {
                    failed += 1;
                    continue;
                };
                let req = http.post(&url).bearer_auth(&token).body("{\"size\":25}").send();
                tokio::spawn(async move {
                    let _ = req.await;
                    drop(permit);
                });
                ok += 1;
            }
            (ok, failed)
        })
    };
    // Probes.
    let mut seen = Vec::new();
    let mut version = chrono::Utc::now().timestamp_millis();
    let probe_id = format!("{:024x}", 0xfeedu64 << 32 | (version as u64 & 0xffff_ffff));
    while started.elapsed() < length {
        version += 1;
        let marker = format!("probe{version}");
        let doc = serde_json::json!({"_id": probe_id, "orgId": probe_org, "firstName": marker, "pipelineId": pipeline.id, "pipelineStage": stage.id,
            "createdAt": "2099-01-01T00:00:00.000Z", "version": version});
        let ev = serde_json::json!({"type": "contact.upserted", "eventId": marker, "orgId": probe_org, "occurredAt": board_model::time::format_millis(version), "contact": doc});
        let payload = serde_json::to_vec(&ev)?;
        let sent = Instant::now();
        producer
            .send(FutureRecord::to(&topics.topic_contacts).key(probe_id.as_str()).payload(&payload), Duration::from_secs(5))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        loop {
            let body = serde_json::json!({"size": 1, "stages": [stage_name]}).to_string();
            let answer: serde_json::Value = http.post(&url).bearer_auth(probe_token).body(body).send().await?.json().await?;
            let first = answer["data"][&stage_name]["contacts"][0]["firstName"].as_str().unwrap_or_default().to_string();
            if first == marker {
                seen.push(sent.elapsed());
                break;
            }
            if sent.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("probe {marker} not visible after 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let produced = load.await?;
    let (queried, skipped) = queries.await?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "freshness under {:.0} events/s and {:.0} boards/s (skipped {skipped}): produce -> visible in the API {}",
        produced as f64 / elapsed,
        queried as f64 / elapsed,
        summary(seen, started.elapsed()).split(" rps").next().unwrap_or_default()
    );
    Ok(())
}

async fn mongo_vs_projection(
    redis: &RedisArgs,
    mongo: &MongoArgs,
    org: &str,
    user: &str,
    n: usize,
    bodies: &[String],
) -> anyhow::Result<()> {
    let reader = reader(redis).await?;
    let db = board_mongo::connect(&mongo.mongodb_uri, &mongo.mongodb_db).await?;
    let mongo_reader = MongoReader::new(db, board_api::query::mongo_path::DEFAULT_MAX_IDS);
    let now = chrono::Utc::now().timestamp_millis();
    for body in bodies {
        let q = query(body)?;
        let (mut p, mut m) = (Vec::new(), Vec::new());
        let mut totals = (0, 0);
        for _ in 0..n {
            let t = Instant::now();
            let (a, _) = reader.answer(org, user, &q, now).await.map_err(|e| anyhow::anyhow!("projection: {e}"))?;
            p.push(t.elapsed());
            let t = Instant::now();
            let b = mongo_reader.answer(org, user, &q, now).await.map_err(|e| anyhow::anyhow!("mongodb: {e:?}"))?;
            m.push(t.elapsed());
            anyhow::ensure!(a == b, "the two paths answered {body} differently");
            totals = (a.buckets.iter().map(|b| b.total).sum::<u64>(), b.buckets.len());
        }
        p.sort();
        m.sort();
        let (pm, mm) = (p[p.len() / 2], m[m.len() / 2]);
        println!(
            "{body}: projection p50 {:.2} ms, mongodb p50 {:.1} ms: {:.0}x ({} cards match in {} buckets, identical answers)",
            pm.as_secs_f64() * 1e3,
            mm.as_secs_f64() * 1e3,
            mm.as_secs_f64() / pm.as_secs_f64().max(1e-9),
            totals.0,
            totals.1
        );
    }
    Ok(())
}

fn kafka_read(kafka: &KafkaArgs) -> anyhow::Result<(u64, u64, f64)> {
    let topics = kafka.topics.inputs();
    let kafka = projector::KafkaConnection::from_args(kafka)?;
    let group = format!("bench-read-{}", std::process::id());
    let consumer: BaseConsumer = kafka.client_config(&[("group.id", &group), ("enable.auto.commit", "false")]).create()?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    for ((topic, partition), (low, end)) in projector::progress::watermarks(&kafka, &topics)? {
        remaining += end - low;
        tpl.add_partition_offset(&topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let (mut messages, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    while (messages as i64) < remaining {
        match consumer.poll(Duration::from_secs(5)) {
            Some(Ok(m)) => {
                messages += 1;
                bytes += m.payload().map(|p| p.len()).unwrap_or(0) as u64;
            }
            Some(Err(e)) => anyhow::bail!("kafka: {e}"),
            None => anyhow::bail!("no message for 5 s with {} left", remaining - messages as i64),
        }
    }
    Ok((messages, bytes, started.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_bench_sandboxes_are_cleaned() {
        use super::{is_bench_database, is_bench_key, is_bench_topic};
        assert!(is_bench_topic("scale-123-456.crm.contacts"));
        assert!(is_bench_topic("cluster-1-2.crm.dlq"));
        assert!(!is_bench_topic("crm.contacts"));
        assert!(!is_bench_topic("pipeline-source-1-2.crm.contacts"), "a test's sandbox");
        assert!(!is_bench_topic("scale-x-2.crm.contacts"));
        assert!(!is_bench_topic("scale-1-2.other"));
        assert!(is_bench_key("bench:scale-1-2:{64f0a1b2c3d4e5f6a7b8c9d1}:cards:contact"));
        assert!(is_bench_key("bench:cluster-1-2-c2:state"));
        assert!(is_bench_key("bench:scale-1-2-rawwrites:{o}:cards:contact"));
        assert!(!is_bench_key("bench:mine:state"), "a user's own prefix named bench");
        assert!(!is_bench_key("t:scale-1-2:state"));
        assert!(is_bench_database("benchscale_12_34"));
        assert!(!is_bench_database("benchmarks"));
        assert!(!is_bench_database("tscale_12_34"));
    }
}
