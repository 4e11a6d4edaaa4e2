//! Parsing of the Kafka events of CONTRACT.md section 2. Parsing is where bad input is
//! caught: whatever fails here goes, unchanged, to the dead-letter topic with the reason.
use crate::model::{is_object_id, CardDoc, CardKind, Conversation, Message, Pipeline, User};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    // Boxed: a card is far larger than every other event.
    CardUpserted(CardKind, Box<CardDoc>),
    CardDeleted { kind: CardKind, org_id: String, id: String, version: i64 },
    ConversationUpserted(Conversation),
    MessageCreated(Message),
    PipelineUpserted(Pipeline),
    PipelineDeleted { org_id: String, id: String, version: i64 },
    UserUpserted(User),
}

impl Event {
    pub fn org_id(&self) -> &str {
        match self {
            Event::CardUpserted(_, d) => &d.org_id,
            Event::CardDeleted { org_id, .. } | Event::PipelineDeleted { org_id, .. } => org_id,
            Event::ConversationUpserted(c) => &c.org_id,
            Event::MessageCreated(m) => &m.org_id,
            Event::PipelineUpserted(p) => &p.org_id,
            Event::UserUpserted(u) => &u.org_id,
        }
    }
}

/// Why an event cannot be applied. The `code` goes into the dead-letter header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoisonReason {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("missing or invalid field `{0}`")]
    MissingField(&'static str),
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("invalid document: {0}")]
    InvalidDocument(String),
    #[error("document orgId {doc:?} differs from the event orgId {event:?}")]
    OrgMismatch { event: String, doc: String },
    /// Larger than the projector's `--max-event-bytes`: refused before parsing, so one huge
    /// event cannot cost unbounded work. Raise the limit and replay it if it was legitimate.
    #[error("event of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

impl PoisonReason {
    pub fn code(&self) -> &'static str {
        match self {
            PoisonReason::InvalidJson(_) => "invalid_json",
            PoisonReason::MissingField(_) => "missing_field",
            PoisonReason::UnknownType(_) => "unknown_type",
            PoisonReason::InvalidDocument(_) => "invalid_document",
            PoisonReason::OrgMismatch { .. } => "org_mismatch",
            PoisonReason::TooLarge { .. } => "too_large",
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(rename = "type")]
    kind: Option<String>,
    event_id: Option<String>,
    org_id: Option<String>,
    occurred_at: Option<String>,
}

pub fn parse_event(payload: &[u8]) -> Result<Event, PoisonReason> {
    parse_event_timed(payload).map(|(e, _)| e)
}

/// The event and when it occurred (unix millis; None if `occurredAt` is not RFC 3339): the
/// projector measures freshness from it.
pub fn parse_event_timed(payload: &[u8]) -> Result<(Event, Option<i64>), PoisonReason> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| PoisonReason::InvalidJson(e.to_string()))?;
    // Deserialized from the borrowed tree: no copy of the event.
    let env = Envelope::deserialize(&value).map_err(|e| PoisonReason::InvalidDocument(e.to_string()))?;
    let kind = env.kind.ok_or(PoisonReason::MissingField("type"))?;
    env.event_id.filter(|s| !s.is_empty()).ok_or(PoisonReason::MissingField("eventId"))?;
    let occurred_at = env.occurred_at.ok_or(PoisonReason::MissingField("occurredAt"))?;
    let org = env.org_id.filter(|o| is_object_id(o)).ok_or(PoisonReason::MissingField("orgId"))?;

    let event = match kind.as_str() {
        "contact.upserted" => Event::CardUpserted(CardKind::Contact, Box::new(doc(&value, "contact")?)),
        "application.upserted" => Event::CardUpserted(CardKind::Application, Box::new(doc(&value, "application")?)),
        "contact.deleted" => Event::CardDeleted {
            kind: CardKind::Contact,
            org_id: org.clone(),
            id: id_field(&value, "contactId")?,
            version: version_field(&value)?,
        },
        "application.deleted" => Event::CardDeleted {
            kind: CardKind::Application,
            org_id: org.clone(),
            id: id_field(&value, "applicationId")?,
            version: version_field(&value)?,
        },
        "conversation.upserted" => Event::ConversationUpserted(doc(&value, "conversation")?),
        "message.created" => Event::MessageCreated(doc(&value, "message")?),
        "pipeline.upserted" => Event::PipelineUpserted(doc(&value, "pipeline")?),
        "pipeline.deleted" => {
            Event::PipelineDeleted { org_id: org.clone(), id: id_field(&value, "pipelineId")?, version: version_field(&value)? }
        }
        "user.upserted" => Event::UserUpserted(doc(&value, "user")?),
        other => return Err(PoisonReason::UnknownType(other.to_string())),
    };
    check_document(&event)?;
    if event.org_id() != org {
        return Err(PoisonReason::OrgMismatch { event: org, doc: event.org_id().to_string() });
    }
    Ok((event, crate::time::parse_rfc3339(&occurred_at)))
}

fn doc<T: serde::de::DeserializeOwned>(value: &Value, field: &'static str) -> Result<T, PoisonReason> {
    let v = value.get(field).filter(|v| v.is_object()).ok_or(PoisonReason::MissingField(field))?;
    T::deserialize(v).map_err(|e| PoisonReason::InvalidDocument(format!("{field}: {e}")))
}

fn id_field(value: &Value, field: &'static str) -> Result<String, PoisonReason> {
    value.get(field).and_then(Value::as_str).filter(|s| is_object_id(s)).map(str::to_string).ok_or(PoisonReason::MissingField(field))
}

/// A version is an integer from 1 to 2^63 - 1 (CONTRACT.md 2).
fn version_field(value: &Value) -> Result<i64, PoisonReason> {
    value.get("version").and_then(Value::as_i64).filter(|v| *v >= 1).ok_or(PoisonReason::MissingField("version"))
}

/// Ids become parts of Redis keys and versions decide what applies: both are checked here.
fn check_document(event: &Event) -> Result<(), PoisonReason> {
    // Messages carry no version: they are idempotent by id.
    let (id, version) = match event {
        Event::CardUpserted(_, d) => (&d.id, Some(d.version)),
        Event::ConversationUpserted(c) => (&c.id, Some(c.version)),
        Event::PipelineUpserted(p) => (&p.id, Some(p.version)),
        Event::UserUpserted(u) => (&u.id, Some(u.version)),
        Event::MessageCreated(m) => (&m.id, None),
        Event::CardDeleted { .. } | Event::PipelineDeleted { .. } => return Ok(()),
    };
    if !is_object_id(id) {
        return Err(PoisonReason::MissingField("_id"));
    }
    if let Some(version) = version {
        if version.is_none_or(|v| v < 1) {
            return Err(PoisonReason::MissingField("version"));
        }
    }
    if let Event::MessageCreated(m) = event {
        if m.contact_id.is_none() {
            return Err(PoisonReason::MissingField("message.contactId"));
        }
        if m.created_at.is_none() {
            return Err(PoisonReason::MissingField("message.createdAt"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "64f0a1b2c3d4e5f6a7b8c9d1";
    const ID: &str = "64f0a1b2c3d4e5f6a7b8c9d2";

    fn envelope(kind: &str, body: Value) -> Vec<u8> {
        let mut v = serde_json::json!({"type": kind, "eventId": "e1", "orgId": ORG,
            "occurredAt": "2026-11-30T09:25:59.123Z"});
        v.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn parses_a_contact_upsert_with_nulls() {
        let e = parse_event(&envelope(
            "contact.upserted",
            serde_json::json!({"contact": {
            "_id": ID, "orgId": ORG, "firstName": null, "createdAt": "2026-01-01T00:00:00.000Z",
            "version": 3}}),
        ))
        .unwrap();
        match e {
            Event::CardUpserted(CardKind::Contact, d) => {
                assert_eq!(d.version, Some(3));
                assert_eq!(d.first_name, None);
                assert_eq!(d.created_at, Some(1767225600000));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_what_cannot_be_applied() {
        assert_eq!(parse_event(b"{not json").unwrap_err().code(), "invalid_json");
        assert_eq!(parse_event(&envelope("contact.exploded", serde_json::json!({}))).unwrap_err().code(), "unknown_type");
        assert_eq!(parse_event(&envelope("contact.upserted", serde_json::json!({}))).unwrap_err(), PoisonReason::MissingField("contact"));
        assert_eq!(
            parse_event(&envelope("contact.deleted", serde_json::json!({"contactId": ID}))).unwrap_err(),
            PoisonReason::MissingField("version")
        );
        let other_org = "aaaaaaaaaaaaaaaaaaaaaaaa";
        let e = parse_event(&envelope("user.upserted", serde_json::json!({"user": {"_id": ID, "orgId": other_org, "version": 1}})));
        assert_eq!(e.unwrap_err().code(), "org_mismatch");
        let bad_id = parse_event(&envelope("user.upserted", serde_json::json!({"user": {"_id": "x}y", "orgId": ORG, "version": 1}})));
        assert_eq!(bad_id.unwrap_err(), PoisonReason::MissingField("_id"));
        let bad_time = parse_event(&envelope(
            "message.created",
            serde_json::json!({"message": {"_id": ID, "orgId": ORG, "contactId": ID, "createdAt": "soon"}}),
        ));
        assert_eq!(bad_time.unwrap_err().code(), "invalid_document");
    }

    #[test]
    fn versions_are_integers_from_one_to_the_i64_maximum() {
        for bad in [
            serde_json::json!(0),
            serde_json::json!(-3),
            serde_json::json!(1.5),
            serde_json::json!("7"),
            serde_json::json!(9223372036854775808u64),
        ] {
            let upsert = envelope("user.upserted", serde_json::json!({"user": {"_id": ID, "orgId": ORG, "version": bad}}));
            assert!(parse_event(&upsert).is_err(), "upsert version {bad}");
            let delete = envelope("contact.deleted", serde_json::json!({"contactId": ID, "version": bad}));
            assert_eq!(parse_event(&delete).unwrap_err(), PoisonReason::MissingField("version"), "delete version {bad}");
        }
        let max = envelope("contact.deleted", serde_json::json!({"contactId": ID, "version": i64::MAX}));
        assert!(matches!(parse_event(&max), Ok(Event::CardDeleted { version: i64::MAX, .. })));
        // Messages have no version and need none.
        let message = envelope(
            "message.created",
            serde_json::json!({"message": {"_id": ID, "orgId": ORG, "contactId": ID, "createdAt": "2026-11-30T09:25:59.123Z"}}),
        );
        assert!(parse_event(&message).is_ok());
    }

    /// The event parser never panics: any message is an event whose ids are ObjectIds and whose
    /// version is in range, or a poison reason for the dead-letter topic.
    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                prop_oneof![Just(0i64), Just(1), Just(-1), Just(i64::MAX), any::<i64>()].prop_map(Value::from),
                Just(serde_json::json!(9223372036854775808u64)),
                Just(serde_json::json!(1.5)),
                prop_oneof![
                    Just(super::ORG.to_string()),
                    Just(super::ID.to_string()),
                    Just("2026-11-30T09:25:59.123Z".to_string()),
                    Just("inbound".to_string()),
                    "\\PC{0,12}",
                ]
                .prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::vec((proptest::sample::select(FIELDS), inner), 0..8)
                        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
                ]
            })
        }

        const TYPES: &[&str] = &[
            "contact.upserted",
            "contact.deleted",
            "application.upserted",
            "application.deleted",
            "conversation.upserted",
            "message.created",
            "pipeline.upserted",
            "pipeline.deleted",
            "user.upserted",
            "contact.exploded",
        ];
        const FIELDS: &[&str] = &[
            "_id",
            "orgId",
            "version",
            "contact",
            "application",
            "conversation",
            "message",
            "pipeline",
            "user",
            "contactId",
            "applicationId",
            "pipelineId",
            "createdAt",
            "stages",
            "assignees",
            "teamIds",
            "phoneNumbers",
            "firstName",
            "name",
            "order",
            "isActive",
            "type",
            "customFields",
            "pipelineStage",
            "status",
            "value",
        ];

        fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
            if let Ok(event) = parse_event(bytes) {
                prop_assert!(crate::model::is_object_id(event.org_id()));
                let (id, version) = match &event {
                    Event::CardUpserted(_, d) => (d.id.clone(), d.version),
                    Event::CardDeleted { id, version, .. } | Event::PipelineDeleted { id, version, .. } => (id.clone(), Some(*version)),
                    Event::ConversationUpserted(c) => (c.id.clone(), c.version),
                    Event::PipelineUpserted(p) => (p.id.clone(), p.version),
                    Event::UserUpserted(u) => (u.id.clone(), u.version),
                    Event::MessageCreated(m) => (m.id.clone(), Some(1)),
                };
                prop_assert!(crate::model::is_object_id(&id));
                prop_assert!(version.is_some_and(|v| v >= 1));
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_bytes_are_an_event_or_poison(body in proptest::collection::vec(any::<u8>(), 0..256)) {
                check(&body)?;
            }

            #[test]
            fn any_event_shaped_json_is_a_valid_event_or_poison(
                kind in proptest::sample::select(TYPES),
                org in prop_oneof![Just(super::ORG.to_string()), "\\PC{0,30}"],
                body in proptest::collection::vec((proptest::sample::select(FIELDS), value()), 0..6),
            ) {
                let mut v = serde_json::json!({"type": kind, "eventId": "e", "orgId": org, "occurredAt": "2026-11-30T09:25:59.123Z"});
                for (k, val) in body {
                    v[k] = val;
                }
                check(&serde_json::to_vec(&v).unwrap())?;
            }
        }
    }
}
