//! A run's own corner of the shared servers: its topics, Redis key prefix, consumer group and
//! MongoDB database, all named after one unique name, so tests and benchmark runs on the same
//! stack never see each other. Used by the integration tests' `TestEnv` and by
//! `pipeline-board bench run`; both remove what they made with `remove`.
use board_model::keys::KeySpace;
use projector::config::Topics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use std::time::Duration;

/// The stack's addresses, from the environment as every command reads them (`deploy/stack.sh`'s
/// defaults otherwise).
#[derive(Debug, Clone)]
pub struct Stack {
    pub brokers: String,
    pub redis_url: String,
    pub mongo_uri: String,
}

impl Stack {
    pub fn from_env() -> Stack {
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        Stack {
            brokers: var("KAFKA_BROKERS", "127.0.0.1:9092"),
            redis_url: var("REDIS_URL", "redis://127.0.0.1:6379"),
            mongo_uri: var("MONGODB_URI", "mongodb://127.0.0.1:27017"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Unique on the stack: `<what>-<pid>-<random>`.
    pub name: String,
    pub brokers: String,
    pub redis_url: String,
    pub mongo_uri: String,
    pub mongo_db: String,
    pub topics: Topics,
    pub keys: KeySpace,
    pub group: String,
}

impl Sandbox {
    /// Names for `what` on `stack`; `tag` starts the key prefix (`t` for tests, `bench`).
    pub fn new(what: &str, tag: &str, stack: &Stack) -> Sandbox {
        let unique = format!("{what}-{}-{}", std::process::id(), rand::random::<u32>());
        Sandbox {
            brokers: stack.brokers.clone(),
            redis_url: stack.redis_url.clone(),
            mongo_uri: stack.mongo_uri.clone(),
            mongo_db: format!("{tag}{}", unique.replace(['-', '.'], "_")),
            topics: Topics::with_prefix(&format!("{unique}.")),
            keys: KeySpace::new(format!("{tag}:{unique}")),
            group: format!("g-{unique}"),
            name: unique,
        }
    }

    /// Every topic of the sandbox: the inputs and the dead letters.
    pub fn topic_names(&self) -> Vec<String> {
        let mut names = self.topics.inputs();
        names.push(self.topics.topic_dlq.clone());
        names
    }

    fn admin(&self) -> anyhow::Result<AdminClient<DefaultClientContext>> {
        Ok(ClientConfig::new().set("bootstrap.servers", &self.brokers).create()?)
    }

    pub async fn create_topics(&self, partitions: i32) -> anyhow::Result<()> {
        let names = self.topic_names();
        let new: Vec<NewTopic> = names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for r in self.admin()?.create_topics(&new, &opts).await? {
            r.map_err(|(topic, e)| anyhow::anyhow!("topic {topic} not created: {e}"))?;
        }
        Ok(())
    }

    /// The environment a `pipeline-board` command reads to work in this sandbox.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let t = &self.topics;
        vec![
            ("MONGODB_URI", self.mongo_uri.clone()),
            ("MONGODB_DB", self.mongo_db.clone()),
            ("KAFKA_BROKERS", self.brokers.clone()),
            ("REDIS_URL", self.redis_url.clone()),
            ("REDIS_PREFIX", self.keys.prefix().to_string()),
            ("KAFKA_GROUP_ID", self.group.clone()),
            ("TOPIC_CONTACTS", t.topic_contacts.clone()),
            ("TOPIC_APPLICATIONS", t.topic_applications.clone()),
            ("TOPIC_CONVERSATIONS", t.topic_conversations.clone()),
            ("TOPIC_MESSAGES", t.topic_messages.clone()),
            ("TOPIC_PIPELINES", t.topic_pipelines.clone()),
            ("TOPIC_USERS", t.topic_users.clone()),
            ("TOPIC_DLQ", t.topic_dlq.clone()),
        ]
    }

    /// A `pipeline-board` command (the binary at `bin`) working in this sandbox.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, bin: &std::path::Path, args: &[S]) -> std::process::Command {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(args).envs(self.env());
        cmd
    }

    /// Removes the sandbox's topics, consumer group, MongoDB database and keys (on
    /// `redis_urls`: the servers the run wrote to), best effort, each server in its own time
    /// bound (`keys_within` for the keys: a test's few or a benchmark's millions): one a test
    /// stopped costs that bound, not the others' turn.
    pub async fn remove(&self, redis_urls: &[String], keys_within: Duration) {
        let bound = Duration::from_secs(10);
        let _ = tokio::time::timeout(bound, async {
            if let Ok(admin) = self.admin() {
                let names = self.topic_names();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
                let _ = admin.delete_topics(&names, &opts).await;
                let _ = admin.delete_groups(&[self.group.as_str()], &opts).await;
            }
        })
        .await;
        let _ = tokio::time::timeout(bound, async {
            if let Ok(db) = board_mongo::connect(&self.mongo_uri, &self.mongo_db).await {
                let _ = db.drop().await;
            }
        })
        .await;
        for url in redis_urls {
            let _ = tokio::time::timeout(keys_within, remove_keys(url, &self.keys.pattern())).await;
        }
    }
}

impl Sandbox {
    /// Removes consumer groups (those a run used beside the sandbox's own), best effort.
    pub async fn remove_groups(&self, groups: &[String]) {
        if groups.is_empty() {
            return;
        }
        let Ok(admin) = self.admin() else { return };
        let names: Vec<&str> = groups.iter().map(String::as_str).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let _ = tokio::time::timeout(Duration::from_secs(15), admin.delete_groups(&names, &opts)).await;
    }
}

/// Every key matching `pattern` on every primary, removed.
pub async fn remove_keys(redis_url: &str, pattern: &str) -> anyhow::Result<u64> {
    let mut conn = board_redis::config::redis_connection(redis_url).await?;
    let keys: Vec<String> = conn.scan_match(pattern).await?;
    conn.unlink(&keys).await?;
    Ok(keys.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_the_sandboxs_own() {
        let stack = Stack { brokers: "b:9092".into(), redis_url: "redis://r".into(), mongo_uri: "mongodb://m".into() };
        let (a, b) = (Sandbox::new("x", "t", &stack), Sandbox::new("x", "t", &stack));
        assert_ne!(a.name, b.name);
        assert!(a.topic_names().iter().all(|t| t.starts_with(&format!("{}.", a.name))));
        assert_eq!(a.topic_names().len(), 7);
        assert!(a.keys.pattern().starts_with(&format!("t:{}", a.name)));
        assert!(!a.mongo_db.contains(['-', '.']), "MongoDB names take neither");
        let env: std::collections::HashMap<_, _> = a.env().into_iter().collect();
        assert_eq!(env["REDIS_PREFIX"], a.keys.prefix());
        assert_eq!(env["TOPIC_DLQ"], a.topics.topic_dlq);
        assert_eq!(env["KAFKA_GROUP_ID"], a.group);
    }
}
