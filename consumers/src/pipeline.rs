//! One ingestion pipeline over pluggable sources (quickwit's `Source` shape). A `Source` gives
//! batches of events, each with where it was read and where the source stands once it is
//! applied (a typed `Checkpoint`); the pipeline applies each batch to the Redis target (and
//! sends its poison records to the dead letters), retrying while the target answers a
//! transient error, and only then lets the source record its checkpoint: after the data, so a
//! rerun reads at most the last batch again, idempotently.
//!
//! The sources: `project`'s consumer group (`group_source::KafkaGroupSource`, read-ahead while a
//! batch is applied, dead letters, lost projections, rewinds, renewed consumers), `rebuild`'s
//! topic replay (`ops::rebuild::replay`) and its MongoDB snapshot (`ops::rebuild::snapshot`).
//! One cancellation future (a shutdown, a lost lease) stops the pipeline between batches and
//! during retries; a batch being applied is finished first.
use crate::apply::{Position, RedisApplier, Transient};
use crate::batch::Outcome;
use crate::dead_letter::DeadLetterSink;
use crate::projector::RunCounters;
use board_model::events::{Event, PoisonReason};
use board_model::offsets::Checkpoint;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// Where one record was read. A snapshot's documents have none: their source's checkpoint says
/// what they reflect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A record that cannot be applied, kept whole for its dead letter.
#[derive(Debug, Clone)]
pub struct Poison {
    pub origin: Origin,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub reason: PoisonReason,
}

/// What a source gives at a time.
#[derive(Debug, Default)]
pub struct SourceBatch {
    pub events: Vec<Event>,
    /// One per event.
    pub origins: Vec<Option<Origin>>,
    /// Records that cannot be applied: sent to the dead letters before the checkpoint is
    /// recorded (skipped by a pipeline without dead letters: the rebuild's, whose records the
    /// live projectors dead-lettered).
    pub poison: Vec<Poison>,
    /// Records read to make this batch, the ones skipped included (unparsable, other orgs').
    pub read: u64,
    /// Where the source stands once this batch is applied (the next offset per partition: the
    /// group source's covers the partitions the batch read from, the replay's its whole
    /// position). `None`: a snapshot's documents (their checkpoint is recorded once the whole
    /// snapshot is applied).
    pub checkpoint: Option<Checkpoint>,
}

impl SourceBatch {
    pub fn push(&mut self, event: Event, origin: Option<Origin>) {
        self.events.push(event);
        self.origins.push(origin);
    }

    /// The applier's view of the origins (`partition -1`: none).
    fn positions(&self) -> Vec<Position<'_>> {
        self.origins
            .iter()
            .map(|o| match o {
                Some(o) => Position { topic: &o.topic, partition: o.partition, offset: o.offset },
                None => Position { topic: "", partition: -1, offset: -1 },
            })
            .collect()
    }
}

/// A source of events for the pipeline.
pub trait Source {
    /// The next batch of at most `max` events; `None` once the source has given everything it
    /// was asked for (a snapshot read, a replay at the ends it measured). Cancel-safe: the
    /// pipeline drops it when cancelled (what it read is read again by the next run).
    fn next_batch(&mut self, max: usize) -> impl Future<Output = anyhow::Result<Option<SourceBatch>>>;

    /// Reads ahead while a batch is applied, so reading and parsing overlap Redis' work; must be
    /// cancel-safe (it is dropped as soon as the batch is applied). Default: nothing.
    fn read_ahead(&mut self) -> impl Future<Output = ()> {
        std::future::pending()
    }

    /// Called once `batch` is applied, before the next one is asked for: the source records its
    /// checkpoint (and anything else that must follow the data).
    fn applied(&mut self, batch: &SourceBatch, outcomes: &[Outcome]) -> impl Future<Output = anyhow::Result<()>>;

    /// Whether retrying a batch the target refused is pointless because the target moved under
    /// the source (Redis lost the projection): the batch is then given up.
    fn target_moved(&self) -> bool {
        false
    }

    /// The batch was given up (Redis went back in time, or `target_moved`): Ok to go on (the
    /// source starts again from what Redis holds), an error to stop. Default: stop.
    fn given_up(&mut self, why: anyhow::Error) -> impl Future<Output = anyhow::Result<()>> {
        async move { Err(why) }
    }
}

/// Where batches go: the Redis applier and, for sources whose records can be poison, the dead
/// letters; the run's counters follow every batch.
pub struct Sink<'a> {
    pub applier: &'a mut RedisApplier,
    pub dead_letters: Option<&'a DeadLetterSink>,
    pub counters: &'a RunCounters,
    /// Most events per batch.
    pub max_batch: usize,
    /// Whether batches count in the projector's metrics (`pb_events_applied_total`, ...): a
    /// rebuild's do not (it reports its own progress gauges).
    pub projector_metrics: bool,
}

impl<'a> Sink<'a> {
    /// A sink without dead letters and with counters of its own (the rebuild's sources).
    pub fn new(applier: &'a mut RedisApplier, counters: &'a RunCounters, max_batch: usize) -> Self {
        Sink { applier, dead_letters: None, counters, max_batch, projector_metrics: false }
    }

    /// One attempt: the events applied, then the poison records sent to the dead letters.
    async fn apply_once(
        &mut self,
        events: &[&Event],
        positions: &[Position<'_>],
        batch: &SourceBatch,
        attempt: u32,
    ) -> Result<Vec<Outcome>, Transient> {
        let outcomes = self.applier.apply(events, positions).await?;
        if let (Some(sink), false) = (self.dead_letters, batch.poison.is_empty()) {
            sink.send_all(&mut self.applier.connection(), &batch.poison, attempt, &self.counters.parked).await?;
        }
        Ok(outcomes)
    }
}

/// What a drained source gave.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    pub read: u64,
    pub applied: u64,
    pub stale: u64,
    /// Stopped by the cancellation future, not because the source was exhausted.
    pub cancelled: bool,
}

/// How one batch's application ended.
#[derive(Debug)]
enum Step {
    Applied(Vec<Outcome>),
    /// Not retried (see `Source::given_up`).
    GivenUp(anyhow::Error),
    Cancelled,
}

/// Applies everything `source` gives, batch after batch, until it is exhausted, an error
/// stops it, or `cancel` resolves (between batches and during retries; never mid-apply).
pub async fn drain<S: Source>(source: &mut S, sink: &mut Sink<'_>, cancel: impl Future<Output = ()>) -> anyhow::Result<Drained> {
    tokio::pin!(cancel);
    let mut drained = Drained::default();
    let max = sink.max_batch.max(1);
    loop {
        let next = tokio::select! {
            biased;
            _ = &mut cancel => return Ok(Drained { cancelled: true, ..drained }),
            b = source.next_batch(max) => b?,
        };
        let Some(batch) = next else { return Ok(drained) };
        let counters = sink.counters;
        let _ = counters.first_batch_at.compare_exchange(0, board_model::time::now_millis(), Ordering::Relaxed, Ordering::Relaxed);
        drained.read += batch.read;
        match apply_step(source, sink, &batch, cancel.as_mut()).await {
            Step::Applied(outcomes) => {
                let applied = outcomes.iter().filter(|o| **o == Outcome::Applied).count() as u64;
                drained.applied += applied;
                drained.stale += outcomes.len() as u64 - applied;
                source.applied(&batch, &outcomes).await?;
                // A checkpoint the target refused (the projection moved) counts no batch.
                if !source.target_moved() {
                    counters.batches.fetch_add(1, Ordering::Relaxed);
                    counters.last_batch_at.store(board_model::time::now_millis(), Ordering::Relaxed);
                }
            }
            // Cancelled while the source starts again: the run ends, and with it whatever the
            // source knew in memory (a rewind is found again by the next run's write marks).
            Step::GivenUp(why) => tokio::select! {
                biased;
                _ = &mut cancel => return Ok(Drained { cancelled: true, ..drained }),
                r = source.given_up(why) => r?,
            },
            Step::Cancelled => return Ok(Drained { cancelled: true, ..drained }),
        }
    }
}

/// The batch applied (and dead-lettered), retried with a growing pause (100 ms to 5 s) while
/// Redis or the dead-letter topic refuse it; given up once Redis went back in time (every
/// retry would meet the same keys) or the source's sink moved; the source reads ahead
/// meanwhile.
async fn apply_step<S: Source>(
    source: &mut S,
    sink: &mut Sink<'_>,
    batch: &SourceBatch,
    mut cancel: Pin<&mut impl Future<Output = ()>>,
) -> Step {
    let events: Vec<&Event> = batch.events.iter().collect();
    let positions = batch.positions();
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = {
            let applying = sink.apply_once(&events, &positions, batch, attempt);
            tokio::pin!(applying);
            loop {
                tokio::select! {
                    biased;
                    r = &mut applying => break r,
                    _ = source.read_ahead() => {}
                }
            }
        };
        match result {
            Ok(outcomes) => {
                let applied = outcomes.iter().filter(|o| **o == Outcome::Applied).count() as u64;
                let (stale, poison) = (outcomes.len() as u64 - applied, batch.poison.len() as u64);
                let counters = sink.counters;
                counters.applied.fetch_add(applied, Ordering::Relaxed);
                counters.stale.fetch_add(stale, Ordering::Relaxed);
                if sink.dead_letters.is_some() {
                    counters.dead_lettered.fetch_add(poison, Ordering::Relaxed);
                }
                if sink.projector_metrics {
                    crate::events::BatchApplied { applied, stale, took: started.elapsed() }.emit();
                }
                return Step::Applied(outcomes);
            }
            Err(e) if sink.applier.write_counters.any_went_back() => {
                return Step::GivenUp(anyhow::anyhow!(
                    "redis went back to an earlier state while applying ({e}): run again, it resumes from what redis holds"
                ))
            }
            Err(e) if source.target_moved() => return Step::GivenUp(anyhow::anyhow!("the projection moved while applying: {e}")),
            Err(e) => {
                sink.counters.redis_retries.fetch_add(1, Ordering::Relaxed);
                crate::events::ApplyRetried { error: &e, retry_in: backoff }.emit();
                tokio::select! {
                    biased;
                    _ = &mut cancel => return Step::Cancelled,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = next_backoff(backoff);
            }
        }
    }
}

/// The next pause of a retry: twice the last, at most 5 s.
pub fn next_backoff(now: Duration) -> Duration {
    (now * 2).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_doubles_up_to_five_seconds() {
        let mut b = Duration::from_millis(100);
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(b.as_millis());
            b = next_backoff(b);
        }
        assert_eq!(seen, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn an_event_without_an_origin_is_applied_without_a_position() {
        let mut batch = SourceBatch::default();
        let user = board_model::model::User { id: "u1".into(), org_id: "o1".into(), ..Default::default() };
        batch.push(Event::UserUpserted(user.clone()), None);
        batch.push(Event::UserUpserted(user), Some(Origin { topic: "t".into(), partition: 2, offset: 7 }));
        let p = batch.positions();
        assert_eq!((p[0].topic, p[0].partition, p[0].offset), ("", -1, -1));
        assert_eq!((p[1].topic, p[1].partition, p[1].offset), ("t", 2, 7));
    }
}
