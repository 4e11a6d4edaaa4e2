//! A projector: the consumer group (`group_source`) drained through the pipeline
//! (`pipeline::drain`) into Redis, and the watches around it: the projection state (lost,
//! whole, gone back in time), the partitions' ends published for the API, the group's stalls,
//! and, for a backfill, the catch-up that ends the run. `run` wires them and returns once
//! shutdown comes (the batch in flight finished, its offsets stored and committed).
use crate::apply::RedisApplier;
use crate::config::Topics;
use crate::dead_letter::{DeadLetterSink, DeadLetters};
use crate::events;
use crate::group_source::{max_poll_interval, GroupSourceParts, KafkaGroupSource};
use crate::kafka::KafkaConnection;
use crate::pipeline::Sink;
use crate::progress;
use crate::rewind;
use crate::signal::Signal;
use crate::state;
use board_model::keys::KeySpace;
use redis::AsyncCommands;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// 1 MiB: far above any real contact document, far below what would hurt the projector.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct ProjectorSettings {
    pub kafka: KafkaConnection,
    pub group_id: String,
    pub topics: Topics,
    pub redis_url: String,
    pub keys: KeySpace,
    /// Most events applied in one Redis round trip.
    pub max_batch: usize,
    /// An event larger than this is dead-lettered (`too_large`) without being parsed.
    pub max_event_bytes: usize,
    /// How long to wait for more events before applying a partial batch.
    pub linger: Duration,
    pub session_timeout: Duration,
    /// Stop (gracefully) once every input partition is applied up to its high watermark.
    pub exit_when_caught_up: bool,
    /// Most dead letters parked in Redis (see `dead_letter::park`).
    pub parked_max: u64,
    /// How long this projector may hold no partition while events wait unapplied before it
    /// makes a new consumer (`group_watch`).
    pub group_stall_after: Duration,
}

impl ProjectorSettings {
    pub fn new(kafka: impl Into<KafkaConnection>, group_id: &str, topics: Topics, redis_url: &str, keys: KeySpace) -> Self {
        ProjectorSettings {
            kafka: kafka.into(),
            group_id: group_id.to_string(),
            topics,
            redis_url: redis_url.to_string(),
            keys,
            max_batch: 2000,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            linger: Duration::from_millis(5),
            session_timeout: Duration::from_secs(6),
            exit_when_caught_up: false,
            parked_max: crate::dead_letter::DEFAULT_PARKED_MAX,
            group_stall_after: crate::group_watch::DEFAULT_STALL_AFTER,
        }
    }
}

/// Live counters of one projector (also exported as Prometheus metrics).
#[derive(Debug, Default)]
pub struct RunCounters {
    pub applied: AtomicU64,
    pub stale: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Dead letters the dead-letter topic did not take, kept in Redis instead (also counted in
    /// `dead_lettered`).
    pub parked: AtomicU64,
    pub batches: AtomicU64,
    pub redis_retries: AtomicU64,
    /// Partitions this instance holds now.
    pub assigned_partitions: AtomicI64,
    /// New consumers made because the group left the previous one out (`group_watch`) or
    /// librdkafka put it in a fatal state.
    pub consumers_renewed: AtomicU64,
    /// Which consumer of this run holds the gauges (see `ProjectorContext::epoch`).
    pub consumer_epoch: AtomicU64,
    /// Unix millis when the first batch arrived and when the last one was stored: the steady
    /// ingest rate excludes group joins and idle time.
    pub first_batch_at: AtomicI64,
    pub last_batch_at: AtomicI64,
}

impl RunCounters {
    /// Events per second between the first and the last batch.
    pub fn steady_rate(&self) -> Option<f64> {
        let (a, b) = (self.first_batch_at.load(Ordering::Relaxed), self.last_batch_at.load(Ordering::Relaxed));
        let events = self.applied.load(Ordering::Relaxed) + self.stale.load(Ordering::Relaxed) + self.dead_lettered.load(Ordering::Relaxed);
        (b > a).then(|| events as f64 / ((b - a) as f64 / 1000.0))
    }
}

impl RunCounters {
    pub fn get(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// What a projector's parts share (the group source and the watches): its settings, its one
/// watermarks client (the state's target, the published ends, the caught-up watch, the group
/// watch and the rewind restarts all look through it), the write counters its commits answered
/// and the projection instance it writes for. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Projector {
    pub settings: ProjectorSettings,
    pub watermarks: progress::Watermarks,
    pub write_counters: crate::apply::WriteCounters,
    pub instance: Arc<std::sync::Mutex<String>>,
}

impl Projector {
    /// The instance this projector writes for now.
    pub fn instance(&self) -> String {
        self.instance.lock().expect("not poisoned").clone()
    }
    pub fn progress_key(&self) -> String {
        self.settings.keys.progress(&self.settings.group_id)
    }
}

/// Runs until `shutdown` resolves (or, with `exit_when_caught_up`, until caught up). The batch
/// in flight when shutdown comes is finished, its offsets stored and committed; then Ok.
pub async fn run(settings: ProjectorSettings, counters: Arc<RunCounters>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let mut applier = loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = RedisApplier::connect(&settings.redis_url, settings.keys.clone()) => match r {
                Ok(a) => break a,
                Err(e) => {
                    warn!(error = %e, "redis not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    check_model(&mut applier.connection(), &settings.keys, &settings.group_id).await?;
    // Retried like the connection above: the partitions' ends it reads are not there yet when a
    // projector starts beside topics being created, or while a loaded broker elects their
    // leaders, and a projector must not exit for that (it used to, silently in-process).
    let inputs = settings.topics.inputs();
    // The one watermarks client of this projector (see `Projector`).
    let watermarks = progress::Watermarks::new(&settings.kafka);
    let instance = loop {
        let mut conn = applier.connection();
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = state::ensure(&mut conn, &settings.keys, &settings.group_id, &watermarks, &inputs) => match r {
                Ok(i) => break i,
                Err(e) => {
                    warn!(error = %e, "projection state not read or made yet (the topics' ends are not known); retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    let projector = Projector {
        settings: settings.clone(),
        watermarks: watermarks.clone(),
        write_counters: applier.write_counters.clone(),
        instance: Arc::new(std::sync::Mutex::new(instance)),
    };
    // Raised when Redis lost the projection (by the watch below or by a refused checkpoint).
    let lost = Arc::new(Signal::default());
    let dead_letters = DeadLetterSink {
        topic: DeadLetters::new(&settings.kafka, &settings.topics.topic_dlq)?,
        parked_stream: settings.keys.parked_dead_letters(),
        parked_max: settings.parked_max,
    };
    let progress_key = settings.keys.progress(&settings.group_id);
    // Raised when the group left this projector out (see `group_watch`): a new consumer.
    let stalled = Arc::new(Signal::default());
    let mut source = KafkaGroupSource::subscribe(
        projector.clone(),
        counters.clone(),
        GroupSourceParts {
            lost: lost.clone(),
            stalled: stalled.clone(),
            forget_generations: applier.forget_handle(),
            conn: applier.connection(),
        },
    )?;
    // Never sooner than a rebalance may take (0: no watch).
    let stall_after = (!settings.group_stall_after.is_zero()).then(|| settings.group_stall_after.max(2 * max_poll_interval(&settings)));
    let _group_watch = stall_after.map(|after| {
        AbortOnDrop(crate::group_watch::spawn(
            watermarks.clone(),
            applier.connection(),
            inputs.clone(),
            progress_key.clone(),
            counters.clone(),
            after,
            stalled.clone(),
        ))
    });
    // With exit_when_caught_up, a separate task watches the lag (a round of broker requests) and
    // resolves this future; the pipeline never waits for it between batches.
    let caught_up = caught_up_watch(&projector, applier.connection());
    // Stops with this function, however it returns.
    let _ends_publisher = AbortOnDrop(publish_ends_every_second(&projector, applier.connection()));
    let _state_watch = AbortOnDrop(watch_state_every_second(projector.clone(), applier.connection(), lost.clone()));
    info!(group = %settings.group_id, topics = ?settings.topics.inputs(), "projector started");
    // Shutdown during a Redis outage gives the batch in flight up unstored: it is read again on
    // the next start, so nothing is lost.
    let stop = async {
        tokio::select! {
            _ = &mut shutdown => {}
            _ = caught_up => {}
        }
    };
    let mut sink = Sink {
        applier: &mut applier,
        dead_letters: Some(&dead_letters),
        counters: &counters,
        max_batch: settings.max_batch,
        projector_metrics: true,
    };
    let drained = crate::pipeline::drain(&mut source, &mut sink, stop).await;
    source.finish().await;
    drained.map(|_| ())
}

/// Every second: is the instance this projector writes for still the one Redis holds (else
/// Redis lost the projection: `lost`), and is a building projection whole now?
fn watch_state_every_second(
    projector: Projector,
    mut conn: board_redis::redis_conn::RedisConn,
    lost: Arc<Signal>,
) -> tokio::task::JoinHandle<()> {
    let (keys, progress_key, group) = (projector.settings.keys.clone(), projector.progress_key(), projector.settings.group_id.clone());
    tokio::spawn(async move {
        let mut shards = state::ShardWatch::default();
        let mut marks = rewind::WriteMarks::default();
        let mut marks_instance: Option<String> = None;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match shards.restarted_empty(&mut conn).await {
                Ok(Some(node)) => {
                    events::ShardLost { node: &node }.emit();
                    match state::forget(&mut conn, &keys, &group).await {
                        Ok(()) => {
                            events::ShardLossHandled.emit();
                            shards.handled();
                        }
                        Err(e) => warn!(error = %e, "projection state not forgotten; the next check retries"),
                    }
                }
                Ok(None) => {}
                Err(e) => debug!(error = %e, "cluster primaries not checked"),
            }
            let mine = projector.instance();
            match board_redis::projection::instance(&mut conn, &keys).await {
                Ok(held) if held.as_deref() != Some(mine.as_str()) => {
                    warn!(held = ?held, mine, "redis no longer holds the projection this projector wrote: starting again");
                    lost.raise();
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(error = %e, "projection state not read");
                    continue;
                }
            }
            // The marks start over with each instance (a loss made a new one: nothing to compare).
            if marks_instance.as_deref() != Some(mine.as_str()) {
                marks.reset();
                marks_instance = Some(mine.clone());
            }
            match check_rewind(&mut conn, &projector, &mut marks, &mine).await {
                Ok(true) => {
                    lost.raise();
                    continue;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "write marks not checked: a redis gone back in time is not noticed until they are"),
            }
            match state::check_whole(&mut conn, &keys, &mine, &progress_key).await {
                Ok(s) => events::ProjectionWhole(s == board_redis::projection::Status::Whole).emit(),
                Err(e) => debug!(error = %e, "wholeness not checked"),
            }
        }
    })
}

/// Compares the orgs' write counters with what commits answered and raises the write marks;
/// when a node went back in time, lowers the progress to what its data holds and makes the
/// projection a new building instance (`state::restart_after_rewind`). true: the projection was
/// restarted (the caller re-seeks to what Redis holds).
async fn check_rewind(
    conn: &mut board_redis::redis_conn::RedisConn,
    projector: &Projector,
    marks: &mut rewind::WriteMarks,
    mine: &str,
) -> anyhow::Result<bool> {
    // The counters first: a mark raised after a rewind would carry progress past lost events.
    if restart_if_counters_went_back(conn, projector, mine).await? {
        return Ok(true);
    }
    let settings = &projector.settings;
    let keys = &settings.keys;
    let progress: rewind::Progress = conn.hgetall(keys.progress(&settings.group_id)).await?;
    let Some(r) = marks.raise(conn, keys, &progress).await? else { return Ok(false) };
    // Read again: the mark was checked after the first read.
    let progress: rewind::Progress = conn.hgetall(keys.progress(&settings.group_id)).await?;
    let resume = rewind::replay_from(&progress, r.progress.as_ref());
    restart_after_rewind(conn, projector, mine, &r.to_string(), &resume).await?;
    marks.handled(conn, keys, &r).await?;
    Ok(true)
}

/// When orgs' keys went back (their write counters): the progress lowered to their own applied
/// offsets (restored with their data; no commit of this process landed on them since, the
/// `min_writes` guard refuses it) and a new building instance. true: restarted.
pub(crate) async fn restart_if_counters_went_back(
    conn: &mut board_redis::redis_conn::RedisConn,
    projector: &Projector,
    mine: &str,
) -> anyhow::Result<bool> {
    let (settings, counters) = (&projector.settings, &projector.write_counters);
    let keys = &settings.keys;
    let back = rewind::counters_went_back(conn, keys, counters).await?;
    let Some(first) = back.first() else { return Ok(false) };
    let restarted: anyhow::Result<()> = async {
        let mut orgs = Vec::with_capacity(back.len());
        for base in &back {
            let offsets: rewind::Progress = conn.hgetall(format!("{base}:offsets")).await?;
            orgs.push(offsets);
        }
        let progress: rewind::Progress = conn.hgetall(keys.progress(&settings.group_id)).await?;
        let resume = rewind::replay_from_orgs(&progress, &orgs);
        let what = format!("the write counter of {first} went back ({} orgs)", back.len());
        restart_after_rewind(conn, projector, mine, &what, &resume).await
    }
    .await;
    if restarted.is_err() {
        // Kept for the next try: until the restart is made the rewind is not forgotten.
        back.iter().for_each(|b| counters.went_back(b));
    }
    restarted.map(|()| true)
}

async fn restart_after_rewind(
    conn: &mut board_redis::redis_conn::RedisConn,
    projector: &Projector,
    mine: &str,
    what: &str,
    resume: &rewind::Progress,
) -> anyhow::Result<()> {
    warn!(rewound = %what, resume = ?resume, "redis went back to an earlier state: replaying from what its data holds");
    let s = &projector.settings;
    let restarted =
        state::restart_after_rewind(conn, &s.keys, &s.group_id, mine, resume, &projector.watermarks, &s.topics.inputs()).await?;
    if restarted.is_some() {
        events::RedisRewound.emit();
    }
    Ok(())
}

/// Claims the prefix for this build's read model, or refuses to start if another model's
/// projection is there (its records would be misread and left behind). Model 1 wrote no marker:
/// its trace is a progress hash of the group without one. A projection a heal made again
/// carries the marker (`state::ensure` writes it with the new state).
async fn check_model(conn: &mut board_redis::redis_conn::RedisConn, keys: &KeySpace, group: &str) -> anyhow::Result<()> {
    use board_model::keys::MODEL_VERSION;
    let key = keys.model();
    let found: Option<String> = conn.get(&key).await?;
    let legacy: Option<String> = match found {
        Some(_) => None,
        None => conn.get(keys.legacy_model()).await?,
    };
    let found = match found.or(legacy) {
        Some(v) => v,
        None if conn.exists::<_, bool>(keys.progress(group)).await? => "1".to_string(),
        None => {
            let _: Option<String> = redis::cmd("SET").arg(&key).arg(MODEL_VERSION).arg("NX").query_async(conn).await?;
            conn.get::<_, Option<String>>(&key).await?.unwrap_or_default()
        }
    };
    anyhow::ensure!(
        found == MODEL_VERSION,
        "the projection under REDIS_PREFIX {:?} was built by read model {found} and this build writes model {MODEL_VERSION}: \
         project into a new REDIS_PREFIX and KAFKA_GROUP_ID, or remove the old keys and the group's offsets first",
        keys.prefix()
    );
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps the partitions' ends in Redis, every second while the projector runs, so the API reads
/// the projection's lag without a Kafka client.
fn publish_ends_every_second(projector: &Projector, mut conn: board_redis::redis_conn::RedisConn) -> tokio::task::JoinHandle<()> {
    let settings = &projector.settings;
    let (topics, key, watermarks) =
        (settings.topics.inputs(), settings.keys.partition_ends(&settings.group_id), projector.watermarks.clone());
    tokio::spawn(async move {
        loop {
            if let Err(e) = watermarks.publish_ends(&topics, &mut conn, &key).await {
                debug!(error = %e, "partition ends not published");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// Resolves once every input partition is applied to its end; never, unless asked for.
async fn caught_up_watch(projector: &Projector, mut conn: board_redis::redis_conn::RedisConn) {
    if !projector.settings.exit_when_caught_up {
        return std::future::pending().await;
    }
    let (topics, progress_key, watermarks) = (projector.settings.topics.inputs(), projector.progress_key(), projector.watermarks.clone());
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            match watermarks.lag(&topics, &mut conn, &progress_key).await {
                Ok(lag) if lag.total() == 0 => {
                    info!(applied = lag.applied(), "caught up; stopping");
                    return;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "lag not measured"),
            }
        }
    });
    let _ = task.await;
}
