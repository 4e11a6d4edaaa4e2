//! The projection's Redis Function library (`functions.lua`: one thin `pb_commit`) and the
//! typed builder of one commit: guards (what the projector read, which must still hold) and the
//! writes it computed.
use crate::keys::OrgKeys;

pub const LIBRARY: &str = include_str!("functions.lua");

/// Loads (or replaces) the library. Idempotent; every projector and test calls it at start.
pub async fn load_library<C: redis::aio::ConnectionLike + Send>(conn: &mut C) -> redis::RedisResult<()> {
    redis::cmd("FUNCTION").arg("LOAD").arg("REPLACE").arg(LIBRARY).query_async::<String>(conn).await.map(|_| ())
}

/// Entries the change stream keeps per org (approximately: `MAXLEN ~`). A reader further
/// behind than this reloads the org.
pub const CHANGES_MAXLEN: usize = 10_000;

/// One write of a commit.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    HSet { key: String, field: String, value: Vec<u8> },
    HDel { key: String, field: String },
    ZAdd { key: String, score: f64, member: String },
    ZRem { key: String, member: String },
    SAdd { key: String, member: String },
    SRem { key: String, member: String },
    XAdd { key: String, field: String, value: Vec<u8> },
}

/// A field read before computing the writes: the commit applies only if it still holds
/// `expected` (None: absent).
#[derive(Debug, Clone, PartialEq)]
pub struct Guard {
    pub key: String,
    pub field: String,
    pub expected: Option<Vec<u8>>,
}

/// Everything one batch changes in one org, committed by one `FCALL pb_commit`.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub org: OrgKeys,
    pub guards: Vec<Guard>,
    pub writes: Vec<Write>,
}

/// Redis' text for a score: integral millis print exactly, a card without createdAt is -inf.
pub fn score_arg(score: f64) -> String {
    if score == f64::NEG_INFINITY {
        "-inf".into()
    } else {
        format!("{}", score as i64)
    }
}

impl Commit {
    fn suffix<'a>(&self, key: &'a str) -> &'a str {
        debug_assert!(key.starts_with(&self.org.base), "{key} is not a key of {}", self.org.base);
        &key[self.org.base.len()..]
    }

    pub fn to_cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("pb_commit").arg(1).arg(&self.org.base).arg(self.guards.len());
        for g in &self.guards {
            cmd.arg(self.suffix(&g.key)).arg(&g.field);
            match &g.expected {
                None => cmd.arg("0"),
                Some(v) => {
                    let mut e = Vec::with_capacity(v.len() + 1);
                    e.push(b'1');
                    e.extend_from_slice(v);
                    cmd.arg(e)
                }
            };
        }
        for w in &self.writes {
            match w {
                Write::HSet { key, field, value } => cmd.arg("H").arg(self.suffix(key)).arg(field).arg(value.as_slice()),
                Write::HDel { key, field } => cmd.arg("h").arg(self.suffix(key)).arg(field),
                Write::ZAdd { key, score, member } => cmd.arg("Z").arg(self.suffix(key)).arg(score_arg(*score)).arg(member),
                Write::ZRem { key, member } => cmd.arg("z").arg(self.suffix(key)).arg(member),
                Write::SAdd { key, member } => cmd.arg("S").arg(self.suffix(key)).arg(member),
                Write::SRem { key, member } => cmd.arg("s").arg(self.suffix(key)).arg(member),
                Write::XAdd { key, field, value } => {
                    cmd.arg("X").arg(self.suffix(key)).arg(CHANGES_MAXLEN).arg(field).arg(value.as_slice())
                }
            };
        }
        cmd
    }
}

/// What `pb_commit` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// A guarded field changed since it was read: read again, recompute, commit again.
    Conflict,
}

impl CommitOutcome {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(CommitOutcome::Committed),
            "conflict" => Some(CommitOutcome::Conflict),
            _ => None,
        }
    }
}
