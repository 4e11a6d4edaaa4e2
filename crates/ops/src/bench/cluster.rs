//! `bench run cluster` (deploy/cluster-bench.sh): one Redis against the stack's Redis Cluster
//! (3 primaries + 3 replicas). Ingest of the same events into the single Redis with 1
//! projector, into the cluster with 1 and with 2 projectors (one consumer group, 4 partitions);
//! then the same boards with wrk (32 connections, requests spread over the orgs) from an API on
//! the single Redis, on the cluster's primaries and on its replicas (`REDIS_READ_FROM=replica`),
//! with the Redis and API CPU per board. On 2 cores every Redis process, the API and wrk share
//! the machine: read the ratios.
use super::harness::{process_cpu, redis_cpu_of, BenchRun};
use super::wrk::{ms, Script, Wrk};
use crate::seed::SeedArgs;
use board_model::keys::KeySpace;
use board_redis::redis_conn::ClusterNode;
use std::time::{Duration, Instant};

const ORGS: usize = 6;

/// The primary serving `slot` (`RedisConn::cluster_nodes`: CLUSTER SHARDS).
pub fn primary_of(nodes: &[ClusterNode], slot: u16) -> Option<String> {
    nodes.iter().find(|n| n.primary && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))).map(|n| format!("{}:{}", n.host, n.port))
}

struct Deployment<'a> {
    label: &'a str,
    url: &'a str,
    /// Every Redis server it runs on (for their CPU).
    servers: &'a [String],
    keys: &'a KeySpace,
}

pub async fn run(r: &mut BenchRun, contacts: usize, seconds: u64, cluster_url: &str) -> anyhow::Result<()> {
    let single_url = r.sandbox.redis_url.clone();
    let mut cluster = board_redis::config::redis_connection(cluster_url).await?;
    let nodes = cluster.cluster_nodes().await?;
    let cluster_servers: Vec<String> = nodes.iter().map(|n| format!("redis://{}:{}", n.host, n.port)).collect();
    let single_servers = vec![single_url.clone()];
    let seeded = r.seed(SeedArgs { orgs: ORGS, contacts, messages: 3.0, no_mongo: true, quiet: true, ..SeedArgs::default() }).await?;
    let mut per_shard: std::collections::BTreeMap<String, usize> = Default::default();
    for org in &seeded.org_ids {
        let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(format!("{{{org}}}")).query_async(&mut cluster).await?;
        *per_shard.entry(primary_of(&nodes, slot).unwrap_or_else(|| "?".into())).or_default() += 1;
    }
    r.report.line(format!("orgs per shard (primary: orgs): {per_shard:?}"));

    let prefix = r.sandbox.keys.prefix().to_string();
    let (single_keys, cluster_keys, cluster2_keys) =
        (KeySpace::new(format!("{prefix}-s")), KeySpace::new(format!("{prefix}-c")), KeySpace::new(format!("{prefix}-c2")));
    r.extra_keys.push((single_url.clone(), single_keys.pattern()));
    r.extra_keys.push((cluster_url.to_string(), cluster_keys.pattern()));
    r.extra_keys.push((cluster_url.to_string(), cluster2_keys.pattern()));
    r.extra_groups.extend([&single_keys, &cluster_keys, &cluster2_keys].map(|k| k.prefix().to_string()));
    r.report.line(format!("== ingest of {} events (pipeline-board project --exit-when-caught-up, 4 partitions per topic)", seeded.events));
    let ingests = [
        (Deployment { label: "single redis, 1 projector", url: &single_url, servers: &single_servers, keys: &single_keys }, 1),
        (Deployment { label: "cluster 3+3, 1 projector", url: cluster_url, servers: &cluster_servers, keys: &cluster_keys }, 1),
        (Deployment { label: "cluster 3+3, 2 projectors", url: cluster_url, servers: &cluster_servers, keys: &cluster2_keys }, 2),
    ];
    for (d, projectors) in &ingests {
        let cpu0 = redis_cpu_of(d.servers).await?;
        let started = Instant::now();
        // All at once, each waited for on a thread of its own (a failed one is reported after
        // the others end; a killed run stops them all: `stopped_with_parent`).
        let group = d.keys.prefix().to_string();
        let waits: Vec<_> = (0..*projectors)
            .map(|_| {
                let mut cmd = r.command(&["project", "--exit-when-caught-up", "--metrics-addr", ""]);
                cmd.env("REDIS_URL", d.url).env("REDIS_PREFIX", &group).env("KAFKA_GROUP_ID", &group);
                tokio::task::spawn_blocking(move || super::harness::run_measured(cmd))
            })
            .collect();
        for w in waits {
            w.await?.map_err(|e| anyhow::anyhow!("a projector of {} failed: {e}", d.label))?;
        }
        let secs = started.elapsed().as_secs_f64();
        let redis_s = redis_cpu_of(d.servers).await? - cpu0;
        r.report.line(format!(
            "{:<34} {secs:8.2} s  {:9.0} events/s  redis CPU {redis_s:6.1} s ({:4.1} us/event)",
            d.label,
            seeded.events as f64 / secs,
            redis_s * 1e6 / seeded.events.max(1) as f64
        ));
    }

    // Boards: every request goes to the next org (each with a token of one of its users).
    let mut tokens = Vec::new();
    let mut single = board_redis::config::redis_connection(&single_url).await?;
    for org in &seeded.org_ids {
        let users: Vec<String> = redis::AsyncCommands::hkeys(&mut single, single_keys.org(org).users()).await?;
        tokens.push(r.token(org, users.first().ok_or_else(|| anyhow::anyhow!("org {org} has no users"))?));
    }
    let tokens = tokens.join(" ");
    let boards =
        [("a-none", r#"{"size":25}"#), ("b-my", r#"{"size":25,"ownerFilter":"my"}"#), ("f-search", r#"{"size":25,"search":"jane"}"#)];
    r.report.line(format!("== boards, wrk -c 32 for {seconds} s each, requests spread over the {ORGS} orgs"));
    r.report.line(format!(
        "{:<28} {:<9} | {:>9} {:>9} {:>9} | {:>12} {:>12}",
        "deployment", "board", "rps", "p50", "p99", "redis us/brd", "api us/brd"
    ));
    let modes = [
        ("single", &single_url, &single_keys, "primary", &single_servers),
        ("cluster-primary", &cluster_url.to_string(), &cluster_keys, "primary", &cluster_servers),
        ("cluster-replica", &cluster_url.to_string(), &cluster_keys, "replica", &cluster_servers),
    ];
    for (mode, url, keys, read_from, servers) in modes {
        let env = [
            ("REDIS_URL", url.clone()),
            ("REDIS_PREFIX", keys.prefix().to_string()),
            ("KAFKA_GROUP_ID", keys.prefix().to_string()),
            ("REDIS_READ_FROM", read_from.to_string()),
        ];
        let api = r.start_api(&env).await?;
        let contacts_url = api.contacts_url();
        for (name, body) in boards {
            let wrk = |conns: usize, secs: u64| Wrk {
                url: &contacts_url,
                conns,
                duration: Duration::from_secs(secs),
                script: Script::PostRoundRobin,
                env: vec![("BODY", body.to_string()), ("TOKENS", tokens.clone())],
                timeout: None,
            };
            // Warm up (the in-memory indexes of the orgs load on their first index board).
            wrk(8, 3).run()?;
            let (redis0, api0) = (redis_cpu_of(servers).await?, process_cpu(api.pid));
            let w = wrk(32, seconds).run()?;
            let (redis_s, api_s) = (redis_cpu_of(servers).await? - redis0, process_cpu(api.pid) - api0);
            let per = |s: f64| s * 1e6 / w.requests.max(1) as f64;
            r.report.line(format!(
                "{mode:<28} {name:<9} | {:>9.0} {:>9} {:>9} | {:>12.0} {:>12.0} {}",
                w.rps(),
                ms(w.p50),
                ms(w.p99),
                per(redis_s),
                per(api_s),
                w.trouble()
            ));
        }
        if mode == "cluster-replica" {
            let first = tokens.split(' ').next().unwrap_or_default();
            let v = api.board_json(first, r#"{"size":1}"#).await?;
            r.report.line(format!("   (replica staleness in meta: {} ms)", v["meta"]["replicaStalenessMs"]));
        }
        r.stop(api.pid).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16, primary: bool, slots: &[(u16, u16)]) -> ClusterNode {
        ClusterNode {
            id: port.to_string(),
            host: "127.0.0.1".into(),
            port,
            primary,
            healthy: true,
            replication_offset: 0,
            slots: slots.to_vec(),
        }
    }

    #[test]
    fn the_primary_of_a_slot_serves_it() {
        let nodes = [node(7003, false, &[(0, 5460)]), node(7000, true, &[(0, 5460)]), node(7001, true, &[(5461, 16383)])];
        assert_eq!(primary_of(&nodes, 0).as_deref(), Some("127.0.0.1:7000"), "not its replica");
        assert_eq!(primary_of(&nodes, 5461).as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(primary_of(&nodes, 16383).as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(primary_of(&nodes[..2], 9000), None);
    }
}
