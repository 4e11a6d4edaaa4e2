//! What the API knows about its dependencies, kept current by one background probe instead of
//! by every request: a request that needs a dependency known to be down is answered at once
//! (503 `<dependency>_unavailable`, or the other path) instead of waiting for a connect or server
//! selection timeout, and `/readyz` says which dependency is down.
use board_redis::projection::Status;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use crate::query::error::Dependency;

#[derive(Debug)]
struct State {
    redis_up: AtomicBool,
    mongodb_up: AtomicBool,
    /// Unix millis of the last completed probe (0: none yet).
    checked_at: AtomicI64,
    /// The projection's state in Redis (`PROJECTION_*`).
    projection: AtomicU8,
}

const PROJECTION_UNKNOWN: u8 = 0;
const PROJECTION_MISSING: u8 = 1;
const PROJECTION_BUILDING: u8 = 2;
const PROJECTION_WHOLE: u8 = 3;

fn status_code(s: Status) -> u8 {
    match s {
        Status::Missing => PROJECTION_MISSING,
        Status::Building => PROJECTION_BUILDING,
        Status::Whole => PROJECTION_WHOLE,
    }
}

/// Shared, cheap to clone. Until the first probe completes both dependencies count as up, so a
/// fresh instance tries them rather than refusing work.
#[derive(Debug, Clone)]
pub struct Health(Arc<State>);

impl Default for Health {
    fn default() -> Self {
        Health(Arc::new(State {
            redis_up: AtomicBool::new(true),
            mongodb_up: AtomicBool::new(true),
            checked_at: AtomicI64::new(0),
            projection: AtomicU8::new(PROJECTION_UNKNOWN),
        }))
    }
}

#[derive(Debug, Serialize)]
pub struct HealthReport {
    pub redis: &'static str,
    pub mongodb: &'static str,
    pub down: Vec<Dependency>,
    #[serde(rename = "checkedAt")]
    pub checked_at: Option<String>,
}

impl Health {
    pub fn is_up(&self, d: Dependency) -> bool {
        match d {
            Dependency::Redis => self.0.redis_up.load(Ordering::Relaxed),
            Dependency::Mongodb => self.0.mongodb_up.load(Ordering::Relaxed),
        }
    }

    pub fn record(&self, d: Dependency, up: bool) {
        let flag = match d {
            Dependency::Redis => &self.0.redis_up,
            Dependency::Mongodb => &self.0.mongodb_up,
        };
        let changed = flag.swap(up, Ordering::Relaxed) != up;
        crate::events::DependencyProbed { dependency: d.name(), up, changed }.emit();
    }

    pub fn projection_status(&self) -> &'static str {
        match self.0.projection.load(Ordering::Relaxed) {
            PROJECTION_MISSING => "missing",
            PROJECTION_BUILDING => "building",
            PROJECTION_WHOLE => "whole",
            _ => "unknown",
        }
    }

    pub fn record_projection(&self, status: Status) {
        let code = status_code(status);
        let changed = self.0.projection.swap(code, Ordering::Relaxed) != code;
        crate::events::ProjectionProbed { status, changed }.emit();
    }

    pub fn report(&self) -> HealthReport {
        let word = |up| if up { "up" } else { "down" };
        let down = [Dependency::Redis, Dependency::Mongodb].into_iter().filter(|d| !self.is_up(*d)).collect();
        let at = self.0.checked_at.load(Ordering::Relaxed);
        HealthReport {
            redis: word(self.is_up(Dependency::Redis)),
            mongodb: word(self.is_up(Dependency::Mongodb)),
            down,
            checked_at: (at > 0).then(|| board_model::time::format_millis(at)),
        }
    }

    /// Pings both dependencies every `every` (each ping bounded by the same interval, at most
    /// 2 s) for as long as the process runs.
    /// Reads the projection's state too (`keys.state()`): a Redis that lost the projection is
    /// noticed within one interval.
    pub fn spawn_probe(
        &self,
        redis: board_redis::redis_conn::RedisConn,
        mongo: mongodb::Database,
        every: Duration,
        keys: board_model::keys::KeySpace,
    ) {
        let health = self.clone();
        let bound = every.min(Duration::from_secs(2));
        tokio::spawn(async move {
            loop {
                let mut conn = redis.clone();
                let ping = redis::cmd("PING");
                let redis_ping = tokio::time::timeout(bound, ping.query_async::<String>(&mut conn));
                let mongo_ping = tokio::time::timeout(bound, mongo.run_command(bson::doc! {"ping": 1}));
                let (r, m) = tokio::join!(redis_ping, mongo_ping);
                health.record(Dependency::Redis, matches!(r, Ok(Ok(_))));
                if matches!(r, Ok(Ok(_))) {
                    let mut conn = redis.clone();
                    if let Ok(Ok(s)) = tokio::time::timeout(bound, board_redis::projection::status(&mut conn, &keys)).await {
                        health.record_projection(s);
                    }
                }
                health.record(Dependency::Mongodb, matches!(m, Ok(Ok(_))));
                let now = board_model::time::now_millis();
                health.0.checked_at.store(now, Ordering::Relaxed);
                tokio::time::sleep(every).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_instance_counts_both_as_up_and_reports_what_is_down() {
        let h = Health::default();
        assert!(h.is_up(Dependency::Redis) && h.is_up(Dependency::Mongodb));
        h.record(Dependency::Mongodb, false);
        let r = h.report();
        assert_eq!((r.redis, r.mongodb), ("up", "down"));
        assert_eq!(r.down, vec![Dependency::Mongodb]);
        h.record(Dependency::Mongodb, true);
        assert!(h.report().down.is_empty());
    }
}
