//! CONTRACT.md 3: case-insensitive means equal after per-character Unicode simple case folding,
//! on both paths. Whole-string lower-casing (the final-sigma rule, `İ` → `i̇`) and locale rules
//! give different answers; this pins the rule with names that show the difference.
use crate::common::{free_port, post_board, token, TestEnv};
use board_model::model::{CardDoc, Pipeline};
use serde_json::{json, Value};
use std::time::Duration;

fn oid(n: u32) -> String {
    format!("65b0000000000000{n:08x}")
}

fn event(kind: &str, org: &str, field: &str, body: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"type": kind, "eventId": format!("ev-{}", rand::random::<u64>()), "orgId": org,
        "occurredAt": "2026-11-30T09:00:00.000Z", field: body}))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_folds_each_character_on_both_paths() {
    let env = TestEnv::new("casefold").await;
    let (org, p, s, user) = (oid(1), oid(2), oid(3), oid(4));
    let pipeline = json!({"_id": p, "orgId": org, "name": "Sales", "type": "Contact", "isActive": true,
        "stages": [{"_id": s, "name": "New", "order": 0}], "version": 1});
    let names = [("Κώστας", "Παπαδόπουλος"), ("Ayşe", "Yılmaz"), ("İlker", "Öztürk"), ("Gregor", "Weiß"), ("Ольга", "Смирнова")];
    let db = env.mongo().await;
    env.produce(&env.topics.topic_pipelines, &p, &event("pipeline.upserted", &org, "pipeline", &pipeline)).await;
    let pipeline: Pipeline = serde_json::from_value(pipeline).unwrap();
    db.collection("pipelines").insert_one(board_mongo::pipeline_to_bson(&pipeline)).await.unwrap();
    for (i, (first, last)) in names.iter().enumerate() {
        let id = oid(10 + i as u32);
        let doc = json!({"_id": id, "orgId": org, "firstName": first, "lastName": last, "fullName": format!("{first} {last}"),
            "phoneNumbers": [{"value": format!("+1555000{i:04}"), "type": "mobile"}], "createdBy": user,
            "pipelineId": p, "pipelineStage": s, "createdAt": format!("2026-10-0{}T12:00:00.000Z", i + 1), "version": 1});
        env.produce(&env.topics.topic_contacts, &id, &event("contact.upserted", &org, "contact", &doc)).await;
        let card: CardDoc = serde_json::from_value(doc).unwrap();
        db.collection("contacts").insert_one(board_mongo::card_to_bson(&card)).await.unwrap();
    }
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(60)).await;
    projector.stop().await.unwrap();

    let projection = env.serve_with(env.serve_args()).await;
    let mut args = env.serve_args();
    args.redis.redis_url = format!("redis://127.0.0.1:{}", free_port());
    let mongodb_only = env.serve_with(args).await;
    let t = token(&org, &user);
    let found = |body: &Value| -> Vec<String> {
        body["data"]["New"]["contacts"].as_array().unwrap().iter().map(|c| c["lastName"].as_str().unwrap().to_string()).collect()
    };
    for (term, expected) in [
        ("ΚΏΣ", vec!["Παπαδόπουλος"]),    // final-sigma rule of whole-string lower-casing: κώς
        ("ΚΏΣΤΑΣ", vec!["Παπαδόπουλος"]), // ς, σ and Σ are one letter
        ("παπαδόπουλοσ", vec!["Παπαδόπουλος"]),
        ("YILMAZ", vec![]), // no Turkish rule: I is not ı
        ("yılmaz", vec!["Yılmaz"]),
        ("AYŞE", vec!["Yılmaz"]),
        ("İLKER", vec!["Öztürk"]), // İ is itself ...
        ("ilker", vec![]),         // ... and not i
        ("öZTÜRK", vec!["Öztürk"]),
        ("WEISS", vec![]),      // no expansion: ß is not ss
        ("WEIẞ", vec!["Weiß"]), // capital sharp s folds to ß
        ("ольга", vec!["Смирнова"]),
        ("СМИРНОВА", vec!["Смирнова"]),
    ] {
        let body = json!({"search": term}).to_string();
        let (s1, a) = post_board(&projection, Some(&t), &body).await;
        let (s2, b) = post_board(&mongodb_only, Some(&t), &body).await;
        assert_eq!((s1, s2), (200, 200), "{term}: {a} / {b}");
        assert_eq!((a["meta"]["answeredBy"].as_str(), b["meta"]["answeredBy"].as_str()), (Some("projection"), Some("mongodb")));
        assert_eq!(found(&a), expected, "projection, search {term:?}");
        assert_eq!(found(&b), expected, "mongodb, search {term:?}");
    }
}
