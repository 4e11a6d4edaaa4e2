//! Criterion micro-benchmarks of the hot pure code: event decoding, card record encoding, the
//! projector's batch step, request parsing, the in-memory index and response rendering.
//! `cargo bench --bench hot`.
use board_api::query::board::{plan, AnswerMeta, BoardAnswer, BucketAnswer, CardOut};
use board_api::query::index::OrgIndex;
use board_api::query::request::ContactsRequest;
use board_model::events::{parse_event, Event};
use board_model::keys::KeySpace;
use board_model::model::{CardDoc, CardKind, Phone, Pipeline, Stage};
use board_model::record::{CardRecord, Derived};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use projector::batch::{self, Snapshot, Step};
use std::time::{Duration, Instant};

fn oid(n: u64) -> String {
    format!("{n:024x}")
}

fn contact(n: u64) -> CardDoc {
    CardDoc {
        id: oid(1_000_000 + n),
        org_id: oid(1),
        first_name: Some(format!("Jane{n}")),
        last_name: Some("Doe-Müller".into()),
        full_name: Some(format!("Jane{n} Doe-Müller")),
        phone_numbers: Some(vec![Phone { value: Some(format!("+49 171 {n:07}")), kind: Some("mobile".into()) }]),
        source: Some("web".into()),
        created_by: Some(oid(100 + n % 24)),
        owner: Some(oid(100 + n % 24)),
        pipeline_id: Some(oid(2)),
        pipeline_stage: Some(oid(10 + n % 8)),
        status: Some("New".into()),
        is_bulk_sms: Some(n.is_multiple_of(5)),
        created_at: Some(1_700_000_000_000 + n as i64 * 1000),
        updated_at: Some(1_700_000_000_000 + n as i64 * 1000),
        custom_fields: Some(serde_json::Map::from_iter([("plan".to_string(), serde_json::json!("gold"))])),
        version: Some(1),
        contact_id: None,
    }
}

fn pipeline() -> Pipeline {
    Pipeline {
        id: oid(2),
        org_id: oid(1),
        name: Some("Sales".into()),
        kind: Some("Contact".into()),
        is_active: Some(true),
        stages: Some((0..8).map(|i| Stage { id: oid(10 + i), name: Some(format!("Stage {i}")), order: Some(i as i64) }).collect()),
        version: Some(1),
    }
}

fn hot(c: &mut Criterion) {
    let event = serde_json::to_vec(&serde_json::json!({"type": "contact.upserted", "eventId": "e1", "orgId": oid(1),
        "occurredAt": "2026-11-30T09:25:59.123Z", "contact": serde_json::to_value(contact(7)).unwrap()}))
    .unwrap();
    c.bench_function("event decoding (contact.upserted)", |b| b.iter(|| parse_event(black_box(&event)).unwrap()));

    let record = CardRecord::live(&contact(7), Derived { assignees: vec![oid(101), oid(102)], message_times: vec![1, 2, 3] });
    let bytes = record.encode();
    c.bench_function("card record encoding", |b| b.iter(|| black_box(&record).encode()));
    c.bench_function("card record decoding", |b| b.iter(|| CardRecord::decode(black_box(&bytes)).unwrap()));

    let keys = KeySpace::new("pb").org(&oid(1));
    let events: Vec<Event> = (0..1000).map(|n| Event::CardUpserted(CardKind::Contact, Box::new(contact(n)))).collect();
    let refs: Vec<&Event> = events.iter().collect();
    let mut snap = Snapshot::new();
    if let Step::Need(slots) = batch::step(&keys, &refs, &snap) {
        for s in slots {
            snap.insert(s, None);
        }
    }
    c.bench_function("batch step: 1,000 new contacts", |b| {
        b.iter(|| match batch::step(&keys, black_box(&refs), &snap) {
            Step::Done { commit, .. } => commit,
            Step::Need(_) => unreachable!("everything was read"),
        })
    });

    let body = br#"{"pipelineType":"Contact","ownerFilter":"my","messageStatus":"unanswered","search":"jane","size":25,
        "createdDateRange":{"start":"2026-01-01T00:00:00Z"},"lastMessageTimeRange":{"value":3,"unit":"days"},"page":{"Stage 1":2}}"#;
    c.bench_function("request parsing", |b| b.iter(|| ContactsRequest::parse(black_box(body)).unwrap().into_query().unwrap()));

    let mut index = OrgIndex::new("0-0".into());
    for n in 0..100_000u64 {
        let d = contact(n);
        index.put(CardKind::Contact, &d.id, Some(&CardRecord::live(&d, Derived::default())));
    }
    let q = ContactsRequest::parse(br#"{"search":"jane12","size":25}"#).unwrap().into_query().unwrap();
    let p = plan(&[pipeline()], &q).unwrap();
    c.bench_function("index: search over 100k cards, 8 stages", |b| {
        b.iter(|| index.answer(&p, &q, (&oid(101), 0), None, Instant::now() + Duration::from_secs(5)).unwrap())
    });

    let full = plan(&[pipeline()], &ContactsRequest::parse(b"{}").unwrap().into_query().unwrap()).unwrap();
    let answer = BoardAnswer {
        kind: CardKind::Contact,
        buckets: full
            .buckets
            .iter()
            .map(|b| BucketAnswer {
                name: b.name.clone(),
                stage_id: b.stage.as_ref().map(|s| s.id.clone()),
                total: 125_000,
                cards: (0..25)
                    .map(|n| CardOut { doc: contact(n), assignees: vec![oid(101)], last_message_at: Some(1_700_000_000_000) })
                    .collect(),
            })
            .collect(),
    };
    let meta = AnswerMeta {
        answered_by: "projection",
        route: Some("sorted_sets"),
        reason: None,
        projection_lag: Some(0),
        replica_staleness_ms: None,
    };
    println!("rendered board: {} bytes", answer.to_json_bytes(&meta).len());
    c.bench_function("response rendering (8 stages x 25 cards)", |b| b.iter(|| black_box(&answer).to_json_bytes(&meta)));
}

criterion_group!(benches, hot);
criterion_main!(benches);
