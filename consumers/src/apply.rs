//! Applies a batch of parsed events to Redis: one pipelined round trip, one FCALL per event.
use board_core::events::{Event, PoisonReason};
use board_core::functions::{load_library, ApplyOutcome, FunctionCall};
use board_core::keys::KeySpace;
use redis::aio::ConnectionManager;
use redis::RedisError;
use std::time::Duration;

/// Redis could not take the batch now (down, restarting, out of memory, failing over). The
/// batch is retried as a whole: every call in it is idempotent.
#[derive(Debug, thiserror::Error)]
#[error("redis unavailable: {0}")]
pub struct Transient(pub String);

pub struct RedisApplier {
    conn: ConnectionManager,
    keys: KeySpace,
}

impl RedisApplier {
    /// Connects (retrying inside the connection manager) and loads the Function library.
    pub async fn connect(url: &str, keys: KeySpace) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        let mut conn = ConnectionManager::new_with_config(client, config).await?;
        load_library(&mut conn).await?;
        Ok(RedisApplier { conn, keys })
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Applies `events` in order. Per event: the outcome, or the reason Redis rejected it for
    /// good (a poison event, for the dead-letter topic). Err: nothing may be assumed applied.
    pub async fn apply(&mut self, events: &[&Event]) -> Result<Vec<Result<ApplyOutcome, PoisonReason>>, Transient> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for e in events {
            FunctionCall::for_event(&self.keys, e).add_to(&mut pipe);
        }
        let replies: Vec<redis::RedisResult<String>> = pipe.query_async(&mut self.conn).await.map_err(|e| Transient(e.to_string()))?;
        let mut out = Vec::with_capacity(replies.len());
        for reply in replies {
            match reply {
                Ok(s) => out.push(ApplyOutcome::parse(&s).ok_or_else(|| PoisonReason::Rejected(format!("unexpected reply {s:?}")))),
                Err(e) if is_permanent(&e) => out.push(Err(PoisonReason::Rejected(e.to_string()))),
                Err(e) => {
                    if e.to_string().contains("Function not found") {
                        // Redis restarted without persistence: load the library again, retry.
                        let _ = load_library(&mut self.conn).await;
                    }
                    return Err(Transient(e.to_string()));
                }
            }
        }
        Ok(out)
    }
}

/// Only `PB_INVALID`, which the Functions raise for content they cannot apply, is the event's
/// fault. Everything else (I/O, LOADING, BUSY, OOM, cluster moves, a missing library, a killed
/// script, a bug in a deployed library: plain `ERR`) is Redis' or our state and must never cost
/// an event: the batch is retried.
fn is_permanent(e: &RedisError) -> bool {
    e.code() == Some(board_core::functions::INVALID_CODE)
}
