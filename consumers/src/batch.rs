//! The projector's batch step, pure: the events of one org and the stored values they depend on
//! in, the writes and each event's outcome out. No I/O here: `apply.rs` reads what a step asks
//! for and commits what it returns.
//!
//! A step runs the events in order against an in-memory working copy of every record they
//! touch, so repeated changes to one document inside a batch coalesce into one final write, and
//! nothing is re-read from Redis that the batch already knows. When it needs a value that was not
//! read yet, it says which (`Step::Need`), the caller reads all of them in one round trip and runs
//! the step again (from scratch: it is pure). Everything it read becomes a guard of the commit,
//! so a concurrent projector changing one of those values makes the commit a conflict instead of
//! a lost update.
use board_model::events::Event;
use board_model::keys::{Changed, OrgKeys, VersionField};
use board_model::model::{CardDoc, CardKind, Conversation, Pipeline, User};
use board_model::record::{index_entries, CardRecord, ContactState, ConversationRecord};
use board_model::version::{supersedes, version_of};
use board_redis::functions::{Commit, Guard, Write};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One field of one Redis hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    pub key: String,
    pub field: String,
}

/// What was read so far: hash -> field -> value (None: absent). Nested so that a lookup by
/// `&str` allocates nothing.
#[derive(Debug, Default, Clone)]
pub struct Snapshot(HashMap<String, HashMap<String, Option<Vec<u8>>>>);

impl Snapshot {
    pub fn new() -> Self {
        Snapshot::default()
    }
    /// None: not read yet; Some(None): read, absent.
    pub fn get(&self, key: &str, field: &str) -> Option<Option<&[u8]>> {
        self.0.get(key)?.get(field).map(Option::as_deref)
    }
    pub fn insert(&mut self, slot: Slot, value: Option<Vec<u8>>) {
        self.0.entry(slot.key).or_default().insert(slot.field, value);
    }
    pub fn remove(&mut self, key: &str, field: &str) {
        if let Some(m) = self.0.get_mut(key) {
            m.remove(field);
        }
    }
    fn value(&self, key: &str, field: &str) -> Option<&[u8]> {
        self.get(key, field).flatten()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event changed the projection.
    Applied,
    /// Older than, or a duplicate of, what is applied: nothing changed.
    Stale,
}

#[derive(Debug)]
pub enum Step {
    /// Read these and run the step again.
    Need(Vec<Slot>),
    /// The commit (None: nothing to write; boxed: a step is mostly `Need`) and one outcome per
    /// event, in order.
    Done { commit: Option<Box<Commit>>, outcomes: Vec<Outcome>, undecodable: usize },
}

/// Runs the events of one org (all with this org's keys) against `snap`.
pub fn step(keys: &OrgKeys, events: &[&Event], snap: &Snapshot) -> Step {
    let mut w = Working {
        keys,
        names: Names::new(keys),
        snap,
        missing: BTreeSet::new(),
        read: Vec::new(),
        undecodable: 0,
        cards: BTreeMap::new(),
        contacts: BTreeMap::new(),
        conversations: BTreeMap::new(),
        versions: BTreeMap::new(),
        users: BTreeMap::new(),
        pipelines: BTreeMap::new(),
    };
    let outcomes: Vec<Outcome> = events.iter().map(|e| w.apply(e)).collect();
    if !w.missing.is_empty() {
        return Step::Need(w.missing.into_iter().collect());
    }
    let undecodable = w.undecodable;
    let commit = w.into_commit().map(Box::new);
    Step::Done { commit, outcomes, undecodable }
}

/// The org's hash names, built once per step (each lookup would build them again).
struct Names {
    cards: [String; 2],
    contacts: String,
    conversations: String,
    versions: String,
    users: String,
}

impl Names {
    fn new(keys: &OrgKeys) -> Self {
        Names {
            cards: [keys.cards(CardKind::Contact), keys.cards(CardKind::Application)],
            contacts: keys.contact_states(),
            conversations: keys.conversations(),
            versions: keys.versions(),
            users: keys.users(),
        }
    }
    fn cards(&self, kind: CardKind) -> &str {
        &self.cards[kind as usize]
    }
}

struct Working<'a> {
    keys: &'a OrgKeys,
    names: Names,
    snap: &'a Snapshot,
    /// Slots the step needed and the snapshot lacks.
    missing: BTreeSet<Slot>,
    /// Slots the step read: the commit's guards (each once: every accessor caches its values).
    read: Vec<Slot>,
    undecodable: usize,
    /// Each card touched: (its record as read, its record now).
    cards: BTreeMap<(CardKind, String), (Option<CardRecord>, Option<CardRecord>)>,
    contacts: BTreeMap<String, ContactState>,
    conversations: BTreeMap<String, Option<ConversationRecord>>,
    /// `K:ver` fields of pipelines and users
    versions: BTreeMap<String, Option<i64>>,
    /// user id -> (team ids stored before the batch, team ids now)
    users: BTreeMap<String, (Vec<String>, Vec<String>)>,
    pipelines: BTreeMap<String, Option<Pipeline>>,
}

impl<'a> Working<'a> {
    /// The stored bytes of a slot; None when absent or not read yet (then it is asked for).
    fn raw(&mut self, key: String, field: &str) -> Option<&'a [u8]> {
        let snap: &'a Snapshot = self.snap;
        match snap.get(&key, field) {
            Some(v) => {
                self.read.push(Slot { key, field: field.to_string() });
                v
            }
            None => {
                self.missing.insert(Slot { key, field: field.to_string() });
                None
            }
        }
    }

    fn decoded<T>(&mut self, key: String, field: &str, decode: impl Fn(&[u8]) -> Option<T>) -> Option<T> {
        let raw = self.raw(key, field)?;
        let v = decode(raw);
        if v.is_none() {
            // Written by an older model: the new value replaces it.
            self.undecodable += 1;
        }
        v
    }

    fn card(&mut self, kind: CardKind, id: &str) -> Option<CardRecord> {
        let k = (kind, id.to_string());
        if let Some((_, now)) = self.cards.get(&k) {
            return now.clone();
        }
        let v = self.decoded(self.names.cards(kind).to_string(), id, |b| CardRecord::decode(b).ok());
        self.cards.insert(k, (v.clone(), v.clone()));
        v
    }

    /// Sets a card's record (it was read by `card` first).
    fn set_card(&mut self, kind: CardKind, id: &str, rec: CardRecord) {
        if let Some((_, now)) = self.cards.get_mut(&(kind, id.to_string())) {
            *now = Some(rec);
        }
    }

    fn contact(&mut self, cid: &str) -> &mut ContactState {
        if !self.contacts.contains_key(cid) {
            let v = self.decoded(self.names.contacts.clone(), cid, |b| ContactState::decode(b).ok()).unwrap_or_default();
            self.contacts.insert(cid.to_string(), v);
        }
        self.contacts.get_mut(cid).expect("inserted above")
    }

    fn conversation(&mut self, id: &str) -> Option<ConversationRecord> {
        if let Some(v) = self.conversations.get(id) {
            return v.clone();
        }
        let v = self.decoded(self.names.conversations.clone(), id, |b| ConversationRecord::decode(b).ok());
        self.conversations.insert(id.to_string(), v.clone());
        v
    }

    fn version(&mut self, field: &str) -> Option<i64> {
        if let Some(v) = self.versions.get(field) {
            return *v;
        }
        let v = self.decoded(self.names.versions.clone(), field, |b| std::str::from_utf8(b).ok()?.parse().ok());
        self.versions.insert(field.to_string(), v);
        v
    }

    /// Applies a versioned change of `field` if `version` is newer; false if stale.
    fn newer(&mut self, doc: VersionField, version: i64) -> bool {
        let field = doc.field();
        if !supersedes(version, self.version(&field)) {
            return false;
        }
        self.versions.insert(field, Some(version));
        true
    }

    fn apply(&mut self, event: &Event) -> Outcome {
        let applied = match event {
            Event::CardUpserted(kind, doc) => self.upsert_card(*kind, doc),
            Event::CardDeleted { kind, id, version, .. } => self.delete_card(*kind, id, *version),
            Event::ConversationUpserted(c) => self.upsert_conversation(c),
            Event::MessageCreated(m) => match (&m.contact_id, m.created_at) {
                (Some(cid), Some(at)) => {
                    let added = self.contact(cid).add_message(at);
                    if added {
                        self.refresh(cid);
                    }
                    added
                }
                // parse_event requires both; nothing to apply without them.
                _ => false,
            },
            Event::PipelineUpserted(p) => {
                let fresh = self.newer(VersionField::Pipeline(&p.id), version_of(p.version));
                if fresh {
                    self.pipelines.insert(p.id.clone(), Some(p.clone()));
                }
                fresh
            }
            Event::PipelineDeleted { id, version, .. } => {
                let fresh = self.newer(VersionField::Pipeline(id), *version);
                if fresh {
                    self.pipelines.insert(id.clone(), None);
                }
                fresh
            }
            Event::UserUpserted(u) => self.upsert_user(u),
        };
        if applied {
            Outcome::Applied
        } else {
            Outcome::Stale
        }
    }

    fn upsert_card(&mut self, kind: CardKind, doc: &CardDoc) -> bool {
        let current = self.card(kind, &doc.id);
        if !supersedes(version_of(doc.version), current.as_ref().map(|r| r.version)) {
            return false;
        }
        if kind == CardKind::Application {
            let old = current.as_ref().and_then(|r| r.card.as_ref()).and_then(|c| c.contact_id.clone());
            if let Some(old) = old.filter(|o| Some(o) != doc.contact_id.as_ref()) {
                self.contact(&old).applications.remove(&doc.id);
            }
            if let Some(cid) = &doc.contact_id {
                self.contact(cid).applications.insert(doc.id.clone());
            }
        }
        let cid = kind.shown_contact(&doc.id, doc.contact_id.as_deref());
        let derived = cid.map(|c| self.contact(c).derived()).unwrap_or_default();
        self.set_card(kind, &doc.id, CardRecord::live(doc, derived));
        true
    }

    fn delete_card(&mut self, kind: CardKind, id: &str, version: i64) -> bool {
        let current = self.card(kind, id);
        if !supersedes(version, current.as_ref().map(|r| r.version)) {
            return false;
        }
        if kind == CardKind::Application {
            if let Some(cid) = current.as_ref().and_then(|r| r.card.as_ref()).and_then(|c| c.contact_id.clone()) {
                self.contact(&cid).applications.remove(id);
            }
        }
        self.set_card(kind, id, CardRecord::tombstone(version));
        true
    }

    fn upsert_conversation(&mut self, c: &Conversation) -> bool {
        let version = version_of(c.version);
        let current = self.conversation(&c.id);
        if !supersedes(version, current.as_ref().map(|r| r.version)) {
            return false;
        }
        let mut assignees = c.assignees.clone().unwrap_or_default();
        assignees.sort();
        assignees.dedup();
        if let Some(old) = current.and_then(|r| r.contact_id).filter(|o| Some(o) != c.contact_id.as_ref()) {
            self.contact(&old).conversations.remove(&c.id);
            self.refresh(&old);
        }
        if let Some(cid) = &c.contact_id {
            self.contact(cid).conversations.insert(c.id.clone(), assignees);
            self.refresh(cid);
        }
        self.conversations.insert(c.id.clone(), Some(ConversationRecord { version, contact_id: c.contact_id.clone() }));
        true
    }

    /// Re-derives the cards that show contact `cid` (its own and its applications').
    fn refresh(&mut self, cid: &str) {
        let state = self.contact(cid);
        let derived = state.derived();
        let apps: Vec<String> = state.applications.iter().cloned().collect();
        let cards = std::iter::once((CardKind::Contact, cid.to_string())).chain(apps.into_iter().map(|a| (CardKind::Application, a)));
        for (kind, id) in cards {
            if let Some(mut rec) = self.card(kind, &id).filter(|r| r.card.is_some()) {
                if rec.derived != derived {
                    rec.derived = derived.clone();
                    self.set_card(kind, &id, rec);
                }
            }
        }
    }

    fn upsert_user(&mut self, u: &User) -> bool {
        if !self.newer(VersionField::User(&u.id), version_of(u.version)) {
            return false;
        }
        let mut teams = u.team_ids.clone().unwrap_or_default();
        teams.sort();
        teams.dedup();
        if let Some(entry) = self.users.get_mut(&u.id) {
            entry.1 = teams;
        } else {
            let old: Vec<String> = self.decoded(self.names.users.clone(), &u.id, |b| serde_json::from_slice(b).ok()).unwrap_or_default();
            self.users.insert(u.id.clone(), (old, teams));
        }
        true
    }

    /// The writes that take Redis from what was read to the working copy.
    fn into_commit(mut self) -> Option<Commit> {
        let keys = self.keys;
        let mut writes = Vec::new();
        let mut changed: Vec<String> = Vec::new();
        let cards = std::mem::take(&mut self.cards);
        for ((kind, id), (old, new)) in cards {
            if old == new {
                continue;
            }
            let Some(new) = new else { continue };
            let key = self.names.cards(kind).to_string();
            let old_entries: HashMap<String, f64> =
                old.as_ref().map(|o| index_entries(keys, kind, o)).unwrap_or_default().into_iter().collect();
            let new_entries: HashMap<String, f64> = index_entries(keys, kind, &new).into_iter().collect();
            for k in old_entries.keys().filter(|k| !new_entries.contains_key(*k)) {
                writes.push(Write::ZRem { key: k.clone(), member: id.clone() });
            }
            for (k, score) in &new_entries {
                if old_entries.get(k) != Some(score) {
                    writes.push(Write::ZAdd { key: k.clone(), score: *score, member: id.clone() });
                }
            }
            writes.push(Write::HSet { key, field: id.clone(), value: new.encode() });
            changed.push(Changed::Card(kind, id).line());
        }
        for (cid, state) in std::mem::take(&mut self.contacts) {
            let key = &self.names.contacts;
            let new = (!state.is_empty()).then(|| state.encode());
            if self.snap.value(key, &cid) != new.as_deref() {
                writes.push(match new {
                    Some(value) => Write::HSet { key: key.clone(), field: cid, value },
                    None => Write::HDel { key: key.clone(), field: cid },
                });
            }
        }
        for (id, rec) in std::mem::take(&mut self.conversations) {
            let key = &self.names.conversations;
            let Some(new) = rec.map(|r| r.encode()) else { continue };
            if self.snap.value(key, &id) != Some(new.as_slice()) {
                writes.push(Write::HSet { key: key.clone(), field: id, value: new });
            }
        }
        for (field, v) in std::mem::take(&mut self.versions) {
            let key = &self.names.versions;
            let Some(new) = v.map(|v| v.to_string().into_bytes()) else { continue };
            if self.snap.value(key, &field) != Some(new.as_slice()) {
                writes.push(Write::HSet { key: key.clone(), field, value: new });
            }
        }
        for (id, p) in std::mem::take(&mut self.pipelines) {
            writes.push(match p {
                Some(p) => Write::HSet { key: keys.pipelines(), field: id, value: serde_json::to_vec(&p).expect("pipelines serialize") },
                None => Write::HDel { key: keys.pipelines(), field: id },
            });
        }
        let users = std::mem::take(&mut self.users);
        for (id, (old, teams)) in users {
            for t in old.iter().filter(|t| !teams.contains(t)) {
                writes.push(Write::SRem { key: keys.team(t), member: id.clone() });
            }
            for t in teams.iter().filter(|t| !old.contains(t)) {
                writes.push(Write::SAdd { key: keys.team(t), member: id.clone() });
            }
            let value = serde_json::to_vec(&teams).expect("ids serialize");
            writes.push(Write::HSet { key: self.names.users.clone(), field: id.clone(), value });
            changed.push(Changed::User(id.clone()).line());
        }
        if writes.is_empty() {
            return None;
        }
        if !changed.is_empty() {
            writes.push(Write::XAdd { key: keys.changes(), field: "ids".into(), value: changed.join("\n").into_bytes() });
        }
        let mut read = std::mem::take(&mut self.read);
        read.sort_unstable();
        read.dedup();
        let guards = read
            .into_iter()
            .map(|s| {
                let expected = self.snap.value(&s.key, &s.field).map(<[u8]>::to_vec);
                Guard { key: s.key, field: s.field, expected }
            })
            .collect();
        Some(Commit { org: keys.clone(), guards, writes, generation: None, offsets: Vec::new(), min_writes: None })
    }
}
