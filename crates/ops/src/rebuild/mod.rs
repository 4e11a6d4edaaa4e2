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
mod phases;
mod plan;
mod replay;
mod snapshot;

use anyhow::{bail, Context};
use board_model::events::{parse_event, Event};
use board_model::keys::{Generation, KeySpace};
use board_model::model::CardKind;
use board_model::offsets::{self, missing_history, Checkpoint};
use board_mongo::MongoArgs;
use board_redis::config::RedisArgs;
use board_redis::functions::{fcall, lease, load_library, switch_cmd, Commit, SwitchOutcome};
use board_redis::rebuild_state::{field, OrgField, RebuildPhase, RebuildProgress};
use board_redis::redis_conn::RedisConn;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use phases::{rebuild, RunContext, Start};
use plan::{Plan, PlanSource};
use projector::apply::{RedisApplier, Target};
use projector::config::KafkaArgs;
use projector::pipeline::{self, Origin, Sink, SourceBatch};
use projector::RunCounters;
use projector::{progress, KafkaConnection};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use redis::AsyncCommands;
use replay::Replay;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
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
    let state: HashMap<String, String> = conn.hgetall(keys.rebuild_state()).await?;
    let previous = Plan::from_hash(&state);
    let unfinished = state.get(field::GENERATION).and_then(|g| Generation::parse(g));
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
    let lease_lost = CancellationToken::new();
    let renewal = tokio::spawn(renew_lease(conn.clone(), keys.clone(), run_id.clone(), lease_lost.clone()));
    let ctx = RunContext { args: &args, keys: &keys, kafka: &kafka, topics: &topics, lease_lost: &lease_lost };
    let start = Start { resume: resume.is_some(), previous, unfinished, orgs: &orgs, source: wanted_source };
    let result = rebuild(&ctx, &mut conn, start).await;
    renewal.abort();
    let _: redis::RedisResult<bool> = fcall(&mut conn, &lease::release_cmd(&keys.rebuild_lease(), &run_id)).await;
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

async fn renew_lease(mut conn: RedisConn, keys: KeySpace, run_id: String, lost: CancellationToken) {
    let renew = lease::renew_cmd(&keys.rebuild_lease(), &run_id, LEASE_MS);
    loop {
        tokio::time::sleep(Duration::from_millis(LEASE_MS / 3)).await;
        match fcall::<bool, _>(&mut conn, &renew).await {
            Ok(false) => {
                warn!("the rebuild's lease is gone (redis lost it, or it expired): stopping");
                lost.cancel();
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

fn ensure_not_lost(lease_lost: &CancellationToken) -> anyhow::Result<()> {
    if lease_lost.is_cancelled() {
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

/// An unfinished rebuild that will not be resumed: the keys of its generation for every org it
/// did not switch, its bookkeeping, and the old generations of the orgs it did switch.
async fn discard(conn: &mut RedisConn, keys: &KeySpace, generation: &Generation) -> anyhow::Result<usize> {
    let built: BTreeSet<String> = conn.smembers(keys.rebuild_orgs(generation)).await?;
    let state: HashMap<String, String> = conn.hgetall(keys.rebuild_state()).await?;
    let mut remove: HashMap<String, Generation> = HashMap::new();
    for org in &built {
        let current: Option<String> = conn.get(keys.generation_pointer(org)).await?;
        if current.as_deref() != Some(generation.name()) {
            remove.insert(org.clone(), generation.clone());
        } else if let Some(old) = state.get(&OrgField::Left(org.clone()).name()).and_then(|g| Generation::parse(g)) {
            remove.insert(org.clone(), old);
        }
    }
    let removed = remove_org_generations(conn, keys, &remove).await?;
    let mut pipe = redis::pipe();
    pipe.del(keys.rebuild_orgs(generation)).del(keys.progress(&progress_group(generation))).del(keys.rebuild_state());
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
    let names = conn.scan_match(&keys.pattern()).await?;
    let doomed: Vec<&String> = names.iter().filter(|k| !pointers.contains(*k) && prefixes.iter().any(|p| k.starts_with(p))).collect();
    conn.unlink(&doomed).await?;
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
