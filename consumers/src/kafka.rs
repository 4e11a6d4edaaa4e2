//! How every Kafka client of the project connects: the bootstrap servers plus any librdkafka
//! properties the operator passes through (TLS, SASL, client ids, timeouts), so the projector, the
//! dead-letter producer, the lag probe, `seed` and the benchmarks all reach a secured cluster the
//! same way (README "Your own clusters").
use crate::config::KafkaArgs;
use rdkafka::ClientConfig;

#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConnection {
    pub brokers: String,
    /// librdkafka properties set on every client after the project's own, so the operator's win.
    pub options: Vec<(String, String)>,
}

impl KafkaConnection {
    pub fn new(brokers: &str) -> Self {
        KafkaConnection { brokers: brokers.to_string(), options: Vec::new() }
    }

    /// From `--kafka-brokers` and the repeated `--kafka-option KEY=VALUE` (env `KAFKA_OPTIONS`,
    /// `;`-separated). A malformed option is an error at start-up, not a silently ignored one.
    pub fn from_args(args: &KafkaArgs) -> anyhow::Result<Self> {
        let options = args
            .kafka_options
            .iter()
            .filter(|o| !o.trim().is_empty())
            .map(|o| {
                let (k, v) = o.split_once('=').ok_or_else(|| anyhow::anyhow!("--kafka-option {o:?} is not KEY=VALUE"))?;
                anyhow::ensure!(k.trim() != "bootstrap.servers", "set the brokers with --kafka-brokers / KAFKA_BROKERS");
                Ok((k.trim().to_string(), v.to_string()))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(KafkaConnection { brokers: args.kafka_brokers.clone(), options })
    }

    /// With one more pass-through option (as `--kafka-option KEY=VALUE`).
    pub fn with_option(mut self, key: &str, value: &str) -> Self {
        self.options.push((key.to_string(), value.to_string()));
        self
    }

    /// A client configuration with the bootstrap servers and the pass-through options; the
    /// caller adds its role's own settings with `overrides` (they are applied first, so an
    /// operator option with the same name still wins).
    pub fn client_config(&self, overrides: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in overrides {
            config.set(*k, *v);
        }
        for (k, v) in &self.options {
            config.set(k, v);
        }
        config
    }
}

impl From<&str> for KafkaConnection {
    fn from(brokers: &str) -> Self {
        KafkaConnection::new(brokers)
    }
}

impl From<&String> for KafkaConnection {
    fn from(brokers: &String) -> Self {
        KafkaConnection::new(brokers)
    }
}

/// Fills `batch` up to `max` messages, waiting at most `linger` for more: how every reader of the
/// topics (the projector's group consumer, the rebuild's replay) gathers one batch to apply. A
/// poll error ends the batch (the client reconnects by itself); `read` turns each message into
/// what the batch holds.
pub async fn fill_batch<C, T>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    batch: &mut Vec<T>,
    max: usize,
    linger: std::time::Duration,
    mut read: impl FnMut(rdkafka::message::OwnedMessage) -> T,
) where
    C: rdkafka::consumer::ConsumerContext + 'static,
{
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(read(m.detach())),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "kafka poll error");
                break;
            }
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(options: &[&str]) -> KafkaArgs {
        KafkaArgs {
            kafka_brokers: "b:9092".into(),
            kafka_options: options.iter().map(|s| s.to_string()).collect(),
            topics: Default::default(),
        }
    }

    #[test]
    fn operator_options_win_over_the_roles_own() {
        let c = KafkaConnection::from_args(&args(&["security.protocol=SASL_SSL", "session.timeout.ms=45000", ""])).unwrap();
        let config = c.client_config(&[("session.timeout.ms", "6000"), ("group.id", "g")]);
        assert_eq!(config.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("session.timeout.ms"), Some("45000"));
        assert_eq!(config.get("group.id"), Some("g"));
    }

    #[test]
    fn values_may_contain_equals_signs() {
        let c = KafkaConnection::from_args(&args(&["sasl.oauthbearer.config=scope=a principal=b"])).unwrap();
        assert_eq!(c.options, vec![("sasl.oauthbearer.config".to_string(), "scope=a principal=b".to_string())]);
    }

    #[test]
    fn malformed_options_are_refused() {
        assert!(KafkaConnection::from_args(&args(&["no-equals-sign"])).is_err());
        assert!(KafkaConnection::from_args(&args(&["bootstrap.servers=elsewhere:9092"])).is_err());
    }
}
