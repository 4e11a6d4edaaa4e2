//! `pipeline-board verify`: recomputes, from what MongoDB holds, every index entry and card body
//! the projection should have, reads what Redis has, and lists the differences.
//!
//! The expected entries are computed here in Rust, independently of the Lua that writes them, so
//! a bug in either shows up as drift.
use crate::mongo::{self, OrgSnapshot};
use board_core::card::{trigrams, CoreMeta, StoredCard};
use board_core::keys::{KeySpace, OrgKeys};
use board_core::model::{CardDoc, CardKind, Pipeline};
use redis::AsyncCommands;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// key -> member -> score (None for plain sets)
type Entries = BTreeMap<String, BTreeMap<String, Option<f64>>>;
/// contact id -> the members of one of its sets
type MembersOf = BTreeMap<String, BTreeSet<String>>;
/// The key of a contact's set
type KeyOf = fn(&OrgKeys, &str) -> String;

#[derive(Debug, Default, Clone)]
pub struct DriftReport {
    pub orgs: usize,
    /// Card bodies compared (contacts and applications).
    pub cards: usize,
    /// Card index metadata compared (stage key, scores, people, search text, assignees, last message).
    pub metas: usize,
    pub index_keys: usize,
    /// Per-contact message sets and the messages in them.
    pub message_sets: usize,
    pub messages: usize,
    /// Conversations, with the per-contact conversation and assignee sets.
    pub conversations: usize,
    /// Per-contact sets of application ids.
    pub application_sets: usize,
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
            "verified {} orgs: {} card bodies, {} card metadata, {} index keys, {} message sets ({} messages), {} conversations \
             (with their contact and assignee sets), {} application sets, {} versions, {} users, {} teams, {} pipelines: {} differences",
            self.orgs,
            self.cards,
            self.metas,
            self.index_keys,
            self.message_sets,
            self.messages,
            self.conversations,
            self.application_sets,
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

fn derived(snap: &OrgSnapshot) -> (HashMap<String, Vec<String>>, HashMap<String, i64>) {
    let mut assignees: HashMap<String, BTreeSet<String>> = HashMap::new();
    for c in &snap.conversations {
        if let Some(cid) = &c.contact_id {
            assignees.entry(cid.clone()).or_default().extend(c.assignees.iter().flatten().cloned());
        }
    }
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in &snap.messages {
        if let (Some(cid), Some(at)) = (&m.contact_id, m.created_at) {
            let e = last.entry(cid.clone()).or_insert(at);
            *e = (*e).max(at);
        }
    }
    (assignees.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect(), last)
}

/// The index entries of one card, as functions.lua `entries` defines them.
pub fn expected_entries(
    keys: &OrgKeys,
    kind: CardKind,
    card: &CardDoc,
    assignees: &[String],
    last_message: Option<i64>,
    out: &mut Entries,
) {
    let meta = CoreMeta::from_doc(kind, card);
    let created = meta.sc.map(|ms| ms as f64).unwrap_or(f64::NEG_INFINITY);
    let mut put = |key: String, score: Option<f64>| {
        out.entry(key).or_default().insert(card.id.clone(), score);
    };
    if let Some(rk) = &meta.rk {
        put(keys.stage(kind, rk), Some(created));
        let mut people: BTreeSet<&str> = assignees.iter().map(String::as_str).collect();
        people.extend(meta.cre.as_deref());
        people.extend(meta.own.as_deref());
        for u in assignees {
            put(keys.stage_assignee(kind, rk, u), Some(created));
        }
        for u in people {
            put(keys.stage_person(kind, rk, u), Some(created));
        }
        if meta.own.is_none() && assignees.is_empty() {
            put(keys.stage_unassigned(kind, rk), Some(created));
        }
        if let Some(src) = &meta.src {
            put(keys.stage_source(kind, rk, src), Some(created));
        }
        if meta.bulk {
            put(keys.stage_bulk(kind, rk), Some(created));
        }
        if let Some(lm) = last_message {
            put(keys.stage_answered(kind, rk), Some(created));
            put(keys.stage_last_message(kind, rk), Some(lm as f64));
        } else {
            put(keys.stage_unanswered(kind, rk), Some(created));
        }
    }
    let grams: BTreeSet<String> = meta.txt.iter().flat_map(|t| trigrams(t)).collect();
    for g in grams {
        put(keys.trigram(kind, &g), None);
    }
}

async fn actual_entries(conn: &mut redis::aio::ConnectionManager, keys: &OrgKeys) -> redis::RedisResult<Entries> {
    let mut names: Vec<String> = scan(conn, &format!("{}:z*", keys.base)).await?;
    names.extend(scan(conn, &format!("{}:tri:*", keys.base)).await?);
    let mut out = Entries::new();
    for name in names {
        let members: BTreeMap<String, Option<f64>> = if name[keys.base.len()..].starts_with(":tri:") {
            let m: Vec<String> = conn.smembers(&name).await?;
            m.into_iter().map(|id| (id, None)).collect()
        } else {
            let m: Vec<(String, f64)> = conn.zrange_withscores(&name, 0, -1).await?;
            m.into_iter().map(|(id, s)| (id, Some(s))).collect()
        };
        out.insert(name, members);
    }
    Ok(out)
}

pub async fn verify_org(
    conn: &mut redis::aio::ConnectionManager,
    keyspace: &KeySpace,
    db: &mongodb::Database,
    org: &str,
    report: &mut DriftReport,
) -> anyhow::Result<()> {
    let snap = mongo::load_org(db, org).await?;
    let keys = keyspace.org(org);
    let (assignees, last) = derived(&snap);
    let none: Vec<String> = Vec::new();

    let mut expected = Entries::new();
    for (kind, cards) in [(CardKind::Contact, &snap.contacts), (CardKind::Application, &snap.applications)] {
        let bodies: HashMap<String, Vec<u8>> = conn.hgetall(keys.bodies(kind)).await?;
        let mut seen = 0;
        for card in cards {
            report.cards += 1;
            let cid = match kind {
                CardKind::Contact => Some(card.id.clone()),
                CardKind::Application => card.contact_id.clone(),
            };
            let asg = cid.as_ref().and_then(|c| assignees.get(c)).unwrap_or(&none);
            let lm = cid.as_ref().and_then(|c| last.get(c)).copied();
            expected_entries(&keys, kind, card, asg, lm, &mut expected);
            match bodies.get(&card.id).map(|b| StoredCard::decode(b)) {
                None => report.drift(format!("{kind:?} {} missing from the projection", card.id)),
                Some(Err(e)) => report.drift(format!("{kind:?} {} body does not decode: {e}", card.id)),
                Some(Ok(body)) => {
                    seen += 1;
                    if body != StoredCard::from_doc(card) {
                        report.drift(format!("{kind:?} {} body differs from MongoDB", card.id));
                    }
                }
            }
        }
        if bodies.len() != seen {
            report.drift(format!("{} {kind:?} cards in the projection are not in MongoDB", bodies.len() - seen));
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
    verify_metas(conn, &keys, &snap, &assignees, &last, report).await?;
    verify_messages(conn, &keys, &snap, report).await?;
    verify_conversations(conn, &keys, &snap, report).await?;
    verify_versions_and_users(conn, &keys, &snap, report).await?;
    report.orgs += 1;
    Ok(())
}

/// Verifies the given orgs (all orgs in MongoDB when empty).
pub async fn verify(
    conn: &mut redis::aio::ConnectionManager,
    keyspace: &KeySpace,
    db: &mongodb::Database,
    orgs: &[String],
) -> anyhow::Result<DriftReport> {
    let orgs = if orgs.is_empty() { mongo::org_ids(db).await? } else { orgs.to_vec() };
    let mut report = DriftReport::default();
    for org in &orgs {
        verify_org(conn, keyspace, db, org, &mut report).await?;
    }
    Ok(report)
}

/// A msgpack value (as functions.lua writes it) as JSON, for comparison.
fn msgpack_to_json(v: rmpv::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        rmpv::Value::Nil => J::Null,
        rmpv::Value::Boolean(b) => J::Bool(b),
        rmpv::Value::Integer(i) => i.as_i64().map(J::from).or_else(|| i.as_u64().map(J::from)).unwrap_or(J::Null),
        // Lua numbers that are integral are written as floats by some paths: compare as integers.
        rmpv::Value::F32(f) => float_json(f as f64),
        rmpv::Value::F64(f) => float_json(f),
        rmpv::Value::String(s) => s.into_str().map(J::String).unwrap_or(J::Null),
        rmpv::Value::Binary(b) => J::String(String::from_utf8_lossy(&b).into_owned()),
        rmpv::Value::Array(a) => J::Array(a.into_iter().map(msgpack_to_json).collect()),
        // Lua writes an empty table as an empty map: the same as an empty list here.
        rmpv::Value::Map(m) if m.is_empty() => J::Array(Vec::new()),
        rmpv::Value::Map(m) => J::Object(m.into_iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), msgpack_to_json(v)))).collect()),
        rmpv::Value::Ext(..) => J::Null,
    }
}

fn float_json(f: f64) -> serde_json::Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        serde_json::Value::from(f as i64)
    } else {
        serde_json::Number::from_f64(f).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
    }
}

fn decode_msgpack(raw: &[u8]) -> Option<serde_json::Value> {
    rmpv::decode::read_value(&mut &raw[..]).ok().map(msgpack_to_json)
}

/// Every key of the org matching `pattern` (SCAN, never KEYS).
async fn scan(conn: &mut redis::aio::ConnectionManager, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let (mut cursor, mut names) = (0u64, Vec::new());
    loop {
        let (next, batch): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query_async(conn).await?;
        names.extend(batch);
        cursor = next;
        if cursor == 0 {
            return Ok(names);
        }
    }
}

/// The suffix of `key` after `<base>:<tag>:`.
fn suffix<'a>(key: &'a str, keys: &OrgKeys, tag: &str) -> &'a str {
    &key[keys.base.len() + tag.len() + 2..]
}

/// Each card's index metadata: what its index entries were computed from, and the derived
/// assignees and last message time the API shows.
async fn verify_metas(
    conn: &mut redis::aio::ConnectionManager,
    keys: &OrgKeys,
    snap: &OrgSnapshot,
    assignees: &HashMap<String, Vec<String>>,
    last: &HashMap<String, i64>,
    report: &mut DriftReport,
) -> anyhow::Result<()> {
    for (kind, cards) in [(CardKind::Contact, &snap.contacts), (CardKind::Application, &snap.applications)] {
        let metas: HashMap<String, Vec<u8>> = conn.hgetall(keys.metas(kind)).await?;
        for card in cards {
            report.metas += 1;
            let meta = CoreMeta::from_doc(kind, card);
            let mut want = serde_json::to_value(&meta)?;
            let cid = meta.cid.clone();
            let mut asg = cid.as_ref().and_then(|c| assignees.get(c)).cloned().unwrap_or_default();
            asg.sort();
            want["asg"] = serde_json::json!(asg);
            if let Some(lm) = cid.as_ref().and_then(|c| last.get(c)) {
                want["lm"] = serde_json::json!(lm);
            }
            match metas.get(&card.id).and_then(|raw| decode_msgpack(raw)) {
                None => report.drift(format!("{kind:?} {} has no readable metadata", card.id)),
                Some(have) if have != want => report.drift(format!("{kind:?} {} metadata {have} differs from {want}", card.id)),
                Some(_) => {}
            }
        }
        if metas.len() > cards.len() {
            report.drift(format!("{} {kind:?} metadata entries without a card in MongoDB", metas.len() - cards.len()));
        }
    }
    Ok(())
}

/// Per contact, the set of its messages (id -> createdAt); messages without a contact or a
/// createdAt are not projected (CONTRACT.md 2).
async fn verify_messages(
    conn: &mut redis::aio::ConnectionManager,
    keys: &OrgKeys,
    snap: &OrgSnapshot,
    report: &mut DriftReport,
) -> anyhow::Result<()> {
    let mut want: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for m in &snap.messages {
        if let (Some(cid), Some(at)) = (&m.contact_id, m.created_at) {
            want.entry(cid.clone()).or_default().insert(m.id.clone(), at as f64);
        }
    }
    let mut have_keys: BTreeSet<String> = scan(conn, &format!("{}:msgs:*", keys.base)).await?.into_iter().collect();
    for (cid, messages) in &want {
        report.message_sets += 1;
        report.messages += messages.len();
        let key = keys.messages_of(cid);
        have_keys.remove(&key);
        let have: BTreeMap<String, f64> = conn.zrange_withscores::<_, Vec<(String, f64)>>(&key, 0, -1).await?.into_iter().collect();
        if &have != messages {
            report.drift(format!(
                "messages of {cid}: {} in the projection, {} in MongoDB, or their times differ",
                have.len(),
                messages.len()
            ));
        }
    }
    for key in have_keys {
        report.drift(format!("message set {} has no messages in MongoDB", suffix(&key, keys, "msgs")));
    }
    Ok(())
}

/// Conversations (contact and sorted assignees), the per-contact conversation sets and assignee
/// unions, and the per-contact application sets.
async fn verify_conversations(
    conn: &mut redis::aio::ConnectionManager,
    keys: &OrgKeys,
    snap: &OrgSnapshot,
    report: &mut DriftReport,
) -> anyhow::Result<()> {
    let stored: HashMap<String, Vec<u8>> = conn.hgetall(keys.conversations()).await?;
    let mut convs_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut asg_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in &snap.conversations {
        report.conversations += 1;
        let mut asg = c.assignees.clone().unwrap_or_default();
        asg.sort();
        asg.dedup();
        let mut want = serde_json::json!({"asg": asg});
        if let Some(cid) = &c.contact_id {
            want["cid"] = serde_json::json!(cid);
            convs_of.entry(cid.clone()).or_default().insert(c.id.clone());
            if !asg.is_empty() {
                asg_of.entry(cid.clone()).or_default().extend(asg.iter().cloned());
            }
        }
        match stored.get(&c.id).and_then(|raw| decode_msgpack(raw)) {
            None => report.drift(format!("conversation {} missing from the projection", c.id)),
            Some(have) if have != want => report.drift(format!("conversation {}: {have} differs from {want}", c.id)),
            Some(_) => {}
        }
    }
    if stored.len() != snap.conversations.len() {
        report.drift(format!("{} conversations in the projection, {} in MongoDB", stored.len(), snap.conversations.len()));
    }
    let mut apps_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for a in &snap.applications {
        if let Some(cid) = &a.contact_id {
            apps_of.entry(cid.clone()).or_default().insert(a.id.clone());
        }
    }
    report.application_sets += apps_of.len();
    let sets: [(&str, MembersOf, KeyOf); 3] = [
        ("convsof", convs_of, OrgKeys::conversations_of),
        ("asgof", asg_of, OrgKeys::assignees_of),
        ("appsof", apps_of, OrgKeys::applications_of),
    ];
    for (tag, want, key_of) in sets {
        let mut have_keys: BTreeSet<String> = scan(conn, &format!("{}:{tag}:*", keys.base)).await?.into_iter().collect();
        for (cid, members) in &want {
            let key = key_of(keys, cid);
            have_keys.remove(&key);
            let have: BTreeSet<String> = conn.smembers(&key).await?;
            if &have != members {
                report.drift(format!("{tag} of {cid}: {have:?}, MongoDB says {members:?}"));
            }
        }
        for key in have_keys {
            report.drift(format!("{tag} set {} should not exist", suffix(&key, keys, tag)));
        }
    }
    Ok(())
}

/// The applied version of every document MongoDB has (equal to its `version`), and each user's
/// teams as stored.
async fn verify_versions_and_users(
    conn: &mut redis::aio::ConnectionManager,
    keys: &OrgKeys,
    snap: &OrgSnapshot,
    report: &mut DriftReport,
) -> anyhow::Result<()> {
    let versions: HashMap<String, String> = conn.hgetall(keys.versions()).await?;
    let docs = snap
        .contacts
        .iter()
        .map(|d| ("c", &d.id, d.version))
        .chain(snap.applications.iter().map(|d| ("a", &d.id, d.version)))
        .chain(snap.conversations.iter().map(|d| ("v", &d.id, d.version)))
        .chain(snap.pipelines.iter().map(|d| ("p", &d.id, d.version)))
        .chain(snap.users.iter().map(|d| ("u", &d.id, d.version)));
    for (tag, id, version) in docs {
        let Some(version) = version else { continue };
        report.versions += 1;
        let field = format!("{tag}:{id}");
        if versions.get(&field) != Some(&version.to_string()) {
            report.drift(format!("version of {field}: {:?} in the projection, {version} in MongoDB", versions.get(&field)));
        }
    }
    let users: HashMap<String, String> = conn.hgetall(keys.users()).await?;
    for u in &snap.users {
        report.users += 1;
        let want = u.team_ids.clone().unwrap_or_default();
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
