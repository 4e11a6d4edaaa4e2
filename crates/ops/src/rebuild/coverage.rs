//! Does a generation built from a replay hold every document the live generation holds?
//!
//! A replay from `--from` sees only the documents that had an event since that time. An org
//! whose every partition also has events after the time passes the switch's offset check
//! (`pb_switch`), yet its documents touched only before the time are missing from the new
//! generation: switching it would delete its only complete generation. So before a switch of a
//! `--from` rebuild, every record of the live generation must have its counterpart in the new one:
//! cards of both kinds and conversations (deleted ones stay as tombstones, and a tombstone counts:
//! it is what keeps a late, older upsert out), pipeline and user versions, and each contact's
//! state (its conversations, applications and message times, which no record id carries).
//!
//! [`state_covers`] is the pure rule; [`first_missing`] walks Redis with `HSCAN`, so an org of
//! any size costs bounded memory.
use board_model::keys::OrgKeys;
use board_model::model::CardKind;
use board_model::record::ContactState;
use board_redis::redis_conn::RedisConn;

/// Fields read per `HSCAN` step (and checked per pipeline).
const SCAN_COUNT: usize = 500;

/// One record of the live generation that the new one lacks (or holds with less in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// What kind of record: `contact`, `application`, `conversation`, `pipeline/user version`,
    /// `contact state`.
    pub what: &'static str,
    pub id: String,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.what, self.id)
    }
}

/// True when `new` knows everything `live` knows of one contact: a state built from fewer events
/// lacks a conversation, an application or a message time.
pub fn state_covers(live: &ContactState, new: &ContactState) -> bool {
    live.conversations.iter().all(|(id, assignees)| new.conversations.get(id).is_some_and(|n| assignees.iter().all(|a| n.contains(a))))
        && live.applications.is_subset(&new.applications)
        && live.message_times.iter().all(|t| new.message_times.binary_search(t).is_ok())
}

/// The first record of `live` that `new` does not cover, if any.
pub async fn first_missing(conn: &mut RedisConn, live: &OrgKeys, new: &OrgKeys) -> redis::RedisResult<Option<Missing>> {
    let by_id = [
        ("contact", live.cards(CardKind::Contact), new.cards(CardKind::Contact)),
        ("application", live.cards(CardKind::Application), new.cards(CardKind::Application)),
        ("conversation", live.conversations(), new.conversations()),
        ("pipeline/user version", live.versions(), new.versions()),
    ];
    for (what, live_key, new_key) in by_id {
        if let Some(id) = first_field_absent(conn, &live_key, &new_key).await? {
            return Ok(Some(Missing { what, id }));
        }
    }
    first_state_not_covered(conn, &live.contact_states(), &new.contact_states()).await
}

/// The first field of hash `live_key` that hash `new_key` lacks.
async fn first_field_absent(conn: &mut RedisConn, live_key: &str, new_key: &str) -> redis::RedisResult<Option<String>> {
    let mut cursor = 0u64;
    loop {
        let (next, fields) = scan_step(conn, live_key, cursor).await?;
        if !fields.is_empty() {
            let mut pipe = redis::pipe();
            for (field, _) in &fields {
                pipe.hexists(new_key, field);
            }
            let present: Vec<bool> = pipe.query_async(conn).await?;
            if let Some((field, _)) = fields.into_iter().zip(present).find(|(_, p)| !p).map(|(f, _)| f) {
                return Ok(Some(field));
            }
        }
        if next == 0 {
            return Ok(None);
        }
        cursor = next;
    }
}

/// The first contact whose state in `new_key` lacks something of its state in `live_key`.
async fn first_state_not_covered(conn: &mut RedisConn, live_key: &str, new_key: &str) -> redis::RedisResult<Option<Missing>> {
    let mut cursor = 0u64;
    loop {
        let (next, fields) = scan_step(conn, live_key, cursor).await?;
        if !fields.is_empty() {
            let ids: Vec<&str> = fields.iter().map(|(f, _)| f.as_str()).collect();
            let theirs: Vec<Option<Vec<u8>>> = redis::cmd("HMGET").arg(new_key).arg(&ids).query_async(conn).await?;
            for ((id, live_bytes), new_bytes) in fields.iter().zip(theirs) {
                // An undecodable live state proves nothing about the new one: only a readable
                // state is compared, and an unreadable one on the new side is missing.
                let Ok(live) = ContactState::decode(live_bytes) else { continue };
                let covered = new_bytes.and_then(|b| ContactState::decode(&b).ok()).is_some_and(|new| state_covers(&live, &new));
                if !covered && !live.is_empty() {
                    return Ok(Some(Missing { what: "contact state", id: id.clone() }));
                }
            }
        }
        if next == 0 {
            return Ok(None);
        }
        cursor = next;
    }
}

async fn scan_step(conn: &mut RedisConn, key: &str, cursor: u64) -> redis::RedisResult<(u64, Vec<(String, Vec<u8>)>)> {
    redis::cmd("HSCAN").arg(key).arg(cursor).arg("COUNT").arg(SCAN_COUNT).query_async(conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(conversations: &[(&str, &[&str])], applications: &[&str], times: &[i64]) -> ContactState {
        ContactState {
            conversations: conversations.iter().map(|(c, a)| (c.to_string(), a.iter().map(|s| s.to_string()).collect())).collect(),
            applications: applications.iter().map(|s| s.to_string()).collect(),
            message_times: times.to_vec(),
        }
    }

    #[test]
    fn a_state_covers_what_it_holds_and_more() {
        let live = state(&[("c1", &["u1"])], &["a1"], &[10, 20]);
        assert!(state_covers(&live, &live));
        assert!(state_covers(&live, &state(&[("c1", &["u1", "u2"]), ("c2", &[])], &["a1", "a2"], &[5, 10, 20])));
        assert!(state_covers(&ContactState::default(), &live));
    }

    #[test]
    fn a_state_built_from_fewer_events_is_not_covering() {
        let live = state(&[("c1", &["u1"])], &["a1"], &[10, 20]);
        for fewer in [
            state(&[("c1", &["u1"])], &["a1"], &[20]),
            state(&[], &["a1"], &[10, 20]),
            state(&[("c1", &[])], &["a1"], &[10, 20]),
            state(&[("c1", &["u1"])], &[], &[10, 20]),
        ] {
            assert!(!state_covers(&live, &fewer), "{fewer:?}");
        }
    }
}
