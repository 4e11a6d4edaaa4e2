//! Kafka flags with environment fallbacks (CONTRACT.md 4): brokers, client options and topic names.
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// librdkafka property passed through to every Kafka client, KEY=VALUE (repeatable; env:
    /// `;`-separated), e.g. `security.protocol=SASL_SSL`, `sasl.mechanisms=SCRAM-SHA-512`,
    /// `ssl.ca.location=/etc/ssl/kafka-ca.pem`.
    #[arg(long = "kafka-option", env = "KAFKA_OPTIONS", value_delimiter = ';', hide_env_values = true)]
    pub kafka_options: Vec<String>,
    #[command(flatten)]
    pub topics: Topics,
}

#[derive(Debug, Clone, Args)]
pub struct Topics {
    #[arg(long, env = "TOPIC_CONTACTS", default_value = "crm.contacts")]
    pub topic_contacts: String,
    #[arg(long, env = "TOPIC_APPLICATIONS", default_value = "crm.applications")]
    pub topic_applications: String,
    #[arg(long, env = "TOPIC_CONVERSATIONS", default_value = "crm.conversations")]
    pub topic_conversations: String,
    #[arg(long, env = "TOPIC_MESSAGES", default_value = "crm.messages")]
    pub topic_messages: String,
    #[arg(long, env = "TOPIC_PIPELINES", default_value = "crm.pipelines")]
    pub topic_pipelines: String,
    #[arg(long, env = "TOPIC_USERS", default_value = "crm.users")]
    pub topic_users: String,
    #[arg(long, env = "TOPIC_DLQ", default_value = "crm.dlq")]
    pub topic_dlq: String,
}

impl Topics {
    /// The six input topics, in the order a fresh projection is best fed (seed writes them so).
    pub fn inputs(&self) -> Vec<String> {
        vec![
            self.topic_pipelines.clone(),
            self.topic_users.clone(),
            self.topic_contacts.clone(),
            self.topic_applications.clone(),
            self.topic_conversations.clone(),
            self.topic_messages.clone(),
        ]
    }

    /// The same names with a common prefix: tests use it to get topics of their own.
    pub fn with_prefix(prefix: &str) -> Topics {
        let t = |n: &str| format!("{prefix}{n}");
        Topics {
            topic_contacts: t("crm.contacts"),
            topic_applications: t("crm.applications"),
            topic_conversations: t("crm.conversations"),
            topic_messages: t("crm.messages"),
            topic_pipelines: t("crm.pipelines"),
            topic_users: t("crm.users"),
            topic_dlq: t("crm.dlq"),
        }
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics::with_prefix("")
    }
}
