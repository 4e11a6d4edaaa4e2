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
use board_model::offsets::{self, missing_history};
use board_mongo::MongoArgs;
use board_redis::config::RedisArgs;
use board_redis::functions::{load_library, switch_cmd, Commit, SwitchOutcome};
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

/// What a rebuild is, as kept in Redis (resumed by the next run when it has the same source
/// and orgs).
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    generation: Generation,
    /// `topics`, `topics-from:<millis>`, or `mongodb`.
    source: String,
    /// Comma-separated, sorted; "" = every org.
    orgs: String,
    phase: String,
    started: i64,
}

impl Plan {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("generation", self.generation.name().to_string()),
            ("source", self.source.clone()),
            ("orgs", self.orgs.clone()),
            ("phase", self.phase.clone()),
            ("started", self.started.to_string()),
        ]
    }
    fn from_hash(h: &HashMap<String, String>) -> Option<Plan> {
        Some(Plan {
            generation: Generation::parse(h.get("generation")?)?,
            source: h.get("source")?.clone(),
            orgs: h.get("orgs").cloned().unwrap_or_default(),
            phase: h.get("phase")?.clone(),
            started: h.get("started").and_then(|s| s.parse().ok()).unwrap_or_default(),
        })
    }
    fn org_filter(&self) -> BTreeSet<String> {
        self.orgs.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
    }
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
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
    let wanted_source = match (args.source, from) {
        (Source::Mongodb, _) => "mongodb".to_string(),
        (Source::Topics, Some(t)) => format!("topics-from:{t}"),
        (Source::Topics, None) => "topics".to_string(),
    };
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
        let starts = match (resume, args.source, from) {
            (Some(p), _, _) => {
                let held: HashMap<String, i64> = conn.hgetall(keys.progress(&progress_group(&p.generation))).await?;
                marks.keys().map(|(t, p)| held.get(&offsets::field(t, *p)).copied().unwrap_or(0)).collect::<Vec<_>>()
            }
            (None, Source::Mongodb, _) => marks.values().map(|(_, high)| *high).collect(),
            (None, Source::Topics, Some(t)) => offsets_for_time(&kafka, &marks, t)?.values().copied().collect(),
            (None, Source::Topics, None) => marks.values().map(|(low, _)| *low).collect(),
        };
        let start_map: BTreeMap<(String, i32), i64> = marks.keys().cloned().zip(starts.iter().copied()).collect();
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
    let result =
        rebuild(&args, &keys, &kafka, &topics, &mut conn, previous, resume.is_some(), &orgs, &wanted_source, from, &lease_lost).await;
    renewal.abort();
    let release = redis::Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0");
    let _: redis::RedisResult<i64> = release.key(keys.rebuild_lease()).arg(&run_id).invoke_async(&mut conn).await;
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
    let renew =
        redis::Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return -1");
    loop {
        tokio::time::sleep(Duration::from_millis(LEASE_MS / 3)).await;
        match renew.key(keys.rebuild_lease()).arg(&run_id).arg(LEASE_MS).invoke_async::<i64>(&mut conn).await {
            Ok(-1) => {
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
fn offsets_for_time(
    kafka: &KafkaConnection,
    marks: &BTreeMap<(String, i32), (i64, i64)>,
    time: i64,
) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    let consumer: rdkafka::consumer::BaseConsumer = kafka.client_config(&[("group.id", "pipeline-board-rebuild")]).create()?;
    let mut tpl = TopicPartitionList::new();
    for (t, p) in marks.keys() {
        tpl.add_partition_offset(t, *p, Offset::Offset(time))?;
    }
    let found = consumer.offsets_for_times(tpl, Duration::from_secs(30))?;
    let mut out = BTreeMap::new();
    for e in found.elements() {
        let (low, high) = marks[&(e.topic().to_string(), e.partition())];
        let offset = match e.offset() {
            Offset::Offset(o) => o.max(low),
            _ => high,
        };
        out.insert((e.topic().to_string(), e.partition()), offset);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn rebuild(
    args: &RebuildArgs,
    keys: &KeySpace,
    kafka: &KafkaConnection,
    topics: &[String],
    conn: &mut RedisConn,
    previous: Option<Plan>,
    resume: bool,
    orgs: &[String],
    source: &str,
    from: Option<i64>,
    lease_lost: &AtomicBool,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    if !args.metrics_addr.is_empty() {
        let addr: std::net::SocketAddr = args.metrics_addr.parse().context("--metrics-addr")?;
        if let Err(e) = board_api::metrics_setup::prometheus_builder().with_http_listener(addr).install() {
            warn!(error = %e, "rebuild metrics endpoint not started");
        }
    }
    let marks = progress::fetch_watermarks(kafka, topics).await?;
    let mut plan = match (resume, previous) {
        (true, Some(p)) => {
            // Replayed from the offsets it holds: the topics must still hold what follows them
            // (a snapshot still in its snapshot phase replays from the ends it took).
            if p.phase == "replay" || p.phase == "snapshot" {
                let held: BTreeMap<String, i64> = conn.hgetall(keys.progress(&progress_group(&p.generation))).await?;
                let starts = marks.keys().map(|(t, q)| ((t.clone(), *q), held.get(&offsets::field(t, *q)).copied().unwrap_or(0))).collect();
                refuse_missing_history(&missing_history(&marks, &starts, true))?;
            }
            info!(generation = %p.generation, phase = %p.phase, "resuming the unfinished rebuild");
            p
        }
        (_, previous) => {
            // The replay's start, checked against what the topics still hold before anything
            // is discarded or written.
            let starts: BTreeMap<(String, i32), i64> = match (args.source, from) {
                (Source::Mongodb, _) => marks.iter().map(|(k, (_, high))| (k.clone(), *high)).collect(),
                (Source::Topics, Some(t)) => offsets_for_time(kafka, &marks, t)?,
                (Source::Topics, None) => marks.iter().map(|(k, (low, _))| (k.clone(), *low)).collect(),
            };
            refuse_missing_history(&missing_history(&marks, &starts, args.source == Source::Mongodb))?;
            if let Some(p) = previous {
                let removed = discard(conn, keys, &p).await?;
                info!(generation = %p.generation, removed, "discarded the unfinished rebuild");
            }
            let plan = Plan {
                generation: Generation::numbered(now_millis() as u64),
                source: source.to_string(),
                orgs: orgs.join(","),
                phase: if args.source == Source::Mongodb { "snapshot".into() } else { "replay".into() },
                started: now_millis(),
            };
            // The replay's start: recorded before anything is written, so a rerun knows it.
            let fields: Vec<(String, i64)> = starts.iter().map(|((t, p), o)| (offsets::field(t, *p), *o)).collect();
            let mut pipe = redis::pipe();
            pipe.atomic().del(keys.rebuild_state()).hset_multiple(keys.rebuild_state(), &plan.fields());
            // Kept for the switch: an org whose events in a partition all precede the start can
            // never be caught up by this generation.
            let start_fields: BTreeMap<String, i64> = fields.iter().cloned().collect();
            pipe.hset(keys.rebuild_state(), "starts", serde_json::to_string(&start_fields)?);
            pipe.del(keys.progress(&progress_group(&plan.generation)));
            if !fields.is_empty() {
                pipe.hset_multiple(keys.progress(&progress_group(&plan.generation)), &fields);
            }
            pipe.query_async::<()>(conn).await?;
            info!(generation = %plan.generation, source, orgs = %plan.orgs, "rebuild started");
            plan
        }
    };
    let filter = plan.org_filter();
    let mut report = Report { generation: plan.generation.to_string(), resumed: resume, ..Report::default() };
    let mut applier = RedisApplier::connect(&args.redis.url(), keys.clone()).await?.with_target(Target::Building(plan.generation.clone()));
    set_phase_gauge(&plan.phase);

    if plan.phase == "snapshot" {
        let db = board_mongo::connect(&args.mongo.mongodb_uri, &args.mongo.mongodb_db).await?;
        let snapshot_orgs: Vec<String> =
            if filter.is_empty() { board_mongo::org_ids(&db).await? } else { filter.iter().cloned().collect() };
        let held: BTreeMap<String, i64> = conn.hgetall(keys.progress(&progress_group(&plan.generation))).await?;
        let bar = bar(snapshot_orgs.len() as u64, "snapshot: orgs");
        for org in &snapshot_orgs {
            ensure_not_lost(lease_lost)?;
            report.snapshot_documents += snapshot_org(&db, &mut applier, keys, &plan.generation, org, &held, args.max_batch).await?;
            let _: () = conn.sadd(keys.rebuild_orgs(&plan.generation), org).await?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        info!(orgs = snapshot_orgs.len(), documents = report.snapshot_documents, "snapshot applied");
        plan.phase = "replay".into();
        let _: () = conn.hset(keys.rebuild_state(), "phase", &plan.phase).await?;
        set_phase_gauge(&plan.phase);
    }

    let replay_started = Instant::now();
    let mut replay = Replay::new(kafka, keys, &plan.generation, topics, conn.clone(), filter.clone(), args.max_batch).await?;
    if plan.phase == "replay" {
        replay.until_caught_up(&mut applier, conn, lease_lost, &mut report).await?;
        plan.phase = "switch".into();
        let _: () = conn.hset(keys.rebuild_state(), "phase", &plan.phase).await?;
        set_phase_gauge(&plan.phase);
    }
    report.replay_seconds = replay_started.elapsed().as_secs_f64();

    if plan.phase == "switch" {
        let switch_started = Instant::now();
        let built: BTreeSet<String> = conn.smembers(keys.rebuild_orgs(&plan.generation)).await?;
        // An org asked for by name that the replay met no event of has nothing in the new
        // generation: it keeps its live one, and the run says so.
        for org in filter.iter().filter(|o| !built.contains(*o)) {
            warn!(org, "org not switched: the replay met none of its events");
            report.orgs_refused.push(format!("{org} (no event from the replay's start on)"));
        }
        let mut pending: Vec<String> = built.into_iter().filter(|o| filter.is_empty() || filter.contains(o)).collect();
        let starts: Option<String> = conn.hget(keys.rebuild_state(), "starts").await?;
        let starts: BTreeMap<String, i64> = starts.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
        // A replay from a time holds only documents with an event since then: each org's
        // documents are compared with its live generation's before its switch.
        let from_a_time = plan.source.starts_with("topics-from:");
        for round in 0.. {
            ensure_not_lost(lease_lost)?;
            let mut behind = Vec::new();
            for org in pending {
                let current: Option<String> = conn.get(keys.generation_pointer(&org)).await?;
                let current = Generation::parse(current.as_deref().unwrap_or_default()).unwrap_or_default();
                if current == plan.generation {
                    continue;
                }
                if from_a_time {
                    match coverage_check(conn, keys, &org, &current, &plan.generation).await? {
                        // Behind: `pb_switch` answers so too (nothing writes the new
                        // generation during a round, and the live one only moves on), and its
                        // answer tells a partition replay can bring from one it cannot.
                        Coverage::Complete | Coverage::Behind => {}
                        Coverage::Lacks(missing) => {
                            warn!(org, %missing, "org not switched: the replay from the time lacks a document its live generation holds");
                            report.orgs_refused.push(format!(
                                "{org} (its live generation holds {missing}, which had no event since --from: use --source mongodb)"
                            ));
                            let _: () = conn.hset(keys.rebuild_state(), format!("drop:{org}"), plan.generation.name()).await?;
                            continue;
                        }
                    }
                }
                let reply: String = switch_cmd(keys, &org, &current, &plan.generation).query_async(conn).await?;
                match SwitchOutcome::parse(&reply) {
                    Some(SwitchOutcome::Switched) => {
                        let _: () = conn.hset(keys.rebuild_state(), format!("old:{org}"), current.name()).await?;
                        report.orgs_switched += 1;
                    }
                    Some(SwitchOutcome::Behind(field)) => {
                        // Behind on events before the replay's start (`--from`): no replay
                        // brings them; the org keeps its live generation.
                        let live: Option<i64> = conn.hget(keys.org_in(&current, &org).offsets(), &field).await?;
                        match (live, starts.get(&field)) {
                            (Some(live), Some(start)) if live <= *start => {
                                warn!(org, field, live, start, "org not switched: its events in this partition precede the replay's start");
                                report.orgs_refused.push(format!("{org} ({field}: events before offset {start})"));
                                // Its keys in the new generation go with the cleanup.
                                let _: () = conn.hset(keys.rebuild_state(), format!("drop:{org}"), plan.generation.name()).await?;
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
            replay.until_caught_up(&mut applier, conn, lease_lost, &mut report).await?;
            pending = behind;
        }
        report.switch_seconds = switch_started.elapsed().as_secs_f64();
        // A snapshot of every org made the projection whole where the topics could not.
        if source == "mongodb" && filter.is_empty() {
            let _: () = conn.hdel(keys.state(), "incomplete").await?;
        }
        let _: () = conn.hset_multiple(keys.rebuild_state(), &[("phase", "cleanup"), ("switchedAt", &now_millis().to_string())]).await?;
        plan.phase = "cleanup".into();
        set_phase_gauge(&plan.phase);
        info!(generation = %plan.generation, orgs = report.orgs_switched, seconds = report.switch_seconds, "switched");
    }
    drop(replay);

    if plan.phase == "cleanup" {
        let switched_at: Option<i64> = conn.hget(keys.rebuild_state(), "switchedAt").await?;
        let wait = switched_at.map(|t| args.grace_ms as i64 - (now_millis() - t)).unwrap_or(args.grace_ms as i64);
        if wait > 0 {
            info!(ms = wait, "waiting for reads of the old generation to finish");
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        let state: HashMap<String, String> = conn.hgetall(keys.rebuild_state()).await?;
        let old: HashMap<String, Generation> = state
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("old:")?.to_string(), Generation::parse(v)?)))
            .filter(|(_, g)| *g != plan.generation)
            .chain(state.iter().filter_map(|(k, v)| Some((k.strip_prefix("drop:")?.to_string(), Generation::parse(v)?))))
            .collect();
        report.keys_removed = remove_org_generations(conn, keys, &old).await?;
        let mut pipe = redis::pipe();
        pipe.del(keys.rebuild_orgs(&plan.generation)).del(keys.progress(&progress_group(&plan.generation))).del(keys.rebuild_state());
        pipe.query_async::<()>(conn).await?;
        set_phase_gauge("done");
    }
    report.total_seconds = started.elapsed().as_secs_f64();
    info!(summary = report.summary(), "rebuild finished");
    Ok(report)
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

fn set_phase_gauge(phase: &str) {
    for p in ["snapshot", "replay", "switch", "cleanup", "done"] {
        metrics::gauge!("pb_rebuild_phase", "phase" => p).set(if p == phase { 1.0 } else { 0.0 });
    }
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
    position: BTreeMap<(String, i32), i64>,
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
        let mut position = BTreeMap::new();
        for ((t, p), (low, _)) in &marks {
            let at = held.get(&offsets::field(t, *p)).copied().unwrap_or(*low).max(*low);
            tpl.add_partition_offset(t, *p, Offset::Offset(at))?;
            position.insert((t.clone(), *p), at);
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
        ends.iter().map(|(k, (_, high))| (high - self.position.get(k).copied().unwrap_or(0)).max(0)).sum()
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
                let e = self.position.entry((m.topic().to_string(), m.partition())).or_insert(0);
                *e = (*e).max(m.offset() + 1);
            }
            // Recorded after the data (a rerun re-reads at most this batch, idempotently).
            let fields: Vec<(String, i64)> = self.position.iter().map(|((t, p), o)| (offsets::field(t, *p), *o)).collect();
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
                            ("lag", lag.to_string()),
                            ("eventsRead", report.events_read.to_string()),
                            ("eventsPerSecond", format!("{rate:.0}")),
                        ],
                    )
                    .await?;
                info!(generation = %self.generation, lag, events_read = report.events_read, events_per_second = rate as u64, "rebuild replay");
                last_report = Instant::now();
            }
        }
        bar.finish_and_clear();
        let _: () = conn.hset(self.keys.rebuild_state(), "lag", 0).await?;
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
        } else if let Some(old) = state.get(&format!("old:{org}")).and_then(|g| Generation::parse(g)) {
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
            source: "topics-from:1764547200000".into(),
            orgs: "64f0a1b2c3d4e5f6a7b8c9d1,64f0a1b2c3d4e5f6a7b8c9d2".into(),
            phase: "replay".into(),
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
        let from_low: BTreeMap<(String, i32), i64> = marks.iter().map(|(k, (low, _))| (k.clone(), *low)).collect();
        // From the topics' beginning: the trimmed partitions' earlier records are gone.
        assert_eq!(missing_history(&marks, &from_low, false), ["c/1 starts at 4, the replay at 4", "m/0 starts at 7, the replay at 7"]);
        // A snapshot's ends (or a resumed run's offsets) at or above the log start miss nothing.
        let ends: BTreeMap<(String, i32), i64> = marks.iter().map(|(k, (_, high))| (k.clone(), *high)).collect();
        assert!(missing_history(&marks, &ends, true).is_empty());
        // ... but a resumed replay whose offsets retention has passed does.
        let behind: BTreeMap<(String, i32), i64> = [(("c".to_string(), 0), 3), (("c".to_string(), 1), 2), (("m".to_string(), 0), 8)].into();
        assert_eq!(missing_history(&marks, &behind, true), ["c/1 starts at 4, the replay at 2"]);
        assert!(refuse_missing_history(&[]).is_ok());
        assert!(refuse_missing_history(&["c/1".into()]).unwrap_err().to_string().contains("--source mongodb"));
    }
}
