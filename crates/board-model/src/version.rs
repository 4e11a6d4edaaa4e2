//! Version supersession: the one rule that makes applying events idempotent and order-free.
//! Every document carries a `version` (MongoDB's write counter); the projection keeps the last
//! applied one (in the record, or in the org's `versions` hash for pipelines and users), and an
//! event applies only when it is strictly newer. A redelivery (same version) and a late, older
//! event both lose; a delete leaves its version behind as a tombstone so a late upsert loses too.

/// Whether an event of version `incoming` replaces what the projection holds (`current`: the
/// last applied version, `None` when nothing was ever applied). A document without a version
/// counts as version 0 (`version_of`).
pub fn supersedes(incoming: i64, current: Option<i64>) -> bool {
    current.is_none_or(|cur| incoming > cur)
}

/// The version an event carries: documents written before versions existed count as 0.
pub fn version_of(version: Option<i64>) -> i64 {
    version.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_strictly_newer_version_applies() {
        assert!(supersedes(1, None), "the first event of a document");
        assert!(supersedes(0, None), "a document without a version, first seen");
        assert!(supersedes(3, Some(2)));
        assert!(!supersedes(2, Some(2)), "a redelivery");
        assert!(!supersedes(1, Some(2)), "a late, older event");
        assert!(!supersedes(version_of(None), Some(0)), "an unversioned redelivery");
    }
}
