//! The chaos run (issue 17): while a producer changes contacts (renames, stage moves, owner
//! changes, deletes, new messages) in MongoDB and as events, and clients poll boards with ETags,
//! faults are injected at random: SIGKILL of a projector or the API, a broker stopped and
//! started, FLUSHALL, a Redis restarted without its data, a reload of an older RDB, a `rebuild`
//! started and SIGKILLed, a second projector joining or leaving. After each fault the producer
//! stops and the run awaits a whole, caught-up, ready projection; then every client's last board
//! (after a poll made once healed, with its ETag) must equal MongoDB's answer and `verify` must
//! be clean. It prints a table: fault, count, time to heal (p50/max), wrong answers while healthy.
//!
//! `CHAOS_MINUTES` (default 2: the CI variant) sets its length; `deploy/chaos.sh [minutes]` runs
//! it alone (default 10); `CHAOS_REDIS=cluster` (`deploy/chaos.sh [minutes] cluster`) runs it on a
//! Redis Cluster of 3 primaries + 3 replicas, each Redis fault hitting one shard's primary.
//! Own Kafka node and own Redis: the faults touch no other test.
use crate::common::{mongodb_answer, small_seed, JWT_SECRET};
use crate::common::{OwnKafka, OwnRedis, TempDir, TestEnv};
use board_model::model::CardDoc;
use mongodb::bson::{doc, Document};
use nix::sys::signal::Signal;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillProjector,
    KillApi,
    BrokerStopStart,
    Flushall,
    RedisRestartEmpty,
    OlderRdbReloaded,
    RebuildKilled,
    Rebalance,
}

const FAULTS: [Fault; 8] = [
    Fault::KillProjector,
    Fault::KillApi,
    Fault::BrokerStopStart,
    Fault::Flushall,
    Fault::RedisRestartEmpty,
    Fault::OlderRdbReloaded,
    Fault::RebuildKilled,
    Fault::Rebalance,
];

/// Boards the clients poll: every stage's first page, "my" cards, a search.
const BOARDS: &[&str] = &[r#"{"size": 10}"#, r#"{"size": 5, "ownerFilter": "my"}"#, r#"{"size": 10, "search": "a"}"#];

/// What one polling client saw.
#[derive(Default)]
struct ClientView {
    polls: u64,
    last_etag: Option<String>,
    last_body: Option<Value>,
    ok: u64,
    not_modified: u64,
    /// 503 with a documented code (the projection not whole and MongoDB slow, a dependency down).
    documented_503: u64,
    /// Any other 5xx: must stay 0.
    other_5xx: Vec<String>,
    unreachable: u64,
}

struct Client {
    org: String,
    user: String,
    body: &'static str,
    view: Mutex<ClientView>,
}

async fn poll_forever(client: Arc<Client>, url: String, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let token = crate::common::token(&client.org, &client.user);
    while !stop.load(Ordering::Relaxed) {
        let etag = client.view.lock().unwrap().last_etag.clone();
        let mut req =
            http.post(format!("{url}/api/contacts")).bearer_auth(&token).header("content-type", "application/json").body(client.body);
        if let Some(e) = etag {
            req = req.header("if-none-match", e);
        }
        // The answer is read whole before the view is locked: no lock across an await.
        let answer = match req.send().await {
            Err(_) => None,
            Ok(r) => {
                let status = r.status().as_u16();
                let etag = r.headers().get("etag").and_then(|e| e.to_str().ok()).map(str::to_string);
                let body: Option<Value> = if status == 304 { None } else { r.json().await.ok() };
                Some((status, etag, body))
            }
        };
        {
            let mut v = client.view.lock().unwrap();
            match answer {
                None => v.unreachable += 1,
                Some((200, etag, body)) => {
                    v.ok += 1;
                    v.last_etag = etag;
                    v.last_body = body;
                }
                Some((304, _, _)) => v.not_modified += 1,
                Some((503, _, Some(body)))
                    if ["timeout", "mongodb_unavailable", "unavailable", "dependency_unavailable"]
                        .contains(&body["error"]["code"].as_str().unwrap_or("")) =>
                {
                    v.documented_503 += 1
                }
                Some((s, _, body)) => v.other_5xx.push(format!("{s} {}", body.unwrap_or_default())),
            }
            v.polls += 1;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Changes contacts the way a CRM does, in MongoDB (the source of truth) and as events.
struct Producer {
    db: mongodb::Database,
    brokers: String,
    kafka: FutureProducer,
    topics: projector::config::Topics,
    /// Per org: its users and its contacts' ids (deleted ones removed).
    orgs: Vec<(String, Vec<String>, Vec<String>)>,
    stages: BTreeMap<String, Vec<(String, String, String)>>,
    rng: rand::rngs::StdRng,
    produced: u64,
}

fn chaos_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", brokers).set("message.timeout.ms", "10000").create().expect("producer")
}

fn object_id(rng: &mut impl Rng) -> String {
    format!("{:024x}", rng.random::<u128>() >> 32)
}

impl Producer {
    async fn send(&mut self, topic: &str, key: &str, value: Value) {
        let payload = serde_json::to_vec(&value).unwrap();
        // Delivered before the next change: a broker that is down is waited for, so MongoDB never
        // runs ahead of the topics for long. A librdkafka producer can keep a message queued until
        // its timeout after its broker restarted (confluentinc/librdkafka#1432, #3009; once the CI
        // waited 120 s for one): the timeout is short, and a failed send retries on a new producer.
        loop {
            match self.kafka.send(FutureRecord::to(topic).key(key).payload(&payload), Duration::from_secs(10)).await {
                Ok(_) => break,
                Err((e, _)) => {
                    eprintln!("chaos producer: {e}; retrying on a new producer");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    self.kafka = chaos_producer(&self.brokers);
                }
            }
        }
        self.produced += 1;
    }

    fn envelope(&mut self, kind: &str, org: &str) -> Value {
        json!({"type": kind, "eventId": format!("chaos-{}", object_id(&mut self.rng)), "orgId": org,
            "occurredAt": board_model::time::format_millis(chrono::Utc::now().timestamp_millis())})
    }

    async fn one_change(&mut self) {
        let o = self.rng.random_range(0..self.orgs.len());
        let (org, users, contacts) = self.orgs[o].clone();
        let Some(id) = contacts.choose(&mut self.rng).cloned() else { return };
        let coll = self.db.collection::<Document>("contacts");
        let Some(d) = coll.find_one(doc! {"_id": &id}).await.unwrap() else { return };
        let mut card: CardDoc = board_mongo::card_from_bson(&d);
        let version = card.version.unwrap_or(1) + 1;
        let now = chrono::Utc::now().timestamp_millis();
        let what = self.rng.random_range(0..100);
        if what < 5 && contacts.len() > 10 {
            coll.delete_one(doc! {"_id": &id}).await.unwrap();
            self.orgs[o].2.retain(|c| *c != id);
            let mut env = self.envelope("contact.deleted", &org);
            env["contactId"] = json!(id);
            env["version"] = json!(version);
            self.send(&self.topics.topic_contacts.clone(), &id, env).await;
            return;
        }
        if what < 25 {
            // A new inbound message on one of the contact's conversations.
            let conv = self.db.collection::<Document>("conversations").find_one(doc! {"contactId": &id}).await.unwrap();
            if let Some(conv) = conv {
                let conv_id = conv.get_str("_id").unwrap_or_default().to_string();
                let m = board_model::model::Message {
                    id: object_id(&mut self.rng),
                    org_id: org.clone(),
                    contact_id: Some(id.clone()),
                    conversation_id: Some(conv_id),
                    direction: Some(if self.rng.random_bool(0.5) { "inbound" } else { "outbound" }.to_string()),
                    created_at: Some(now),
                };
                self.db.collection::<Document>("messages").insert_one(board_mongo::message_to_bson(&m)).await.unwrap();
                let mut env = self.envelope("message.created", &org);
                env["message"] = serde_json::to_value(&m).unwrap();
                self.send(&self.topics.topic_messages.clone(), &id, env).await;
                return;
            }
        }
        match what % 3 {
            0 => card.first_name = Some(format!("Renamed{}", self.rng.random_range(0..1000))),
            1 => {
                let stages = &self.stages[&org];
                let (pipeline, stage, name) = stages.choose(&mut self.rng).unwrap().clone();
                card.pipeline_id = Some(pipeline);
                card.pipeline_stage = Some(stage);
                card.status = Some(name);
            }
            _ => card.owner = if self.rng.random_bool(0.8) { users.choose(&mut self.rng).cloned() } else { None },
        }
        card.full_name = Some(format!("{} {}", card.first_name.clone().unwrap_or_default(), card.last_name.clone().unwrap_or_default()));
        card.version = Some(version);
        card.updated_at = Some(now);
        coll.replace_one(doc! {"_id": &id}, board_mongo::card_to_bson(&card)).await.unwrap();
        let mut env = self.envelope("contact.upserted", &org);
        env["contact"] = serde_json::to_value(&card).unwrap();
        self.send(&self.topics.topic_contacts.clone(), &id, env).await;
    }
}

/// `pipeline-board serve` on a fixed port (restarted on the same one), ready to answer.
async fn start_api(env: &TestEnv, port: u16) -> std::process::Child {
    let mut cmd = env.cli(&["serve"]);
    cmd.env("LISTEN_ADDR", format!("127.0.0.1:{port}")).env("JWT_SECRET", JWT_SECRET).env("HEALTH_INTERVAL_MS", "200");
    cmd.stdout(std::process::Stdio::null());
    if std::env::var("TEST_LOG").is_err() {
        cmd.stderr(std::process::Stdio::null());
    }
    let child = cmd.spawn().expect("start serve");
    crate::common::eventually(Duration::from_secs(30), "the API listens", || async move {
        reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await.is_ok()
    })
    .await;
    child
}

/// SIGKILLs every process it was given when dropped: a failing run leaves nothing writing.
#[derive(Default)]
struct Reaper(Mutex<Vec<u32>>);
impl Reaper {
    fn watch(&self, child: std::process::Child) -> std::process::Child {
        self.0.lock().unwrap().push(child.id());
        child
    }
}
impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
}

fn kill(child: &mut std::process::Child) {
    crate::common::signal(child, Signal::SIGKILL);
    let _ = child.wait();
}

/// Whole, caught up, attended and ready: what "healed" means. `Err` says what is still missing,
/// for the failure message of a run that does not heal.
async fn healed(env: &TestEnv, url: &str) -> Result<(), String> {
    let (ready, readyz) = match reqwest::get(format!("{url}/readyz")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => return Err(format!("readyz unreachable: {e}")),
    };
    let mut conn = board_redis::config::redis_connection(&env.redis_url).await.map_err(|e| format!("redis: {e}"))?;
    let status = board_redis::projection::status(&mut conn, &env.keys).await.map_err(|e| format!("state: {e}"))?;
    let lag =
        env.watermarks().lag(&env.topics.inputs(), &mut conn, &env.keys.progress(&env.group)).await.map_err(|e| format!("lag: {e}"))?;
    if ready == 200 && status == board_redis::projection::Status::Whole && lag.total() == 0 {
        return Ok(());
    }
    let behind: Vec<String> =
        lag.partitions.iter().filter(|(_, (applied, high))| applied < high).map(|((t, p), (a, h))| format!("{t}/{p} {a}<{h}")).collect();
    Err(format!("readyz {ready} {readyz}, state {status:?}, behind {behind:?}"))
}

/// The Redis the run breaks: a server of its own, or (`CHAOS_REDIS=cluster`) a Redis Cluster of
/// 3 primaries + 3 replicas of its own, where each Redis fault hits one shard's primary (FLUSHALL:
/// every primary).
enum ChaosRedis {
    Single { port: u16, dir: TempDir, server: Option<OwnRedis> },
    Cluster(crate::common::OwnCluster),
}

impl ChaosRedis {
    async fn start() -> ChaosRedis {
        if std::env::var("CHAOS_REDIS").is_ok_and(|r| r == "cluster") {
            return ChaosRedis::Cluster(crate::common::OwnCluster::start());
        }
        let (port, dir) = (crate::common::free_port(), TempDir::new("chaos-redis"));
        let server = OwnRedis::start(port, &dir.0);
        server.wait_ready().await;
        ChaosRedis::Single { port, dir, server: Some(server) }
    }

    fn name(&self) -> &'static str {
        match self {
            ChaosRedis::Single { .. } => "single Redis",
            ChaosRedis::Cluster(_) => "Redis Cluster 3+3",
        }
    }

    fn url(&self) -> String {
        match self {
            ChaosRedis::Single { port, .. } => format!("redis://127.0.0.1:{port}"),
            ChaosRedis::Cluster(c) => c.url(),
        }
    }

    /// Plain connections to the nodes that are primaries now (one on a single server).
    fn primaries(&self) -> Vec<(u16, redis::Connection)> {
        let node = |port: u16| redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?.get_connection().ok();
        match self {
            ChaosRedis::Single { port, .. } => node(*port).map(|c| (*port, c)).into_iter().collect(),
            ChaosRedis::Cluster(c) => {
                let shards = c.ports().find_map(|p| redis::cmd("CLUSTER").arg("SHARDS").query::<redis::Value>(&mut node(p)?).ok());
                let nodes = shards.and_then(|s| board_redis::redis_conn::cluster_nodes(&s).ok()).unwrap_or_default();
                nodes
                    .iter()
                    .filter(|n| n.primary && n.healthy && !n.slots.is_empty())
                    .filter_map(|n| Some((n.port, node(n.port)?)))
                    .collect()
            }
        }
    }

    /// One primary, at random.
    fn one_primary(&self, rng: &mut impl Rng) -> (u16, redis::Connection) {
        let mut all = self.primaries();
        assert!(!all.is_empty(), "a primary answers");
        all.swap_remove(rng.random_range(0..all.len()))
    }

    fn save(&self) {
        for (_, mut c) in self.primaries() {
            let _: () = redis::cmd("SAVE").query(&mut c).unwrap();
        }
    }

    fn flushall(&self) {
        for (_, mut c) in self.primaries() {
            let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
        }
    }

    /// A server (a shard's primary) restarted without its data, at once.
    async fn restart_empty(&mut self, rng: &mut impl Rng) {
        match self {
            ChaosRedis::Single { port, dir, server } => {
                if let Some(old) = server.take() {
                    old.stop();
                }
                *dir = TempDir::new("chaos-redis");
                let fresh = OwnRedis::start(*port, &dir.0);
                fresh.wait_ready().await;
                *server = Some(fresh);
            }
            ChaosRedis::Cluster(_) => {
                let (port, _) = self.one_primary(rng);
                let ChaosRedis::Cluster(c) = self else { unreachable!() };
                c.kill(port);
                c.restart(port);
            }
        }
    }

    /// A primary loads the file saved before (`DEBUG RELOAD NOSAVE`): it goes back in time.
    fn reload_older(&self, rng: &mut impl Rng) {
        let (_, mut c) = self.one_primary(rng);
        let _: () = redis::cmd("DEBUG").arg("RELOAD").arg("NOSAVE").query(&mut c).unwrap();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank, lower: the p50 of two values is the first.
    sorted[((sorted.len() - 1) as f64 * p).floor() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_run() {
    let minutes: f64 = std::env::var("CHAOS_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(2.0);
    let kafka = OwnKafka::start().await;
    let mut env = TestEnv::on_brokers("chaos", &kafka.brokers()).await;
    let mut redis = ChaosRedis::start().await;
    env.redis_url = redis.url();
    let seeded = env.seed(small_seed(2, 80, 1717)).await;
    let db = env.mongo().await;

    let reaper = Reaper::default();
    let mut projector = reaper.watch(env.projector_process(&[], &[]));
    let mut second: Option<std::process::Child> = None;
    let api_port = crate::common::free_port();
    let url = format!("http://127.0.0.1:{api_port}");
    let mut api = reaper.watch(start_api(&env, api_port).await);
    env.wait_caught_up(Duration::from_secs(120)).await;

    // Clients: each org's first users, every board.
    let mut clients = Vec::new();
    let mut producer_orgs = Vec::new();
    let mut stages = BTreeMap::new();
    for org in &seeded.org_ids {
        let snap = board_mongo::load_org(&db, org).await.unwrap();
        for (i, body) in BOARDS.iter().enumerate() {
            let user = snap.users[i % snap.users.len()].id.clone();
            clients.push(Arc::new(Client { org: org.clone(), user, body, view: Mutex::new(ClientView::default()) }));
        }
        let ids: Vec<String> = db
            .collection::<Document>("contacts")
            .distinct("_id", doc! {"orgId": org})
            .await
            .unwrap()
            .into_iter()
            .filter_map(|b| b.as_str().map(str::to_string))
            .collect();
        let users = snap.users.iter().map(|u| u.id.clone()).collect();
        producer_orgs.push((org.clone(), users, ids));
        let contact_stages = snap
            .pipelines
            .iter()
            .filter(|p| p.kind.as_deref() == Some("Contact") && p.is_active == Some(true))
            .flat_map(|p| {
                p.stages.clone().unwrap_or_default().into_iter().map(|s| (p.id.clone(), s.id.clone(), s.name.clone().unwrap_or_default()))
            })
            .collect::<Vec<_>>();
        stages.insert(org.clone(), contact_stages);
    }
    let stop_clients = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = clients.iter().map(|c| tokio::spawn(poll_forever(c.clone(), url.clone(), stop_clients.clone()))).collect();

    // The producer runs while `producing` is set and says when it is idle.
    let producing = Arc::new(AtomicBool::new(false));
    let idle = Arc::new(AtomicBool::new(true));
    let stop_producer = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let producer_task = {
        let mut p = Producer {
            db: db.clone(),
            kafka: chaos_producer(&env.brokers),
            brokers: env.brokers.clone(),
            topics: env.topics.clone(),
            orgs: producer_orgs,
            stages,
            rng: rand::rngs::StdRng::seed_from_u64(17),
            produced: 0,
        };
        let (producing, idle, stop, produced) = (producing.clone(), idle.clone(), stop_producer.clone(), produced.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if producing.load(Ordering::Relaxed) {
                    idle.store(false, Ordering::Relaxed);
                    p.one_change().await;
                    produced.store(p.produced, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                } else {
                    idle.store(true, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(2026));
    // CHAOS_FAULTS=KillApi,Flushall: only those (names as in the table).
    let only = std::env::var("CHAOS_FAULTS").unwrap_or_default();
    let mut order: Vec<Fault> = FAULTS.into_iter().filter(|f| only.is_empty() || only.split(',').any(|o| o == format!("{f:?}"))).collect();
    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut heal_times: BTreeMap<Fault, Vec<f64>> = BTreeMap::new();
    let mut wrong: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut not_healed: Vec<String> = Vec::new();
    let mut round = 0usize;
    while Instant::now() < deadline {
        if round.is_multiple_of(order.len()) {
            use rand::seq::SliceRandom;
            order.shuffle(&mut rng);
        }
        let fault = order[round % order.len()];
        round += 1;
        eprintln!("chaos round {round}: {fault:?}");
        if fault == Fault::OlderRdbReloaded {
            redis.save();
        }
        producing.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
        let injected = Instant::now();
        match fault {
            Fault::KillProjector => {
                kill(&mut projector);
                projector = reaper.watch(env.projector_process(&[], &[]));
            }
            Fault::KillApi => {
                kill(&mut api);
                api = reaper.watch(start_api(&env, api_port).await);
            }
            Fault::BrokerStopStart => {
                kafka.stop().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                kafka.restart().await;
            }
            Fault::Flushall => redis.flushall(),
            Fault::RedisRestartEmpty => redis.restart_empty(&mut rng).await,
            Fault::OlderRdbReloaded => redis.reload_older(&mut rng),
            Fault::RebuildKilled => {
                let mut rebuild = env.cli(&["rebuild", "--grace-ms", "0", "--metrics-addr", ""]);
                rebuild.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
                let mut child = reaper.watch(rebuild.spawn().unwrap());
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
                kill(&mut child);
            }
            Fault::Rebalance => match second.take() {
                Some(mut p) => {
                    crate::common::signal(&p, Signal::SIGTERM);
                    let _ = p.wait();
                }
                None => second = Some(reaper.watch(env.projector_process(&[], &[]))),
            },
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        producing.store(false, Ordering::Relaxed);
        crate::common::eventually(Duration::from_secs(120), "the producer is idle", || {
            let idle = idle.clone();
            async move { idle.load(Ordering::Relaxed) }
        })
        .await;
        // Healed: whole, caught up, ready.
        let heal_deadline = Instant::now() + Duration::from_secs(180);
        let mut missing = healed(&env, &url).await;
        while missing.is_err() && Instant::now() < heal_deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            missing = healed(&env, &url).await;
        }
        if let Err(missing) = missing {
            not_healed.push(format!("round {round}: {fault:?} ({missing})"));
            break;
        }
        heal_times.entry(fault).or_default().push(injected.elapsed().as_secs_f64());
        // Every client polls twice more once healed; its last board must be MongoDB's answer.
        let marks: Vec<u64> = clients.iter().map(|c| c.view.lock().unwrap().polls).collect();
        crate::common::eventually(Duration::from_secs(120), "every client polled again", || {
            let done = clients.iter().zip(&marks).all(|(c, m)| c.view.lock().unwrap().polls >= m + 2);
            async move { done }
        })
        .await;
        for c in &clients {
            let want = mongodb_answer(&db, &c.org, &c.user, c.body).await;
            let got = c.view.lock().unwrap().last_body.clone().map(|mut v| {
                v.as_object_mut().map(|o| o.remove("meta"));
                v
            });
            if got.as_ref() != Some(&want) {
                *wrong.entry(fault).or_default() += 1;
                eprintln!("round {round} after {fault:?}: {} {} differs from MongoDB", c.org, c.body);
            }
        }
        let report = env.verify(&seeded.org_ids).await;
        assert!(
            report.is_clean(),
            "round {round} after {fault:?}: {} {:#?}",
            report.summary(),
            &report.samples[..report.samples.len().min(5)]
        );
    }

    stop_clients.store(true, Ordering::Relaxed);
    stop_producer.store(true, Ordering::Relaxed);
    for p in pollers {
        let _ = p.await;
    }
    let _ = producer_task.await;
    let views: Vec<_> = clients.iter().map(|c| c.view.lock().unwrap()).collect();
    let (polls, ok200, not_modified, documented, unreachable): (u64, u64, u64, u64, u64) = views
        .iter()
        .fold((0, 0, 0, 0, 0), |a, v| (a.0 + v.polls, a.1 + v.ok, a.2 + v.not_modified, a.3 + v.documented_503, a.4 + v.unreachable));
    let other: Vec<String> = views.iter().flat_map(|v| v.other_5xx.iter().cloned()).collect();
    eprintln!("\nchaos run on {}: {minutes} min, {round} faults, {} changes produced", redis.name(), produced.load(Ordering::Relaxed));
    eprintln!("{:<20} {:>5} {:>14} {:>14} {:>22}", "fault", "count", "heal p50 (s)", "heal max (s)", "wrong while healthy");
    for f in FAULTS {
        let mut t = heal_times.get(&f).cloned().unwrap_or_default();
        t.sort_by(|a, b| a.total_cmp(b));
        eprintln!(
            "{:<20} {:>5} {:>14.2} {:>14.2} {:>22}",
            format!("{f:?}"),
            t.len(),
            percentile(&t, 0.5),
            t.last().copied().unwrap_or(f64::NAN),
            wrong.get(&f).copied().unwrap_or(0)
        );
    }
    eprintln!(
        "client polls {polls}: 200 {ok200}, 304 {not_modified}, documented 503 {documented}, unreachable (API killed) {unreachable}, other 5xx {}",
        other.len()
    );
    drop(views);
    assert!(not_healed.is_empty(), "not healed within 180 s: {not_healed:?}");
    assert_eq!(wrong.values().sum::<u64>(), 0, "wrong answers once healthy: {wrong:?}");
    assert!(other.is_empty(), "undocumented 5xx: {:?}", &other[..other.len().min(5)]);
    assert!(round >= order.len().min(4), "at least a few faults were injected ({round})");

    for mut p in [Some(projector), second].into_iter().flatten() {
        kill(&mut p);
    }
    kill(&mut api);
    if let ChaosRedis::Single { server: Some(server), .. } = redis {
        server.stop();
    }
}
