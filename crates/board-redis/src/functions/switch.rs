//! `pb_switch`: moves an org to another generation, atomically, if that generation holds every
//! event of the org the current one holds.
use board_model::keys::{Generation, KeySpace};

/// What `pb_switch` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchOutcome {
    Switched,
    /// The pointer was not the expected generation (another switch came first).
    Moved(Generation),
    /// The new generation lacks events of this partition that the current one holds.
    Behind(String),
}

impl SwitchOutcome {
    pub fn parse(s: &str) -> Option<Self> {
        if s == "ok" {
            return Some(SwitchOutcome::Switched);
        }
        if let Some(p) = s.strip_prefix("behind:") {
            return Some(SwitchOutcome::Behind(p.to_string()));
        }
        s.strip_prefix("moved:").and_then(Generation::parse).map(SwitchOutcome::Moved)
    }
}

/// `FCALL pb_switch`: moves `org` from `from` to `to` if `to` holds all it holds.
pub fn switch_cmd(keys: &KeySpace, org: &str, from: &Generation, to: &Generation) -> redis::Cmd {
    let (pointer, to_offsets, from_offsets) =
        (keys.generation_pointer(org), keys.org_in(to, org).offsets(), keys.org_in(from, org).offsets());
    let mut cmd = super::call("FCALL", "pb_switch", &[&pointer, &to_offsets, &from_offsets]);
    cmd.arg(to.name()).arg(from.name());
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        assert_eq!(SwitchOutcome::parse("ok"), Some(SwitchOutcome::Switched));
        assert_eq!(SwitchOutcome::parse("moved:g3"), Some(SwitchOutcome::Moved(Generation::numbered(3))));
        assert_eq!(SwitchOutcome::parse("moved:"), Some(SwitchOutcome::Moved(Generation::base())));
        assert_eq!(SwitchOutcome::parse("behind:t/1"), Some(SwitchOutcome::Behind("t/1".into())));
        assert_eq!(SwitchOutcome::parse("moved:x"), None);
    }
}
