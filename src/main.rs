//! The `pipeline-board` binary: one subcommand per job (CONTRACT.md section 4). It dispatches;
//! the work lives in the crates (README "Layout"): `serve` in board-api, `project` and `lag` in
//! the projector (`consumers/`), the operator commands in board-ops (feature `ops`, default on).
mod telemetry;

use anyhow::Context;
use board_model::keys::KeySpace;
use board_redis::config::RedisArgs;
use clap::{Parser, Subcommand};
use projector::config::KafkaArgs;
use projector::{progress, KafkaConnection, ProjectorSettings, RunCounters};
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
    Serve(board_api::http::ServeArgs),
    /// The Kafka consumer that keeps the Redis projection current (run N of them: one group).
    Project(ProjectArgs),
    /// How far the projection is behind Kafka, per partition.
    Lag(LagArgs),
    /// Print an HS256 bearer token (demo, load tests).
    Token(TokenArgs),
    /// The operator commands: rebuild, verify, seed, dlq, bench (not in a serving-only build).
    #[cfg(feature = "ops")]
    #[command(flatten)]
    Ops(board_ops::cli::OpsCommand),
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
    #[arg(long, env = "MAX_EVENT_BYTES", default_value_t = projector::projector::DEFAULT_MAX_EVENT_BYTES)]
    max_event_bytes: usize,
    /// Most dead letters parked in Redis when the dead-letter topic refuses them; at the cap the
    /// batch holding the next one is retried (its partitions wait) instead of dropping anything.
    #[arg(long, env = "DLQ_PARKED_MAX", default_value_t = projector::dead_letter::DEFAULT_PARKED_MAX)]
    parked_max: u64,
    /// Milliseconds to wait for more events before applying a partial batch.
    #[arg(long, env = "PROJECT_LINGER_MS", default_value_t = 5)]
    linger_ms: u64,
    /// Kafka group session timeout in milliseconds (short: fast failover and joins).
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 6000)]
    session_timeout_ms: u64,
    /// Milliseconds this projector may hold no partition while events wait and nobody applies
    /// them before it makes a new consumer (librdkafka can leave a consumer out of its group
    /// after the coordinator restarts). Never less than twice `max.poll.interval.ms` (5 session
    /// timeouts): a rebalance may take that long. Doubles with each stall in a row. 0: no watch.
    #[arg(long, env = "KAFKA_GROUP_STALL_MS", default_value_t = projector::group_watch::DEFAULT_STALL_AFTER.as_millis() as u64)]
    group_stall_ms: u64,
    /// Stop once every input partition is applied up to its high watermark (benchmarks, backfills).
    #[arg(long)]
    exit_when_caught_up: bool,
    /// Where Prometheus scrapes the projector's metrics ("" turns it off).
    #[arg(long, env = "PROJECT_METRICS_ADDR", default_value = "127.0.0.1:9898")]
    metrics_addr: String,
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
        board_api::metrics_setup::prometheus_builder().with_http_listener(addr).install().context("starting the metrics endpoint")?;
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
    settings.group_stall_after = Duration::from_millis(args.group_stall_ms);
    settings.parked_max = args.parked_max;
    let counters = Arc::new(RunCounters::default());
    let started = Instant::now();
    projector::run(settings, counters.clone(), shutdown_signal()).await?;
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
            let app = board_api::http::Application::build(&args).await?;
            let addr = app.local_addr();
            tracing::info!(%addr, metrics_addr = ?app.metrics_addr(), "serving");
            // The first stdout line names the bound address (LISTEN_ADDR may use port 0).
            println!("listening on {addr}");
            app.run(shutdown_signal()).await?;
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Project(args) => project(args).await,
        #[cfg(feature = "ops")]
        Command::Ops(cmd) => board_ops::cli::run(cmd).await,
        Command::Token(args) => {
            println!("{}", board_api::http::auth::sign_hs256(args.jwt_secret.as_bytes(), &args.user, &args.org, args.ttl));
            Ok(ExitCode::SUCCESS)
        }
        Command::Lag(args) => {
            let mut conn = board_redis::config::redis_connection(&args.redis.url()).await?;
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
    crate::telemetry::init(&cli.log_format);
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
