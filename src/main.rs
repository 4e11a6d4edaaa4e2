//! The `pipeline-board` binary: one subcommand per job (CONTRACT.md section 4).
use anyhow::Context;
use board_core::config::{KafkaArgs, MongoArgs, RedisArgs};
use board_core::keys::KeySpace;
use clap::{Parser, Subcommand};
use pipeline_board::consumers::{self, progress, KafkaConnection, ProjectorSettings, RunCounters};
use pipeline_board::{mongo, seed, verify};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The projector and the API allocate many small strings per event and per card: mimalloc
/// halves the time glibc's allocator took in the projector's profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "pipeline-board", version, about = "Fast pipeline boards from a Redis read model of CRM events")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The HTTP API (POST /api/contacts, /healthz, /readyz, /metrics, /openapi.json).
    Serve(pipeline_board::api::ServeArgs),
    /// The Kafka consumer that keeps the Redis projection current (run N of them: one group).
    Project(ProjectArgs),
    /// Build a new projection generation beside the live one and switch to it once caught up.
    Rebuild(pipeline_board::rebuild::RebuildArgs),
    /// Compare the projection with MongoDB; exit 0 only if there is no drift.
    Verify(VerifyArgs),
    /// Write a generated, realistic data set to MongoDB and as events to Kafka.
    Seed(SeedCommand),
    /// How far the projection is behind Kafka, per partition.
    Lag(LagArgs),
    /// Print an HS256 bearer token (demo, load tests).
    Token(TokenArgs),
    /// Dead letters: list them, show one, replay them into their topics once the cause is fixed.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Raw baselines for the benchmarks (deploy/bench.sh).
    #[command(subcommand)]
    Bench(pipeline_board::bench::BenchCommand),
}

#[derive(Subcommand)]
enum DlqCommand {
    /// One line per dead letter (topic and parked): id, time, origin, reason.
    List(DlqArgs),
    /// Everything about the selected dead letters, payload included.
    Show(DlqArgs),
    /// Re-produce the selected dead letters into their original topics (once each).
    Replay {
        #[command(flatten)]
        args: DlqArgs,
        /// Say what would be replayed, replay nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(clap::Args)]
struct DlqArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    select: pipeline_board::dlq::Selection,
}

impl DlqArgs {
    /// The selected dead letters of the topic and of the parked stream, oldest first.
    async fn letters(&self) -> anyhow::Result<(KafkaConnection, board_core::redis_conn::RedisConn, Vec<pipeline_board::dlq::DeadLetter>)> {
        let kafka = KafkaConnection::from_args(&self.kafka)?;
        let (k, topic) = (kafka.clone(), self.kafka.topics.topic_dlq.clone());
        let mut all = tokio::task::spawn_blocking(move || pipeline_board::dlq::read_topic(&k, &topic)).await??;
        let mut conn = board_core::config::redis_connection(&self.redis.url()).await?;
        all.extend(pipeline_board::dlq::read_parked(&mut conn, &KeySpace::new(&self.redis.redis_prefix).parked_dead_letters()).await?);
        all.retain(|d| self.select.matches(d));
        Ok((kafka, conn, all))
    }
}

async fn dlq(cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    let at = |d: &pipeline_board::dlq::DeadLetter| d.at.map(board_core::time::format_millis).unwrap_or_else(|| "-".into());
    match cmd {
        DlqCommand::List(args) => {
            let (_, _, letters) = args.letters().await?;
            for d in &letters {
                let reason: String = d.reason.chars().take(100).collect();
                println!("{}	{}	{}/{}/{}	{}	{reason}", d.id, at(d), d.origin_topic, d.origin_partition, d.origin_offset, d.code);
            }
            let parked = letters.iter().filter(|d| d.dlq_offset.is_none()).count();
            println!("{} dead letters ({} in the topic, {parked} parked in redis)", letters.len(), letters.len() - parked);
        }
        DlqCommand::Show(args) => {
            let (_, _, letters) = args.letters().await?;
            for d in &letters {
                println!(
                    "id: {}
time: {}
origin: {}/{}/{}
code: {}
reason: {}",
                    d.id,
                    at(d),
                    d.origin_topic,
                    d.origin_partition,
                    d.origin_offset,
                    d.code,
                    d.reason
                );
                println!(
                    "key: {}
payload ({} bytes):
{}
",
                    d.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
                    d.payload.len(),
                    String::from_utf8_lossy(&d.payload)
                );
            }
            if letters.is_empty() {
                eprintln!("no dead letter matches");
                return Ok(ExitCode::from(1));
            }
        }
        DlqCommand::Replay { args, dry_run } => {
            let (kafka, mut conn, letters) = args.letters().await?;
            let set = KeySpace::new(&args.redis.redis_prefix).replayed_dead_letters();
            let inputs = args.kafka.topics.inputs();
            let r = pipeline_board::dlq::replay(&kafka, &mut conn, &set, &inputs, &letters, dry_run).await?;
            println!(
                "{} {} dead letters into their topics; {} skipped (replayed before), {} skipped (no origin topic), {} skipped (origin not an input topic)",
                if dry_run { "would replay" } else { "replayed" },
                r.replayed,
                r.already,
                r.no_origin,
                r.not_an_input
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
struct TokenArgs {
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    #[arg(long)]
    org: String,
    #[arg(long)]
    user: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl: i64,
}

#[derive(clap::Args)]
struct ProjectArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "pipeline-board")]
    group_id: String,
    /// Most events applied in one Redis round trip.
    #[arg(long, env = "PROJECT_MAX_BATCH", default_value_t = 2000)]
    max_batch: usize,
    /// An event larger than this many bytes is dead-lettered (`too_large`) without being parsed.
    #[arg(long, env = "MAX_EVENT_BYTES", default_value_t = pipeline_board::consumers::projector::DEFAULT_MAX_EVENT_BYTES)]
    max_event_bytes: usize,
    /// Most dead letters parked in Redis when the dead-letter topic refuses them; at the cap the
    /// batch holding the next one is retried (its partitions wait) instead of dropping anything.
    #[arg(long, env = "DLQ_PARKED_MAX", default_value_t = pipeline_board::consumers::dead_letter::DEFAULT_PARKED_MAX)]
    parked_max: u64,
    /// Milliseconds to wait for more events before applying a partial batch.
    #[arg(long, env = "PROJECT_LINGER_MS", default_value_t = 5)]
    linger_ms: u64,
    /// Kafka group session timeout in milliseconds (short: fast failover and joins).
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 6000)]
    session_timeout_ms: u64,
    /// Stop once every input partition is applied up to its high watermark (benchmarks, backfills).
    #[arg(long)]
    exit_when_caught_up: bool,
    /// Where Prometheus scrapes the projector's metrics ("" turns it off).
    #[arg(long, env = "PROJECT_METRICS_ADDR", default_value = "127.0.0.1:9898")]
    metrics_addr: String,
}

#[derive(clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    mongo: MongoArgs,
    /// Orgs to verify (default: every org in MongoDB).
    #[arg(long = "org")]
    orgs: Vec<String>,
}

#[derive(clap::Args)]
struct SeedCommand {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    mongo: MongoArgs,
    #[command(flatten)]
    seed: seed::SeedArgs,
    /// Seed only if MongoDB holds no org yet (the demo: a second run keeps its data set).
    #[arg(long)]
    if_empty: bool,
}

#[derive(clap::Args)]
struct LagArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "pipeline-board")]
    group_id: String,
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested; finishing in-flight work");
}

async fn project(args: ProjectArgs) -> anyhow::Result<ExitCode> {
    if !args.metrics_addr.is_empty() {
        let addr: SocketAddr = args.metrics_addr.parse().context("--metrics-addr")?;
        pipeline_board::metrics_setup::prometheus_builder().with_http_listener(addr).install().context("starting the metrics endpoint")?;
    }
    let mut settings = ProjectorSettings::new(
        KafkaConnection::from_args(&args.kafka)?,
        &args.group_id,
        args.kafka.topics.clone(),
        &args.redis.url(),
        KeySpace::new(&args.redis.redis_prefix),
    );
    settings.max_batch = args.max_batch.max(1);
    settings.max_event_bytes = args.max_event_bytes.max(1);
    settings.linger = Duration::from_millis(args.linger_ms);
    settings.session_timeout = Duration::from_millis(args.session_timeout_ms);
    settings.exit_when_caught_up = args.exit_when_caught_up;
    settings.parked_max = args.parked_max;
    let counters = Arc::new(RunCounters::default());
    let started = Instant::now();
    consumers::run(settings, counters.clone(), shutdown_signal()).await?;
    let secs = started.elapsed().as_secs_f64();
    let applied = counters.get(&counters.applied);
    let stale = counters.get(&counters.stale);
    let dlq = counters.get(&counters.dead_lettered);
    tracing::info!(applied, stale, dead_lettered = dlq, seconds = secs, "projector finished");
    println!(
        "applied {applied}, stale/duplicate {stale}, dead-lettered {dlq} in {secs:.2} s ({:.0} events/s overall, {:.0} events/s from first to last batch)",
        (applied + stale + dlq) as f64 / secs.max(1e-9),
        counters.steady_rate().unwrap_or(0.0)
    );
    Ok(ExitCode::SUCCESS)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let app = pipeline_board::api::Application::build(&args).await?;
            let addr = app.local_addr();
            tracing::info!(%addr, metrics_addr = ?app.metrics_addr(), "serving");
            // The first stdout line names the bound address (LISTEN_ADDR may use port 0).
            println!("listening on {addr}");
            app.run(shutdown_signal()).await?;
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Rebuild(args) => {
            if let Some(report) = pipeline_board::rebuild::run(args).await? {
                println!("{}", report.summary());
                if !report.orgs_refused.is_empty() {
                    eprintln!(
                        "{} orgs not switched (they keep their live generation; rebuild them from the topics' beginning or with --source mongodb): {}",
                        report.orgs_refused.len(),
                        report.orgs_refused.join(", ")
                    );
                    return Ok(ExitCode::from(3));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Project(args) => project(args).await,
        Command::Seed(args) => {
            if args.if_empty {
                let db = mongo::connect(&args.mongo.mongodb_uri, &args.mongo.mongodb_db).await?;
                let orgs = mongo::org_ids(&db).await?;
                if !orgs.is_empty() {
                    println!("MongoDB database {:?} already holds {} orgs: nothing seeded", args.mongo.mongodb_db, orgs.len());
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let started = Instant::now();
            let r = seed::run(
                &args.seed,
                &KafkaConnection::from_args(&args.kafka)?,
                &args.kafka.topics,
                &args.mongo.mongodb_uri,
                &args.mongo.mongodb_db,
            )
            .await?;
            println!(
                "seeded {} orgs: {} contacts, {} applications, {} messages; {} events in {:.1} s",
                r.org_ids.len(),
                r.contacts,
                r.applications,
                r.messages,
                r.events,
                started.elapsed().as_secs_f64()
            );
            for org in &r.org_ids {
                println!("org {org}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => {
            let db = mongo::connect(&args.mongo.mongodb_uri, &args.mongo.mongodb_db).await?;
            let mut conn = board_core::config::redis_connection(&args.redis.url()).await?;
            let keys = KeySpace::new(&args.redis.redis_prefix);
            let report = verify::verify(&mut conn, &keys, &db, &args.orgs).await?;
            println!("{}", report.summary());
            for s in &report.samples {
                println!("  drift: {s}");
            }
            Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Dlq(cmd) => dlq(cmd).await,
        Command::Bench(cmd) => {
            pipeline_board::bench::run(cmd).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(args) => {
            println!("{}", pipeline_board::api::auth::sign_hs256(args.jwt_secret.as_bytes(), &args.user, &args.org, args.ttl));
            Ok(ExitCode::SUCCESS)
        }
        Command::Lag(args) => {
            let mut conn = board_core::config::redis_connection(&args.redis.url()).await?;
            let key = KeySpace::new(&args.redis.redis_prefix).progress(&args.group_id);
            let lag = progress::lag(&KafkaConnection::from_args(&args.kafka)?, &args.kafka.topics.inputs(), &mut conn, &key).await?;
            for ((topic, partition), (applied, high)) in &lag.partitions {
                println!("{topic}/{partition}\tapplied {applied}\thigh {high}\tlag {}", (high - applied).max(0));
            }
            println!("total lag {}", lag.total());
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    board_core::telemetry::init(&cli.log_format);
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
