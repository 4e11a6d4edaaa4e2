//! Poison events go, unchanged, to the dead-letter topic with the reason in headers.
use crate::kafka::KafkaConnection;
use board_core::events::PoisonReason;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

pub const REASON_HEADER: &str = "x-dlq-reason";
pub const CODE_HEADER: &str = "x-dlq-code";

pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

/// Where a poison event came from; it travels in headers next to the reason.
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

impl DeadLetters {
    pub fn new(kafka: &KafkaConnection, topic: &str) -> rdkafka::error::KafkaResult<Self> {
        let producer = kafka.client_config(&[("message.timeout.ms", "15000")]).create()?;
        Ok(DeadLetters { producer, topic: topic.to_string() })
    }

    /// Returns once the broker acknowledged the record: only then may the offset be stored.
    pub async fn send(&self, origin: &Origin<'_>, reason: &PoisonReason) -> Result<(), String> {
        let reason_text = reason.to_string();
        let partition = origin.partition.to_string();
        let offset = origin.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: REASON_HEADER, value: Some(reason_text.as_str()) })
            .insert(Header { key: CODE_HEADER, value: Some(reason.code()) })
            .insert(Header { key: "x-dlq-topic", value: Some(origin.topic) })
            .insert(Header { key: "x-dlq-partition", value: Some(partition.as_str()) })
            .insert(Header { key: "x-dlq-offset", value: Some(offset.as_str()) });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = origin.key {
            record = record.key(k);
        }
        if let Some(p) = origin.payload {
            record = record.payload(p);
        }
        self.producer.send(record, Duration::from_secs(15)).await.map(|_| ()).map_err(|(e, _)| e.to_string())
    }
}
