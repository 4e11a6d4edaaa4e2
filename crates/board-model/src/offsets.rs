//! Kafka offsets as the projection records them: the progress hash's field per topic-partition,
//! the lag between applied offsets and the partitions' ends, and which partitions a replay
//! cannot see whole once retention trimmed them. Pure: the projector, the rebuild and the API's
//! freshness report all read offsets through these.
use std::collections::BTreeMap;

/// The field of a progress or ends hash for one topic-partition (`topic/partition`).
pub fn field(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// The topic-partition a progress field names, if it names one (`publishedAt` does not).
pub fn parse_field(field: &str) -> Option<(String, i32)> {
    field.rsplit_once('/').and_then(|(t, p)| Some((t.to_string(), p.parse::<i32>().ok()?)))
}

/// A topic-partition.
pub type TopicPartition = (String, i32);

/// The partitions' (low, end) watermarks as the brokers report them: the log start (records
/// below it are gone) and the offset after the last record.
pub type Marks = BTreeMap<TopicPartition, (i64, i64)>;

/// Where a consumer of the topics is: the next offset to apply per partition. The projector's
/// progress, a rebuild's replay position and a replay's start are all one; Redis keeps one as a
/// hash of `field`s (`fields`, `from_fields`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint(BTreeMap<TopicPartition, i64>);

impl Checkpoint {
    /// The next offset of a partition; `None` when this checkpoint never saw it.
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.0.get(&(topic.to_string(), partition)).copied()
    }
    pub fn set(&mut self, topic: &str, partition: i32, next: i64) {
        self.0.insert((topic.to_string(), partition), next);
    }
    /// Past the record at `offset` (never back: a redelivered older record moves nothing).
    pub fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        let next = self.0.entry((topic.to_string(), partition)).or_insert(0);
        *next = (*next).max(offset + 1);
    }
    pub fn iter(&self) -> impl Iterator<Item = (&TopicPartition, &i64)> {
        self.0.iter()
    }
    /// As a progress hash's fields.
    pub fn fields(&self) -> Vec<(String, i64)> {
        self.0.iter().map(|((t, p), o)| (field(t, *p), *o)).collect()
    }
    /// From a progress hash (fields that name no partition are skipped).
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a String, &'a i64)>) -> Self {
        Checkpoint(fields.into_iter().filter_map(|(f, o)| Some((parse_field(f)?, *o))).collect())
    }
    /// The records between here and the partitions' ends (a partition never seen counts from 0).
    pub fn lag(&self, marks: &Marks) -> i64 {
        marks.iter().map(|(k, (_, end))| (end - self.0.get(k).copied().unwrap_or(0)).max(0)).sum()
    }
}

impl FromIterator<(TopicPartition, i64)> for Checkpoint {
    fn from_iter<I: IntoIterator<Item = (TopicPartition, i64)>>(iter: I) -> Self {
        Checkpoint(iter.into_iter().collect())
    }
}

/// The partitions whose records a replay from `starts` needs but the topics no longer hold
/// (retention, `DeleteRecords`), as `topic/partition starts at <low>, the replay at <start>`.
/// A replay that starts at a partition's log start above 0 counts too: whether the records
/// before it mattered cannot be known. A MongoDB snapshot replays from the ends it took before
/// it, so only a partition trimmed past those is missing. Empty: the replay sees every record
/// the new generation needs.
pub fn missing_history(marks: &Marks, starts: &Checkpoint, snapshot: bool) -> Vec<String> {
    marks
        .iter()
        .filter_map(|((t, p), (low, _))| {
            let start = starts.get(t, *p).unwrap_or(0);
            let lost = start < *low || (!snapshot && start == *low && *low > 0);
            lost.then(|| format!("{t}/{p} starts at {low}, the replay at {start}"))
        })
        .collect()
}

/// Where a replay of each partition really starts, as progress fields: a start below the log
/// start (retention deleted those records; the consumer's offset reset lands on the log start)
/// is recorded at the log start, so that a projection made whole by `rebuild --source mongodb`
/// is not held `building` by offsets no consumer can read again. Only the partitions that move.
pub fn replay_floors(marks: &Marks, starts: &Checkpoint) -> Vec<(String, i64)> {
    marks.iter().filter(|((t, p), (low, _))| starts.get(t, *p).unwrap_or(0) < *low).map(|((t, p), (low, _))| (field(t, *p), *low)).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_names_its_partition_and_nothing_else() {
        assert_eq!(parse_field(&field("crm.contacts", 3)), Some(("crm.contacts".to_string(), 3)));
        assert_eq!(parse_field(PUBLISHED_AT), None);
    }

    fn marks(parts: &[(i32, i64, i64)]) -> BTreeMap<(String, i32), (i64, i64)> {
        parts.iter().map(|(p, low, high)| (("t".to_string(), *p), (*low, *high))).collect()
    }

    #[test]
    fn a_replay_below_the_log_start_is_recorded_at_the_log_start() {
        let marks = marks(&[(0, 0, 10), (1, 5, 10), (2, 5, 10), (3, 7, 7)]);
        let starts: Checkpoint = [(("t".to_string(), 1), 3), (("t".to_string(), 2), 6)].into_iter().collect();
        // p0 starts at 0 = its log start; p1 at 3 < 5; p2 at 6 >= 5; p3 has no start (0) < 7.
        assert_eq!(replay_floors(&marks, &starts), vec![("t/1".to_string(), 5), ("t/3".to_string(), 7)]);
        assert_eq!(missing_history(&marks, &starts, true).len(), 2, "the same partitions are the lost ones");
    }

    #[test]
    fn a_checkpoint_only_moves_forward_and_round_trips_as_fields() {
        let mut c = Checkpoint::default();
        c.advance("t", 0, 4);
        c.advance("t", 0, 2);
        assert_eq!(c.get("t", 0), Some(5), "a redelivered older record moves nothing");
        assert_eq!(c.get("t", 1), None);
        let fields: BTreeMap<String, i64> = c.fields().into_iter().chain([(PUBLISHED_AT.to_string(), 9)]).collect();
        assert_eq!(Checkpoint::from_fields(&fields), c, "a field that names no partition is skipped");
        assert_eq!(c.lag(&marks(&[(0, 0, 7), (1, 0, 3)])), 2 + 3);
    }
}
