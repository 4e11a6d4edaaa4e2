//! `pipeline-board rebuild`: builds a new projection generation beside the live one while the
//! API keeps answering from the live one, switches each org to it once it holds every event the
//! live one holds, and removes the old generation's keys after a grace period.
//!
//! Phases, each recorded in Redis (`KeySpace::rebuild_state`) so a rebuild killed at any point
//! resumes on the next run:
//! 1. `snapshot` (source `mongodb` only): the partitions' ends are taken first, then every org's
//!    documents are applied as upserts; the org's applied offsets are set to those ends.
//! 2. `replay`: the topics from the source's offsets (beginning, `--from` time, or the ends taken
//!    before the snapshot) into the new generation, until the ends measured while replaying.
//! 3. `switch`: per org, `pb_switch` (atomic in the org's hash slot) moves the generation
//!    pointer if the new generation's applied offsets are at least the current one's; an org
//!    still behind (the live projector applied newer events meanwhile) is retried after more
//!    replay. The live projectors' commits are guarded by the pointer, so none is written past.
//! 4. `cleanup`: after `--grace-ms` (reads that resolved the old generation finish), the old
//!    generation's keys of every switched org are unlinked.
//!
//! The live generation is never written by a rebuild: until the switch the new generation's keys
//! are invisible to readers, and after it the live projectors write there themselves.
mod coverage;

use anyhow::{bail, Context};
use board_model::events::{parse_event, Event};
use board_model::keys::{Generation, KeySpace};
use board_model::model::CardKind;
use board_model::offsets::{self, missing_history, Checkpoint};
use board_mongo::MongoArgs;
use board_redis::config::RedisArgs;
use board_redis::functions::{fcall, lease, load_library, switch_cmd, Commit, SwitchOutcome};
use board_redis::rebuild_state::{field, OrgField, RebuildPhase};
use board_redis::redis_conn::RedisConn;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use projector::apply::{Position, RedisApplier, Target};
use projector::config::KafkaArgs;
use projector::{progress, KafkaConnection};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use redis::AsyncCommands;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The topics, from their beginning (or from `--from`).
    Topics,
    /// A snapshot of MongoDB, then the topics from the offsets taken before the snapshot began
    /// (for topics whose retention no longer holds the whole history).
    Mongodb,
}

#[derive(clap::Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub mongo: MongoArgs,
    #[arg(long, value_enum, default_value = "topics")]
    pub source: Source,
    /// Replay the topics from this time (RFC 3339) instead of their beginning: the offsets of
    /// the first records at or after it (Kafka's offsets-for-times). The new generation starts
    /// empty, so this fits topics that hold every document's latest state from that time on; an
    /// org whose new generation lacks a record of its live one is not switched (`coverage`).
    #[arg(long)]
    pub from: Option<String>,
    /// Rebuild only these orgs (repeatable); default every org.
    #[arg(long = "org")]
    pub orgs: Vec<String>,
    /// Say what would be done, do nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Discard an unfinished earlier rebuild instead of resuming it.
    #[arg(long)]
    pub restart: bool,
    /// How long reads that resolved the old generation may still use it after the switch,
    /// before its keys are removed (longer than the API's request timeout).
    #[arg(long, env = "REBUILD_GRACE_MS", default_value_t = 10_000)]
    pub grace_ms: u64,
    /// Most events applied in one Redis round trip.
    #[arg(long, env = "PROJECT_MAX_BATCH", default_value_t = 2000)]
    pub max_batch: usize,
    /// Where Prometheus scrapes the rebuild's progress ("" turns it off).
    #[arg(long, env = "REBUILD_METRICS_ADDR", default_value = "127.0.0.1:9899")]
    pub metrics_addr: String,
}

/// How long a rebuild's lease lives without renewal: a killed rebuild blocks the next one at
/// most this long.
pub const LEASE_MS: u64 = 15_000;

/// Where a rebuild reads from, as its plan records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlanSource {
    /// The topics from their beginning.
    Topics,
    /// The topics from the first offsets at or after this time (millis).
    TopicsFrom(i64),
    /// A MongoDB snapshot, then the topics from the ends taken before it.
    Mongodb,
}

impl PlanSource {
    fn of(source: Source, from: Option<i64>) -> Self {
        match (source, from) {
            (Source::Mongodb, _) => PlanSource::Mongodb,
            (Source::Topics, Some(t)) => PlanSource::TopicsFrom(t),
            (Source::Topics, None) => PlanSource::Topics,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "topics" => Some(PlanSource::Topics),
            "mongodb" => Some(PlanSource::Mongodb),
            _ => s.strip_prefix("topics-from:")?.parse().ok().map(PlanSource::TopicsFrom),
        }
    }

    /// The phase a new rebuild from this source starts in.
    fn first_phase(self) -> RebuildPhase {
        match self {
            PlanSource::Mongodb => RebuildPhase::Snapshot,
            PlanSource::Topics | PlanSource::TopicsFrom(_) => RebuildPhase::Replay,
        }
    }
}

impl std::fmt::Display for PlanSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanSource::Topics => f.write_str("topics"),
            PlanSource::TopicsFrom(t) => write!(f, "topics-from:{t}"),
            PlanSource::Mongodb => f.write_str("mongodb"),
        }
    }
}

/// What a rebuild is, as kept in Redis (resumed by the next run when it has the same source
/// and orgs).
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    generation: Generation,
    source: PlanSource,
    /// Comma-separated, sorted; "" = every org.
    orgs: String,
    phase: RebuildPhase,
    started: i64,
}

impl Plan {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            (field::GENERATION, self.generation.name().to_string()),
            (field::SOURCE, self.source.to_string()),
            (field::ORGS, self.orgs.clone()),
            (field::PHASE, self.phase.name().to_string()),
            (field::STARTED, self.started.to_string()),
        ]
    }
    fn from_hash(h: &HashMap<String, String>) -> Option<Plan> {
        Some(Plan {
            generation: Generation::parse(h.get(field::GENERATION)?)?,
            source: PlanSource::parse(h.get(field::SOURCE)?)?,
            orgs: h.get(field::ORGS).cloned().unwrap_or_default(),
            phase: RebuildPhase::parse(h.get(field::PHASE)?)?,
            started: h.get(field::STARTED).and_then(|s| s.parse().ok()).unwrap_or_default(),
        })
    }
    fn org_filter(&self) -> BTreeSet<String> {
        self.orgs.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
    }
}

/// What a finished rebuild reports.
#[derive(Debug, Default)]
pub struct Report {
    pub generation: String,
    pub resumed: bool,
    pub snapshot_documents: u64,
    pub events_read: u64,
    pub events_applied: u64,
    pub orgs_switched: usize,
    /// Orgs left on their live generation: the replay started after some of their events
    /// (`--from`), so the new generation cannot hold everything the live one does.
    pub orgs_refused: Vec<String>,
    pub keys_removed: usize,
    pub replay_seconds: f64,
    pub total_seconds: f64,
    pub switch_seconds: f64,
}

impl Report {
    pub fn summary(&self) -> String {
        format!(
            "rebuilt generation {} ({}): {} snapshot documents, {} events read ({} applied) in {:.1} s of replay ({:.0} events/s); \
             {} orgs switched in {:.3} s; {} keys of old generations removed; {:.1} s in all",
            self.generation,
            if self.resumed { "resumed" } else { "new" },
            self.snapshot_documents,
            self.events_read,
            self.events_applied,
            self.replay_seconds,
            self.events_read as f64 / self.replay_seconds.max(1e-9),
            self.orgs_switched,
            self.switch_seconds,
            self.keys_removed,
            self.total_seconds
        )
    }
}

pub async fn run(args: RebuildArgs) -> anyhow::Result<Option<Report>> {
    if args.source == Source::Mongodb && args.from.is_some() {
        bail!(
            "--from replays the topics from a time; --source mongodb replays them from the offsets taken before its snapshot: choose one"
        );
    }
    for org in &args.orgs {
        anyhow::ensure!(board_model::model::is_object_id(org), "--org {org:?} is not an ObjectId");
    }
    let from = args
        .from
        .as_deref()
        .map(|t| board_model::time::parse_rfc3339(t).ok_or_else(|| anyhow::anyhow!("--from {t:?} is not an RFC 3339 time")))
        .transpose()?;
    let keys = KeySpace::new(&args.redis.redis_prefix);
    let kafka = KafkaConnection::from_args(&args.kafka)?;
    let topics = args.kafka.topics.inputs();
    let mut conn = board_redis::config::redis_connection(&args.redis.url()).await?;
    load_library(&mut conn).await?;
    let mut orgs = args.orgs.clone();
    orgs.sort();
    orgs.dedup();
    let wanted_source = PlanSource::of(args.source, from);
    let previous: HashMap<String, String> = conn.hgetall(keys.rebuild_state()).await?;
    let previous = Plan::from_hash(&previous);
    let holder: Option<String> = conn.get(keys.rebuild_lease()).await?;
    if let Some(h) = &holder {
        bail!("{}", running_message(h, previous.as_ref()));
    }
    let resume = previous.clone().filter(|p| !args.restart && p.source == wanted_source && p.orgs == orgs.join(","));
    let resume = resume.as_ref();

    if args.dry_run {
        let marks = progress::fetch_watermarks(&kafka, &topics).await?;
        match resume {
            Some(p) => {
                println!("would resume generation {} (phase {}, source {}) from the offsets it holds", p.generation, p.phase, p.source)
            }
            None => {
                if let Some(p) = &previous {
                    println!(
                        "would discard the unfinished generation {} (source {}, phase {}) and its keys of unswitched orgs",
                        p.generation, p.source, p.phase
                    );
                }
                println!("would build a new generation from {wanted_source}");
            }
        }
        println!("orgs: {}", if orgs.is_empty() { "all".to_string() } else { orgs.join(", ") });
        let starts = match (resume, wanted_source) {
            (Some(p), _) => {
                let held: HashMap<String, i64> = conn.hgetall(keys.progress(&progress_group(&p.generation))).await?;
                marks.keys().map(|(t, p)| held.get(&offsets::field(t, *p)).copied().unwrap_or(0)).collect::<Vec<_>>()
            }
            (None, PlanSource::Mongodb) => marks.values().map(|(_, high)| *high).collect(),
            (None, PlanSource::TopicsFrom(t)) => offsets_for_time(&kafka, &marks, t)?.iter().map(|(_, o)| *o).collect(),
            (None, PlanSource::Topics) => marks.values().map(|(low, _)| *low).collect(),
        };
        let start_map: Checkpoint = marks.keys().cloned().zip(starts.iter().copied()).collect();
        // A resumed run continues from offsets it applied up to: only records below them matter.
        let missing = missing_history(&marks, &start_map, resume.is_some() || args.source == Source::Mongodb);
        let mut total = 0;
        for (((t, p), (_, high)), start) in marks.iter().zip(starts) {
            println!("  {t}/{p}: offsets {start}..{high} ({} events)", (high - start).max(0));
            total += (high - start).max(0);
        }
        println!("{total} events to replay{}", if args.source == Source::Mongodb { " after the MongoDB snapshot" } else { "" });
        if let Err(e) = refuse_missing_history(&missing) {
            println!("would refuse: {e}");
            return Ok(None);
        }
        println!(
            "then: switch each org whose new generation holds every event its current one holds, wait {} ms, remove the old generations' keys",
            args.grace_ms
        );
        return Ok(None);
    }

    let run_id = format!("{}:{}:{:08x}", hostname(), std::process::id(), rand::random::<u32>());
    let acquired: Option<String> =
        redis::cmd("SET").arg(keys.rebuild_lease()).arg(&run_id).arg("NX").arg("PX").arg(LEASE_MS).query_async(&mut conn).await?;
    if acquired.is_none() {
        let h: Option<String> = conn.get(keys.rebuild_lease()).await?;
        bail!("{}", running_message(h.as_deref().unwrap_or("?"), previous.as_ref()));
    }
    let lease_lost = Arc::new(AtomicBool::new(false));
    let renewal = tokio::spawn(renew_lease(conn.clone(), keys.clone(), run_id.clone(), lease_lost.clone()));
    let ctx = RunContext { args: &args, keys: &keys, kafka: &kafka, topics: &topics, lease_lost: &lease_lost };
    let start = Start { resume: resume.is_some(), previous, orgs: &orgs, source: wanted_source };
    let result = rebuild(&ctx, &mut conn, start).await;
    renewal.abort();
    let _: redis::RedisResult<i64> = fcall(&mut conn, &lease::release_cmd(&keys.rebuild_lease(), &run_id)).await;
    result.map(Some)
}

fn running_message(holder: &str, plan: Option<&Plan>) -> String {
    let what = plan
        .map(|p| {
            format!(
                "generation {}, source {}, orgs {}, phase {}, started {}",
                p.generation,
                p.source,
                if p.orgs.is_empty() { "all" } else { &p.orgs },
                p.phase,
                board_model::time::format_millis(p.started)
            )
        })
        .unwrap_or_else(|| "starting".into());
    format!(
        "another rebuild is running ({holder}: {what}); one rebuild runs at a time. If that process is gone, its lease ends {} s after its last renewal: run again then.",
        LEASE_MS / 1000
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "host".into())
}

async fn renew_lease(mut conn: RedisConn, keys: KeySpace, run_id: String, lost: Arc<AtomicBool>) {
    let renew = lease::renew_cmd(&keys.rebuild_lease(), &run_id, LEASE_MS);
    loop {
        tokio::time::sleep(Duration::from_millis(LEASE_MS / 3)).await;
        match fcall::<i64, _>(&mut conn, &renew).await {
            Ok(0) => {
                warn!("the rebuild's lease is gone (redis lost it, or it expired): stopping");
                lost.store(true, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "lease not renewed"),
        }
    }
}

fn refuse_missing_history(missing: &[String]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "the topics no longer hold every record this rebuild would replay ({}): no org is switched, since the new generation \
         would miss events the live one holds; run `pipeline-board rebuild --source mongodb`",
        missing.join(", ")
    )
}

fn progress_group(g: &Generation) -> String {
    format!("rebuild-{}", g.name())
}

/// The first offset at or after `time` of every partition (its end when nothing is that late).
fn offsets_for_time(kafka: &KafkaConnection, marks: &BTreeMap<(String, i32), (i64, i64)>, time: i64) -> anyhow::Result<Checkpoint> {
    let consumer: rdkafka::consumer::BaseConsumer = kafka.client_config(&[("group.id", "pipeline-board-rebuild")]).create()?;
    let mut tpl = TopicPartitionList::new();
    for (t, p) in marks.keys() {
        tpl.add_partition_offset(t, *p, Offset::Offset(time))?;
    }
    let found = consumer.offsets_for_times(tpl, Duration::from_secs(30))?;
    let mut out = Checkpoint::default();
    for e in found.elements() {
        let (low, high) = marks[&(e.topic().to_string(), e.partition())];
        let offset = match e.offset() {
            Offset::Offset(o) => o.max(low),
            _ => high,
        };
        out.set(e.topic(), e.partition(), offset);
    }
    Ok(out)
}

/// What every phase of one rebuild run needs.
struct RunContext<'a> {
    args: &'a RebuildArgs,
    keys: &'a KeySpace,
    kafka: &'a KafkaConnection,
    topics: &'a [String],
    lease_lost: &'a AtomicBool,
}

/// How this run begins: the plan Redis holds (if any), whether it is resumed, what was asked.
struct Start<'a> {
    previous: Option<Plan>,
    resume: bool,
    orgs: &'a [String],
    source: PlanSource,
}

/// The phase machine: each phase runs, then the plan moves to the next one and Redis records
/// it, so a run killed anywhere resumes in the phase it was in.
async fn rebuild(ctx: &RunContext<'_>, conn: &mut RedisConn, start: Start<'_>) -> anyhow::Result<Report> {
    let started = Instant::now();
    if !ctx.args.metrics_addr.is_empty() {
        let addr: std::net::SocketAddr = ctx.args.metrics_addr.parse().context("--metrics-addr")?;
        if let Err(e) = board_api::metrics_setup::prometheus_builder().with_http_listener(addr).install() {
            warn!(error = %e, "rebuild metrics endpoint not started");
        }
    }
    let resumed = start.resume;
    let plan = begin(ctx, conn, start).await?;
    let applier =
        RedisApplier::connect(&ctx.args.redis.url(), ctx.keys.clone()).await?.with_target(Target::Building(plan.generation.clone()));
    let mut run = Phases {
        ctx,
        filter: plan.org_filter(),
        report: Report { generation: plan.generation.to_string(), resumed, ..Report::default() },
        plan,
        applier,
        replay: None,
    };
    loop {
        RebuildPhase::show(Some(run.plan.phase));
        let next = match run.plan.phase {
            RebuildPhase::Snapshot => run.snapshot(conn).await?,
            RebuildPhase::Replay => run.replay(conn).await?,
            RebuildPhase::Switch => run.switch(conn).await?,
            RebuildPhase::Cleanup => run.cleanup(conn).await?,
            RebuildPhase::Done => break,
        };
        run.plan.phase = next;
    }
    let mut report = run.report;
    report.total_seconds = started.elapsed().as_secs_f64();
    info!(summary = report.summary(), "rebuild finished");
    Ok(report)
}

/// The plan of this run: the resumed one, or a new one recorded with its replay's start (after
/// checking the topics still hold what the replay needs, and discarding an unfinished earlier
/// rebuild that is not resumed).
async fn begin(ctx: &RunContext<'_>, conn: &mut RedisConn, start: Start<'_>) -> anyhow::Result<Plan> {
    let keys = ctx.keys;
    let marks = progress::fetch_watermarks(ctx.kafka, ctx.topics).await?;
    if let (true, Some(p)) = (start.resume, &start.previous) {
        // Replayed from the offsets it holds: the topics must still hold what follows them
        // (a snapshot still in its snapshot phase replays from the ends it took).
        if p.phase <= RebuildPhase::Replay {
            let held: BTreeMap<String, i64> = conn.hgetall(keys.progress(&progress_group(&p.generation))).await?;
            let starts = marks.keys().map(|(t, q)| ((t.clone(), *q), held.get(&offsets::field(t, *q)).copied().unwrap_or(0))).collect();
            refuse_missing_history(&missing_history(&marks, &starts, true))?;
        }
        info!(generation = %p.generation, phase = %p.phase, "resuming the unfinished rebuild");
        return Ok(p.clone());
    }
    // The replay's start, checked against what the topics still hold before anything is
    // discarded or written.
    let starts: Checkpoint = match start.source {
        PlanSource::Mongodb => marks.iter().map(|(k, (_, high))| (k.clone(), *high)).collect(),
        PlanSource::TopicsFrom(t) => offsets_for_time(ctx.kafka, &marks, t)?,
        PlanSource::Topics => marks.iter().map(|(k, (low, _))| (k.clone(), *low)).collect(),
    };
    refuse_missing_history(&missing_history(&marks, &starts, start.source == PlanSource::Mongodb))?;
    if let Some(p) = &start.previous {
        let removed = discard(conn, keys, p).await?;
        info!(generation = %p.generation, removed, "discarded the unfinished rebuild");
    }
    let plan = Plan {
        generation: Generation::numbered(board_model::time::now_millis() as u64),
        source: start.source,
        orgs: start.orgs.join(","),
        phase: start.source.first_phase(),
        started: board_model::time::now_millis(),
    };
    // The replay's start: recorded before anything is written, so a rerun knows it.
    let fields = starts.fields();
    let mut pipe = redis::pipe();
    pipe.atomic().del(keys.rebuild_state()).hset_multiple(keys.rebuild_state(), &plan.fields());
    // Kept for the switch: an org whose events in a partition all precede the start can never
    // be caught up by this generation.
    let start_fields: BTreeMap<String, i64> = fields.iter().cloned().collect();
    pipe.hset(keys.rebuild_state(), field::STARTS, serde_json::to_string(&start_fields)?);
    pipe.del(keys.progress(&progress_group(&plan.generation)));
    if !fields.is_empty() {
        pipe.hset_multiple(keys.progress(&progress_group(&plan.generation)), &fields);
    }
    pipe.query_async::<()>(conn).await?;
    info!(generation = %plan.generation, source = %plan.source, orgs = %plan.orgs, "rebuild started");
    Ok(plan)
}

/// One run's phases and what they share.
struct Phases<'a> {
    ctx: &'a RunContext<'a>,
    plan: Plan,
    /// The orgs asked for (empty: every org).
    filter: BTreeSet<String>,
    report: Report,
    applier: RedisApplier,
    /// The replay of the topics, made when a phase first needs it (the replay and the switch,
    /// which replays more for orgs still behind).
    replay: Option<Replay>,
}

impl Phases<'_> {
    /// Records the phase the run moves to.
    async fn enter(&self, conn: &mut RedisConn, phase: RebuildPhase) -> anyhow::Result<RebuildPhase> {
        let _: () = conn.hset(self.ctx.keys.rebuild_state(), field::PHASE, phase.name()).await?;
        Ok(phase)
    }

    async fn replay_ready(&mut self, conn: &RedisConn) -> anyhow::Result<&mut Replay> {
        if self.replay.is_none() {
            let (ctx, plan) = (self.ctx, &self.plan);
            let replay =
                Replay::new(ctx.kafka, ctx.keys, &plan.generation, ctx.topics, conn.clone(), self.filter.clone(), ctx.args.max_batch)
                    .await?;
            self.replay = Some(replay);
        }
        Ok(self.replay.as_mut().expect("made above"))
    }

    /// `--source mongodb`: every org's documents applied as upserts.
    async fn snapshot(&mut self, conn: &mut RedisConn) -> anyhow::Result<RebuildPhase> {
        let (ctx, keys) = (self.ctx, self.ctx.keys);
        let db = board_mongo::connect(&ctx.args.mongo.mongodb_uri, &ctx.args.mongo.mongodb_db).await?;
        let snapshot_orgs: Vec<String> =
            if self.filter.is_empty() { board_mongo::org_ids(&db).await? } else { self.filter.iter().cloned().collect() };
        let held: BTreeMap<String, i64> = conn.hgetall(keys.progress(&progress_group(&self.plan.generation))).await?;
        let bar = bar(snapshot_orgs.len() as u64, "snapshot: orgs");
        for org in &snapshot_orgs {
            ensure_not_lost(ctx.lease_lost)?;
            self.report.snapshot_documents +=
                snapshot_org(&db, &mut self.applier, keys, &self.plan.generation, org, &held, ctx.args.max_batch).await?;
            let _: () = conn.sadd(keys.rebuild_orgs(&self.plan.generation), org).await?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        info!(orgs = snapshot_orgs.len(), documents = self.report.snapshot_documents, "snapshot applied");
        self.enter(conn, RebuildPhase::Replay).await
    }

    /// The topics replayed into the new generation up to their ends.
    async fn replay(&mut self, conn: &mut RedisConn) -> anyhow::Result<RebuildPhase> {
        let replay_started = Instant::now();
        self.replay_more(conn).await?;
        self.report.replay_seconds = replay_started.elapsed().as_secs_f64();
        self.enter(conn, RebuildPhase::Switch).await
    }

    async fn replay_more(&mut self, conn: &mut RedisConn) -> anyhow::Result<()> {
        let lease_lost = self.ctx.lease_lost;
        self.replay_ready(conn).await?;
        let replay = self.replay.as_mut().expect("made above");
        replay.until_caught_up(&mut self.applier, conn, lease_lost, &mut self.report).await
    }

    /// Each org's generation pointer moved, org by org, once the new generation holds every
    /// event its live one holds (replaying more for orgs still behind).
    async fn switch(&mut self, conn: &mut RedisConn) -> anyhow::Result<RebuildPhase> {
        let (ctx, keys) = (self.ctx, self.ctx.keys);
        let generation = self.plan.generation.clone();
        let switch_started = Instant::now();
        let built: BTreeSet<String> = conn.smembers(keys.rebuild_orgs(&generation)).await?;
        // An org asked for by name that the replay met no event of has nothing in the new
        // generation: it keeps its live one, and the run says so.
        for org in self.filter.iter().filter(|o| !built.contains(*o)) {
            warn!(org, "org not switched: the replay met none of its events");
            self.report.orgs_refused.push(format!("{org} (no event from the replay's start on)"));
        }
        let mut pending: Vec<String> = built.into_iter().filter(|o| self.filter.is_empty() || self.filter.contains(o)).collect();
        let starts: Option<String> = conn.hget(keys.rebuild_state(), field::STARTS).await?;
        let starts: BTreeMap<String, i64> = starts.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
        // A replay from a time holds only documents with an event since then: each org's
        // documents are compared with its live generation's before its switch.
        let from_a_time = matches!(self.plan.source, PlanSource::TopicsFrom(_));
        let not_switched = |org: &str| (OrgField::NotSwitched(org.to_string()).name(), generation.name().to_string());
        for round in 0.. {
            ensure_not_lost(ctx.lease_lost)?;
            let mut behind = Vec::new();
            for org in pending {
                let current: Option<String> = conn.get(keys.generation_pointer(&org)).await?;
                let current = Generation::parse(current.as_deref().unwrap_or_default()).unwrap_or_default();
                if current == generation {
                    continue;
                }
                if from_a_time {
                    match coverage_check(conn, keys, &org, &current, &generation).await? {
                        // Behind: `pb_switch` answers so too (nothing writes the new
                        // generation during a round, and the live one only moves on), and its
                        // answer tells a partition replay can bring from one it cannot.
                        Coverage::Complete | Coverage::Behind => {}
                        Coverage::Lacks(missing) => {
                            warn!(org, %missing, "org not switched: the replay from the time lacks a document its live generation holds");
                            self.report.orgs_refused.push(format!(
                                "{org} (its live generation holds {missing}, which had no event since --from: use --source mongodb)"
                            ));
                            let _: () = conn.hset(keys.rebuild_state(), not_switched(&org).0, not_switched(&org).1).await?;
                            continue;
                        }
                    }
                }
                let reply: String = fcall(conn, &switch_cmd(keys, &org, &current, &generation)).await?;
                match SwitchOutcome::parse(&reply) {
                    Some(SwitchOutcome::Switched) => {
                        let _: () = conn.hset(keys.rebuild_state(), OrgField::Left(org.clone()).name(), current.name()).await?;
                        self.report.orgs_switched += 1;
                    }
                    Some(SwitchOutcome::Behind(field)) => {
                        // Behind on events before the replay's start (`--from`): no replay
                        // brings them; the org keeps its live generation.
                        let live: Option<i64> = conn.hget(keys.org_in(&current, &org).offsets(), &field).await?;
                        match (live, starts.get(&field)) {
                            (Some(live), Some(start)) if live <= *start => {
                                warn!(org, field, live, start, "org not switched: its events in this partition precede the replay's start");
                                self.report.orgs_refused.push(format!("{org} ({field}: events before offset {start})"));
                                // Its keys in the new generation go with the cleanup.
                                let _: () = conn.hset(keys.rebuild_state(), not_switched(&org).0, not_switched(&org).1).await?;
                            }
                            _ => behind.push(org),
                        }
                    }
                    Some(SwitchOutcome::Moved(_)) => behind.push(org),
                    None => bail!("unexpected pb_switch reply {reply:?}"),
                }
            }
            if behind.is_empty() {
                break;
            }
            if round >= 30 {
                bail!("{} orgs stay behind their live generation after 30 rounds of replay; run again to resume", behind.len());
            }
            // The live projectors applied events the new generation has not read yet.
            self.replay_more(conn).await?;
            pending = behind;
        }
        self.replay = None;
        self.report.switch_seconds = switch_started.elapsed().as_secs_f64();
        // A snapshot of every org made the projection whole where the topics could not.
        if self.plan.source == PlanSource::Mongodb && self.filter.is_empty() {
            let _: () = conn.hdel(keys.state(), "incomplete").await?;
        }
        let now = board_model::time::now_millis().to_string();
        let _: () = conn
            .hset_multiple(keys.rebuild_state(), &[(field::PHASE, RebuildPhase::Cleanup.name()), (field::SWITCHED_AT, now.as_str())])
            .await?;
        info!(generation = %generation, orgs = self.report.orgs_switched, seconds = self.report.switch_seconds, "switched");
        Ok(RebuildPhase::Cleanup)
    }

    /// The old generations' keys removed after the grace period (reads that resolved them
    /// finish first); then the rebuild's state.
    async fn cleanup(&mut self, conn: &mut RedisConn) -> anyhow::Result<RebuildPhase> {
        let (ctx, keys) = (self.ctx, self.ctx.keys);
        let switched_at: Option<i64> = conn.hget(keys.rebuild_state(), field::SWITCHED_AT).await?;
        let grace = ctx.args.grace_ms as i64;
        let wait = switched_at.map(|t| grace - (board_model::time::now_millis() - t)).unwrap_or(grace);
        if wait > 0 {
            info!(ms = wait, "waiting for reads of the old generation to finish");
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        let state: HashMap<String, String> = conn.hgetall(keys.rebuild_state()).await?;
        let old: HashMap<String, Generation> = state
            .iter()
            .filter_map(|(k, v)| Some((OrgField::parse(k)?, Generation::parse(v)?)))
            .filter(|(f, g)| matches!(f, OrgField::NotSwitched(_)) || *g != self.plan.generation)
            .map(|(f, g)| (f.org().to_string(), g))
            .collect();
        self.report.keys_removed = remove_org_generations(conn, keys, &old).await?;
        let mut pipe = redis::pipe();
        let generation = &self.plan.generation;
        pipe.del(keys.rebuild_orgs(generation)).del(keys.progress(&progress_group(generation))).del(keys.rebuild_state());
        pipe.query_async::<()>(conn).await?;
        RebuildPhase::show(Some(RebuildPhase::Done));
        Ok(RebuildPhase::Done)
    }
}

/// What the coverage check before a `--from` switch found.
enum Coverage {
    /// The new generation holds every document of the live one.
    Complete,
    /// It lacks one, but has not applied every event the live one has yet: replay on.
    Behind,
    /// It lacks one although it applied every event the live one has: the document's events all
    /// precede the replay's start, no replay brings it.
    Lacks(coverage::Missing),
}

async fn coverage_check(conn: &mut RedisConn, keys: &KeySpace, org: &str, live: &Generation, new: &Generation) -> anyhow::Result<Coverage> {
    let (live_keys, new_keys) = (keys.org_in(live, org), keys.org_in(new, org));
    let Some(missing) = coverage::first_missing(conn, &live_keys, &new_keys).await? else {
        return Ok(Coverage::Complete);
    };
    // Read after the scan: the live generation's offsets then cover every document it scanned,
    // so a new generation at or past them has applied those documents' events, if any.
    let live_offsets: HashMap<String, i64> = conn.hgetall(live_keys.offsets()).await?;
    let new_offsets: HashMap<String, i64> = conn.hgetall(new_keys.offsets()).await?;
    let caught_up = live_offsets.iter().all(|(field, o)| new_offsets.get(field).is_some_and(|n| n >= o));
    Ok(if caught_up { Coverage::Lacks(missing) } else { Coverage::Behind })
}

fn ensure_not_lost(lease_lost: &AtomicBool) -> anyhow::Result<()> {
    if lease_lost.load(Ordering::Relaxed) {
        bail!("the rebuild's lease was lost (redis lost its data, or this process stalled past {} s): run again", LEASE_MS / 1000);
    }
    Ok(())
}

/// A progress bar on a terminal; on anything else nothing is drawn (the structured logs and
/// the metrics say the same).
fn bar(len: u64, what: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:40}] {human_pos}/{human_len} {per_sec} eta {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Applies one org's MongoDB documents into the generation as upserts, then sets the org's
/// applied offsets to `held` (the ends taken before the snapshot began: every event below
/// them is reflected in the documents). Returns the number of documents.
async fn snapshot_org(
    db: &mongodb::Database,
    applier: &mut RedisApplier,
    keys: &KeySpace,
    generation: &Generation,
    org: &str,
    held: &BTreeMap<String, i64>,
    max_batch: usize,
) -> anyhow::Result<u64> {
    let snap = board_mongo::load_org(db, org).await?;
    let mut events: Vec<Event> = Vec::new();
    events.extend(snap.pipelines.into_iter().map(Event::PipelineUpserted));
    events.extend(snap.users.into_iter().map(Event::UserUpserted));
    events.extend(snap.contacts.into_iter().map(|c| Event::CardUpserted(CardKind::Contact, Box::new(c))));
    events.extend(snap.applications.into_iter().map(|c| Event::CardUpserted(CardKind::Application, Box::new(c))));
    events.extend(snap.conversations.into_iter().map(Event::ConversationUpserted));
    events.extend(snap.messages.into_iter().map(Event::MessageCreated));
    for chunk in events.chunks(max_batch.max(1)) {
        let refs: Vec<&Event> = chunk.iter().collect();
        // Snapshot documents have no offsets; the org's offsets are set once, below.
        let positions = vec![Position { topic: "", partition: -1, offset: -1 }; refs.len()];
        applier.apply(&refs, &positions).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let mut conn = applier.connection();
    let org_keys = keys.org_in(generation, org);
    let offsets: Vec<(String, i64)> = held.iter().map(|(f, o)| (f.clone(), *o)).collect();
    let commit = Commit { org: org_keys, guards: Vec::new(), writes: Vec::new(), generation: None, offsets, min_writes: None };
    let _: String = commit.to_cmd().query_async(&mut conn).await?;
    Ok(events.len() as u64)
}

/// The replay of the topics into the generation being built, from the progress it holds.
struct Replay {
    consumer: StreamConsumer,
    kafka: KafkaConnection,
    topics: Vec<String>,
    keys: KeySpace,
    generation: Generation,
    progress_key: String,
    filter: BTreeSet<String>,
    max_batch: usize,
    /// Next offset per partition (what is applied).
    position: Checkpoint,
}

impl Replay {
    async fn new(
        kafka: &KafkaConnection,
        keys: &KeySpace,
        generation: &Generation,
        topics: &[String],
        mut conn: RedisConn,
        filter: BTreeSet<String>,
        max_batch: usize,
    ) -> anyhow::Result<Replay> {
        let progress_key = keys.progress(&progress_group(generation));
        let held: HashMap<String, i64> = conn.hgetall(&progress_key).await?;
        // Taken again: a snapshot may have lasted long enough for retention to move the lows.
        let marks = progress::fetch_watermarks(kafka, topics).await?;
        let consumer: StreamConsumer = kafka
            .client_config(&[("group.id", "pipeline-board-rebuild"), ("enable.auto.commit", "false"), ("auto.offset.reset", "earliest")])
            .create()?;
        let mut tpl = TopicPartitionList::new();
        let mut position = Checkpoint::default();
        for ((t, p), (low, _)) in &marks {
            let at = held.get(&offsets::field(t, *p)).copied().unwrap_or(*low).max(*low);
            tpl.add_partition_offset(t, *p, Offset::Offset(at))?;
            position.set(t, *p, at);
        }
        consumer.assign(&tpl)?;
        Ok(Replay {
            consumer,
            kafka: kafka.clone(),
            topics: topics.to_vec(),
            keys: keys.clone(),
            generation: generation.clone(),
            progress_key,
            filter,
            max_batch,
            position,
        })
    }

    fn lag(&self, ends: &BTreeMap<(String, i32), (i64, i64)>) -> i64 {
        self.position.lag(ends)
    }

    /// Applies events until every partition is applied up to the ends measured now (and
    /// re-measured while it runs).
    async fn until_caught_up(
        &mut self,
        applier: &mut RedisApplier,
        conn: &mut RedisConn,
        lease_lost: &AtomicBool,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        let mut ends = progress::fetch_watermarks(&self.kafka, &self.topics).await?;
        let initial_lag = self.lag(&ends);
        let bar = bar(initial_lag as u64, "replay: events");
        let mut last_report = Instant::now();
        let started = Instant::now();
        let mut read_here = 0u64;
        while self.lag(&ends) > 0 {
            ensure_not_lost(lease_lost)?;
            let mut batch = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
            while batch.len() < self.max_batch {
                match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                    Ok(Ok(m)) => batch.push(m.detach()),
                    Ok(Err(e)) => {
                        warn!(error = %e, "kafka read error");
                        break;
                    }
                    Err(_) => break,
                }
            }
            let parsed: Vec<Option<Event>> =
                batch.iter().map(|m| m.payload().and_then(|p| parse_event(p).ok()).filter(|e| self.keep(e))).collect();
            let mut events = Vec::new();
            let mut positions = Vec::new();
            let mut orgs = BTreeSet::new();
            for (m, e) in batch.iter().zip(&parsed) {
                if let Some(e) = e {
                    orgs.insert(e.org_id().to_string());
                    events.push(e);
                    positions.push(Position { topic: m.topic(), partition: m.partition(), offset: m.offset() });
                }
            }
            let mut backoff = Duration::from_millis(100);
            let outcomes = loop {
                match applier.apply(&events, &positions).await {
                    Ok(o) => break o,
                    Err(e) => {
                        warn!(error = %e, "batch not applied; retrying");
                        ensure_not_lost(lease_lost)?;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            report.events_applied += outcomes.iter().filter(|o| **o == projector::batch::Outcome::Applied).count() as u64;
            report.events_read += batch.len() as u64;
            read_here += batch.len() as u64;
            for m in &batch {
                self.position.advance(m.topic(), m.partition(), m.offset());
            }
            // Recorded after the data (a rerun re-reads at most this batch, idempotently).
            let fields = self.position.fields();
            let mut pipe = redis::pipe();
            pipe.hset_multiple(&self.progress_key, &fields);
            if !orgs.is_empty() {
                pipe.sadd(self.keys.rebuild_orgs(&self.generation), orgs.iter().collect::<Vec<_>>());
            }
            pipe.query_async::<()>(conn).await?;
            bar.set_position(initial_lag.saturating_sub(self.lag(&ends)).max(0) as u64);
            if last_report.elapsed() > Duration::from_secs(2) {
                ends = progress::fetch_watermarks(&self.kafka, &self.topics).await?;
                let lag = self.lag(&ends);
                let rate = read_here as f64 / started.elapsed().as_secs_f64().max(1e-9);
                bar.set_length(bar.position() + lag as u64);
                bar.set_message(format!("lag {lag}"));
                metrics::gauge!("pb_rebuild_lag_events").set(lag as f64);
                metrics::gauge!("pb_rebuild_events_read").set(report.events_read as f64);
                metrics::gauge!("pb_rebuild_events_per_second").set(rate);
                let _: () = conn
                    .hset_multiple(
                        self.keys.rebuild_state(),
                        &[
                            (field::LAG, lag.to_string()),
                            (field::EVENTS_READ, report.events_read.to_string()),
                            (field::EVENTS_PER_SECOND, format!("{rate:.0}")),
                        ],
                    )
                    .await?;
                info!(generation = %self.generation, lag, events_read = report.events_read, events_per_second = rate as u64, "rebuild replay");
                last_report = Instant::now();
            }
        }
        bar.finish_and_clear();
        let _: () = conn.hset(self.keys.rebuild_state(), field::LAG, 0).await?;
        metrics::gauge!("pb_rebuild_lag_events").set(0.0);
        Ok(())
    }

    fn keep(&self, e: &Event) -> bool {
        self.filter.is_empty() || self.filter.contains(e.org_id())
    }
}

/// An unfinished rebuild that will not be resumed: the keys of its generation for every org it
/// did not switch, its bookkeeping, and the old generations of the orgs it did switch.
async fn discard(conn: &mut RedisConn, keys: &KeySpace, plan: &Plan) -> anyhow::Result<usize> {
    let built: BTreeSet<String> = conn.smembers(keys.rebuild_orgs(&plan.generation)).await?;
    let state: HashMap<String, String> = conn.hgetall(keys.rebuild_state()).await?;
    let mut remove: HashMap<String, Generation> = HashMap::new();
    for org in &built {
        let current: Option<String> = conn.get(keys.generation_pointer(org)).await?;
        if current.as_deref() != Some(plan.generation.name()) {
            remove.insert(org.clone(), plan.generation.clone());
        } else if let Some(old) = state.get(&OrgField::Left(org.clone()).name()).and_then(|g| Generation::parse(g)) {
            remove.insert(org.clone(), old);
        }
    }
    let removed = remove_org_generations(conn, keys, &remove).await?;
    let mut pipe = redis::pipe();
    pipe.del(keys.rebuild_orgs(&plan.generation)).del(keys.progress(&progress_group(&plan.generation))).del(keys.rebuild_state());
    pipe.query_async::<()>(conn).await?;
    Ok(removed)
}

/// Unlinks the keys of `(org, generation)` pairs, found in one SCAN of the prefix. The org's
/// generation pointer is never removed; a generation an org is still on is never removed.
pub async fn remove_org_generations(conn: &mut RedisConn, keys: &KeySpace, remove: &HashMap<String, Generation>) -> anyhow::Result<usize> {
    if remove.is_empty() {
        return Ok(0);
    }
    let orgs: Vec<&String> = remove.keys().collect();
    let gets = orgs.iter().map(|org| keys.generation_pointer(org)).map(|k| (k.clone(), redis::cmd("GET").arg(k).clone())).collect();
    let current: Vec<Option<String>> = conn.query_by_slot(gets).await?;
    let prefixes: Vec<String> = orgs
        .iter()
        .zip(current)
        .filter(|(org, cur)| cur.as_deref().unwrap_or_default() != remove[**org].name())
        .map(|(org, _)| format!("{}:", keys.org_in(&remove[*org], org).base))
        .collect();
    let pointers: BTreeSet<String> = orgs.iter().map(|o| keys.generation_pointer(o)).collect();
    // SCAN walks one node: `scan_match` asks every primary of a cluster.
    let names = conn.scan_match(&format!("{}:*", keys.prefix())).await?;
    let doomed: Vec<&String> = names.iter().filter(|k| !pointers.contains(*k) && prefixes.iter().any(|p| k.starts_with(p))).collect();
    for chunk in doomed.chunks(1000) {
        // A cluster client splits a multi-key UNLINK by slot.
        let _: () = redis::cmd("UNLINK").arg(chunk).query_async(conn).await?;
    }
    let removed = doomed.len();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            generation: Generation::parse("g1764547200000").unwrap(),
            source: PlanSource::TopicsFrom(1_764_547_200_000),
            orgs: "64f0a1b2c3d4e5f6a7b8c9d1,64f0a1b2c3d4e5f6a7b8c9d2".into(),
            phase: RebuildPhase::Replay,
            started: 1_764_547_200_000,
        }
    }

    #[test]
    fn a_plan_survives_redis_and_names_its_orgs() {
        let p = plan();
        let hash: HashMap<String, String> = p.fields().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(Plan::from_hash(&hash), Some(p.clone()));
        assert_eq!(p.org_filter().len(), 2);
        assert!(Plan { orgs: String::new(), ..p }.org_filter().is_empty(), "no orgs: every org");
        let mut broken = hash.clone();
        broken.insert("generation".into(), "g1:{x}".into());
        assert_eq!(Plan::from_hash(&broken), None, "a generation that is not one is not resumed");
        for source in [PlanSource::Topics, PlanSource::Mongodb, PlanSource::TopicsFrom(-5)] {
            assert_eq!(PlanSource::parse(&source.to_string()), Some(source));
        }
        let mut unknown = hash.clone();
        unknown.insert("phase".into(), "rewinding".into());
        assert_eq!(Plan::from_hash(&unknown), None, "a phase of another build is not resumed");
    }

    #[test]
    fn a_refused_rebuild_names_the_running_one() {
        let text = running_message("host:42:abcd", Some(&plan()));
        for part in ["host:42:abcd", "g1764547200000", "topics-from:1764547200000", "phase replay", "15 s"] {
            assert!(text.contains(part), "{part} missing from: {text}");
        }
    }

    #[test]
    fn a_replay_that_needs_trimmed_records_is_named_and_refused() {
        let marks: BTreeMap<(String, i32), (i64, i64)> =
            [(("c".to_string(), 0), (0, 10)), (("c".to_string(), 1), (4, 10)), (("m".to_string(), 0), (7, 9))].into();
        let from_low: Checkpoint = marks.iter().map(|(k, (low, _))| (k.clone(), *low)).collect();
        // From the topics' beginning: the trimmed partitions' earlier records are gone.
        assert_eq!(missing_history(&marks, &from_low, false), ["c/1 starts at 4, the replay at 4", "m/0 starts at 7, the replay at 7"]);
        // A snapshot's ends (or a resumed run's offsets) at or above the log start miss nothing.
        let ends: Checkpoint = marks.iter().map(|(k, (_, high))| (k.clone(), *high)).collect();
        assert!(missing_history(&marks, &ends, true).is_empty());
        // ... but a resumed replay whose offsets retention has passed does.
        let behind: Checkpoint = [(("c".to_string(), 0), 3), (("c".to_string(), 1), 2), (("m".to_string(), 0), 8)].into_iter().collect();
        assert_eq!(missing_history(&marks, &behind, true), ["c/1 starts at 4, the replay at 2"]);
        assert!(refuse_missing_history(&[]).is_ok());
        assert!(refuse_missing_history(&["c/1".into()]).unwrap_err().to_string().contains("--source mongodb"));
    }
}
