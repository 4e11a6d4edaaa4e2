//! `pb_commit`: the projection's one writer. The typed builder of one commit (guards: what the
//! projector read, which must still hold; writes: what it computed) and its reply.
use board_model::keys::{Generation, OrgKeys};

const NAME: &str = "pb_commit";

/// Entries the change stream keeps per org (approximately: `MAXLEN ~`). A reader further
/// behind than this reloads the org.
pub const CHANGES_MAXLEN: usize = 1_000;

/// The op codes of `pb_commit`'s argument groups (library.lua documents each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Guard,
    MinWrites,
    HSet,
    HDel,
    ZAdd,
    ZRem,
    SAdd,
    SRem,
    XAdd,
    Offsets,
}

impl Op {
    fn code(self) -> &'static str {
        match self {
            Op::Guard => "G",
            Op::MinWrites => "W",
            Op::HSet => "H",
            Op::HDel => "h",
            Op::ZAdd => "Z",
            Op::ZRem => "z",
            Op::SAdd => "S",
            Op::SRem => "s",
            Op::XAdd => "X",
            Op::Offsets => "O",
        }
    }
}

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
    /// The live projector's commits: (the org's generation pointer key, the generation the
    /// writes are for). The commit applies only while the pointer still says so.
    pub generation: Option<(String, Generation)>,
    /// The offsets of the org's events in this batch, per `<topic>/<partition>` (the offset
    /// after the last one), kept with the data in `OrgKeys::offsets` (never lowered).
    pub offsets: Vec<(String, i64)>,
    /// The org's write counter as this committer last saw it (`OrgKeys::writes`): a Redis
    /// holding less went back in time, and the commit is refused (`CommitOutcome::Rewound`).
    pub min_writes: Option<i64>,
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

    /// One `FCALL pb_commit`: the guards, then the writes grouped by command and key (one Redis
    /// call per group inside the Function). Grouping keeps meaning: a commit holds each card's
    /// final state, so no field or member is written twice and the order of groups does not
    /// matter, except for the change-stream entry, which goes last.
    pub fn to_cmd(&self) -> redis::Cmd {
        let scores: Vec<String> =
            self.writes.iter().map(|w| if let Write::ZAdd { score, .. } = w { score_arg(*score) } else { String::new() }).collect();
        let mut groups = Groups::default();
        for g in &self.guards {
            // Absent is the empty string: no stored value is empty (records and states encode
            // to at least one byte, empty states are deleted, versions and team lists are text).
            groups.add(Op::Guard, &g.key, &[g.field.as_bytes(), g.expected.as_deref().unwrap_or_default()]);
        }
        let mut stream: Vec<(&str, &str, &[u8])> = Vec::new();
        for (w, score) in self.writes.iter().zip(&scores) {
            match w {
                Write::HSet { key, field, value } => groups.add(Op::HSet, key, &[field.as_bytes(), value]),
                Write::HDel { key, field } => groups.add(Op::HDel, key, &[field.as_bytes()]),
                Write::ZAdd { key, member, .. } => groups.add(Op::ZAdd, key, &[score.as_bytes(), member.as_bytes()]),
                Write::ZRem { key, member } => groups.add(Op::ZRem, key, &[member.as_bytes()]),
                Write::SAdd { key, member } => groups.add(Op::SAdd, key, &[member.as_bytes()]),
                Write::SRem { key, member } => groups.add(Op::SRem, key, &[member.as_bytes()]),
                Write::XAdd { key, field, value } => stream.push((key, field, value)),
            }
        }
        let offsets_key = self.org.offsets();
        for (field, offset) in &self.offsets {
            groups.add_owned(Op::Offsets, &offsets_key, field.as_bytes(), offset.to_string().into_bytes());
        }
        let mut cmd = redis::cmd("FCALL");
        match &self.generation {
            Some((pointer, generation)) => cmd.arg(NAME).arg(2).arg(&self.org.base).arg(pointer).arg(generation.name()),
            None => cmd.arg(NAME).arg(1).arg(&self.org.base),
        };
        if let Some(min) = self.min_writes {
            cmd.arg(Op::MinWrites.code()).arg(self.suffix(&self.org.writes())).arg(1).arg(min);
        }
        for (op, key, count, items) in &groups.list {
            cmd.arg(op.code()).arg(self.suffix(key)).arg(*count);
            for item in items {
                cmd.arg(*item);
            }
        }
        for (op, key, count, items) in &groups.owned {
            cmd.arg(op.code()).arg(self.suffix(key)).arg(*count);
            for item in items {
                cmd.arg(item.as_slice());
            }
        }
        for (key, field, value) in stream {
            cmd.arg(Op::XAdd.code()).arg(self.suffix(key)).arg(1).arg(CHANGES_MAXLEN).arg(field).arg(value);
        }
        cmd
    }
}

/// Writes grouped by (op, key), in order of first appearance.
#[derive(Default)]
struct Groups<'a> {
    list: Vec<(Op, &'a str, usize, Vec<&'a [u8]>)>,
    at: std::collections::HashMap<(Op, &'a str), usize>,
    /// Groups whose items are made here (offsets as text): one group per key.
    owned: Vec<(Op, String, usize, Vec<Vec<u8>>)>,
}

impl<'a> Groups<'a> {
    fn add_owned(&mut self, op: Op, key: &str, field: &[u8], value: Vec<u8>) {
        match self.owned.iter_mut().find(|g| g.0 == op && g.1 == key) {
            Some(g) => {
                g.2 += 1;
                g.3.push(field.to_vec());
                g.3.push(value);
            }
            None => self.owned.push((op, key.to_string(), 1, vec![field.to_vec(), value])),
        }
    }

    fn add(&mut self, op: Op, key: &'a str, item: &[&'a [u8]]) {
        let i = *self.at.entry((op, key)).or_insert_with(|| {
            self.list.push((op, key, 0, Vec::new()));
            self.list.len() - 1
        });
        let g = &mut self.list[i];
        g.2 += 1;
        g.3.extend_from_slice(item);
    }
}

/// What `pb_commit` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// A guarded field changed since it was read: read again, recompute, commit again.
    Conflict,
    /// The org is in another generation now (a rebuild switched it): nothing was written;
    /// compute again against that generation.
    Moved(Generation),
    /// The org's write counter is below `min_writes` (it holds this): its keys went back in
    /// time; nothing was written.
    Rewound(i64),
}

impl CommitOutcome {
    pub fn parse(s: &str) -> Option<Self> {
        if commit_writes(s).is_some() {
            return Some(CommitOutcome::Committed);
        }
        if let Some(held) = s.strip_prefix("rewound:") {
            return held.parse().ok().map(CommitOutcome::Rewound);
        }
        match s {
            "conflict" => Some(CommitOutcome::Conflict),
            _ => s.strip_prefix("moved:").and_then(Generation::parse).map(CommitOutcome::Moved),
        }
    }
}

/// The org's write counter a committed `pb_commit` answered (`ok:<n>`; a library of an older
/// build answers `ok`: 0).
pub fn commit_writes(reply: &str) -> Option<i64> {
    match reply {
        "ok" => Some(0),
        _ => reply.strip_prefix("ok:")?.parse().ok(),
    }
}
