//! What Redis says about the projection, for its readers (the API's readiness and freshness, the
//! rebuild, the tests): the state hash's status and instance, and the lag from the offsets the
//! projectors recorded against the ends they published. Writers live in the projector
//! (`projector::state`, `projector::progress`).
use crate::redis_conn::RedisConn;
use board_model::keys::KeySpace;
use board_model::offsets::{parse_field, Lag, PUBLISHED_AT};
use redis::AsyncCommands;
use std::collections::BTreeMap;

/// The state hash's fields (`KeySpace::state`; the Functions in `functions/library.lua` write
/// them).
pub mod field {
    /// Which projection Redis holds (a random id made by the projector that started it).
    pub const INSTANCE: &str = "instance";
    /// `building` or `whole` (`Status`).
    pub const STATUS: &str = "status";
    /// Why it cannot be made whole from the topics alone (set only then).
    pub const INCOMPLETE: &str = "incomplete";
}

/// What the state hash says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No projection at all (never built, or Redis lost it and no projector noticed yet).
    Missing,
    /// Started from nothing and not yet applied up to the target.
    Building,
    Whole,
}

impl Status {
    /// From the state hash's `instance` and `status`.
    pub fn of(instance: Option<&str>, status: Option<&str>) -> Self {
        match (instance, status) {
            (None, _) => Status::Missing,
            (Some(_), Some("whole")) => Status::Whole,
            (Some(_), _) => Status::Building,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Missing => "missing",
            Status::Building => "building",
            Status::Whole => "whole",
        }
    }
}

pub async fn status(conn: &mut RedisConn, keys: &KeySpace) -> redis::RedisResult<Status> {
    let (instance, status): (Option<String>, Option<String>) =
        redis::cmd("HMGET").arg(keys.state()).arg(field::INSTANCE).arg(field::STATUS).query_async(conn).await?;
    Ok(Status::of(instance.as_deref(), status.as_deref()))
}

pub async fn instance(conn: &mut RedisConn, keys: &KeySpace) -> redis::RedisResult<Option<String>> {
    conn.hget(keys.state(), field::INSTANCE).await
}

/// The lag from what Redis holds: the applied offsets and the ends the projectors published
/// (with when they did: ends nobody refreshes say nothing about the topics now). None until a
/// projector has published ends.
pub async fn lag_from_redis(redis: &mut RedisConn, progress_key: &str, ends_key: &str) -> anyhow::Result<Option<Lag>> {
    let ends: BTreeMap<String, i64> = redis.hgetall(ends_key).await?;
    if ends.is_empty() {
        return Ok(None);
    }
    let applied: BTreeMap<String, i64> = redis.hgetall(progress_key).await?;
    let mut out = Lag { ends_published_at: ends.get(PUBLISHED_AT).copied(), ..Lag::default() };
    for (f, high) in ends {
        let Some((topic, partition)) = parse_field(&f) else {
            continue;
        };
        out.partitions.insert((topic, partition), (applied.get(&f).copied().unwrap_or(0), high));
    }
    Ok(Some(out))
}
