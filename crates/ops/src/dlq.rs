//! `pipeline-board dlq list | show | replay`: the dead letters an operator re-drives once their
//! cause is fixed. They live in the dead-letter topic (headers: reason, code, origin) and, when
//! that topic refused them, in the Redis stream `<prefix>:dlq:parked`. Replay re-produces the
//! original payload, with its original key, into its original topic, and records what it
//! replayed in the Redis set `<prefix>:dlq:replayed` so a second replay skips it.
use projector::dead_letter::{CODE_HEADER, REASON_HEADER};
use projector::{progress, KafkaConnection};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use redis::AsyncCommands;
use std::time::Duration;

/// One dead letter, wherever it is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// `dlq/<partition>/<offset>` for the topic, `parked/<stream id>` for Redis.
    pub id: String,
    /// Offset in the dead-letter topic (None when parked).
    pub dlq_offset: Option<i64>,
    pub origin_topic: String,
    pub origin_partition: i32,
    pub origin_offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub code: String,
    pub reason: String,
    /// Unix millis when it was dead-lettered (the record's timestamp), if known.
    pub at: Option<i64>,
}

/// Which dead letters a command is about.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Selection {
    /// Only this reason code (e.g. invalid_json, missing_field, rejected).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only those from this input topic.
    #[arg(long)]
    pub origin: Option<String>,
    /// Only dead-letter-topic offsets from this one on (inclusive).
    #[arg(long)]
    pub from_offset: Option<i64>,
    /// Only dead-letter-topic offsets up to this one (inclusive).
    #[arg(long)]
    pub to_offset: Option<i64>,
    /// Only these ids (as `list` prints them); repeatable.
    #[arg(long = "id")]
    pub ids: Vec<String>,
}

impl Selection {
    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.reason.as_ref().is_none_or(|r| &d.code == r)
            && self.origin.as_ref().is_none_or(|o| &d.origin_topic == o)
            && self.from_offset.is_none_or(|f| d.dlq_offset.is_some_and(|o| o >= f))
            && self.to_offset.is_none_or(|t| d.dlq_offset.is_some_and(|o| o <= t))
            && (self.ids.is_empty() || self.ids.contains(&d.id))
    }
}

fn header(h: Option<&rdkafka::message::BorrowedHeaders>, name: &str) -> Option<String> {
    h?.iter().find(|x| x.key == name).and_then(|x| x.value.map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// Every record of the dead-letter topic, read from each partition's start to its end.
pub fn read_topic(kafka: &KafkaConnection, topic: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let marks = progress::watermarks(kafka, &[topic.to_string()])?;
    let consumer: BaseConsumer =
        kafka.client_config(&[("group.id", "pipeline-board-dlq-reader"), ("enable.auto.commit", "false")]).create()?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    for ((t, p), (low, high)) in &marks {
        if high > low {
            tpl.add_partition_offset(t, *p, Offset::Offset(*low))?;
            remaining += high - low;
        }
    }
    let mut out = Vec::new();
    if remaining == 0 {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while remaining > 0 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "reading {topic} took longer than 60 s");
        match consumer.poll(Duration::from_secs(1)) {
            Some(Ok(m)) => {
                remaining -= 1;
                let h = m.headers();
                out.push(DeadLetter {
                    id: format!("dlq/{}/{}", m.partition(), m.offset()),
                    dlq_offset: Some(m.offset()),
                    origin_topic: header(h, "x-dlq-topic").unwrap_or_default(),
                    origin_partition: header(h, "x-dlq-partition").and_then(|p| p.parse().ok()).unwrap_or(-1),
                    origin_offset: header(h, "x-dlq-offset").and_then(|p| p.parse().ok()).unwrap_or(-1),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    code: header(h, CODE_HEADER).unwrap_or_default(),
                    reason: header(h, REASON_HEADER).unwrap_or_default(),
                    at: m.timestamp().to_millis(),
                });
            }
            Some(Err(e)) => anyhow::bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    out.sort_by_key(|d| (d.at, d.id.clone()));
    Ok(out)
}

/// Every dead letter parked in Redis (the topic refused it).
pub async fn read_parked(conn: &mut board_redis::redis_conn::RedisConn, stream: &str) -> redis::RedisResult<Vec<DeadLetter>> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(stream).await?;
    Ok(reply
        .ids
        .into_iter()
        .map(|e| {
            let bytes =
                |name: &str| -> Vec<u8> { e.map.get(name).and_then(|v| redis::from_redis_value(v.clone()).ok()).unwrap_or_default() };
            let text = |name: &str| String::from_utf8_lossy(&bytes(name)).into_owned();
            let key = bytes("key");
            DeadLetter {
                at: e.id.split('-').next().and_then(|ms| ms.parse().ok()),
                id: format!("parked/{}", e.id),
                dlq_offset: None,
                origin_topic: text("topic"),
                origin_partition: text("partition").parse().unwrap_or(-1),
                origin_offset: text("offset").parse().unwrap_or(-1),
                key: (!key.is_empty()).then_some(key),
                payload: bytes("payload"),
                code: text("code"),
                reason: text("reason"),
            }
        })
        .collect())
}

#[derive(Debug, Default, PartialEq)]
pub struct ReplayReport {
    pub replayed: usize,
    /// Replayed by an earlier run: skipped.
    pub already: usize,
    /// Without an origin topic to go back to: skipped.
    pub no_origin: usize,
    /// Naming a topic that is not one of the projection's inputs (the header is data anyone
    /// who can write the dead-letter topic controls): skipped, never produced to.
    pub not_an_input: usize,
}

/// Re-produces each dead letter into its original topic, once, and only when that topic is one
/// of `inputs` (the configured input topics): a dead letter is recorded as replayed (in
/// `replayed_set`) only after the broker acknowledged it, and skipped afterwards.
pub async fn replay(
    kafka: &KafkaConnection,
    conn: &mut board_redis::redis_conn::RedisConn,
    replayed_set: &str,
    inputs: &[String],
    letters: &[DeadLetter],
    dry_run: bool,
) -> anyhow::Result<ReplayReport> {
    let producer: FutureProducer = kafka.client_config(&[("message.timeout.ms", "30000")]).create()?;
    let mut report = ReplayReport::default();
    for d in letters {
        if d.origin_topic.is_empty() {
            report.no_origin += 1;
            continue;
        }
        if !inputs.contains(&d.origin_topic) {
            tracing::warn!(id = %d.id, topic = %d.origin_topic, "dead letter names a topic that is not an input; not replayed");
            report.not_an_input += 1;
            continue;
        }
        if conn.sismember(replayed_set, &d.id).await? {
            report.already += 1;
            continue;
        }
        if !dry_run {
            let headers = OwnedHeaders::new().insert(Header { key: "x-dlq-replayed-from", value: Some(d.id.as_str()) });
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&d.origin_topic).payload(d.payload.as_slice()).headers(headers);
            if let Some(k) = &d.key {
                record = record.key(k);
            }
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| anyhow::anyhow!("replaying {}: {e}", d.id))?;
            let _: () = conn.sadd(replayed_set, &d.id).await?;
        }
        report.replayed += 1;
    }
    Ok(report)
}
