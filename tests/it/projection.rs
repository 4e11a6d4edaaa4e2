//! Event ingestion into the Redis read model, against the real Redis, Apache Kafka and FerretDB
//! started by deploy/stack.sh. Kill, restart and rebalance tests are in tests/failures.rs.
use crate::common::events::{contact, event, oid, one_stage_pipeline};
use crate::common::{env_with_own_redis, eventually, free_port, small_seed, OwnRedis, TestEnv};
use board_model::model::CardKind;
use board_model::record::{CardRecord, ContactState};
use projector::apply::Position;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use redis::AsyncCommands;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_projection_equals_mongodb() {
    let env = TestEnv::new("equal").await;
    let seeded = env.seed_and_project(small_seed(2, 300, 7)).await;

    let report = env.verify(&seeded.org_ids).await;
    assert!(report.is_clean(), "drift: {:#?}", report.samples);
    assert_eq!(report.orgs, 2);
    assert_eq!(report.cards as u64, seeded.contacts + seeded.applications);
    assert!(report.index_keys > 100, "a real projection has many index keys: {report:?}");
}

/// Duplicates, out-of-order versions, tombstones, idempotent messages and index moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_duplicates_and_tombstones() {
    let env = TestEnv::new("versions").await;
    let t = env.topics.clone();
    let org = oid(1);
    let (p, s_new, s_won) = (oid(2), oid(3), oid(4));
    let (c, d, conv) = (oid(10), oid(11), oid(12));
    let (u1, u2, u3) = (oid(20), oid(21), oid(22));
    let pipeline = json!({"_id": p, "orgId": org, "name": "Sales", "type": "Contact", "isActive": true,
        "stages": [{"_id": s_new, "name": "New", "order": 0}, {"_id": s_won, "name": "Won", "order": 1}], "version": 1});
    let conv_doc = |v: i64, who: &str| json!({"_id": conv, "orgId": org, "contactId": c, "assignees": [who], "version": v});
    let msg = |id: &str, at: &str| json!({"_id": id, "orgId": org, "contactId": c, "conversationId": conv, "direction": "inbound", "createdAt": at});

    let mut stream: Vec<(&str, String, Vec<u8>)> = vec![
        (&t.topic_pipelines, p.clone(), event("pipeline.upserted", &org, "pipeline", pipeline.clone())),
        (&t.topic_contacts, c.clone(), event("contact.upserted", &org, "contact", contact(&org, &c, 2, &p, &s_won, &u1, "Ann"))),
        // older version after a newer one, then an exact duplicate: both change nothing
        (&t.topic_contacts, c.clone(), event("contact.upserted", &org, "contact", contact(&org, &c, 1, &p, &s_new, &u3, "Old"))),
        (&t.topic_contacts, c.clone(), event("contact.upserted", &org, "contact", contact(&org, &c, 2, &p, &s_won, &u1, "Ann"))),
        (&t.topic_conversations, conv.clone(), event("conversation.upserted", &org, "conversation", conv_doc(1, &u3))),
        (&t.topic_conversations, conv.clone(), event("conversation.upserted", &org, "conversation", conv_doc(2, &u2))),
        (&t.topic_conversations, conv.clone(), event("conversation.upserted", &org, "conversation", conv_doc(1, &u3))),
        (&t.topic_messages, c.clone(), event("message.created", &org, "message", msg(&oid(30), "2026-11-01T00:00:00.000Z"))),
        (&t.topic_messages, c.clone(), event("message.created", &org, "message", msg(&oid(30), "2026-11-01T00:00:00.000Z"))),
        (&t.topic_messages, c.clone(), event("message.created", &org, "message", msg(&oid(31), "2026-11-02T00:00:00.000Z"))),
        // a delete leaves a tombstone: neither a late older upsert nor one of the same version resurrects it
        (&t.topic_contacts, d.clone(), event("contact.upserted", &org, "contact", contact(&org, &d, 1, &p, &s_new, &u1, "Dee"))),
    ];
    let mut del = serde_json::from_slice::<Value>(&event("contact.deleted", &org, "contactId", json!(d))).unwrap();
    del["version"] = json!(2);
    stream.push((&t.topic_contacts, d.clone(), serde_json::to_vec(&del).unwrap()));
    stream.push((&t.topic_contacts, d.clone(), event("contact.upserted", &org, "contact", contact(&org, &d, 1, &p, &s_new, &u1, "Dee"))));
    stream.push((&t.topic_contacts, d.clone(), event("contact.upserted", &org, "contact", contact(&org, &d, 2, &p, &s_new, &u1, "Dee"))));
    // the stage and owner change: the card must leave every old index
    stream.push((&t.topic_contacts, c.clone(), event("contact.upserted", &org, "contact", contact(&org, &c, 3, &p, &s_new, &u2, "Ann"))));
    for (topic, key, payload) in &stream {
        env.produce(topic, key, payload).await;
    }

    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let counters = projector.counters.clone();
    projector.stop().await.unwrap();
    assert_eq!(counters.stale.load(Ordering::Relaxed), 6, "older, duplicate and tombstoned events change nothing");
    assert_eq!(counters.applied.load(Ordering::Relaxed), stream.len() as u64 - 6);
    assert_eq!(counters.dead_lettered.load(Ordering::Relaxed), 0);

    let keys = env.keys.org(&org);
    let mut r = env.redis().await;
    let rk_new = format!("{p}|s:{s_new}");
    let rk_won = format!("{p}|s:{s_won}");
    let members = |v: Vec<String>| v.into_iter().collect::<BTreeSet<String>>();
    assert_eq!(members(r.zrange(keys.stage(CardKind::Contact, &rk_new), 0, -1).await.unwrap()), BTreeSet::from([c.clone()]));
    assert!(!r.exists::<_, bool>(keys.stage(CardKind::Contact, &rk_won)).await.unwrap(), "moved out of the old stage");
    assert!(!r.exists::<_, bool>(keys.stage_person(CardKind::Contact, &rk_won, &u1)).await.unwrap(), "old owner index emptied");
    assert!(!r.exists::<_, bool>(keys.stage_person(CardKind::Contact, &rk_new, &u3)).await.unwrap(), "old assignee's index emptied");
    assert_eq!(members(r.zrange(keys.stage_person(CardKind::Contact, &rk_new, &u2), 0, -1).await.unwrap()), BTreeSet::from([c.clone()]));
    let state = ContactState::decode(&r.hget::<_, _, Vec<u8>>(keys.contact_states(), &c).await.unwrap()).unwrap();
    assert_eq!(state.message_times.len(), 2, "a redelivered message counts once");
    let tombstone = CardRecord::decode(&r.hget::<_, _, Vec<u8>>(keys.cards(CardKind::Contact), &d).await.unwrap()).unwrap();
    assert_eq!((tombstone.card, tombstone.version), (None, 2), "the tombstoned card stays deleted");

    // The same final state written to MongoDB: verify finds the projection equal to it.
    let db = env.mongo().await;
    let final_contact: board_model::model::CardDoc = serde_json::from_value(contact(&org, &c, 3, &p, &s_new, &u2, "Ann")).unwrap();
    db.collection("contacts").insert_one(board_mongo::card_to_bson(&final_contact)).await.unwrap();
    db.collection("pipelines").insert_one(board_mongo::pipeline_to_bson(&serde_json::from_value(pipeline).unwrap())).await.unwrap();
    db.collection("conversations")
        .insert_one(board_mongo::conversation_to_bson(&serde_json::from_value(conv_doc(2, &u2)).unwrap()))
        .await
        .unwrap();
    for (id, at) in [(oid(30), "2026-11-01T00:00:00.000Z"), (oid(31), "2026-11-02T00:00:00.000Z")] {
        db.collection("messages").insert_one(board_mongo::message_to_bson(&serde_json::from_value(msg(&id, at)).unwrap())).await.unwrap();
    }
    let report = env.verify(std::slice::from_ref(&org)).await;
    assert!(report.is_clean(), "drift: {:#?}", report.samples);
    assert_eq!(report.cards, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_go_to_the_dead_letter_topic_and_the_consumer_goes_on() {
    let env = TestEnv::new("dlq").await;
    let org = oid(1);
    let c = oid(10);
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{\"type\": \"contact.upserted\", oops".to_vec()),
        ("missing_field", event("contact.upserted", &org, "note", json!("no contact document"))),
        ("unknown_type", event("contact.teleported", &org, "contact", json!({}))),
    ];
    // All on one key: one partition, so the valid event after them proves the consumer went on.
    for (_, payload) in &poison {
        env.produce(&env.topics.topic_contacts, &c, payload).await;
    }
    let valid = event("contact.upserted", &org, "contact", contact(&org, &c, 1, &oid(2), &oid(3), &oid(20), "Val"));
    env.produce(&env.topics.topic_contacts, &c, &valid).await;

    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(60)).await;
    let counters = projector.counters.clone();
    projector.stop().await.unwrap();
    assert_eq!(counters.dead_lettered.load(Ordering::Relaxed), 3);
    assert_eq!(counters.applied.load(Ordering::Relaxed), 1);
    let mut r = env.redis().await;
    assert!(r.hexists::<_, _, bool>(env.keys.org(&org).cards(CardKind::Contact), &c).await.unwrap());

    // The dead-letter topic holds the three events unchanged, with their reasons.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("group.id", format!("{}-dlq-reader", env.group))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition_offset(&env.topics.topic_dlq, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("dead letters arrive").unwrap();
        let code = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "x-dlq-code").and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).to_string())))
            .expect("reason code header");
        let reason = m.headers().and_then(|h| h.iter().find(|h| h.key == "x-dlq-reason")).expect("reason header");
        assert!(reason.value.map(|v| !v.is_empty()).unwrap_or(false));
        assert_eq!(m.key(), Some(c.as_bytes()), "key kept");
        got.push((code, m.payload().unwrap().to_vec()));
    }
    got.sort();
    let mut want: Vec<(String, Vec<u8>)> = poison.into_iter().map(|(code, p)| (code.to_string(), p)).collect();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_in_one_group_share_the_partitions() {
    let env = TestEnv::new("group").await;
    let a = env.spawn_projector();
    let b = env.spawn_projector();
    // Both members hold partitions before any event exists, so both must do part of the work.
    let (ca, cb) = (a.counters.clone(), b.counters.clone());
    // A join waits for every member's next poll; on a loaded machine that can take a while, so
    // the bound is generous and a failure says what each member held.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let (x, y) = (ca.assigned_partitions.load(Ordering::Relaxed), cb.assigned_partitions.load(Ordering::Relaxed));
        if x > 0 && y > 0 && x + y == 24 {
            break;
        }
        assert!(!a.ended() && !b.ended(), "a projector ended before holding partitions (ended: {}, {})", a.ended(), b.ended());
        assert!(std::time::Instant::now() < deadline, "both consumers should hold partitions, 24 in all; they hold {x} and {y}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seeded = env.seed(small_seed(2, 250, 5)).await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    let (applied_a, applied_b) = (ca.applied.load(Ordering::Relaxed), cb.applied.load(Ordering::Relaxed));
    assert!(applied_a > 0 && applied_b > 0, "both applied events: {applied_a} and {applied_b}");
    // At least once: a redelivery (after a rebalance) is counted again as stale, never lost.
    let seen = applied_a + applied_b + ca.stale.load(Ordering::Relaxed) + cb.stale.load(Ordering::Relaxed);
    assert!(seen >= seeded.events, "every event seen: {seen} of {}", seeded.events);
    let report = env.verify(&seeded.org_ids).await;
    assert!(report.is_clean(), "drift: {:#?}", report.samples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_retried_and_nothing_is_skipped() {
    let mut env = TestEnv::new("outage").await;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("pb-{}", env.name));
    std::fs::create_dir_all(&dir).unwrap();
    let redis_server = OwnRedis::start(port, &dir);
    redis_server.wait_ready().await;
    env.redis_url = format!("redis://127.0.0.1:{port}");

    let first = env.seed(small_seed(1, 150, 21)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(60)).await;

    // Redis goes away; events keep coming.
    let dir = redis_server.stop();
    let second = env.seed(small_seed(1, 150, 22)).await;
    let counters = projector.counters.clone();
    eventually(Duration::from_secs(60), "the projector retries while Redis is down", || {
        let c = counters.clone();
        async move { c.redis_retries.load(Ordering::Relaxed) >= 2 }
    })
    .await;

    // Redis is back (same data): the projector resumes and skips nothing.
    let redis_server = OwnRedis::start(port, &dir);
    redis_server.wait_ready().await;
    env.wait_caught_up(Duration::from_secs(120)).await;
    projector.stop().await.unwrap();
    let orgs: Vec<String> = first.org_ids.iter().chain(&second.org_ids).cloned().collect();
    let report = env.verify(&orgs).await;
    assert!(report.is_clean(), "drift after the outage: {:#?}", report.samples);
    assert_eq!(report.cards as u64, first.contacts + first.applications + second.contacts + second.applications);
    redis_server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Versions are compared exactly as 64-bit integers (Lua numbers are doubles: 2^53 + 1 == 2^53
/// there), through the projector's own apply step against Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_compare_exactly_as_64_bit_integers() {
    use board_model::events::Event;
    use projector::apply::RedisApplier;
    use projector::batch::Outcome;
    let env = TestEnv::new("exact-versions").await;
    let mut applier = RedisApplier::connect(&env.redis_url, env.keys.clone()).await.unwrap();
    let (org, p, s, c, u) = (oid(1), oid(2), oid(3), oid(10), oid(20));
    let upsert = |v: i64| {
        let doc = serde_json::from_value(contact(&org, &c, v, &p, &s, &u, &format!("v{v}"))).unwrap();
        Event::CardUpserted(CardKind::Contact, Box::new(doc))
    };
    let at = |offset: i64| Position { topic: "t", partition: 0, offset };
    let two53 = 1i64 << 53;
    let cases = [
        (two53, Outcome::Applied),
        (two53 + 1, Outcome::Applied),
        (two53, Outcome::Stale),
        (two53 + 1, Outcome::Stale),
        (i64::MAX, Outcome::Applied),
        (i64::MAX - 1, Outcome::Stale),
    ];
    for (v, expected) in cases {
        let e = upsert(v);
        assert_eq!(applier.apply(&[&e], &[at(0)]).await.unwrap(), vec![expected], "version {v}");
    }
    // In one batch too: the last of the newer versions wins, the rest coalesce away.
    let c2 = oid(11);
    let batch: Vec<Event> = [two53 + 1, two53, two53 + 1]
        .iter()
        .map(|v| {
            Event::CardUpserted(
                CardKind::Contact,
                Box::new(serde_json::from_value(contact(&org, &c2, *v, &p, &s, &u, &v.to_string())).unwrap()),
            )
        })
        .collect();
    let refs: Vec<&Event> = batch.iter().collect();
    assert_eq!(applier.apply(&refs, &[at(1), at(2), at(3)]).await.unwrap(), vec![Outcome::Applied, Outcome::Stale, Outcome::Stale]);
    let mut r = env.redis().await;
    let keys = env.keys.org(&org);
    let rec = |id: String| {
        let key = keys.cards(CardKind::Contact);
        let mut r = r.clone();
        async move { CardRecord::decode(&r.hget::<_, _, Vec<u8>>(key, id).await.unwrap()).unwrap() }
    };
    assert_eq!(rec(c.clone()).await.version, i64::MAX);
    let second = rec(c2.clone()).await;
    assert_eq!((second.version, second.card.unwrap().first_name.unwrap()), (two53 + 1, (two53 + 1).to_string()));
    let _: () = redis::cmd("PING").query_async(&mut r).await.unwrap();
}

/// `pb_commit` is the one Redis script: it writes only if every guard holds, and it checks every
/// op before the first write (Redis keeps the writes of a script that fails midway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_function_guards_and_validates_before_writing() {
    use board_redis::functions::{load_library, Commit, Guard, Write};
    let env = TestEnv::new("commit-fn").await;
    let mut r = env.redis().await;
    load_library(&mut r).await.unwrap();
    let keys = env.keys.org(&oid(1));
    let (h, z) = (keys.cards(CardKind::Contact), keys.stage(CardKind::Contact, "p|s:s"));
    let write = vec![
        Write::HSet { key: h.clone(), field: "a".into(), value: b"v1".to_vec() },
        Write::ZAdd { key: z.clone(), score: 5.0, member: "a".into() },
        Write::ZAdd { key: z.clone(), score: f64::NEG_INFINITY, member: "b".into() },
    ];
    let absent = Guard { key: h.clone(), field: "a".into(), expected: None };
    let commit = |guards: Vec<Guard>, writes: Vec<Write>| {
        Commit { org: keys.clone(), guards, writes, generation: None, offsets: Vec::new(), min_writes: None }.to_cmd()
    };
    // A commit that writes replies with the org's write counter after it (rewind detection).
    assert_eq!(commit(vec![absent.clone()], write.clone()).query_async::<String>(&mut r).await.unwrap(), "ok:1");
    assert_eq!(
        r.zrange_withscores::<_, Vec<(String, f64)>>(&z, 0, -1).await.unwrap(),
        vec![("b".to_string(), f64::NEG_INFINITY), ("a".into(), 5.0)]
    );
    // The same guard no longer holds: nothing is written.
    let other = vec![Write::HSet { key: h.clone(), field: "a".into(), value: b"v2".to_vec() }];
    assert_eq!(commit(vec![absent], other.clone()).query_async::<String>(&mut r).await.unwrap(), "conflict");
    let holds = Guard { key: h.clone(), field: "a".into(), expected: Some(b"v1".to_vec()) };
    let wrong = Guard { key: h.clone(), field: "a".into(), expected: Some(b"v0".to_vec()) };
    assert_eq!(commit(vec![wrong], other.clone()).query_async::<String>(&mut r).await.unwrap(), "conflict");
    assert_eq!(r.hget::<_, _, Vec<u8>>(&h, "a").await.unwrap(), b"v1");
    assert_eq!(commit(vec![holds], other).query_async::<String>(&mut r).await.unwrap(), "ok:2", "a refused commit counts no write");
    assert_eq!(r.hget::<_, _, Vec<u8>>(&h, "a").await.unwrap(), b"v2");
    // An unknown op after a valid one: an error, and the valid one was not written either.
    let mut bad = commit(vec![], vec![Write::HSet { key: h.clone(), field: "x".into(), value: b"1".to_vec() }]);
    bad.arg("Q").arg(":card:c").arg(1).arg("y");
    let err = bad.query_async::<String>(&mut r).await.unwrap_err();
    assert!(err.to_string().contains("PB_BAD_OP"), "{err}");
    assert!(!r.hexists::<_, _, bool>(&h, "x").await.unwrap(), "nothing written before the bad op");
}

/// A Function that fails for a reason that is not the event's (here a bug in a deployed
/// library: a plain `ERR`) must not cost the event: the batch is retried until the library is
/// fixed, nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_function_is_retried_not_dead_lettered() {
    use board_redis::functions::load_library;
    let (env, own, _dir) = env_with_own_redis("script-bug").await;
    let t = env.topics.clone();
    let (org, p, s, c, u) = (oid(1), oid(2), oid(3), oid(10), oid(20));
    env.produce(&t.topic_pipelines, &p, &one_stage_pipeline(&org, &p, &s)).await;
    env.produce(&t.topic_contacts, &c, &event("contact.upserted", &org, "contact", contact(&org, &c, 1, &p, &s, &u, "Ann"))).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(60)).await;

    let mut r = env.redis().await;
    let broken = commit_starting_with("error('simulated bug in a deployed library')");
    redis::cmd("FUNCTION").arg("LOAD").arg("REPLACE").arg(&broken).query_async::<String>(&mut r).await.unwrap();
    env.produce(&t.topic_contacts, &c, &event("contact.upserted", &org, "contact", contact(&org, &c, 2, &p, &s, &u, "Bea"))).await;
    let counters = projector.counters.clone();
    eventually(Duration::from_secs(60), "the batch is retried", || {
        let c = counters.clone();
        async move { c.redis_retries.load(Ordering::Relaxed) >= 2 }
    })
    .await;
    assert_eq!(counters.dead_lettered.load(Ordering::Relaxed), 0, "not the event's fault: never dead-lettered");

    load_library(&mut r).await.unwrap();
    env.wait_caught_up(Duration::from_secs(60)).await;
    projector.stop().await.unwrap();
    assert_eq!(counters.dead_lettered.load(Ordering::Relaxed), 0);
    let rec = CardRecord::decode(&r.hget::<_, _, Vec<u8>>(env.keys.org(&org).cards(CardKind::Contact), &c).await.unwrap()).unwrap();
    assert_eq!(rec.version, 2, "applied once fixed");
    own.stop();
}

/// A dead letter that the dead-letter topic refuses (here: the topic does not exist and the
/// broker does not create topics) neither stalls its partition nor is lost: it is parked in
/// Redis, byte for byte, and the events after it are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dead_letter_is_parked_and_the_partition_goes_on() {
    let env = TestEnv::new("dlq-refused").await;
    let (org, c) = (oid(1), oid(10));
    let poison = b"{\"type\": \"contact.upserted\", not json".to_vec();
    env.produce(&env.topics.topic_contacts, &c, &poison).await;
    let valid = event("contact.upserted", &org, "contact", contact(&org, &c, 1, &oid(2), &oid(3), &oid(20), "Val"));
    env.produce(&env.topics.topic_contacts, &c, &valid).await;

    let mut settings = env.settings();
    settings.topics.topic_dlq = format!("{}.missing-dlq", env.name);
    let projector = env.spawn_projector_with(settings);
    env.wait_caught_up(Duration::from_secs(90)).await;
    let counters = projector.counters.clone();
    projector.stop().await.unwrap();
    assert_eq!((counters.dead_lettered.load(Ordering::Relaxed), counters.parked.load(Ordering::Relaxed)), (1, 1));
    assert_eq!(counters.applied.load(Ordering::Relaxed), 1, "the event after the poison one is applied");

    let mut r = env.redis().await;
    let parked: redis::streams::StreamRangeReply = r.xrange_all(env.keys.parked_dead_letters()).await.unwrap();
    assert_eq!(parked.ids.len(), 1);
    let entry = &parked.ids[0];
    let field = |name: &str| -> Vec<u8> { redis::from_redis_value(entry.map.get(name).expect(name).clone()).unwrap() };
    assert_eq!(field("payload"), poison, "kept byte for byte");
    assert_eq!(field("key"), c.as_bytes());
    assert_eq!(field("topic"), env.topics.topic_contacts.as_bytes());
    assert_eq!(field("code"), b"invalid_json");
    assert!(!field("refusal").is_empty(), "says why the topic refused it");
    // Readiness tells the operator.
    let url = env.serve_with(env.serve_args()).await;
    let ready: Value = reqwest::get(format!("{url}/readyz")).await.unwrap().json().await.unwrap();
    assert_eq!(ready["deadLettersParked"], json!(1), "{ready}");
}

/// Parked dead letters are bounded: at `DLQ_PARKED_MAX` nothing more is parked and nothing is
/// dropped; the batch waits (its offsets are not stored) until the cap is raised, and then the
/// held-back poison event is parked and the projection catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_dead_letters_stop_at_their_cap_without_losing_one() {
    let env = TestEnv::new("dlq-cap").await;
    let org = oid(1);
    for n in 0..2 {
        env.produce(&env.topics.topic_contacts, &oid(10 + n), format!("{{\"poison\": {n}").as_bytes()).await;
    }
    let valid = event("contact.upserted", &org, "contact", contact(&org, &oid(12), 1, &oid(2), &oid(3), &oid(20), "Val"));
    env.produce(&env.topics.topic_contacts, &oid(12), &valid).await;

    let mut settings = env.settings();
    settings.topics.topic_dlq = format!("{}.missing-dlq", env.name);
    settings.parked_max = 1;
    let projector = env.spawn_projector_with(settings.clone());
    let counters = projector.counters.clone();
    eventually(Duration::from_secs(90), "the batch is retried at the cap", || {
        let c = counters.clone();
        async move { c.redis_retries.load(Ordering::Relaxed) >= 2 }
    })
    .await;
    let mut r = env.redis().await;
    let held: u64 = redis::cmd("XLEN").arg(env.keys.parked_dead_letters()).query_async(&mut r).await.unwrap();
    assert_eq!(held, 1, "the cap holds");
    assert!(env.lag().await.total() > 0, "the batch with the unparked dead letter is not stored");
    projector.stop().await.unwrap();

    // The operator raises the cap: the held-back dead letter is parked, none is lost.
    settings.parked_max = 100;
    let projector = env.spawn_projector_with(settings);
    env.wait_caught_up(Duration::from_secs(90)).await;
    projector.stop().await.unwrap();
    let parked = board_ops::dlq::read_parked(&mut r, &env.keys.parked_dead_letters()).await.unwrap();
    let offsets: std::collections::BTreeSet<(i32, i64)> = parked.iter().map(|d| (d.origin_partition, d.origin_offset)).collect();
    assert_eq!(offsets.len(), 2, "both poison events parked: {parked:?}");
}

/// `verify` compares every structure the projection keeps: damage to any one of them is found
/// and named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_damage_in_every_structure() {
    let env = TestEnv::new("verify-all").await;
    let seeded = env.seed_and_project(small_seed(1, 60, 17)).await;
    let org = seeded.org_ids[0].clone();
    let report = env.verify(std::slice::from_ref(&org)).await;
    assert!(report.is_clean(), "drift: {:#?}", report.samples);
    for (what, n) in [
        ("cards", report.cards),
        ("index keys", report.index_keys),
        ("contact states", report.contact_states),
        ("messages", report.messages),
        ("conversations", report.conversations),
        ("versions", report.versions),
        ("users", report.users),
        ("teams", report.teams),
    ] {
        assert!(n > 0, "{what} compared: {}", report.summary());
    }

    let db = env.mongo().await;
    let snap = board_mongo::load_org(&db, &org).await.unwrap();
    let keys = env.keys.org(&org);
    let mut r = env.redis().await;
    let conv = snap.conversations.iter().find(|c| c.contact_id.is_some() && c.assignees.as_ref().is_some_and(|a| !a.is_empty())).unwrap();
    let cid = conv.contact_id.clone().unwrap();
    let card = snap.contacts.iter().find(|c| c.pipeline_stage.is_some()).unwrap();
    let user = &snap.users[0];
    let pipeline = &snap.pipelines[0];
    let record = CardRecord::decode(&r.hget::<_, _, Vec<u8>>(keys.cards(CardKind::Contact), &card.id).await.unwrap()).unwrap();
    let mut wrong_derived = record.clone();
    wrong_derived.derived.assignees.push("65a0000000000000000000ff".into());
    let mut older = record.clone();
    older.version -= 1;
    let mut state = ContactState::decode(&r.hget::<_, _, Vec<u8>>(keys.contact_states(), &cid).await.unwrap()).unwrap();
    state.message_times.push(1);
    let stage_key =
        keys.stage(CardKind::Contact, &format!("{}|s:{}", card.pipeline_id.clone().unwrap(), card.pipeline_stage.clone().unwrap()));
    let hset = |key: &str, field: &str, value: Vec<u8>| redis::cmd("HSET").arg(key).arg(field).arg(value).clone();
    let damages: Vec<(String, redis::Cmd, &str)> = vec![
        (keys.cards(CardKind::Contact), hset(&keys.cards(CardKind::Contact), &card.id, wrong_derived.encode()), "derived fields"),
        (keys.cards(CardKind::Contact), hset(&keys.cards(CardKind::Contact), &card.id, older.encode()), "version of"),
        (keys.cards(CardKind::Contact), hset(&keys.cards(CardKind::Contact), &card.id, b"junk".to_vec()), "does not decode"),
        (keys.contact_states(), hset(&keys.contact_states(), &cid, state.encode()), "contact state"),
        (keys.conversations(), hset(&keys.conversations(), &conv.id, b"junk".to_vec()), "conversation"),
        (stage_key.clone(), redis::cmd("ZREM").arg(&stage_key).arg(&card.id).clone(), "index"),
        (stage_key.clone(), redis::cmd("ZADD").arg(&stage_key).arg(1).arg("65a0000000000000000000fd").clone(), "index"),
        (keys.versions(), redis::cmd("HSET").arg(keys.versions()).arg(format!("p:{}", pipeline.id)).arg("999").clone(), "version of"),
        (keys.users(), hset(&keys.users(), &user.id, br#"["65a0000000000000000000fe"]"#.to_vec()), "user "),
    ];
    for (key, damage, named) in damages {
        let saved: Vec<u8> = redis::cmd("DUMP").arg(&key).query_async(&mut r).await.unwrap();
        let _: redis::Value = damage.query_async(&mut r).await.unwrap();
        let report = env.verify(std::slice::from_ref(&org)).await;
        assert!(!report.is_clean(), "damage to {key} ({named}) not found");
        assert!(report.samples.iter().any(|s| s.contains(named)), "damage to {key} reported as {:#?}", report.samples);
        let _: () = redis::cmd("RESTORE").arg(&key).arg(0).arg(saved).arg("REPLACE").query_async(&mut r).await.unwrap();
    }
    assert!(env.verify(std::slice::from_ref(&org)).await.is_clean(), "restored");
}

/// Two legacy cards whose status and source differ only in where a `:` falls: each is found by
/// its own source in its own stage, never by the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_with_separators_stay_apart_on_the_board() {
    let env = TestEnv::new("separators").await;
    let t = env.topics.clone();
    let (org, p, s1, s2) = (oid(1), oid(2), oid(3), oid(4));
    let pipeline = json!({"_id": p, "orgId": org, "name": "Sales", "type": "Contact", "isActive": true,
        "stages": [{"_id": s1, "name": "Won:x", "order": 0}, {"_id": s2, "name": "Won", "order": 1}], "version": 1});
    env.produce(&t.topic_pipelines, &p, &event("pipeline.upserted", &org, "pipeline", pipeline)).await;
    let legacy = |id: &str, status: &str, source: &str, owner: &str| {
        json!({"_id": id, "orgId": org, "firstName": "Sep", "status": status, "source": source, "owner": owner,
            "createdAt": "2026-10-01T12:00:00.000Z", "version": 1})
    };
    let (a, b) = (oid(10), oid(11));
    env.produce(&t.topic_contacts, &a, &event("contact.upserted", &org, "contact", legacy(&a, "Won:x", "y", "u:v"))).await;
    env.produce(&t.topic_contacts, &b, &event("contact.upserted", &org, "contact", legacy(&b, "Won", "x:y", "x:u:v"))).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(60)).await;
    projector.stop().await.unwrap();

    let reader = board_api::query::projection::ProjectionReader::new(env.redis().await, env.keys.clone(), Duration::from_secs(10));
    let ask = |body: Value| {
        let reader = reader.clone();
        let org = org.clone();
        async move {
            let q = board_api::query::request::ContactsRequest::parse(body.to_string().as_bytes()).unwrap().into_query().unwrap();
            let (answer, _) = reader.answer(&org, &oid(99), &q, 0).await.unwrap();
            answer
                .buckets
                .iter()
                .map(|b| (b.name.clone(), b.cards.iter().map(|c| c.doc.id.clone()).collect::<Vec<_>>()))
                .collect::<Vec<_>>()
        }
    };
    let won = |x: Vec<&str>, plain: Vec<&str>| {
        vec![
            ("Won:x".to_string(), x.into_iter().map(String::from).collect::<Vec<_>>()),
            ("Won".to_string(), plain.into_iter().map(String::from).collect()),
        ]
    };
    assert_eq!(ask(json!({})).await, won(vec![&a], vec![&b]));
    assert_eq!(ask(json!({"source": "y"})).await, won(vec![&a], vec![]));
    assert_eq!(ask(json!({"source": "x:y"})).await, won(vec![], vec![&b]));
}

/// A dead letter whose cause is fixed (here: an event over the projector's size limit, which
/// the operator raises) is listed with its reason and origin, replayed into its topic, applied;
/// a second replay does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_replayed_once_its_cause_is_fixed() {
    use board_ops::dlq::{read_parked, read_topic, replay, ReplayReport};
    let env = TestEnv::new("replay").await;
    let t = env.topics.clone();
    let (org, p, s, c, u) = (oid(1), oid(2), oid(3), oid(10), oid(20));
    let pipeline = one_stage_pipeline(&org, &p, &s);
    let card = event("contact.upserted", &org, "contact", contact(&org, &c, 1, &p, &s, &u, "Ann"));
    assert!(pipeline.len() < card.len(), "the limit below lets the pipeline through");
    env.produce(&t.topic_pipelines, &p, &pipeline).await;
    env.produce(&t.topic_contacts, &c, &card).await;
    let mut strict = env.settings();
    strict.max_event_bytes = card.len() - 1;
    let projector = env.spawn_projector_with(strict);
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert_eq!(projector.counters.dead_lettered.load(Ordering::Relaxed), 1);
    projector.stop().await.unwrap();
    let mut r = env.redis().await;
    let cards_key = env.keys.org(&org).cards(CardKind::Contact);
    assert!(!r.hexists::<_, _, bool>(&cards_key, &c).await.unwrap());
    let projector = env.spawn_projector();

    // The cause is fixed (the projector runs with the default limit again); the operator lists and replays.
    let kafka = env.kafka();
    let (k, dlq_topic) = (kafka.clone(), t.topic_dlq.clone());
    let letters = tokio::task::spawn_blocking(move || read_topic(&k, &dlq_topic)).await.unwrap().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].origin_topic.as_str(), letters[0].code.as_str()), (t.topic_contacts.as_str(), "too_large"));
    assert!(letters[0].reason.contains("larger than the limit"), "{}", letters[0].reason);
    assert!(read_parked(&mut r, &env.keys.parked_dead_letters()).await.unwrap().is_empty());
    let replayed_set = env.keys.replayed_dead_letters();
    let inputs = t.inputs();
    // A dead letter whose origin header names another topic (here: the dead-letter topic itself,
    // a loop) is never produced there, whatever the header says.
    let mut forged = letters[0].clone();
    (forged.id, forged.origin_topic) = ("dlq/forged".into(), t.topic_dlq.clone());
    let refused = replay(&kafka, &mut r, &replayed_set, &inputs, &[forged], false).await.unwrap();
    assert_eq!(refused, ReplayReport { not_an_input: 1, ..Default::default() });
    let first = replay(&kafka, &mut r, &replayed_set, &inputs, &letters, false).await.unwrap();
    assert_eq!(first, ReplayReport { replayed: 1, ..Default::default() });
    env.wait_caught_up(Duration::from_secs(60)).await;
    assert!(r.hexists::<_, _, bool>(&cards_key, &c).await.unwrap(), "applied once replayed");
    let second = replay(&kafka, &mut r, &replayed_set, &inputs, &letters, false).await.unwrap();
    assert_eq!(second, ReplayReport { already: 1, ..Default::default() }, "a second replay does nothing");
    projector.stop().await.unwrap();

    // The command prints the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline-board"))
        .args(["dlq", "list", "--origin", &t.topic_contacts])
        .env("KAFKA_BROKERS", &env.brokers)
        .env("REDIS_URL", &env.redis_url)
        .env("REDIS_PREFIX", env.keys.prefix())
        .env("TOPIC_DLQ", &t.topic_dlq)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 dead letters (1 in the topic, 0 parked in redis)"), "{stdout}");
    assert!(stdout.contains("larger than the limit"), "{stdout}");
}

/// The Function library with `line` run first in `commit` (a library deployed with a bug).
fn commit_starting_with(line: &str) -> String {
    let anchor = "local function commit(keys, args)\n";
    let patched = board_redis::functions::LIBRARY.replacen(anchor, &format!("{anchor}  {line}\n"), 1);
    assert_ne!(patched, board_redis::functions::LIBRARY, "commit is where the test expects it");
    patched
}

/// `pb_union_page` against the obvious answer (sort the whole union, skip, take) on random sets
/// with many ties, cards without createdAt, and random created ranges, offsets and limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn union_page_selects_the_same_cards_as_a_full_merge() {
    use board_redis::functions::load_library;
    use rand::{Rng, SeedableRng};
    let env = TestEnv::new("union-page").await;
    let mut r = env.redis().await;
    load_library(&mut r).await.unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let base = env.keys.org(&oid(1)).base;
    for round in 0..40 {
        let keys: Vec<String> = (0..rng.random_range(1..=4)).map(|k| format!("{base}:z:c:round{round}-{k}")).collect();
        let mut all: Vec<(f64, String)> = Vec::new();
        for key in &keys {
            for _ in 0..rng.random_range(0..300) {
                let id = format!("{:024x}", rng.random::<u64>() % 5000);
                // Few distinct scores: many ties; some cards without createdAt.
                let score =
                    if rng.random_bool(0.1) { f64::NEG_INFINITY } else { 1_700_000_000_000.0 + (rng.random_range(0..40) * 1000) as f64 };
                if all.iter().any(|(_, x)| x == &id) {
                    continue; // one card is in one raw stage set
                }
                let _: () =
                    redis::cmd("ZADD").arg(key).arg(board_redis::functions::score_arg(score)).arg(&id).query_async(&mut r).await.unwrap();
                all.push((score, id));
            }
        }
        let (min, max, lo, hi) = match rng.random_range(0..3) {
            0 => ("-inf".to_string(), "+inf".to_string(), f64::NEG_INFINITY, f64::INFINITY),
            1 => ("(-inf".to_string(), "1700000020000".to_string(), f64::MIN, 1_700_000_020_000.0),
            _ => ("1700000010000".to_string(), "+inf".to_string(), 1_700_000_010_000.0, f64::INFINITY),
        };
        let mut expected: Vec<(f64, String)> =
            all.iter().filter(|(s, _)| *s >= lo && *s <= hi && !(lo == f64::MIN && *s == f64::NEG_INFINITY)).cloned().collect();
        expected.sort_by(|x, y| y.0.total_cmp(&x.0).then_with(|| y.1.cmp(&x.1)));
        for _ in 0..5 {
            let offset = rng.random_range(0..=expected.len() + 5);
            let limit = rng.random_range(1..30);
            let want: Vec<String> = expected.iter().skip(offset).take(limit).map(|(_, id)| id.clone()).collect();
            let got: Vec<String> = redis::cmd("FCALL_RO")
                .arg("pb_union_page")
                .arg(keys.len())
                .arg(&keys)
                .arg(offset)
                .arg(limit)
                .arg(&min)
                .arg(&max)
                .query_async(&mut r)
                .await
                .unwrap();
            assert_eq!(got, want, "round {round}: offset {offset} limit {limit} range {min}..{max} over {} cards", expected.len());
        }
    }
}

/// The generation functions, called directly: a live commit is refused once its org moved; a
/// switch happens only if the new generation holds every partition's offset the current one
/// holds; org offsets are never lowered; progress is refused once the projection's instance
/// is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_functions_guard_commits_switches_and_progress() {
    use board_model::keys::Generation;
    use board_redis::functions::{load_library, progress_cmd, switch_cmd, Commit, CommitOutcome, SwitchOutcome, Write};
    let env = TestEnv::new("generation-fn").await;
    let mut r = env.redis().await;
    load_library(&mut r).await.unwrap();
    let shared = r.clone();
    let org = oid(1);
    let (base, g7) = (Generation::base(), Generation::parse("g7").unwrap());
    let commit = |generation: &Generation, offsets: Vec<(String, i64)>| Commit {
        org: env.keys.org_in(generation, &org),
        guards: Vec::new(),
        writes: vec![Write::HSet { key: env.keys.org_in(generation, &org).pipelines(), field: "p".into(), value: b"{}".to_vec() }],
        generation: Some((env.keys.generation_pointer(&org), generation.clone())),
        offsets,
        min_writes: None,
    };
    let reply = |c: Commit| {
        let mut r = shared.clone();
        async move { CommitOutcome::parse(&c.to_cmd().query_async::<String>(&mut r).await.unwrap()).unwrap() }
    };
    let t = |p: i32, o: i64| (format!("t/{p}"), o);
    assert_eq!(reply(commit(&base, vec![t(0, 10), t(1, 5)])).await, CommitOutcome::Committed);
    assert_eq!(reply(commit(&base, vec![t(0, 3)])).await, CommitOutcome::Committed);
    let offsets: std::collections::BTreeMap<String, i64> = r.hgetall(env.keys.org(&org).offsets()).await.unwrap();
    assert_eq!(offsets, [t(0, 10), t(1, 5)].into_iter().collect(), "offsets are never lowered");

    // g7 (written without the pointer, as a rebuild writes) lacks partition 1 at 5: behind.
    let build = Commit { generation: None, ..commit(&g7, vec![t(0, 12), t(1, 4)]) };
    assert_eq!(reply(build).await, CommitOutcome::Committed);
    let switch = |from: &Generation, to: &Generation| {
        let (mut r, cmd) = (shared.clone(), switch_cmd(&env.keys, &org, from, to));
        async move { SwitchOutcome::parse(&cmd.query_async::<String>(&mut r).await.unwrap()).unwrap() }
    };
    assert_eq!(switch(&base, &g7).await, SwitchOutcome::Behind("t/1".into()));
    assert_eq!(switch(&g7, &base).await, SwitchOutcome::Moved(base.clone()), "the pointer is not what the caller expected");
    assert_eq!(reply(Commit { generation: None, ..commit(&g7, vec![t(1, 5)]) }).await, CommitOutcome::Committed);
    assert_eq!(switch(&base, &g7).await, SwitchOutcome::Switched);
    assert_eq!(r.get::<_, String>(env.keys.generation_pointer(&org)).await.unwrap(), "g7");
    // A live commit computed for the base generation is refused and names where the org is.
    assert_eq!(reply(commit(&base, vec![t(0, 20)])).await, CommitOutcome::Moved(g7.clone()));
    assert_eq!(reply(commit(&g7, vec![t(0, 20)])).await, CommitOutcome::Committed);
    // A committer that saw a larger write counter than the org's keys hold: they went back in
    // time; nothing is written (the offsets stay).
    let held: i64 = shared.clone().get(env.keys.org_in(&g7, &org).writes()).await.unwrap();
    assert_eq!(reply(Commit { min_writes: Some(held + 5), ..commit(&g7, vec![t(0, 99)]) }).await, CommitOutcome::Rewound(held));
    let kept: Option<i64> = shared.clone().hget(env.keys.org_in(&g7, &org).offsets(), t(0, 0).0).await.unwrap();
    assert_eq!(kept, Some(20), "a refused commit writes nothing");
    assert_eq!(reply(Commit { min_writes: Some(held), ..commit(&g7, vec![t(0, 20)]) }).await, CommitOutcome::Committed);
    // Back to the base (pointer removed) when it holds as much.
    assert_eq!(reply(Commit { generation: None, ..commit(&base, vec![t(0, 20)]) }).await, CommitOutcome::Committed);
    assert_eq!(switch(&g7, &base).await, SwitchOutcome::Switched);
    assert!(!r.exists::<_, bool>(env.keys.generation_pointer(&org)).await.unwrap());

    // Progress is recorded only for the instance the state names.
    let progress_key = env.keys.progress("g");
    let _: () = r.hset(env.keys.state(), "instance", "i1").await.unwrap();
    let record = |instance: &str| {
        let (mut r, cmd) = (shared.clone(), progress_cmd(&env.keys, &progress_key, instance, &[t(0, 42)]));
        async move { cmd.query_async::<String>(&mut r).await.unwrap() }
    };
    assert_eq!(record("i1").await, "ok");
    assert_eq!(record("other").await, "lost");
    let _: () = r.del(env.keys.state()).await.unwrap();
    assert_eq!(record("i1").await, "lost");
    assert_eq!(r.hget::<_, _, i64>(&progress_key, "t/0").await.unwrap(), 42);
}

/// The pipeline takes any `Source`: a source of the test's own drains into the projection, each
/// batch retried as a whole, and its `applied` hook runs only once the batch's data is in Redis
/// (what lets the topic replay record its checkpoint there, after the data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_source_drains_through_the_pipeline_and_records_after_the_data() {
    use board_model::events::Event;
    use projector::apply::RedisApplier;
    use projector::batch::Outcome;
    use projector::pipeline::{drain, Drained, Origin, Sink, Source, SourceBatch};
    use projector::RunCounters;

    struct Contacts {
        left: std::collections::VecDeque<Event>,
        conn: board_redis::redis_conn::RedisConn,
        cards_key: String,
        /// Per applied batch: its size, and whether every one of its cards was in Redis then.
        seen: Vec<(usize, bool)>,
    }
    impl Source for Contacts {
        async fn next_batch(&mut self, max: usize) -> anyhow::Result<Option<SourceBatch>> {
            let mut batch = SourceBatch::default();
            while batch.events.len() < max {
                let Some(e) = self.left.pop_front() else { break };
                let offset = 100 - self.left.len() as i64;
                batch.push(e, Some(Origin { topic: "own".into(), partition: 0, offset }));
            }
            batch.read = batch.events.len() as u64;
            Ok((!batch.events.is_empty()).then_some(batch))
        }
        async fn applied(&mut self, batch: &SourceBatch, outcomes: &[Outcome]) -> anyhow::Result<()> {
            assert_eq!(outcomes.len(), batch.events.len(), "one outcome per event");
            let mut all_there = true;
            for e in &batch.events {
                let Event::CardUpserted(_, card) = e else { unreachable!() };
                all_there &= self.conn.hexists::<_, _, bool>(&self.cards_key, &card.id).await?;
            }
            self.seen.push((batch.events.len(), all_there));
            Ok(())
        }
    }

    let env = TestEnv::new("pipeline-source").await;
    let mut applier = RedisApplier::connect(&env.redis_url, env.keys.clone()).await.unwrap();
    let (org, p, s, u) = (oid(1), oid(2), oid(3), oid(20));
    let cards: Vec<Event> = (0..25)
        .map(|i| {
            let doc = serde_json::from_value(contact(&org, &oid(100 + i), 1, &p, &s, &u, &format!("c{i}"))).unwrap();
            Event::CardUpserted(CardKind::Contact, Box::new(doc))
        })
        .collect();
    let mut source = Contacts {
        left: cards.iter().cloned().chain(cards.iter().take(5).cloned()).collect(),
        conn: env.redis().await,
        cards_key: env.keys.org(&org).cards(CardKind::Contact),
        seen: Vec::new(),
    };
    let counters = RunCounters::default();
    let drained = drain(&mut source, &mut Sink::new(&mut applier, &counters, 10), std::future::pending()).await.unwrap();
    assert_eq!(drained, Drained { read: 30, applied: 25, stale: 5, cancelled: false }, "the 5 repeated cards are stale the second time");
    assert_eq!((counters.get(&counters.applied), counters.get(&counters.stale), counters.get(&counters.batches)), (25, 5, 3));
    assert_eq!(source.seen, [(10, true), (10, true), (10, true)], "every batch's data was in Redis before its hook ran");

    // A source stopped from outside: the cancellation is heard before each batch.
    let mut more =
        Contacts { left: cards.into_iter().collect(), conn: env.redis().await, cards_key: source.cards_key.clone(), seen: vec![] };
    let stopped = drain(&mut more, &mut Sink::new(&mut applier, &counters, 10), std::future::ready(())).await.unwrap();
    assert_eq!(stopped, Drained { cancelled: true, ..Drained::default() });
    assert!(more.seen.is_empty(), "nothing applied once told to stop");
}
