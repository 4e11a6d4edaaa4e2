//! The Redis key model. Every key of one org starts with `<prefix>:{<orgId>}` so that all of an
//! org's keys share one Redis Cluster hash slot: the projection's Functions and the API's board
//! query touch many keys in one call, which Redis Cluster allows only within one slot.
//!
//! The same names are built by `functions.lua` (the writer) and here (the readers: the API and
//! `verify`). docs/key-model.md describes them; a unit test pins them.
use crate::model::CardKind;

/// Where the raw stage of a card is: `<pipelineId or "-">|s:<pipelineStage>` when the card has a
/// stage id, `<pipelineId or "-">|n:<status>` when it has only a status name. "-" marks legacy
/// cards without a `pipelineId` (they belong to their org's active pipeline of their kind).
/// Stage membership is resolved at query time from these raw keys, so a pipeline that is
/// renamed, activated or deactivated never forces a rewrite of its cards.
pub fn raw_stage_key(pipeline_id: Option<&str>, stage_id: Option<&str>, status: Option<&str>) -> Option<String> {
    let pid = pipeline_id.unwrap_or("-");
    match (stage_id, status) {
        (Some(s), _) => Some(format!("{pid}|s:{s}")),
        (None, Some(n)) => Some(format!("{pid}|n:{n}")),
        (None, None) => None,
    }
}

#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    pub fn new(prefix: impl Into<String>) -> Self {
        KeySpace { prefix: prefix.into() }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// `org_id` must already be a validated ObjectId (no braces can reach the hash tag).
    pub fn org(&self, org_id: &str) -> OrgKeys {
        OrgKeys { base: format!("{}:{{{}}}", self.prefix, org_id) }
    }
    /// Dead letters the dead-letter topic refused (too large, topic missing, not authorized):
    /// a Redis stream, kept until an operator re-drives them (never trimmed: nothing is lost).
    pub fn parked_dead_letters(&self) -> String {
        format!("{}:dlq:parked", self.prefix)
    }
    /// Consumer progress (next offset per topic-partition), written after each applied batch.
    pub fn progress(&self, group: &str) -> String {
        format!("{}:progress:{group}", self.prefix)
    }
}

/// The keys of one org. `base` is also the first KEYS argument of every Function call: it
/// routes the call to the org's slot on Redis Cluster.
#[derive(Debug, Clone)]
pub struct OrgKeys {
    pub base: String,
}

impl OrgKeys {
    fn k(&self, parts: &[&str]) -> String {
        let mut s = self.base.clone();
        for p in parts {
            s.push(':');
            s.push_str(p);
        }
        s
    }
    /// Last applied version (tombstones stay) of every document, field `<tag>:<id>`.
    pub fn versions(&self) -> String {
        self.k(&["ver"])
    }
    /// bincode card bodies, field = card id.
    pub fn bodies(&self, kind: CardKind) -> String {
        self.k(&["body", kind.tag()])
    }
    /// msgpack index metadata of each card (what its index entries were derived from).
    pub fn metas(&self, kind: CardKind) -> String {
        self.k(&["meta", kind.tag()])
    }
    pub fn pipelines(&self) -> String {
        self.k(&["pipelines"])
    }
    pub fn users(&self) -> String {
        self.k(&["users"])
    }
    pub fn team(&self, team_id: &str) -> String {
        self.k(&["team", team_id])
    }
    pub fn messages_of(&self, contact_id: &str) -> String {
        self.k(&["msgs", contact_id])
    }
    pub fn assignees_of(&self, contact_id: &str) -> String {
        self.k(&["asgof", contact_id])
    }
    /// Every card of a raw stage; score = createdAt millis (-inf when missing), member = id.
    pub fn stage(&self, kind: CardKind, rk: &str) -> String {
        self.k(&["z", kind.tag(), rk])
    }
    /// Cards of a raw stage where `user` is creator, owner or conversation assignee.
    pub fn stage_person(&self, kind: CardKind, rk: &str, user: &str) -> String {
        self.k(&["zp", kind.tag(), rk, user])
    }
    /// Cards of a raw stage where `user` is a conversation assignee.
    pub fn stage_assignee(&self, kind: CardKind, rk: &str, user: &str) -> String {
        self.k(&["za", kind.tag(), rk, user])
    }
    /// Cards of a raw stage with no owner and no conversation assignee.
    pub fn stage_unassigned(&self, kind: CardKind, rk: &str) -> String {
        self.k(&["zu", kind.tag(), rk])
    }
    pub fn stage_source(&self, kind: CardKind, rk: &str, source: &str) -> String {
        self.k(&["zs", kind.tag(), rk, source])
    }
    pub fn stage_bulk(&self, kind: CardKind, rk: &str) -> String {
        self.k(&["zb", kind.tag(), rk])
    }
    /// Cards of a raw stage whose contact has at least one message (score = createdAt).
    pub fn stage_answered(&self, kind: CardKind, rk: &str) -> String {
        self.k(&["zm", kind.tag(), rk])
    }
    /// Cards of a raw stage whose contact has no message (unanswered); score = createdAt.
    pub fn stage_unanswered(&self, kind: CardKind, rk: &str) -> String {
        self.k(&["zn", kind.tag(), rk])
    }
    /// The same cards scored by their contact's last message time.
    pub fn stage_last_message(&self, kind: CardKind, rk: &str) -> String {
        self.k(&["zl", kind.tag(), rk])
    }
    /// Search index: card ids whose lower-cased name or phone fields contain the trigram.
    pub fn trigram(&self, kind: CardKind, gram: &str) -> String {
        self.k(&["tri", kind.tag(), gram])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_keys_of_an_org_share_one_hash_tag() {
        let o = KeySpace::new("pb").org("64f0a1b2c3d4e5f6a7b8c9d1");
        let rk = raw_stage_key(Some("p1"), None, Some("Won {big}")).unwrap();
        for key in [o.versions(), o.stage_person(CardKind::Contact, &rk, "u1"), o.trigram(CardKind::Application, "}{x")] {
            let open = key.find('{').unwrap();
            let close = open + key[open..].find('}').unwrap();
            assert_eq!(&key[open + 1..close], "64f0a1b2c3d4e5f6a7b8c9d1", "{key}");
        }
        assert_eq!(o.stage(CardKind::Contact, &rk), "pb:{64f0a1b2c3d4e5f6a7b8c9d1}:z:c:p1|n:Won {big}");
    }

    #[test]
    fn raw_stage_key_prefers_the_stage_id() {
        assert_eq!(raw_stage_key(Some("p"), Some("s"), Some("New")).as_deref(), Some("p|s:s"));
        assert_eq!(raw_stage_key(None, None, Some("New")).as_deref(), Some("-|n:New"));
        assert_eq!(raw_stage_key(Some("p"), None, None), None);
    }
}
