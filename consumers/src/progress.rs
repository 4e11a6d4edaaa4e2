//! How far the projection is: the next offset applied per topic-partition, kept in Redis after
//! every batch, against the partitions' high watermarks. `lag` is what `pipeline-board lag`,
//! `project --exit-when-caught-up`, the tests and the API's freshness report read.
use crate::kafka::KafkaConnection;
use rdkafka::consumer::{BaseConsumer, Consumer};
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::time::Duration;

pub fn field(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// The partitions whose records a replay from `starts` needs but the topics no longer hold
/// (retention, `DeleteRecords`), as `topic/partition starts at <low>, the replay at <start>`.
/// A replay that starts at a partition's log start above 0 counts too: whether the records
/// before it mattered cannot be known. A MongoDB snapshot replays from the ends it took before
/// it, so only a partition trimmed past those is missing. Empty: the replay sees every record
/// the new generation needs.
pub fn missing_history(marks: &BTreeMap<(String, i32), (i64, i64)>, starts: &BTreeMap<(String, i32), i64>, snapshot: bool) -> Vec<String> {
    marks
        .iter()
        .filter_map(|((t, p), (low, _))| {
            let start = starts.get(&(t.clone(), *p)).copied().unwrap_or(0);
            let lost = start < *low || (!snapshot && start == *low && *low > 0);
            lost.then(|| format!("{t}/{p} starts at {low}, the replay at {start}"))
        })
        .collect()
}

/// Where a replay of each partition really starts, as progress fields: a start below the log
/// start (retention deleted those records; the consumer's offset reset lands on the log start)
/// is recorded at the log start, so that a projection made whole by `rebuild --source mongodb`
/// is not held `building` by offsets no consumer can read again. Only the partitions that move.
pub fn replay_floors(marks: &BTreeMap<(String, i32), (i64, i64)>, starts: &BTreeMap<(String, i32), i64>) -> Vec<(String, i64)> {
    marks
        .iter()
        .filter(|((t, p), (low, _))| starts.get(&(t.clone(), *p)).copied().unwrap_or(0) < *low)
        .map(|((t, p), (low, _))| (field(t, *p), *low))
        .collect()
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lag {
    /// (topic, partition) -> (applied next offset, high watermark)
    pub partitions: BTreeMap<(String, i32), (i64, i64)>,
    /// From Redis (`lag_from_redis`): when a projector last published the ends (unix millis).
    pub ends_published_at: Option<i64>,
}

/// The field of the ends hash that says when they were published (no `/`: never a partition).
pub const PUBLISHED_AT: &str = "publishedAt";

impl Lag {
    pub fn total(&self) -> i64 {
        self.partitions.values().map(|(applied, high)| (high - applied).max(0)).sum()
    }
    pub fn applied(&self) -> i64 {
        self.partitions.values().map(|(applied, _)| applied).sum()
    }
}

/// (low, end) per partition, where `end` is the high watermark: the offset after the last record.
///
/// Apache Kafka's high watermark is exact for the topics we read (plain, non-transactional
/// producers: no control records after the last event), so no tail needs reading. A projector
/// that has applied offset `end - 1` has `end` stored as its next offset.
pub fn watermarks(kafka: &KafkaConnection, topics: &[String]) -> anyhow::Result<BTreeMap<(String, i32), (i64, i64)>> {
    let client: BaseConsumer =
        kafka.client_config(&[("group.id", "pipeline-board-watermarks"), ("enable.auto.commit", "false")]).create()?;
    let timeout = Duration::from_secs(10);
    let mut out = BTreeMap::new();
    for topic in topics {
        let md = client.fetch_metadata(Some(topic), timeout)?;
        for t in md.topics() {
            for p in t.partitions() {
                out.insert((topic.clone(), p.id()), client.fetch_watermarks(topic, p.id(), timeout)?);
            }
        }
    }
    Ok(out)
}

/// `watermarks` from async code (the broker requests block: they run off the async workers).
pub async fn fetch_watermarks(kafka: &KafkaConnection, topics: &[String]) -> anyhow::Result<BTreeMap<(String, i32), (i64, i64)>> {
    let (kafka, topics) = (kafka.clone(), topics.to_vec());
    tokio::task::spawn_blocking(move || watermarks(&kafka, &topics)).await?
}

pub async fn lag(
    kafka: &KafkaConnection,
    topics: &[String],
    redis: &mut board_core::redis_conn::RedisConn,
    progress_key: &str,
) -> anyhow::Result<Lag> {
    let marks = fetch_watermarks(kafka, topics).await?;
    let applied: BTreeMap<String, i64> = redis.hgetall(progress_key).await?;
    let mut out = Lag::default();
    for ((topic, partition), (low, high)) in marks {
        let done = applied.get(&field(&topic, partition)).copied().unwrap_or(low);
        out.partitions.insert((topic, partition), (done.max(low), high));
    }
    Ok(out)
}

/// Writes the partitions' ends to Redis (`KeySpace::partition_ends`), for readers without a
/// Kafka client.
pub async fn publish_ends(
    kafka: &KafkaConnection,
    topics: &[String],
    redis: &mut board_core::redis_conn::RedisConn,
    ends_key: &str,
) -> anyhow::Result<()> {
    let marks = fetch_watermarks(kafka, topics).await?;
    let mut fields: Vec<(String, i64)> = marks.iter().map(|((t, p), (_, high))| (field(t, *p), *high)).collect();
    if !fields.is_empty() {
        // Readers tell ends nobody refreshes (every projector stopped) from current ones.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default();
        fields.push((PUBLISHED_AT.to_string(), now));
        redis.hset_multiple::<_, _, _, ()>(ends_key, &fields).await?;
    }
    Ok(())
}

/// The lag from what Redis holds: the applied offsets and the ends the projectors published
/// (with when they did: ends nobody refreshes say nothing about the topics now). None until a
/// projector has published ends.
pub async fn lag_from_redis(
    redis: &mut board_core::redis_conn::RedisConn,
    progress_key: &str,
    ends_key: &str,
) -> anyhow::Result<Option<Lag>> {
    let ends: BTreeMap<String, i64> = redis.hgetall(ends_key).await?;
    if ends.is_empty() {
        return Ok(None);
    }
    let applied: BTreeMap<String, i64> = redis.hgetall(progress_key).await?;
    let mut out = Lag { ends_published_at: ends.get(PUBLISHED_AT).copied(), ..Lag::default() };
    for (f, high) in ends {
        let Some((topic, partition)) = f.rsplit_once('/').and_then(|(t, p)| Some((t.to_string(), p.parse::<i32>().ok()?))) else {
            continue;
        };
        out.partitions.insert((topic, partition), (applied.get(&f).copied().unwrap_or(0), high));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(parts: &[(i32, i64, i64)]) -> BTreeMap<(String, i32), (i64, i64)> {
        parts.iter().map(|(p, low, high)| (("t".to_string(), *p), (*low, *high))).collect()
    }

    #[test]
    fn a_replay_below_the_log_start_is_recorded_at_the_log_start() {
        let marks = marks(&[(0, 0, 10), (1, 5, 10), (2, 5, 10), (3, 7, 7)]);
        let starts: BTreeMap<(String, i32), i64> = [(("t".to_string(), 1), 3), (("t".to_string(), 2), 6)].into_iter().collect();
        // p0 starts at 0 = its log start; p1 at 3 < 5; p2 at 6 >= 5; p3 has no start (0) < 7.
        assert_eq!(replay_floors(&marks, &starts), vec![("t/1".to_string(), 5), ("t/3".to_string(), 7)]);
        assert_eq!(missing_history(&marks, &starts, true).len(), 2, "the same partitions are the lost ones");
    }
}
