//! The projection path. A board whose filters are any of none, one person (`my`, one owner, a
//! user id), `unanswered` and a created range is read natively from the sorted sets: per raw
//! stage key one count and one range read, pipelined in one round trip, then the page's card
//! records with one `HMGET` — Redis work proportional to the page, never to the matches. Every
//! other board is answered by the in-memory index (`index.rs`) off Redis' thread, under a
//! deadline; the page's records still come from Redis.
use super::board::{self, BoardAnswer, BoardPlan, BucketAnswer, CardJson};
use super::card_json::{card_out_of, CardJsonCache};
use super::error::ApiError;
use super::index::{IndexBucket, IndexError};
use super::index_cache::IndexCache;
use super::walk_pool::WalkPool;

/// A thread per core for large orgs' walks (`walk_pool`).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How far below the API's priority large orgs' walks run (`walk_pool`).
const BACKGROUND_NICE: i32 = 10;
use super::request::{BoardQuery, MessageStatus, OwnerScope};
use board_model::keys::{Generation, KeySpace, OrgKeys};
use board_model::model::{CardKind, Pipeline};
use board_model::order::BoardPlace;
use board_model::time::Millis;
use board_redis::functions::union_page::union_page_cmd;
use board_redis::projection::{field as state_field, Status};
use board_redis::redis_conn::RedisConn;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why the projection did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The request itself is wrong (404 and friends): MongoDB would say the same.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The projection has nothing for this org yet: ask MongoDB.
    #[error("the projection has no data for this org yet")]
    NotBuilt,
    /// The projection is not whole (Redis lost it, or it is being built from nothing): ask
    /// MongoDB. The reason goes to `meta.reason`.
    #[error("the projection is not whole: {0}")]
    NotWhole(&'static str),
    /// Redis failed: ask MongoDB.
    #[error("redis: {0}")]
    Unavailable(String),
    /// The in-memory index could not finish within its deadline.
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl From<redis::RedisError> for ProjectionError {
    fn from(e: redis::RedisError) -> Self {
        ProjectionError::Unavailable(e.to_string())
    }
}

/// From this offset on, a page of a bucket spanning several raw stage sets is selected inside
/// Redis by `pb_union_page` (work proportional to the page) instead of reading the first
/// offset + limit of every set and merging them here.
pub const DEEP_PAGE_OFFSET: u64 = 100;

/// Which sorted set answers a board directly: the filters it can carry.
#[derive(Debug, Clone, PartialEq)]
pub struct SetShape {
    pub person: Option<String>,
    pub unanswered: bool,
    /// Score bounds (createdAt): `-inf`/`+inf` when no created range.
    pub created: Option<(String, String)>,
}

impl SetShape {
    /// The shape of `q` if the sorted sets answer it, None if the index must.
    pub fn of(q: &BoardQuery, user: &str) -> Option<SetShape> {
        let f = &q.filters;
        let person = match &f.owner {
            OwnerScope::All => None,
            OwnerScope::Mine => Some(user.to_string()),
            OwnerScope::Users(u) if u.len() == 1 => Some(u[0].clone()),
            _ => return None,
        };
        let unanswered = match f.message_status {
            MessageStatus::All => false,
            MessageStatus::Unanswered => true,
            MessageStatus::Answered => return None,
        };
        // The quiet window ("no message since t") holds for every card without messages.
        let source_applies = f.source.is_some() && q.kind == CardKind::Contact;
        if f.search.is_some() || f.assignees.is_some() || source_applies || f.bulk_only || f.messaged_in.is_some() {
            return None;
        }
        if f.quiet_for.is_some() && !unanswered {
            return None;
        }
        // "(-inf" leaves out cards without createdAt, which no range matches.
        let created = f.created.map(|r| {
            (
                r.start.map(|s| s.to_string()).unwrap_or_else(|| "(-inf".into()),
                r.end.map(|e| e.to_string()).unwrap_or_else(|| "+inf".into()),
            )
        });
        Some(SetShape { person, unanswered, created })
    }

    pub fn key(&self, keys: &OrgKeys, kind: CardKind, rk: &str) -> String {
        match (&self.person, self.unanswered) {
            (None, false) => keys.stage(kind, rk),
            (None, true) => keys.stage_unanswered(kind, rk),
            (Some(u), false) => keys.stage_person(kind, rk, u),
            (Some(u), true) => keys.stage_person_unanswered(kind, rk, u),
        }
    }
}

/// The in-memory indexes' bounds (`serve`'s `INDEX_*` settings).
#[derive(Debug, Clone, Copy)]
pub struct IndexLimits {
    /// `INDEX_MEMORY_LIMIT`: the indexes' bytes, least recently used orgs dropped beyond it.
    pub memory: usize,
    /// `INDEX_WALKS_PER_ORG`: one org's walks at once.
    pub walks_per_org: usize,
    /// `INDEX_BACKGROUND_CARDS`: orgs of this many cards walk at a lower CPU priority.
    pub background_cards: usize,
    /// `INDEX_IMAGE_MIN_CARDS`: orgs of this many cards store their index's image.
    pub image_min_cards: usize,
}

impl Default for IndexLimits {
    fn default() -> Self {
        IndexLimits {
            memory: super::index_cache::DEFAULT_INDEX_MEMORY_LIMIT,
            walks_per_org: super::index_cache::default_walks_per_org(),
            background_cards: DEFAULT_BACKGROUND_CARDS,
            image_min_cards: super::index_cache::DEFAULT_IMAGE_MIN_CARDS,
        }
    }
}

/// The default `INDEX_BACKGROUND_CARDS`: a walk over this many cards takes milliseconds.
pub const DEFAULT_BACKGROUND_CARDS: usize = 50_000;

#[derive(Clone)]
pub struct ProjectionReader {
    conn: RedisConn,
    keys: KeySpace,
    index: IndexCache,
    /// Where large orgs' walks run (`walk_pool`), and from how many cards an org is large.
    background: WalkPool,
    background_cards: usize,
    index_deadline: Duration,
    deep_page_offset: u64,
    /// Cards rendered once per version, for the answers the API sends.
    card_json: CardJsonCache,
    /// The generation each org was last found in (`live_view` reads it there first).
    generations: moka::sync::Cache<String, Generation>,
    /// The orgs' pipelines, parsed, by their stored JSON.
    pipelines: moka::sync::Cache<Vec<(String, String)>, Arc<Vec<Pipeline>>>,
}

/// Bytes of parsed pipelines kept, with their JSON (`ProjectionReader::parsed_pipelines`).
const PARSED_PIPELINES_BYTES: u64 = 16 << 20;

/// How many orgs' generations are remembered (`ProjectionReader::live_view`).
const ORG_GENERATIONS: u64 = 100_000;

/// Which path of the projection answered a board (for `meta` and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionRoute {
    SortedSets,
    Index,
    /// The index, among the cards MongoDB matched for the request's custom fields.
    IndexAmongMongodbIds,
}

impl ProjectionRoute {
    pub fn name(self) -> &'static str {
        match self {
            ProjectionRoute::SortedSets => "sorted_sets",
            ProjectionRoute::Index => "index",
            ProjectionRoute::IndexAmongMongodbIds => "index_among_mongodb_ids",
        }
    }
}

impl ProjectionReader {
    pub fn new(conn: RedisConn, keys: KeySpace, index_deadline: Duration) -> Self {
        let limits = IndexLimits::default();
        ProjectionReader {
            index: IndexCache::new(conn.clone(), &limits),
            background: WalkPool::new(cores(), BACKGROUND_NICE),
            background_cards: limits.background_cards,
            conn,
            keys,
            index_deadline,
            deep_page_offset: DEEP_PAGE_OFFSET,
            card_json: CardJsonCache::new(super::card_json::DEFAULT_BYTES),
            pipelines: moka::sync::Cache::builder()
                .max_capacity(PARSED_PIPELINES_BYTES)
                .weigher(|raw: &Vec<(String, String)>, _: &Arc<Vec<Pipeline>>| {
                    // The parse takes about what its JSON does.
                    let json: usize = raw.iter().map(|(id, json)| id.len() + json.len()).sum();
                    u32::try_from(2 * json + 64).unwrap_or(u32::MAX)
                })
                .build(),
            generations: moka::sync::Cache::new(ORG_GENERATIONS),
        }
    }

    /// Bounds the in-memory indexes (`IndexLimits`).
    pub fn with_index_limits(mut self, limits: IndexLimits) -> Self {
        self.index = IndexCache::new(self.conn.clone(), &limits);
        self.background_cards = limits.background_cards;
        self
    }

    /// Bytes the in-memory indexes hold now.
    pub fn index_bytes(&self) -> usize {
        self.index.bytes()
    }

    /// Drops the in-memory indexes of orgs without an index board for `idle` (a background task
    /// does this every minute with `index_cache::INDEX_IDLE`); returns how many.
    pub fn evict_idle_indexes(&self, idle: Duration) -> usize {
        self.index.evict_idle(idle)
    }

    /// Where deep-page selection starts (`DEEP_PAGE_OFFSET`); tests lower it to compare both ways.
    pub fn with_deep_page_offset(mut self, offset: u64) -> Self {
        self.deep_page_offset = offset;
        self
    }

    /// The reads of the org's generation pointer and the projection's state. Two slots (the
    /// org's and `{meta}`): one pipeline on a single server, two requests sent at once on a
    /// cluster.
    fn state_cmds(&self, org: &str) -> Vec<(String, redis::Cmd)> {
        let (pointer_key, state_key) = (self.keys.generation_pointer(org), self.keys.state());
        vec![
            (pointer_key.clone(), redis::cmd("GET").arg(&pointer_key).clone()),
            (state_key.clone(), redis::cmd("HMGET").arg(&state_key).arg(state_field::INSTANCE).arg(state_field::STATUS).clone()),
        ]
    }

    /// The org's generation and keys from the replies of `state_cmds`.
    fn keys_from(&self, org: &str, replies: Vec<redis::Value>) -> Result<(Generation, OrgKeys), ProjectionError> {
        let (pointer, (instance, status)): (Option<String>, (Option<String>, Option<String>)) =
            redis::from_redis_value(redis::Value::Array(replies)).map_err(redis::RedisError::from)?;
        match Status::of(instance.as_deref(), status.as_deref()) {
            Status::Missing => return Err(ProjectionError::NotWhole("projection_missing")),
            Status::Whole => self.index.observe_instance(instance.as_deref().unwrap_or_default()),
            Status::Building => return Err(ProjectionError::NotWhole("projection_rebuilding")),
        }
        let generation = Generation::parse(pointer.as_deref().unwrap_or_default()).ok_or_else(|| bad("generation pointer"))?;
        let keys = self.keys.org_in(&generation, org);
        Ok((generation, keys))
    }

    /// The org's keys in the generation that holds it now (its pointer; absent: the base one)
    /// and its view (`view_at`), in one round trip. A request resolves this once and reads
    /// everything from that generation: a rebuild's switch is atomic per org, and the old
    /// generation stays readable for its grace period. With them, the projection's state: a
    /// request never reads a projection that is not whole. The view is read from the generation
    /// this process last found the org in, beside the pointer (a board pays one round trip
    /// before its cards, not two); an org that switched since is read again from its new one.
    async fn live_view(&self, org: &str, with_token: bool) -> Result<(OrgKeys, Arc<Vec<Pipeline>>, Option<u64>), ProjectionError> {
        let guess = match self.generations.get(org) {
            Some(g) => g,
            None => Generation::parse("").ok_or_else(|| bad("base generation"))?,
        };
        let guessed = self.keys.org_in(&guess, org);
        let mut cmds = self.state_cmds(org);
        let state_replies = cmds.len();
        cmds.extend(view_cmds(&guessed, with_token));
        let mut replies: Vec<redis::Value> = self.conn.clone().query_by_slot(cmds).await?;
        let view_replies = replies.split_off(state_replies);
        let (generation, keys) = self.keys_from(org, replies)?;
        if generation == guess {
            let (pipelines, token) = self.view_from(&keys, view_replies, with_token)?;
            return Ok((keys, pipelines, token));
        }
        self.generations.insert(org.to_string(), generation);
        let (pipelines, token) = self.view_at(&keys, with_token).await?;
        Ok((keys, pipelines, token))
    }

    /// The org's in-memory index, when one is loaded.
    pub fn loaded_index(&self, org: &str) -> Option<std::sync::Arc<super::index_cache::OrgSlot>> {
        self.index.slot(org)
    }

    /// A token that changes whenever anything a projection answer of `org` can depend on
    /// changes — the org's generation, its pipelines, the last change of its cards and users
    /// (the change stream every commit that touches them appends to) — read in one round trip,
    /// without computing the answer. None when the projection cannot answer (not whole, not
    /// built). The caller adds the request and the caller's id; it must not use it for answers
    /// that depend on the current time (`lastMessageTimeRange`) or on MongoDB.
    pub async fn change_token(&self, org: &str) -> Result<Option<u64>, ProjectionError> {
        // Index boards answered from the old generation's index after a switch are not named by
        // the new generation's token.
        if self.index.is_switching(org) {
            return Ok(None);
        }
        let (_, pipelines, token) = match self.live_view(org, true).await {
            Ok(view) => view,
            Err(ProjectionError::NotWhole(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(if pipelines.is_empty() { None } else { token })
    }

    /// The board plan of `q` in the org's live generation: whether the projection can answer it
    /// (whole, built, knowing the pipeline), in one round trip.
    pub async fn plan_of(&self, org: &str, q: &BoardQuery) -> Result<BoardPlan, ProjectionError> {
        Ok(self.live_plan(org, q, false).await?.1)
    }

    /// The org's live keys, the plan of `q` and, if `with_token`, the change token: one round trip.
    async fn live_plan(&self, org: &str, q: &BoardQuery, with_token: bool) -> Result<(OrgKeys, BoardPlan, Option<u64>), ProjectionError> {
        let (keys, pipelines, token) = self.live_view(org, with_token).await?;
        Ok((keys, plan_of(&pipelines, q)?, token))
    }

    pub async fn pipelines(&self, org: &str) -> Result<Vec<Pipeline>, ProjectionError> {
        Ok(self.live_view(org, false).await?.1.as_ref().clone())
    }

    /// The org's pipelines and, if `with_token`, its change token, in one round trip: the token
    /// hashes the generation's key base, the pipelines as stored and the id of the last entry of
    /// the change stream (every commit that changes a card or a user appends one).
    async fn view_at(&self, keys: &OrgKeys, with_token: bool) -> Result<(Arc<Vec<Pipeline>>, Option<u64>), ProjectionError> {
        let replies = self.conn.clone().query_by_slot(view_cmds(keys, with_token)).await?;
        self.view_from(keys, replies, with_token)
    }

    /// The pipelines and the token from the replies of `view_cmds`.
    fn view_from(
        &self,
        keys: &OrgKeys,
        mut replies: Vec<redis::Value>,
        with_token: bool,
    ) -> Result<(Arc<Vec<Pipeline>>, Option<u64>), ProjectionError> {
        use std::hash::Hasher;
        let last: Option<Vec<(String, redis::Value)>> = if with_token { Some(parse_reply(replies.pop())?) } else { None };
        let mut raw: Vec<(String, String)> = parse_reply(replies.pop())?;
        raw.sort();
        let token = last.map(|last| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            h.write(keys.base.as_bytes());
            for (id, json) in &raw {
                h.write(id.as_bytes());
                h.write(json.as_bytes());
            }
            h.write(last.first().map(|(id, _)| id.as_str()).unwrap_or("0-0").as_bytes());
            h.finish()
        });
        Ok((self.parsed_pipelines(raw)?, token))
    }

    /// The pipelines as stored, parsed once per content (every board reads them; parsing their
    /// JSON each time was a few % of a board's CPU). Keyed by the stored JSON itself.
    fn parsed_pipelines(&self, raw: Vec<(String, String)>) -> Result<Arc<Vec<Pipeline>>, ProjectionError> {
        if let Some(hit) = self.pipelines.get(&raw) {
            return Ok(hit);
        }
        let parsed: Vec<Pipeline> = raw
            .iter()
            .map(|(_, json)| {
                serde_json::from_str(json).map_err(|e| ProjectionError::Unavailable(format!("bad pipeline in projection: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let parsed = Arc::new(parsed);
        self.pipelines.insert(raw, parsed.clone());
        Ok(parsed)
    }

    /// `user` is the caller (`my`, `team`); `now` anchors `lastMessageTimeRange`.
    pub async fn answer(
        &self,
        org: &str,
        user: &str,
        q: &BoardQuery,
        now: Millis,
    ) -> Result<(BoardAnswer, ProjectionRoute), ProjectionError> {
        self.answer_with_token(org, user, q, now, None).await.map(|(a, route, _)| (a, route))
    }

    /// The answer and, for a query `nameable_by_change_token`, the org's change token read
    /// before its cards (`change_token`'s value at that moment: a change after it makes the next
    /// token differ), in the same round trip as the pipelines. `among`: the cards MongoDB
    /// matched for the request's custom fields (which the projection does not hold).
    pub async fn answer_with_token(
        &self,
        org: &str,
        user: &str,
        q: &BoardQuery,
        now: Millis,
        among: Option<Vec<String>>,
    ) -> Result<(BoardAnswer, ProjectionRoute, Option<u64>), ProjectionError> {
        self.answer_as(org, user, q, (now, among), |record| card_out_of(record).map_err(|e| bad(&e))).await
    }

    /// `answer_with_token` with each card as the JSON the API sends, rendered once per version
    /// of the card (`card_json`).
    pub async fn rendered_answer(
        &self,
        org: &str,
        user: &str,
        q: &BoardQuery,
        now: Millis,
        among: Option<Vec<String>>,
    ) -> Result<(BoardAnswer<CardJson>, ProjectionRoute, Option<u64>), ProjectionError> {
        self.answer_as(org, user, q, (now, among), |record| self.card_json.of(record).map_err(|e| bad(&e))).await
    }

    /// The answer with each card as `card` makes it from its stored record.
    async fn answer_as<C>(
        &self,
        org: &str,
        user: &str,
        q: &BoardQuery,
        (now, among): (Millis, Option<Vec<String>>),
        card: impl Fn(&[u8]) -> Result<Option<C>, ProjectionError>,
    ) -> Result<(BoardAnswer<C>, ProjectionRoute, Option<u64>), ProjectionError> {
        let found = self.find_pages(org, user, q, now, among).await?;
        let raw = self.raw_records(&found.keys, q.kind, &found.pages).await?;
        let buckets = render(&found.plan, found.pages, raw, card)?;
        Ok((BoardAnswer { kind: q.kind, buckets }, found.route, found.token))
    }

    /// The plan, each bucket's total and page, which structure found them and the change token.
    async fn find_pages(
        &self,
        org: &str,
        user: &str,
        q: &BoardQuery,
        now: Millis,
        among: Option<Vec<String>>,
    ) -> Result<FoundPages, ProjectionError> {
        let (keys, plan, token) = self.live_plan(org, q, q.nameable_by_change_token()).await?;
        let (pages, route, of_keys_generation) = match among {
            None => self.pages_for(&keys, org, user, q, &plan, now).await?,
            Some(ids) => {
                let (pages, of_keys_generation) = self.read_index(&keys, org, user, q, &plan, now, Some(ids)).await?;
                (pages, ProjectionRoute::IndexAmongMongodbIds, of_keys_generation)
            }
        };
        // An index of the generation the org left (a switch's load under way) computed these
        // pages: the new generation's token does not name them.
        Ok(FoundPages { keys, plan, pages, route, token: token.filter(|_| of_keys_generation) })
    }

    /// The plan, each bucket's total and page ids, and which structure answered.
    pub async fn pages(
        &self,
        org: &str,
        user: &str,
        q: &BoardQuery,
        now: Millis,
    ) -> Result<(BoardPlan, Vec<IndexBucket>, ProjectionRoute), ProjectionError> {
        let (keys, plan, _) = self.live_plan(org, q, false).await?;
        let (pages, route, _) = self.pages_for(&keys, org, user, q, &plan, now).await?;
        Ok((plan, pages, route))
    }

    async fn pages_for(
        &self,
        keys: &OrgKeys,
        org: &str,
        user: &str,
        q: &BoardQuery,
        plan: &BoardPlan,
        now: Millis,
    ) -> Result<(Vec<IndexBucket>, ProjectionRoute, bool), ProjectionError> {
        Ok(match SetShape::of(q, user) {
            Some(shape) => (self.read_sets(keys, q.kind, plan, &shape).await?, ProjectionRoute::SortedSets, true),
            None => {
                let (pages, of_keys_generation) = self.read_index(keys, org, user, q, plan, now, None).await?;
                (pages, ProjectionRoute::Index, of_keys_generation)
            }
        })
    }

    /// The Redis work of a board alone, without decoding or rendering (benchmarks compare the
    /// service with it): the pipelines, the sorted-set reads or the index's freshness check,
    /// and the page's records. `index_pages` are the index's answer computed beforehand (its CPU
    /// work is not Redis work). Returns the bytes of records read.
    pub async fn redis_work(
        &self,
        org: &str,
        user: &str,
        q: &BoardQuery,
        index_pages: Option<&[IndexBucket]>,
    ) -> Result<usize, ProjectionError> {
        let (keys, plan, _) = self.live_plan(org, q, false).await?;
        let pages = match (SetShape::of(q, user), index_pages) {
            (Some(shape), _) => self.read_sets(&keys, q.kind, &plan, &shape).await?,
            (None, Some(pages)) => {
                self.index.current(org, &keys).await?;
                pages.to_vec()
            }
            (None, None) => return Err(bad("the index's pages are needed for an index board")),
        };
        let records = self.raw_records(&keys, q.kind, &pages).await?;
        Ok(records.iter().flatten().map(Vec::len).sum())
    }

    /// Totals and page ids from the sorted sets, in one round trip: per raw stage set of each
    /// bucket a count and a range read. A shallow page (offset below `deep_page_offset`) reads
    /// the first offset + limit of each set with scores (by rank, the cheapest read), so a bucket
    /// that spans several sets (legacy cards, status-only cards) is merged here at once. A deep
    /// page reads just its slice by rank; if its bucket spans several non-empty sets, a second
    /// round trip selects it inside Redis with `pb_union_page` (work proportional to the page).
    async fn read_sets(
        &self,
        keys: &OrgKeys,
        kind: CardKind,
        plan: &BoardPlan,
        shape: &SetShape,
    ) -> Result<Vec<IndexBucket>, ProjectionError> {
        let sets: Vec<Vec<String>> =
            plan.buckets.iter().map(|b| plan.raw_keys(b).iter().map(|rk| shape.key(keys, kind, rk)).collect()).collect();
        let mut pipe = redis::pipe();
        for (b, keys) in plan.buckets.iter().zip(&sets) {
            let shallow = b.offset < self.deep_page_offset;
            let (first, count) = if shallow { (0, b.offset + b.limit) } else { (b.offset, b.limit) };
            for key in keys {
                match &shape.created {
                    None => {
                        pipe.cmd("ZCARD").arg(key);
                        pipe.cmd("ZRANGE").arg(key).arg(first).arg((first + count).saturating_sub(1)).arg("REV");
                    }
                    Some((min, max)) => {
                        pipe.cmd("ZCOUNT").arg(key).arg(min).arg(max);
                        pipe.cmd("ZRANGE").arg(key).arg(max).arg(min).arg("BYSCORE").arg("REV").arg("LIMIT").arg(first).arg(count);
                    }
                }
                if shallow {
                    pipe.arg("WITHSCORES");
                }
            }
        }
        let mut replies = pipe.query_async::<Vec<redis::Value>>(&mut self.conn.clone()).await?.into_iter();
        let mut next = || replies.next().ok_or_else(|| bad("reply count"));
        let mut out = Vec::with_capacity(plan.buckets.len());
        let mut deep_spanning: Vec<(usize, Vec<String>)> = Vec::new();
        for (i, (b, keys)) in plan.buckets.iter().zip(&sets).enumerate() {
            let shallow = b.offset < self.deep_page_offset;
            let (mut total, mut non_empty, mut ids) = (0u64, Vec::new(), Vec::new());
            let mut merged: Vec<(f64, String)> = Vec::new();
            for key in keys {
                let n: u64 = redis::from_redis_value(next()?).map_err(|e| bad(&e.to_string()))?;
                if shallow {
                    let part: Vec<(String, f64)> = redis::from_redis_value(next()?).map_err(|e| bad(&e.to_string()))?;
                    merged.extend(part.into_iter().map(|(id, s)| (s, id)));
                } else {
                    let page: Vec<String> = redis::from_redis_value(next()?).map_err(|e| bad(&e.to_string()))?;
                    if n > 0 {
                        ids = page;
                    }
                }
                if n > 0 {
                    total += n;
                    non_empty.push(key.clone());
                }
            }
            if shallow {
                merged.sort_by(|x, y| BoardPlace::of_score(x.0, &x.1).cmp(&BoardPlace::of_score(y.0, &y.1)));
                ids = merged.into_iter().skip(b.offset as usize).take(b.limit as usize).map(|(_, id)| id).collect();
            } else if non_empty.len() > 1 {
                deep_spanning.push((i, non_empty));
            }
            out.push(IndexBucket { total, ids });
        }
        if !deep_spanning.is_empty() {
            let (min, max) = shape.created.clone().unwrap_or_else(|| ("-inf".into(), "+inf".into()));
            let mut pipe = redis::pipe();
            for (i, keys) in &deep_spanning {
                let b = &plan.buckets[*i];
                pipe.add_command(union_page_cmd(keys, b.offset, b.limit, &min, &max));
            }
            let replies = self.query_reads(pipe).await?;
            for ((i, _), reply) in deep_spanning.iter().zip(replies) {
                out[*i].ids = redis::from_redis_value(reply).map_err(|e| bad(&e.to_string()))?;
            }
        }
        Ok(out)
    }

    /// Runs read commands; loads the Function library once if Redis lost it (a restart without
    /// persistence) and the reads use `pb_union_page`.
    async fn query_reads(&self, pipe: redis::Pipeline) -> Result<Vec<redis::Value>, ProjectionError> {
        let mut conn = self.conn.clone();
        match pipe.query_async::<Vec<redis::Value>>(&mut conn).await {
            Err(e) if board_redis::functions::is_missing(&e) => {
                board_redis::functions::load_library(&mut conn).await?;
                Ok(pipe.query_async(&mut conn).await?)
            }
            other => Ok(other?),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn read_index(
        &self,
        keys: &OrgKeys,
        org: &str,
        user: &str,
        q: &BoardQuery,
        plan: &BoardPlan,
        now: Millis,
        among: Option<Vec<String>>,
    ) -> Result<(Vec<IndexBucket>, bool), ProjectionError> {
        let slot = self.index.current(org, keys).await?;
        let deadline = Instant::now() + self.index_deadline;
        // The org's walks share its permits: its expensive boards wait here, not other orgs'.
        let permit = slot.walk_permit(deadline.into()).await.ok_or(IndexError::Deadline)?;
        let (q, plan, user, base) = (q.clone(), plan.clone(), user.to_string(), keys.base.clone());
        let large = slot.cards() >= self.background_cards;
        let walk = move || {
            let (_permit, _walking) = (permit, slot.start_walk());
            let index = slot.index();
            let index = index.read().expect("not poisoned");
            (index.answer(&plan, &q, (&user, now), among.as_deref(), deadline), index.base == base)
        };
        // A large org's walk at a lower CPU priority: small orgs' boards keep their latency.
        let (answered, of_keys_generation) = if large {
            self.background.run(walk).await.map_err(|e| ProjectionError::Unavailable(format!("index walk: {e}")))?
        } else {
            tokio::task::spawn_blocking(walk).await.map_err(|e| ProjectionError::Unavailable(format!("index task: {e}")))?
        };
        Ok((answered?, of_keys_generation))
    }

    /// The page's card records, as stored, in page order: one HMGET for the whole board.
    async fn raw_records(&self, keys: &OrgKeys, kind: CardKind, pages: &[IndexBucket]) -> Result<Vec<Option<Vec<u8>>>, ProjectionError> {
        let ids: Vec<&String> = pages.iter().flat_map(|p| &p.ids).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HMGET").arg(keys.cards(kind)).arg(&ids).query_async(&mut conn).await?)
    }
}

/// The board plan of `q` over the org's projected pipelines (none: the org is not projected).
fn plan_of(pipelines: &[Pipeline], q: &BoardQuery) -> Result<BoardPlan, ProjectionError> {
    if pipelines.is_empty() {
        return Err(ProjectionError::NotBuilt);
    }
    Ok(board::plan(pipelines, q)?)
}

/// The reads of an org's view: its pipelines and, with the token, the change stream's last id.
fn view_cmds(keys: &OrgKeys, with_token: bool) -> Vec<(String, redis::Cmd)> {
    let mut cmds = vec![(keys.pipelines(), redis::cmd("HGETALL").arg(keys.pipelines()).clone())];
    if with_token {
        cmds.push((keys.changes(), redis::cmd("XREVRANGE").arg(keys.changes()).arg("+").arg("-").arg("COUNT").arg(1).clone()));
    }
    cmds
}

/// What `find_pages` found.
struct FoundPages {
    keys: OrgKeys,
    plan: BoardPlan,
    pages: Vec<IndexBucket>,
    route: ProjectionRoute,
    token: Option<u64>,
}

/// The buckets of the answer from the pages and their records (`raw`, in page order), each
/// card as `card` makes it from its record.
fn render<C>(
    plan: &BoardPlan,
    pages: Vec<IndexBucket>,
    raw: Vec<Option<Vec<u8>>>,
    card: impl Fn(&[u8]) -> Result<Option<C>, ProjectionError>,
) -> Result<Vec<BucketAnswer<C>>, ProjectionError> {
    let mut raw = raw.into_iter();
    let mut out = Vec::with_capacity(plan.buckets.len());
    for (spec, page) in plan.buckets.iter().zip(pages) {
        let mut cards = Vec::with_capacity(page.ids.len());
        for _ in &page.ids {
            // A card deleted between the read of the ids and of the records drops out.
            if let Some(c) = raw.next().flatten().map(|r| card(&r)).transpose()?.flatten() {
                cards.push(c);
            }
        }
        out.push(BucketAnswer { name: spec.name.clone(), stage_id: spec.stage.as_ref().map(|s| s.id.clone()), total: page.total, cards });
    }
    Ok(out)
}

/// One reply of a pipeline, as `T`.
fn parse_reply<T: redis::FromRedisValue>(reply: Option<redis::Value>) -> Result<T, ProjectionError> {
    redis::from_redis_value(reply.ok_or_else(|| bad("reply count"))?).map_err(|e| bad(&e.to_string()))
}

fn bad(what: &str) -> ProjectionError {
    ProjectionError::Unavailable(format!("unexpected projection reply: {what}"))
}
