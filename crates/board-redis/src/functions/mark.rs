//! `pb_mark_raise`: a primary's write mark (`KeySpace::write_mark`), raised by each projector
//! every second, to notice a Redis that went back in time (consumers/src/rewind.rs).

/// What `pb_mark_raise` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkRaised {
    /// The mark's new `seq`.
    Raised(i64),
    /// The mark holds less than was seen: the shard went back in time. Nothing was written; the
    /// `seq` it holds and the progress recorded with it (JSON, when any).
    Rewound { held: i64, progress: Option<String> },
}

impl redis::FromRedisValue for MarkRaised {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let (word, seq, progress): (String, i64, Option<String>) = redis::FromRedisValue::from_redis_value(v)?;
        match word.as_str() {
            "ok" => Ok(MarkRaised::Raised(seq)),
            "rewound" => Ok(MarkRaised::Rewound { held: seq, progress: progress.filter(|p| !p.is_empty()) }),
            other => Err(format!("pb_mark_raise answered {other:?}").into()),
        }
    }
}

/// `FCALL pb_mark_raise`: raises `mark` past `seen` (the highest seq seen in it) and keeps
/// `progress` (JSON) with the new seq.
pub fn mark_raise_cmd(mark: &str, seen: i64, progress: &str) -> redis::Cmd {
    let mut cmd = super::call("FCALL", "pb_mark_raise", &[mark]);
    cmd.arg(seen).arg(progress);
    cmd
}
