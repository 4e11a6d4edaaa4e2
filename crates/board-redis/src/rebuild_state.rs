//! What a rebuild keeps in Redis (`KeySpace::rebuild_state`, one hash): its plan and phase, its
//! progress, and per org what its cleanup removes. The rebuild writes it (board-ops), the API's
//! scrape reads it (board-api); both name its fields and phases through here.

/// The phases of a rebuild, in order. A rebuild killed in any of them resumes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RebuildPhase {
    /// `--source mongodb`: every org's documents applied as upserts.
    Snapshot,
    /// The topics replayed into the new generation up to their ends.
    Replay,
    /// Each org's generation pointer moved, org by org.
    Switch,
    /// The old generations' keys removed after the grace period.
    Cleanup,
    /// Finished: the state is gone (only the metric says `done`).
    Done,
}

impl RebuildPhase {
    pub const ALL: [RebuildPhase; 5] =
        [RebuildPhase::Snapshot, RebuildPhase::Replay, RebuildPhase::Switch, RebuildPhase::Cleanup, RebuildPhase::Done];

    pub fn name(self) -> &'static str {
        match self {
            RebuildPhase::Snapshot => "snapshot",
            RebuildPhase::Replay => "replay",
            RebuildPhase::Switch => "switch",
            RebuildPhase::Cleanup => "cleanup",
            RebuildPhase::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        RebuildPhase::ALL.into_iter().find(|p| p.name() == s)
    }

    /// `pb_rebuild_phase{phase}`: 1 for the phase a rebuild is in, 0 for the others (all 0 when
    /// none runs).
    pub fn show(current: Option<RebuildPhase>) {
        for p in RebuildPhase::ALL {
            metrics::gauge!("pb_rebuild_phase", "phase" => p.name()).set(if Some(p) == current { 1.0 } else { 0.0 });
        }
    }
}

impl std::fmt::Display for RebuildPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How far a rebuild's replay is: `pb_rebuild_lag_events`, `pb_rebuild_events_read` and
/// `pb_rebuild_events_per_second` (the rebuild shows them; the API's scrape shows the first two
/// from the rebuild state, wherever the rebuild runs).
pub struct RebuildProgress {
    pub lag: i64,
    pub events_read: i64,
    pub events_per_second: Option<f64>,
}

impl RebuildProgress {
    pub fn show(self) {
        metrics::gauge!("pb_rebuild_lag_events").set(self.lag as f64);
        metrics::gauge!("pb_rebuild_events_read").set(self.events_read as f64);
        if let Some(rate) = self.events_per_second {
            metrics::gauge!("pb_rebuild_events_per_second").set(rate);
        }
    }
}

/// The hash's fields.
pub mod field {
    pub const GENERATION: &str = "generation";
    /// `topics`, `topics-from:<millis>` or `mongodb`.
    pub const SOURCE: &str = "source";
    /// The orgs asked for, comma-separated, sorted; "" = every org.
    pub const ORGS: &str = "orgs";
    pub const PHASE: &str = "phase";
    pub const STARTED: &str = "started";
    /// The replay's start per partition (JSON), for the switch.
    pub const STARTS: &str = "starts";
    pub const SWITCHED_AT: &str = "switchedAt";
    pub const LAG: &str = "lag";
    pub const EVENTS_READ: &str = "eventsRead";
    pub const EVENTS_PER_SECOND: &str = "eventsPerSecond";
}

/// A per-org field: a generation of the org the cleanup removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrgField {
    /// The generation the org left at its switch (`old:<org>`).
    Left(String),
    /// The new generation's keys of an org that was not switched (`drop:<org>`).
    NotSwitched(String),
}

impl OrgField {
    pub fn name(&self) -> String {
        match self {
            OrgField::Left(org) => format!("old:{org}"),
            OrgField::NotSwitched(org) => format!("drop:{org}"),
        }
    }

    pub fn parse(field: &str) -> Option<Self> {
        match field.split_once(':')? {
            ("old", org) => Some(OrgField::Left(org.to_string())),
            ("drop", org) => Some(OrgField::NotSwitched(org.to_string())),
            _ => None,
        }
    }

    pub fn org(&self) -> &str {
        match self {
            OrgField::Left(org) | OrgField::NotSwitched(org) => org,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_org_fields_round_trip() {
        for p in RebuildPhase::ALL {
            assert_eq!(RebuildPhase::parse(p.name()), Some(p));
        }
        assert_eq!(RebuildPhase::parse("Replay"), None);
        assert!(RebuildPhase::Replay < RebuildPhase::Switch, "phases are ordered");
        for f in [OrgField::Left("o1".into()), OrgField::NotSwitched("o2".into())] {
            assert_eq!(OrgField::parse(&f.name()), Some(f));
        }
        assert_eq!(OrgField::parse(field::PHASE), None, "a plan field is no org field");
    }
}
