//! Test harness: every test gets its own topics, consumer group, Redis key prefix and MongoDB
//! database on the real services that `deploy/stack.sh up` starts, so tests run in parallel
//! without seeing each other.
#![allow(dead_code)]
use pipeline_board::consumers::progress::{self, Lag};
use pipeline_board::consumers::{KafkaConnection, ProjectorSettings, RunCounters};
use pipeline_board::core::config::Topics;
use pipeline_board::core::keys::KeySpace;
use pipeline_board::seed::{SeedArgs, SeedReport};
use pipeline_board::verify::DriftReport;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
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
        pipeline_board::core::telemetry::init("text");
    }
}

pub struct TestEnv {
    pub name: String,
    pub brokers: String,
    pub redis_url: String,
    pub mongo_uri: String,
    pub mongo_db: String,
    pub topics: Topics,
    pub keys: KeySpace,
    pub group: String,
}

pub struct RunningProjector {
    pub counters: Arc<RunCounters>,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningProjector {
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
        init_logs();
        let unique = format!("{name}-{}-{}", std::process::id(), rand::random::<u32>());
        let env = TestEnv {
            name: unique.clone(),
            brokers: env_or("KAFKA_BROKERS", "127.0.0.1:9092"),
            redis_url: env_or("REDIS_URL", "redis://127.0.0.1:6379"),
            mongo_uri: env_or("MONGODB_URI", "mongodb://127.0.0.1:27017"),
            mongo_db: format!("t{}", unique.replace(['-', '.'], "_")),
            topics: Topics::with_prefix(&format!("{unique}.")),
            keys: KeySpace::new(format!("t:{unique}")),
            group: format!("g-{unique}"),
        };
        env.create_topics(4).await;
        env
    }

    pub async fn create_topics(&self, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create().expect("admin client");
        let mut names = self.topics.inputs();
        names.push(self.topics.topic_dlq.clone());
        let new: Vec<NewTopic> = names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for r in admin.create_topics(&new, &opts).await.expect("create topics") {
            r.expect("topic created");
        }
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
            pipeline_board::consumers::run(settings, c, async move {
                let _ = rx.await;
            })
            .await
        });
        RunningProjector { counters, stop: Some(tx), handle }
    }

    pub async fn seed(&self, args: SeedArgs) -> SeedReport {
        pipeline_board::seed::run(&args, &self.kafka(), &self.topics, &self.mongo_uri, &self.mongo_db).await.expect("seed")
    }

    /// Seeds, projects the events with one projector until caught up, and stops it gracefully.
    pub async fn seed_and_project(&self, args: SeedArgs) -> SeedReport {
        let seeded = self.seed(args).await;
        let projector = self.spawn_projector();
        self.wait_caught_up(Duration::from_secs(120)).await;
        projector.stop().await.expect("projector ran cleanly");
        seeded
    }

    pub async fn redis(&self) -> redis::aio::ConnectionManager {
        pipeline_board::core::config::redis_connection(&self.redis_url).await.expect("redis")
    }

    pub async fn mongo(&self) -> mongodb::Database {
        pipeline_board::mongo::connect(&self.mongo_uri, &self.mongo_db).await.expect("mongo")
    }

    pub async fn lag(&self) -> Lag {
        let mut conn = self.redis().await;
        progress::lag(&self.kafka(), &self.topics.inputs(), &mut conn, &self.keys.progress(&self.group)).await.expect("lag")
    }

    /// Awaits the condition "every input partition applied up to its high watermark".
    pub async fn wait_caught_up(&self, within: Duration) -> Lag {
        let deadline = Instant::now() + within;
        loop {
            let lag = self.lag().await;
            if lag.total() == 0 && lag.applied() > 0 {
                return lag;
            }
            assert!(Instant::now() < deadline, "projection not caught up within {within:?}: {lag:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn verify(&self, orgs: &[String]) -> DriftReport {
        let mut conn = self.redis().await;
        let db = self.mongo().await;
        pipeline_board::verify::verify(&mut conn, &self.keys, &db, orgs).await.expect("verify")
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

    /// Removes this test's keys (best effort; the prefix is unique anyway).
    pub async fn cleanup(&self) {
        let mut conn = self.redis().await;
        let pattern = format!("{}:*", self.keys.prefix());
        let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut conn).await.unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
        }
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
    pub fn serve_args(&self) -> pipeline_board::api::ServeArgs {
        use pipeline_board::core::config::{KafkaArgs, MongoArgs, RedisArgs};
        pipeline_board::api::ServeArgs {
            listen_addr: "127.0.0.1:0".into(),
            jwt_secret: JWT_SECRET.into(),
            redis: RedisArgs { redis_url: self.redis_url.clone(), redis_prefix: self.keys.prefix().to_string() },
            mongo: MongoArgs { mongodb_uri: self.mongo_uri.clone(), mongodb_db: self.mongo_db.clone() },
            kafka: KafkaArgs { kafka_brokers: self.brokers.clone(), kafka_options: Vec::new(), topics: self.topics.clone() },
            group_id: self.group.clone(),
            request_timeout_ms: 30_000,
            health_interval_ms: 200,
            lag_interval_ms: 1_000,
        }
    }

    /// Starts the API in-process on port 0; returns its base URL. It stops with the test runtime.
    pub async fn serve_with(&self, args: pipeline_board::api::ServeArgs) -> String {
        let app = pipeline_board::api::Application::build(&args).await.expect("app builds");
        let url = format!("http://{}", app.local_addr());
        tokio::spawn(app.run(std::future::pending()));
        url
    }
}

pub fn token(org: &str, user: &str) -> String {
    pipeline_board::api::auth::sign_hs256(JWT_SECRET.as_bytes(), user, org, 3600)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// POSTs a board request; returns status and JSON body.
pub async fn post_board(url: &str, bearer: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().post(format!("{url}/api/contacts")).header("content-type", "application/json").body(body.to_string());
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let json = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, json)
}
