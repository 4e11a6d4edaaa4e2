//! Redis flags with environment fallbacks (CONTRACT.md 4), shared by every subcommand.
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
