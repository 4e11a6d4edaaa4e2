//! One ingestion pipeline over pluggable sources (quickwit's `Source` shape): a `Source` gives
//! batches of events with where each was read; the pipeline applies each batch to the Redis
//! target, retrying while the applier answers a transient error (Redis unreachable, a Function
//! failing), and only then lets the source record how far it is — after the data, so a rerun
//! reads at most the last batch again, idempotently. Redis gone back in time is not retried:
//! the run stops and says so (a rerun resumes from what Redis holds).
//!
//! `rebuild`'s sources are its topic replay (`ops::rebuild::replay`, from a typed
//! `Checkpoint`) and its MongoDB snapshot (`ops::rebuild::snapshot`). `project`'s consumer
//! group applies through `apply_with_retry`'s sibling in `projector.rs`, whose retries also
//! hear shutdown, lost projections and rewinds, and whose poison events go to dead letters.
use crate::apply::{Position, RedisApplier};
use crate::batch::Outcome;
use board_model::events::Event;
use std::future::Future;
use std::time::Duration;

/// Where one event was read. A snapshot's documents have none: their source's checkpoint says
/// what they reflect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What a source gives at a time.
#[derive(Debug, Default)]
pub struct SourceBatch {
    pub events: Vec<Event>,
    /// One per event.
    pub origins: Vec<Option<Origin>>,
    /// Records read to make this batch, the ones skipped included (unparsable, other orgs').
    pub read: u64,
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
    /// was asked for (a snapshot read, a replay at the ends it measured).
    fn next_batch(&mut self, max: usize) -> impl Future<Output = anyhow::Result<Option<SourceBatch>>>;

    /// Called once `batch` is applied, before the next one is asked for: the source records its
    /// checkpoint (and anything else that must follow the data).
    fn applied(&mut self, batch: &SourceBatch, outcomes: &[Outcome]) -> impl Future<Output = anyhow::Result<()>>;
}

/// What a drained source gave.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    pub read: u64,
    pub applied: u64,
    pub stale: u64,
}

/// Applies everything `source` gives, batch after batch. `keep_going` is asked before each
/// batch and between retries: an error from it stops the pipeline (a lost lease, a shutdown).
pub async fn drain<S: Source>(
    source: &mut S,
    applier: &mut RedisApplier,
    max_batch: usize,
    keep_going: &impl Fn() -> anyhow::Result<()>,
) -> anyhow::Result<Drained> {
    let mut drained = Drained::default();
    loop {
        keep_going()?;
        let Some(batch) = source.next_batch(max_batch.max(1)).await? else { return Ok(drained) };
        let outcomes = apply_with_retry(applier, &batch, keep_going).await?;
        drained.read += batch.read;
        drained.applied += outcomes.iter().filter(|o| **o == Outcome::Applied).count() as u64;
        drained.stale += outcomes.iter().filter(|o| **o == Outcome::Stale).count() as u64;
        source.applied(&batch, &outcomes).await?;
    }
}

/// The batch applied, retried with a growing pause (100 ms to 5 s) while Redis refuses it; an
/// error once Redis went back in time (every retry would meet the same keys).
pub async fn apply_with_retry(
    applier: &mut RedisApplier,
    batch: &SourceBatch,
    keep_going: &impl Fn() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Outcome>> {
    if batch.events.is_empty() {
        return Ok(Vec::new());
    }
    let events: Vec<&Event> = batch.events.iter().collect();
    let positions = batch.positions();
    let mut backoff = Duration::from_millis(100);
    loop {
        match applier.apply(&events, &positions).await {
            Ok(outcomes) => return Ok(outcomes),
            Err(e) if applier.write_counters.any_went_back() => {
                anyhow::bail!("redis went back to an earlier state while applying ({e}): run again, it resumes from what redis holds")
            }
            Err(e) => {
                crate::events::ApplyRetried { error: &e, retry_in: backoff }.emit();
                keep_going()?;
                tokio::time::sleep(backoff).await;
                backoff = next_backoff(backoff);
            }
        }
    }
}

/// The next pause of a retry: twice the last, at most 5 s (the projector's loop grows its pauses
/// the same way).
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
