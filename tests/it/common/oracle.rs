//! A third, independent reading of CONTRACT.md 3: the answer to a board request computed in
//! memory, straight from the request's JSON and the org's documents, with none of the service's
//! code (no request parser, no `board::plan`, no key model, no case-folding helper). The
//! differential test compares both service paths with it, so a bug they share shows up.
use board_model::model::{CardDoc, Pipeline, Stage};
use board_mongo::OrgSnapshot;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, PartialEq)]
pub struct OracleBucket {
    pub name: String,
    pub stage_id: Option<String>,
    pub total: u64,
    /// The ids of the cards on the requested page, in order.
    pub page: Vec<String>,
}

/// `Err("not_found")` where the contract answers 404.
pub fn answer(snap: &OrgSnapshot, user: &str, body: &Value, now: i64) -> Result<Vec<OracleBucket>, &'static str> {
    let get = |k: &str| body.get(k).filter(|v| !v.is_null());
    let text = |k: &str| get(k).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
    let kind = text("pipelineType").unwrap_or_else(|| "Contact".into());
    let cards: &[CardDoc] = if kind == "Application" { &snap.applications } else { &snap.contacts };

    // 1. The pipeline.
    let of_kind: Vec<&Pipeline> = snap.pipelines.iter().filter(|p| p.kind.as_deref() == Some(kind.as_str())).collect();
    let pipeline = match text("pipelineId") {
        Some(id) => *of_kind.iter().find(|p| p.id == id).ok_or("not_found")?,
        None => of_kind.iter().filter(|p| p.is_active == Some(true)).min_by(|a, b| a.id.cmp(&b.id)).copied().ok_or("not_found")?,
    };
    let active = pipeline.is_active == Some(true);

    // 2. The buckets, in order.
    let mut stages: Vec<(usize, &Stage)> = pipeline.stages.iter().flatten().enumerate().collect();
    stages.sort_by_key(|(i, s)| (s.order.is_none(), s.order, *i));
    let stages: Vec<&Stage> = stages.into_iter().map(|(_, s)| s).collect();
    let name_of = |s: &Stage| s.name.clone().unwrap_or_default();
    let mut buckets: Vec<(String, Option<&Stage>)> = if let Some(status) = text("status") {
        match stages.iter().find(|s| s.id == status).or_else(|| stages.iter().find(|s| s.name.as_deref() == Some(status.as_str()))) {
            Some(s) => vec![(name_of(s), Some(*s))],
            None => vec![(status, None)],
        }
    } else if let Some(names) = get("stages").and_then(Value::as_array).filter(|a| !a.is_empty()) {
        let mut out: Vec<(String, Option<&Stage>)> = Vec::new();
        for n in names.iter().filter_map(Value::as_str).map(str::trim).filter(|n| !n.is_empty()) {
            let stage = stages.iter().find(|s| s.name.as_deref() == Some(n)).copied();
            let same = |(m, t): &(String, Option<&Stage>)| match (t, stage) {
                (Some(a), Some(b)) => a.id == b.id,
                (None, None) => m == n,
                _ => false,
            };
            if !out.iter().any(same) {
                out.push((n.to_string(), stage));
            }
        }
        if out.is_empty() {
            stages.iter().map(|s| (name_of(s), Some(*s))).collect()
        } else {
            out
        }
    } else {
        stages.iter().map(|s| (name_of(s), Some(*s))).collect()
    };

    // 3. Everything derived from conversations, messages and users.
    let contact_of = |c: &CardDoc| if kind == "Application" { c.contact_id.clone() } else { Some(c.id.clone()) };
    let mut assignees: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for conv in &snap.conversations {
        if let Some(cid) = &conv.contact_id {
            assignees.entry(cid).or_default().extend(conv.assignees.iter().flatten().map(String::as_str));
        }
    }
    let mut messages: HashMap<&str, Vec<i64>> = HashMap::new();
    for m in &snap.messages {
        if let (Some(cid), Some(at)) = (&m.contact_id, m.created_at) {
            messages.entry(cid).or_default().push(at);
        }
    }
    let date = |v: Option<&Value>| v.and_then(Value::as_str).and_then(board_model::time::parse_rfc3339);
    let range = |k: &str| get(k).map(|r| (date(r.get("start")), date(r.get("end"))));
    let created = if get("createdDateRange").is_some() { range("createdDateRange") } else { range("dateRange") };
    let ids = |k: &str| -> Option<BTreeSet<String>> {
        let v: BTreeSet<String> =
            get(k)?.as_array()?.iter().filter_map(Value::as_str).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect();
        (!v.is_empty()).then_some(v)
    };
    let my_teams: BTreeSet<&str> =
        snap.users.iter().filter(|u| u.id == user).flat_map(|u| u.team_ids.iter().flatten()).map(String::as_str).collect();
    let team: BTreeSet<String> =
        snap.users.iter().filter(|u| u.team_ids.iter().flatten().any(|t| my_teams.contains(t.as_str()))).map(|u| u.id.clone()).collect();
    // Owner scope: None = everyone; Some(set) = one of them is creator, owner or assignee.
    enum Scope {
        All,
        People(BTreeSet<String>),
        Unassigned,
    }
    let scope = match ids("owner") {
        Some(people) => Scope::People(people),
        None => match text("ownerFilter").as_deref() {
            None | Some("all") => Scope::All,
            Some("my") => Scope::People(BTreeSet::from([user.to_string()])),
            Some("team") => Scope::People(team),
            Some("unassigned") => Scope::Unassigned,
            Some(other) => Scope::People(BTreeSet::from([other.to_string()])),
        },
    };
    let assignee_filter = ids("assignee");
    // Case-insensitive literal substring: a regex of the escaped term with `(?i)`, which folds by
    // Unicode simple case folding (the regex crate's own tables, not the service's helper).
    let search = text("search").map(|t| regex::Regex::new(&format!("(?i){}", regex::escape(&t))).unwrap());
    let source = if kind == "Contact" { get("source").and_then(Value::as_str).filter(|s| !s.is_empty()) } else { None };
    let bulk_only = get("bulkOnly").and_then(Value::as_bool) == Some(true);
    let message_status = text("messageStatus");
    let quiet_since = get("lastMessageTimeRange").and_then(|w| {
        let value = w.get("value")?.as_f64()?;
        let unit = match w.get("unit")?.as_str()? {
            "hours" => 3_600_000.0,
            _ => 86_400_000.0,
        };
        Some(now - (value * unit).round() as i64)
    });
    let messaged_in = range("lastMessageDateRange");
    // customFields (or its alias customFilters): a string is a case-insensitive literal
    // substring of the field (of any string in it, for a list), a number or boolean equality.
    let custom: Vec<(String, Value)> = get("customFields")
        .or_else(|| get("customFilters"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, v)| !v.is_null() && v.as_str().is_none_or(|s| !s.trim().is_empty()))
                .map(|(k, v)| (k.clone(), v.as_str().map(|s| Value::from(s.trim())).unwrap_or_else(|| v.clone())))
                .collect()
        })
        .unwrap_or_default();
    let custom_matches = |stored: Option<&Value>, wanted: &Value| -> bool {
        let Some(stored) = stored else { return false };
        let candidates: Vec<&Value> = match stored {
            Value::Array(a) => a.iter().collect(),
            v => vec![v],
        };
        candidates.into_iter().any(|v| match (wanted, v) {
            (Value::String(w), Value::String(s)) => regex::Regex::new(&format!("(?i){}", regex::escape(w))).unwrap().is_match(s),
            (Value::Number(w), Value::Number(s)) => w.as_f64() == s.as_f64(),
            (Value::Bool(w), Value::Bool(s)) => w == s,
            _ => false,
        })
    };

    let passes = |c: &CardDoc| -> bool {
        let cid = contact_of(c);
        let asg: BTreeSet<&str> = cid.as_deref().and_then(|id| assignees.get(id)).cloned().unwrap_or_default();
        let times: &[i64] = cid.as_deref().and_then(|id| messages.get(id)).map(Vec::as_slice).unwrap_or(&[]);
        if let Some(re) = &search {
            let fields = [&c.first_name, &c.last_name, &c.full_name].into_iter().flatten().map(String::as_str);
            let phones = c.phone_numbers.iter().flatten().filter_map(|p| p.value.as_deref());
            if !fields.chain(phones).any(|f| re.is_match(f)) {
                return false;
            }
        }
        if source.is_some() && c.source.as_deref() != source {
            return false;
        }
        let involved = |u: &str| c.created_by.as_deref() == Some(u) || c.owner.as_deref() == Some(u) || asg.contains(u);
        match &scope {
            Scope::All => {}
            Scope::People(people) => {
                if !people.iter().any(|u| involved(u)) {
                    return false;
                }
            }
            Scope::Unassigned => {
                if c.owner.is_some() || !asg.is_empty() {
                    return false;
                }
            }
        }
        for (key, wanted) in &custom {
            if !custom_matches(c.custom_fields.as_ref().and_then(|m| m.get(key)), wanted) {
                return false;
            }
        }
        if let Some(a) = &assignee_filter {
            if !a.iter().any(|u| asg.contains(u.as_str())) {
                return false;
            }
        }
        if let Some((start, end)) = created {
            if start.is_some() || end.is_some() {
                let Some(at) = c.created_at else { return false };
                if start.is_some_and(|s| at < s) || end.is_some_and(|e| at > e) {
                    return false;
                }
            }
        }
        if bulk_only && c.is_bulk_sms != Some(true) {
            return false;
        }
        match message_status.as_deref() {
            Some("answered") if times.is_empty() => return false,
            Some("unanswered") if !times.is_empty() => return false,
            _ => {}
        }
        if let Some(since) = quiet_since {
            if times.iter().any(|t| *t >= since) {
                return false;
            }
        }
        if let Some((start, end)) = messaged_in {
            let bounded = start.is_some() || end.is_some();
            if bounded && !times.iter().any(|t| start.is_none_or(|s| *t >= s) && end.is_none_or(|e| *t <= e)) {
                return false;
            }
        }
        true
    };

    let in_pipeline = |c: &CardDoc| match &c.pipeline_id {
        Some(p) => p == &pipeline.id,
        None => active,
    };
    let in_stage = |c: &CardDoc, s: &Stage| match &c.pipeline_stage {
        Some(id) => id == &s.id,
        None => s.name.is_some() && c.status == s.name,
    };
    let size = get("size").and_then(Value::as_u64).unwrap_or(25) as usize;
    let pages = get("page").and_then(Value::as_object);
    let mut out = Vec::new();
    for (name, stage) in buckets.drain(..) {
        let Some(stage) = stage else {
            out.push(OracleBucket { name, stage_id: None, total: 0, page: Vec::new() });
            continue;
        };
        let mut matching: Vec<&CardDoc> = cards.iter().filter(|c| in_pipeline(c) && in_stage(c, stage) && passes(c)).collect();
        // createdAt descending (a card without one last), then _id descending.
        matching.sort_by(|a, b| (b.created_at.is_some(), b.created_at, &b.id).cmp(&(a.created_at.is_some(), a.created_at, &a.id)));
        let page = pages.and_then(|p| p.get(&stage.id).or_else(|| p.get(&name))).and_then(Value::as_u64).unwrap_or(1) as usize;
        let page_ids = matching.iter().skip((page - 1) * size).take(size).map(|c| c.id.clone()).collect();
        out.push(OracleBucket { name, stage_id: Some(stage.id.clone()), total: matching.len() as u64, page: page_ids });
    }
    Ok(out)
}
