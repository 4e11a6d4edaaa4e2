//! How far the projection is: the next offset applied per topic-partition, kept in Redis after
//! every batch, against the partitions' high watermarks. `lag` is what `pipeline-board lag`,
//! `project --exit-when-caught-up` and the tests read (the API reads `board_redis::projection`).
use crate::kafka::KafkaConnection;
use board_model::offsets::{field, Lag, PUBLISHED_AT};
use board_redis::redis_conn::RedisConn;
use rdkafka::consumer::{BaseConsumer, Consumer};
use redis::AsyncCommands;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Asks the brokers for partitions' watermarks through one librdkafka client kept between looks:
/// a client is a thread and a connection per broker, too dear to make for every look (the
/// projector looks every second, a test awaiting catch-up every 100 ms).
///
/// A kept client can go bad where a new one would not: after a broker restart librdkafka's
/// watermark query may keep answering `UnknownPartition` from stale metadata, or block past its
/// timeout (confluentinc/librdkafka#2588, confluent-kafka-python#413). So every look is bounded
/// (`LOOK_BOUND`) and a look that failed or ran out of time drops the client: the next look
/// makes a new one. A query blocked for good keeps its thread, not the look; at most
/// `MAX_LOOKS_IN_FLIGHT` looks run at once, so blocked ones cannot pile up threads and clients.
/// Clients are destroyed off the async workers (destroying one waits for its threads).
#[derive(Clone)]
pub struct Watermarks {
    kafka: KafkaConnection,
    client: Arc<Mutex<Option<Arc<BaseConsumer>>>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// Looks running at once (the projector's tasks look concurrently; blocked looks count too).
const MAX_LOOKS_IN_FLIGHT: usize = 4;

/// The most one look (every partition of the topics asked) may take.
pub const LOOK_BOUND: Duration = Duration::from_secs(15);

type Marks = BTreeMap<(String, i32), (i64, i64)>;

impl Watermarks {
    /// No client is made until the first look.
    pub fn new(kafka: &KafkaConnection) -> Self {
        Watermarks {
            kafka: kafka.clone(),
            client: Arc::new(Mutex::new(None)),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_LOOKS_IN_FLIGHT)),
        }
    }

    fn client(&self) -> anyhow::Result<Arc<BaseConsumer>> {
        let mut held = self.client.lock().expect("not poisoned");
        if let Some(c) = held.as_ref() {
            return Ok(c.clone());
        }
        let made: BaseConsumer =
            self.kafka.client_config(&[("group.id", "pipeline-board-watermarks"), ("enable.auto.commit", "false")]).create()?;
        let made = Arc::new(made);
        *held = Some(made.clone());
        Ok(made)
    }

    /// Forgets `failed` if it is still the kept client (a look beside it may have replaced it).
    /// The caller holds a reference: the client is destroyed where the caller drops it.
    fn drop_client(&self, failed: &Arc<BaseConsumer>, why: &str) {
        let forgotten = {
            let mut held = self.client.lock().expect("not poisoned");
            if held.as_ref().is_some_and(|c| Arc::ptr_eq(c, failed)) {
                held.take()
            } else {
                None
            }
        };
        if forgotten.is_some() {
            crate::events::WatermarksClientDropped { why }.emit();
        }
    }

    /// (low, end) per partition, where `end` is the high watermark: the offset after the last
    /// record.
    ///
    /// Apache Kafka's high watermark is exact for the topics we read (plain, non-transactional
    /// producers: no control records after the last event), so no tail needs reading. A
    /// projector that has applied offset `end - 1` has `end` stored as its next offset.
    pub fn fetch_blocking(&self, topics: &[String]) -> anyhow::Result<Marks> {
        self.look_through(&self.client()?, topics)
    }

    /// One bounded look through `client`, which is forgotten if the look fails.
    fn look_through(&self, client: &Arc<BaseConsumer>, topics: &[String]) -> anyhow::Result<Marks> {
        let looked = look(client, topics, std::time::Instant::now() + LOOK_BOUND);
        if let Err(e) = &looked {
            self.drop_client(client, &e.to_string());
        }
        looked
    }

    /// `fetch_blocking` from async code (the broker requests block: they run off the async
    /// workers), bounded even where librdkafka's own timeout is not kept.
    pub async fn fetch(&self, topics: &[String]) -> anyhow::Result<Marks> {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            anyhow::bail!("{MAX_LOOKS_IN_FLIGHT} watermarks looks are still running (blocked in librdkafka): not starting another");
        };
        // Made on a blocking thread too: only the blocking pool ever makes or destroys a client.
        let (this, topics) = (self.clone(), topics.to_vec());
        let late = Arc::new(Mutex::new(None::<Arc<BaseConsumer>>));
        let asked = late.clone();
        let looking = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let client = this.client()?;
            *asked.lock().expect("not poisoned") = Some(client.clone());
            let looked = this.look_through(&client, &topics);
            asked.lock().expect("not poisoned").take();
            looked
        });
        match tokio::time::timeout(LOOK_BOUND + Duration::from_secs(5), looking).await {
            Ok(joined) => joined?,
            Err(_) => {
                // Still blocked: forgotten here, destroyed by its own thread if it ever returns.
                if let Some(client) = late.lock().expect("not poisoned").take() {
                    self.drop_client(&client, "no answer within the bound");
                    std::thread::spawn(move || drop(client));
                }
                anyhow::bail!("the brokers gave no watermarks within {:?}", LOOK_BOUND + Duration::from_secs(5))
            }
        }
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

/// Every partition of `topics` asked once, each request given what is left until `deadline`.
fn look(client: &BaseConsumer, topics: &[String], deadline: std::time::Instant) -> anyhow::Result<Marks> {
    let left = || {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            anyhow::bail!("the brokers gave no watermarks within {LOOK_BOUND:?}");
        }
        Ok(left)
    };
    let mut out = BTreeMap::new();
    for topic in topics {
        let md = client.fetch_metadata(Some(topic), left()?)?;
        for t in md.topics() {
            for p in t.partitions() {
                out.insert((topic.clone(), p.id()), client.fetch_watermarks(topic, p.id(), left()?)?);
            }
        }
    }
    Ok(out)
}

/// One look at the watermarks (a client made for it): for commands that look once.
pub fn watermarks(kafka: &KafkaConnection, topics: &[String]) -> anyhow::Result<Marks> {
    Watermarks::new(kafka).fetch_blocking(topics)
}

/// `watermarks` from async code (the client made and destroyed off the async workers).
pub async fn fetch_watermarks(kafka: &KafkaConnection, topics: &[String]) -> anyhow::Result<Marks> {
    let (kafka, topics) = (kafka.clone(), topics.to_vec());
    tokio::task::spawn_blocking(move || watermarks(&kafka, &topics)).await?
}

/// One look at the lag (a client made for it).
pub async fn lag(kafka: &KafkaConnection, topics: &[String], redis: &mut RedisConn, progress_key: &str) -> anyhow::Result<Lag> {
    Watermarks::new(kafka).lag(topics, redis, progress_key).await
}
