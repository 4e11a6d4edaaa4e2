//! The consumer loop. One task polls a batch, applies it to Redis (`apply.rs`), sends poison
//! events to the dead-letter topic, and only then stores the batch's offsets
//! (`enable.auto.offset.store=false`); librdkafka commits stored offsets in the background, and
//! we commit synchronously on partition revoke and on shutdown. The next batch is polled while
//! the current one is applied, so a revoke (which librdkafka runs inside a poll) can come with a
//! batch in flight: what it commits is still only what was stored, i.e. what Redis
//! acknowledged. The batch in flight then stores offsets of partitions this consumer may no
//! longer own (refused, logged); their new owner re-reads those events and applies them again,
//! idempotently.
use crate::apply::{Position, RedisApplier, Transient};
use crate::batch::Outcome;
use crate::config::Topics;
use crate::dead_letter::{DeadLetters, Origin};
use crate::events;
use crate::kafka::KafkaConnection;
use crate::progress;
use crate::rewind;
use crate::signal::Signal;
use crate::state;
use board_model::events::{parse_event_timed, Event, PoisonReason};
use board_model::keys::KeySpace;
use board_model::offsets;
use board_redis::functions::{load_library, progress_cmd, ProgressOutcome};
use board_redis::redis_conn::{query_blocking, RedisTarget};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
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

struct ProjectorContext {
    counters: Arc<RunCounters>,
    /// Which consumer of this run this is (`RunCounters::consumer_epoch`): one being closed
    /// after a renewal must not write the gauges of the one that replaced it.
    epoch: u64,
    /// Where assigned partitions start: the progress Redis holds (read synchronously inside the
    /// rebalance callback, so the assignment itself carries the offsets).
    positions: Positions,
}

/// Reads the progress hash with a plain (blocking) Redis connection: the rebalance callback runs
/// inside librdkafka's poll and must decide the offsets before it returns.
struct Positions {
    target: RedisTarget,
    progress_key: String,
}

impl Positions {
    /// The next offset of each partition of `tpl`: Redis' progress; the beginning where Redis
    /// has none (a new partition, or a projection that starts from nothing); the group's commit
    /// only when Redis cannot be read (a projection found lost later is started again).
    fn assign_offsets(&self, tpl: &mut TopicPartitionList) {
        let read = || -> redis::RedisResult<std::collections::HashMap<String, i64>> {
            query_blocking(&self.target, redis::cmd("HGETALL").arg(&self.progress_key), Duration::from_secs(3))
        };
        let held = match read() {
            Ok(h) => Some(h),
            Err(e) => {
                warn!(error = %e, "progress not readable from redis on assignment; starting from the group's committed offsets");
                None
            }
        };
        let parts: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        for (topic, partition) in parts {
            let offset = match &held {
                Some(h) => h.get(&offsets::field(&topic, partition)).map(|o| Offset::Offset(*o)).unwrap_or(Offset::Beginning),
                None => Offset::Stored,
            };
            let _ = tpl.set_partition_offset(&topic, partition, offset);
        }
    }
}

impl ClientContext for ProjectorContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    events::ConsumerLag { topic, partition: *partition, lag: p.consumer_lag }.emit();
                }
            }
        }
    }
}

impl ProjectorContext {
    /// The gauge is set from what the consumer holds after the change, not added up from the
    /// changes: an error path that drops the assignment cannot leave it counting stale partitions.
    fn count_assignment(&self, consumer: &BaseConsumer<Self>) {
        if self.counters.consumer_epoch.load(Ordering::Relaxed) != self.epoch {
            return;
        }
        let held = consumer.assignment().map(|tpl| tpl.count()).unwrap_or(0);
        self.counters.assigned_partitions.store(held as i64, Ordering::Relaxed);
    }
}

impl ConsumerContext for ProjectorContext {
    /// librdkafka's eager assignment, with the offsets Redis holds: the projection, not the
    /// group's commits, says where its data ends.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: rdkafka::types::RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        use rdkafka::types::RDKafkaRespErr::*;
        match err {
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.positions.assign_offsets(tpl);
                let rebalance = Rebalance::Assign(tpl);
                self.pre_rebalance(consumer, &rebalance);
                if let Err(e) = consumer.assign(tpl) {
                    warn!(error = %e, "assign failed");
                }
                self.post_rebalance(consumer, &rebalance);
            }
            RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let rebalance = Rebalance::Revoke(tpl);
                self.pre_rebalance(consumer, &rebalance);
                if let Err(e) = consumer.unassign() {
                    warn!(error = %e, "unassign failed");
                }
                self.post_rebalance(consumer, &rebalance);
            }
            other => {
                let code: rdkafka::error::RDKafkaErrorCode = other.into();
                warn!(error = %code, "rebalance error");
                let _ = consumer.unassign();
                self.count_assignment(consumer);
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Hand the partitions over with everything Redis acknowledged committed, so the
            // next owner re-reads as little as possible.
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => info!(partitions = tpl.count(), "committed stored offsets on revoke"),
                Err(e) => debug!(error = %e, "nothing to commit on revoke"),
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => info!(partitions = tpl.count(), "partitions assigned"),
            Rebalance::Revoke(tpl) => info!(partitions = tpl.count(), "partitions revoked"),
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
        self.count_assignment(consumer);
    }
}

/// librdkafka's `max.poll.interval.ms` for this projector: also how long a rebalance may wait
/// for the group's members, so the group watch never calls a group stalled sooner than twice it.
fn max_poll_interval(s: &ProjectorSettings) -> Duration {
    Duration::from_millis((s.session_timeout.as_millis().max(6000) as u64 * 5).max(10_000))
}

/// A consumer subscribed to the inputs; it takes the gauges over from any earlier one.
fn build_consumer(s: &ProjectorSettings, counters: Arc<RunCounters>) -> anyhow::Result<StreamConsumer<ProjectorContext>> {
    let positions = Positions { target: RedisTarget::parse(&s.redis_url, false), progress_key: s.keys.progress(&s.group_id) };
    let session_ms = s.session_timeout.as_millis().max(6000);
    let (session, heartbeat, max_poll) =
        (session_ms.to_string(), (session_ms / 3).to_string(), max_poll_interval(s).as_millis().to_string());
    let epoch = counters.consumer_epoch.load(Ordering::Relaxed) + 1;
    let consumer: StreamConsumer<ProjectorContext> = s
        .kafka
        .client_config(&[
            ("group.id", &s.group_id),
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", "1000"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", &session),
            ("heartbeat.interval.ms", &heartbeat),
            ("max.poll.interval.ms", &max_poll),
            ("topic.metadata.refresh.interval.ms", "5000"),
            ("statistics.interval.ms", "5000"),
        ])
        .create_with_context(ProjectorContext { counters: counters.clone(), positions, epoch })?;
    let topics = s.topics.inputs();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    // Its callbacks run only inside its polls, none of which has happened yet.
    counters.consumer_epoch.store(epoch, Ordering::Relaxed);
    counters.assigned_partitions.store(0, Ordering::Relaxed);
    Ok(consumer)
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
    // The one watermarks client of this projector: the state's target, the published ends, the
    // caught-up watch and the rewind restarts all look through it.
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
    let instance = Arc::new(std::sync::Mutex::new(instance));
    // Raised when Redis lost the projection (by the watch below or by a refused progress write).
    let lost = Arc::new(Signal::default());
    let dead_letters = DeadLetters::new(&settings.kafka, &settings.topics.topic_dlq)?;
    let parked_stream = settings.keys.parked_dead_letters();
    let mut consumer = build_consumer(&settings, counters.clone())?;
    let progress_key = settings.keys.progress(&settings.group_id);
    // Raised when the group left this projector out (see `group_watch`): a new consumer.
    let stalled = Arc::new(Signal::default());
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
    // The consumer a renewal replaced, closing on a blocking thread (one at a time).
    let mut closing: Option<tokio::task::JoinHandle<()>> = None;
    let mut progress_conn = applier.connection();
    // With exit_when_caught_up, a separate task watches the lag (a round of broker requests) and
    // resolves this future; the loop never waits for it between batches.
    let caught_up = caught_up_watch(&settings, applier.connection(), progress_key.clone(), watermarks.clone());
    tokio::pin!(caught_up);
    // Stops with this function, however it returns.
    let _ends_publisher = AbortOnDrop(publish_ends_every_second(&settings, applier.connection(), watermarks.clone()));
    let _state_watch = AbortOnDrop(watch_state_every_second(
        &settings,
        applier.connection(),
        instance.clone(),
        lost.clone(),
        applier.write_counters.clone(),
        watermarks.clone(),
    ));
    info!(group = %settings.group_id, topics = ?settings.topics.inputs(), "projector started");

    // Messages received (and parsed) while the previous batch was being applied: Kafka reads and
    // JSON parsing overlap Redis' work on the batch before. Offsets are still stored strictly
    // batch after batch, each only after Redis acknowledged it.
    let mut carry: Vec<Parsed> = Vec::new();
    let parse = |m: OwnedMessage| {
        let event = parse_message(&m, settings.max_event_bytes);
        (m, event)
    };
    loop {
        if stalled.take() {
            if closing.as_ref().is_some_and(|c| !c.is_finished()) {
                warn!("the consumer replaced earlier is still closing: no new consumer yet");
            } else {
                match build_consumer(&settings, counters.clone()) {
                    Ok(fresh) => {
                        // What was received is read again by whoever gets its partitions (from
                        // the progress in Redis).
                        carry.clear();
                        let old = std::mem::replace(&mut consumer, fresh);
                        // Closing leaves the group; it may block (a coordinator gone): off the
                        // async workers, and never waited for.
                        closing = Some(tokio::task::spawn_blocking(move || drop(old)));
                        counters.consumers_renewed.fetch_add(1, Ordering::Relaxed);
                        info!("new consumer subscribed");
                    }
                    Err(e) => warn!(error = %e, "new consumer not made; the next stall or fatal error tries again"),
                }
            }
            continue;
        }
        if lost.take() {
            // What was received belongs to positions Redis no longer holds.
            carry.clear();
            if !start_again_from_redis(&settings, &watermarks, &consumer, &mut applier, &instance).await {
                // Redis is unreachable: try again on the next turn (shutdown is heard meanwhile).
                lost.raise();
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            continue;
        }
        let mut batch = std::mem::take(&mut carry);
        if batch.is_empty() {
            let first = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = &mut caught_up => break,
                _ = lost.notify.notified() => continue,
                _ = stalled.notify.notified() => continue,
                m = consumer.recv() => m,
            };
            match first {
                Ok(m) => batch.push(parse(m.detach())),
                Err(e) => {
                    // A fatal error (a static member fenced by a newer one with its
                    // `group.instance.id`, ...) ends the consumer for good: a new one is made.
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        events::ConsumerFatal { code: &code.to_string(), reason: &reason }.emit();
                        stalled.raise();
                    } else {
                        warn!(error = %e, "kafka poll error; the client reconnects by itself");
                    }
                    continue;
                }
            }
        }
        let _ = counters.first_batch_at.compare_exchange(0, board_model::time::now_millis(), Ordering::Relaxed, Ordering::Relaxed);
        crate::kafka::fill_batch(&consumer, &mut batch, settings.max_batch, settings.linger, &parse).await;

        // Apply with retries. Shutdown during a Redis outage gives the batch up unstored: it is
        // read again on the next start, so nothing is lost. A batch that met keys gone back in
        // time (or a lost projection) is given up too: the projection restarts from what Redis
        // holds, and the batch is read again from there.
        let mut backoff = Duration::from_millis(100);
        let mut attempts = 0u32;
        let mut given_up = false;
        let write_counters = applier.write_counters.clone();
        loop {
            attempts += 1;
            // A dead-letter topic that stays unreachable must not stop the partitions for good.
            let dlq = DeadLetterSink {
                topic: &dead_letters,
                parked_stream: &parked_stream,
                parked_max: settings.parked_max,
                park_unsent: attempts > DLQ_ATTEMPTS_BEFORE_PARKING,
            };
            let applying = process_batch(&mut applier, &dlq, &batch, &counters);
            tokio::pin!(applying);
            let result = loop {
                tokio::select! {
                    biased;
                    r = &mut applying => break r,
                    m = consumer.recv(), if carry.len() < settings.max_batch => match m {
                        Ok(m) => carry.push(parse(m.detach())),
                        Err(e) => warn!(error = %e, "kafka poll error"),
                    },
                }
            };
            match result {
                Ok(()) => break,
                Err(_) if write_counters.any_went_back() || lost.is_raised() => {
                    given_up = true;
                    break;
                }
                Err(e) => {
                    counters.redis_retries.fetch_add(1, Ordering::Relaxed);
                    events::ApplyRetried { error: &e, retry_in: backoff }.emit();
                    tokio::select! {
                        _ = &mut shutdown => {
                            finish(&consumer);
                            return Ok(());
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = crate::pipeline::next_backoff(backoff);
                }
            }
        }
        if given_up {
            // Nothing else is done until the restart is made (Redis or Kafka may be unreachable
            // meanwhile): re-seeking first would forget the orgs that went back and, on a shard
            // whose progress lives elsewhere, skip the events they lost.
            let mine = instance.lock().expect("not poisoned").clone();
            let mut backoff = Duration::from_millis(200);
            while let Err(e) =
                restart_if_counters_went_back(&mut progress_conn, &settings, &watermarks, &applier.write_counters, &mine).await
            {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "restart after a rewind not made yet; retrying");
                tokio::select! {
                    _ = &mut shutdown => {
                        finish(&consumer);
                        return Ok(());
                    }
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = crate::pipeline::next_backoff(backoff);
            }
            lost.raise();
            continue;
        }
        let current_instance = instance.lock().expect("not poisoned").clone();
        if !store_offsets(&consumer, &batch, &mut progress_conn, &settings.keys, &progress_key, &current_instance).await {
            lost.raise();
            continue;
        }
        record_freshness(&batch);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.last_batch_at.store(board_model::time::now_millis(), Ordering::Relaxed);
    }
    finish(&consumer);
    // Stopping once caught up (a backfill) must not leave a whole projection marked `building`
    // until some projector's next watch.
    let current_instance = instance.lock().expect("not poisoned").clone();
    if let Err(e) = state::check_whole(&mut progress_conn, &settings.keys, &current_instance, &progress_key).await {
        debug!(error = %e, "wholeness not checked at exit");
    }
    Ok(())
}

/// After Redis lost the projection: a new state (instance, target), then every assigned
/// partition back to what Redis holds (nothing: its beginning). false: Redis could not be
/// written (the caller tries again).
async fn start_again_from_redis(
    settings: &ProjectorSettings,
    watermarks: &progress::Watermarks,
    consumer: &StreamConsumer<ProjectorContext>,
    applier: &mut RedisApplier,
    instance: &std::sync::Mutex<String>,
) -> bool {
    applier.forget_generations();
    match state::ensure(&mut applier.connection(), &settings.keys, &settings.group_id, watermarks, &settings.topics.inputs()).await {
        Ok(i) => *instance.lock().expect("not poisoned") = i,
        Err(e) => {
            warn!(error = %e, "projection state not written; retrying");
            return false;
        }
    }
    let Ok(mut tpl) = consumer.assignment() else { return true };
    consumer.context().positions.assign_offsets(&mut tpl);
    match consumer.seek_partitions(tpl, Duration::from_secs(10)) {
        Ok(r) => {
            let failed: Vec<String> =
                r.elements().iter().filter_map(|e| e.error().err().map(|err| format!("{}/{}: {err}", e.topic(), e.partition()))).collect();
            if failed.is_empty() {
                info!(partitions = r.count(), "partitions positioned at what redis holds");
            } else {
                warn!(failed = ?failed, "some partitions not positioned at what redis holds");
            }
        }
        Err(e) => warn!(error = %e, "seek after a lost projection failed"),
    }
    if let Err(e) = load_library(&mut applier.connection()).await {
        warn!(error = %e, "function library not loaded");
    }
    true
}

/// Every second: is the instance this projector writes for still the one Redis holds (else
/// Redis lost the projection: `lost`), and is a building projection whole now?
fn watch_state_every_second(
    settings: &ProjectorSettings,
    mut conn: board_redis::redis_conn::RedisConn,
    instance: Arc<std::sync::Mutex<String>>,
    lost: Arc<Signal>,
    counters: crate::apply::WriteCounters,
    watermarks: progress::Watermarks,
) -> tokio::task::JoinHandle<()> {
    let (keys, progress_key, group) = (settings.keys.clone(), settings.keys.progress(&settings.group_id), settings.group_id.clone());
    let settings = settings.clone();
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
            let mine = instance.lock().expect("not poisoned").clone();
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
            match check_rewind(&mut conn, &settings, &watermarks, &mut marks, &counters, &mine).await {
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
    settings: &ProjectorSettings,
    watermarks: &progress::Watermarks,
    marks: &mut rewind::WriteMarks,
    counters: &crate::apply::WriteCounters,
    mine: &str,
) -> anyhow::Result<bool> {
    // The counters first: a mark raised after a rewind would carry progress past lost events.
    if restart_if_counters_went_back(conn, settings, watermarks, counters, mine).await? {
        return Ok(true);
    }
    let keys = &settings.keys;
    let progress: rewind::Progress = conn.hgetall(keys.progress(&settings.group_id)).await?;
    let Some(r) = marks.raise(conn, keys, &progress).await? else { return Ok(false) };
    // Read again: the mark was checked after the first read.
    let progress: rewind::Progress = conn.hgetall(keys.progress(&settings.group_id)).await?;
    let resume = rewind::replay_from(&progress, r.progress.as_ref());
    restart_after_rewind(conn, settings, watermarks, mine, &r.to_string(), &resume).await?;
    marks.handled(conn, keys, &r).await?;
    Ok(true)
}

/// When orgs' keys went back (their write counters): the progress lowered to their own applied
/// offsets (restored with their data; no commit of this process landed on them since, the
/// `min_writes` guard refuses it) and a new building instance. true: restarted.
async fn restart_if_counters_went_back(
    conn: &mut board_redis::redis_conn::RedisConn,
    settings: &ProjectorSettings,
    watermarks: &progress::Watermarks,
    counters: &crate::apply::WriteCounters,
    mine: &str,
) -> anyhow::Result<bool> {
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
        restart_after_rewind(conn, settings, watermarks, mine, &what, &resume).await
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
    settings: &ProjectorSettings,
    watermarks: &progress::Watermarks,
    mine: &str,
    what: &str,
    resume: &rewind::Progress,
) -> anyhow::Result<()> {
    warn!(rewound = %what, resume = ?resume, "redis went back to an earlier state: replaying from what its data holds");
    let restarted =
        state::restart_after_rewind(conn, &settings.keys, &settings.group_id, mine, resume, watermarks, &settings.topics.inputs()).await?;
    if restarted.is_some() {
        events::RedisRewound.emit();
    }
    Ok(())
}

/// Freshness: from each applied event's `occurredAt` to now (its batch acknowledged).
fn record_freshness(batch: &[Parsed]) {
    let now = board_model::time::now_millis();
    let seconds = batch.iter().filter_map(|(_, p)| p.as_ref().ok()?.1).map(|at| (now - at).max(0) as f64 / 1000.0);
    events::Freshness(seconds).emit();
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
fn publish_ends_every_second(
    settings: &ProjectorSettings,
    mut conn: board_redis::redis_conn::RedisConn,
    watermarks: progress::Watermarks,
) -> tokio::task::JoinHandle<()> {
    let (topics, key) = (settings.topics.inputs(), settings.keys.partition_ends(&settings.group_id));
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
async fn caught_up_watch(
    settings: &ProjectorSettings,
    mut conn: board_redis::redis_conn::RedisConn,
    progress_key: String,
    watermarks: progress::Watermarks,
) {
    if !settings.exit_when_caught_up {
        return std::future::pending().await;
    }
    let topics = settings.topics.inputs();
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

fn finish(consumer: &StreamConsumer<ProjectorContext>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => info!("committed stored offsets; projector stopped"),
        Err(e) => debug!(error = %e, "nothing to commit at shutdown"),
    }
}

/// Attempts of one batch (with backoff, about 30 s) after which a dead letter that the topic did
/// not take is parked in Redis even though the topic did not refuse it outright.
const DLQ_ATTEMPTS_BEFORE_PARKING: u32 = 8;

/// Where the poison events of a batch go: the dead-letter topic, or, when it refuses them (or
/// stayed unreachable for `DLQ_ATTEMPTS_BEFORE_PARKING` attempts), a Redis stream.
struct DeadLetterSink<'a> {
    topic: &'a DeadLetters,
    parked_stream: &'a str,
    parked_max: u64,
    park_unsent: bool,
}

async fn process_batch(
    applier: &mut RedisApplier,
    dead_letters: &DeadLetterSink<'_>,
    batch: &[Parsed],
    counters: &RunCounters,
) -> Result<(), Transient> {
    let started = Instant::now();
    let mut good: Vec<&Event> = Vec::with_capacity(batch.len());
    let mut positions: Vec<Position<'_>> = Vec::with_capacity(batch.len());
    for (m, p) in batch {
        if let Ok((e, _)) = p {
            good.push(e);
            positions.push(Position { topic: m.topic(), partition: m.partition(), offset: m.offset() });
        }
    }
    let mut outcomes = applier.apply(&good, &positions).await?.into_iter();

    let mut poison: Vec<(&OwnedMessage, PoisonReason)> = Vec::new();
    let (mut applied, mut stale) = (0u64, 0u64);
    for (msg, p) in batch {
        match p {
            Err(reason) => poison.push((msg, reason.clone())),
            Ok(_) => match outcomes.next().expect("one outcome per applied event") {
                Outcome::Applied => applied += 1,
                Outcome::Stale => stale += 1,
            },
        }
    }
    for (msg, reason) in &poison {
        let origin =
            Origin { topic: msg.topic(), partition: msg.partition(), offset: msg.offset(), key: msg.key(), payload: msg.payload() };
        match dead_letters.topic.send(&origin, reason).await {
            Ok(()) => {}
            Err(e) if e.refused || dead_letters.park_unsent => {
                let mut conn = applier.connection();
                crate::dead_letter::park(&mut conn, dead_letters.parked_stream, dead_letters.parked_max, &origin, reason, &e.text)
                    .await
                    .map_err(|re| Transient(format!("parking a dead letter in redis: {re}")))?;
                counters.parked.fetch_add(1, Ordering::Relaxed);
                events::DeadLetterParked {
                    topic: msg.topic(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    code: reason.code(),
                    dlq_topic: dead_letters.topic.topic(),
                    refusal: &e,
                }
                .emit();
            }
            Err(e) => return Err(Transient(format!("dead-letter topic: {e}"))),
        }
        events::EventDeadLettered { topic: msg.topic(), partition: msg.partition(), offset: msg.offset(), code: reason.code(), reason }
            .emit();
    }
    counters.applied.fetch_add(applied, Ordering::Relaxed);
    counters.stale.fetch_add(stale, Ordering::Relaxed);
    counters.dead_lettered.fetch_add(poison.len() as u64, Ordering::Relaxed);
    events::BatchApplied { applied, stale, took: started.elapsed() }.emit();
    Ok(())
}

/// A message and what parsing made of it (the event and when it occurred).
pub(crate) type Parsed = (OwnedMessage, Result<(Event, Option<i64>), PoisonReason>);

/// An event larger than `max_event_bytes` is refused unparsed (bounded work per event).
pub(crate) fn parse_message(m: &OwnedMessage, max_event_bytes: usize) -> Result<(Event, Option<i64>), PoisonReason> {
    let payload = m.payload().ok_or(PoisonReason::InvalidJson("empty message".into()))?;
    if payload.len() > max_event_bytes {
        return Err(PoisonReason::TooLarge { size: payload.len(), limit: max_event_bytes });
    }
    parse_event_timed(payload)
}

/// The offset after the last message of `batch`, per partition.
pub(crate) fn next_offsets(batch: &[Parsed]) -> BTreeMap<(&str, i32), i64> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for (m, _) in batch {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    next
}

/// Records, per partition, the offset after the last message of the batch as progress in Redis
/// (only while Redis holds the projection `instance`), then stores it for the group's commit.
/// false: Redis no longer holds the projection (nothing recorded or stored).
async fn store_offsets(
    consumer: &StreamConsumer<ProjectorContext>,
    batch: &[Parsed],
    redis: &mut board_redis::redis_conn::RedisConn,
    keys: &KeySpace,
    progress_key: &str,
    instance: &str,
) -> bool {
    let next = next_offsets(batch);
    let fields: Vec<(String, i64)> = next.iter().map(|((t, p), o)| (offsets::field(t, *p), *o)).collect();
    // Retried a few times (about 3 s): the batch is applied, so its progress should be recorded,
    // or the loss of the projection learnt. If Redis stays unreachable the record is skipped: a
    // later batch records these partitions, and until then a restart re-reads them (idempotent).
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=5 {
        match progress_cmd(keys, progress_key, instance, &fields).query_async::<ProgressOutcome>(redis).await {
            Ok(ProgressOutcome::Recorded) => break,
            Ok(ProgressOutcome::Lost) => return false,
            // A Redis without the library lost its data too: the projection is gone.
            Err(e) if board_redis::functions::is_missing(&e) => return false,
            Err(e) => {
                debug!(error = %e, attempt, "progress not recorded");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in &next {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        // A partition revoked while this batch was built: its new owner re-reads the batch
        // (idempotently) from the progress in Redis.
        debug!(error = %e, "offsets not stored (partition no longer assigned)");
    }
    true
}
