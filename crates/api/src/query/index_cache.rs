//! Keeps one `OrgIndex` per org in the API's memory, current with the projection: loaded on the
//! first board that needs it, then brought up to date before each such board from the org's
//! change stream (`K:changes`, written by the same atomic commit as the records).
//!
//! A load reads the org's index image (`K:index-image`, `index/image.rs`) when one is stored
//! that the change stream still brings up to date, and catches it up; else it builds the index
//! from the card records and, for an org of `image_min_cards` or more, stores its image for the
//! next instance (a new or restarted one, or this one after an eviction): a million cards were
//! read from an image in 1.4 s and built from records in 7.3 s (docs/benchmarks.md). An instance that
//! holds an org stores its image again once it applied `IMAGE_REFRESH_ENTRIES` stream entries
//! since, so that the image stays within what the stream keeps while the org is in use.
//! A reader that fell further behind than the stream keeps (the stream holds fewer entries than
//! were added since its position, before or while it catches up: `MAXLEN` trims do not show in
//! `max-deleted-entry-id` on Redis 7.0), that finds the stream behind its position (Redis
//! went back in time, or the stream was made again) or that sees the projection's instance
//! change (a heal after Redis lost it) reloads the org.
//!
//! Memory is bounded: the resident indexes' bytes (`OrgIndex::bytes`) are kept under a budget
//! (`INDEX_MEMORY_LIMIT`) by dropping the least recently used orgs' indexes. Not in the budget,
//! and to be left beside it in the process's memory (README, Scaling): the indexes being built
//! (at most `LOADS_AT_ONCE` at once, streamed from the records chunk by chunk), an old index kept
//! while its org's new generation loads, and dropped indexes that walks in flight still read.
use super::index::OrgIndex;
use super::projection::IndexLimits;
use crate::events::ImageOutcome;
use arc_swap::ArcSwap;
use board_model::keys::{Changed, OrgKeys};
use board_model::model::CardKind;
use board_model::record::CardRecord;
use board_redis::functions::image::{image_head_cmd, image_part_cmd, image_put_cmd, ImageHead, ImageHeadReply, ImagePut, IMAGE_PART_BYTES};
use board_redis::functions::{fcall, CHANGES_MAXLEN};
use board_redis::redis_conn::RedisConn;
use redis::{RedisError, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tracing::info;

/// One org's index and the lock that serializes its loading and catching up.
///
/// Who waits for whom: an index walk (a board) holds a read lock of the index it started on, on
/// a blocking thread; a catch-up takes the write lock on a blocking thread too, so an async
/// worker never waits for a walk; a load swaps in a new index without waiting for the walks of
/// the old one (they finish on it); the sweeper reads only atomics.
pub struct OrgSlot {
    sync: tokio::sync::Mutex<bool>,
    index: ArcSwap<RwLock<OrgIndex>>,
    /// Cards in the index and the bytes it holds (the budget and the metrics read these, never
    /// the index's lock).
    cards: AtomicUsize,
    bytes: AtomicUsize,
    /// Unix milliseconds of the last board that used it: the least recently used orgs are
    /// dropped when the budget is exceeded, idle ones every minute.
    last_used: AtomicI64,
    /// A load of the org's new generation (after a rebuild's switch) is under way.
    switching: AtomicBool,
    /// The org's walks that may run at once (`INDEX_WALKS_PER_ORG`): one org's expensive boards
    /// take at most this many cores, and the other orgs' boards the rest.
    walks: Arc<tokio::sync::Semaphore>,
    /// Boards waiting for a walk permit, walks running, and the most that ever ran at once
    /// (counted by the walks themselves: what the bound is checked by).
    walks_waiting: AtomicUsize,
    walking: AtomicUsize,
    most_walking: AtomicUsize,
    /// Change-stream entries the index applied since the newest image it knows of (the one it
    /// was read from or stored), and whether an image of it is being stored.
    image_lag: AtomicUsize,
    storing_image: AtomicBool,
    /// Unix milliseconds of the last attempt to store its image.
    image_stored_at: AtomicI64,
    /// Where the last load found the index (`LoadedFrom` as a number; 0: not loaded).
    loaded_from: std::sync::atomic::AtomicU8,
}

/// Counts a walk while it runs (`OrgSlot::start_walk`).
pub struct Walking<'a>(&'a OrgSlot);

impl Drop for Walking<'_> {
    fn drop(&mut self) {
        self.0.walking.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What `OrgSlot::walks` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkCounts {
    pub running: usize,
    pub waiting: usize,
    pub most_running: usize,
}

impl OrgSlot {
    fn new(walks_allowed: usize) -> OrgSlot {
        OrgSlot {
            sync: tokio::sync::Mutex::default(),
            index: ArcSwap::default(),
            cards: AtomicUsize::default(),
            bytes: AtomicUsize::default(),
            last_used: AtomicI64::default(),
            switching: AtomicBool::default(),
            walks: Arc::new(tokio::sync::Semaphore::new(walks_allowed)),
            walks_waiting: AtomicUsize::default(),
            walking: AtomicUsize::default(),
            most_walking: AtomicUsize::default(),
            image_lag: AtomicUsize::default(),
            storing_image: AtomicBool::default(),
            image_stored_at: AtomicI64::default(),
            loaded_from: Default::default(),
        }
    }

    /// Waits (until `deadline`) for one of the org's walk permits; None when the deadline passed.
    pub async fn walk_permit(&self, deadline: tokio::time::Instant) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.walks_waiting.fetch_add(1, Ordering::Relaxed);
        let permit = tokio::time::timeout_at(deadline, self.walks.clone().acquire_owned()).await;
        self.walks_waiting.fetch_sub(1, Ordering::Relaxed);
        permit.ok().map(|p| p.expect("the semaphore is never closed"))
    }

    /// Where the index in place was found (None: no index loaded).
    pub fn loaded_from(&self) -> Option<LoadedFrom> {
        match self.loaded_from.load(Ordering::Relaxed) {
            1 => Some(LoadedFrom::Image),
            2 => Some(LoadedFrom::Records),
            _ => None,
        }
    }

    /// Cards in the org's index.
    pub fn cards(&self) -> usize {
        self.cards.load(Ordering::Relaxed)
    }

    /// Counts a walk from now until the guard drops.
    pub fn start_walk(&self) -> Walking<'_> {
        let now = self.walking.fetch_add(1, Ordering::Relaxed) + 1;
        self.most_walking.fetch_max(now, Ordering::Relaxed);
        Walking(self)
    }

    pub fn walks(&self) -> WalkCounts {
        WalkCounts {
            running: self.walking.load(Ordering::Relaxed),
            waiting: self.walks_waiting.load(Ordering::Relaxed),
            most_running: self.most_walking.load(Ordering::Relaxed),
        }
    }

    /// The current index; a board walks it under its read lock, on a blocking thread.
    pub fn index(&self) -> Arc<RwLock<OrgIndex>> {
        self.index.load_full()
    }

    /// Puts a newly loaded index in place, found where `from` says (None: an empty index that
    /// stands for none): boards that started on the old one finish on it.
    fn replace(&self, mut index: OrgIndex, from: Option<LoadedFrom>) {
        self.cards.store(index.len(), Ordering::Relaxed);
        self.bytes.store(index.account(), Ordering::Relaxed);
        self.index.store(Arc::new(RwLock::new(index)));
        let from = match from {
            Some(LoadedFrom::Image) => 1,
            Some(LoadedFrom::Records) => 2,
            None => 0,
        };
        self.loaded_from.store(from, Ordering::Relaxed);
    }

    /// The index's position in the change stream and its generation. Called under `sync`, which
    /// every writer holds too: no writer waits, so this read lock is never waited for.
    fn position(&self) -> (String, u64, String) {
        let index = self.index.load();
        let index = index.read().expect("not poisoned");
        (index.stream_id.clone(), index.stream_added, index.base.clone())
    }
}

/// An org's index is dropped after this long without an index board: the API's memory follows
/// the orgs being worked on, and a dropped org is loaded again on its next index board.
pub const INDEX_IDLE: Duration = Duration::from_secs(600);

/// The default index budget, for a 1 GiB pod: measured with it, the API held 820 MiB RSS after
/// a board of each of 12,021 orgs and 767 MiB at the end of the run (a million-card org's load
/// or image in flight is not in the budget; docs/benchmarks.md "Many orgs").
pub const DEFAULT_INDEX_MEMORY_LIMIT: usize = 512 << 20;

/// The default `INDEX_WALKS_PER_ORG`: half the cores (at least one), so that one org's boards
/// leave the other half to every other org.
pub fn default_walks_per_org() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// The default `INDEX_IMAGE_MIN_CARDS`: smaller orgs build from their records in milliseconds
/// (500 cards: ~9 ms) and keep no image in Redis.
pub const DEFAULT_IMAGE_MIN_CARDS: usize = 5_000;

/// An instance stores an org's image again once its index applied this many change-stream
/// entries since the last image: well before the stream (`CHANGES_MAXLEN` entries, trimmed
/// approximately) no longer holds the image's position, past which it cannot be caught up.
const IMAGE_REFRESH_ENTRIES: usize = CHANGES_MAXLEN / 2;

/// An org's image is stored again no sooner than this after the last attempt, however many
/// stream entries its index applied meanwhile (an encode holds the index for ~0.6 s a million
/// cards).
const IMAGE_REFRESH_MIN_MILLIS: i64 = 60_000;

/// Images above this are not stored: sending one holds it about three times for a moment
/// (`image_put_cmd`), and an org this large builds from its records. It also bounds the parts
/// `pb_image_put_parts` unpacks (256 of `IMAGE_PART_BYTES`, far below Lua's limit).
const MAX_IMAGE_BYTES: usize = 256 << 20;

/// Where a load found the org's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadedFrom {
    Image,
    Records,
}

impl LoadedFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadedFrom::Image => "image",
            LoadedFrom::Records => "records",
        }
    }
}

/// Loads that run at once (each holds a chunk of records besides its growing index).
const LOADS_AT_ONCE: usize = 2;

/// Once over the budget, orgs are dropped until the indexes fit in this share of it (not one
/// org per load when the budget is full).
const EVICT_TO: f64 = 0.9;

/// The bytes the orgs' indexes hold, by their counters (no index lock taken).
fn resident_bytes(orgs: &HashMap<String, Arc<OrgSlot>>) -> usize {
    orgs.values().map(|s| s.bytes.load(Ordering::Relaxed)).sum()
}

/// Returns the memory glibc's malloc keeps after large frees (a load's buffers, an image,
/// dropped indexes) to the system: the C parts (zstd's contexts) and the in-process test servers
/// allocate with it, and it keeps freed memory in its arenas until `malloc_trim`. The binary's
/// own allocator, mimalloc, returns freed pages by itself after a short delay (forcing it with
/// `mi_collect` made the loads after it slower: they faulted the pages in again). On a
/// blocking thread: a trim walks the heap; at most one a second.
fn give_back_freed_memory() {
    static LAST_TRIM: AtomicI64 = AtomicI64::new(0);
    let (now, last) = (now_millis(), LAST_TRIM.load(Ordering::Relaxed));
    if now - last < 1_000 || LAST_TRIM.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim only returns free memory to the system; it touches no live
        // allocation.
        unsafe { libc::malloc_trim(0) };
    });
}

/// Image parts received and not yet decoded, at most: a few MiB, whatever the image's size.
const PARTS_AHEAD: usize = 2;

/// The bytes of an image's parts as they arrive from Redis, for a decoder on a blocking thread;
/// ends where the parts stop coming.
struct ImageParts {
    arriving: tokio::sync::mpsc::Receiver<Vec<u8>>,
    part: Vec<u8>,
    at: usize,
}

impl ImageParts {
    fn new(arriving: tokio::sync::mpsc::Receiver<Vec<u8>>) -> Self {
        ImageParts { arriving, part: Vec::new(), at: 0 }
    }
}

impl std::io::Read for ImageParts {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.part.len() {
            match self.arriving.blocking_recv() {
                Some(part) => (self.part, self.at) = (part, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.part.len() - self.at);
        buf[..n].copy_from_slice(&self.part[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Evictions that free at least this many bytes give them back to the system at once.
const TRIM_AFTER_FREEING: usize = 32 << 20;

fn now_millis() -> i64 {
    board_model::time::now_millis()
}

#[derive(Clone)]
pub struct IndexCache {
    conn: RedisConn,
    /// The indexes' byte budget.
    limit: usize,
    walks_per_org: usize,
    /// Orgs of this many cards or more store their index's image.
    image_min_cards: usize,
    loads: Arc<tokio::sync::Semaphore>,
    /// One image stored at a time.
    images: Arc<tokio::sync::Semaphore>,
    orgs: Arc<Mutex<HashMap<String, Arc<OrgSlot>>>>,
    sweeper: Arc<Mutex<bool>>,
    /// The projection instance the indexes were loaded under (`observe_instance`).
    instance: Arc<RwLock<Option<String>>>,
}

/// What an org's index needs before it answers a board.
#[derive(Debug, PartialEq, Eq)]
enum Freshen {
    /// Up to date.
    Nothing,
    /// Read the change stream from the index's position to its end.
    CatchUp,
    /// Load the org again: never loaded, another generation, or the stream lost entries the
    /// index did not read (trimmed past its position) or went back behind it.
    Load,
}

/// Where an org's change stream stands (`XINFO STREAM`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct StreamState {
    /// `last-generated-id` ("0-0": no entry yet).
    last: String,
    /// `max-deleted-entry-id`: raised by XDEL only (Redis 7.0 does not raise it when `MAXLEN`
    /// trims the stream: that is what `added` and `length` tell).
    max_deleted: String,
    /// `entries-added`: every entry ever appended.
    added: u64,
    /// `length`: the entries it holds now.
    length: u64,
}

impl StreamState {
    /// A stream that never had an entry.
    fn empty() -> Self {
        StreamState { last: "0-0".into(), max_deleted: "0-0".into(), added: 0, length: 0 }
    }
}

/// `at`: the index's position in the change stream (its last entry read, and the stream's
/// `entries-added` then: the entries up to it). The entries after it are `added - at_added`;
/// trims take the oldest first, so when the stream holds fewer than that, some of them are gone.
fn freshen(loaded: bool, same_generation: bool, at: &str, at_added: u64, stream: &StreamState) -> Freshen {
    let (pos, last, max_deleted) = (stream_pos(at), stream_pos(&stream.last), stream_pos(&stream.max_deleted));
    let unread = stream.added.checked_sub(at_added);
    if !loaded || !same_generation || pos < max_deleted || last < pos || unread.is_none_or(|n| n > stream.length) {
        Freshen::Load
    } else if pos != last {
        Freshen::CatchUp
    } else {
        Freshen::Nothing
    }
}

/// Card records as HSCAN returns them: (id, bincode).
type RecordChunk = Vec<(String, Vec<u8>)>;

/// A chunk of card records, decoded.
type DecodedChunk = Vec<(String, Option<CardRecord>)>;

/// A stream id `ms-seq` as a comparable pair.
fn stream_pos(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `XINFO STREAM` (`StreamState::empty` when the stream does not exist yet).
async fn stream_state(conn: &mut RedisConn, key: &str) -> Result<StreamState, RedisError> {
    let reply: Result<Value, RedisError> = redis::cmd("XINFO").arg("STREAM").arg(key).query_async(conn).await;
    let fields: Vec<(String, Value)> = match reply {
        Ok(Value::Array(items)) => items.chunks(2).filter_map(|c| Some((text(&c[0])?, c.get(1)?.clone()))).collect(),
        Ok(Value::Map(items)) => items.into_iter().filter_map(|(k, v)| Some((text(&k)?, v))).collect(),
        Ok(_) => Vec::new(),
        Err(e) if e.to_string().contains("no such key") => return Ok(StreamState::empty()),
        Err(e) => return Err(e),
    };
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let id = |name: &str| get(name).and_then(text).unwrap_or_else(|| "0-0".into());
    let count = |name: &str| match get(name) {
        Some(Value::Int(n)) => *n as u64,
        _ => 0,
    };
    Ok(StreamState {
        last: id("last-generated-id"),
        max_deleted: id("max-deleted-entry-id"),
        added: count("entries-added"),
        length: count("length"),
    })
}

impl IndexCache {
    pub fn new(conn: RedisConn, limits: &IndexLimits) -> Self {
        IndexCache {
            conn,
            limit: limits.memory,
            walks_per_org: limits.walks_per_org.max(1),
            image_min_cards: limits.image_min_cards,
            loads: Arc::new(tokio::sync::Semaphore::new(LOADS_AT_ONCE)),
            images: Arc::new(tokio::sync::Semaphore::new(1)),
            orgs: Arc::default(),
            sweeper: Arc::default(),
            instance: Arc::default(),
        }
    }

    /// Bytes the indexes hold now.
    pub fn bytes(&self) -> usize {
        resident_bytes(&self.orgs.lock().expect("not poisoned"))
    }

    /// Drops least recently used indexes (never `keep`'s unless it alone is over the budget)
    /// until the indexes fit in `EVICT_TO` of the budget; reports what stays.
    fn enforce_budget(&self, keep: &str) {
        let mut orgs = self.orgs.lock().expect("not poisoned");
        // Every catch-up comes here: under the budget it only sums the orgs' counters.
        let mut total = resident_bytes(&orgs);
        let own = orgs.get(keep).map_or(0, |s| s.bytes.load(Ordering::Relaxed));
        if own > self.limit {
            // The org alone is over the budget: this board is answered from it, and it is
            // dropped once the walks in flight are done (its next board loads it again). The
            // other orgs stay: evicting them could not make it fit.
            orgs.remove(keep);
            total = total.saturating_sub(own);
            crate::events::IndexOverBudget { org: keep, bytes: own, limit: self.limit }.emit();
        } else if total > self.limit {
            let target = (self.limit as f64 * EVICT_TO) as usize;
            // Least recently used first; never `keep`, nor an org whose index is being loaded
            // or caught up (its lock is held: dropping it would free nothing and lose the load).
            // Catch-ups store bytes without this lock: each org's bytes are read once, here, and
            // subtracted saturating from the total read above.
            let mut by_use: Vec<(i64, String, usize)> = orgs
                .iter()
                .filter(|(org, slot)| org.as_str() != keep && slot.sync.try_lock().is_ok())
                .map(|(org, slot)| (slot.last_used.load(Ordering::Relaxed), org.clone(), slot.bytes.load(Ordering::Relaxed)))
                .filter(|(_, _, bytes)| *bytes > 0)
                .collect();
            by_use.sort_unstable();
            let (mut evicted, mut freed) = (0, 0);
            for (_, org, bytes) in by_use {
                if total <= target {
                    break;
                }
                orgs.remove(&org);
                total = total.saturating_sub(bytes);
                (evicted, freed) = (evicted + 1, freed + bytes);
            }
            crate::events::IndexesEvicted { reason: "budget", count: evicted }.emit();
            if freed >= TRIM_AFTER_FREEING {
                give_back_freed_memory();
            }
        }
        let cards: usize = orgs.values().map(|s| s.cards.load(Ordering::Relaxed)).sum();
        crate::events::IndexSize { orgs: orgs.len(), cards, bytes: total }.emit();
    }

    /// Every request reads the projection's instance before its index: when it changes (Redis
    /// lost the projection and a projector made it again) every index is dropped, to be loaded
    /// from the new instance's records, whatever their stream positions say.
    pub fn observe_instance(&self, instance: &str) {
        if self.instance.read().expect("not poisoned").as_deref() == Some(instance) {
            return;
        }
        let previous = self.instance.write().expect("not poisoned").replace(instance.to_string());
        if previous.is_some_and(|p| p != instance) {
            let dropped = {
                let mut orgs = self.orgs.lock().expect("not poisoned");
                let n = orgs.len();
                orgs.clear();
                n
            };
            crate::events::IndexInstanceChanged { instance, dropped }.emit();
        }
    }

    /// Whether the org's index is being replaced by its new generation's (until then index
    /// boards are answered from the generation the org left).
    pub fn is_switching(&self, org: &str) -> bool {
        self.orgs.lock().expect("not poisoned").get(org).is_some_and(|s| s.switching.load(Ordering::Relaxed))
    }

    /// The org's index slot, when it has one (tests hold its walk lock; nothing else needs it).
    pub fn slot(&self, org: &str) -> Option<Arc<OrgSlot>> {
        self.orgs.lock().expect("not poisoned").get(org).cloned()
    }

    /// Drops the indexes of orgs idle for longer than `idle`; reports what stays as metrics.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let cutoff = now_millis() - idle.as_millis() as i64;
        // Under the map's lock only atomics are read: never a slot's lock (a walk may hold it).
        let mut orgs = self.orgs.lock().expect("not poisoned");
        let before = orgs.len();
        orgs.retain(|_, slot| slot.last_used.load(Ordering::Relaxed) > cutoff);
        let cards: usize = orgs.values().map(|s| s.cards.load(Ordering::Relaxed)).sum();
        crate::events::IndexSize { orgs: orgs.len(), cards, bytes: resident_bytes(&orgs) }.emit();
        crate::events::IndexesEvicted { reason: "idle", count: before - orgs.len() }.emit();
        if before > orgs.len() {
            give_back_freed_memory();
        }
        before - orgs.len()
    }

    /// Starts, once, the task that evicts idle indexes every minute.
    fn start_sweeper(&self) {
        let mut started = self.sweeper.lock().expect("not poisoned");
        if *started {
            return;
        }
        *started = true;
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let evicted = cache.evict_idle(INDEX_IDLE);
                if evicted > 0 {
                    info!(evicted, "idle in-memory indexes dropped");
                }
            }
        });
    }

    /// The org's index, current with everything committed before this call. The work runs in a
    /// task of its own: a request that gives up (its deadline) does not cancel a load that the
    /// next requests of the org will need.
    pub async fn current(&self, org: &str, keys: &OrgKeys) -> Result<Arc<OrgSlot>, RedisError> {
        let (cache, org, keys) = (self.clone(), org.to_string(), keys.clone());
        tokio::spawn(async move { cache.current_here(&org, &keys).await })
            .await
            .map_err(|e| RedisError::from(std::io::Error::other(format!("index task: {e}"))))?
    }

    /// `keys`: the generation the request reads; an index of another generation (a rebuild
    /// switched the org) is loaded again.
    async fn current_here(&self, org: &str, keys: &OrgKeys) -> Result<Arc<OrgSlot>, RedisError> {
        self.start_sweeper();
        let slot = self
            .orgs
            .lock()
            .expect("not poisoned")
            .entry(org.to_string())
            .or_insert_with(|| Arc::new(OrgSlot::new(self.walks_per_org)))
            .clone();
        slot.last_used.store(now_millis(), Ordering::Relaxed);
        let mut loaded = slot.sync.lock().await;
        let mut conn = self.conn.clone();
        let stream = stream_state(&mut conn, &keys.changes()).await?;
        let (at, at_added, base) = slot.position();
        if *loaded && base != keys.base {
            // A rebuild switched the org. Loading a large org takes seconds: meanwhile the boards
            // are answered from the index of the generation it left (whole, as of the switch),
            // and the new one replaces it once loaded.
            if !slot.switching.swap(true, Ordering::Relaxed) {
                let (cache, slot, keys, org) = (self.clone(), slot.clone(), keys.clone(), org.to_string());
                tokio::spawn(async move {
                    match cache.build(&keys, &stream).await {
                        Ok(index) => {
                            let _guard = slot.sync.lock().await;
                            info!(org, cards = index.len(), generation_keys = %keys.base, "in-memory index loaded for the new generation");
                            slot.replace(index, Some(LoadedFrom::Records));
                            drop(_guard);
                            cache.store_image_of(&slot, &keys);
                            cache.enforce_budget(&org);
                        }
                        Err(e) => tracing::warn!(org, error = %e, "index of the new generation not loaded; the next board tries again"),
                    }
                    slot.switching.store(false, Ordering::Relaxed);
                });
            }
        } else {
            let mut action = freshen(*loaded, base == keys.base, &at, at_added, &stream);
            if action == Freshen::CatchUp {
                match self.catch_up(keys, &slot, (&at, at_added), &stream).await? {
                    Some(entries) => self.note_applied(&slot, keys, entries),
                    None => action = Freshen::Load,
                }
            }
            if action == Freshen::Load {
                self.load(&slot, keys, &stream).await?;
                *loaded = true;
            }
            if action != Freshen::Nothing {
                drop(loaded);
                // Used now, not when the (maybe long) load started: not the next to go.
                slot.last_used.store(now_millis(), Ordering::Relaxed);
                self.enforce_budget(org);
                return Ok(slot);
            }
        }
        drop(loaded);
        Ok(slot)
    }

    /// Loads the org into `slot`, current to `stream`: from its image when one is stored that
    /// the stream still brings up to date, else from its records (then its image is stored for
    /// the next instance).
    async fn load(&self, slot: &Arc<OrgSlot>, keys: &OrgKeys, stream: &StreamState) -> Result<(), RedisError> {
        let started = std::time::Instant::now();
        if let Some((index, now)) = self.read_image(keys).await? {
            let at = (index.stream_id.clone(), index.stream_added);
            slot.replace(index, Some(LoadedFrom::Image));
            // The stream may have been trimmed past the image while it was read: then records.
            if let Some(entries) = self.catch_up(keys, slot, (&at.0, at.1), &now).await? {
                slot.image_lag.store(0, Ordering::Relaxed);
                self.note_applied(slot, keys, entries);
                let index = slot.index();
                let index = index.read().expect("not poisoned");
                crate::events::IndexLoaded::of(&keys.base, &index, LoadedFrom::Image, started.elapsed()).emit();
                give_back_freed_memory();
                return Ok(());
            }
            // Not kept while the records are read.
            slot.replace(OrgIndex::default(), None);
        }
        let index = self.build(keys, stream).await?;
        crate::events::IndexLoaded::of(&keys.base, &index, LoadedFrom::Records, started.elapsed()).emit();
        slot.replace(index, Some(LoadedFrom::Records));
        if slot.cards() >= self.image_min_cards {
            // The load's chunks and growth are freed; the image's encoding is next.
            give_back_freed_memory();
        }
        self.store_image_of(slot, keys);
        Ok(())
    }

    /// The org's stored image, if it is of this generation and the stream can bring it from its
    /// position up to its end, with the stream's state read after the image (an image another
    /// instance stored while this one waited for its turn is ahead of what was read before); an
    /// image that cannot be read is reported and ignored. Read once more when another instance
    /// stored a later image while its parts were read: that one is the one to read.
    async fn read_image(&self, keys: &OrgKeys) -> Result<Option<(OrgIndex, StreamState)>, RedisError> {
        let _permit = self.loads.acquire().await.expect("the semaphore is never closed");
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let head = ImageHead::from_reply(image_head_cmd(keys).query_async(&mut self.conn.clone()).await?);
            let Some(head) = head else { return Ok(None) };
            let outcome = match self.read_parts(keys, &head).await? {
                Ok(found) => return Ok(Some(found)),
                Err(outcome) => outcome,
            };
            let (bytes, seconds) = (head.bytes as usize, started.elapsed().as_secs_f64());
            crate::events::IndexImage { org: &keys.base, outcome, bytes, seconds }.emit();
            if outcome != ImageOutcome::ReplacedWhileRead {
                break;
            }
        }
        Ok(None)
    }

    /// `read_image`'s work for one image: its parts are decoded on a blocking thread as they
    /// arrive (at most `PARTS_AHEAD` wait); why it is not used.
    async fn read_parts(&self, keys: &OrgKeys, head: &ImageHead) -> Result<Result<(OrgIndex, StreamState), ImageOutcome>, RedisError> {
        let mut conn = self.conn.clone();
        let (parts, arriving) = tokio::sync::mpsc::channel::<Vec<u8>>(PARTS_AHEAD);
        let decoder = tokio::task::spawn_blocking(move || OrgIndex::read_image(ImageParts::new(arriving)));
        let sent = async {
            for n in 0..head.parts {
                match head.part_of(image_part_cmd(keys, n).query_async(&mut conn).await?) {
                    Some(part) => {
                        if parts.send(part).await.is_err() {
                            break; // The decoder stopped: it says why.
                        }
                    }
                    None => return Ok(false),
                }
            }
            Ok::<bool, RedisError>(true)
        }
        .await;
        // The decoder sees the end of the image (or of what was read of it) and finishes.
        drop(parts);
        let read = decoder.await.map_err(|e| RedisError::from(std::io::Error::other(format!("index image: {e}"))))?;
        if !sent? {
            return Ok(Err(ImageOutcome::ReplacedWhileRead));
        }
        let stream = stream_state(&mut conn, &keys.changes()).await?;
        Ok(match read {
            Ok(index) if index.base != keys.base => Err(ImageOutcome::OtherGeneration),
            Ok(index) if freshen(true, true, &index.stream_id, index.stream_added, &stream) == Freshen::Load => {
                Err(ImageOutcome::BehindTheStream)
            }
            Ok(index) => Ok((index, stream)),
            Err(super::index::ImageError::OtherLayout) => Err(ImageOutcome::OtherLayout),
            Err(super::index::ImageError::Damaged(_)) => Err(ImageOutcome::Damaged),
        })
    }

    /// Counts stream entries the org's index applied; stores its image again once they are
    /// `IMAGE_REFRESH_ENTRIES` since the last.
    fn note_applied(&self, slot: &Arc<OrgSlot>, keys: &OrgKeys, entries: usize) {
        let lag = slot.image_lag.fetch_add(entries, Ordering::Relaxed) + entries;
        if lag >= IMAGE_REFRESH_ENTRIES && now_millis() - slot.image_stored_at.load(Ordering::Relaxed) >= IMAGE_REFRESH_MIN_MILLIS {
            self.store_image_of(slot, keys);
        }
    }

    /// Stores the image of the org's index in the background, if the org has `image_min_cards`
    /// cards or more: one image at a time in the process (an image is held whole while it is
    /// sent), and not when the stored image is as recent. Encoded under the index's read lock
    /// in one pass (~0.6 s for a million cards, while the org's catch-ups and, behind them, its
    /// boards wait): an index's uncompressed bytes are never held beside it.
    fn store_image_of(&self, slot: &Arc<OrgSlot>, keys: &OrgKeys) {
        if slot.cards() < self.image_min_cards || slot.storing_image.swap(true, Ordering::Relaxed) {
            return;
        }
        let (conn, slot, keys, images) = (self.conn.clone(), slot.clone(), keys.clone(), self.images.clone());
        tokio::spawn(async move {
            let _turn = images.acquire().await.expect("the semaphore is never closed");
            let started = std::time::Instant::now();
            let outcome = Self::store_image(conn, &slot, &keys).await;
            // A failure is not retried before the next refresh is due (no encode per catch-up).
            slot.image_stored_at.store(now_millis(), Ordering::Relaxed);
            tracing::debug!(org = %keys.base, outcome = outcome.as_str(), seconds = started.elapsed().as_secs_f64(), "index image");
            slot.storing_image.store(false, Ordering::Relaxed);
            give_back_freed_memory();
        });
    }

    /// `store_image_of`'s work: what became of the image.
    async fn store_image(conn: RedisConn, slot: &Arc<OrgSlot>, keys: &OrgKeys) -> ImageOutcome {
        let started = std::time::Instant::now();
        let (at, _, base) = slot.position();
        if base != keys.base {
            // A load of another generation replaced the index meanwhile.
            return ImageOutcome::Moved;
        }
        let layout = super::index::image_layout();
        let stored: Result<ImageHeadReply, RedisError> = image_head_cmd(keys).query_async(&mut conn.clone()).await;
        let stored = stored.ok().and_then(ImageHead::from_reply);
        // `pb_image_put_parts` would refuse it: an image of this layout as recent is stored.
        if stored.is_some_and(|s| s.layout == layout && stream_pos(&s.at) >= stream_pos(&at)) {
            slot.image_lag.store(0, Ordering::Relaxed);
            return ImageOutcome::Current;
        }
        let (index, slot2, keys2) = (slot.index(), slot.clone(), keys.clone());
        // The command is made where the image is, each part dropped once copied into it.
        let made = tokio::task::spawn_blocking(move || {
            let index = index.read().expect("not poisoned");
            let lag = slot2.image_lag.load(Ordering::Relaxed);
            let parts = index.to_image_parts(IMAGE_PART_BYTES);
            let bytes = parts.iter().map(Vec::len).sum();
            let cmd = (bytes <= MAX_IMAGE_BYTES).then(|| image_put_cmd(&keys2, &index.stream_id, &layout, parts));
            (cmd, bytes, lag)
        })
        .await;
        let Ok((cmd, bytes, lag)) = made else { return ImageOutcome::Failed };
        // What the image holds is no longer to be stored, whatever becomes of it.
        slot.image_lag.fetch_sub(lag.min(slot.image_lag.load(Ordering::Relaxed)), Ordering::Relaxed);
        let outcome = match cmd {
            None => ImageOutcome::TooLarge,
            Some(cmd) => match fcall::<ImagePut, _>(&mut conn.clone(), &cmd).await {
                Ok(put) => put.into(),
                Err(e) => {
                    tracing::warn!(org = %keys.base, error = %e, "index image not stored");
                    ImageOutcome::Failed
                }
            },
        };
        crate::events::IndexImage { org: &keys.base, outcome, bytes, seconds: started.elapsed().as_secs_f64() }.emit();
        outcome
    }

    /// Builds the org's index from its records, current to `stream` (read before them: a
    /// change committed meanwhile is read again by the next catch-up): they are scanned in
    /// chunks (never the whole org's records at once), and three steps overlap: Redis reads the
    /// next chunk while one blocking thread decodes the last and another puts the one before
    /// into the index (a million cards: ~1.7 s of decoding and ~3 s of puts, no longer one
    /// after the other).
    async fn build(&self, keys: &OrgKeys, stream: &StreamState) -> Result<OrgIndex, RedisError> {
        let _permit = self.loads.acquire().await.expect("the semaphore is never closed");
        let mut conn = self.conn.clone();
        let (users, contacts, applications): (Vec<(String, String)>, usize, usize) = redis::pipe()
            .cmd("HGETALL")
            .arg(keys.users())
            .cmd("HLEN")
            .arg(keys.cards(CardKind::Contact))
            .cmd("HLEN")
            .arg(keys.cards(CardKind::Application))
            .query_async(&mut conn)
            .await?;
        let (chunks, mut arriving) = tokio::sync::mpsc::channel::<(CardKind, DecodedChunk)>(2);
        let (base, stream_id, stream_added) = (keys.base.clone(), stream.last.clone(), stream.added);
        // Decoding a large org is CPU work: off the async workers.
        let builder = tokio::task::spawn_blocking(move || {
            let mut index = OrgIndex::new(stream_id);
            index.stream_added = stream_added;
            index.base = base;
            // Records, tombstones among them: at most that many cards.
            index.start_load(contacts + applications);
            index.set_users(users.into_iter().map(|(u, t)| (u, serde_json::from_str(&t).unwrap_or_default())));
            while let Some((kind, chunk)) = arriving.blocking_recv() {
                for (id, record) in chunk {
                    index.put(kind, &id, record.as_ref());
                }
            }
            index.finish_load();
            index
        });
        let stopped = |e: &dyn std::fmt::Display| RedisError::from(std::io::Error::other(format!("index load: {e}")));
        let scanned = async {
            let mut decoding: Option<(CardKind, tokio::task::JoinHandle<DecodedChunk>)> = None;
            for kind in [CardKind::Contact, CardKind::Application] {
                let mut cursor = 0u64;
                loop {
                    let (next, chunk): (u64, RecordChunk) =
                        redis::cmd("HSCAN").arg(keys.cards(kind)).arg(cursor).arg("COUNT").arg(2000).query_async(&mut conn).await?;
                    if let Some((kind, decoded)) = decoding.take() {
                        let decoded = decoded.await.map_err(|e| stopped(&e))?;
                        chunks.send((kind, decoded)).await.map_err(|_| stopped(&"the builder stopped"))?;
                    }
                    let decode = move || chunk.into_iter().map(|(id, bytes)| (id, CardRecord::decode(&bytes).ok())).collect();
                    decoding = Some((kind, tokio::task::spawn_blocking(decode)));
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            if let Some((kind, decoded)) = decoding {
                let decoded = decoded.await.map_err(|e| stopped(&e))?;
                chunks.send((kind, decoded)).await.map_err(|_| stopped(&"the builder stopped"))?;
            }
            Ok::<(), RedisError>(())
        }
        .await;
        drop(chunks);
        let index = builder.await.map_err(|e| stopped(&e))?;
        scanned?;
        Ok(index)
    }

    /// Applies the stream's entries after `from` (an id and the entries added up to it) up to
    /// `to`: how many; None (nothing applied) when fewer were read than were added in between
    /// (the stream was trimmed past `from` before or while its pages were read) or one of them
    /// was deleted.
    async fn catch_up(&self, keys: &OrgKeys, slot: &OrgSlot, from: (&str, u64), to: &StreamState) -> Result<Option<usize>, RedisError> {
        let (from, from_added) = from;
        let mut conn = self.conn.clone();
        let mut cards: BTreeSet<(CardKind, String)> = BTreeSet::new();
        let mut users: BTreeSet<String> = BTreeSet::new();
        let mut at = from.to_string();
        let mut applied = 0;
        while stream_pos(&at) < stream_pos(&to.last) {
            let entries: Vec<(String, Vec<(String, String)>)> = {
                let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                    .arg(keys.changes())
                    .arg(format!("({at}"))
                    .arg(&to.last)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                reply
                    .ids
                    .into_iter()
                    .map(|e| {
                        let fields = e.map.iter().filter_map(|(k, v)| Some((k.clone(), text(v)?))).collect();
                        (e.id, fields)
                    })
                    .collect()
            };
            let Some((last, _)) = entries.last() else { break };
            at = last.clone();
            applied += entries.len();
            for (_, fields) in entries {
                for (_, ids) in fields {
                    for line in ids.lines() {
                        match Changed::parse(line) {
                            Some(Changed::Card(kind, id)) => cards.insert((kind, id)),
                            Some(Changed::User(id)) => users.insert(id),
                            None => false,
                        };
                    }
                }
            }
        }
        let now = stream_state(&mut conn, &keys.changes()).await?;
        if stream_pos(from) < stream_pos(&now.max_deleted) || to.added.checked_sub(from_added) != Some(applied as u64) {
            return Ok(None);
        }
        // The current records of what changed: one HMGET per hash, in one round trip.
        let ids_of = |kind: CardKind| cards.iter().filter(|(k, _)| *k == kind).map(|(_, id)| id.clone()).collect::<Vec<_>>();
        let groups = [
            (Some(CardKind::Contact), keys.cards(CardKind::Contact), ids_of(CardKind::Contact)),
            (Some(CardKind::Application), keys.cards(CardKind::Application), ids_of(CardKind::Application)),
            (None, keys.users(), users.into_iter().collect()),
        ];
        let asked: Vec<&(Option<CardKind>, String, Vec<String>)> = groups.iter().filter(|g| !g.2.is_empty()).collect();
        let mut pipe = redis::pipe();
        for (_, key, fields) in &asked {
            pipe.cmd("HMGET").arg(key).arg(fields);
        }
        let replies: Vec<Vec<Option<Vec<u8>>>> = if asked.is_empty() { Vec::new() } else { pipe.query_async(&mut conn).await? };
        let changed: Vec<(Option<CardKind>, Vec<String>)> = asked.into_iter().map(|(kind, _, ids)| (*kind, ids.clone())).collect();
        // The write lock waits for the walks in flight: on a blocking thread, not an async worker.
        let index = slot.index();
        let cards = tokio::task::spawn_blocking(move || {
            let mut index = index.write().expect("not poisoned");
            for ((kind, ids), values) in changed.into_iter().zip(replies) {
                for (id, v) in ids.iter().zip(values) {
                    match kind {
                        Some(kind) => index.put(kind, id, v.and_then(|b| CardRecord::decode(&b).ok()).as_ref()),
                        None => index.set_user(id.clone(), v.and_then(|b| serde_json::from_slice(&b).ok())),
                    }
                }
            }
            index.stream_id = at;
            index.stream_added = from_added + applied as u64;
            (index.len(), index.account())
        })
        .await
        .map_err(|e| RedisError::from(std::io::Error::other(format!("index catch-up: {e}"))))?;
        slot.cards.store(cards.0, Ordering::Relaxed);
        slot.bytes.store(cards.1, Ordering::Relaxed);
        Ok(Some(applied))
    }
}

#[cfg(test)]
mod tests {
    use super::{freshen, Freshen, ImageParts, LoadedFrom, OrgIndex, OrgSlot, StreamState};
    use crate::query::index::ImageError;
    use board_model::model::{CardDoc, CardKind};
    use board_model::record::{CardRecord, Derived};
    use std::sync::Arc;
    use std::time::Duration;

    /// An image decoded from parts as they arrive is the index the whole image holds; one whose
    /// parts stop coming early is damaged, never a smaller index.
    #[test]
    fn an_image_read_in_parts_is_the_image_read_whole() {
        let mut index = OrgIndex::new("3-0".into());
        for n in 0..50 {
            let doc = CardDoc { id: format!("c{n}"), first_name: Some(format!("Zoë {n}")), ..Default::default() };
            index.put(CardKind::Contact, &doc.id.clone(), Some(&CardRecord::live(&doc, Derived::default())));
        }
        let image = index.to_image();
        let read = |parts: Vec<Vec<u8>>| {
            let (sending, arriving) = tokio::sync::mpsc::channel(parts.len().max(1));
            for part in parts {
                sending.try_send(part).unwrap();
            }
            drop(sending);
            OrgIndex::read_image(ImageParts::new(arriving))
        };
        let whole = OrgIndex::from_image(&image).unwrap();
        let parts = read(image.chunks(7).map(<[u8]>::to_vec).collect()).unwrap();
        assert_eq!((parts.len(), parts.stream_id.as_str(), parts.bytes()), (whole.len(), "3-0", whole.bytes()));
        let cut = image.chunks(7).take(image.len() / 7 - 1).map(<[u8]>::to_vec).collect();
        assert!(matches!(read(cut), Err(ImageError::Damaged(_))));
        assert_eq!(read(Vec::new()).unwrap_err(), ImageError::OtherLayout);
    }

    /// A walk in flight holds the old index's read lock; a load puts the new index in place
    /// without waiting for it, and the sweeper's figures need no lock at all.
    #[test]
    fn a_new_index_goes_in_while_a_walk_holds_the_old_one() {
        let slot = Arc::new(OrgSlot::new(1));
        let old = slot.index();
        let walk = old.read().unwrap();
        let (done, swapped) = std::sync::mpsc::channel();
        let s = slot.clone();
        std::thread::spawn(move || {
            s.replace(OrgIndex::new("7-0".into()), Some(LoadedFrom::Records));
            done.send(s.position().0).unwrap();
        });
        let position = swapped.recv_timeout(Duration::from_secs(30)).expect("the swap did not wait for the walk");
        assert_eq!(position, "7-0");
        assert_eq!(walk.stream_id, "", "the walk goes on over the index it started on");
    }

    #[test]
    fn an_index_is_caught_up_only_from_a_stream_that_still_holds_its_position() {
        // The index read up to 5-0, the stream's 10th entry.
        let stream = |last: &str, max_deleted: &str, added: u64, length: u64| StreamState {
            last: last.into(),
            max_deleted: max_deleted.into(),
            added,
            length,
        };
        let at = |s: &StreamState| freshen(true, true, "5-0", 10, s);
        assert_eq!(at(&stream("5-0", "0-0", 10, 10)), Freshen::Nothing);
        assert_eq!(at(&stream("9-1", "0-0", 14, 14)), Freshen::CatchUp);
        assert_eq!(at(&stream("9-1", "0-0", 14, 4)), Freshen::CatchUp, "trimmed up to its position: nothing unread lost");
        assert_eq!(at(&stream("9-1", "5-0", 14, 4)), Freshen::CatchUp, "deleted up to its position: nothing unread lost");
        assert_eq!(freshen(false, true, "0-0", 0, &stream("9-1", "0-0", 14, 14)), Freshen::Load, "never loaded");
        assert_eq!(freshen(true, false, "5-0", 10, &stream("9-1", "0-0", 14, 14)), Freshen::Load, "another generation");
        assert_eq!(at(&stream("9-1", "6-0", 14, 14)), Freshen::Load, "an entry after its position deleted");
        assert_eq!(at(&stream("9-1", "0-0", 14, 3)), Freshen::Load, "trimmed past its position (MAXLEN leaves max-deleted alone)");
        assert_eq!(at(&stream("9-1", "0-0", 14, 0)), Freshen::Load, "trimmed to nothing");
        assert_eq!(at(&stream("4-9", "0-0", 9, 9)), Freshen::Load, "the stream went back (an older state reloaded)");
        assert_eq!(at(&stream("0-0", "0-0", 0, 0)), Freshen::Load, "the stream is gone");
        assert_eq!(at(&stream("9-1", "0-0", 3, 3)), Freshen::Load, "the stream was made again");
        assert_eq!(freshen(true, true, "0-0", 0, &StreamState::empty()), Freshen::Nothing, "no entry yet");
    }
}
