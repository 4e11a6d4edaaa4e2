//! Whether the projection under a prefix is whole, and how a projector notices that Redis lost
//! it. The state hash (`KeySpace::state`) names an *instance*: made once, when a projector finds
//! Redis without a projection, together with the partitions' ends at that moment (the target).
//! The projection is `building` until every partition is applied up to the target, then
//! `whole`. A FLUSHALL, a restart without persistence or a failover to an empty replica removes
//! the instance with the data: every progress write names the instance (`pb_progress`) and is
//! refused once it is gone, and each projector checks it every second, so the loss is seen
//! within a second, the projectors start again from what Redis holds (nothing: the partitions'
//! beginnings) and the API answers from MongoDB until the projection is whole again.
use crate::progress;
use board_model::keys::KeySpace;
use board_model::offsets;
use board_redis::functions::fcall;
use board_redis::functions::state::{state_whole_cmd, StateRewind, StateStart, StateStarted};
use board_redis::projection::{instance, status, Status};
use board_redis::redis_conn::RedisConn;
use redis::AsyncCommands;
use std::collections::BTreeMap;

/// Creates the state if Redis has none (status `building`, target = the partitions' ends now);
/// returns the instance Redis holds afterwards (ours, or the one another projector made first).
/// Atomic: two projectors that find Redis empty at once agree on one instance.
pub async fn ensure(
    conn: &mut RedisConn,
    keys: &KeySpace,
    group: &str,
    watermarks: &progress::Watermarks,
    topics: &[String],
) -> anyhow::Result<String> {
    if let Some(i) = instance(conn, keys).await? {
        return Ok(i);
    }
    let ends = watermarks.fetch(topics).await?;
    let mine = format!("{:016x}", rand::random::<u64>());
    let now = board_model::time::now_millis();
    // Partitions whose early records are gone (retention): replaying them cannot make the
    // projection whole; only `rebuild --source mongodb` can.
    let lost: Vec<String> =
        ends.iter().filter(|(_, (low, _))| *low > 0).map(|((t, p), (low, _))| format!("{t}/{p} starts at {low}")).collect();
    let incomplete = if lost.is_empty() {
        String::new()
    } else {
        format!("the topics no longer hold their whole history ({}): run `pipeline-board rebuild --source mongodb`", lost.join(", "))
    };
    let floors = offsets::replay_floors(&ends, &offsets::Checkpoint::default());
    let ends_fields = end_fields(&ends);
    let start = StateStart { group, instance: &mine, now, incomplete: &incomplete, floors: &floors, ends: &ends_fields };
    let instance: String = fcall(conn, &start.cmd(keys)).await?;
    let made = start.outcome(instance.clone()) == StateStarted::Made;
    if made && !incomplete.is_empty() {
        tracing::error!(instance, incomplete, "no projection in redis, and the topics cannot rebuild it alone");
    }
    if made {
        crate::events::ProjectionRestarted { instance: &instance, partitions: ends.len() }.emit();
    }
    Ok(instance)
}

/// Marks the projection whole once every partition of the target is applied up to it (by the
/// progress of `progress_key`). Returns the status after the check.
pub async fn check_whole(conn: &mut RedisConn, keys: &KeySpace, instance: &str, progress_key: &str) -> redis::RedisResult<Status> {
    let current = status(conn, keys).await?;
    if current != Status::Building {
        return Ok(current);
    }
    let incomplete: Option<String> = conn.hget(keys.state(), board_redis::projection::field::INCOMPLETE).await?;
    if incomplete.is_some() {
        return Ok(Status::Building);
    }
    let target: BTreeMap<String, i64> = conn.hgetall(keys.state_target()).await?;
    let applied: BTreeMap<String, i64> = conn.hgetall(progress_key).await?;
    let reached = target.iter().all(|(f, end)| applied.get(f).copied().unwrap_or(0) >= *end);
    if !reached {
        return Ok(Status::Building);
    }
    let done: bool = fcall(conn, &state_whole_cmd(keys, instance, board_model::time::now_millis())).await?;
    if done {
        tracing::info!(instance, "projection is whole");
    }
    Ok(if done { Status::Whole } else { Status::Missing })
}

/// After Redis went back in time (`rewind.rs`): lowers the group's progress to `resume` (a
/// partition absent from it restarts from its beginning; nothing is raised) and makes a new
/// `building` instance whose target is the partitions' ends now, in one atomic call in `{meta}`.
/// Every projector then sees the instance change and re-seeks to what Redis holds; progress
/// writes of batches in flight, made for the old instance, are refused. The API answers from
/// MongoDB until the projection is whole again. Returns the new instance, or None when the
/// instance is no longer `mine` (another projector or a loss got there first).
pub async fn restart_after_rewind(
    conn: &mut RedisConn,
    keys: &KeySpace,
    group: &str,
    mine: &str,
    resume: &BTreeMap<String, i64>,
    watermarks: &progress::Watermarks,
    topics: &[String],
) -> anyhow::Result<Option<String>> {
    let ends = watermarks.fetch(topics).await?;
    // Resuming below a partition's log start (retention passed the offsets the restored data
    // holds) skips events for good: the projection stays `building` and says why, as a start on
    // an empty Redis does, until `rebuild --source mongodb`.
    let starts: offsets::Checkpoint =
        ends.keys().map(|(t, p)| ((t.clone(), *p), resume.get(&offsets::field(t, *p)).copied().unwrap_or(0))).collect();
    let lost = offsets::missing_history(&ends, &starts, true);
    let incomplete = if lost.is_empty() {
        String::new()
    } else {
        format!("redis went back to offsets the topics no longer hold ({}): run `pipeline-board rebuild --source mongodb`", lost.join(", "))
    };
    if !incomplete.is_empty() {
        tracing::error!(incomplete, "the rewound projection cannot be replayed whole from the topics");
    }
    let new = format!("{:016x}", rand::random::<u64>());
    let resume: Vec<(String, i64)> = resume.iter().map(|(f, o)| (f.clone(), *o)).collect();
    let floors = offsets::replay_floors(&ends, &starts);
    let ends_fields = end_fields(&ends);
    let rewind = StateRewind {
        group,
        mine,
        new: &new,
        now: board_model::time::now_millis(),
        incomplete: &incomplete,
        resume: &resume,
        floors: &floors,
        ends: &ends_fields,
    };
    let done: bool = fcall(conn, &rewind.cmd(keys)).await?;
    Ok(done.then_some(new))
}

/// The partitions' ends as progress fields (the target a new instance must reach).
fn end_fields(ends: &BTreeMap<(String, i32), (i64, i64)>) -> Vec<(String, i64)> {
    ends.iter().map(|((t, p), (_, end))| (offsets::field(t, *p), *end)).collect()
}

/// Forgets the projection (its state, target and this group's progress, all in `{meta}`): the
/// projectors then see it lost and build it again from the partitions' beginnings — what a
/// FLUSHALL does, for a loss Redis did not remove the state with (a shard of a cluster).
pub async fn forget(conn: &mut RedisConn, keys: &KeySpace, group: &str) -> redis::RedisResult<()> {
    redis::pipe()
        .atomic()
        .del(keys.state())
        .del(keys.state_target())
        .del(keys.progress(group))
        .del(keys.write_marks_seen())
        .query_async(conn)
        .await
}

/// Notices a Redis Cluster primary that restarted empty while keeping its slots (no persistence,
/// back before a replica was promoted: its replica then resyncs to empty too). Such a shard lost
/// its orgs while the `{meta}` state, on another shard, still says whole. A replica promoted in a
/// failover is a new primary, not a restart: it holds every acknowledged write (the projector
/// waits for a replica before recording a batch), so it is not a loss.
#[derive(Default)]
pub struct ShardWatch {
    /// Node id -> the run id it had when last seen as a primary.
    primaries: std::collections::HashMap<String, String>,
    /// A loss found and not yet handled (reported again until `handled`).
    pending: Option<String>,
}

impl ShardWatch {
    /// The address of a primary that restarted empty since the last call, if any (a single
    /// server: never; its restart removes the state itself).
    pub async fn restarted_empty(&mut self, conn: &mut RedisConn) -> redis::RedisResult<Option<String>> {
        if self.pending.is_some() {
            return Ok(self.pending.clone());
        }
        for node in conn.cluster_nodes().await?.into_iter().filter(|n| n.primary && n.healthy) {
            let info = conn.on_node(redis::cmd("INFO").arg("server").arg("persistence"), &Some((node.host.clone(), node.port))).await?;
            let info: String = redis::from_redis_value(info)?;
            let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(|v| v.trim().to_string());
            let Some(run_id) = field("run_id") else { continue };
            let loaded_nothing = field("aof_enabled").as_deref() == Some("0") && field("rdb_last_load_keys_loaded").as_deref() == Some("0");
            if let Some(before) = self.primaries.insert(node.id.clone(), run_id.clone()) {
                if before != run_id && loaded_nothing {
                    self.pending = Some(format!("{}:{}", node.host, node.port));
                }
            }
        }
        Ok(self.pending.clone())
    }

    /// The loss reported last was acted on.
    pub fn handled(&mut self) {
        self.pending = None;
    }
}
