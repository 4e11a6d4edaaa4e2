//! How far the projection is: the next offset applied per topic-partition, kept in Redis after
//! every batch, against the partitions' high watermarks. `lag` is what `pipeline-board lag`,
//! `project --exit-when-caught-up`, the tests and the API's freshness report read.
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::time::Duration;

pub fn field(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lag {
    /// (topic, partition) -> (applied next offset, high watermark)
    pub partitions: BTreeMap<(String, i32), (i64, i64)>,
}

impl Lag {
    pub fn total(&self) -> i64 {
        self.partitions.values().map(|(applied, high)| (high - applied).max(0)).sum()
    }
    pub fn applied(&self) -> i64 {
        self.partitions.values().map(|(applied, _)| applied).sum()
    }
}

/// (low, end) per partition, where `end` is the offset after the last record.
///
/// The broker's high watermark is taken as a lower bound only: tansu answers ListOffsets(latest)
/// with the base offset of the partition's last record batch + 1 (a partition written by one
/// batched produce of 160 records reports 1). So the tail from `high - 1` is read to the
/// partition's end (EOF): on a broker whose watermark is exact that is one record per partition.
/// Partition EOF is how the tail reader knows it is done: not an error worth a log line.
struct TailReader;
impl ClientContext for TailReader {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        if !matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::warn!(%error, reason, "kafka client error while reading partition tails");
        }
    }
}
impl ConsumerContext for TailReader {}

pub fn watermarks(brokers: &str, topics: &[String]) -> anyhow::Result<BTreeMap<(String, i32), (i64, i64)>> {
    let client: BaseConsumer<TailReader> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "pipeline-board-watermarks")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create_with_context(TailReader)?;
    let timeout = Duration::from_secs(10);
    let mut out = BTreeMap::new();
    let mut tail = TopicPartitionList::new();
    for topic in topics {
        let md = client.fetch_metadata(Some(topic), timeout)?;
        for t in md.topics() {
            for p in t.partitions() {
                let (low, high) = client.fetch_watermarks(topic, p.id(), timeout)?;
                out.insert((topic.clone(), p.id()), (low, high));
                if high > low {
                    tail.add_partition_offset(topic, p.id(), Offset::Offset(high - 1))?;
                }
            }
        }
    }
    let mut open = tail.count();
    if open == 0 {
        return Ok(out);
    }
    client.assign(&tail)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while open > 0 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "reading partition tails timed out");
        match client.poll(Duration::from_secs(1)) {
            Some(Ok(m)) => {
                if let Some((_, end)) = out.get_mut(&(m.topic().to_string(), m.partition())) {
                    *end = (*end).max(m.offset() + 1);
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => open -= 1,
            Some(Err(e)) => anyhow::bail!("reading partition tails: {e}"),
            None => {}
        }
    }
    Ok(out)
}

pub async fn lag(
    brokers: &str,
    topics: &[String],
    redis: &mut redis::aio::ConnectionManager,
    progress_key: &str,
) -> anyhow::Result<Lag> {
    let brokers = brokers.to_string();
    let topics_owned = topics.to_vec();
    let marks = tokio::task::spawn_blocking(move || watermarks(&brokers, &topics_owned)).await??;
    let applied: BTreeMap<String, i64> = redis.hgetall(progress_key).await?;
    let mut out = Lag::default();
    for ((topic, partition), (low, high)) in marks {
        let done = applied.get(&field(&topic, partition)).copied().unwrap_or(low);
        out.partitions.insert((topic, partition), (done.max(low), high));
    }
    Ok(out)
}
