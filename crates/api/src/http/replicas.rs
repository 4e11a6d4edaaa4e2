//! How stale reads from Redis Cluster replicas are (`REDIS_READ_FROM=replica`).
//!
//! Replication is asynchronous: a replica answers with the data its primary had some time ago.
//! Every `interval` the probe writes the time into a key of each shard (a key whose slot the
//! shard serves) on its own connection and asks the shard's primary to `WAIT` for all of its
//! replicas: the time the acknowledgement takes is how far behind the replicas are. A replica
//! that does not acknowledge within the timeout is measured by reading the time it holds
//! (`now - value`). The largest value over the shards is what `meta.replicaStalenessMs` says;
//! `pb_replica_staleness_seconds{shard}` has each.
use board_model::keys::KeySpace;
use board_redis::redis_conn::{ClusterNode, RedisConn};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest acknowledgement wait per probe.
const WAIT_TIMEOUT: Duration = Duration::from_millis(1_000);

/// The last measured staleness in milliseconds (-1: not measured yet).
#[derive(Clone)]
pub struct ReplicaStaleness(Arc<AtomicI64>);

impl Default for ReplicaStaleness {
    /// Not measured yet.
    fn default() -> Self {
        ReplicaStaleness(Arc::new(AtomicI64::new(-1)))
    }
}

impl ReplicaStaleness {
    pub fn millis(&self) -> Option<i64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|v| *v >= 0)
    }

    /// Measures every `interval` on `conn` (a connection of the probe's own: `WAIT` blocks it).
    pub fn spawn_probe(&self, mut conn: RedisConn, keys: KeySpace, interval: Duration) {
        let out = self.0.clone();
        tokio::spawn(async move {
            let mut tags: BTreeMap<String, String> = BTreeMap::new();
            loop {
                match measure(&mut conn, &keys, &mut tags).await {
                    Ok(Some(ms)) => out.store(ms, Ordering::Relaxed),
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, "replica staleness not measured"),
                }
                tokio::time::sleep(interval).await;
            }
        });
    }
}

/// One measurement over every shard; None when the deployment has no replicas.
async fn measure(conn: &mut RedisConn, keys: &KeySpace, tags: &mut BTreeMap<String, String>) -> redis::RedisResult<Option<i64>> {
    let nodes = conn.cluster_nodes().await?;
    let mut worst: Option<i64> = None;
    for primary in nodes.iter().filter(|n| n.primary && n.healthy) {
        let replicas: Vec<&ClusterNode> = nodes.iter().filter(|n| !n.primary && n.slots == primary.slots).collect();
        if replicas.is_empty() {
            continue;
        }
        let Some(key) = clock_key(conn, keys, primary, tags).await? else { continue };
        let sent = now_ms();
        let started = Instant::now();
        let _: () = redis::cmd("SET").arg(&key).arg(sent).arg("PX").arg(60_000).query_async(conn).await?;
        let acked = conn.wait_on(RedisConn::route_of(&key), replicas.len() as u32, WAIT_TIMEOUT).await?;
        let mut stale = started.elapsed().as_millis() as i64;
        if acked < replicas.len() as i64 {
            // Someone is further behind than the wait: read what each replica holds.
            for r in &replicas {
                let held = conn.on_node(redis::cmd("GET").arg(&key), &Some((r.host.clone(), r.port))).await;
                let held: Option<i64> = held.ok().and_then(|v| redis::from_redis_value(v).ok());
                stale = stale.max(held.map(|h| now_ms() - h).unwrap_or(i64::MAX / 2));
            }
        }
        crate::events::ReplicaStaleness { shard: &format!("{}:{}", primary.host, primary.port), ms: stale }.emit();
        worst = Some(worst.map_or(stale, |w| w.max(stale)));
    }
    Ok(worst)
}

/// A key whose slot the primary's shard serves: `<prefix>:replica-clock:{<tag>}`, the tag found
/// once per shard (by asking the cluster for tags' slots) and kept while the shard keeps it.
async fn clock_key(
    conn: &mut RedisConn,
    keys: &KeySpace,
    primary: &ClusterNode,
    tags: &mut BTreeMap<String, String>,
) -> redis::RedisResult<Option<String>> {
    let shard = format!("{:?}", primary.slots);
    if let Some(tag) = tags.get(&shard) {
        return Ok(Some(format!("{}:replica-clock:{{{tag}}}", keys.prefix())));
    }
    for i in 0..2_000u32 {
        let tag = format!("clock{i}");
        let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(&tag).query_async(conn).await?;
        if primary.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)) {
            tags.insert(shard, tag.clone());
            return Ok(Some(format!("{}:replica-clock:{{{tag}}}", keys.prefix())));
        }
    }
    Ok(None)
}

fn now_ms() -> i64 {
    board_model::time::now_millis()
}
