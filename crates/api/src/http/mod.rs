//! The HTTP API (`pipeline-board serve`): `POST /api/contacts`, `GET /healthz`, `GET /readyz`,
//! `GET /metrics`, `GET /openapi.json`. One `Clone` state; `Application::build` binds (port 0 in
//! tests) and `run` serves until the shutdown future resolves, finishing requests in flight.
pub mod auth;
mod contacts;
pub mod encoding;
pub mod health;
mod page;
pub mod replicas;
pub mod shared_answers;

use crate::query::mongo_path::MongoReader;
use crate::query::projection::ProjectionReader;
use auth::Verifier;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use board_model::keys::KeySpace;
use board_mongo::MongoArgs;
use board_redis::config::RedisArgs;
use board_redis::projection;
use board_redis::rebuild_state::{field, RebuildPhase, RebuildProgress};
use board_redis::redis_conn::{ConnectOptions, RedisConn, RedisTarget};
use health::{Dependency, Health};
use metrics_exporter_prometheus::PrometheusHandle;
use replicas::ReplicaStaleness;
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use utoipa::OpenApi;

pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: String,
    /// Serve `GET /metrics` on this address instead of `LISTEN_ADDR` (keeps the metrics off the
    /// public port; e.g. `0.0.0.0:9100` for the cluster's scraper only).
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    #[command(flatten)]
    pub auth: auth::AuthArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub mongo: MongoArgs,
    /// The projector's consumer group, whose progress is the projection's freshness.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "pipeline-board")]
    pub group_id: String,
    /// Longest time one request may take before it is answered 503.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Longest time the in-memory index may filter one board (search, team and the other
    /// filters the sorted sets do not answer) before the request is answered 503 `timeout`.
    #[arg(long, env = "INDEX_DEADLINE_MS", default_value_t = 2_000)]
    pub index_deadline_ms: u64,
    /// The in-memory indexes' byte budget (e.g. `512MiB`, `2GiB`, bytes): beyond it the least
    /// recently used orgs' indexes are dropped (`pb_index_bytes`, `pb_index_evictions_total`).
    /// The default suits a 1 GiB pod; see the README's scaling section.
    #[arg(long, env = "INDEX_MEMORY_LIMIT", default_value_t = bytesize::ByteSize(crate::query::index_cache::DEFAULT_INDEX_MEMORY_LIMIT as u64))]
    pub index_memory_limit: bytesize::ByteSize,
    /// Index walks (the boards the in-memory index filters) of one org that run at once; more
    /// wait, within `INDEX_DEADLINE_MS`. One org's expensive boards then leave the other cores
    /// to every other org. Default: half the cores, at least one.
    #[arg(long, env = "INDEX_WALKS_PER_ORG", default_value_t = crate::query::index_cache::default_walks_per_org())]
    pub index_walks_per_org: usize,
    /// Orgs with at least this many cards in their index walk on threads of a lower CPU
    /// priority (nice +10): their expensive boards take what small orgs' boards leave.
    #[arg(long, env = "INDEX_BACKGROUND_CARDS", default_value_t = crate::query::projection::DEFAULT_BACKGROUND_CARDS)]
    pub index_background_cards: usize,
    /// Orgs with at least this many cards keep an image of their in-memory index in Redis
    /// (`<org keys>:index-image`, ~100 bytes a card), so that an instance that has not loaded
    /// the org reads it in bulk (1M cards: ~1 s) instead of building it from the card records
    /// (~10 s). A number above every org's size turns images off.
    #[arg(long, env = "INDEX_IMAGE_MIN_CARDS", default_value_t = crate::query::index_cache::DEFAULT_IMAGE_MIN_CARDS)]
    pub index_image_min_cards: usize,
    /// Most contact ids the MongoDB path collects for one filter (conversations, messages);
    /// a broader filter is answered 503 `mongodb_filter_too_broad` instead of an unbounded query.
    #[arg(long, env = "MONGODB_PATH_MAX_IDS", default_value_t = crate::query::mongo_path::DEFAULT_MAX_IDS)]
    pub mongodb_path_max_ids: usize,
    /// How often Redis and MongoDB are pinged; a dependency found down is not waited for by
    /// requests until a ping succeeds again.
    #[arg(long, env = "HEALTH_INTERVAL_MS", default_value_t = 1_000)]
    pub health_interval_ms: u64,
    /// How often the projection lag reported in `meta` is measured (0: never).
    #[arg(long, env = "LAG_INTERVAL_MS", default_value_t = 1_000)]
    pub lag_interval_ms: u64,
    /// `/readyz` says ready only while the projection is whole and at most this many events
    /// behind the topics' ends.
    #[arg(long, env = "READY_MAX_LAG", default_value_t = 10_000)]
    pub ready_max_lag: i64,
    /// `/readyz` says ready only while a projector published the topics' ends at most this
    /// long ago: with every projector stopped nobody advances the projection nor tells how far
    /// behind the topics it is, so it is not ready (`reason: unattended`) within this bound.
    /// Measured by the lag probe (not with `LAG_INTERVAL_MS=0`), against the projector's clock
    /// (hosts' clocks assumed synchronised, NTP: a skew of seconds shows as age).
    #[arg(long, env = "READY_MAX_ENDS_AGE_MS", default_value_t = 10_000)]
    pub ready_max_ends_age_ms: i64,
    /// The board page's demo sign-in: lists users and signs tokens for them with `JWT_SECRET`.
    /// For demos only: anyone who reaches the API can then act as any user.
    #[arg(long, env = "DEMO_SIGNIN", default_value_t = false)]
    pub demo_signin: bool,
    /// Allows the demo sign-in on an address other than loopback (refused without it: a demo
    /// reachable from the network lets anyone act as any user).
    #[arg(long, env = "DEMO_SIGNIN_ANYWHERE", default_value_t = false)]
    pub demo_signin_anywhere: bool,
    /// Bytes of answers shared between the viewers of a board (one computation per board and
    /// change token, kept in each coding asked for; least recently used out first). 0: off.
    #[arg(long, env = "SHARED_ANSWERS_MEMORY", default_value_t = bytesize::ByteSize(shared_answers::DEFAULT_MEMORY))]
    pub shared_answers_memory: bytesize::ByteSize,
    /// Longest time a shared answer is served (its `meta.projectionLag` is as old as it). 0: off.
    #[arg(long, env = "SHARED_ANSWERS_MAX_AGE_MS", default_value_t = shared_answers::DEFAULT_MAX_AGE_MS)]
    pub shared_answers_max_age_ms: u64,
    /// Redis Cluster: where boards are read. `replica` sends the board's reads to a replica of
    /// the org's shard (writes never come from the API): more read capacity, answers behind the
    /// primary by the replication delay, which `meta.replicaStalenessMs` and
    /// `pb_replica_staleness_seconds` report.
    #[arg(long, env = "REDIS_READ_FROM", value_enum, default_value_t = ReadFrom::Primary)]
    pub redis_read_from: ReadFrom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadFrom {
    Primary,
    Replica,
}

#[derive(Clone)]
pub struct AppState {
    pub projection: ProjectionReader,
    pub mongo: MongoReader,
    pub redis: RedisConn,
    pub mongo_db: mongodb::Database,
    pub verifier: Verifier,
    pub request_timeout: Duration,
    /// Last measured projection lag in events (-1: unknown).
    pub lag: Arc<AtomicI64>,
    /// How long ago a projector last published the topics' ends, in ms (-1: never).
    pub ends_age_ms: Arc<AtomicI64>,
    /// None when the lag probe is off (`LAG_INTERVAL_MS=0`): then nothing measures the ends' age.
    pub ready_max_ends_age_ms: Option<i64>,
    pub metrics: PrometheusHandle,
    pub health: Health,
    /// The Redis stream of dead letters the dead-letter topic refused (readiness reports it).
    pub parked_dead_letters: String,
    pub keys: KeySpace,
    /// Readiness' bound on the projection's lag.
    pub ready_max_lag: i64,
    /// The HS256 secret, when the demo sign-in is on.
    pub demo_secret: Option<String>,
    /// Measured when boards are read from replicas (`REDIS_READ_FROM=replica`).
    pub replica_staleness: Option<ReplicaStaleness>,
    /// Answers shared by the viewers of a board; None when off.
    pub shared: Option<shared_answers::SharedAnswers>,
}

impl AppState {
    pub fn projection_lag(&self) -> Option<i64> {
        Some(self.lag.load(Ordering::Relaxed)).filter(|l| *l >= 0)
    }
    pub fn ends_age_ms(&self) -> Option<i64> {
        Some(self.ends_age_ms.load(Ordering::Relaxed)).filter(|a| *a >= 0)
    }
    pub fn replica_staleness_ms(&self) -> Option<i64> {
        self.replica_staleness.as_ref().and_then(ReplicaStaleness::millis)
    }
}

/// One Prometheus recorder per process (several apps may run in one test process).
fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = crate::metrics_setup::prometheus_builder().build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (the projector's, in a test process).
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

#[derive(OpenApi)]
#[openapi(
    info(title = "pipeline-board", description = "Pipeline (kanban) boards from a Redis read model of CRM events"),
    paths(contacts::contacts),
    components(schemas(crate::query::request::ContactsRequest, crate::query::request::RawRange, crate::query::request::RawWindow)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;
impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// The API; `/metrics` too unless it has a listener of its own (`METRICS_ADDR`).
pub fn router(state: AppState, with_metrics: bool) -> Router {
    let mut api = Router::new()
        .merge(contacts::router())
        .merge(page::router())
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }));
    if with_metrics {
        api = api.merge(metrics_router());
    }
    // Boards encode themselves (`encoding`: their bytes are shared); the page, the OpenAPI
    // document and the rest are compressed here, at a fast level.
    let compression = tower_http::compression::CompressionLayer::new().quality(tower_http::CompressionLevel::Fastest);
    api.layer(compression)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(contacts::record_metrics))
        .with_state(state)
}

fn metrics_router() -> Router<AppState> {
    Router::new().route("/metrics", get(|State(s): State<AppState>| async move { s.metrics.render() }))
}

/// Ready (200) when the projection is whole, at most `READY_MAX_LAG` events behind, attended (a
/// projector published the topics' ends within `READY_MAX_ENDS_AGE_MS`), and both dependencies
/// are up; `degraded` (200) when only MongoDB is down (custom-field boards fail, the rest answers
/// from the projection). 503 otherwise: `projection_not_ready` (`reason`: `redis_down`,
/// `not_whole` — missing or being rebuilt —, `lagging`, or `unattended`: boards are answered
/// from MongoDB meanwhile where the projection is not whole) or `unavailable` (both down).
/// From the background probe: readiness checks never pile up on a dependency that hangs.
async fn readyz(State(s): State<AppState>) -> Response {
    let report = s.health.report();
    let lag = s.projection_lag();
    let ends_age = s.ends_age_ms();
    let projection = s.health.projection_status();
    let not_ready = if !s.health.is_up(Dependency::Redis) {
        Some("redis_down")
    } else if !matches!(projection, "whole" | "unknown") {
        Some("not_whole")
    } else if s.ready_max_ends_age_ms.is_some_and(|max| ends_age.is_none_or(|a| a > max)) {
        Some("unattended")
    } else if lag.is_some_and(|l| l > s.ready_max_lag) {
        Some("lagging")
    } else {
        None
    };
    let (code, status) = match (report.down.len(), not_ready) {
        (2, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (_, Some(_)) => (StatusCode::SERVICE_UNAVAILABLE, "projection_not_ready"),
        (0, None) => (StatusCode::OK, "ready"),
        (_, None) => (StatusCode::OK, "degraded"),
    };
    // Dead letters that wait in Redis because the dead-letter topic refused them: the board is
    // fine, but an operator has work to do.
    let parked = if s.health.is_up(Dependency::Redis) {
        let mut conn = s.redis.clone();
        let mut xlen = redis::cmd("XLEN");
        xlen.arg(&s.parked_dead_letters);
        tokio::time::timeout(Duration::from_secs(1), xlen.query_async::<i64>(&mut conn)).await.ok().and_then(Result::ok)
    } else {
        None
    };
    let body = json!({
        "status": status,
        "deadLettersParked": parked,
        "redis": report.redis,
        "mongodb": report.mongodb,
        "down": report.down,
        "checkedAt": report.checked_at,
        "projectionLag": lag,
        "projection": projection,
        "reason": not_ready,
        "endsAgeMs": ends_age,
        "readyMaxLag": s.ready_max_lag,
        "readyMaxEndsAgeMs": s.ready_max_ends_age_ms,
    });
    (code, Json(body)).into_response()
}

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    /// `METRICS_ADDR`'s listener and its router (`/metrics` only).
    metrics: Option<(tokio::net::TcpListener, Router)>,
    projection: ProjectionReader,
}

impl Application {
    pub async fn build(args: &ServeArgs) -> anyhow::Result<Application> {
        check_demo_signin(args)?;
        let mut verifier = Verifier::from_args(&args.auth)?;
        if args.demo_signin {
            tracing::warn!(
                listen_addr = %args.listen_addr,
                "the demo sign-in is on: anyone who reaches this address can act as any user (DEMO_SIGNIN=false for anything but a demo)"
            );
            verifier = verifier.accepting_demo_tokens();
        }
        let options = ConnectOptions {
            connection_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            read_from_replicas: args.redis_read_from == ReadFrom::Replica,
            retries: Some(1),
        };
        // Lazy: the service starts (and answers from MongoDB) while a single Redis is down.
        let redis = RedisConn::connect_lazy(&RedisTarget::parse(&args.redis.url(), false), options).await?;
        let keys = KeySpace::new(&args.redis.redis_prefix);
        let mongo_db = board_mongo::connect(&args.mongo.mongodb_uri, &args.mongo.mongodb_db).await?;
        let lag = Arc::new(AtomicI64::new(-1));
        let ends_age_ms = Arc::new(AtomicI64::new(-1));
        if args.lag_interval_ms > 0 {
            spawn_lag_probe(args, redis.clone(), keys.clone(), lag.clone(), ends_age_ms.clone());
        }
        let replica_staleness = (args.redis_read_from == ReadFrom::Replica).then(ReplicaStaleness::default);
        if let Some(r) = &replica_staleness {
            // A connection of the probe's own: its WAIT blocks the connection it runs on.
            let probe =
                RedisConn::connect(&RedisTarget::parse(&args.redis.url(), false), ConnectOptions { retries: None, ..options }).await?;
            r.spawn_probe(probe, keys.clone(), Duration::from_millis(args.lag_interval_ms.max(100)));
        }
        let health = Health::default();
        health.spawn_probe(redis.clone(), mongo_db.clone(), Duration::from_millis(args.health_interval_ms.max(100)), keys.clone());
        let state = AppState {
            projection: ProjectionReader::new(redis.clone(), keys.clone(), Duration::from_millis(args.index_deadline_ms))
                .with_index_limits(crate::query::projection::IndexLimits {
                    memory: args.index_memory_limit.as_u64() as usize,
                    walks_per_org: args.index_walks_per_org,
                    background_cards: args.index_background_cards,
                    image_min_cards: args.index_image_min_cards,
                }),
            mongo: MongoReader::new(mongo_db.clone(), args.mongodb_path_max_ids),
            redis,
            mongo_db,
            verifier,
            request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
            lag,
            ends_age_ms,
            ready_max_ends_age_ms: (args.lag_interval_ms > 0).then_some(args.ready_max_ends_age_ms),
            metrics: metrics_handle(),
            health,
            parked_dead_letters: keys.parked_dead_letters(),
            keys: keys.clone(),
            ready_max_lag: args.ready_max_lag,
            demo_secret: args.auth.jwt_secret.clone().filter(|_| args.demo_signin),
            replica_staleness,
            shared: shared_answers::SharedAnswers::new(
                args.shared_answers_memory.as_u64(),
                Duration::from_millis(args.shared_answers_max_age_ms),
            ),
        };
        let listener = tokio::net::TcpListener::bind(&args.listen_addr).await?;
        let metrics = match &args.metrics_addr {
            Some(addr) => Some((tokio::net::TcpListener::bind(addr).await?, metrics_router().with_state(state.clone()))),
            None => None,
        };
        let projection = state.projection.clone();
        Ok(Application { listener, router: router(state, metrics.is_none()), metrics, projection })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// The projection reader the API answers with (tests reach its in-memory indexes).
    pub fn projection(&self) -> ProjectionReader {
        self.projection.clone()
    }

    /// Where `/metrics` is served when it has its own listener.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(l, _)| l.local_addr().expect("bound listener has an address"))
    }

    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        // The metrics listener lives as long as the API: a scrape needs no graceful drain.
        let metrics = self.metrics.map(|(listener, router)| tokio::spawn(async move { axum::serve(listener, router).await }));
        let served = axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await;
        if let Some(m) = metrics {
            m.abort();
        }
        served
    }
}

/// The demo sign-in only on a loopback address, unless `--demo-signin-anywhere` says otherwise.
fn check_demo_signin(args: &ServeArgs) -> anyhow::Result<()> {
    if !args.demo_signin || args.demo_signin_anywhere || is_loopback(&args.listen_addr) {
        return Ok(());
    }
    anyhow::bail!(
        "DEMO_SIGNIN is on and LISTEN_ADDR {} is not a loopback address: anyone reaching it could act as any user; \
         listen on 127.0.0.1, turn the demo sign-in off, or pass --demo-signin-anywhere (DEMO_SIGNIN_ANYWHERE=true) if you mean it",
        args.listen_addr
    )
}

/// `127.0.0.0/8`, `::1` or `localhost` (any port); a name or an unspecified address is not.
fn is_loopback(listen_addr: &str) -> bool {
    match listen_addr.parse::<SocketAddr>() {
        Ok(addr) => addr.ip().is_loopback(),
        Err(_) => listen_addr.rsplit_once(':').is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
    }
}

/// The projection's lag from Redis alone (the applied offsets and the partition ends the
/// projector publishes): the API never opens a Kafka client.
fn spawn_lag_probe(args: &ServeArgs, mut redis: RedisConn, keys: KeySpace, lag: Arc<AtomicI64>, ends_age_ms: Arc<AtomicI64>) {
    let (progress_key, ends_key) = (keys.progress(&args.group_id), keys.partition_ends(&args.group_id));
    let every = Duration::from_millis(args.lag_interval_ms);
    tokio::spawn(async move {
        loop {
            let (measured, published_at) = match projection::lag_from_redis(&mut redis, &progress_key, &ends_key).await {
                Ok(Some(l)) => (l.total(), l.ends_published_at),
                _ => (-1, None),
            };
            lag.store(measured, Ordering::Relaxed);
            let age = published_at.map(|at| (board_model::time::now_millis() - at).max(0)).unwrap_or(-1);
            ends_age_ms.store(age, Ordering::Relaxed);
            crate::events::ProjectionLag { events: measured, ends_age_ms: age }.emit();
            // A rebuild's phase and progress, as the rebuild keeps them in Redis (so the API's
            // scrape shows them too, wherever the rebuild runs).
            let rebuild: redis::RedisResult<(Option<String>, Option<i64>, Option<i64>)> = redis::cmd("HMGET")
                .arg(keys.rebuild_state())
                .arg(field::PHASE)
                .arg(field::LAG)
                .arg(field::EVENTS_READ)
                .query_async(&mut redis)
                .await;
            if let Ok((phase, rebuild_lag, read)) = rebuild {
                RebuildPhase::show(phase.as_deref().and_then(RebuildPhase::parse));
                RebuildProgress { lag: rebuild_lag.unwrap_or(0), events_read: read.unwrap_or(0), events_per_second: None }.show();
            }
            tokio::time::sleep(every).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_loopback_addresses_count_as_loopback() {
        for a in ["127.0.0.1:8080", "127.1.2.3:0", "[::1]:8080", "localhost:8080", "LOCALHOST:1"] {
            assert!(is_loopback(a), "{a}");
        }
        for a in ["0.0.0.0:8080", "[::]:8080", "10.0.0.5:8080", "example.com:8080", "localhost.evil.com:80", "8080", ""] {
            assert!(!is_loopback(a), "{a}");
        }
    }
}
