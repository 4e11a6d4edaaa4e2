//! Applies a batch of parsed events to Redis: reads what the pure batch step (`batch.rs`) asks
//! for, one pipelined round trip per round, then commits every org's writes with one pipelined
//! round trip of `FCALL pb_commit` (atomic per org). An org whose commit met a concurrent change
//! (another projector wrote a value this batch read) is read again and recomputed.
use crate::batch::{self, Outcome, Slot, Snapshot, Step};
use crate::events;
use board_model::events::Event;
use board_model::keys::{Generation, KeySpace, OrgKeys};
use board_redis::functions::{commit_writes, load_library, Commit, CommitOutcome};
use board_redis::redis_conn::{ConnectOptions, RedisConn, RedisTarget, Route};
use redis::RedisError;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};
use tracing::warn;

/// Redis could not take the batch now (down, restarting, out of memory, failing over). The
/// batch is retried as a whole: its writes are a pure function of what it reads.
#[derive(Debug, thiserror::Error)]
#[error("redis unavailable: {0}")]
pub struct Transient(pub String);

impl From<RedisError> for Transient {
    fn from(e: RedisError) -> Self {
        Transient(e.to_string())
    }
}

/// Where an applier writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The live projection: each org's current generation (its pointer), every commit guarded
    /// by it, so a switch by `rebuild` is never written past.
    Live,
    /// One generation being built by `rebuild`, whatever the pointers say.
    Building(Generation),
}

/// Where one event came from: its offsets become the org's applied offsets in the commit (a
/// partition below 0: no offset, e.g. a document of a MongoDB snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

pub struct RedisApplier {
    conn: RedisConn,
    keys: KeySpace,
    target: Target,
    /// The generation of each org seen (Live): a commit answered `moved` corrects it.
    generations: HashMap<String, Generation>,
    /// Replicas that must hold a batch's writes before it counts as applied (see
    /// `await_replicas`): 1 on a cluster, 0 on a single server (nothing to wait for).
    replica_acks: u32,
    /// Shards found without a connected replica, until when they are not waited for.
    without_replica: HashMap<Route, Instant>,
    /// The write counter each org's commit last answered (shared with the projector's watch).
    pub write_counters: WriteCounters,
    /// Set by another task (a source that found the projection lost): the generations are
    /// forgotten before the next batch.
    forget: ForgetGenerations,
}

/// Asks an applier, from another task, to forget its orgs' generations before its next batch
/// (after Redis lost the projection: the pointers it read may name generations gone).
#[derive(Debug, Clone, Default)]
pub struct ForgetGenerations(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl ForgetGenerations {
    pub fn ask(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    fn take(&self) -> bool {
        self.0.swap(false, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Per org key base (`OrgKeys::base`): the highest write counter its commits answered to this
/// process, and the orgs whose counter went back (a commit answered a number already seen): the
/// projector's rewind check (`rewind.rs`) reads both.
#[derive(Debug, Clone, Default)]
pub struct WriteCounters(std::sync::Arc<std::sync::Mutex<CountersSeen>>);

#[derive(Debug, Default)]
pub struct CountersSeen {
    pub seen: HashMap<String, i64>,
    pub went_back: Vec<String>,
}

impl WriteCounters {
    /// Records a commit's counter; a counter not above the last one seen means the org's keys
    /// went back in time.
    pub fn record(&self, base: &str, writes: i64) {
        if writes <= 0 {
            return; // a library of an older build: no counter
        }
        let mut c = self.0.lock().expect("not poisoned");
        match c.seen.get(base) {
            Some(prev) if writes <= *prev => c.went_back.push(base.to_string()),
            _ => {
                c.seen.insert(base.to_string(), writes);
            }
        }
    }
    /// The counters seen, to compare with what Redis holds.
    pub fn seen(&self) -> Vec<(String, i64)> {
        self.0.lock().expect("not poisoned").seen.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
    /// The orgs found gone back since the last call.
    pub fn take_went_back(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().expect("not poisoned").went_back)
    }
    /// The last counter a commit of `base` answered.
    pub fn get(&self, base: &str) -> Option<i64> {
        self.0.lock().expect("not poisoned").seen.get(base).copied()
    }
    /// A commit found `base` below the counter seen (refused).
    pub fn went_back(&self, base: &str) {
        self.0.lock().expect("not poisoned").went_back.push(base.to_string());
    }
    /// Whether a went-back org waits to be handled.
    pub fn any_went_back(&self) -> bool {
        !self.0.lock().expect("not poisoned").went_back.is_empty()
    }
    /// Stops comparing one base (an org's old generation, removed after a switch).
    pub fn forget(&self, base: &str) {
        self.0.lock().expect("not poisoned").seen.remove(base);
    }
    /// Starts over (a projection made again: its counters start again too).
    pub fn clear(&self) {
        let mut c = self.0.lock().expect("not poisoned");
        c.seen.clear();
        c.went_back.clear();
    }
}

/// How long a batch waits for its replicas' acknowledgement.
const REPLICA_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// A step that keeps asking for more after this many read rounds has a bug (each round adds
/// slots, and a batch touches finitely many): fail the batch rather than loop.
const MAX_READ_ROUNDS: usize = 16;
/// Conflicts of one org in a row before the batch is given up as transient (and retried whole).
const MAX_CONFLICTS: usize = 50;

impl RedisApplier {
    /// Connects (retrying inside the connection manager) and loads the Function library.
    pub async fn connect(url: &str, keys: KeySpace) -> Result<Self, RedisError> {
        let options = ConnectOptions { response_timeout: Duration::from_secs(30), ..ConnectOptions::default() };
        let mut conn = RedisConn::connect(&RedisTarget::parse(url, false), options).await?;
        load_library(&mut conn).await?;
        let replica_acks = if conn.is_cluster() { 1 } else { 0 };
        Ok(RedisApplier {
            conn,
            keys,
            target: Target::Live,
            generations: HashMap::new(),
            replica_acks,
            without_replica: HashMap::new(),
            write_counters: WriteCounters::default(),
            forget: ForgetGenerations::default(),
        })
    }

    /// Writes into `target` from now on.
    pub fn with_target(mut self, target: Target) -> Self {
        self.target = target;
        self.generations.clear();
        self
    }

    /// The handle through which another task asks this applier to forget its generations.
    pub fn forget_handle(&self) -> ForgetGenerations {
        self.forget.clone()
    }

    /// Reads the generation pointers of orgs not seen yet, in one round trip.
    async fn resolve_generations(&mut self, orgs: &[&str]) -> Result<(), Transient> {
        if self.target != Target::Live {
            return Ok(());
        }
        let unknown: Vec<&str> = orgs.iter().copied().filter(|o| !self.generations.contains_key(*o)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let gets =
            unknown.iter().map(|org| self.keys.generation_pointer(org)).map(|k| (k.clone(), redis::cmd("GET").arg(k).clone())).collect();
        let names: Vec<Option<String>> = self.conn.query_by_slot(gets).await?;
        for (org, name) in unknown.into_iter().zip(names) {
            let name = name.unwrap_or_default();
            let generation = Generation::parse(&name).ok_or_else(|| Transient(format!("org {org}: bad generation pointer {name:?}")))?;
            self.generations.insert(org.to_string(), generation);
        }
        Ok(())
    }

    fn org_keys(&self, org: &str) -> (OrgKeys, Option<(String, Generation)>) {
        match &self.target {
            Target::Building(g) => (self.keys.org_in(g, org), None),
            Target::Live => {
                let g = self.generations.get(org).cloned().unwrap_or_default();
                (self.keys.org_in(&g, org), Some((self.keys.generation_pointer(org), g)))
            }
        }
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Applies `events` (from `positions`, one each) in order; one outcome per event. Err:
    /// nothing may be assumed applied (orgs committed before the error are committed: a retry
    /// finds their events stale).
    pub async fn apply(&mut self, events: &[&Event], positions: &[Position<'_>]) -> Result<Vec<Outcome>, Transient> {
        debug_assert_eq!(events.len(), positions.len());
        if self.forget.take() {
            self.generations.clear();
        }
        let mut by_org: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, e) in events.iter().enumerate() {
            by_org.entry(e.org_id()).or_default().push(i);
        }
        // Per org, the offset after its last event of each partition: recorded with its data.
        let offsets: HashMap<&str, Vec<(String, i64)>> = by_org
            .iter()
            .map(|(org, idx)| {
                let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
                for i in idx.iter().filter(|i| positions[**i].partition >= 0) {
                    let p = positions[*i];
                    let e = next.entry((p.topic, p.partition)).or_insert(0);
                    *e = (*e).max(p.offset + 1);
                }
                (*org, next.into_iter().map(|((t, p), o)| (board_model::offsets::field(t, p), o)).collect())
            })
            .collect();
        let orgs: Vec<&str> = by_org.keys().copied().collect();
        self.resolve_generations(&orgs).await?;
        let mut outcomes = vec![Outcome::Stale; events.len()];
        let mut snap = Snapshot::new();
        let mut pending: Vec<&str> = by_org.keys().copied().collect();
        let mut conflicts: HashMap<&str, usize> = HashMap::new();
        let mut written: Vec<String> = Vec::new();
        while !pending.is_empty() {
            // Read until every pending org's step is done.
            let mut commits: Vec<(&str, Commit)> = Vec::new();
            let mut rounds = 0;
            loop {
                let mut need: Vec<Slot> = Vec::new();
                let mut done: Vec<(&str, Option<Commit>, Vec<Outcome>)> = Vec::new();
                for org in &pending {
                    let (keys, generation) = self.org_keys(org);
                    let evs: Vec<&Event> = by_org[org].iter().map(|i| events[*i]).collect();
                    match batch::step(&keys, &evs, &snap) {
                        Step::Need(slots) => need.extend(slots),
                        Step::Done { commit, outcomes, undecodable } => {
                            if undecodable > 0 {
                                warn!(org, undecodable, "stored values of an older model replaced");
                            }
                            // Even a batch of stale events moves the org's applied offsets.
                            let mut commit = commit.map(|c| *c).unwrap_or_else(|| Commit {
                                org: keys.clone(),
                                guards: Vec::new(),
                                writes: Vec::new(),
                                generation: None,
                                offsets: Vec::new(),
                                min_writes: None,
                            });
                            // The live projection's commits must not land on keys gone back in
                            // time (their offsets would pass events the keys no longer hold).
                            if self.target == Target::Live {
                                commit.min_writes = self.write_counters.get(&keys.base);
                            }
                            commit.generation = generation;
                            commit.offsets = offsets[org].clone();
                            done.push((org, Some(commit), outcomes));
                        }
                    }
                }
                if need.is_empty() {
                    for (org, commit, outs) in done {
                        for (i, o) in by_org[org].iter().zip(outs) {
                            outcomes[*i] = o;
                        }
                        if let Some(c) = commit {
                            commits.push((org, c));
                        }
                    }
                    break;
                }
                rounds += 1;
                if rounds > MAX_READ_ROUNDS {
                    return Err(Transient(format!("batch step still needs {} values after {MAX_READ_ROUNDS} rounds", need.len())));
                }
                self.read(need, &mut snap).await?;
            }
            if commits.is_empty() {
                break;
            }
            let calls = commits.iter().map(|(_, c)| (c.org.base.clone(), c.to_cmd())).collect();
            let replies: Vec<String> = match self.conn.query_by_slot(calls).await {
                Ok(r) => r,
                Err(e) => {
                    if board_redis::functions::is_missing(&e) {
                        // Redis restarted without persistence: load the library for the retry.
                        let _ = load_library(&mut self.conn).await;
                    }
                    return Err(e.into());
                }
            };
            pending.clear();
            for ((org, commit), reply) in commits.iter().zip(replies) {
                match CommitOutcome::parse(&reply) {
                    Some(CommitOutcome::Committed) => {
                        if let Some(writes) = commit_writes(&reply) {
                            self.write_counters.record(&commit.org.base, writes);
                        }
                    }
                    Some(CommitOutcome::Conflict) => {
                        let n = conflicts.entry(org).or_default();
                        *n += 1;
                        if *n > MAX_CONFLICTS {
                            return Err(Transient(format!("org {org}: {MAX_CONFLICTS} commit conflicts in a row")));
                        }
                        events::CommitConflict { org }.emit();
                        for g in &commit.guards {
                            snap.remove(&g.key, &g.field);
                        }
                        pending.push(org);
                    }
                    Some(CommitOutcome::Moved(generation)) => {
                        events::CommitMoved { org, generation: &generation }.emit();
                        self.generations.insert(org.to_string(), generation);
                        let n = conflicts.entry(org).or_default();
                        *n += 1;
                        if *n > MAX_CONFLICTS {
                            return Err(Transient(format!("org {org}: {MAX_CONFLICTS} generation moves in a row")));
                        }
                        pending.push(org);
                    }
                    Some(CommitOutcome::Rewound(held)) => {
                        self.write_counters.went_back(&commit.org.base);
                        return Err(Transient(format!("org keys {} went back in time (write counter {held})", commit.org.base)));
                    }
                    None => return Err(Transient(format!("unexpected pb_commit reply {reply:?}"))),
                }
            }
            written.extend(commits.iter().map(|(_, c)| c.org.base.clone()));
        }
        self.await_replicas(&written).await?;
        Ok(outcomes)
    }

    /// Waits until `replica_acks` replicas of each written shard hold the batch's writes (WAIT),
    /// before the caller records its offsets: with asynchronous replication a primary that dies
    /// right after a commit could otherwise take it along, while the progress says it was
    /// applied. A shard without a connected replica (its replica died or was promoted after a
    /// failover) is not waited for — nothing could be promoted in its place with less data — and
    /// is asked again (`ROLE`) a second later; its batches are counted as
    /// `pb_commit_unreplicated_total`. A replica connected but not acknowledging in time is
    /// logged and counted, not waited for forever.
    async fn await_replicas(&mut self, written: &[String]) -> Result<(), Transient> {
        if self.replica_acks == 0 || written.is_empty() {
            return Ok(());
        }
        let routes: HashSet<Route> = written.iter().map(|k| RedisConn::route_of(k)).collect();
        for route in routes {
            if let Some(until) = self.without_replica.get(&route) {
                if Instant::now() < *until {
                    events::CommitUnreplicated.emit();
                    continue;
                }
                if self.conn.replicas_of(route).await? == 0 {
                    self.without_replica.insert(route, Instant::now() + Duration::from_secs(1));
                    events::CommitUnreplicated.emit();
                    continue;
                }
                self.without_replica.remove(&route);
            }
            let acked = self.conn.wait_on(route, self.replica_acks, REPLICA_ACK_TIMEOUT).await?;
            if acked < self.replica_acks as i64 {
                events::CommitUnreplicated.emit();
                if self.conn.replicas_of(route).await? == 0 {
                    warn!(?route, "a shard has no connected replica: its writes are not waited for until one connects");
                    self.without_replica.insert(route, Instant::now() + Duration::from_secs(1));
                } else {
                    warn!(?route, acked, wanted = self.replica_acks, "a batch's writes were not acknowledged by enough replicas in time");
                }
            }
        }
        Ok(())
    }

    /// Reads `slots` into `snap`: one HMGET per hash, all in one round trip.
    async fn read(&mut self, slots: Vec<Slot>, snap: &mut Snapshot) -> Result<(), Transient> {
        let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in slots {
            by_key.entry(s.key).or_default().push(s.field);
        }
        let reads = by_key.iter().map(|(key, fields)| (key.clone(), redis::cmd("HMGET").arg(key).arg(fields).clone())).collect();
        let replies: Vec<Vec<Option<Vec<u8>>>> = self.conn.query_by_slot(reads).await?;
        for ((key, fields), values) in by_key.into_iter().zip(replies) {
            for (field, value) in fields.into_iter().zip(values) {
                snap.insert(Slot { key: key.clone(), field }, value);
            }
        }
        Ok(())
    }
}
