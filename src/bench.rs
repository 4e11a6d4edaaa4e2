//! `pipeline-board bench ...`: the raw costs our numbers are compared against, measured with the
//! same clients on the same data (see deploy/bench.sh).
use board_core::config::KafkaArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Read every input topic from the start without processing: the raw Kafka read rate.
    KafkaRead {
        #[command(flatten)]
        kafka: KafkaArgs,
    },
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::KafkaRead { kafka } => {
            let (messages, bytes, secs) = tokio::task::spawn_blocking(move || kafka_read(&kafka)).await??;
            println!(
                "kafka read: {messages} messages, {:.1} MB in {secs:.2} s = {:.0} messages/s",
                bytes as f64 / 1e6,
                messages as f64 / secs.max(1e-9)
            );
        }
    }
    Ok(())
}

fn kafka_read(kafka: &KafkaArgs) -> anyhow::Result<(u64, u64, f64)> {
    let topics = kafka.topics.inputs();
    let kafka = pipeline_board_consumers::KafkaConnection::from_args(kafka)?;
    let group = format!("bench-read-{}", std::process::id());
    let consumer: BaseConsumer = kafka.client_config(&[("group.id", &group), ("enable.auto.commit", "false")]).create()?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    for ((topic, partition), (low, end)) in pipeline_board_consumers::progress::watermarks(&kafka, &topics)? {
        remaining += end - low;
        tpl.add_partition_offset(&topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let (mut messages, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    while (messages as i64) < remaining {
        match consumer.poll(Duration::from_secs(5)) {
            Some(Ok(m)) => {
                messages += 1;
                bytes += m.payload().map(|p| p.len()).unwrap_or(0) as u64;
            }
            Some(Err(e)) => anyhow::bail!("kafka: {e}"),
            None => anyhow::bail!("no message for 5 s with {} left", remaining - messages as i64),
        }
    }
    Ok((messages, bytes, started.elapsed().as_secs_f64()))
}
