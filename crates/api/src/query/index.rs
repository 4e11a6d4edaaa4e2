//! The API's in-memory index of one org: answers, off Redis' thread, every board the Redis sorted
//! sets do not answer directly (search, team, several owners, assignees, unassigned, source, bulk,
//! answered, the last-message windows, and their combinations).
//!
//! Rows are card records (`record::CardRecord`) reduced to what filters look at; membership
//! filters are Roaring bitmaps over row numbers, so a filter is a few bitmap operations whatever
//! its selectivity, and search terms of 3+ characters start from trigram postings. What remains
//! per candidate (time ranges, the literal search check) runs over the candidates only, under a
//! deadline. Pure: `index_cache.rs` loads and follows the org's change stream.
use super::board::BoardPlan;
use super::request::{BoardQuery, MessageStatus, OwnerScope};
use board_model::card::{search_fields, trigrams, Trigram};
use board_model::keys::raw_stage_key;
use board_model::model::CardKind;
use board_model::order::BoardPlace;
use board_model::record::{has_message_between, quiet_since, CardRecord};
use board_model::time::Millis;
use roaring::RoaringBitmap;
use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

#[derive(Debug, Clone)]
struct Row {
    kind: CardKind,
    id: String,
    created: Option<Millis>,
    message_times: Vec<Millis>,
    /// case-folded names and phone numbers
    text: Vec<String>,
    /// Index memberships, kept to take the row out again.
    stage: Option<String>,
    people: Vec<String>,
    assignees: Vec<String>,
    source: Option<String>,
    bulk: bool,
    unassigned: bool,
    answered: bool,
}

impl Row {
    /// The trigrams of its search text (recomputed to unlink: keeping them would cost ~800 bytes
    /// a card).
    fn grams(&self) -> Vec<Trigram> {
        trigrams(self.text.iter().map(String::as_str))
    }
}

/// Why the index did not answer.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IndexError {
    #[error("the board's filters took longer than the index deadline")]
    Deadline,
}

#[derive(Debug, Default)]
pub struct OrgIndex {
    /// The last change-stream entry applied (`0-0`: none).
    pub stream_id: String,
    /// The key base (org and generation) it was loaded from.
    pub base: String,
    slot_of: HashMap<(CardKind, String), u32>,
    rows: Vec<Option<Row>>,
    free: Vec<u32>,
    by_stage: HashMap<(CardKind, String), RoaringBitmap>,
    /// The rows of each raw stage in board order (createdAt descending, then id descending): a
    /// page is read by walking it and testing the filters' bitmap, so a broad filter (team)
    /// costs about the page, not the matches.
    order: HashMap<(CardKind, String), Vec<u32>>,
    /// While loading, `order` is appended to and sorted once at the end.
    loading: bool,
    by_person: HashMap<String, RoaringBitmap>,
    by_assignee: HashMap<String, RoaringBitmap>,
    by_source: HashMap<String, RoaringBitmap>,
    by_gram: HashMap<Trigram, RoaringBitmap>,
    bulk: RoaringBitmap,
    unassigned: RoaringBitmap,
    answered: RoaringBitmap,
    /// user -> teams, from the projection's users
    teams_of: HashMap<String, Vec<String>>,
}

/// One bucket's answer: the exact total and the ids of the page, in board order.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexBucket {
    pub total: u64,
    pub ids: Vec<String>,
}

/// At most this many trigrams of a term are intersected (any subset finds every match; the
/// literal check removes the rest).
const MAX_GRAMS: usize = 8;

/// Puts `row` into (or takes it out of) the bitmap of `key`; an emptied bitmap goes. The key is
/// borrowed and owned only when a bitmap is created.
fn set<K, Q>(map: &mut HashMap<K, RoaringBitmap>, key: &Q, row: u32, on: bool)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: ToOwned<Owned = K> + std::hash::Hash + Eq + ?Sized,
{
    if on {
        match map.get_mut(key) {
            Some(b) => {
                b.insert(row);
            }
            None => {
                map.insert(key.to_owned(), RoaringBitmap::from_iter([row]));
            }
        }
    } else if let Some(b) = map.get_mut(key) {
        b.remove(row);
        if b.is_empty() {
            map.remove(key);
        }
    }
}

impl OrgIndex {
    pub fn new(stream_id: String) -> Self {
        OrgIndex { stream_id, ..Default::default() }
    }

    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    pub fn set_users(&mut self, users: impl IntoIterator<Item = (String, Vec<String>)>) {
        self.teams_of = users.into_iter().collect();
    }

    pub fn set_user(&mut self, user: String, teams: Option<Vec<String>>) {
        match teams {
            Some(t) => self.teams_of.insert(user, t),
            None => self.teams_of.remove(&user),
        };
    }

    /// Puts a card's current record in (None or a tombstone: takes it out).
    pub fn put(&mut self, kind: CardKind, id: &str, rec: Option<&CardRecord>) {
        let key = (kind, id.to_string());
        let old = self.slot_of.remove(&key).map(|row| {
            let old = self.rows[row as usize].take().expect("a slot points at a row");
            self.unlink(row, &old);
            self.free.push(row);
            (row, old)
        });
        let new = rec.and_then(|rec| Some((rec, rec.card.as_ref()?))).map(|(rec, card)| Row {
            kind,
            id: id.to_string(),
            created: card.created_at,
            message_times: rec.derived.message_times.clone(),
            text: search_fields(&card.to_doc()),
            stage: raw_stage_key(card.pipeline_id.as_deref(), card.pipeline_stage.as_deref(), card.status.as_deref()),
            people: rec.people().into_iter().map(str::to_string).collect(),
            assignees: rec.derived.assignees.clone(),
            // `source` filters only the Contact board (CONTRACT.md 3).
            source: if kind == CardKind::Contact { card.source.clone() } else { None },
            bulk: card.is_bulk_sms == Some(true),
            unassigned: rec.unassigned(),
            answered: rec.derived.answered(),
        });
        let Some(r) = new else {
            if let Some((row, o)) = old {
                self.order_remove(row, &o);
            }
            return;
        };
        let row = self.free.pop().unwrap_or_else(|| {
            self.rows.push(None);
            (self.rows.len() - 1) as u32
        });
        self.link(row, &r, true);
        // A card that keeps its row, stage and createdAt (messages, assignments) keeps its place.
        let moved = match &old {
            Some((orow, o)) => !(*orow == row && o.stage == r.stage && o.created == r.created),
            None => true,
        };
        if moved {
            if let Some((orow, o)) = &old {
                self.order_remove(*orow, o);
            }
            self.order_insert(row, &r);
        }
        self.rows[row as usize] = Some(r);
        self.slot_of.insert(key, row);
    }

    /// The row's place in its column (`board_model::order`): the smaller place comes first.
    fn place(&self, row: u32) -> BoardPlace<'_> {
        let r = self.rows[row as usize].as_ref().expect("ordered rows are live");
        BoardPlace::new(r.created, &r.id)
    }

    fn order_insert(&mut self, row: u32, r: &Row) {
        let Some(stage) = &r.stage else { return };
        let place = BoardPlace::new(r.created, &r.id);
        let mut list = self.order.remove(&(r.kind, stage.clone())).unwrap_or_default();
        if self.loading {
            list.push(row);
        } else {
            let at = list.partition_point(|x| self.place(*x) < place);
            list.insert(at, row);
        }
        self.order.insert((r.kind, stage.clone()), list);
    }

    /// `r` is the row's old content (already taken out of `rows`).
    fn order_remove(&mut self, row: u32, r: &Row) {
        let Some(stage) = &r.stage else { return };
        let place = BoardPlace::new(r.created, &r.id);
        let Some(mut list) = self.order.remove(&(r.kind, stage.clone())) else { return };
        if self.loading {
            list.retain(|x| *x != row);
        } else {
            let at = list.partition_point(|x| *x != row && self.place(*x) < place);
            if let Some(i) = list[at..].iter().position(|x| *x == row) {
                list.remove(at + i);
            }
        }
        if !list.is_empty() {
            self.order.insert((r.kind, stage.clone()), list);
        }
    }

    /// Starts a bulk load: `put` appends to the stage orders, `finish_load` sorts them once.
    pub fn start_load(&mut self) {
        self.loading = true;
    }

    pub fn finish_load(&mut self) {
        self.loading = false;
        let mut order = std::mem::take(&mut self.order);
        for list in order.values_mut() {
            list.sort_unstable_by_key(|row| self.place(*row));
        }
        self.order = order;
    }

    fn unlink(&mut self, row: u32, r: &Row) {
        self.link(row, r, false)
    }

    fn link(&mut self, row: u32, r: &Row, on: bool) {
        if let Some(s) = &r.stage {
            set(&mut self.by_stage, &(r.kind, s.clone()), row, on);
        }
        for p in &r.people {
            set(&mut self.by_person, p.as_str(), row, on);
        }
        for a in &r.assignees {
            set(&mut self.by_assignee, a.as_str(), row, on);
        }
        if let Some(s) = &r.source {
            set(&mut self.by_source, s.as_str(), row, on);
        }
        for g in r.grams() {
            set(&mut self.by_gram, &g, row, on);
        }
        for (flag, bitmap) in [(r.bulk, &mut self.bulk), (r.unassigned, &mut self.unassigned), (r.answered, &mut self.answered)] {
            if flag && on {
                bitmap.insert(row);
            } else if flag {
                bitmap.remove(row);
            }
        }
    }

    fn union_of(map: &HashMap<String, RoaringBitmap>, keys: impl IntoIterator<Item = impl AsRef<str>>) -> RoaringBitmap {
        let mut out = RoaringBitmap::new();
        for k in keys {
            if let Some(b) = map.get(k.as_ref()) {
                out |= b;
            }
        }
        out
    }

    /// The members of the caller's teams (`ownerFilter: team`).
    fn team_members(&self, user: &str) -> BTreeSet<&str> {
        let Some(teams) = self.teams_of.get(user) else { return BTreeSet::new() };
        self.teams_of.iter().filter(|(_, ts)| ts.iter().any(|t| teams.contains(t))).map(|(u, _)| u.as_str()).collect()
    }

    /// The ids of ranks [offset, offset + limit) among the rows of `stages` that are in `cand`,
    /// in board order: a merge of the stages' ordered lists that skips rows not in `cand`.
    fn walk(
        &self,
        kind: CardKind,
        stages: &[String],
        cand: &RoaringBitmap,
        offset: usize,
        limit: usize,
        deadline: Instant,
    ) -> Result<Vec<String>, IndexError> {
        let lists: Vec<&[u32]> = stages.iter().filter_map(|s| self.order.get(&(kind, s.clone())).map(Vec::as_slice)).collect();
        let mut at = vec![0usize; lists.len()];
        let (mut seen, mut out, mut steps) = (0usize, Vec::with_capacity(limit), 0usize);
        while out.len() < limit {
            // Advance each list to its next row in `cand`, then take the first in board order.
            let mut best: Option<usize> = None;
            for (i, list) in lists.iter().enumerate() {
                while at[i] < list.len() && !cand.contains(list[at[i]]) {
                    at[i] += 1;
                    steps += 1;
                    if steps % 4096 == 0 && Instant::now() >= deadline {
                        return Err(IndexError::Deadline);
                    }
                }
                if at[i] < list.len() && best.is_none_or(|b| self.place(list[at[i]]) < self.place(lists[b][at[b]])) {
                    best = Some(i);
                }
            }
            let Some(b) = best else { break };
            let row = lists[b][at[b]];
            at[b] += 1;
            if seen >= offset {
                out.push(self.rows[row as usize].as_ref().expect("live").id.clone());
            }
            seen += 1;
        }
        Ok(out)
    }

    /// Answers every bucket of `plan`. `user` is the caller; `now` anchors the quiet window.
    pub fn answer(
        &self,
        plan: &BoardPlan,
        q: &BoardQuery,
        user: &str,
        now: Millis,
        deadline: Instant,
    ) -> Result<Vec<IndexBucket>, IndexError> {
        let f = &q.filters;
        // Everything that is one bitmap operation, shared by every bucket.
        let mut filters: Vec<RoaringBitmap> = Vec::new();
        match &f.owner {
            OwnerScope::All => {}
            OwnerScope::Mine => filters.push(Self::union_of(&self.by_person, [user])),
            OwnerScope::Users(us) => filters.push(Self::union_of(&self.by_person, us)),
            OwnerScope::Team => filters.push(Self::union_of(&self.by_person, self.team_members(user))),
            OwnerScope::Unassigned => filters.push(self.unassigned.clone()),
        }
        if let Some(a) = &f.assignees {
            filters.push(Self::union_of(&self.by_assignee, a));
        }
        if let (Some(s), CardKind::Contact) = (&f.source, q.kind) {
            filters.push(Self::union_of(&self.by_source, [s]));
        }
        if f.bulk_only {
            filters.push(self.bulk.clone());
        }
        let term = f.search.as_deref().map(board_model::text::fold);
        if let Some(t) = &term {
            let grams = trigrams([t.as_str()]);
            if !grams.is_empty() {
                let step = grams.len().div_ceil(MAX_GRAMS);
                for g in grams.iter().step_by(step) {
                    filters.push(self.by_gram.get(g).cloned().unwrap_or_default());
                }
            }
        }
        let quiet = f.quiet_for.map(|d| now - d);
        // Filters checked card by card (times, the literal search).
        let per_row = f.created.is_some() || quiet.is_some() || f.messaged_in.is_some() || term.is_some();
        let mut out = Vec::with_capacity(plan.buckets.len());
        for b in &plan.buckets {
            if Instant::now() >= deadline {
                return Err(IndexError::Deadline);
            }
            let mut cand = RoaringBitmap::new();
            for rk in plan.raw_keys(b) {
                if let Some(s) = self.by_stage.get(&(q.kind, rk)) {
                    cand |= s;
                }
            }
            for x in &filters {
                cand &= x;
            }
            match f.message_status {
                MessageStatus::All => {}
                MessageStatus::Answered => cand &= &self.answered,
                MessageStatus::Unanswered => cand -= &self.answered,
            }
            if !per_row {
                // Every filter is in the bitmap: the total is its size, and the page is found by
                // walking the bucket's stages in board order.
                let ids = self.walk(q.kind, &plan.raw_keys(b), &cand, b.offset as usize, b.limit as usize, deadline)?;
                out.push(IndexBucket { total: cand.len(), ids });
                continue;
            }
            let mut hits: Vec<BoardPlace> = Vec::new();
            for (n, row) in cand.iter().enumerate() {
                if n % 4096 == 4095 && Instant::now() >= deadline {
                    return Err(IndexError::Deadline);
                }
                let r = self.rows[row as usize].as_ref().expect("bitmaps hold live rows");
                if let Some(c) = f.created {
                    if !r.created.is_some_and(|t| c.contains(t)) {
                        continue;
                    }
                }
                if quiet.is_some_and(|since| !quiet_since(&r.message_times, since)) {
                    continue;
                }
                if f.messaged_in.is_some_and(|m| !has_message_between(&r.message_times, m.start, m.end)) {
                    continue;
                }
                if let Some(t) = &term {
                    if !r.text.iter().any(|x| x.contains(t.as_str())) {
                        continue;
                    }
                }
                hits.push(BoardPlace::new(r.created, &r.id));
            }
            let total = hits.len() as u64;
            let want = (b.offset + b.limit) as usize;
            // In board order; only the first `want` matter.
            if hits.len() > want && want > 0 {
                hits.select_nth_unstable(want - 1);
                hits.truncate(want);
            }
            hits.sort_unstable();
            let ids = hits.into_iter().skip(b.offset as usize).take(b.limit as usize).map(|p| p.id().to_string()).collect();
            out.push(IndexBucket { total, ids });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::request::ContactsRequest;
    use board_model::model::{CardDoc, Phone, Pipeline, Stage};
    use board_model::record::Derived;

    fn card(id: &str, stage: &str, created: i64, owner: &str, name: &str) -> CardDoc {
        CardDoc {
            id: id.into(),
            org_id: "o".into(),
            first_name: Some(name.into()),
            phone_numbers: Some(vec![Phone { value: Some("+49 171 555".into()), kind: None }]),
            owner: Some(owner.into()),
            pipeline_id: Some("p".into()),
            pipeline_stage: Some(stage.into()),
            created_at: Some(created),
            version: Some(1),
            ..Default::default()
        }
    }

    fn board(body: &str, index: &OrgIndex) -> Vec<IndexBucket> {
        let pipelines = vec![Pipeline {
            id: "p".into(),
            org_id: "o".into(),
            kind: Some("Contact".into()),
            is_active: Some(true),
            stages: Some(vec![Stage { id: "s1".into(), name: Some("New".into()), order: Some(0) }]),
            ..Default::default()
        }];
        let q = ContactsRequest::parse(body.as_bytes()).unwrap().into_query().unwrap();
        let plan = crate::query::board::plan(&pipelines, &q).unwrap();
        index.answer(&plan, &q, "u1", 1_000, Instant::now() + std::time::Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn filters_order_pages_and_updates() {
        let mut ix = OrgIndex::new("0-0".into());
        ix.put(CardKind::Contact, "c1", Some(&CardRecord::live(&card("c1", "s1", 10, "u1", "Jane"), Derived::default())));
        ix.put(CardKind::Contact, "c2", Some(&CardRecord::live(&card("c2", "s1", 20, "u2", "Janet"), Derived::default())));
        ix.put(
            CardKind::Contact,
            "c3",
            Some(&CardRecord::live(&card("c3", "s1", 20, "u2", "Bob"), Derived { assignees: vec!["u1".into()], message_times: vec![900] })),
        );
        let all = board("{}", &ix);
        assert_eq!((all[0].total, all[0].ids.clone()), (3, vec!["c3".to_string(), "c2".into(), "c1".into()]));
        assert_eq!(board(r#"{"ownerFilter": "my"}"#, &ix)[0].ids, ["c3", "c1"]);
        assert_eq!(board(r#"{"search": "JAN"}"#, &ix)[0].ids, ["c2", "c1"]);
        assert_eq!(board(r#"{"search": "t"}"#, &ix)[0].ids, ["c2"]);
        assert_eq!(board(r#"{"search": "171 5"}"#, &ix)[0].total, 3);
        assert_eq!(board(r#"{"messageStatus": "answered"}"#, &ix)[0].ids, ["c3"]);
        assert_eq!(board(r#"{"lastMessageTimeRange": {"value": 1, "unit": "hours"}}"#, &ix)[0].total, 2, "c3 wrote 100 ms ago");
        assert_eq!(board(r#"{"size": 1, "page": {"New": 2}}"#, &ix)[0].ids, ["c2"]);
        // An update moves the row; a delete takes it out.
        ix.put(CardKind::Contact, "c1", Some(&CardRecord::live(&card("c1", "s1", 10, "u2", "Zed"), Derived::default())));
        assert_eq!(board(r#"{"ownerFilter": "my"}"#, &ix)[0].ids, ["c3"]);
        assert_eq!(board(r#"{"search": "jan"}"#, &ix)[0].ids, ["c2"]);
        ix.put(CardKind::Contact, "c2", Some(&CardRecord::tombstone(2)));
        assert_eq!(board("{}", &ix)[0].total, 2);
        assert_eq!(ix.len(), 2);
    }
}
