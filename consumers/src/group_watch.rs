//! The consumer group's watchdog. librdkafka can leave a consumer out of its group for good
//! after the group's coordinator restarts: no partitions, no error, no rejoin
//! (confluentinc/librdkafka#2944, #3082, #3396; seen here in the chaos run's broker stop/start,
//! where the projection then waited for ever). A projector that holds no partitions while the
//! events wait and nobody applies them makes a new consumer, which joins the group afresh.
//!
//! `StallWatch` is the decision (pure); `spawn` looks every few seconds and raises the signal
//! the consumer loop acts on.
use crate::progress::Watermarks;
use crate::signal::Signal;
use crate::RunCounters;
use board_redis::redis_conn::RedisConn;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::debug;

/// How long a projector may hold no partition, with events waiting and no progress made by
/// anyone, before it makes a new consumer.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);

/// How often the watchdog looks.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// The group is stalled for this member when, for `after`, it held no partition while the
/// projection lagged and its applied total did not move (no other member applied anything
/// either: a group that merely has more members than partitions keeps moving).
#[derive(Debug)]
pub struct StallWatch {
    after: Duration,
    /// Since when nothing moved, and the applied total then.
    idle: Option<(Instant, i64)>,
}

impl StallWatch {
    pub fn new(after: Duration) -> Self {
        StallWatch { after, idle: None }
    }

    /// One look: partitions this member holds, the group's applied total and its lag.
    /// true: stalled (the watch starts over).
    pub fn look(&mut self, now: Instant, assigned: i64, applied: i64, lag: i64) -> bool {
        if assigned > 0 || lag <= 0 {
            self.idle = None;
            return false;
        }
        match self.idle {
            Some((since, then)) if then == applied => {
                if now.duration_since(since) >= self.after {
                    self.idle = None;
                    return true;
                }
                false
            }
            // First idle look, or someone applied events meanwhile: the clock starts now.
            _ => {
                self.idle = Some((now, applied));
                false
            }
        }
    }
}

/// Looks every few seconds for as long as the task lives; raises `stalled` when the group left
/// this member out.
pub fn spawn(
    watermarks: Watermarks,
    mut conn: RedisConn,
    topics: Vec<String>,
    progress_key: String,
    counters: Arc<RunCounters>,
    after: Duration,
    stalled: Arc<Signal>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut watch = StallWatch::new(after);
        loop {
            tokio::time::sleep(LOOK_EVERY).await;
            let lag = match watermarks.lag(&topics, &mut conn, &progress_key).await {
                Ok(lag) => lag,
                Err(e) => {
                    // Unknown is not stalled: the brokers or Redis are down, the loop says so.
                    debug!(error = %e, "group watch: lag not measured");
                    continue;
                }
            };
            let held = counters.assigned_partitions.load(Ordering::Relaxed);
            if watch.look(Instant::now(), held, lag.applied(), lag.total()) {
                counters.group_stalls.fetch_add(1, Ordering::Relaxed);
                crate::events::GroupStalled { lag: lag.total(), after }.emit();
                stalled.raise();
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn no_partitions_no_progress_and_events_waiting_for_the_bound_is_a_stall() {
        let t = Instant::now();
        let mut w = StallWatch::new(Duration::from_secs(60));
        assert!(!w.look(t, 0, 100, 5));
        assert!(!w.look(at(t, 59), 0, 100, 5));
        assert!(w.look(at(t, 60), 0, 100, 5));
        // It starts over: the new consumer gets its own bound.
        assert!(!w.look(at(t, 61), 0, 100, 5));
        assert!(!w.look(at(t, 120), 0, 100, 5));
        assert!(w.look(at(t, 121), 0, 100, 5));
    }

    #[test]
    fn holding_partitions_or_nothing_to_apply_is_never_a_stall() {
        let t = Instant::now();
        let mut w = StallWatch::new(Duration::from_secs(60));
        for s in (0..600).step_by(5) {
            assert!(!w.look(at(t, s), 3, 100, 5), "a member with partitions applies them itself");
        }
        let mut w = StallWatch::new(Duration::from_secs(60));
        for s in (0..600).step_by(5) {
            assert!(!w.look(at(t, s), 0, 100, 0), "an idle group with nothing to apply is fine");
        }
    }

    #[test]
    fn another_member_applying_events_restarts_the_clock() {
        let t = Instant::now();
        let mut w = StallWatch::new(Duration::from_secs(60));
        assert!(!w.look(t, 0, 100, 5));
        assert!(!w.look(at(t, 50), 0, 140, 5), "the others moved");
        assert!(!w.look(at(t, 100), 0, 140, 5), "50 s since the last move");
        assert!(w.look(at(t, 110), 0, 140, 5));
    }

    #[test]
    fn a_partition_held_in_between_restarts_the_clock() {
        let t = Instant::now();
        let mut w = StallWatch::new(Duration::from_secs(60));
        assert!(!w.look(t, 0, 100, 5));
        assert!(!w.look(at(t, 30), 2, 100, 5));
        assert!(!w.look(at(t, 40), 0, 100, 5));
        assert!(!w.look(at(t, 99), 0, 100, 5));
        assert!(w.look(at(t, 100), 0, 100, 5));
    }
}
