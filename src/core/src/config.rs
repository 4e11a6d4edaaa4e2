//! Configuration shared by the subcommands: flags with environment fallbacks (CONTRACT.md 4).
use crate::redis_conn::{ConnectOptions, RedisConn, RedisTarget};
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// One server (`redis://host:port`) or a Redis Cluster by its seed nodes
    /// (`redis+cluster://host1:port1,host2:port2`, or URLs separated by commas).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Treat a single-node `--redis-url` as a seed of a Redis Cluster.
    #[arg(long, env = "REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,
    /// Prefix of every projection key; a new prefix is a separate projection generation.
    #[arg(long, env = "REDIS_PREFIX", default_value = "pb")]
    pub redis_prefix: String,
}

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

#[derive(Debug, Clone, Args)]
pub struct MongoArgs {
    #[arg(long, env = "MONGODB_URI", default_value = "mongodb://127.0.0.1:27017")]
    pub mongodb_uri: String,
    #[arg(long, env = "MONGODB_DB", default_value = "crm")]
    pub mongodb_db: String,
}

impl RedisArgs {
    /// The URL every Redis client of this process uses: `--redis-cluster` turns a one-node URL
    /// into the cluster form, so that the rest passes one string around.
    pub fn url(&self) -> String {
        if self.redis_cluster && !self.redis_url.contains("+cluster://") {
            self.redis_url.replacen("://", "+cluster://", 1)
        } else {
            self.redis_url.clone()
        }
    }
}

/// A Redis connection (one server or a cluster, by the URL's form; see `redis_conn`):
/// reconnecting, with a response timeout long enough for a Redis that is busy running other
/// clients' Functions (the client's default is far shorter).
pub async fn redis_connection(url: &str) -> redis::RedisResult<RedisConn> {
    RedisConn::connect(&RedisTarget::parse(url, false), ConnectOptions::default()).await
}
