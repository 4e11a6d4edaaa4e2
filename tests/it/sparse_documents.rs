//! CONTRACT.md 1: any field but `_id` and `orgId` may be missing or null. Documents that carry
//! only what events must carry (CONTRACT.md 2) are projected, and both paths (and the oracle)
//! answer the same about them.
use crate::common::{free_port, oracle, post_board, token, TestEnv};
use bson::{doc, Bson, DateTime, Document};
use serde_json::{json, Value};
use std::time::Duration;

fn oid(n: u32) -> String {
    format!("65c0000000000000{n:08x}")
}

const CREATED: &str = "2026-10-01T12:00:00.000Z";

/// The event's document is the MongoDB document with RFC 3339 strings for dates.
fn as_json(d: &Document) -> Value {
    Value::Object(
        d.iter()
            .map(|(k, v)| {
                let j = match v {
                    Bson::DateTime(t) => json!(board_model::time::format_millis(t.timestamp_millis())),
                    other => other.clone().into_relaxed_extjson(),
                };
                (k.clone(), j)
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_with_only_the_required_fields_answer_alike_on_both_paths() {
    let env = TestEnv::new("sparse").await;
    let db = env.mongo().await;
    let (org, p, s1, s2, u) = (oid(1), oid(2), oid(3), oid(4), oid(5));
    let created = DateTime::parse_rfc3339_str(CREATED).unwrap();
    let t = &env.topics;
    let docs: Vec<(&str, &str, &str, &str, Document)> = vec![
        // (topic, event type, field, collection, document)
        (
            &t.topic_pipelines,
            "pipeline.upserted",
            "pipeline",
            "pipelines",
            doc! {"_id": &p, "orgId": &org, "type": "Contact", "isActive": true, "version": 1_i64,
            "stages": [{"_id": &s1, "name": "New", "order": 0_i64}, {"_id": &s2, "name": "Done"}]},
        ),
        (&t.topic_users, "user.upserted", "user", "users", doc! {"_id": &u, "orgId": &org, "version": 1_i64}),
        // No names, phones, people, flags, custom fields or createdAt.
        (
            &t.topic_contacts,
            "contact.upserted",
            "contact",
            "contacts",
            doc! {"_id": oid(10), "orgId": &org, "version": 1_i64, "pipelineId": &p, "pipelineStage": &s1},
        ),
        // Legacy: no pipelineId, no stage id, a status name.
        (
            &t.topic_contacts,
            "contact.upserted",
            "contact",
            "contacts",
            doc! {"_id": oid(11), "orgId": &org, "version": 1_i64, "status": "New", "createdAt": created},
        ),
        // Explicit nulls, a phone without a value, a stage without an order.
        (
            &t.topic_contacts,
            "contact.upserted",
            "contact",
            "contacts",
            doc! {"_id": oid(12), "orgId": &org, "version": 1_i64, "pipelineId": &p, "pipelineStage": &s2, "firstName": Bson::Null,
            "owner": Bson::Null, "phoneNumbers": [{"value": Bson::Null}], "createdAt": created, "customFields": Bson::Null},
        ),
        // Neither stage nor status: on no column.
        (&t.topic_contacts, "contact.upserted", "contact", "contacts", doc! {"_id": oid(13), "orgId": &org, "version": 1_i64}),
        // A conversation without assignees, one without a contact.
        (
            &t.topic_conversations,
            "conversation.upserted",
            "conversation",
            "conversations",
            doc! {"_id": oid(20), "orgId": &org, "version": 1_i64, "contactId": oid(10)},
        ),
        (
            &t.topic_conversations,
            "conversation.upserted",
            "conversation",
            "conversations",
            doc! {"_id": oid(21), "orgId": &org, "version": 1_i64, "assignees": [&u]},
        ),
        // A message with only what a message must carry.
        (
            &t.topic_messages,
            "message.created",
            "message",
            "messages",
            doc! {"_id": oid(30), "orgId": &org, "contactId": oid(11), "createdAt": created},
        ),
        // An application with only the required fields (no Application pipeline exists).
        (
            &t.topic_applications,
            "application.upserted",
            "application",
            "applications",
            doc! {"_id": oid(40), "orgId": &org, "version": 1_i64},
        ),
    ];
    for (topic, kind, field, collection, d) in &docs {
        let event = json!({"type": kind, "eventId": format!("e-{}", rand::random::<u64>()), "orgId": &org,
            "occurredAt": "2026-11-30T09:00:00.000Z", *field: as_json(d)});
        env.produce(topic, d.get_str("_id").unwrap(), &serde_json::to_vec(&event).unwrap()).await;
        db.collection::<Document>(collection).insert_one(d.clone()).await.unwrap();
    }
    // A message without createdAt is refused as an event (dead letter) and ignored by the
    // MongoDB path (CONTRACT.md 2): it must not make its contact "answered" there.
    db.collection::<Document>("messages").insert_one(doc! {"_id": oid(31), "orgId": &org, "contactId": oid(10)}).await.unwrap();
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let counters = projector.counters.clone();
    projector.stop().await.unwrap();
    assert_eq!(counters.dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 0, "every document is a valid event");
    let report = env.verify(std::slice::from_ref(&org)).await;
    assert!(report.is_clean(), "drift: {:#?}", report.samples);

    let projection = env.serve_with(env.serve_args()).await;
    let mut args = env.serve_args();
    args.redis.redis_url = format!("redis://127.0.0.1:{}", free_port());
    let mongodb_only = env.serve_with(args).await;
    let snap = board_mongo::load_org(&db, &org).await.unwrap();
    let tk = token(&org, &u);
    let now = chrono::Utc::now().timestamp_millis();
    for body in [
        json!({}),
        json!({"search": "n"}),
        json!({"ownerFilter": "unassigned"}),
        json!({"ownerFilter": "team"}),
        json!({"ownerFilter": "my"}),
        json!({"assignee": [u]}),
        json!({"messageStatus": "answered"}),
        json!({"messageStatus": "unanswered"}),
        json!({"lastMessageTimeRange": {"value": 1, "unit": "days"}}),
        json!({"createdDateRange": {"start": CREATED}}),
        json!({"bulkOnly": true}),
        json!({"source": "web"}),
        json!({"stages": ["Done", "New"]}),
        json!({"status": "Done"}),
    ] {
        let (s1, a) = post_board(&projection, Some(&tk), &body.to_string()).await;
        let (s2, b) = post_board(&mongodb_only, Some(&tk), &body.to_string()).await;
        assert_eq!((s1, s2), (200, 200), "{body}: {a} / {b}");
        assert_eq!(a["meta"]["answeredBy"], "projection");
        assert_eq!(a["data"], b["data"], "{body}: the paths differ");
        assert_eq!(a["dataByStatus"], b["dataByStatus"], "{body}");
        let expected = oracle::answer(&snap, &u, &body, now).unwrap();
        for bucket in &expected {
            let got: Vec<&str> =
                a["data"][&bucket.name]["contacts"].as_array().unwrap().iter().map(|c| c["_id"].as_str().unwrap()).collect();
            assert_eq!(got, bucket.page, "{body}: bucket {} against the oracle", bucket.name);
            assert_eq!(a["data"][&bucket.name]["total"], json!(bucket.total));
        }
    }
    // No Application pipeline: 404 on both paths.
    let body = json!({"pipelineType": "Application"}).to_string();
    assert_eq!(post_board(&projection, Some(&tk), &body).await.0, 404);
    assert_eq!(post_board(&mongodb_only, Some(&tk), &body).await.0, 404);
}
