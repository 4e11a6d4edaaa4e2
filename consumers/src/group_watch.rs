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
///
/// The same holds when the members that do hold partitions are stuck themselves (Redis
/// refusing writes): a new consumer then costs the group a rebalance and changes nothing, so
/// each stall in a row doubles the bound (up to 16 times `after`) until something moves.
#[derive(Debug)]
pub struct StallWatch {
    after: Duration,
    /// Since when nothing moved, and the applied total then.
    idle: Option<(Instant, i64)>,
    /// Stalls called since something last moved.
    in_a_row: u32,
}

impl StallWatch {
    pub fn new(after: Duration) -> Self {
        StallWatch { after, idle: None, in_a_row: 0 }
    }

    /// The bound for the next stall.
    pub fn bound(&self) -> Duration {
        self.after * 2u32.pow(self.in_a_row.min(4))
    }

    /// One look: partitions this member holds, the group's applied total and its lag.
    /// true: stalled (the watch starts over).
    pub fn look(&mut self, now: Instant, assigned: i64, applied: i64, lag: i64) -> bool {
        if assigned > 0 || lag <= 0 {
            self.idle = None;
            self.in_a_row = 0;
            return false;
        }
        match self.idle {
            Some((since, then)) if then == applied => {
                if now.duration_since(since) >= self.bound() {
                    self.idle = Some((now, applied));
                    self.in_a_row += 1;
                    return true;
                }
                false
            }
            // Someone applied events meanwhile: the group moves, the clock starts again.
            Some(_) => {
                self.idle = Some((now, applied));
                self.in_a_row = 0;
                false
            }
            // First idle look: the clock starts now.
            None => {
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
        // Still nothing moves after the new consumer: the next bound is twice as long, and so on
        // up to 16 times.
        assert!(!w.look(at(t, 61), 0, 100, 5));
        assert!(!w.look(at(t, 179), 0, 100, 5));
        assert!(w.look(at(t, 180), 0, 100, 5));
        assert!(w.look(at(t, 420), 0, 100, 5));
        assert!(w.look(at(t, 900), 0, 100, 5));
        assert!(w.look(at(t, 1860), 0, 100, 5));
        assert_eq!(w.bound(), Duration::from_secs(960));
        assert!(!w.look(at(t, 2819), 0, 100, 5));
        assert!(w.look(at(t, 2820), 0, 100, 5));
        // Something moves: the bound is `after` again.
        assert!(!w.look(at(t, 2830), 0, 101, 5));
        assert_eq!(w.bound(), Duration::from_secs(60));
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
