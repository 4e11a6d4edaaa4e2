//! What a rebuild is, as it keeps it in Redis: its source, orgs, generation and phase (a run
//! with the same source and orgs resumes it).
use super::*;

/// Where a rebuild reads from, as its plan records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PlanSource {
    /// The topics from their beginning.
    Topics,
    /// The topics from the first offsets at or after this time (millis).
    TopicsFrom(i64),
    /// A MongoDB snapshot, then the topics from the ends taken before it.
    Mongodb,
}

impl PlanSource {
    pub(super) fn of(source: Source, from: Option<i64>) -> Self {
        match (source, from) {
            (Source::Mongodb, _) => PlanSource::Mongodb,
            (Source::Topics, Some(t)) => PlanSource::TopicsFrom(t),
            (Source::Topics, None) => PlanSource::Topics,
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        match s {
            "topics" => Some(PlanSource::Topics),
            "mongodb" => Some(PlanSource::Mongodb),
            _ => s.strip_prefix("topics-from:")?.parse().ok().map(PlanSource::TopicsFrom),
        }
    }

    /// The phase a new rebuild from this source starts in.
    pub(super) fn first_phase(self) -> RebuildPhase {
        match self {
            PlanSource::Mongodb => RebuildPhase::Snapshot,
            PlanSource::Topics | PlanSource::TopicsFrom(_) => RebuildPhase::Replay,
        }
    }
}

impl std::fmt::Display for PlanSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanSource::Topics => f.write_str("topics"),
            PlanSource::TopicsFrom(t) => write!(f, "topics-from:{t}"),
            PlanSource::Mongodb => f.write_str("mongodb"),
        }
    }
}

/// What a rebuild is, as kept in Redis (resumed by the next run when it has the same source
/// and orgs).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    pub(super) generation: Generation,
    pub(super) source: PlanSource,
    /// Comma-separated, sorted; "" = every org.
    pub(super) orgs: String,
    pub(super) phase: RebuildPhase,
    pub(super) started: i64,
}

impl Plan {
    pub(super) fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            (field::GENERATION, self.generation.name().to_string()),
            (field::SOURCE, self.source.to_string()),
            (field::ORGS, self.orgs.clone()),
            (field::PHASE, self.phase.name().to_string()),
            (field::STARTED, self.started.to_string()),
        ]
    }
    pub(super) fn from_hash(h: &HashMap<String, String>) -> Option<Plan> {
        Some(Plan {
            generation: Generation::parse(h.get(field::GENERATION)?)?,
            source: PlanSource::parse(h.get(field::SOURCE)?)?,
            orgs: h.get(field::ORGS).cloned().unwrap_or_default(),
            phase: RebuildPhase::parse(h.get(field::PHASE)?)?,
            started: h.get(field::STARTED).and_then(|s| s.parse().ok()).unwrap_or_default(),
        })
    }
    pub(super) fn org_filter(&self) -> BTreeSet<String> {
        self.orgs.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
    }
}
