//! The projection path: reads the org's pipelines, builds the board plan, and answers every
//! bucket in one read-only Function call (`pb_board` in functions.lua). Two round trips per
//! board, whatever the number of stages and filters.
use super::board::{self, BoardAnswer, BucketAnswer, CardOut};
use super::error::ApiError;
use super::request::{BoardQuery, MessageStatus, OwnerScope};
use board_core::card::{trigrams, StoredCard};
use board_core::keys::KeySpace;
use board_core::model::Pipeline;
use board_core::time::Millis;
use redis::aio::ConnectionManager;
use redis::Value;
use serde::Serialize;

/// Why the projection did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The request itself is wrong (404 and friends): MongoDB would say the same.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The projection has nothing for this org yet: ask MongoDB.
    #[error("the projection has no data for this org yet")]
    NotBuilt,
    /// Redis failed: ask MongoDB.
    #[error("redis: {0}")]
    Unavailable(String),
}

impl From<redis::RedisError> for ProjectionError {
    fn from(e: redis::RedisError) -> Self {
        ProjectionError::Unavailable(e.to_string())
    }
}

/// At most this many trigrams of a search term are intersected: any subset still finds every
/// match (the literal check removes the rest), and a long term stays cheap.
const MAX_GRAMS: usize = 8;

#[derive(Debug, Serialize)]
struct LuaBucket {
    rks: Vec<String>,
    offset: u64,
    limit: u64,
}

#[derive(Debug, Serialize, Default)]
struct LuaPlan {
    k: &'static str,
    buckets: Vec<LuaBucket>,
    cmin: String,
    cmax: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cstart: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cend: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    people: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    team_of: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    assignees: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unassigned: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bulk: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    answered: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quiet_before: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    msg_min: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    msg_max: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    term: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grams: Option<Vec<String>>,
}

fn bound(v: Option<i64>, open: &str) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| open.to_string())
}

#[derive(Clone)]
pub struct ProjectionReader {
    conn: ConnectionManager,
    keys: KeySpace,
}

impl ProjectionReader {
    pub fn new(conn: ConnectionManager, keys: KeySpace) -> Self {
        ProjectionReader { conn, keys }
    }

    pub async fn pipelines(&self, org: &str) -> Result<Vec<Pipeline>, ProjectionError> {
        let mut conn = self.conn.clone();
        let raw: Vec<(String, String)> = redis::cmd("HGETALL").arg(self.keys.org(org).pipelines()).query_async(&mut conn).await?;
        raw.into_iter()
            .map(|(_, json)| {
                serde_json::from_str(&json).map_err(|e| ProjectionError::Unavailable(format!("bad pipeline in projection: {e}")))
            })
            .collect()
    }

    /// `user` is the caller (`my`, `team`); `now` anchors `lastMessageTimeRange`.
    pub async fn answer(&self, org: &str, user: &str, q: &BoardQuery, now: Millis) -> Result<BoardAnswer, ProjectionError> {
        let (plan, call) = self.board_call(org, user, q, now).await?;
        let mut conn = self.conn.clone();
        let reply: Value = call.query_async(&mut conn).await?;
        let buckets = decode_reply(reply, &plan)?;
        Ok(BoardAnswer { kind: q.kind, buckets })
    }

    /// The one `FCALL_RO pb_board` that answers the board (benchmarks replay it verbatim).
    pub async fn board_call(
        &self,
        org: &str,
        user: &str,
        q: &BoardQuery,
        now: Millis,
    ) -> Result<(board::BoardPlan, redis::Cmd), ProjectionError> {
        let pipelines = self.pipelines(org).await?;
        if pipelines.is_empty() {
            return Err(ProjectionError::NotBuilt);
        }
        let plan = board::plan(&pipelines, q)?;
        let f = &q.filters;
        let mut lua = LuaPlan {
            k: q.kind.tag(),
            buckets: plan.buckets.iter().map(|b| LuaBucket { rks: plan.raw_keys(b), offset: b.offset, limit: b.limit }).collect(),
            cmin: "-inf".into(),
            cmax: "+inf".into(),
            ..Default::default()
        };
        if let Some(r) = f.created {
            // "(-inf" leaves out cards without createdAt, which no range matches.
            lua.cmin = bound(r.start, "(-inf");
            lua.cmax = bound(r.end, "+inf");
            lua.created = Some(true);
            lua.cstart = r.start;
            lua.cend = r.end;
        }
        match &f.owner {
            OwnerScope::All => {}
            OwnerScope::Mine => lua.people = Some(vec![user.to_string()]),
            OwnerScope::Team => lua.team_of = Some(user.to_string()),
            OwnerScope::Unassigned => lua.unassigned = Some(true),
            OwnerScope::Users(u) => lua.people = Some(u.clone()),
        }
        lua.assignees = f.assignees.clone();
        lua.source = f.source.clone();
        lua.bulk = f.bulk_only.then_some(true);
        lua.answered = match f.message_status {
            MessageStatus::All => None,
            MessageStatus::Answered => Some("yes"),
            MessageStatus::Unanswered => Some("no"),
        };
        lua.quiet_before = f.quiet_for.map(|d| now - d);
        if let Some(r) = f.messaged_in {
            lua.msg_min = Some(bound(r.start, "-inf"));
            lua.msg_max = Some(bound(r.end, "+inf"));
        }
        if let Some(s) = &f.search {
            let term = board_core::text::fold(s);
            let grams = trigrams(&term);
            if !grams.is_empty() {
                // Spread the chosen trigrams over the term.
                let step = grams.len().div_ceil(MAX_GRAMS);
                lua.grams = Some(grams.into_iter().step_by(step).collect());
            }
            lua.term = Some(term);
        }
        let plan_json = serde_json::to_string(&lua).map_err(|e| ProjectionError::Unavailable(e.to_string()))?;
        let mut cmd = redis::cmd("FCALL_RO");
        cmd.arg("pb_board").arg(1).arg(self.keys.org(org).base).arg(plan_json);
        Ok((plan, cmd))
    }
}

/// The derived fields of a card from its msgpack meta (written by functions.lua): `asg`, the
/// sorted assignee union, and `lm`, the last message time. Lua's msgpack writes an empty table as
/// an empty array or map, and an integral number as an integer: both are accepted.
fn derived_of_meta(meta: &[u8]) -> Option<(Vec<String>, Option<Millis>)> {
    let rmpv::Value::Map(fields) = rmpv::decode::read_value(&mut &meta[..]).ok()? else { return None };
    let (mut assignees, mut last) = (Vec::new(), None);
    for (k, v) in fields {
        match k.as_str() {
            Some("asg") => {
                if let rmpv::Value::Array(a) = v {
                    assignees = a.iter().filter_map(|u| u.as_str().map(str::to_string)).collect();
                }
            }
            Some("lm") => last = v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)),
            _ => {}
        }
    }
    Some((assignees, last))
}

fn bad_reply(what: &str) -> ProjectionError {
    ProjectionError::Unavailable(format!("unexpected pb_board reply: {what}"))
}

fn decode_reply(reply: Value, plan: &board::BoardPlan) -> Result<Vec<BucketAnswer>, ProjectionError> {
    let Value::Array(buckets) = reply else { return Err(bad_reply("not an array")) };
    if buckets.len() != plan.buckets.len() {
        return Err(bad_reply("bucket count"));
    }
    let mut out = Vec::with_capacity(buckets.len());
    for (spec, bucket) in plan.buckets.iter().zip(buckets) {
        let Value::Array(items) = bucket else { return Err(bad_reply("bucket not an array")) };
        let mut items = items.into_iter();
        let total = match items.next() {
            Some(Value::Int(n)) => n.max(0) as u64,
            _ => return Err(bad_reply("total")),
        };
        let rest: Vec<Value> = items.collect();
        let mut cards = Vec::with_capacity(rest.len() / 3);
        for chunk in rest.chunks(3) {
            let [_, Value::BulkString(body), Value::BulkString(meta)] = chunk else { return Err(bad_reply("card triple")) };
            let stored = StoredCard::decode(body).map_err(|e| bad_reply(&format!("card body: {e}")))?;
            let (assignees, last_message_at) = derived_of_meta(meta).ok_or_else(|| bad_reply("card meta"))?;
            cards.push(CardOut { doc: stored.to_doc(), assignees, last_message_at });
        }
        out.push(BucketAnswer { name: spec.name.clone(), stage_id: spec.stage.as_ref().map(|s| s.id.clone()), total, cards });
    }
    Ok(out)
}
