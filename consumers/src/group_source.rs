//! `project`'s source: the Kafka consumer group. Its batches are what the consumer received
//! (read ahead while the previous batch is applied, so Kafka reads and JSON parsing overlap
//! Redis' work), parsed into events and poison records; its checkpoint is the offset after
//! each partition's last record, recorded in Redis with the projection instance it was applied
//! to and then stored for the group's commit (`enable.auto.offset.store=false`; librdkafka
//! commits stored offsets in the background, and synchronously on revoke and at `finish`).
//!
//! A revoke (which librdkafka runs inside a poll) can come with a batch in flight: what it
//! commits is still only what was stored, i.e. what Redis acknowledged. The batch in flight then
//! stores offsets of partitions this consumer may no longer own (refused, logged); their new
//! owner re-reads those events and applies them again, idempotently.
//!
//! The source also hears what happens around it: Redis lost the projection (`lost`: a new
//! projection state, partitions re-positioned at what Redis holds), Redis went back in time (a
//! batch given up: restarted from what the data holds), the group left this member out or
//! librdkafka failed it for good (`stalled`: a new consumer).
use crate::apply::ForgetGenerations;
use crate::batch::Outcome;
use crate::events;
use crate::pipeline::{Origin, Poison, Source, SourceBatch};
use crate::projector::{restart_if_counters_went_back, Projector, ProjectorSettings, RunCounters};
use crate::signal::Signal;
use crate::state;
use board_model::events::{parse_event_timed, Event, PoisonReason};
use board_model::offsets::{self, Checkpoint};
use board_redis::functions::{load_library, progress_cmd, ProgressOutcome};
use board_redis::redis_conn::{query_blocking, RedisConn, RedisTarget};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

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
pub(crate) fn max_poll_interval(s: &ProjectorSettings) -> Duration {
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

/// The consumer group as the pipeline's source.
pub struct KafkaGroupSource {
    /// The projector this source feeds (settings, watermarks, write counters, instance).
    projector: Projector,
    settings: ProjectorSettings,
    counters: Arc<RunCounters>,
    consumer: StreamConsumer<ProjectorContext>,
    /// The consumer a renewal replaced, closing on a blocking thread (one at a time).
    closing: Option<tokio::task::JoinHandle<()>>,
    /// Raised when Redis lost the projection (by the state watch or by a refused checkpoint).
    lost: Arc<Signal>,
    /// Raised when the group left this projector out (`group_watch`) or the consumer failed
    /// for good: a new consumer.
    stalled: Arc<Signal>,
    forget_generations: ForgetGenerations,
    conn: RedisConn,
    progress_key: String,
    /// Received (and parsed) but not yet given: the next batch's start.
    carry: Vec<Parsed>,
    max_batch: usize,
    /// When each applied event of the batch in flight occurred (freshness, once it is recorded).
    occurred: Vec<i64>,
}

/// What a source needs beside the projector: its signals, the applier's forget handle and a
/// Redis connection of its own.
pub struct GroupSourceParts {
    pub lost: Arc<Signal>,
    pub stalled: Arc<Signal>,
    pub forget_generations: ForgetGenerations,
    pub conn: RedisConn,
}

impl KafkaGroupSource {
    /// Subscribes a consumer to the inputs.
    pub(crate) fn subscribe(projector: Projector, counters: Arc<RunCounters>, parts: GroupSourceParts) -> anyhow::Result<Self> {
        let settings = projector.settings.clone();
        let consumer = build_consumer(&settings, counters.clone())?;
        Ok(KafkaGroupSource {
            progress_key: projector.progress_key(),
            max_batch: settings.max_batch.max(1),
            settings,
            projector,
            counters,
            consumer,
            closing: None,
            lost: parts.lost,
            stalled: parts.stalled,
            forget_generations: parts.forget_generations,
            conn: parts.conn,
            carry: Vec::new(),
            occurred: Vec::new(),
        })
    }

    fn instance(&self) -> String {
        self.projector.instance()
    }

    fn parse(&self, m: OwnedMessage) -> Parsed {
        parsed(m, self.settings.max_event_bytes)
    }

    /// A new consumer in place of one the group left out (or librdkafka failed for good); what
    /// was received is read again by whoever gets its partitions (from the progress in Redis).
    fn renew_consumer(&mut self) {
        if self.closing.as_ref().is_some_and(|c| !c.is_finished()) {
            warn!("the consumer replaced earlier is still closing: no new consumer yet");
            return;
        }
        match build_consumer(&self.settings, self.counters.clone()) {
            Ok(fresh) => {
                self.carry.clear();
                let old = std::mem::replace(&mut self.consumer, fresh);
                // Closing leaves the group; it may block (a coordinator gone): off the async
                // workers, and never waited for.
                self.closing = Some(tokio::task::spawn_blocking(move || drop(old)));
                self.counters.consumers_renewed.fetch_add(1, Ordering::Relaxed);
                info!("new consumer subscribed");
            }
            Err(e) => warn!(error = %e, "new consumer not made; the next stall or fatal error tries again"),
        }
    }

    /// After Redis lost the projection: a new state (instance, target), then every assigned
    /// partition back to what Redis holds (nothing: its beginning). false: Redis could not be
    /// written (the caller tries again).
    async fn start_again_from_redis(&mut self) -> bool {
        // What was received belongs to positions Redis no longer holds.
        self.carry.clear();
        self.forget_generations.ask();
        self.projector.write_counters.clear();
        let s = &self.settings;
        match state::ensure(&mut self.conn, &s.keys, &s.group_id, &self.projector.watermarks, &s.topics.inputs()).await {
            Ok(i) => *self.projector.instance.lock().expect("not poisoned") = i,
            Err(e) => {
                warn!(error = %e, "projection state not written; retrying");
                return false;
            }
        }
        let Ok(mut tpl) = self.consumer.assignment() else { return true };
        self.consumer.context().positions.assign_offsets(&mut tpl);
        match self.consumer.seek_partitions(tpl, Duration::from_secs(10)) {
            Ok(r) => {
                let failed: Vec<String> = r
                    .elements()
                    .iter()
                    .filter_map(|e| e.error().err().map(|err| format!("{}/{}: {err}", e.topic(), e.partition())))
                    .collect();
                if failed.is_empty() {
                    info!(partitions = r.count(), "partitions positioned at what redis holds");
                } else {
                    warn!(failed = ?failed, "some partitions not positioned at what redis holds");
                }
            }
            Err(e) => warn!(error = %e, "seek after a lost projection failed"),
        }
        if let Err(e) = load_library(&mut self.conn).await {
            warn!(error = %e, "function library not loaded");
        }
        true
    }

    /// What was received, as one batch.
    fn take_batch(&mut self) -> SourceBatch {
        batch_of(std::mem::take(&mut self.carry), &mut self.occurred)
    }

    /// Records `checkpoint` as progress in Redis (only while Redis holds the projection this
    /// projector writes for), then stores it for the group's commit. false: Redis no longer
    /// holds the projection (nothing recorded or stored).
    async fn record(&mut self, checkpoint: &Checkpoint) -> bool {
        let fields = checkpoint.fields();
        let instance = self.instance();
        // Retried a few times (about 3 s): the batch is applied, so its progress should be
        // recorded, or the loss of the projection learnt. If Redis stays unreachable the record
        // is skipped: a later batch records these partitions, and until then a restart re-reads
        // them (idempotent).
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=5 {
            match progress_cmd(&self.settings.keys, &self.progress_key, &instance, &fields)
                .query_async::<ProgressOutcome>(&mut self.conn)
                .await
            {
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
        for ((topic, partition), offset) in checkpoint.iter() {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            // A partition revoked while this batch was built: its new owner re-reads the batch
            // (idempotently) from the progress in Redis.
            debug!(error = %e, "offsets not stored (partition no longer assigned)");
        }
        true
    }

    /// At the end of a run: what was stored committed, and a projection stopped once caught up
    /// (a backfill) not left marked `building` until some projector's next watch.
    pub async fn finish(mut self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => info!("committed stored offsets; projector stopped"),
            Err(e) => debug!(error = %e, "nothing to commit at shutdown"),
        }
        let instance = self.instance();
        if let Err(e) = state::check_whole(&mut self.conn, &self.settings.keys, &instance, &self.progress_key).await {
            debug!(error = %e, "wholeness not checked at exit");
        }
    }
}

impl Source for KafkaGroupSource {
    async fn next_batch(&mut self, max: usize) -> anyhow::Result<Option<SourceBatch>> {
        self.max_batch = max;
        loop {
            if self.stalled.take() {
                self.renew_consumer();
                continue;
            }
            if self.lost.take() {
                if !self.start_again_from_redis().await {
                    // Redis is unreachable: try again on the next turn (the pipeline hears
                    // shutdown meanwhile).
                    self.lost.raise();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
            if self.carry.is_empty() {
                let first = tokio::select! {
                    biased;
                    _ = self.lost.notify.notified() => continue,
                    _ = self.stalled.notify.notified() => continue,
                    m = self.consumer.recv() => m.map(|m| m.detach()),
                };
                match first {
                    Ok(m) => {
                        let parsed = self.parse(m);
                        self.carry.push(parsed);
                    }
                    Err(e) => {
                        // A fatal error (a static member fenced by a newer one with its
                        // `group.instance.id`, ...) ends the consumer for good: a new one is made.
                        if let Some((code, reason)) = self.consumer.client().fatal_error() {
                            events::ConsumerFatal { code: &code.to_string(), reason: &reason }.emit();
                            self.stalled.raise();
                        } else {
                            warn!(error = %e, "kafka poll error; the client reconnects by itself");
                        }
                        continue;
                    }
                }
            }
            let max_event_bytes = self.settings.max_event_bytes;
            crate::kafka::fill_batch(&self.consumer, &mut self.carry, max, self.settings.linger, |m| parsed(m, max_event_bytes)).await;
            return Ok(Some(self.take_batch()));
        }
    }

    async fn read_ahead(&mut self) {
        if self.carry.len() >= self.max_batch {
            return std::future::pending().await;
        }
        match self.consumer.recv().await {
            Ok(m) => {
                let parsed = self.parse(m.detach());
                self.carry.push(parsed);
            }
            Err(e) => warn!(error = %e, "kafka poll error"),
        }
    }

    async fn applied(&mut self, batch: &SourceBatch, _outcomes: &[Outcome]) -> anyhow::Result<()> {
        let Some(checkpoint) = &batch.checkpoint else { return Ok(()) };
        if !self.record(checkpoint).await {
            self.lost.raise();
            return Ok(());
        }
        // Freshness: from each applied event's `occurredAt` to now (its batch recorded).
        let now = board_model::time::now_millis();
        events::Freshness(self.occurred.iter().map(|at| (now - at).max(0) as f64 / 1000.0)).emit();
        Ok(())
    }

    fn target_moved(&self) -> bool {
        self.lost.is_raised()
    }

    /// Nothing else is done until the restart is made (Redis or Kafka may be unreachable
    /// meanwhile): re-seeking first would forget the orgs that went back and, on a shard whose
    /// progress lives elsewhere, skip the events they lost. Then the partitions start again from
    /// what Redis holds (`lost`).
    async fn given_up(&mut self, why: anyhow::Error) -> anyhow::Result<()> {
        info!(reason = %why, "batch given up; starting again from what redis holds");
        let mine = self.instance();
        let mut backoff = Duration::from_millis(200);
        while let Err(e) = restart_if_counters_went_back(&mut self.conn, &self.projector, &mine).await {
            warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "restart after a rewind not made yet; retrying");
            tokio::time::sleep(backoff).await;
            backoff = crate::pipeline::next_backoff(backoff);
        }
        self.lost.raise();
        Ok(())
    }
}

/// Received messages as one batch: events with their origins, poison records kept whole for
/// their dead letters, and the offset after each partition's last record as the checkpoint;
/// `occurred` gets when each event occurred (those that say).
fn batch_of(received: Vec<Parsed>, occurred: &mut Vec<i64>) -> SourceBatch {
    let mut batch = SourceBatch { read: received.len() as u64, ..SourceBatch::default() };
    let mut checkpoint = Checkpoint::default();
    occurred.clear();
    for (m, parsed) in received {
        checkpoint.advance(m.topic(), m.partition(), m.offset());
        let origin = Origin { topic: m.topic().to_string(), partition: m.partition(), offset: m.offset() };
        match parsed {
            Ok((event, at)) => {
                occurred.extend(at);
                batch.push(event, Some(origin));
            }
            Err(reason) => {
                batch.poison.push(Poison { origin, key: m.key().map(<[u8]>::to_vec), payload: m.payload().map(<[u8]>::to_vec), reason })
            }
        }
    }
    batch.checkpoint = Some(checkpoint);
    batch
}

/// A message and what parsing made of it (the event and when it occurred).
type Parsed = (OwnedMessage, Result<(Event, Option<i64>), PoisonReason>);

/// A message with what parsing made of it.
fn parsed(m: OwnedMessage, max_event_bytes: usize) -> Parsed {
    let event = parse_message(&m, max_event_bytes);
    (m, event)
}

/// An event larger than `max_event_bytes` is refused unparsed (bounded work per event).
fn parse_message(m: &OwnedMessage, max_event_bytes: usize) -> Result<(Event, Option<i64>), PoisonReason> {
    let payload = m.payload().ok_or(PoisonReason::InvalidJson("empty message".into()))?;
    if payload.len() > max_event_bytes {
        return Err(PoisonReason::TooLarge { size: payload.len(), limit: max_event_bytes });
    }
    parse_event_timed(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str, partition: i32, offset: i64, payload: &[u8]) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload.to_vec()),
            Some(b"k".to_vec()),
            topic.into(),
            rdkafka::Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    fn user(id: &str) -> Vec<u8> {
        let org = "64f0a1b2c3d4e5f6a7b8c9d1";
        serde_json::json!({"type": "user.upserted", "eventId": "e1", "orgId": org, "occurredAt": "2026-01-02T03:04:05.000Z",
            "user": {"_id": id, "orgId": org, "version": 1}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_batch_carries_its_events_poison_and_the_offset_after_each_partitions_last_record() {
        let received: Vec<Parsed> = [
            message("t", 0, 7, &user("64f0a1b2c3d4e5f6a7b8c9d2")),
            message("t", 1, 3, b"{not json"),
            message("t", 0, 9, &user("64f0a1b2c3d4e5f6a7b8c9d3")),
        ]
        .into_iter()
        .map(|m| {
            let parsed = parse_message(&m, 1 << 20);
            (m, parsed)
        })
        .collect();
        let mut occurred = vec![42];
        let batch = batch_of(received, &mut occurred);
        assert_eq!(batch.read, 3);
        assert_eq!(batch.events.len(), 2);
        let offsets: Vec<i64> = batch.origins.iter().map(|o| o.as_ref().unwrap().offset).collect();
        assert_eq!(offsets, [7, 9]);
        assert_eq!(batch.poison.len(), 1);
        let poison = &batch.poison[0];
        assert_eq!((poison.origin.partition, poison.origin.offset, poison.reason.code()), (1, 3, "invalid_json"));
        assert_eq!((poison.key.as_deref(), poison.payload.as_deref()), (Some(&b"k"[..]), Some(&b"{not json"[..])));
        let checkpoint = batch.checkpoint.unwrap();
        assert_eq!((checkpoint.get("t", 0), checkpoint.get("t", 1)), (Some(10), Some(4)), "poison moves the checkpoint too");
        assert_eq!(occurred.len(), 2, "one time per event, the earlier batch's forgotten");
    }

    #[test]
    fn a_record_over_the_limit_is_poison_unparsed() {
        let m = message("t", 0, 1, &user("64f0a1b2c3d4e5f6a7b8c9d2"));
        assert_eq!(parse_message(&m, 10).unwrap_err().code(), "too_large");
        assert!(parse_message(&m, 1 << 20).is_ok());
    }
}
