//! Noticing a Redis that went back in time: an RDB or AOF reloaded (`DEBUG RELOAD`, a restart
//! that loads an older file), the last fsync window lost in a crash, a replica promoted while it
//! was behind. Such a Redis holds data *and* progress of an earlier moment, while the projectors'
//! consumers are positioned after it: without a check, the events in between are never applied
//! again and the board is silently wrong.
//!
//! The scheme: a *write mark* per primary (a hash in a slot that primary serves), bumped by
//! every projector every second by a compare-and-set on a counter (`seq`). A mark is only ever
//! raised, so a mark below the last one seen means that node went back to an earlier state.
//! With `seq`, the mark keeps the group's progress as read just before the bump: every event
//! before it was committed to every shard before the mark was written, so whatever state of
//! that node a reload brings back, its data holds at least the progress its mark holds. On a
//! rewind the projection's progress is lowered to that (per partition, never raised), the state
//! becomes a new `building` instance (the API answers from MongoDB until it is whole again), and
//! every projector re-seeks its partitions to what Redis then holds: the events in between are
//! applied again, idempotently.
//!
//! The last `seq` seen per mark is kept in memory (the same process notices a rewind of any
//! node, `{meta}` included) and in `{meta}` (a projector started later notices a rewind of
//! another shard; on a single server `{meta}` goes back with the mark, and then Redis' own
//! progress is consistent with its data anyway).
use board_model::keys::KeySpace;
use board_redis::functions::fcall;
use board_redis::functions::mark::{mark_raise_cmd, MarkRaised};
use board_redis::redis_conn::RedisConn;
use board_redis::LiveOrg;
use redis::AsyncCommands;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Progress per `<topic>/<partition>` field (the next offset to apply).
pub type Progress = BTreeMap<String, i64>;

/// What a mark said when it was found below the last `seq` seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewound {
    pub mark: String,
    /// The `seq` the node holds now, and the highest seen before.
    pub held: i64,
    pub seen: i64,
    /// The progress the mark held: the node's data holds at least this much. None: the mark is
    /// gone (the node went back to before any mark): replay every partition from its start.
    pub progress: Option<Progress>,
}

impl std::fmt::Display for Rewound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "write mark {} at seq {} after {} was seen", self.mark, self.held, self.seen)
    }
}

/// Where each partition resumes after a node's mark went back: the lower of what Redis records
/// now and what the restored mark held (written before the restored state was: its data holds
/// at least that much); a partition the mark did not know restarts from its beginning (absent).
pub fn replay_from(current: &Progress, at_mark: Option<&Progress>) -> Progress {
    let Some(mark) = at_mark else { return Progress::new() };
    current.iter().filter_map(|(field, now)| mark.get(field).map(|m| (field.clone(), (*m).min(*now)))).collect()
}

/// Where each partition resumes when orgs' keys went back (their write counters): the lower of
/// what Redis records now and each such org's own applied offsets, which its restored keys
/// hold consistently with its data (one atomic commit). A partition one of them has no offset
/// for restarts from its beginning: its events there may all have come after the restored state.
/// Redis' progress alone cannot be trusted here: batches of other orgs applied after the rewind
/// may have moved it past the lost events.
pub fn replay_from_orgs(current: &Progress, orgs: &[Progress]) -> Progress {
    current
        .iter()
        .filter_map(|(field, now)| orgs.iter().try_fold(*now, |low, org| org.get(field).map(|o| low.min(*o))).map(|o| (field.clone(), o)))
        .collect()
}

/// The cluster hash slot of a key (CRC16/XMODEM of its hash tag, or of the whole key).
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % 16384
}

/// A hash tag whose slot lies in one of `ranges` (a shard's slots): the first `mark-<n>` that
/// does. None for a shard without slots.
pub fn tag_within(ranges: &[(u16, u16)]) -> Option<String> {
    if ranges.is_empty() {
        return None;
    }
    // 16384 slots, ~16384 candidates cover every slot with high probability; a shard owns at
    // least one slot, so the search ends far earlier in practice.
    (0..200_000u32).map(|n| format!("mark-{n}")).find(|tag| {
        let s = slot(&format!("{{{tag}}}"));
        ranges.iter().any(|(a, b)| (*a..=*b).contains(&s))
    })
}

/// One projector's view of the write marks.
#[derive(Default)]
pub struct WriteMarks {
    /// Mark key -> the highest `seq` this process saw in it.
    seen: HashMap<String, i64>,
    /// A shard's slot ranges -> its mark's hash tag (found once).
    tags: HashMap<Vec<(u16, u16)>, Option<String>>,
}

impl WriteMarks {
    /// Forgets what was seen: after the projection was lost and made again, the marks start
    /// over with it.
    pub fn reset(&mut self) {
        self.seen.clear();
    }

    /// The marks of this deployment: one per primary on a cluster, one in `{meta}` otherwise.
    async fn marks(&mut self, conn: &mut RedisConn, keys: &KeySpace) -> redis::RedisResult<Vec<String>> {
        if !conn.is_cluster() {
            return Ok(vec![keys.write_mark("meta")]);
        }
        let mut out: Vec<String> = Vec::new();
        for node in conn.cluster_nodes().await?.into_iter().filter(|n| n.primary && n.healthy) {
            let tag = self.tags.entry(node.slots.clone()).or_insert_with(|| tag_within(&node.slots));
            out.extend(tag.as_deref().map(|t| keys.write_mark(t)));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Raises every mark with `progress` (the group's, read just before), or reports the first
    /// that went back. A rewound mark is not raised: it is reported again until `handled`.
    pub async fn raise(&mut self, conn: &mut RedisConn, keys: &KeySpace, progress: &Progress) -> redis::RedisResult<Option<Rewound>> {
        let recorded: HashMap<String, i64> = conn.hgetall(keys.write_marks_seen()).await?;
        let json = serde_json::to_string(progress).expect("a map of numbers serializes");
        let mut raised: Vec<(String, i64)> = Vec::new();
        let mut found = None;
        for mark in self.marks(conn, keys).await? {
            let seen = self.seen.get(&mark).copied().unwrap_or(0).max(recorded.get(&mark).copied().unwrap_or(0));
            match fcall(conn, &mark_raise_cmd(&mark, seen, &json)).await? {
                MarkRaised::Raised(seq) => {
                    self.seen.insert(mark.clone(), seq);
                    raised.push((mark.clone(), seq));
                    if conn.is_cluster() {
                        // A replica promoted without the newest mark would look rewound: give
                        // the mark the same replication wait the data gets.
                        let _ = conn.wait_on(RedisConn::route_of(&mark), 1, Duration::from_millis(100)).await;
                    }
                }
                MarkRaised::Rewound { held, progress } => {
                    let progress = progress.and_then(|p| serde_json::from_str::<Progress>(&p).ok());
                    found.get_or_insert(Rewound { mark: mark.clone(), held, seen, progress });
                }
            }
        }
        if !raised.is_empty() {
            conn.hset_multiple::<_, _, _, ()>(keys.write_marks_seen(), &raised).await?;
        }
        Ok(found)
    }

    /// The rewind reported was acted on: its mark counts from what it holds now.
    pub async fn handled(&mut self, conn: &mut RedisConn, keys: &KeySpace, rewound: &Rewound) -> redis::RedisResult<()> {
        self.seen.insert(rewound.mark.clone(), rewound.held);
        conn.hset(keys.write_marks_seen(), &rewound.mark, rewound.held).await
    }
}

/// The org key bases whose write counter went back: found by a commit (it answered a number
/// already seen) or now, in Redis, below the last one a commit answered to this process. A base
/// that is no longer its org's live generation (a rebuild switched the org and removed the old
/// keys) is forgotten, not reported.
pub async fn counters_went_back(
    conn: &mut RedisConn,
    keys: &KeySpace,
    counters: &crate::apply::WriteCounters,
) -> redis::RedisResult<Vec<String>> {
    let mut back = counters.take_went_back();
    let seen = counters.seen();
    let reads = seen.iter().map(|(base, _)| (base.clone(), redis::cmd("GET").arg(format!("{base}:writes")).clone())).collect();
    let held: Vec<Option<i64>> = match conn.query_by_slot(reads).await {
        Ok(held) => held,
        Err(e) => {
            // Kept for the next call: the evidence of a rewind is never dropped on an error.
            back.iter().for_each(|b| counters.went_back(b));
            return Err(e);
        }
    };
    back.extend(seen.into_iter().zip(held).filter(|((_, seen), held)| held.unwrap_or(0) < *seen).map(|((base, _), _)| base));
    back.sort();
    back.dedup();
    let mut live = Vec::with_capacity(back.len());
    for (i, base) in back.iter().enumerate() {
        let Some(org) = org_of(base) else { continue };
        match keys.live_org(conn, org).await {
            Ok(l) if l.base == *base => live.push(base.clone()),
            Ok(_) => counters.forget(base),
            Err(e) => {
                live.iter().chain(&back[i..]).for_each(|b| counters.went_back(b));
                return Err(e);
            }
        }
    }
    Ok(live)
}

/// The org id in an org key base (`<prefix>[:<generation>]:{<orgId>}`).
pub fn org_of(base: &str) -> Option<&str> {
    let open = base.rfind('{')?;
    base[open + 1..].strip_suffix('}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, i64)]) -> Progress {
        pairs.iter().map(|(f, o)| (f.to_string(), *o)).collect()
    }

    #[test]
    fn a_rewind_resumes_each_partition_at_the_lower_of_redis_and_the_mark() {
        let now = p(&[("c/0", 120), ("c/1", 40), ("m/0", 7)]);
        let mark = p(&[("c/0", 100), ("c/1", 55)]);
        // c/1: Redis already holds less than the mark (its own rewound progress); m/0: unknown
        // to the mark, so from its beginning.
        assert_eq!(replay_from(&now, Some(&mark)), p(&[("c/0", 100), ("c/1", 40)]));
        assert_eq!(replay_from(&now, None), Progress::new(), "no mark: every partition from its start");
    }

    #[test]
    fn orgs_gone_back_resume_at_their_own_offsets_or_the_beginning() {
        let now = p(&[("c/0", 120), ("c/1", 40), ("m/0", 7)]);
        let a = p(&[("c/0", 100), ("c/1", 55), ("m/0", 3)]);
        let b = p(&[("c/0", 90), ("c/1", 30)]);
        assert_eq!(replay_from_orgs(&now, std::slice::from_ref(&a)), p(&[("c/0", 100), ("c/1", 40), ("m/0", 3)]));
        // b never had an event in m/0 in what Redis holds: it may have lost some there.
        assert_eq!(replay_from_orgs(&now, &[a, b]), p(&[("c/0", 90), ("c/1", 30)]));
        assert_eq!(replay_from_orgs(&now, &[]), now, "no org: nothing lowered");
    }

    #[test]
    fn the_org_is_read_from_its_key_base() {
        assert_eq!(org_of("pb:{692f37303a6700000a7d8e11}"), Some("692f37303a6700000a7d8e11"));
        assert_eq!(org_of("t:a-b:g17:{abc}"), Some("abc"));
        assert_eq!(org_of("pb:nothing"), None);
    }

    #[test]
    fn a_counter_not_above_the_last_one_seen_is_a_rewind() {
        let c = crate::apply::WriteCounters::default();
        c.record("pb:{a}", 3);
        c.record("pb:{a}", 4);
        c.record("pb:{b}", 1);
        assert!(c.take_went_back().is_empty());
        c.record("pb:{a}", 4);
        c.record("pb:{b}", 0); // an older library's plain `ok`: no counter, nothing to say
        assert_eq!(c.take_went_back(), ["pb:{a}"]);
        assert!(c.take_went_back().is_empty(), "reported once");
        assert_eq!(
            c.seen().into_iter().collect::<BTreeMap<_, _>>(),
            BTreeMap::from([("pb:{a}".to_string(), 4), ("pb:{b}".to_string(), 1)])
        );
    }

    #[test]
    fn slots_follow_the_hash_tag_like_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("pb:{meta}:state"), slot("meta"));
        assert_eq!(slot("a{}b"), slot("a{}b"), "an empty tag hashes the whole key");
    }

    #[test]
    fn a_tag_is_found_inside_any_shard_s_slots() {
        for ranges in [vec![(0u16, 5460u16)], vec![(5461, 10922)], vec![(10923, 16383)], vec![(42, 42)]] {
            let tag = tag_within(&ranges).expect("a tag");
            let s = slot(&format!("pb:{{{tag}}}:mark"));
            assert!(ranges.iter().any(|(a, b)| (*a..=*b).contains(&s)), "{tag} -> {s} not in {ranges:?}");
        }
        assert_eq!(tag_within(&[]), None);
    }
}
