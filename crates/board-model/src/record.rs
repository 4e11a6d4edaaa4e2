//! What the projection stores per document, and the domain rules that derive a card's place on
//! the board from it. This is the one Rust home of those rules: the projector writes with them,
//! the API's in-memory index reads with them, and `verify` recomputes them from MongoDB.
//!
//! - which contact a card shows: `CardRecord::contact_id` (itself for a contact, `contactId` for
//!   an application);
//! - its derived fields: `ContactState::derived` (the sorted union of the contact's conversation
//!   assignees and its message times, whose maximum is `lastMessageAt`);
//! - which raw stage it sits in: `keys::raw_stage_key` (buckets are unions of raw stages, resolved
//!   at read time by `BoardPlan::raw_keys`, so a pipeline change rewrites no card);
//! - its index entries: `index_entries`.
use crate::card::StoredCard;
use crate::keys::{raw_stage_key, OrgKeys};
use crate::model::{CardDoc, CardKind};
use crate::time::Millis;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, config()).expect("records always encode")
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(b, config()).map(|(v, _)| v)
}

/// What a card shows that comes from other documents: its contact's conversations and messages.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Derived {
    /// Union of the assignees of the contact's conversations, sorted, distinct.
    pub assignees: Vec<String>,
    /// The distinct `createdAt` of the contact's messages, ascending. Distinct times (not message
    /// ids) are enough for every rule: a duplicate delivery adds nothing, `lastMessageAt` is the
    /// last one, "has a message in [start, end]" and "has a message since t" need only the times.
    pub message_times: Vec<Millis>,
}

impl Derived {
    pub fn last_message_at(&self) -> Option<Millis> {
        self.message_times.last().copied()
    }
    /// `messageStatus: answered`: the contact has at least one message with a `createdAt` (any
    /// direction; a message event without one is not applied); `unanswered` is its negation. The sorted-set path keeps the unanswered cards in
    /// their own sets (`index_entries`); the MongoDB path asks `messages` for the contacts.
    pub fn answered(&self) -> bool {
        !self.message_times.is_empty()
    }
    pub fn has_message_between(&self, start: Option<Millis>, end: Option<Millis>) -> bool {
        has_message_between(&self.message_times, start, end)
    }
}

/// "has at least one message with start <= createdAt <= end" (`lastMessageDateRange`), over
/// ascending message times.
pub fn has_message_between(times: &[Millis], start: Option<Millis>, end: Option<Millis>) -> bool {
    let from = times.partition_point(|t| start.is_some_and(|s| *t < s));
    times.get(from).is_some_and(|t| end.is_none_or(|e| *t <= e))
}

/// "has no message with createdAt >= since" (`lastMessageTimeRange`; no messages at all
/// matches), over ascending message times.
pub fn quiet_since(times: &[Millis], since: Millis) -> bool {
    times.last().is_none_or(|t| *t < since)
}

/// One card (contact or application) in hash `K:card:<kind>`, field = card id. A deleted card
/// keeps a record without `card`: its version is the tombstone a late, older upsert loses to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardRecord {
    pub version: i64,
    pub card: Option<StoredCard>,
    pub derived: Derived,
}

impl CardRecord {
    pub fn live(doc: &CardDoc, derived: Derived) -> Self {
        CardRecord { version: crate::version::version_of(doc.version), card: Some(StoredCard::from_doc(doc)), derived }
    }
    pub fn tombstone(version: i64) -> Self {
        CardRecord { version, card: None, derived: Derived::default() }
    }
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, bincode::error::DecodeError> {
        decode(b)
    }
    /// `ownerFilter: unassigned`: a live card without an owner whose contact has no conversation
    /// assignee (its creator does not count). The MongoDB path asks the same: `owner` null and
    /// the contact not among those with an assigned conversation.
    pub fn unassigned(&self) -> bool {
        self.card.as_ref().is_some_and(|c| c.owner.is_none()) && self.derived.assignees.is_empty()
    }
    /// Everyone `my`, `owner` and `team` look for: creator, owner and conversation assignees.
    pub fn people(&self) -> BTreeSet<&str> {
        let mut out: BTreeSet<&str> = self.derived.assignees.iter().map(String::as_str).collect();
        if let Some(c) = &self.card {
            out.extend(c.created_by.as_deref());
            out.extend(c.owner.as_deref());
        }
        out
    }
}

/// What the projection knows about one contact from other topics, in hash `K:cs`, field =
/// contact id. It exists whether or not the contact's own card has arrived yet (topics are
/// unordered), and is what the contact's cards derive their `Derived` from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContactState {
    /// conversation id -> its assignees (sorted, distinct)
    pub conversations: BTreeMap<String, Vec<String>>,
    /// distinct message times, ascending
    pub message_times: Vec<Millis>,
    /// the ids of the applications whose card shows this contact
    pub applications: BTreeSet<String>,
}

impl ContactState {
    pub fn derived(&self) -> Derived {
        let assignees: BTreeSet<&String> = self.conversations.values().flatten().collect();
        Derived { assignees: assignees.into_iter().cloned().collect(), message_times: self.message_times.clone() }
    }
    /// Adds a message time; false when it was known (nothing changes).
    pub fn add_message(&mut self, at: Millis) -> bool {
        match self.message_times.binary_search(&at) {
            Ok(_) => false,
            Err(i) => {
                self.message_times.insert(i, at);
                true
            }
        }
    }
    pub fn is_empty(&self) -> bool {
        self.conversations.is_empty() && self.message_times.is_empty() && self.applications.is_empty()
    }
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, bincode::error::DecodeError> {
        decode(b)
    }
}

/// One conversation in hash `K:conv`: its version and which contact it belongs to now (so that a
/// conversation moved to another contact can be taken off the first one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationRecord {
    pub version: i64,
    pub contact_id: Option<String>,
}

impl ConversationRecord {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, bincode::error::DecodeError> {
        decode(b)
    }
}

/// The score of every createdAt-ordered set: millis, `-inf` for a card without `createdAt` (it
/// sorts last, and no created range matches it).
pub fn created_score(card: &StoredCard) -> f64 {
    card.created_at.map(|ms| ms as f64).unwrap_or(f64::NEG_INFINITY)
}

/// The sorted-set entries (key, score) of a card: with them a board whose filters are any of
/// none, one person (`my`, one owner, a user id) and `unanswered`, with or without a created
/// range, is a range read of one set per raw stage. Every other filter is answered by the API's
/// in-memory index (board-api query/index.rs), off Redis' thread.
///
/// | key | cards |
/// |---|---|
/// | `z:k:rk` | all of the raw stage |
/// | `zn:k:rk` | those without any message |
/// | `zp:k:rk:user` | those where the user is creator, owner or conversation assignee |
/// | `zpn:k:rk:user` | the same, without any message |
pub fn index_entries(keys: &OrgKeys, kind: CardKind, rec: &CardRecord) -> Vec<(String, f64)> {
    let Some(card) = &rec.card else { return Vec::new() };
    let Some(rk) = raw_stage_key(card.pipeline_id.as_deref(), card.pipeline_stage.as_deref(), card.status.as_deref()) else {
        return Vec::new();
    };
    let score = created_score(card);
    let unanswered = !rec.derived.answered();
    let people = rec.people();
    let mut out = Vec::with_capacity(2 + 2 * people.len());
    out.push((keys.stage(kind, &rk), score));
    if unanswered {
        out.push((keys.stage_unanswered(kind, &rk), score));
    }
    for u in people {
        out.push((keys.stage_person(kind, &rk, u), score));
        if unanswered {
            out.push((keys.stage_person_unanswered(kind, &rk, u), score));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(id: &str) -> CardDoc {
        CardDoc {
            id: id.into(),
            org_id: "64f0a1b2c3d4e5f6a7b8c9d2".into(),
            pipeline_id: Some("p".into()),
            pipeline_stage: Some("s".into()),
            created_by: Some("u1".into()),
            owner: Some("u1".into()),
            created_at: Some(5),
            version: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn derived_is_the_union_of_assignees_and_the_message_times() {
        let mut cs = ContactState::default();
        cs.conversations.insert("v1".into(), vec!["b".into(), "a".into()]);
        cs.conversations.insert("v2".into(), vec!["a".into(), "c".into()]);
        assert!(cs.add_message(10));
        assert!(cs.add_message(3));
        assert!(!cs.add_message(10), "a duplicate delivery changes nothing");
        let d = cs.derived();
        assert_eq!(d.assignees, vec!["a", "b", "c"]);
        assert_eq!(d.last_message_at(), Some(10));
        assert!(d.has_message_between(Some(4), Some(10)));
        assert!(d.has_message_between(None, Some(3)));
        assert!(!d.has_message_between(Some(4), Some(9)));
        assert!(!d.has_message_between(Some(11), None));
    }

    #[test]
    fn entries_follow_people_and_messages() {
        let keys = crate::keys::KeySpace::new("pb").org("64f0a1b2c3d4e5f6a7b8c9d1");
        let rec = CardRecord::live(&card("c1"), Derived { assignees: vec!["u2".into()], message_times: vec![] });
        let names: Vec<String> = index_entries(&keys, CardKind::Contact, &rec).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                "pb:{64f0a1b2c3d4e5f6a7b8c9d1}:z:c:p|s:s",
                "pb:{64f0a1b2c3d4e5f6a7b8c9d1}:zn:c:p|s:s",
                "pb:{64f0a1b2c3d4e5f6a7b8c9d1}:zp:c:p|s:s:u1",
                "pb:{64f0a1b2c3d4e5f6a7b8c9d1}:zpn:c:p|s:s:u1",
                "pb:{64f0a1b2c3d4e5f6a7b8c9d1}:zp:c:p|s:s:u2",
                "pb:{64f0a1b2c3d4e5f6a7b8c9d1}:zpn:c:p|s:s:u2",
            ]
        );
        let answered = CardRecord::live(&card("c1"), Derived { assignees: vec![], message_times: vec![7] });
        assert_eq!(index_entries(&keys, CardKind::Contact, &answered).len(), 2, "all + one person, no unanswered sets");
        assert!(index_entries(&keys, CardKind::Contact, &CardRecord::tombstone(3)).is_empty());
    }

    #[test]
    fn unassigned_means_no_owner_and_no_conversation_assignee() {
        let unowned = CardDoc { owner: None, ..card("c1") };
        assert!(CardRecord::live(&unowned, Derived::default()).unassigned(), "the creator does not count");
        assert!(!CardRecord::live(&card("c1"), Derived::default()).unassigned(), "an owner");
        assert!(!CardRecord::live(&unowned, Derived { assignees: vec!["u2".into()], message_times: vec![] }).unassigned());
        assert!(!CardRecord::tombstone(1).unassigned(), "a deleted card is on no board");
    }

    #[test]
    fn answered_means_any_message() {
        assert!(!Derived::default().answered());
        assert!(Derived { assignees: vec![], message_times: vec![0] }.answered());
    }

    #[test]
    fn records_round_trip() {
        let rec = CardRecord::live(&card("c1"), Derived { assignees: vec!["u2".into()], message_times: vec![1, 2] });
        assert_eq!(CardRecord::decode(&rec.encode()).unwrap(), rec);
        let conv = ConversationRecord { version: i64::MAX, contact_id: Some("c".into()) };
        assert_eq!(ConversationRecord::decode(&conv.encode()).unwrap(), conv);
    }
}
