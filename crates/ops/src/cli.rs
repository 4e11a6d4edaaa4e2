//! The operator subcommands, each owning its flags; the binary flattens [`OpsCommand`] into its
//! own commands (`pipeline-board rebuild ...`) when built with the `ops` feature.
use crate::{seed, verify};
use board_model::keys::KeySpace;
use board_mongo::MongoArgs;
use board_redis::config::RedisArgs;
use clap::Subcommand;
use projector::config::KafkaArgs;
use projector::KafkaConnection;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Subcommand)]
pub enum OpsCommand {
    /// Build a new projection generation beside the live one and switch to it once caught up.
    Rebuild(crate::rebuild::RebuildArgs),
    /// Compare the projection with MongoDB; exit 0 only if there is no drift.
    Verify(VerifyArgs),
    /// Write a generated, realistic data set to MongoDB and as events to Kafka.
    Seed(SeedCommand),
    /// Dead letters: list them, show one, replay them into their topics once the cause is fixed.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Raw baselines for the benchmarks (deploy/bench.sh).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Print a Redis key's name (for scripts: they never spell keys themselves).
    Keys(crate::keys::KeysArgs),
}

pub async fn run(cmd: OpsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        OpsCommand::Rebuild(args) => {
            if let Some(report) = crate::rebuild::run(args).await? {
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
        OpsCommand::Seed(args) => {
            if args.if_empty {
                let db = board_mongo::connect(&args.mongo.mongodb_uri, &args.mongo.mongodb_db).await?;
                let orgs = board_mongo::org_ids(&db).await?;
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
            println!("{}", r.summary(started.elapsed()));
            for org in &r.org_ids {
                println!("org {org}");
            }
            Ok(ExitCode::SUCCESS)
        }
        OpsCommand::Verify(args) => {
            let db = board_mongo::connect(&args.mongo.mongodb_uri, &args.mongo.mongodb_db).await?;
            let mut conn = board_redis::config::redis_connection(&args.redis.url()).await?;
            let keys = KeySpace::new(&args.redis.redis_prefix);
            let report = verify::verify(&mut conn, &keys, &db, &args.orgs).await?;
            println!("{}", report.summary());
            for s in &report.samples {
                println!("  drift: {s}");
            }
            Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        OpsCommand::Dlq(cmd) => dlq(cmd).await,
        OpsCommand::Keys(args) => {
            println!("{}", crate::keys::name(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        OpsCommand::Bench(cmd) => {
            crate::bench::run(cmd).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    mongo: MongoArgs,
    /// Orgs to verify (default: every org in MongoDB).
    #[arg(long = "org")]
    orgs: Vec<String>,
}

#[derive(clap::Args)]
pub struct SeedCommand {
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

#[derive(Subcommand)]
pub enum DlqCommand {
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
pub struct DlqArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    select: crate::dlq::Selection,
}

impl DlqArgs {
    /// The selected dead letters of the topic and of the parked stream, oldest first.
    async fn letters(&self) -> anyhow::Result<(KafkaConnection, board_redis::redis_conn::RedisConn, Vec<crate::dlq::DeadLetter>)> {
        let kafka = KafkaConnection::from_args(&self.kafka)?;
        let (k, topic) = (kafka.clone(), self.kafka.topics.topic_dlq.clone());
        let mut all = tokio::task::spawn_blocking(move || crate::dlq::read_topic(&k, &topic)).await??;
        let mut conn = board_redis::config::redis_connection(&self.redis.url()).await?;
        all.extend(crate::dlq::read_parked(&mut conn, &KeySpace::new(&self.redis.redis_prefix).parked_dead_letters()).await?);
        all.retain(|d| self.select.matches(d));
        Ok((kafka, conn, all))
    }
}

async fn dlq(cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    let at = |d: &crate::dlq::DeadLetter| d.at.map(board_model::time::format_millis).unwrap_or_else(|| "-".into());
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
            let r = crate::dlq::replay(&kafka, &mut conn, &set, &inputs, &letters, dry_run).await?;
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
