//! The Redis Function library (`functions.lua`) and the typed calls that apply one event each.
use crate::card::{CoreMeta, StoredCard};
use crate::events::Event;
use crate::keys::KeySpace;

pub const LIBRARY: &str = include_str!("functions.lua");

/// The error code the Functions raise for an event whose content cannot be applied (the only
/// Redis error that sends an event to the dead-letter topic).
pub const INVALID_CODE: &str = "PB_INVALID";

/// Loads (or replaces) the library. Idempotent; every projector and test calls it at start.
pub async fn load_library<C: redis::aio::ConnectionLike + Send>(conn: &mut C) -> redis::RedisResult<()> {
    redis::cmd("FUNCTION").arg("LOAD").arg("REPLACE").arg(LIBRARY).query_async::<String>(conn).await.map(|_| ())
}

/// One FCALL: the function, the org key base (the only declared key: it routes the call to the
/// org's Redis Cluster slot) and the arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionCall {
    pub function: &'static str,
    pub org_key: String,
    pub args: Vec<Vec<u8>>,
}

/// What a call reported: the event changed the projection, or it was older than (or a
/// duplicate of) what is already applied and changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied,
    Stale,
}

impl ApplyOutcome {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "applied" => Some(ApplyOutcome::Applied),
            "stale" | "duplicate" => Some(ApplyOutcome::Stale),
            _ => None,
        }
    }
}

fn s(v: impl AsRef<str>) -> Vec<u8> {
    v.as_ref().as_bytes().to_vec()
}

impl FunctionCall {
    pub fn for_event(keys: &KeySpace, event: &Event) -> FunctionCall {
        let org_key = keys.org(event.org_id()).base;
        let (function, args) = match event {
            Event::CardUpserted(kind, doc) => {
                let meta = serde_json::to_vec(&CoreMeta::from_doc(*kind, doc)).expect("meta serializes");
                let version = doc.version.unwrap_or_default().to_string();
                ("pb_upsert_card", vec![s(kind.tag()), s(&doc.id), s(version), meta, StoredCard::from_doc(doc).encode()])
            }
            Event::CardDeleted { kind, id, version, .. } => ("pb_delete_card", vec![s(kind.tag()), s(id), s(version.to_string())]),
            Event::ConversationUpserted(c) => {
                let mut assignees = c.assignees.clone().unwrap_or_default();
                assignees.sort();
                assignees.dedup();
                let assignees = serde_json::to_vec(&assignees).expect("ids serialize");
                let version = c.version.unwrap_or_default().to_string();
                ("pb_upsert_conversation", vec![s(&c.id), s(version), s(c.contact_id.as_deref().unwrap_or("")), assignees])
            }
            Event::MessageCreated(m) => (
                "pb_create_message",
                vec![s(&m.id), s(m.contact_id.as_deref().unwrap_or_default()), s(m.created_at.unwrap_or_default().to_string())],
            ),
            Event::PipelineUpserted(p) => {
                let json = serde_json::to_vec(p).expect("pipeline serializes");
                ("pb_upsert_pipeline", vec![s(&p.id), s(p.version.unwrap_or_default().to_string()), json])
            }
            Event::PipelineDeleted { id, version, .. } => ("pb_delete_pipeline", vec![s(id), s(version.to_string())]),
            Event::UserUpserted(u) => {
                let teams = serde_json::to_vec(&u.team_ids.clone().unwrap_or_default()).expect("ids serialize");
                ("pb_upsert_user", vec![s(&u.id), s(u.version.unwrap_or_default().to_string()), teams])
            }
        };
        FunctionCall { function, org_key, args }
    }

    pub fn add_to(&self, pipe: &mut redis::Pipeline) {
        let cmd = pipe.cmd("FCALL").arg(self.function).arg(1).arg(&self.org_key);
        for a in &self.args {
            cmd.arg(a.as_slice());
        }
    }

    pub fn to_cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(self.function).arg(1).arg(&self.org_key);
        for a in &self.args {
            cmd.arg(a.as_slice());
        }
        cmd
    }
}
