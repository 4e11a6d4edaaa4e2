//! What the API reports, vector `internal_events` style: each event a struct whose `emit()` logs
//! and counts it. Every metric name of the API lives here (the rebuild's, which the API's scrape
//! also shows, live with the rebuild's state in `board_redis::rebuild_state`).
use board_redis::projection::Status;
use tracing::{info, warn};

/// One HTTP request answered: its route, status and time.
pub struct HttpRequest<'a> {
    pub path: &'a str,
    pub status: u16,
    pub seconds: f64,
}

impl HttpRequest<'_> {
    pub fn emit(self) {
        metrics::counter!("pb_http_requests_total", "path" => self.path.to_string(), "status" => self.status.to_string()).increment(1);
        metrics::histogram!("pb_http_request_seconds", "path" => self.path.to_string()).record(self.seconds);
    }
}

/// A board answered, by the projection or by MongoDB.
pub struct BoardAnswered {
    pub path: &'static str,
}

impl BoardAnswered {
    pub fn emit(self) {
        metrics::counter!("pb_board_answers_total", "path" => self.path).increment(1);
    }
}

/// A board the caller already holds (its ETag matched): 304, by the change token before any
/// work, or by the answer's own hash.
pub struct BoardNotModified {
    pub check: &'static str,
}

impl BoardNotModified {
    pub fn emit(self) {
        metrics::counter!("pb_board_not_modified_total", "check" => self.check).increment(1);
    }
}

/// A board served from the shared answers: computed by this request, or taken from another's.
pub struct BoardShared {
    pub computed: bool,
}

impl BoardShared {
    pub fn emit(self) {
        metrics::counter!("pb_board_shared_total", "outcome" => if self.computed { "computed" } else { "shared" }).increment(1);
    }
}

/// What the health probe found of a dependency; `changed` when it differs from the last probe.
pub struct DependencyProbed {
    pub dependency: &'static str,
    pub up: bool,
    pub changed: bool,
}

impl DependencyProbed {
    pub fn emit(self) {
        match (self.changed, self.up) {
            (true, true) => info!(dependency = self.dependency, "dependency is up again"),
            (true, false) => warn!(dependency = self.dependency, "dependency is down"),
            _ => {}
        }
        metrics::gauge!("pb_dependency_up", "dependency" => self.dependency).set(if self.up { 1.0 } else { 0.0 });
    }
}

/// The projection's state as the health probe read it; `changed` when it differs from the last.
pub struct ProjectionProbed {
    pub status: Status,
    pub changed: bool,
}

impl ProjectionProbed {
    pub fn emit(self) {
        if self.changed {
            info!(projection = self.status.name(), "projection state changed");
        }
        metrics::gauge!("pb_projection_whole").set(if self.status == Status::Whole { 1.0 } else { 0.0 });
    }
}

/// The projection's lag from Redis alone, and how old the partitions' ends it is measured
/// against are (-1: unknown).
pub struct ProjectionLag {
    pub events: i64,
    pub ends_age_ms: i64,
}

impl ProjectionLag {
    pub fn emit(self) {
        metrics::gauge!("pb_projection_ends_age_seconds").set(self.ends_age_ms as f64 / 1000.0);
        metrics::gauge!("pb_projection_lag_events").set(self.events as f64);
    }
}

/// How far a shard's replicas are behind its primary (the staleness of replica reads).
pub struct ReplicaStaleness<'a> {
    pub shard: &'a str,
    pub ms: i64,
}

impl ReplicaStaleness<'_> {
    pub fn emit(self) {
        metrics::gauge!("pb_replica_staleness_seconds", "shard" => self.shard.to_string()).set(self.ms as f64 / 1000.0);
    }
}

/// The projection's instance changed (a heal or a rewind): every in-memory index was dropped.
pub struct IndexInstanceChanged<'a> {
    pub instance: &'a str,
    pub dropped: usize,
}

impl IndexInstanceChanged<'_> {
    pub fn emit(self) {
        metrics::counter!("pb_index_instance_changes_total").increment(1);
        info!(instance = self.instance, dropped = self.dropped, "the projection's instance changed; in-memory indexes dropped");
    }
}

/// What the in-memory indexes hold now.
pub struct IndexSize {
    pub orgs: usize,
    pub cards: usize,
    pub bytes: usize,
}

impl IndexSize {
    pub fn emit(self) {
        metrics::gauge!("pb_index_orgs").set(self.orgs as f64);
        metrics::gauge!("pb_index_cards").set(self.cards as f64);
        metrics::gauge!("pb_index_bytes").set(self.bytes as f64);
    }
}

/// An org's index was loaded, from its image or its records: its size by part and how long
/// the load took (`pb_index_load_seconds{from}`).
pub struct IndexLoaded<'a> {
    /// The org's key base (org and generation).
    pub org: &'a str,
    pub from: crate::query::index_cache::LoadedFrom,
    pub cards: usize,
    pub parts: [(&'static str, usize); 7],
    pub seconds: f64,
}

impl<'a> IndexLoaded<'a> {
    pub fn of(
        org: &'a str,
        index: &crate::query::index::OrgIndex,
        from: crate::query::index_cache::LoadedFrom,
        took: std::time::Duration,
    ) -> Self {
        IndexLoaded { org, from, cards: index.len(), parts: index.bytes_by_part(), seconds: took.as_secs_f64() }
    }

    pub fn emit(self) {
        let bytes: usize = self.parts.iter().map(|(_, b)| b).sum();
        let parts: Vec<String> = self.parts.iter().map(|(part, b)| format!("{part}={b}")).collect();
        metrics::histogram!("pb_index_load_seconds", "from" => self.from.as_str()).record(self.seconds);
        info!(org = self.org, from = self.from.as_str(), cards = self.cards, bytes, parts = %parts.join(" "), seconds = self.seconds, "in-memory index loaded");
    }
}

/// What became of an index image, counted in `pb_index_images_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageOutcome {
    /// Stored in Redis.
    Stored,
    /// Not stored: the org reads another generation now.
    Moved,
    /// Not stored: an image of this layout and a later stream position is stored.
    Older,
    /// Not stored: the image stored is as recent (not emitted: nothing happened).
    Current,
    /// Not stored: over `MAX_IMAGE_BYTES`.
    TooLarge,
    /// Not stored: encoding stopped or Redis failed.
    Failed,
    /// Found, not used: the change stream no longer brings it up to date.
    BehindTheStream,
    /// Found, not used: written by a build of another layout.
    OtherLayout,
    /// Found, not used: of another generation than the org's.
    OtherGeneration,
    /// Found, not used: its checksum or encoding is wrong.
    Damaged,
    /// Found, not used: another instance stored a later image while its parts were read.
    ReplacedWhileRead,
}

impl ImageOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageOutcome::Stored => "stored",
            ImageOutcome::Moved => "moved",
            ImageOutcome::Older => "older",
            ImageOutcome::Current => "current",
            ImageOutcome::TooLarge => "too_large",
            ImageOutcome::Failed => "failed",
            ImageOutcome::BehindTheStream => "behind_the_stream",
            ImageOutcome::OtherLayout => "other_layout",
            ImageOutcome::OtherGeneration => "other_generation",
            ImageOutcome::Damaged => "damaged",
            ImageOutcome::ReplacedWhileRead => "replaced_while_read",
        }
    }

    /// What an operator should look at: a failure, or an image that should have been usable.
    fn is_warning(self) -> bool {
        matches!(self, ImageOutcome::Failed | ImageOutcome::OtherGeneration | ImageOutcome::Damaged)
    }
}

impl From<board_redis::functions::image::ImagePut> for ImageOutcome {
    fn from(put: board_redis::functions::image::ImagePut) -> Self {
        use board_redis::functions::image::ImagePut;
        match put {
            ImagePut::Stored => ImageOutcome::Stored,
            ImagePut::Moved => ImageOutcome::Moved,
            ImagePut::Older => ImageOutcome::Older,
        }
    }
}

/// An index image stored, not stored, or found and not used.
pub struct IndexImage<'a> {
    pub org: &'a str,
    pub outcome: ImageOutcome,
    pub bytes: usize,
    pub seconds: f64,
}

impl IndexImage<'_> {
    pub fn emit(self) {
        let outcome = self.outcome.as_str();
        metrics::counter!("pb_index_images_total", "outcome" => outcome).increment(1);
        if self.outcome.is_warning() {
            tracing::warn!(org = self.org, outcome, bytes = self.bytes, "index image not used or not stored");
        } else {
            info!(org = self.org, outcome, bytes = self.bytes, seconds = self.seconds, "index image");
        }
    }
}

/// Indexes dropped: `budget` (least recently used, to stay under `INDEX_MEMORY_LIMIT`) or
/// `idle` (no board for `INDEX_IDLE`).
pub struct IndexesEvicted {
    pub reason: &'static str,
    pub count: usize,
}

impl IndexesEvicted {
    pub fn emit(self) {
        if self.count > 0 {
            metrics::counter!("pb_index_evictions_total", "reason" => self.reason).increment(self.count as u64);
        }
    }
}

/// One org's index alone is larger than the whole budget: it answers the boards in flight and is
/// not kept (each of its index boards loads it again: raise `INDEX_MEMORY_LIMIT`).
pub struct IndexOverBudget<'a> {
    pub org: &'a str,
    pub bytes: usize,
    pub limit: usize,
}

impl IndexOverBudget<'_> {
    pub fn emit(self) {
        metrics::counter!("pb_index_over_budget_total").increment(1);
        warn!(org = self.org, bytes = self.bytes, limit = self.limit, "an org's index alone exceeds INDEX_MEMORY_LIMIT; not kept");
    }
}
