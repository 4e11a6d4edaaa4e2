//! What the projector reports, vector `internal_events` style: each event a struct whose
//! `emit()` logs it and counts it. Every metric name of the projector lives here (README
//! names those operators alert on); the code that notices something only builds the event.
use std::time::Duration;
use tracing::{debug, info, warn};

/// A commit found a guarded field changed since it was read: the batch is read and computed
/// again.
pub struct CommitConflict<'a> {
    pub org: &'a str,
}

impl CommitConflict<'_> {
    pub fn emit(self) {
        debug!(org = self.org, "commit conflict; reading again");
        metrics::counter!("pb_commit_conflicts_total").increment(1);
    }
}

/// A commit found its org in another generation (a rebuild switched it): computed again there.
pub struct CommitMoved<'a> {
    pub org: &'a str,
    pub generation: &'a board_model::keys::Generation,
}

impl CommitMoved<'_> {
    pub fn emit(self) {
        debug!(org = self.org, generation = %self.generation, "org switched to another generation; computing again there");
        metrics::counter!("pb_commit_moved_total").increment(1);
    }
}

/// A batch was acknowledged without a replica's copy (none attached, or none answered in time).
pub struct CommitUnreplicated;

impl CommitUnreplicated {
    pub fn emit(self) {
        metrics::counter!("pb_commit_unreplicated_total").increment(1);
    }
}

/// A batch could not be applied (Redis unreachable, a Function failing): retried after a pause.
pub struct ApplyRetried<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub retry_in: Duration,
}

impl ApplyRetried<'_> {
    pub fn emit(self) {
        warn!(error = %self.error, retry_in_ms = self.retry_in.as_millis() as u64, "batch not applied; retrying");
        metrics::counter!("pb_apply_retries_total").increment(1);
    }
}

/// One batch applied: how many events changed the projection, how many were older than it.
pub struct BatchApplied {
    pub applied: u64,
    pub stale: u64,
    pub took: Duration,
}

impl BatchApplied {
    pub fn emit(self) {
        metrics::counter!("pb_events_applied_total").increment(self.applied);
        metrics::counter!("pb_events_stale_total").increment(self.stale);
        metrics::histogram!("pb_batch_apply_seconds").record(self.took.as_secs_f64());
    }
}

/// From each applied event's `occurredAt` to its batch's acknowledgment, in seconds.
pub struct Freshness<I: Iterator<Item = f64>>(pub I);

impl<I: Iterator<Item = f64>> Freshness<I> {
    pub fn emit(self) {
        let histogram = metrics::histogram!("pb_projection_freshness_seconds");
        for seconds in self.0 {
            histogram.record(seconds);
        }
    }
}

/// An event that cannot be applied went to the dead-letter topic (or was parked).
pub struct EventDeadLettered<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub code: &'static str,
    pub reason: &'a dyn std::fmt::Display,
}

impl EventDeadLettered<'_> {
    pub fn emit(self) {
        warn!(topic = self.topic, partition = self.partition, offset = self.offset, code = self.code, reason = %self.reason, "event dead-lettered");
        metrics::counter!("pb_events_dead_lettered_total", "code" => self.code).increment(1);
    }
}

/// The dead-letter topic refused a dead letter: it was parked in Redis instead.
pub struct DeadLetterParked<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub code: &'static str,
    pub dlq_topic: &'a str,
    pub refusal: &'a dyn std::fmt::Display,
}

impl DeadLetterParked<'_> {
    pub fn emit(self) {
        warn!(topic = self.topic, partition = self.partition, offset = self.offset, dlq_topic = self.dlq_topic,
            refusal = %self.refusal, "the dead-letter topic did not take the event; parked in redis");
        metrics::counter!("pb_dead_letters_parked_total", "code" => self.code).increment(1);
    }
}

/// How many dead letters wait parked in Redis.
pub struct ParkedDeadLetters {
    pub held: u64,
}

impl ParkedDeadLetters {
    pub fn emit(self) {
        metrics::gauge!("pb_dead_letters_parked").set(self.held as f64);
    }
}

/// The parked dead letters reached their cap: the partition stops until an operator acts (the
/// caller reports the error).
pub struct ParkRefused;

impl ParkRefused {
    pub fn emit(self) {
        metrics::counter!("pb_dead_letters_park_refused_total").increment(1);
    }
}

/// librdkafka's view of a partition's lag (its statistics callback).
pub struct ConsumerLag<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub lag: i64,
}

impl ConsumerLag<'_> {
    pub fn emit(self) {
        metrics::gauge!("pb_consumer_lag", "topic" => self.topic.to_string(), "partition" => self.partition.to_string())
            .set(self.lag as f64);
    }
}

/// Redis held no projection: this projector made a new `building` one (a first start, or a
/// loss).
pub struct ProjectionRestarted<'a> {
    pub instance: &'a str,
    pub partitions: usize,
}

impl ProjectionRestarted<'_> {
    pub fn emit(self) {
        warn!(
            instance = self.instance,
            partitions = self.partitions,
            "no projection in redis: building it from what redis holds (the partitions' beginnings)"
        );
        metrics::counter!("pb_projection_restarts_total").increment(1);
    }
}

/// Whether the projection is whole, as the last check found.
pub struct ProjectionWhole(pub bool);

impl ProjectionWhole {
    pub fn emit(self) {
        metrics::gauge!("pb_projection_whole").set(if self.0 { 1.0 } else { 0.0 });
    }
}

/// A cluster primary restarted empty: its orgs are lost and the projection is built again
/// (reported each check until handled).
pub struct ShardLost<'a> {
    pub node: &'a str,
}

impl ShardLost<'_> {
    pub fn emit(self) {
        warn!(node = self.node, "a redis cluster primary restarted empty: its orgs are lost; building the projection again");
    }
}

/// A lost shard was handled: the projection was forgotten, to be built again (counted once a
/// loss).
pub struct ShardLossHandled;

impl ShardLossHandled {
    pub fn emit(self) {
        metrics::counter!("pb_shard_losses_total").increment(1);
    }
}

/// Redis went back to an earlier state: the projection restarted from what its data holds.
pub struct RedisRewound;

impl RedisRewound {
    pub fn emit(self) {
        info!("the projection restarted from what the rewound redis holds");
        metrics::counter!("pb_redis_rewinds_total").increment(1);
    }
}

/// A watermarks look failed or ran out of time: its client is dropped and the next look makes a
/// new one (`progress::Watermarks`).
pub struct WatermarksClientDropped<'a> {
    pub why: &'a str,
}

impl WatermarksClientDropped<'_> {
    pub fn emit(self) {
        warn!(why = self.why, "watermarks client dropped; the next look makes a new one");
        metrics::counter!("pb_watermarks_clients_dropped_total").increment(1);
    }
}

/// This projector held no partition for `after` while events waited and nobody applied them:
/// its consumer is made anew to join the group afresh (`group_watch`).
pub struct GroupStalled {
    pub lag: i64,
    pub after: Duration,
}

impl GroupStalled {
    pub fn emit(self) {
        warn!(lag = self.lag, after_s = self.after.as_secs(), "the consumer group left this projector out; making a new consumer");
        metrics::counter!("pb_group_stalls_total").increment(1);
    }
}

/// librdkafka put the consumer in a fatal state (it never consumes again): a new one is made.
pub struct ConsumerFatal<'a> {
    pub code: &'a str,
    pub reason: &'a str,
}

impl ConsumerFatal<'_> {
    pub fn emit(self) {
        warn!(code = self.code, reason = self.reason, "the kafka consumer failed for good; making a new consumer");
        metrics::counter!("pb_consumer_fatal_errors_total").increment(1);
    }
}
