//! Test harness: every test gets its own topics, consumer group, Redis key prefix and MongoDB
//! database on the real services that `deploy/stack.sh up` starts, so tests run in parallel
//! without seeing each other.
#![allow(dead_code)]
pub mod events;
pub mod oracle;
use board_model::offsets::Lag;
use board_ops::sandbox::{Sandbox, Stack};
use board_ops::seed::{SeedArgs, SeedReport};
use board_ops::verify::DriftReport;
use projector::progress;
use projector::{KafkaConnection, ProjectorSettings, RunCounters};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

pub fn init_logs() {
    if std::env::var("TEST_LOG").is_ok() {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,rdkafka=warn".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
}

/// A test's sandbox (`board_ops::sandbox`: its own topics, keys, group and database, all read
/// through `Deref`) and the helpers tests share.
pub struct TestEnv {
    sandbox: Sandbox,
    /// One watermarks client for every catch-up wait of this env (made on first use).
    watermarks: std::sync::OnceLock<progress::Watermarks>,
}

pub struct RunningProjector {
    pub counters: Arc<RunCounters>,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningProjector {
    /// The projector's task ended (it returned an error, or stopped): a wait for it can fail
    /// at once instead of at its deadline.
    pub fn ended(&self) -> bool {
        self.handle.is_finished()
    }

    /// Graceful stop: the in-flight batch finishes, offsets are committed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.handle).await.expect("projector stops within 30 s")?
    }
}

impl TestEnv {
    pub async fn new(name: &str) -> TestEnv {
        TestEnv::on_brokers(name, &env_or("KAFKA_BROKERS", "127.0.0.1:9092")).await
    }

    /// A test environment whose topics live on the given brokers (a test's own Kafka node).
    pub async fn on_brokers(name: &str, brokers: &str) -> TestEnv {
        init_logs();
        let stack = Stack { brokers: brokers.to_string(), ..Stack::from_env() };
        let env = TestEnv { sandbox: Sandbox::new(name, "t", &stack), watermarks: std::sync::OnceLock::new() };
        env.create_topics(4).await.expect("topics created");
        env
    }

    /// Deletes the records of every input partition below `to(high watermark)` (what retention
    /// or `DeleteRecords` does): the topics no longer hold their early history.
    pub async fn delete_records_below(&self, to: impl Fn(i64) -> i64) {
        let marks = self.watermarks().fetch_blocking(&self.topics.inputs()).unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for ((t, p), (_, high)) in &marks {
            if to(*high) > 0 {
                tpl.add_partition_offset(t, *p, rdkafka::Offset::Offset(to(*high))).unwrap();
            }
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", &self.brokers).create().unwrap();
        admin.delete_records(&tpl, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))).await.unwrap();
        let marks = self.watermarks().fetch_blocking(&self.topics.inputs()).unwrap();
        assert!(marks.values().any(|(low, _)| *low > 0), "early history deleted");
    }

    pub fn kafka(&self) -> KafkaConnection {
        KafkaConnection::new(&self.brokers)
    }

    pub fn settings(&self) -> ProjectorSettings {
        let mut s = ProjectorSettings::new(&self.brokers, &self.group, self.topics.clone(), &self.redis_url, self.keys.clone());
        s.session_timeout = Duration::from_secs(6);
        s
    }

    pub fn spawn_projector(&self) -> RunningProjector {
        self.spawn_projector_with(self.settings())
    }

    pub fn spawn_projector_with(&self, settings: ProjectorSettings) -> RunningProjector {
        let counters = Arc::new(RunCounters::default());
        let (tx, rx) = oneshot::channel::<()>();
        let c = counters.clone();
        let handle = tokio::spawn(async move {
            projector::run(settings, c, async move {
                let _ = rx.await;
            })
            .await
        });
        RunningProjector { counters, stop: Some(tx), handle }
    }

    pub async fn seed(&self, args: SeedArgs) -> SeedReport {
        board_ops::seed::run(&args, &self.kafka(), &self.topics, &self.mongo_uri, &self.mongo_db).await.expect("seed")
    }

    /// Seeds, projects the events with one projector until caught up, and stops it gracefully.
    pub async fn seed_and_project(&self, args: SeedArgs) -> SeedReport {
        let seeded = self.seed(args).await;
        let projector = self.spawn_projector();
        self.wait_caught_up(Duration::from_secs(120)).await;
        projector.stop().await.expect("projector ran cleanly");
        seeded
    }

    pub async fn redis(&self) -> board_redis::redis_conn::RedisConn {
        board_redis::config::redis_connection(&self.redis_url).await.expect("redis")
    }

    pub async fn mongo(&self) -> mongodb::Database {
        board_mongo::connect(&self.mongo_uri, &self.mongo_db).await.expect("mongo")
    }

    pub fn watermarks(&self) -> &progress::Watermarks {
        self.watermarks.get_or_init(|| progress::Watermarks::new(&self.kafka()))
    }

    pub async fn lag(&self) -> Lag {
        let mut conn = self.redis().await;
        self.watermarks().lag(&self.topics.inputs(), &mut conn, &self.keys.progress(&self.group)).await.expect("lag")
    }

    /// Awaits the condition "every input partition applied up to its high watermark".
    pub async fn wait_caught_up(&self, within: Duration) -> Lag {
        let deadline = Instant::now() + within;
        loop {
            let lag = self.lag().await;
            let status = board_redis::projection::status(&mut self.redis().await, &self.keys).await.expect("state");
            if lag.total() == 0 && lag.applied() > 0 && status == board_redis::projection::Status::Whole {
                return lag;
            }
            assert!(Instant::now() < deadline, "projection not caught up within {within:?}: {lag:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn verify(&self, orgs: &[String]) -> DriftReport {
        let mut conn = self.redis().await;
        let db = self.mongo().await;
        board_ops::verify::verify(&mut conn, &self.keys, &db, orgs).await.expect("verify")
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new().set("bootstrap.servers", &self.brokers).create().expect("producer")
    }

    pub async fn produce(&self, topic: &str, key: &str, payload: &[u8]) {
        let producer = self.producer();
        producer
            .send(FutureRecord::to(topic).key(key).payload(payload), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }

    /// The sum of the next offsets the projection recorded as applied, read from Redis alone
    /// (cheap enough to poll every few milliseconds, unlike `lag`, which asks the broker).
    pub async fn applied_offsets(&self) -> i64 {
        let mut conn = self.redis().await;
        let progress: std::collections::HashMap<String, i64> =
            redis::AsyncCommands::hgetall(&mut conn, self.keys.progress(&self.group)).await.expect("progress");
        progress.values().sum()
    }

    /// `pipeline-board project` as a child process of this test, configured for this env.
    pub fn projector_process(&self, extra_args: &[&str], extra_env: &[(&str, &str)]) -> std::process::Child {
        let mut cmd = self.cli(&["project", "--metrics-addr", ""]);
        cmd.args(extra_args).stdout(std::process::Stdio::null());
        if std::env::var("TEST_LOG").is_err() {
            cmd.stderr(std::process::Stdio::null());
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("start projector")
    }

    /// A `pipeline-board` command configured for this env (brokers, topics, Redis, MongoDB).
    pub fn cli(&self, args: &[&str]) -> std::process::Command {
        self.sandbox.command(std::path::Path::new(env!("CARGO_BIN_EXE_pipeline-board")), args)
    }
}

impl std::ops::Deref for TestEnv {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

impl std::ops::DerefMut for TestEnv {
    fn deref_mut(&mut self) -> &mut Sandbox {
        &mut self.sandbox
    }
}

/// Every test's topics, keys and database are unique, so leaving them would be harmless but for
/// a broker and a PostgreSQL that keep every test's leftovers and start slower: a `TestEnv`
/// removes them when it drops, whether its test passed or panicked (`KEEP_TEST_DATA=1` keeps
/// them, to look at after a failure).
impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DATA").is_some() {
            return;
        }
        let (sandbox, urls) = (self.sandbox.clone(), vec![self.redis_url.clone()]);
        // Drop cannot await, and may run on any runtime (or during a panic): the removal runs
        // on a thread of its own with its own small runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(sandbox.remove(&urls, Duration::from_secs(10)))
        })
        .join();
    }
}

/// Awaits a condition, polling; fails the test with `what` when it does not hold in time.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn small_seed(orgs: usize, contacts: usize, seed: u64) -> SeedArgs {
    SeedArgs { orgs, contacts, seed, quiet: true, ..SeedArgs::default() }
}

pub const JWT_SECRET: &str = "test-secret-of-sufficient-length";

impl TestEnv {
    pub fn serve_args(&self) -> board_api::http::ServeArgs {
        use board_mongo::MongoArgs;
        use board_redis::config::RedisArgs;
        board_api::http::ServeArgs {
            listen_addr: "127.0.0.1:0".into(),
            metrics_addr: None,
            auth: board_api::http::auth::AuthArgs::hs256(JWT_SECRET),
            redis: RedisArgs { redis_url: self.redis_url.clone(), redis_cluster: false, redis_prefix: self.keys.prefix().to_string() },
            mongo: MongoArgs { mongodb_uri: self.mongo_uri.clone(), mongodb_db: self.mongo_db.clone() },
            group_id: self.group.clone(),
            request_timeout_ms: 30_000,
            index_deadline_ms: 10_000,
            index_memory_limit: bytesize::ByteSize(board_api::query::index_cache::DEFAULT_INDEX_MEMORY_LIMIT as u64),
            index_walks_per_org: board_api::query::index_cache::default_walks_per_org(),
            index_background_cards: board_api::query::projection::DEFAULT_BACKGROUND_CARDS,
            // Every org's index stores its image: loads in other instances (and after evictions)
            // read it, so every test that loads an index twice checks images too.
            index_image_min_cards: 1,
            health_interval_ms: 200,
            mongodb_path_max_ids: board_api::query::mongo_path::DEFAULT_MAX_IDS,
            lag_interval_ms: 1_000,
            ready_max_lag: 10_000,
            ready_max_ends_age_ms: 10_000,
            demo_signin: false,
            demo_signin_anywhere: false,
            redis_read_from: board_api::http::ReadFrom::Primary,
            shared_answers_memory: bytesize::ByteSize(board_api::http::shared_answers::DEFAULT_MEMORY),
            shared_answers_max_age_ms: board_api::http::shared_answers::DEFAULT_MAX_AGE_MS,
        }
    }

    /// Starts the API in-process on port 0; returns its base URL. It stops with the test runtime.
    pub async fn serve_with(&self, args: board_api::http::ServeArgs) -> String {
        let app = board_api::http::Application::build(&args).await.expect("app builds");
        let url = format!("http://{}", app.local_addr());
        tokio::spawn(app.run(std::future::pending()));
        url
    }
}

pub fn token(org: &str, user: &str) -> String {
    board_api::http::auth::sign_hs256(JWT_SECRET.as_bytes(), user, org, 3600)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// POSTs a board request; returns status and JSON body.
pub async fn post_board(url: &str, bearer: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let mut req =
        reqwest::Client::new().post(format!("{url}/api/contacts")).header("content-type", "application/json").body(body.to_string());
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let json = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Where `deploy/install-deps.sh` put the stack's binaries and jars.
pub fn stack_home() -> std::path::PathBuf {
    std::env::var_os("PIPELINE_BOARD_HOME")
        .map(Into::into)
        .unwrap_or_else(|| std::path::PathBuf::from(env_or("HOME", "/root")).join(".cache/pipeline-board"))
}

fn deploy_script(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(name)
}

/// A scratch directory of this test, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);
impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("pb-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An Apache Kafka KRaft node of the test's own (deploy/kafka-node.sh), with its data in a
/// directory of the test, so the test can stop and restart it without disturbing other tests.
pub struct OwnKafka {
    pub dir: TempDir,
    pub port: u16,
}

impl OwnKafka {
    pub async fn start() -> OwnKafka {
        let dir = TempDir::new("kafka");
        let node = OwnKafka { dir, port: Self::free_pair() };
        node.run("start").await;
        node
    }

    /// A free port whose successor is free too (the controller listens on port + 1), below the
    /// ephemeral range (32768 and up on Linux), where the many client connections of the tests
    /// running beside this one cannot take it between this check and the broker's bind.
    fn free_pair() -> u16 {
        use rand::Rng;
        loop {
            let p = rand::rng().random_range(20_000..32_000u16);
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
                return p;
            }
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn run(&self, verb: &str) {
        let (script, dir, port) = (deploy_script("kafka-node.sh"), self.dir.0.clone(), self.port.to_string());
        let owned_verb = verb.to_string();
        let status = tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new("bash");
            cmd.arg(script).arg(&owned_verb).arg(dir);
            if owned_verb == "start" {
                cmd.arg(port);
            }
            cmd.stdout(std::process::Stdio::null()).status()
        })
        .await
        .unwrap()
        .expect("bash runs deploy/kafka-node.sh");
        assert!(status.success(), "deploy/kafka-node.sh {verb} failed: {status:?}");
    }

    /// Clean shutdown (SIGTERM), data kept.
    pub async fn stop(&self) {
        self.run("stop").await;
    }

    /// Starts again on the same data directory and port.
    pub async fn restart(&self) {
        self.run("start").await;
    }
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash").arg(deploy_script("kafka-node.sh")).arg("kill").arg(&self.dir.0).status();
    }
}

/// A FerretDB process of the test's own, on the stack's PostgreSQL, that the test can stop.
pub struct OwnFerretDb {
    pub port: u16,
    state: TempDir,
    child: Option<std::process::Child>,
}

impl OwnFerretDb {
    pub async fn start() -> OwnFerretDb {
        let mut db = OwnFerretDb { port: free_port(), state: TempDir::new("ferretdb"), child: None };
        db.restart().await;
        db
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=2000", self.port)
    }

    pub async fn restart(&mut self) {
        let pg = env_or("FERRETDB_POSTGRESQL_URL", "postgres://postgres@127.0.0.1:54320/ferretdb");
        let child = std::process::Command::new(stack_home().join("bin/ferretdb"))
            .arg("--handler=postgresql")
            .arg(format!("--postgresql-url={pg}"))
            .arg(format!("--listen-addr=127.0.0.1:{}", self.port))
            .arg(format!("--debug-addr=127.0.0.1:{}", free_port()))
            .arg(format!("--state-dir={}", self.state.0.display()))
            .args(["--telemetry=disable", "--log-level=error"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ferretdb installed by deploy/install-deps.sh");
        self.child = Some(child);
        let uri = self.uri();
        eventually(Duration::from_secs(30), "own ferretdb answers a ping", || {
            let uri = uri.clone();
            async move {
                match board_mongo::connect(&uri, "admin").await {
                    Ok(db) => db.run_command(bson::doc! {"ping": 1}).await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnFerretDb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends a signal to a child process.
pub fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("signal delivered");
}

/// A redis-server of the test's own, with an append-only file so a restart keeps its data.
pub struct OwnRedis {
    pub port: u16,
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl OwnRedis {
    pub fn start(port: u16, dir: &std::path::Path) -> OwnRedis {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--enable-debug-command",
                "local",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        OwnRedis { port, dir: dir.to_path_buf(), child }
    }
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn wait_ready(&self) {
        let url = format!("redis://127.0.0.1:{}", self.port);
        eventually(Duration::from_secs(20), "own redis answers", || {
            let url = url.clone();
            async move {
                match redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await {
                    Ok(mut c) => redis::cmd("PING").query_async::<String>(&mut c).await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
    }
    pub fn stop(mut self) -> std::path::PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.dir.clone()
    }
}

/// A test environment whose Redis is a server of the test's own: the Function library is global
/// to a Redis server, so a test that replaces it must not share one with the tests beside it.
pub async fn env_with_own_redis(name: &str) -> (TestEnv, OwnRedis, TempDir) {
    let mut env = TestEnv::new(name).await;
    let dir = TempDir::new(&format!("{name}-redis"));
    let own = OwnRedis::start(free_port(), &dir.0);
    own.wait_ready().await;
    env.redis_url = own.url();
    (env, own, dir)
}

/// The stack's Redis Cluster (deploy/redis-cluster.sh, 3 primaries + 3 replicas on 7000-7005).
pub fn cluster_url() -> String {
    env_or("REDIS_CLUSTER_URL", "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002")
}

impl TestEnv {
    /// A test environment on the stack's Redis Cluster.
    pub async fn on_cluster(name: &str) -> TestEnv {
        let mut env = TestEnv::new(name).await;
        env.redis_url = cluster_url();
        env
    }
}

/// A Redis Cluster of the test's own (3 primaries + 3 replicas, deploy/redis-cluster.sh), to
/// kill nodes of and move slots in without disturbing the tests beside it. Stopped when dropped.
pub struct OwnCluster {
    pub dir: TempDir,
    pub base: u16,
}

impl OwnCluster {
    pub fn start() -> OwnCluster {
        // A port found free can be taken by another test's connection before its node binds it
        // (CI saw "node 33068 did not start"): a failed start is stopped and tried on new ports.
        for _ in 0..3 {
            let dir = TempDir::new("cluster");
            // Six ports and their cluster bus ports (+10000) all free.
            let base = loop {
                // Node ports and their bus ports (+10000) below the ephemeral range (32768 up):
                // a client connection of another test cannot take one between the check and
                // the bind (a create waited 20 minutes here on nodes 25007-25012, bus ports 35007-35012).
                let base = 10_000 + rand::random::<u16>() % 12_000;
                let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
                if (base..base + 6).all(|p| free(p) && free(p + 10_000)) {
                    break base;
                }
            };
            let status = std::process::Command::new("bash")
                .arg(deploy_script("redis-cluster.sh"))
                .args(["up", dir.0.to_str().unwrap(), &base.to_string()])
                .stdout(std::process::Stdio::null())
                .status()
                .expect("redis-cluster.sh runs");
            let cluster = OwnCluster { dir, base };
            if status.success() {
                return cluster;
            }
            drop(cluster); // `down`: the nodes that did start stop
        }
        panic!("own cluster started (3 tries on fresh ports)");
    }

    pub fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}", self.base, self.base + 1, self.base + 2)
    }

    pub fn ports(&self) -> std::ops::Range<u16> {
        self.base..self.base + 6
    }

    /// SIGKILLs the node on `port` (no shutdown, no last write to its replica).
    pub fn kill(&self, port: u16) {
        let pidfile = self.dir.0.join(port.to_string()).join("redis.pid");
        let pid: i32 = std::fs::read_to_string(&pidfile).expect("pid file").trim().parse().expect("pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("killed");
        let _ = std::fs::remove_file(pidfile);
    }

    /// Starts the node on `port` again (empty: it rejoins with its nodes.conf and resyncs).
    pub fn restart(&self, port: u16) {
        let status = std::process::Command::new("bash")
            .arg(deploy_script("redis-cluster.sh"))
            .args(["start-node", self.dir.0.to_str().unwrap(), &port.to_string()])
            .status()
            .expect("redis-cluster.sh runs");
        assert!(status.success(), "node {port} restarted");
    }

    /// A plain connection to one node.
    pub fn node(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_connection().expect("node answers")
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(deploy_script("redis-cluster.sh"))
            .args(["down", self.dir.0.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// The node (port) serving `key`'s slot as primary, and the slot, asked of any node.
pub fn primary_of(node: &mut redis::Connection, key: &str) -> (u16, u16) {
    serving_primary(node, key).expect("slot served")
}

/// Like `primary_of`; None while no healthy primary serves the slot (a failover under way).
pub fn serving_primary(node: &mut redis::Connection, key: &str) -> Option<(u16, u16)> {
    let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(node).ok()?;
    let shards: redis::Value = redis::cmd("CLUSTER").arg("SHARDS").query(node).ok()?;
    let nodes = board_redis::redis_conn::cluster_nodes(&shards).ok()?;
    let owner = nodes.iter().find(|n| n.primary && n.healthy && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))?;
    Some((owner.port, slot))
}

/// A test environment whose Redis is a cluster of the test's own (`OwnCluster`).
pub async fn env_with_own_cluster(name: &str) -> (TestEnv, OwnCluster) {
    let cluster = OwnCluster::start();
    let mut env = TestEnv::new(name).await;
    env.redis_url = cluster.url();
    (env, cluster)
}

/// The MongoDB path's answer to `body` for `user` of `org` as the API renders it, without `meta`
/// (what a client's last board is compared with).
pub async fn mongodb_answer(db: &mongodb::Database, org: &str, user: &str, body: &str) -> serde_json::Value {
    let query = board_api::query::request::ContactsRequest::parse(body.as_bytes()).unwrap().into_query().expect("valid request");
    let reader = board_api::query::mongo_path::MongoReader::new(db.clone(), board_api::query::mongo_path::DEFAULT_MAX_IDS);
    let a = reader.answer(org, user, &query, chrono::Utc::now().timestamp_millis()).await.expect("mongodb answers");
    answer_data(&a)
}

/// An answer as the API sends it, without its `meta` (which differs by path and moment).
pub fn answer_data(a: &board_api::query::board::BoardAnswer) -> serde_json::Value {
    use board_api::query::board::AnswerMeta;
    let meta = AnswerMeta { answered_by: "mongodb", route: None, reason: None, projection_lag: None, replica_staleness_ms: None };
    let mut v: serde_json::Value = serde_json::from_slice(&a.to_json_bytes(&meta)).unwrap();
    v.as_object_mut().map(|o| o.remove("meta"));
    v
}

/// `POST /api/contacts` with an optional `If-None-Match`: status, ETag and body.
pub async fn post_with_etag(url: &str, bearer: &str, body: &str, etag: Option<&str>) -> (u16, Option<String>, String) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/api/contacts"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {bearer}"))
        .body(body.to_string());
    if let Some(e) = etag {
        req = req.header("if-none-match", e);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let etag = resp.headers().get("etag").map(|v| v.to_str().unwrap().to_string());
    (status, etag, resp.text().await.unwrap())
}

/// Clients that poll boards with `If-None-Match` as the board page does, each keeping the last
/// board it got with a 200 through its 304s: a board named by a token it does not belong to is
/// kept stale for as long as nothing changes.
pub struct BoardPollers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    polls: Arc<std::sync::atomic::AtomicUsize>,
    clients: Vec<JoinHandle<ClientEnd>>,
    url: String,
    bearer: String,
}

/// What a polling client ends with: its body, last ETag, last 200's board and how often it polled.
type ClientEnd = (&'static str, Option<String>, Option<serde_json::Value>, u32);

/// One client's last board once quiet (without `meta`) and how often it polled before.
pub struct LastBoard {
    pub body: &'static str,
    pub status: u16,
    pub data: serde_json::Value,
    pub polls: u32,
}

impl BoardPollers {
    /// Two clients per board body, polling until [`BoardPollers::last_boards`].
    pub fn start(url: &str, bearer: &str, bodies: &[&'static str]) -> BoardPollers {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let clients = bodies
            .iter()
            .flat_map(|b| [*b, *b])
            .map(|body| {
                let (stop, count, url, bearer) = (stop.clone(), polls.clone(), url.to_string(), bearer.to_string());
                tokio::spawn(async move {
                    let (mut etag, mut board, mut polls) = (None::<String>, None::<serde_json::Value>, 0u32);
                    while !stop.load(Ordering::Relaxed) {
                        let (status, e, b) = post_with_etag(&url, &bearer, body, etag.as_deref()).await;
                        polls += 1;
                        count.fetch_add(1, Ordering::Relaxed);
                        if status == 200 {
                            (etag, board) = (e, serde_json::from_str(&b).ok());
                        }
                    }
                    (body, etag, board, polls)
                })
            })
            .collect();
        BoardPollers { stop, polls, clients, url: url.to_string(), bearer: bearer.to_string() }
    }

    /// Polls answered so far, by all clients.
    pub fn polls(&self) -> usize {
        self.polls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the clients; each polls once more with its last ETag (a 304 keeps its board).
    pub async fn last_boards(self) -> Vec<LastBoard> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut last = Vec::new();
        for client in self.clients {
            let (body, etag, board, polls) = client.await.unwrap();
            let (status, _, fresh) = post_with_etag(&self.url, &self.bearer, body, etag.as_deref()).await;
            let mut data = match status {
                304 => board.expect("a 304 only after a 200"),
                200 => serde_json::from_str(&fresh).unwrap(),
                other => panic!("{body}: {other} {fresh}"),
            };
            data.as_object_mut().map(|o| o.remove("meta"));
            last.push(LastBoard { body, status, data, polls });
        }
        last
    }
}
