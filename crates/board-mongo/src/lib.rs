//! The MongoDB source of truth (CONTRACT.md section 1): connection with timeouts, and the
//! conversion of documents between BSON (ids as strings, times as BSON dates) and the core types.
use board_model::model::{CardDoc, Conversation, Message, Phone, Pipeline, Stage, User};
use board_model::time::Millis;
use bson::{doc, Bson, DateTime, Document};
use clap::Args;
use mongodb::options::ClientOptions;
use std::time::Duration;

/// Where the source of truth is (flags with environment fallbacks, CONTRACT.md 4).
#[derive(Debug, Clone, Args)]
pub struct MongoArgs {
    #[arg(long, env = "MONGODB_URI", default_value = "mongodb://127.0.0.1:27017")]
    pub mongodb_uri: String,
    #[arg(long, env = "MONGODB_DB", default_value = "crm")]
    pub mongodb_db: String,
}

/// Every call gets a deadline: a MongoDB-wire server that fails inside a command must not leave
/// the client waiting forever (LOCAL-STACK.md).
pub async fn connect(uri: &str, db: &str) -> mongodb::error::Result<mongodb::Database> {
    let mut opts = ClientOptions::parse(uri).await?;
    // URI options (serverSelectionTimeoutMS, connectTimeoutMS) win; these are the defaults.
    opts.server_selection_timeout.get_or_insert(Duration::from_secs(15));
    opts.connect_timeout.get_or_insert(Duration::from_secs(10));
    opts.app_name = Some("pipeline-board".into());
    let client = mongodb::Client::with_options(opts)?;
    Ok(client.database(db))
}

/// The indexes a MongoDB user of this schema creates (README, "MongoDB"): every query is by
/// org, the derived fields are read by contact, and the custom-field query of the API
/// (`customFields.<key>` equal to, or containing, a value) needs a wildcard index on the cards'
/// custom fields, whose keys differ by org.
pub const INDEXES: &[(&str, &[&str])] = &[
    ("contacts", &["orgId"]),
    ("applications", &["orgId"]),
    ("conversations", &["orgId", "contactId"]),
    ("messages", &["orgId", "contactId"]),
    ("pipelines", &["orgId"]),
    ("users", &["orgId"]),
    ("contacts", &["customFields.$**"]),
    ("applications", &["customFields.$**"]),
];

/// Creates `INDEXES`, each on its own: a server that lacks a kind of index keeps the others.
/// Returns the ones not created, and why. FerretDB 1.x has no wildcard indexes and would take
/// `customFields.$**` for a field's name (an index of nothing that every write maintains): it
/// gets none.
pub async fn create_indexes(db: &mongodb::Database) -> Vec<(String, String)> {
    let ferretdb = db.run_command(doc! {"buildInfo": 1}).await.is_ok_and(|info| info.contains_key("ferretdbVersion"));
    let mut refused = Vec::new();
    for (coll, keys) in INDEXES {
        let name = format!("{coll} {}", keys.join(", "));
        if ferretdb && keys.iter().any(|k| k.ends_with("$**")) {
            refused.push((name, "FerretDB has no wildcard indexes".to_string()));
            continue;
        }
        let spec: Document = keys.iter().map(|k| (k.to_string(), Bson::Int32(1))).collect();
        let model = mongodb::IndexModel::builder().keys(spec).build();
        if let Err(e) = db.collection::<Document>(coll).create_index(model).await {
            refused.push((name, e.to_string()));
        }
    }
    refused
}

fn opt_str(v: &Option<String>) -> Bson {
    v.as_ref().map(|s| Bson::String(s.clone())).unwrap_or(Bson::Null)
}
fn opt_time(v: Option<Millis>) -> Bson {
    v.map(|ms| Bson::DateTime(DateTime::from_millis(ms))).unwrap_or(Bson::Null)
}
fn get_str(d: &Document, k: &str) -> Option<String> {
    match d.get(k) {
        Some(Bson::String(s)) => Some(s.clone()),
        Some(Bson::ObjectId(o)) => Some(o.to_hex()),
        _ => None,
    }
}
fn get_time(d: &Document, k: &str) -> Option<Millis> {
    match d.get(k) {
        Some(Bson::DateTime(t)) => Some(t.timestamp_millis()),
        Some(Bson::String(s)) => board_model::time::parse_rfc3339(s),
        _ => None,
    }
}
fn get_i64(d: &Document, k: &str) -> Option<i64> {
    match d.get(k) {
        Some(Bson::Int32(i)) => Some(*i as i64),
        Some(Bson::Int64(i)) => Some(*i),
        Some(Bson::Double(f)) => Some(*f as i64),
        _ => None,
    }
}
fn get_bool(d: &Document, k: &str) -> Option<bool> {
    d.get(k).and_then(Bson::as_bool)
}
fn get_str_list(d: &Document, k: &str) -> Option<Vec<String>> {
    d.get_array(k).ok().map(|a| a.iter().filter_map(|b| b.as_str().map(str::to_string)).collect())
}

pub fn card_to_bson(c: &CardDoc) -> Document {
    let phones: Bson = match &c.phone_numbers {
        None => Bson::Null,
        Some(ps) => Bson::Array(ps.iter().map(|p| Bson::Document(doc! {"value": opt_str(&p.value), "type": opt_str(&p.kind)})).collect()),
    };
    let custom: Bson = match &c.custom_fields {
        None => Bson::Null,
        Some(m) => bson::to_bson(m).unwrap_or(Bson::Null),
    };
    let mut d = doc! {
        "_id": &c.id, "orgId": &c.org_id, "firstName": opt_str(&c.first_name), "lastName": opt_str(&c.last_name),
        "fullName": opt_str(&c.full_name), "phoneNumbers": phones, "source": opt_str(&c.source),
        "createdBy": opt_str(&c.created_by), "owner": opt_str(&c.owner), "pipelineId": opt_str(&c.pipeline_id),
        "pipelineStage": opt_str(&c.pipeline_stage), "status": opt_str(&c.status),
        "isBulkSms": c.is_bulk_sms.map(Bson::Boolean).unwrap_or(Bson::Null),
        "createdAt": opt_time(c.created_at), "updatedAt": opt_time(c.updated_at), "customFields": custom,
        "version": c.version.map(Bson::Int64).unwrap_or(Bson::Null),
    };
    if let Some(cid) = &c.contact_id {
        d.insert("contactId", cid);
    }
    d
}

/// A stored value as the API renders it (CONTRACT.md 1: ids as strings, times as RFC 3339), the
/// same as the projection, which gets these values from events; anything else as relaxed
/// extended JSON.
fn bson_to_json(b: &Bson) -> serde_json::Value {
    use serde_json::Value;
    match b {
        Bson::DateTime(t) => Value::String(board_model::time::format_millis(t.timestamp_millis())),
        Bson::ObjectId(o) => Value::String(o.to_hex()),
        Bson::Document(d) => Value::Object(d.iter().map(|(k, v)| (k.clone(), bson_to_json(v))).collect()),
        Bson::Array(a) => Value::Array(a.iter().map(bson_to_json).collect()),
        other => other.clone().into_relaxed_extjson(),
    }
}

pub fn card_from_bson(d: &Document) -> CardDoc {
    let phone_numbers = d
        .get_array("phoneNumbers")
        .ok()
        .map(|a| a.iter().filter_map(Bson::as_document).map(|p| Phone { value: get_str(p, "value"), kind: get_str(p, "type") }).collect());
    let custom_fields = d.get_document("customFields").ok().and_then(|cf| bson_to_json(&Bson::Document(cf.clone())).as_object().cloned());
    CardDoc {
        id: get_str(d, "_id").unwrap_or_default(),
        org_id: get_str(d, "orgId").unwrap_or_default(),
        first_name: get_str(d, "firstName"),
        last_name: get_str(d, "lastName"),
        full_name: get_str(d, "fullName"),
        phone_numbers,
        source: get_str(d, "source"),
        created_by: get_str(d, "createdBy"),
        owner: get_str(d, "owner"),
        pipeline_id: get_str(d, "pipelineId"),
        pipeline_stage: get_str(d, "pipelineStage"),
        status: get_str(d, "status"),
        is_bulk_sms: get_bool(d, "isBulkSms"),
        created_at: get_time(d, "createdAt"),
        updated_at: get_time(d, "updatedAt"),
        custom_fields,
        version: get_i64(d, "version"),
        contact_id: get_str(d, "contactId"),
    }
}

pub fn conversation_to_bson(c: &Conversation) -> Document {
    let assignees = c.assignees.as_ref().map(|a| Bson::from(a.clone())).unwrap_or(Bson::Null);
    doc! {"_id": &c.id, "orgId": &c.org_id, "contactId": opt_str(&c.contact_id), "assignees": assignees,
    "version": c.version.map(Bson::Int64).unwrap_or(Bson::Null)}
}

pub fn conversation_from_bson(d: &Document) -> Conversation {
    Conversation {
        id: get_str(d, "_id").unwrap_or_default(),
        org_id: get_str(d, "orgId").unwrap_or_default(),
        contact_id: get_str(d, "contactId"),
        assignees: get_str_list(d, "assignees"),
        version: get_i64(d, "version"),
    }
}

pub fn message_to_bson(m: &Message) -> Document {
    doc! {"_id": &m.id, "orgId": &m.org_id, "contactId": opt_str(&m.contact_id),
    "conversationId": opt_str(&m.conversation_id), "direction": opt_str(&m.direction),
    "createdAt": opt_time(m.created_at)}
}

pub fn message_from_bson(d: &Document) -> Message {
    Message {
        id: get_str(d, "_id").unwrap_or_default(),
        org_id: get_str(d, "orgId").unwrap_or_default(),
        contact_id: get_str(d, "contactId"),
        conversation_id: get_str(d, "conversationId"),
        direction: get_str(d, "direction"),
        created_at: get_time(d, "createdAt"),
    }
}

pub fn pipeline_to_bson(p: &Pipeline) -> Document {
    let stages: Vec<Bson> = p
        .stages
        .iter()
        .flatten()
        .map(|s| Bson::Document(doc! {"_id": &s.id, "name": opt_str(&s.name), "order": s.order.map(Bson::Int64).unwrap_or(Bson::Null)}))
        .collect();
    doc! {"_id": &p.id, "orgId": &p.org_id, "name": opt_str(&p.name), "type": opt_str(&p.kind),
    "isActive": p.is_active.map(Bson::Boolean).unwrap_or(Bson::Null), "stages": stages,
    "version": p.version.map(Bson::Int64).unwrap_or(Bson::Null)}
}

pub fn pipeline_from_bson(d: &Document) -> Pipeline {
    let stages = d.get_array("stages").ok().map(|a| {
        a.iter()
            .filter_map(Bson::as_document)
            .map(|s| Stage { id: get_str(s, "_id").unwrap_or_default(), name: get_str(s, "name"), order: get_i64(s, "order") })
            .collect()
    });
    Pipeline {
        id: get_str(d, "_id").unwrap_or_default(),
        org_id: get_str(d, "orgId").unwrap_or_default(),
        name: get_str(d, "name"),
        kind: get_str(d, "type"),
        is_active: get_bool(d, "isActive"),
        stages,
        version: get_i64(d, "version"),
    }
}

pub fn user_to_bson(u: &User) -> Document {
    let teams = u.team_ids.as_ref().map(|t| Bson::from(t.clone())).unwrap_or(Bson::Null);
    doc! {"_id": &u.id, "orgId": &u.org_id, "teamIds": teams, "version": u.version.map(Bson::Int64).unwrap_or(Bson::Null)}
}

pub fn user_from_bson(d: &Document) -> User {
    User {
        id: get_str(d, "_id").unwrap_or_default(),
        org_id: get_str(d, "orgId").unwrap_or_default(),
        team_ids: get_str_list(d, "teamIds"),
        version: get_i64(d, "version"),
    }
}

/// Everything MongoDB holds for one org, loaded in full (verify and tests: small orgs).
#[derive(Debug, Default, Clone)]
pub struct OrgSnapshot {
    pub contacts: Vec<CardDoc>,
    pub applications: Vec<CardDoc>,
    pub conversations: Vec<Conversation>,
    pub messages: Vec<Message>,
    pub pipelines: Vec<Pipeline>,
    pub users: Vec<User>,
}

async fn load_all(db: &mongodb::Database, coll: &str, org: &str) -> mongodb::error::Result<Vec<Document>> {
    use futures::TryStreamExt;
    let opts = mongodb::options::FindOptions::builder().max_time(Duration::from_secs(120)).build();
    db.collection::<Document>(coll).find(doc! {"orgId": org}).with_options(opts).await?.try_collect().await
}

pub async fn load_org(db: &mongodb::Database, org: &str) -> mongodb::error::Result<OrgSnapshot> {
    Ok(OrgSnapshot {
        contacts: load_all(db, "contacts", org).await?.iter().map(card_from_bson).collect(),
        applications: load_all(db, "applications", org).await?.iter().map(card_from_bson).collect(),
        conversations: load_all(db, "conversations", org).await?.iter().map(conversation_from_bson).collect(),
        messages: load_all(db, "messages", org).await?.iter().map(message_from_bson).collect(),
        pipelines: load_all(db, "pipelines", org).await?.iter().map(pipeline_from_bson).collect(),
        users: load_all(db, "users", org).await?.iter().map(user_from_bson).collect(),
    })
}

/// Org ids present in the source of truth (from `pipelines`: every org has at least one).
pub async fn org_ids(db: &mongodb::Database) -> mongodb::error::Result<Vec<String>> {
    use futures::TryStreamExt;
    let docs: Vec<Document> = db.collection::<Document>("pipelines").find(doc! {}).await?.try_collect().await?;
    let mut orgs: Vec<String> = docs.iter().filter_map(|d| get_str(d, "orgId")).collect();
    orgs.sort();
    orgs.dedup();
    Ok(orgs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_field_dates_and_ids_render_as_the_projection_renders_them() {
        let at = DateTime::from_millis(1_764_494_759_123);
        let oid = bson::oid::ObjectId::parse_str("65a00000000000000000000a").unwrap();
        let d = doc! {"_id": "65a00000000000000000000b", "orgId": "65a00000000000000000000c",
        "customFields": {"renewal": at, "ref": oid, "tier": "gold", "n": 3_i32, "nested": {"since": at}, "list": [at]}};
        let cf = card_from_bson(&d).custom_fields.unwrap();
        assert_eq!(cf["renewal"], serde_json::json!("2025-11-30T09:25:59.123Z"));
        assert_eq!(cf["ref"], serde_json::json!("65a00000000000000000000a"));
        assert_eq!(cf["tier"], serde_json::json!("gold"));
        assert_eq!(cf["n"], serde_json::json!(3));
        assert_eq!(cf["nested"]["since"], serde_json::json!("2025-11-30T09:25:59.123Z"));
        assert_eq!(cf["list"][0], serde_json::json!("2025-11-30T09:25:59.123Z"));
    }
}
