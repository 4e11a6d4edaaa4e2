//! The projection's state in `{meta}` (`KeySpace::state`): `pb_state_start` makes a new
//! `building` projection when Redis holds none (a first start, or a loss), `pb_state_whole`
//! marks it whole, `pb_state_rewind` restarts it after Redis went back in time. Each is one
//! atomic call: the state, its target and the progress it allows move together.
use board_model::keys::{KeySpace, MODEL_VERSION};

/// `pb_state_start`: makes `instance` the projection's state unless one exists. The target is
/// the partitions' `ends` now, the group's progress is raised to the `floors` (the partitions'
/// log starts: offsets below are gone), and `incomplete` (when not empty) says why the
/// projection cannot be made whole from the topics alone.
pub struct StateStart<'a> {
    pub group: &'a str,
    pub instance: &'a str,
    pub now: i64,
    pub incomplete: &'a str,
    pub floors: &'a [(String, i64)],
    pub ends: &'a [(String, i64)],
}

/// What `pb_state_start` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateStarted {
    /// This call made the state (with the caller's instance).
    Made,
    /// A state existed: its instance.
    Exists(String),
}

impl StateStart<'_> {
    pub fn cmd(&self, keys: &KeySpace) -> redis::Cmd {
        let k = [keys.state(), keys.state_target(), keys.model(), keys.write_marks_seen(), keys.progress(self.group)];
        let mut cmd = super::call("FCALL", "pb_state_start", &k.each_ref().map(String::as_str));
        cmd.arg(self.instance).arg(self.now).arg(self.incomplete).arg(MODEL_VERSION);
        push_pairs(&mut cmd, self.floors);
        push_rest(&mut cmd, self.ends);
        cmd
    }

    pub fn outcome(&self, reply: String) -> StateStarted {
        if reply == self.instance {
            StateStarted::Made
        } else {
            StateStarted::Exists(reply)
        }
    }
}

/// `pb_state_whole`: marks the projection whole if `instance` is still the one Redis holds.
/// Answers whether it did.
pub fn state_whole_cmd(keys: &KeySpace, instance: &str, now: i64) -> redis::Cmd {
    let state = keys.state();
    let mut cmd = super::call("FCALL", "pb_state_whole", &[&state]);
    cmd.arg(instance).arg(now);
    cmd
}

/// `pb_state_rewind`: if `mine` is still the projection's instance, lowers the group's progress
/// to `resume` (a partition absent from it restarts from its beginning), raises it to the
/// `floors`, and makes `new` a `building` instance whose target is the partitions' `ends`.
/// Answers whether it did (another projector or a loss may have come first).
pub struct StateRewind<'a> {
    pub group: &'a str,
    pub mine: &'a str,
    pub new: &'a str,
    pub now: i64,
    pub incomplete: &'a str,
    pub resume: &'a [(String, i64)],
    pub floors: &'a [(String, i64)],
    pub ends: &'a [(String, i64)],
}

impl StateRewind<'_> {
    pub fn cmd(&self, keys: &KeySpace) -> redis::Cmd {
        let k = [keys.state(), keys.state_target(), keys.progress(self.group)];
        let mut cmd = super::call("FCALL", "pb_state_rewind", &k.each_ref().map(String::as_str));
        cmd.arg(self.mine).arg(self.new).arg(self.now).arg(self.incomplete);
        push_pairs(&mut cmd, self.resume);
        push_pairs(&mut cmd, self.floors);
        push_rest(&mut cmd, self.ends);
        cmd
    }
}

/// A counted list: n, then (field value)*n.
fn push_pairs(cmd: &mut redis::Cmd, pairs: &[(String, i64)]) {
    cmd.arg(pairs.len());
    push_rest(cmd, pairs);
}

/// The last list of a call: (field value)* to the end.
fn push_rest(cmd: &mut redis::Cmd, pairs: &[(String, i64)]) {
    for (field, value) in pairs {
        cmd.arg(field).arg(*value);
    }
}
