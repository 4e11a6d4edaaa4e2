//! `pb_progress`: records consumer progress only while the projection it belongs to is still the
//! one Redis holds.
use board_model::keys::KeySpace;

/// What `pb_progress` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressOutcome {
    Recorded,
    /// Redis lost or replaced the projection: nothing written; start again from what it holds.
    Lost,
}

impl redis::FromRedisValue for ProgressOutcome {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        match String::from_redis_value(v)?.as_str() {
            "ok" => Ok(ProgressOutcome::Recorded),
            "lost" => Ok(ProgressOutcome::Lost),
            other => Err(format!("pb_progress answered {other:?}").into()),
        }
    }
}

/// `FCALL pb_progress`: records `offsets` in `progress_key` if `instance` is still the
/// projection Redis holds.
pub fn progress_cmd(keys: &KeySpace, progress_key: &str, instance: &str, offsets: &[(String, i64)]) -> redis::Cmd {
    let state = keys.state();
    let mut cmd = super::call("FCALL", "pb_progress", &[&state, progress_key]);
    cmd.arg(instance);
    for (field, offset) in offsets {
        cmd.arg(field).arg(*offset);
    }
    cmd
}
