//! One Redis connection type for a single server and for a Redis Cluster, so that every command
//! (`serve`, `project`, `rebuild`, `verify`, `seed`, `bench`) runs on either without knowing
//! which.
//!
//! Which one is said by the URL (README "Redis Cluster"):
//! - `redis://host:port` — one server (reconnecting `ConnectionManager`);
//! - `redis+cluster://host1:port1,host2:port2` or `redis://host1:port1,redis://host2:port2`
//!   (several seed nodes) — a cluster (`cluster_async::ClusterConnection`, which follows
//!   `MOVED`/`ASK` redirections and refreshes its slot map after a failover or a reshard).
//!
//! Every multi-key operation of this service is single-slot by construction: an org's keys all
//! carry `{<orgId>}`, the projection's own state `{meta}`. The cluster client refuses a pipeline
//! whose keys name two slots (`CrossSlot`) and Redis refuses a Function call that does, so the
//! cluster tests fail on any cross-slot operation.
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use std::collections::HashMap;

pub use redis::cluster_routing::Route;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::time::Duration;

/// Where to connect, parsed from a Redis URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// One URL per seed node (`redis://` or `rediss://`).
    pub nodes: Vec<String>,
    pub cluster: bool,
}

impl RedisTarget {
    /// `redis+cluster://a:1,b:2` (or `rediss+cluster://`), a comma-separated list of URLs, or one
    /// URL (a single server unless `force_cluster`).
    pub fn parse(url: &str, force_cluster: bool) -> Self {
        let (cluster_scheme, rest) = match url.split_once("+cluster://") {
            Some((scheme, rest)) => (Some(scheme.to_string()), rest.to_string()),
            None => (None, url.to_string()),
        };
        let nodes: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| match (&cluster_scheme, n.contains("://")) {
                (Some(scheme), false) => format!("{scheme}://{n}"),
                _ => n.to_string(),
            })
            .collect();
        let cluster = force_cluster || cluster_scheme.is_some() || nodes.len() > 1;
        RedisTarget { nodes, cluster }
    }

    /// The first seed node (a single server: the server), or the local default.
    pub fn first_node(&self) -> &str {
        self.nodes.first().map(String::as_str).unwrap_or("redis://127.0.0.1:6379")
    }
}

/// How a connection behaves.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    pub connection_timeout: Duration,
    /// Long enough for a Redis busy running other clients' Functions (the client's default is
    /// far shorter).
    pub response_timeout: Duration,
    /// Cluster only: read-only commands (GET, HGETALL, ZRANGE, `FCALL_RO`, ...) go to a replica
    /// of the slot's shard (the cluster client sends `READONLY` to it). Writes always go to the
    /// primary.
    pub read_from_replicas: bool,
    /// Attempts of a request before its error is returned (None: the client's default). The
    /// API keeps it low: a board answers from MongoDB rather than waiting on a down Redis.
    pub retries: Option<u32>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connection_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            read_from_replicas: false,
            retries: None,
        }
    }
}

/// A connection to a single server or to a cluster; cheap to clone (both are multiplexed).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects now (the cluster client reads the slot map from a seed).
    pub async fn connect(target: &RedisTarget, options: ConnectOptions) -> RedisResult<Self> {
        if target.cluster {
            Ok(RedisConn::Cluster(cluster_builder(target, options).build()?.get_async_connection().await?))
        } else {
            let url = target.first_node();
            Ok(RedisConn::Single(ConnectionManager::new_with_config(redis::Client::open(url)?, manager_config(options)).await?))
        }
    }

    /// Like `connect`, but connected in the background: the API starts while Redis is down
    /// and answers from MongoDB meanwhile.
    pub async fn connect_lazy(target: &RedisTarget, options: ConnectOptions) -> RedisResult<Self> {
        if target.cluster {
            let client = cluster_builder(target, options).build()?;
            return Ok(RedisConn::Cluster(client.get_pending_async_connection_with_config(redis::cluster::ClusterConfig::default())));
        }
        let url = target.first_node();
        Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(redis::Client::open(url)?, manager_config(options))?))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// The primaries, as (host, port): one entry (None) for a single server.
    pub async fn primaries(&mut self) -> RedisResult<Vec<Option<(String, u16)>>> {
        match self {
            RedisConn::Single(_) => Ok(vec![None]),
            RedisConn::Cluster(c) => {
                let shards = redis::cmd("CLUSTER").arg("SHARDS").query_async::<Value>(c).await?;
                Ok(cluster_nodes(&shards)?.into_iter().filter(|n| n.primary && n.healthy).map(|n| Some((n.host, n.port))).collect())
            }
        }
    }

    /// Every node of a cluster with its role and shard (empty for a single server).
    pub async fn cluster_nodes(&mut self) -> RedisResult<Vec<ClusterNode>> {
        match self {
            RedisConn::Single(_) => Ok(Vec::new()),
            RedisConn::Cluster(c) => cluster_nodes(&redis::cmd("CLUSTER").arg("SHARDS").query_async::<Value>(c).await?),
        }
    }

    /// Runs `cmd` on one node (None: the single server).
    pub async fn on_node(&mut self, cmd: &Cmd, node: &Option<(String, u16)>) -> RedisResult<Value> {
        match (self, node) {
            (RedisConn::Cluster(c), Some((host, port))) => {
                c.route_command(cmd.clone(), RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port }))
                    .await
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }

    /// Runs commands in as few round trips as the deployment allows, replies in order: one
    /// pipeline on a single server; on a cluster one pipeline per hash slot (`slot_key` of each
    /// command names its slot), all sent at once. For reads and writes of many orgs at a time
    /// (the projector's batch): one org's commands share its slot.
    pub async fn query_by_slot<T: redis::FromRedisValue>(&mut self, cmds: Vec<(String, Cmd)>) -> RedisResult<Vec<T>> {
        let values = self.query_values_by_slot(cmds).await?;
        values.into_iter().map(|v| redis::from_redis_value(v).map_err(redis::RedisError::from)).collect()
    }

    async fn query_values_by_slot(&mut self, cmds: Vec<(String, Cmd)>) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            RedisConn::Single(c) => {
                let mut pipe = redis::pipe();
                for (_, cmd) in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query_async(c).await
            }
            RedisConn::Cluster(c) => {
                let mut groups: HashMap<Route, (Vec<usize>, Pipeline)> = HashMap::new();
                for (i, (key, cmd)) in cmds.into_iter().enumerate() {
                    let (idx, pipe) =
                        groups.entry(Route::with_key(key.as_bytes(), SlotAddr::Master)).or_insert_with(|| (Vec::new(), redis::pipe()));
                    idx.push(i);
                    pipe.add_command(cmd);
                }
                let n = groups.values().map(|(idx, _)| idx.len()).sum();
                let replies = futures::future::try_join_all(groups.into_values().map(|(idx, pipe)| {
                    let mut c = c.clone();
                    async move { pipe.query_async::<Vec<Value>>(&mut c).await.map(|r| (idx, r)) }
                }))
                .await?;
                let mut out = vec![Value::Nil; n];
                for (idx, values) in replies {
                    for (i, v) in idx.into_iter().zip(values) {
                        out[i] = v;
                    }
                }
                Ok(out)
            }
        }
    }

    /// Where the primary of `key`'s slot is, for `wait_on` and `replicas_of` (a single server:
    /// ignored).
    pub fn route_of(key: &str) -> Route {
        Route::with_key(key.as_bytes(), SlotAddr::Master)
    }

    /// `WAIT replicas timeout` on the primary of `route`, after this connection's writes to
    /// it: how many replicas acknowledged them. A write acknowledged by a replica survives that
    /// replica's promotion.
    pub async fn wait_on(&mut self, route: Route, replicas: u32, timeout: Duration) -> RedisResult<i64> {
        let wait = redis::cmd("WAIT").arg(replicas).arg(timeout.as_millis() as u64).clone();
        self.on_route(wait, route).await.and_then(|v| Ok(redis::from_redis_value(v)?))
    }

    /// How many replicas the primary of `route` has connected now (`ROLE`).
    pub async fn replicas_of(&mut self, route: Route) -> RedisResult<usize> {
        let role = self.on_route(redis::cmd("ROLE").clone(), route).await?;
        Ok(match role {
            Value::Array(items) => match items.get(2) {
                Some(Value::Array(replicas)) => replicas.len(),
                _ => 0,
            },
            _ => 0,
        })
    }

    async fn on_route(&mut self, cmd: Cmd, route: Route) -> RedisResult<Value> {
        match self {
            RedisConn::Single(c) => cmd.query_async(c).await,
            RedisConn::Cluster(c) => c.route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route))).await,
        }
    }

    /// The names matching `pattern` on every primary (SCAN walks one node's keys only).
    pub async fn scan_match(&mut self, pattern: &str) -> RedisResult<Vec<String>> {
        let mut found = Vec::new();
        for node in self.primaries().await? {
            let mut cursor = 0u64;
            loop {
                let cmd = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).clone();
                let (next, keys): (u64, Vec<String>) = redis::from_redis_value(self.on_node(&cmd, &node).await?)?;
                found.extend(keys);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// Removes `keys`, 1,000 a round trip (a cluster client splits a multi-key UNLINK by slot).
    pub async fn unlink<K: redis::ToRedisArgs + Sync>(&mut self, keys: &[K]) -> RedisResult<()> {
        for chunk in keys.chunks(1000) {
            redis::cmd("UNLINK").arg(chunk).query_async::<()>(self).await?;
        }
        Ok(())
    }
}

/// Runs one command on a plain blocking connection, made for it: for code that must decide
/// before it returns and cannot await (the projector's rebalance callback, inside librdkafka's
/// poll).
pub fn query_blocking<T: redis::FromRedisValue>(target: &RedisTarget, cmd: &Cmd, timeout: Duration) -> RedisResult<T> {
    if target.cluster {
        let client = redis::cluster::ClusterClientBuilder::new(target.nodes.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()?;
        cmd.query(&mut client.get_connection()?)
    } else {
        let url = target.first_node();
        let mut c = redis::Client::open(url)?.get_connection_with_timeout(timeout)?;
        c.set_read_timeout(Some(timeout))?;
        cmd.query(&mut c)
    }
}

/// The fewest attempts a cluster request gets (see `cluster_builder`).
const CLUSTER_MIN_RETRIES: u32 = 6;

fn cluster_builder(target: &RedisTarget, options: ConnectOptions) -> redis::cluster::ClusterClientBuilder {
    let mut builder = redis::cluster::ClusterClientBuilder::new(target.nodes.clone())
        .connection_timeout(options.connection_timeout)
        .response_timeout(options.response_timeout);
    if let Some(n) = options.retries {
        // The cluster client spends a retry on each redirection (MOVED, ASK, TRYAGAIN while a
        // slot moves): fewer than a handful turn a slot move into errors.
        builder = builder.retries(n.max(CLUSTER_MIN_RETRIES));
    }
    if options.read_from_replicas {
        builder = builder.read_routing_strategy(SlotPinnedReplica);
    }
    builder
}

fn manager_config(options: ConnectOptions) -> redis::aio::ConnectionManagerConfig {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.connection_timeout))
        .set_response_timeout(Some(options.response_timeout));
    match options.retries {
        Some(n) => config.set_number_of_retries(n as usize),
        None => config,
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// One node of a cluster, from `CLUSTER SHARDS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    pub host: String,
    pub port: u16,
    pub primary: bool,
    pub healthy: bool,
    /// The replication offset the node reports.
    pub replication_offset: i64,
    /// The slot ranges of the node's shard.
    pub slots: Vec<(u16, u16)>,
}

/// Parses a `CLUSTER SHARDS` reply (RESP2: maps as flat arrays).
pub fn cluster_nodes(reply: &Value) -> RedisResult<Vec<ClusterNode>> {
    let bad =
        |what: &str| redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "unexpected CLUSTER SHARDS reply", what.to_string()));
    let Value::Array(shards) = reply else { return Err(bad("not an array")) };
    let mut out = Vec::new();
    for shard in shards {
        let shard = pairs(shard).ok_or_else(|| bad("shard"))?;
        let mut slots = Vec::new();
        if let Some(Value::Array(ranges)) = shard.get("slots") {
            for pair in ranges.chunks(2) {
                if let [a, b] = pair {
                    slots.push((redis::from_redis_value::<u16>(a.clone())?, redis::from_redis_value::<u16>(b.clone())?));
                }
            }
        }
        let Some(Value::Array(nodes)) = shard.get("nodes") else { return Err(bad("nodes")) };
        for node in nodes {
            let n = pairs(node).ok_or_else(|| bad("node"))?;
            let text = |k: &str| n.get(k).and_then(|v| redis::from_redis_value::<String>((*v).clone()).ok()).unwrap_or_default();
            let number = |k: &str| n.get(k).and_then(|v| redis::from_redis_value::<i64>((*v).clone()).ok()).unwrap_or_default();
            let host = Some(text("ip")).filter(|h| !h.is_empty()).unwrap_or_else(|| text("endpoint"));
            out.push(ClusterNode {
                id: text("id"),
                host,
                port: number("port") as u16,
                primary: text("role") == "master",
                healthy: text("health") == "online",
                replication_offset: number("replication-offset"),
                slots: slots.clone(),
            });
        }
    }
    Ok(out)
}

fn pairs(v: &Value) -> Option<std::collections::HashMap<String, &Value>> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .map(|kv| match kv {
                [k, v] => redis::from_redis_value::<String>(k.clone()).ok().map(|k| (k, v)),
                _ => None,
            })
            .collect(),
        Value::Map(items) => items.iter().map(|(k, v)| redis::from_redis_value::<String>(k.clone()).ok().map(|k| (k, v))).collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_server_or_a_cluster() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379", false),
            RedisTarget { nodes: vec!["redis://127.0.0.1:6379".into()], cluster: false }
        );
        assert!(RedisTarget::parse("redis://127.0.0.1:7000", true).cluster);
        assert_eq!(
            RedisTarget::parse("redis+cluster://a:7000,b:7001", false),
            RedisTarget { nodes: vec!["redis://a:7000".into(), "redis://b:7001".into()], cluster: true }
        );
        assert_eq!(
            RedisTarget::parse("rediss+cluster://:pw@a:7000", false),
            RedisTarget { nodes: vec!["rediss://:pw@a:7000".into()], cluster: true }
        );
        assert_eq!(
            RedisTarget::parse("redis://a:7000, redis://b:7001", false),
            RedisTarget { nodes: vec!["redis://a:7000".into(), "redis://b:7001".into()], cluster: true }
        );
    }
}

/// Reads from replicas with every read of one hash slot sent to the same replica (the replica
/// whose address hashes highest with the slot: rendezvous hashing, so the choice does not depend
/// on the order a topology lists replicas in, and only the slots of a replica that comes or goes
/// move). An org lives in one slot: the change token, the index's load position and the cards of
/// one answer all come from one node, of one moment, and its next answer from that node again
/// (never from a replica further behind than the last one). Orgs spread over the replicas.
#[derive(Debug, Default)]
pub struct SlotPinnedReplica;

impl redis::cluster_read_routing::ReadRoutingStrategy for SlotPinnedReplica {
    fn route_read<'a>(&self, candidates: &redis::cluster_read_routing::ReadCandidates<'a>) -> &'a redis::cluster::NodeAddress {
        use redis::cluster_read_routing::ReadCandidates;
        let replicas = match candidates {
            ReadCandidates::AnyNode(c) => c.replicas(),
            ReadCandidates::ReplicasOnly(c) => c.replicas(),
        };
        let slot = candidates.slot();
        replicas.iter().max_by_key(|r| pin_weight(slot, r.host(), r.port())).unwrap_or_else(|| replicas.first())
    }
}

/// The weight of a replica for a slot: the same in every process (SipHash with fixed keys).
fn pin_weight(slot: u16, host: &str, port: u16) -> u64 {
    use std::hash::{Hash, Hasher};
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    (slot, host, port).hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod slot_pinning_tests {
    use super::pin_weight;

    /// The replica a slot's reads go to: the highest weight.
    fn pick(slot: u16, replicas: &[(&str, u16)]) -> (String, u16) {
        let (h, p) = replicas.iter().max_by_key(|(h, p)| pin_weight(slot, h, *p)).unwrap();
        (h.to_string(), *p)
    }

    #[test]
    fn a_slot_always_reads_from_the_same_replica_and_slots_spread() {
        let replicas = [("10.0.0.1", 6379), ("10.0.0.2", 6379), ("10.0.0.3", 6379)];
        let reversed: Vec<_> = replicas.iter().rev().cloned().collect();
        let mut counts = std::collections::BTreeMap::new();
        for slot in 0..16384u16 {
            let chosen = pick(slot, &replicas);
            assert_eq!(chosen, pick(slot, &reversed), "the order of the topology does not matter");
            *counts.entry(chosen).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|n| *n > 4000), "slots spread over the replicas: {counts:?}");
        // A replica that goes away moves only its own slots.
        let two = &replicas[..2];
        for slot in 0..16384u16 {
            let before = pick(slot, &replicas);
            if before.0 != "10.0.0.3" {
                assert_eq!(pick(slot, two), before);
            }
        }
    }
}
