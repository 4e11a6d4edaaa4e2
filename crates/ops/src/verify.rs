//! `pipeline-board verify`: recomputes, from what MongoDB holds, every record and index entry the
//! projection should have, reads what Redis has, and lists the differences.
//!
//! The expected values are computed from MongoDB documents with the same domain rules the
//! projector uses (`record.rs`), but along a different road: from whole collections at once
//! rather than event by event, so a bug in the event handling (ordering, versions, coalescing,
//! moves between contacts) shows up as drift.
use board_model::keys::{KeySpace, OrgKeys, VersionField};
use board_model::model::{CardKind, Pipeline};
use board_model::record::{index_entries, CardRecord, ContactState, ConversationRecord};
use board_mongo::{self, OrgSnapshot};
use board_redis::LiveOrg;
use redis::AsyncCommands;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// key -> member -> score
type Entries = BTreeMap<String, BTreeMap<String, f64>>;

#[derive(Debug, Default, Clone)]
pub struct DriftReport {
    pub orgs: usize,
    /// Card records compared (contacts and applications): body, version, derived fields.
    pub cards: usize,
    pub index_keys: usize,
    /// Contact states (conversations with their assignees, message times, applications).
    pub contact_states: usize,
    pub messages: usize,
    pub conversations: usize,
    /// Applied versions of documents MongoDB has (tombstones of deleted ones cannot be checked).
    pub versions: usize,
    pub users: usize,
    pub teams: usize,
    pub pipelines: usize,
    pub drift_count: usize,
    /// The first differences, human readable.
    pub samples: Vec<String>,
}

impl DriftReport {
    /// One line naming everything that was compared.
    pub fn summary(&self) -> String {
        format!(
            "verified {} orgs: {} card records, {} index keys, {} contact states ({} messages), {} conversations, {} versions, \
             {} users, {} teams, {} pipelines: {} differences",
            self.orgs,
            self.cards,
            self.index_keys,
            self.contact_states,
            self.messages,
            self.conversations,
            self.versions,
            self.users,
            self.teams,
            self.pipelines,
            self.drift_count
        )
    }

    fn drift(&mut self, what: String) {
        self.drift_count += 1;
        if self.samples.len() < 50 {
            self.samples.push(what);
        }
    }
    pub fn is_clean(&self) -> bool {
        self.drift_count == 0
    }
}

/// The contact states MongoDB implies: conversations, distinct message times, applications.
pub fn expected_contact_states(snap: &OrgSnapshot) -> BTreeMap<String, ContactState> {
    let mut out: BTreeMap<String, ContactState> = BTreeMap::new();
    for c in &snap.conversations {
        if let Some(cid) = &c.contact_id {
            let mut asg = c.assignees.clone().unwrap_or_default();
            asg.sort();
            asg.dedup();
            out.entry(cid.clone()).or_default().conversations.insert(c.id.clone(), asg);
        }
    }
    for m in &snap.messages {
        if let (Some(cid), Some(at)) = (&m.contact_id, m.created_at) {
            out.entry(cid.clone()).or_default().add_message(at);
        }
    }
    for a in &snap.applications {
        if let Some(cid) = &a.contact_id {
            out.entry(cid.clone()).or_default().applications.insert(a.id.clone());
        }
    }
    out
}

async fn actual_entries(conn: &mut board_redis::redis_conn::RedisConn, keys: &OrgKeys) -> redis::RedisResult<Entries> {
    let names: Vec<String> = conn.scan_match(&keys.index_pattern()).await?;
    let mut out = Entries::new();
    for name in names {
        let m: Vec<(String, f64)> = conn.zrange_withscores(&name, 0, -1).await?;
        out.insert(name, m.into_iter().collect());
    }
    Ok(out)
}

pub async fn verify_org(
    conn: &mut board_redis::redis_conn::RedisConn,
    keyspace: &KeySpace,
    db: &mongodb::Database,
    org: &str,
    report: &mut DriftReport,
) -> anyhow::Result<()> {
    let snap = board_mongo::load_org(db, org).await?;
    let keys = keyspace.live_org(conn, org).await?;
    let states = expected_contact_states(&snap);
    let none = ContactState::default();

    let mut expected = Entries::new();
    for (kind, cards) in [(CardKind::Contact, &snap.contacts), (CardKind::Application, &snap.applications)] {
        let stored: HashMap<String, Vec<u8>> = conn.hgetall(keys.cards(kind)).await?;
        let mut live_in_mongo = BTreeSet::new();
        for card in cards {
            report.cards += 1;
            live_in_mongo.insert(card.id.as_str());
            let cid = kind.shown_contact(&card.id, card.contact_id.as_deref());
            let want = CardRecord::live(card, cid.and_then(|c| states.get(c)).unwrap_or(&none).derived());
            for (key, score) in index_entries(&keys, kind, &want) {
                expected.entry(key).or_default().insert(card.id.clone(), score);
            }
            if card.version.is_some() {
                report.versions += 1;
            }
            match stored.get(&card.id).map(|b| CardRecord::decode(b)) {
                None => report.drift(format!("{kind:?} {} missing from the projection", card.id)),
                Some(Err(e)) => report.drift(format!("{kind:?} {} record does not decode: {e}", card.id)),
                Some(Ok(have)) if have.card.is_none() => report.drift(format!("{kind:?} {} is a tombstone in the projection", card.id)),
                Some(Ok(have)) => {
                    if have.card != want.card {
                        report.drift(format!("{kind:?} {} body differs from MongoDB", card.id));
                    }
                    if have.derived != want.derived {
                        report.drift(format!("{kind:?} {} derived fields {:?} differ from {:?}", card.id, have.derived, want.derived));
                    }
                    if card.version.is_some() && have.version != want.version {
                        report.drift(format!(
                            "version of {kind:?} {}: {} in the projection, {} in MongoDB",
                            card.id, have.version, want.version
                        ));
                    }
                }
            }
        }
        for (id, bytes) in &stored {
            let live = CardRecord::decode(bytes).map(|r| r.card.is_some()).unwrap_or(true);
            if live && !live_in_mongo.contains(id.as_str()) {
                report.drift(format!("{kind:?} {id} is in the projection, not in MongoDB"));
            }
        }
    }

    let actual = actual_entries(conn, &keys).await?;
    report.index_keys += expected.len();
    for (key, want) in &expected {
        match actual.get(key) {
            None => report.drift(format!("index {key} missing ({} members expected)", want.len())),
            Some(have) if have != want => {
                let missing: Vec<&String> = want.keys().filter(|m| !have.contains_key(*m)).take(3).collect();
                let extra: Vec<&String> = have.keys().filter(|m| !want.contains_key(*m)).take(3).collect();
                report.drift(format!(
                    "index {key}: {} members expected, {} found; missing {missing:?}, extra {extra:?}, or scores differ",
                    want.len(),
                    have.len()
                ));
            }
            Some(_) => {}
        }
    }
    for key in actual.keys().filter(|k| !expected.contains_key(*k)) {
        report.drift(format!("index {key} should not exist ({} members)", actual[key].len()));
    }

    let stored_states: HashMap<String, Vec<u8>> = conn.hgetall(keys.contact_states()).await?;
    for (cid, want) in &states {
        report.contact_states += 1;
        report.messages += want.message_times.len();
        match stored_states.get(cid).map(|b| ContactState::decode(b)) {
            Some(Ok(have)) if &have == want => {}
            other => report.drift(format!("contact state of {cid}: {other:?} in the projection, {want:?} from MongoDB")),
        }
    }
    for cid in stored_states.keys().filter(|c| !states.contains_key(*c)) {
        report.drift(format!("contact state of {cid} should not exist"));
    }

    let convs: HashMap<String, Vec<u8>> = conn.hgetall(keys.conversations()).await?;
    for c in &snap.conversations {
        report.conversations += 1;
        let Some(version) = c.version else { continue };
        report.versions += 1;
        let want = ConversationRecord { version, contact_id: c.contact_id.clone() };
        match convs.get(&c.id).map(|b| ConversationRecord::decode(b)) {
            Some(Ok(have)) if have == want => {}
            other => report.drift(format!("conversation {}: {other:?} in the projection, {want:?} from MongoDB", c.id)),
        }
    }
    if convs.len() != snap.conversations.len() {
        report.drift(format!("{} conversations in the projection, {} in MongoDB", convs.len(), snap.conversations.len()));
    }

    let pipelines: HashMap<String, String> = conn.hgetall(keys.pipelines()).await?;
    for p in &snap.pipelines {
        match pipelines.get(&p.id).map(|j| serde_json::from_str::<Pipeline>(j)) {
            Some(Ok(have)) if &have == p => {}
            _ => report.drift(format!("pipeline {} differs or is missing", p.id)),
        }
    }
    if pipelines.len() != snap.pipelines.len() {
        report.drift(format!("{} pipelines in the projection, {} in MongoDB", pipelines.len(), snap.pipelines.len()));
    }
    let mut teams: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for u in &snap.users {
        for t in u.team_ids.iter().flatten() {
            teams.entry(t.clone()).or_default().insert(u.id.clone());
        }
    }
    for (team, members) in teams {
        report.teams += 1;
        let have: BTreeSet<String> = conn.smembers(keys.team(&team)).await?;
        if have != members {
            report.drift(format!("team {team}: members {have:?}, MongoDB says {members:?}"));
        }
    }
    report.pipelines += snap.pipelines.len();
    verify_versions_and_users(conn, &keys, &snap, report).await?;
    report.orgs += 1;
    Ok(())
}

/// Verifies the given orgs (all orgs in MongoDB when empty).
pub async fn verify(
    conn: &mut board_redis::redis_conn::RedisConn,
    keyspace: &KeySpace,
    db: &mongodb::Database,
    orgs: &[String],
) -> anyhow::Result<DriftReport> {
    let orgs = if orgs.is_empty() { board_mongo::org_ids(db).await? } else { orgs.to_vec() };
    let mut report = DriftReport::default();
    for org in &orgs {
        verify_org(conn, keyspace, db, org, &mut report).await?;
    }
    Ok(report)
}

/// The applied version of every pipeline and user MongoDB has (equal to its `version`), and
/// each user's teams as stored.
async fn verify_versions_and_users(
    conn: &mut board_redis::redis_conn::RedisConn,
    keys: &OrgKeys,
    snap: &OrgSnapshot,
    report: &mut DriftReport,
) -> anyhow::Result<()> {
    let versions: HashMap<String, String> = conn.hgetall(keys.versions()).await?;
    let docs = snap
        .pipelines
        .iter()
        .map(|d| (VersionField::Pipeline(&d.id), d.version))
        .chain(snap.users.iter().map(|d| (VersionField::User(&d.id), d.version)));
    for (doc, version) in docs {
        let Some(version) = version else { continue };
        report.versions += 1;
        let field = doc.field();
        if versions.get(&field) != Some(&version.to_string()) {
            report.drift(format!("version of {field}: {:?} in the projection, {version} in MongoDB", versions.get(&field)));
        }
    }
    let users: HashMap<String, String> = conn.hgetall(keys.users()).await?;
    for u in &snap.users {
        report.users += 1;
        let mut want = u.team_ids.clone().unwrap_or_default();
        want.sort();
        want.dedup();
        match users.get(&u.id).map(|j| serde_json::from_str::<Vec<String>>(j)) {
            Some(Ok(have)) if have == want => {}
            other => report.drift(format!("user {}: teams {other:?} in the projection, {want:?} in MongoDB", u.id)),
        }
    }
    if users.len() != snap.users.len() {
        report.drift(format!("{} users in the projection, {} in MongoDB", users.len(), snap.users.len()));
    }
    Ok(())
}
