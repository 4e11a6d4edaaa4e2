//! Poison events go, unchanged, to the dead-letter topic with the reason in headers. When that
//! topic refuses one (too large, missing, not authorized) or stays unreachable past a bound, the
//! event is parked in a Redis stream instead: a poison event can neither stop its partition nor
//! be lost. `pb_dead_letters_parked_total` and the API's `/readyz` (`deadLettersParked`) show it.
//! The stream is bounded (`DLQ_PARKED_MAX`): at the cap nothing is parked nor dropped, the batch
//! holding the poison event is retried (its partitions wait, the lag grows, `/readyz` turns 503)
//! until the dead-letter topic takes records again or the cap is raised.
use crate::apply::Transient;
use crate::kafka::KafkaConnection;
use crate::pipeline::Poison;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const REASON_HEADER: &str = "x-dlq-reason";
pub const CODE_HEADER: &str = "x-dlq-code";

pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

/// Why a dead letter did not reach its topic.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct SendError {
    /// The topic or broker said no for good: retrying the same record cannot succeed.
    pub refused: bool,
    pub text: String,
}

fn is_refusal(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageSizeTooLarge
            | UnknownTopicOrPartition
            | UnknownTopic
            | TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | InvalidRecord
            | InvalidTopic
            | MessageBatchTooLarge
            | PolicyViolation
    )
}

impl DeadLetters {
    pub fn new(kafka: &KafkaConnection, topic: &str) -> rdkafka::error::KafkaResult<Self> {
        // A missing topic is reported after 5 s instead of librdkafka's 30 s default.
        let producer = kafka.client_config(&[("message.timeout.ms", "15000"), ("topic.metadata.propagation.max.ms", "5000")]).create()?;
        Ok(DeadLetters { producer, topic: topic.to_string() })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Returns once the broker acknowledged the record: only then may the offset be stored.
    pub async fn send(&self, poison: &Poison) -> Result<(), SendError> {
        let (origin, reason) = (&poison.origin, &poison.reason);
        let reason_text = reason.to_string();
        let partition = origin.partition.to_string();
        let offset = origin.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: REASON_HEADER, value: Some(reason_text.as_str()) })
            .insert(Header { key: CODE_HEADER, value: Some(reason.code()) })
            .insert(Header { key: "x-dlq-topic", value: Some(origin.topic.as_str()) })
            .insert(Header { key: "x-dlq-partition", value: Some(partition.as_str()) })
            .insert(Header { key: "x-dlq-offset", value: Some(offset.as_str()) });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = &poison.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &poison.payload {
            record = record.payload(p.as_slice());
        }
        self.producer
            .send(record, Duration::from_secs(15))
            .await
            .map(|_| ())
            .map_err(|(e, _)| SendError { refused: e.rdkafka_error_code().is_some_and(is_refusal), text: e.to_string() })
    }
}

/// Most dead letters parked in Redis unless `DLQ_PARKED_MAX` says otherwise.
pub const DEFAULT_PARKED_MAX: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ParkError {
    #[error("{held} dead letters are parked in redis, the cap (DLQ_PARKED_MAX) is {max}: not parked, retried")]
    Full { held: u64, max: u64 },
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// Keeps a dead letter the topic refused in a Redis stream, with everything the topic record
/// would have carried plus why the topic refused it, while the stream holds fewer than `max`.
/// Returns once Redis acknowledged it. Two projectors parking at once may pass the cap by the
/// poison events of one batch each; it bounds memory, not an exact count.
pub async fn park(
    redis: &mut board_redis::redis_conn::RedisConn,
    stream: &str,
    max: u64,
    poison: &Poison,
    refusal: &str,
) -> Result<(), ParkError> {
    let (origin, reason) = (&poison.origin, &poison.reason);
    let held: u64 = redis::cmd("XLEN").arg(stream).query_async(redis).await?;
    crate::events::ParkedDeadLetters { held }.emit();
    if held >= max {
        crate::events::ParkRefused.emit();
        return Err(ParkError::Full { held, max });
    }
    let (partition, offset, reason_text) = (origin.partition.to_string(), origin.offset.to_string(), reason.to_string());
    let fields: [(&str, &[u8]); 8] = [
        ("topic", origin.topic.as_bytes()),
        ("partition", partition.as_bytes()),
        ("offset", offset.as_bytes()),
        ("key", poison.key.as_deref().unwrap_or_default()),
        ("payload", poison.payload.as_deref().unwrap_or_default()),
        ("code", reason.code().as_bytes()),
        ("reason", reason_text.as_bytes()),
        ("refusal", refusal.as_bytes()),
    ];
    redis::cmd("XADD").arg(stream).arg("*").arg(&fields[..]).query_async::<String>(redis).await?;
    crate::events::ParkedDeadLetters { held: held + 1 }.emit();
    Ok(())
}

/// Attempts of one batch (with backoff, about 30 s) after which a dead letter that the topic did
/// not take is parked in Redis even though the topic did not refuse it outright: a dead-letter
/// topic that stays unreachable must not stop the partitions for good.
pub const ATTEMPTS_BEFORE_PARKING: u32 = 8;

/// Where the poison records of a batch go: the dead-letter topic, or, when it refuses them (or
/// stayed unreachable for `ATTEMPTS_BEFORE_PARKING` attempts), a Redis stream.
pub struct DeadLetterSink {
    pub topic: DeadLetters,
    pub parked_stream: String,
    pub parked_max: u64,
}

impl DeadLetterSink {
    /// Every record of `poison` acknowledged by the topic or parked in Redis (`parked` counts
    /// those); an error is transient (the batch is retried whole: a record the topic took before
    /// the error is sent again, at least once like everything else).
    pub async fn send_all(
        &self,
        redis: &mut board_redis::redis_conn::RedisConn,
        poison: &[Poison],
        attempt: u32,
        parked: &AtomicU64,
    ) -> Result<(), Transient> {
        let park_unsent = attempt > ATTEMPTS_BEFORE_PARKING;
        for p in poison {
            let o = &p.origin;
            match self.topic.send(p).await {
                Ok(()) => {}
                Err(e) if e.refused || park_unsent => {
                    park(redis, &self.parked_stream, self.parked_max, p, &e.text)
                        .await
                        .map_err(|re| Transient(format!("parking a dead letter in redis: {re}")))?;
                    parked.fetch_add(1, Ordering::Relaxed);
                    crate::events::DeadLetterParked {
                        topic: &o.topic,
                        partition: o.partition,
                        offset: o.offset,
                        code: p.reason.code(),
                        dlq_topic: self.topic.topic(),
                        refusal: &e,
                    }
                    .emit();
                }
                Err(e) => return Err(Transient(format!("dead-letter topic: {e}"))),
            }
            crate::events::EventDeadLettered {
                topic: &o.topic,
                partition: o.partition,
                offset: o.offset,
                code: p.reason.code(),
                reason: &p.reason,
            }
            .emit();
        }
        Ok(())
    }
}
