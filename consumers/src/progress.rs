//! How far the projection is: the next offset applied per topic-partition, kept in Redis after
//! every batch, against the partitions' high watermarks. `lag` is what `pipeline-board lag`,
//! `project --exit-when-caught-up` and the tests read (the API reads `board_redis::projection`).
use crate::kafka::KafkaConnection;
use board_model::offsets::{field, Lag, PUBLISHED_AT};
use board_redis::redis_conn::RedisConn;
use rdkafka::consumer::{BaseConsumer, Consumer};
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// A client that asks the brokers for partitions' watermarks, made once and reused: a librdkafka
/// client is a thread and a connection per broker, too dear to make for every look (the
/// projector looks every second, a test awaiting catch-up every 100 ms).
#[derive(Clone)]
pub struct Watermarks {
    client: Arc<BaseConsumer>,
}

impl Watermarks {
    pub fn new(kafka: &KafkaConnection) -> anyhow::Result<Self> {
        let client = kafka.client_config(&[("group.id", "pipeline-board-watermarks"), ("enable.auto.commit", "false")]).create()?;
        Ok(Watermarks { client: Arc::new(client) })
    }

    /// (low, end) per partition, where `end` is the high watermark: the offset after the last
    /// record.
    ///
    /// Apache Kafka's high watermark is exact for the topics we read (plain, non-transactional
    /// producers: no control records after the last event), so no tail needs reading. A
    /// projector that has applied offset `end - 1` has `end` stored as its next offset.
    pub fn fetch_blocking(&self, topics: &[String]) -> anyhow::Result<BTreeMap<(String, i32), (i64, i64)>> {
        let timeout = Duration::from_secs(10);
        let mut out = BTreeMap::new();
        for topic in topics {
            let md = self.client.fetch_metadata(Some(topic), timeout)?;
            for t in md.topics() {
                for p in t.partitions() {
                    out.insert((topic.clone(), p.id()), self.client.fetch_watermarks(topic, p.id(), timeout)?);
                }
            }
        }
        Ok(out)
    }

    /// `fetch_blocking` from async code (the broker requests block: they run off the async
    /// workers).
    pub async fn fetch(&self, topics: &[String]) -> anyhow::Result<BTreeMap<(String, i32), (i64, i64)>> {
        let (this, topics) = (self.clone(), topics.to_vec());
        tokio::task::spawn_blocking(move || this.fetch_blocking(&topics)).await?
    }

    /// The projection's lag: what Redis holds as applied (`progress_key`) against the ends.
    pub async fn lag(&self, topics: &[String], redis: &mut RedisConn, progress_key: &str) -> anyhow::Result<Lag> {
        let marks = self.fetch(topics).await?;
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
    pub async fn publish_ends(&self, topics: &[String], redis: &mut RedisConn, ends_key: &str) -> anyhow::Result<()> {
        let marks = self.fetch(topics).await?;
        let mut fields: Vec<(String, i64)> = marks.iter().map(|((t, p), (_, high))| (field(t, *p), *high)).collect();
        if !fields.is_empty() {
            // Readers tell ends nobody refreshes (every projector stopped) from current ones.
            fields.push((PUBLISHED_AT.to_string(), board_model::time::now_millis()));
            redis.hset_multiple::<_, _, _, ()>(ends_key, &fields).await?;
        }
        Ok(())
    }
}

/// One look at the watermarks (a client made for it): for commands that look once.
pub fn watermarks(kafka: &KafkaConnection, topics: &[String]) -> anyhow::Result<BTreeMap<(String, i32), (i64, i64)>> {
    Watermarks::new(kafka)?.fetch_blocking(topics)
}

/// `watermarks` from async code.
pub async fn fetch_watermarks(kafka: &KafkaConnection, topics: &[String]) -> anyhow::Result<BTreeMap<(String, i32), (i64, i64)>> {
    Watermarks::new(kafka)?.fetch(topics).await
}

/// One look at the lag (a client made for it).
pub async fn lag(kafka: &KafkaConnection, topics: &[String], redis: &mut RedisConn, progress_key: &str) -> anyhow::Result<Lag> {
    Watermarks::new(kafka)?.lag(topics, redis, progress_key).await
}
