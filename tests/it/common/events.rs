//! Hand-made events of one org (ids from [`oid`]), for tests that need a few exact documents
//! rather than a seeded org.
use serde_json::{json, Value};

pub fn oid(n: u32) -> String {
    format!("65a0000000000000{n:08x}")
}

pub fn event(kind: &str, org: &str, field: &str, body: Value) -> Vec<u8> {
    let mut v = json!({"type": kind, "eventId": format!("ev-{}", rand::random::<u64>()), "orgId": org,
        "occurredAt": "2026-11-30T09:00:00.000Z"});
    v.as_object_mut().unwrap().insert(field.into(), body);
    serde_json::to_vec(&v).unwrap()
}

pub fn contact(org: &str, id: &str, version: i64, pipeline: &str, stage: &str, owner: &str, name: &str) -> Value {
    json!({"_id": id, "orgId": org, "firstName": name, "lastName": "Tester", "fullName": format!("{name} Tester"),
        "phoneNumbers": [{"value": "+15550001111", "type": "mobile"}], "source": "website", "createdBy": oid(90),
        "owner": owner, "pipelineId": pipeline, "pipelineStage": stage, "status": null, "isBulkSms": false,
        "createdAt": "2026-10-01T12:00:00.000Z", "updatedAt": "2026-10-01T12:00:00.000Z",
        "customFields": {"tier": "gold"}, "version": version})
}

/// The event of an active Contact pipeline with one stage, "New".
pub fn one_stage_pipeline(org: &str, p: &str, s: &str) -> Vec<u8> {
    let pipeline = json!({"_id": p, "orgId": org, "name": "Sales", "type": "Contact", "isActive": true,
        "stages": [{"_id": s, "name": "New", "order": 0}], "version": 1});
    event("pipeline.upserted", org, "pipeline", pipeline)
}
