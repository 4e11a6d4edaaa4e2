//! How far the projection is: the next offset applied per topic-partition, kept in Redis after
//! every batch, against the partitions' high watermarks. `lag` is what `pipeline-board lag`,
//! `project --exit-when-caught-up`, the tests and the API's freshness report read.
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
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

pub fn watermarks(brokers: &str, topics: &[String]) -> anyhow::Result<BTreeMap<(String, i32), (i64, i64)>> {
    let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let timeout = Duration::from_secs(10);
    let mut out = BTreeMap::new();
    for topic in topics {
        let md = client.fetch_metadata(Some(topic), timeout)?;
        for t in md.topics() {
            for p in t.partitions() {
                let (low, high) = client.fetch_watermarks(topic, p.id(), timeout)?;
                out.insert((topic.clone(), p.id()), (low, high));
            }
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
