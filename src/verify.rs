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

#[derive(Debug, Default, Clone)]
pub struct DriftReport {
    pub orgs: usize,
    pub cards: usize,
    pub index_keys: usize,
    pub drift_count: usize,
    /// The first differences, human readable.
    pub samples: Vec<String>,
}

impl DriftReport {
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
    let mut names: Vec<String> = Vec::new();
    for pattern in [format!("{}:z*", keys.base), format!("{}:tri:*", keys.base)] {
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query_async(conn).await?;
            names.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
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
        let have: BTreeSet<String> = conn.smembers(keys.team(&team)).await?;
        if have != members {
            report.drift(format!("team {team}: members {have:?}, MongoDB says {members:?}"));
        }
    }
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
