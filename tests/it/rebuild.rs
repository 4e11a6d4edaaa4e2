//! Replaying projections (issue 9), against the real Kafka, Redis and FerretDB: `rebuild` while
//! the board is queried, a rebuild killed and rerun, `--from`, the MongoDB snapshot source over
//! topics that lost their early history, and a FLUSHALL under a running projector and API.
use crate::common::events::{contact, event, oid, one_stage_pipeline};
use crate::common::{env_with_own_redis, eventually, post_board, small_seed, token, BoardPollers, TestEnv};
use board_api::query::mongo_path::MongoReader;
use board_api::query::projection::ProjectionReader;
use board_api::query::request::ContactsRequest;
use board_model::keys::Generation;
use board_model::model::CardKind;
use redis::AsyncCommands;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Boards of both answer paths of the projection.
const BOARDS: [&str; 3] = [r#"{}"#, r#"{"ownerFilter": "my", "size": 5}"#, r#"{"search": "a", "size": 7}"#];

async fn generation_of(env: &TestEnv, org: &str) -> Generation {
    let name: Option<String> = env.redis().await.get(env.keys.generation_pointer(org)).await.unwrap();
    Generation::parse(name.as_deref().unwrap_or_default()).unwrap()
}

/// Every key under the prefix, sorted.
async fn all_keys(env: &TestEnv) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg(env.keys.pattern()).query_async(&mut env.redis().await).await.unwrap();
    keys.sort();
    keys
}

/// The projection's answers equal MongoDB's for every board of `org`.
async fn assert_projection_equals_mongodb(env: &TestEnv, org: &str, user: &str) {
    let reader = ProjectionReader::new(env.redis().await, env.keys.clone(), Duration::from_secs(10));
    let mongo = MongoReader::new(env.mongo().await, board_api::query::mongo_path::DEFAULT_MAX_IDS);
    let now = chrono::Utc::now().timestamp_millis();
    for body in BOARDS {
        let q = ContactsRequest::parse(body.as_bytes()).unwrap().into_query().unwrap();
        let (a, _) = reader.answer(org, user, &q, now).await.unwrap_or_else(|e| panic!("projection {body}: {e}"));
        let b = mongo.answer(org, user, &q, now).await.unwrap_or_else(|e| panic!("mongodb {body}: {e:?}"));
        assert!(a == b, "org {org}, board {body}: the projection differs from MongoDB");
    }
}

fn run(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd.output().expect("command runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_while_the_board_is_queried_switches_without_a_bad_answer() {
    let env = TestEnv::new("rebuild-live").await;
    let seeded = env.seed(small_seed(2, 150, 91)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let url = env.serve_with(env.serve_args()).await;
    let db = env.mongo().await;
    let mut boards = Vec::new();
    for org in &seeded.org_ids {
        let user = board_mongo::load_org(&db, org).await.unwrap().users[0].id.clone();
        for body in BOARDS {
            let (status, answer) = post_board(&url, Some(&token(org, &user)), body).await;
            assert_eq!((status, answer["meta"]["answeredBy"].as_str()), (200, Some("projection")), "{answer}");
            boards.push((org.clone(), user.clone(), body, answer["data"].clone()));
        }
    }
    assert!(boards.iter().any(|b| b.3.as_object().is_some_and(|d| d.values().any(|v| v["total"].as_u64() > Some(0)))));

    // A client queries in a loop through the whole rebuild: every answer must be the one from
    // before (nothing changes meanwhile), from the projection, never failed, empty or mixed.
    let stop = Arc::new(AtomicBool::new(false));
    let (count, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::<String>::new())));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let client = {
        let (stop, count, bad, slowest, url, boards) =
            (stop.clone(), count.clone(), bad.clone(), slowest.clone(), url.clone(), boards.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (org, user, body, want) in &boards {
                    let t = Instant::now();
                    let (status, answer) = post_board(&url, Some(&token(org, user)), body).await;
                    let took = t.elapsed();
                    let mut s = slowest.lock().unwrap();
                    *s = (*s).max(took);
                    count.fetch_add(1, Ordering::Relaxed);
                    if status != 200 || answer["meta"]["answeredBy"] != "projection" || answer["data"] != *want {
                        bad.lock().unwrap().push(format!("{status} {body}: {}", answer["meta"]));
                    }
                }
            }
        })
    };
    let before = count.load(Ordering::Relaxed);
    let mut cmd = env.cli(&["rebuild", "--grace-ms", "1500", "--metrics-addr", ""]);
    let (ok, out) = tokio::task::spawn_blocking(move || run(&mut cmd)).await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("rebuilt generation g") && out.contains("2 orgs switched"), "{out}");
    // Reads keep going after the old generation is removed.
    let after = count.load(Ordering::Relaxed);
    eventually(Duration::from_secs(20), "queries after the rebuild", || {
        let c = count.clone();
        async move { c.load(Ordering::Relaxed) > after + 10 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    let bad = bad.lock().unwrap().clone();
    assert!(bad.is_empty(), "{} bad answers of {}: {:?}", bad.len(), count.load(Ordering::Relaxed), &bad[..bad.len().min(5)]);
    // How many depends on the machine's load, not on the product: at least one.
    assert!(after > before, "the client queried during the rebuild ({} queries)", after - before);
    eprintln!("rebuild under load: {} queries, slowest {:?}", count.load(Ordering::Relaxed), slowest.lock().unwrap());

    // Every org moved to one new generation; the base generation's keys are gone.
    let generation = generation_of(&env, &seeded.org_ids[0]).await;
    assert!(!generation.is_base());
    for org in &seeded.org_ids {
        assert_eq!(generation_of(&env, org).await, generation);
        assert_projection_equals_mongodb(&env, org, &boards.iter().find(|b| &b.0 == org).unwrap().1).await;
    }
    let stray: Vec<String> = all_keys(&env)
        .await
        .into_iter()
        .filter(|k| !k.starts_with(&format!("{}:{}:", env.keys.prefix(), generation.name())) && !k.contains(":{meta}:"))
        .filter(|k| !k.ends_with(":generation") && !k.contains(":ends:") && !k.ends_with(":model"))
        .collect();
    assert!(stray.is_empty(), "keys of the old generation remain: {:?}", &stray[..stray.len().min(5)]);

    // The live projector writes into the new generation: a change made after the switch shows.
    let org = &seeded.org_ids[0];
    let mut contact = board_mongo::load_org(&db, org).await.unwrap().contacts[0].clone();
    contact.first_name = Some("Zebulon".into());
    contact.version = Some(contact.version.unwrap() + 1);
    db.collection::<bson::Document>("contacts")
        .replace_one(bson::doc! {"_id": &contact.id}, board_mongo::card_to_bson(&contact))
        .await
        .unwrap();
    let event = json!({"type": "contact.upserted", "eventId": "after-switch", "orgId": org,
        "occurredAt": "2026-12-01T00:00:00.000Z", "contact": contact});
    env.produce(&env.topics.topic_contacts, &contact.id, &serde_json::to_vec(&event).unwrap()).await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    let report = env.verify(&seeded.org_ids).await;
    assert!(report.is_clean(), "{}", report.summary());
    let user = &boards.iter().find(|b| &b.0 == org).unwrap().1;
    let (_, found) = post_board(&url, Some(&token(org, user)), r#"{"search": "zebulon"}"#).await;
    assert_eq!(found["meta"]["answeredBy"], "projection");
    assert!(found.to_string().contains("Zebulon"), "{found}");
    projector.stop().await.unwrap();
}

/// How many commits the org's keys in the base generation took.
async fn commits_of(env: &TestEnv, org: &str) -> Option<u64> {
    env.redis().await.get(env.keys.org(org).writes()).await.unwrap()
}

/// `rebuild --org` moves that org alone (issue 19): while it runs, the other orgs' boards keep
/// answering 304 to the ETags they had before (their generation, pipelines and change stream
/// untouched), and none of their keys is written in the new generation; the rebuilt org's boards
/// answer as before from its new generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilding_one_org_leaves_the_other_orgs_untouched() {
    let env = TestEnv::new("rebuild-org").await;
    let seeded = env.seed(small_seed(3, 150, 97)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let url = env.serve_with(env.serve_args()).await;
    let db = env.mongo().await;
    let (target, others) = (seeded.org_ids[0].clone(), seeded.org_ids[1..].to_vec());
    let mut polls = Vec::new();
    for org in &seeded.org_ids {
        let user = board_mongo::load_org(&db, org).await.unwrap().users[0].id.clone();
        for body in BOARDS {
            let bearer = token(org, &user);
            let (status, etag, answer) = crate::common::post_with_etag(&url, &bearer, body, None).await;
            assert_eq!(status, 200, "{answer}");
            polls.push((org.clone(), bearer, body, etag.expect("a projection board has an ETag"), answer));
        }
    }
    let mut others_writes = Vec::new();
    for org in &others {
        others_writes.push(commits_of(&env, org).await);
    }

    // The other orgs' boards are polled with their ETags through the whole rebuild.
    let stop = Arc::new(AtomicBool::new(false));
    let (count, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::<String>::new())));
    let client = {
        let (stop, count, bad, url) = (stop.clone(), count.clone(), bad.clone(), url.clone());
        let polls: Vec<_> = polls.iter().filter(|p| p.0 != target).cloned().collect();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (org, bearer, body, etag, _) in &polls {
                    let (status, _, answer) = crate::common::post_with_etag(&url, bearer, body, Some(etag)).await;
                    count.fetch_add(1, Ordering::Relaxed);
                    if status != 304 {
                        bad.lock().unwrap().push(format!("{org} {body}: {status} {}", answer.chars().take(200).collect::<String>()));
                    }
                }
            }
        })
    };
    let before = count.load(Ordering::Relaxed);
    let mut cmd = env.cli(&["rebuild", "--org", &target, "--grace-ms", "500", "--metrics-addr", ""]);
    let (ok, out) = tokio::task::spawn_blocking(move || run(&mut cmd)).await.unwrap();
    assert!(ok && out.contains("1 orgs switched"), "{out}");
    let during = count.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    let bad = bad.lock().unwrap().clone();
    assert!(bad.is_empty(), "{} of the other orgs' polls were not 304: {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert!(during > 0, "the other orgs were polled during the rebuild");

    // Only the target moved; nothing of the others was written or made in the new generation.
    let generation = generation_of(&env, &target).await;
    assert!(!generation.is_base());
    let mut writes_after = Vec::new();
    for org in &others {
        assert!(generation_of(&env, org).await.is_base(), "{org} moved");
        writes_after.push(commits_of(&env, org).await);
        let moved = env.redis().await.keys::<_, Vec<String>>(env.keys.org_in(&generation, org).pattern()).await.unwrap();
        assert!(moved.is_empty(), "{org} has keys in {generation}: {:?}", &moved[..moved.len().min(3)]);
    }
    assert_eq!(writes_after, others_writes, "the other orgs' keys took no commit");
    // The target's old generation is gone, its index image with it (the API stored one: every
    // org's, in the tests); only the pointer stays.
    let left: Vec<String> = env.redis().await.keys::<_, Vec<String>>(env.keys.org(&target).pattern()).await.unwrap();
    let left: Vec<&String> = left.iter().filter(|k| **k != env.keys.generation_pointer(&target)).collect();
    assert!(left.is_empty(), "keys of the generation {target} left: {left:?}");
    for (org, bearer, body, _, answer) in polls.iter().filter(|p| p.0 == target) {
        let (status, _, now) = crate::common::post_with_etag(&url, bearer, body, None).await;
        let data = |a: &str| serde_json::from_str::<Value>(a).unwrap()["data"].clone();
        assert_eq!((status, data(&now)), (200, data(answer)), "{org} {body}: the rebuilt org answers as before");
    }
    projector.stop().await.unwrap();
}

/// No stale 304 after a switch: clients poll index and sorted-set boards with `If-None-Match`
/// while rounds of "MongoDB drifts from the projection, `rebuild --source mongodb` repairs it"
/// switch the org again and again (each switch loads the org's index anew, and until it is
/// loaded the boards come from the index of the generation the org left). Once quiet, every
/// client's last board — the last 200 it got, kept through its 304s — equals MongoDB's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polls_racing_switches_never_keep_a_stale_board() {
    let env = TestEnv::new("switch-etags").await;
    let seeded = env.seed(small_seed(1, 150, 95)).await;
    let org = seeded.org_ids[0].clone();
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let url = env.serve_with(env.serve_args()).await;
    let db = env.mongo().await;
    let snap = board_mongo::load_org(&db, &org).await.unwrap();
    let (user, t) = (snap.users[0].id.clone(), token(&org, &snap.users[0].id));
    let bodies = [r#"{"search": "a", "size": 100}"#, r#"{"search": "e", "size": 7}"#, r#"{"size": 100}"#];

    let pollers = BoardPollers::start(&url, &t, &bodies);

    let contacts = db.collection::<bson::Document>("contacts");
    for round in 0..4 {
        // MongoDB changes without an event (the projection drifts): a name every board shows.
        for c in snap.contacts.iter().take(30) {
            let name = format!("Drift{round}ae{}", &c.id[18..]);
            contacts.update_one(bson::doc! {"_id": &c.id}, bson::doc! {"$set": {"firstName": &name}}).await.unwrap();
        }
        let mut cmd = env.cli(&["rebuild", "--source", "mongodb", "--grace-ms", "0", "--metrics-addr", ""]);
        let (ok, out) = tokio::task::spawn_blocking(move || run(&mut cmd)).await.unwrap();
        assert!(ok && out.contains("1 orgs switched"), "round {round}: {out}");
    }
    for last in pollers.last_boards().await {
        assert!(last.polls > 3, "the client polled through the switches");
        let want = crate::common::mongodb_answer(&db, &org, &user, last.body).await;
        assert!(last.data == want, "{}: the client's last board (status {}) differs from MongoDB's answer", last.body, last.status);
    }
    projector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_with_sigkill_is_refused_twice_then_resumed() {
    let env = TestEnv::new("rebuild-kill").await;
    let seeded = env.seed(small_seed(1, 250, 92)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;

    // Killed while it waits to remove the old generation (a point it always reaches).
    let mut child = env
        .cli(&["rebuild", "--grace-ms", "60000", "--metrics-addr", ""])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state_key = env.keys.rebuild_state();
    let mut conn = env.redis().await;
    eventually(Duration::from_secs(60), "the rebuild reaches its cleanup phase", || {
        let (mut conn, key) = (conn.clone(), state_key.clone());
        async move { conn.hget::<_, _, Option<String>>(&key, "phase").await.unwrap().as_deref() == Some("cleanup") }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let generation = generation_of(&env, &seeded.org_ids[0]).await;
    assert!(!generation.is_base(), "switched before the kill");

    // Its lease still holds: a second rebuild is refused and names the first.
    let (ok, out) = run(&mut env.cli(&["rebuild", "--metrics-addr", ""]));
    assert!(!ok && out.contains("another rebuild is running") && out.contains(generation.name()), "{out}");
    let (ok, out) = run(&mut env.cli(&["rebuild", "--dry-run", "--metrics-addr", ""]));
    assert!(!ok && out.contains("another rebuild is running"), "{out}");

    eventually(Duration::from_secs(30), "the killed rebuild's lease ends", || {
        let (mut conn, key) = (conn.clone(), env.keys.rebuild_lease());
        async move { !conn.exists::<_, bool>(&key).await.unwrap() }
    })
    .await;
    let (ok, out) = run(&mut env.cli(&["rebuild", "--dry-run", "--metrics-addr", ""]));
    assert!(ok && out.contains(&format!("would resume generation {}", generation.name())), "{out}");
    let (ok, out) = run(&mut env.cli(&["rebuild", "--grace-ms", "0", "--metrics-addr", ""]));
    assert!(ok && out.contains("(resumed)"), "{out}");
    assert!(!conn.exists::<_, bool>(&state_key).await.unwrap(), "the finished rebuild leaves no state");
    let base = env.keys.org(&seeded.org_ids[0]).base;
    let left: Vec<String> =
        all_keys(&env).await.into_iter().filter(|k| k.starts_with(&format!("{base}:")) && !k.ends_with(":generation")).collect();
    assert!(left.is_empty(), "old generation removed: {left:?}");

    // Killed in the middle of its replay: the next run resumes it and the result is whole.
    let mut child = env
        .cli(&["rebuild", "--max-batch", "20", "--metrics-addr", ""])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        let phase: Option<String> = conn.hget(&state_key, "phase").await.unwrap();
        if phase.as_deref() == Some("replay") || t.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    conn.del::<_, ()>(env.keys.rebuild_lease()).await.unwrap(); // as if its 15 s had passed
    let (ok, out) = run(&mut env.cli(&["rebuild", "--grace-ms", "0", "--metrics-addr", ""]));
    assert!(ok, "{out}");
    let latest = generation_of(&env, &seeded.org_ids[0]).await;
    assert_ne!(latest, generation);
    let report = env.verify(&seeded.org_ids).await;
    assert!(report.is_clean(), "{}", report.summary());
    let prefix = env.keys.prefix().to_string();
    let others: Vec<String> = all_keys(&env)
        .await
        .into_iter()
        .filter(|k| k.strip_prefix(&format!("{prefix}:g")).is_some() && !k.starts_with(&format!("{prefix}:{}:", latest.name())))
        .collect();
    assert!(others.is_empty(), "keys of abandoned generations remain: {:?}", &others[..others.len().min(5)]);
    projector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_replays_the_topics_from_a_time() {
    let env = TestEnv::new("rebuild-from").await;
    let early = env.seed(small_seed(1, 60, 93)).await;
    // A third org has events on both sides of the time, in the same partitions (every event keyed
    // by the org): two contacts before it, then its pipeline again and one contact's rename.
    let t = env.topics.clone();
    let (mixed, p, s, u, kept, renamed) = (oid(1), oid(2), oid(3), oid(4), oid(10), oid(11));
    env.produce(&t.topic_pipelines, &mixed, &one_stage_pipeline(&mixed, &p, &s)).await;
    for c in [&kept, &renamed] {
        env.produce(&t.topic_contacts, &mixed, &event("contact.upserted", &mixed, "contact", contact(&mixed, c, 1, &p, &s, &u, "Ann")))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let from = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let late = env.seed(small_seed(1, 60, 94)).await;
    env.produce(&t.topic_pipelines, &mixed, &one_stage_pipeline(&mixed, &p, &s)).await;
    let rename = event("contact.upserted", &mixed, "contact", contact(&mixed, &renamed, 2, &p, &s, &u, "Bea"));
    env.produce(&t.topic_contacts, &mixed, &rename).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let from = from.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);

    let (ok, out) = run(&mut env.cli(&["rebuild", "--dry-run", "--from", &from, "--metrics-addr", ""]));
    assert!(ok, "{out}");
    let total: i64 = out.lines().find_map(|l| l.strip_suffix(" events to replay")?.parse().ok()).unwrap();
    assert!(total > 0 && total < late.events as i64 + 3, "{total} events from {from}: only the late org's {} and 2", late.events);

    let (ok, out) = run(&mut env.cli(&["rebuild", "--from", &from, "--org", &late.org_ids[0], "--grace-ms", "0", "--metrics-addr", ""]));
    assert!(ok && out.contains("1 orgs switched"), "{out}");
    assert!(!generation_of(&env, &late.org_ids[0]).await.is_base());
    assert!(generation_of(&env, &early.org_ids[0]).await.is_base(), "the other org is not touched");
    // The early org's events all precede the time: a generation from the time would miss them,
    // so it is not switched, and the run says so at once (exit 3) instead of replaying in vain.
    let (ok, out) = run(&mut env.cli(&["rebuild", "--from", &from, "--org", &early.org_ids[0], "--grace-ms", "0", "--metrics-addr", ""]));
    assert!(!ok && out.contains("1 orgs not switched") && out.contains(&early.org_ids[0]), "{out}");
    assert!(generation_of(&env, &early.org_ids[0]).await.is_base(), "the early org keeps its live generation");
    // The mixed org's partitions all have events after the time, so the switch's offset check
    // passes; but its generation from the time lacks the contact untouched since: switching it
    // would delete its only complete generation. Refused, its new keys removed, its board whole.
    let (ok, out) = run(&mut env.cli(&["rebuild", "--from", &from, "--org", &mixed, "--grace-ms", "0", "--metrics-addr", ""]));
    assert!(!ok && out.contains("1 orgs not switched") && out.contains(&format!("contact {kept}")), "{out}");
    assert!(generation_of(&env, &mixed).await.is_base(), "the mixed org keeps its live generation");
    let cards: Vec<String> = env.redis().await.hkeys(env.keys.org(&mixed).cards(CardKind::Contact)).await.unwrap();
    assert_eq!(cards.len(), 2, "both contacts stay on the board: {cards:?}");
    let generations = format!("{}:g", env.keys.prefix());
    let leftovers: Vec<String> = all_keys(&env).await.into_iter().filter(|k| k.starts_with(&generations) && k.contains(&mixed)).collect();
    assert!(leftovers.is_empty(), "the refused generation's keys are removed: {leftovers:?}");
    let report = env.verify(&[late.org_ids[0].clone(), early.org_ids[0].clone()]).await;
    assert!(report.is_clean(), "{}", report.summary());
    projector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mongodb_snapshot_rebuilds_what_the_topics_no_longer_hold() {
    let env = TestEnv::new("rebuild-snapshot").await;
    let seeded = env.seed(small_seed(1, 120, 95)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;

    // Retention took the first half of every partition.
    env.delete_records_below(|high| if high > 1 { high / 2 } else { 0 }).await;

    // From the topics alone the rebuild would miss the deleted half: refused before anything is
    // switched or discarded, naming the way out; the live generation stays as it was.
    let org = &seeded.org_ids[0];
    let (ok, out) = run(&mut env.cli(&["rebuild", "--grace-ms", "0", "--metrics-addr", ""]));
    assert!(!ok && out.contains("no longer hold every record") && out.contains("--source mongodb"), "{out}");
    let (ok, out) = run(&mut env.cli(&["rebuild", "--dry-run", "--metrics-addr", ""]));
    assert!(ok && out.contains("would refuse"), "{out}");
    assert!(generation_of(&env, org).await.is_base(), "nothing switched");
    let report = env.verify(&seeded.org_ids).await;
    assert!(report.is_clean(), "the live generation is untouched: {}", report.summary());

    // Events after the snapshot's offsets apply on top of it.
    let (ok, out) = run(&mut env.cli(&["rebuild", "--source", "mongodb", "--grace-ms", "0", "--metrics-addr", ""]));
    assert!(ok && out.contains("1 orgs switched"), "{out}");
    let documents: u64 = out.split(" snapshot documents").next().and_then(|h| h.rsplit(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(documents > 120, "{out}");
    assert!(!generation_of(&env, org).await.is_base());
    let report = env.verify(&seeded.org_ids).await;
    assert!(report.is_clean(), "{}", report.summary());
    let user = board_mongo::load_org(&env.mongo().await, org).await.unwrap().users[0].id.clone();
    assert_projection_equals_mongodb(&env, org, &user).await;
    projector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_under_a_running_projector_and_api_falls_back_then_heals() {
    let (env, own, _dir) = env_with_own_redis("rebuild-flush").await;
    let seeded = env.seed(small_seed(1, 150, 96)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let url = env.serve_with(env.serve_args()).await;
    let org = &seeded.org_ids[0];
    let user = board_mongo::load_org(&env.mongo().await, org).await.unwrap().users[0].id.clone();
    let t = token(org, &user);
    let (_, healthy) = post_board(&url, Some(&t), "{}").await;
    assert_eq!(healthy["meta"]["answeredBy"], "projection");

    // Readiness is watched from before the flush until the end: its 503 while the projection
    // heals is a transient a board poll may miss on a loaded machine.
    let (healing_done, saw_not_ready) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let readiness_watch = {
        let (u, done, saw) = (url.clone(), healing_done.clone(), saw_not_ready.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Ok(r) = reqwest::get(format!("{u}/readyz")).await {
                    let code = r.status().as_u16();
                    if r.json::<Value>().await.is_ok_and(|v| v["status"] == "projection_not_ready") && code == 503 {
                        saw.store(true, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let flushed_at = Instant::now();
    redis::cmd("FLUSHALL").query_async::<()>(&mut env.redis().await).await.unwrap();
    // Never a partial answer: from MongoDB, saying why, until the projection is whole again.
    let seen_fallback = Arc::new(AtomicBool::new(false));
    let saw = seen_fallback.clone();
    let (u, tk, want) = (url.clone(), t.clone(), healthy["data"].clone());
    eventually(Duration::from_secs(120), "the projection answers again", move || {
        let (u, tk, want, saw) = (u.clone(), tk.clone(), want.clone(), saw.clone());
        async move {
            let (status, body) = post_board(&u, Some(&tk), "{}").await;
            // The MongoDB path's speed on a loaded machine is no part of this test: its
            // documented 503 `timeout` is allowed, a partial or failed answer is not.
            if status == 503 && body["error"]["code"] == "timeout" {
                saw.store(true, Ordering::Relaxed);
                return false;
            }
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["data"], want, "never a partial answer: {}", body["meta"]);
            match body["meta"]["answeredBy"].as_str() {
                Some("mongodb") => {
                    let reason = body["meta"]["reason"].as_str().unwrap_or_default().to_string();
                    // `projection_not_built`: the flush landed between the request's state check and its reads.
                    assert!(["projection_missing", "projection_rebuilding", "projection_not_built"].contains(&reason.as_str()), "{reason}");
                    saw.store(true, Ordering::Relaxed);
                    false
                }
                _ => true,
            }
        }
    })
    .await;
    let healed = flushed_at.elapsed();
    eprintln!("FLUSHALL to a whole projection answering again: {healed:?}");
    // Readiness comes from the health probe's last check (every 200 ms here): it follows.
    eventually(Duration::from_secs(10), "readiness says ready and whole", || {
        let url = url.clone();
        async move {
            let ready: Value = reqwest::get(format!("{url}/readyz")).await.unwrap().json().await.unwrap();
            (ready["status"].as_str(), ready["projection"].as_str()) == (Some("ready"), Some("whole"))
        }
    })
    .await;
    env.wait_caught_up(Duration::from_secs(60)).await;
    let report = env.verify(&seeded.org_ids).await;
    assert!(report.is_clean(), "{}", report.summary());
    healing_done.store(true, Ordering::Relaxed);
    readiness_watch.await.unwrap();
    assert!(seen_fallback.load(Ordering::Relaxed), "answers from MongoDB (or its documented 503) were seen while the projection healed");
    assert!(saw_not_ready.load(Ordering::Relaxed), "readiness said 503 projection_not_ready while the projection healed");
    projector.stop().await.unwrap();
    own.stop();
}
