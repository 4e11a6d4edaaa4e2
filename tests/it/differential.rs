//! The projection path and the MongoDB path give identical answers (CONTRACT.md 3), on a seeded
//! data set and hundreds of randomized requests covering every field and their combinations.
use crate::common::oracle::{self, OracleBucket};
use crate::common::{cluster_url, small_seed, TestEnv};
use board_api::query::board::BoardAnswer;
use board_api::query::mongo_path::MongoReader;
use board_api::query::projection::ProjectionReader;
use board_api::query::request::ContactsRequest;
use board_model::model::CardDoc;
use board_mongo::OrgSnapshot;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

const HOUR: i64 = 3_600_000;

fn iso(ms: i64) -> String {
    board_model::time::format_millis(ms)
}

/// Each character in upper or lower case by Unicode's full mappings, so terms carry what
/// whole-string case mapping gets wrong: `ς`/`Σ`, `İ` → `i̇`, `ß` → `SS`.
fn random_case(s: &str, rng: &mut ChaCha8Rng) -> String {
    s.chars().flat_map(|c| if rng.random_bool(0.5) { c.to_uppercase().collect::<Vec<_>>() } else { c.to_lowercase().collect() }).collect()
}

fn substring(s: &str, rng: &mut ChaCha8Rng, min: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= min {
        return s.to_string();
    }
    let len = rng.random_range(min..=chars.len().min(min + 5));
    let start = rng.random_range(0..=chars.len() - len);
    chars[start..start + len].iter().collect()
}

/// A random request over the org's real data (ids, names, times), plus the `now` to answer it at.
fn random_request(snap: &OrgSnapshot, rng: &mut ChaCha8Rng, base_now: i64) -> (Value, String, i64) {
    let mut r = Map::new();
    let user = snap.users.choose(rng).unwrap().id.clone();
    let app = rng.random_bool(0.3);
    let kind = if app { "Application" } else { "Contact" };
    let cards: &Vec<CardDoc> = if app { &snap.applications } else { &snap.contacts };
    let mut now = base_now;
    let p = |rng: &mut ChaCha8Rng, pct: f64| rng.random_bool(pct);
    if app || p(rng, 0.1) {
        r.insert("pipelineType".into(), json!(kind));
    }
    let pipelines: Vec<_> = snap.pipelines.iter().filter(|p| p.kind.as_deref() == Some(kind)).collect();
    let pipeline = if p(rng, 0.25) {
        let pl = pipelines.choose(rng).unwrap();
        r.insert("pipelineId".into(), json!(pl.id));
        (*pl).clone()
    } else {
        pipelines.iter().find(|p| p.is_active == Some(true)).map(|p| (*p).clone()).unwrap()
    };
    let stages = pipeline.stages.clone().unwrap_or_default();
    if p(rng, 0.15) {
        let mut names: Vec<Value> = stages.choose_multiple(rng, 3).map(|s| json!(s.name)).collect();
        if p(rng, 0.5) {
            names.push(json!("No Such Stage"));
        }
        names.shuffle(rng);
        r.insert("stages".into(), Value::Array(names));
    } else if p(rng, 0.1) {
        let s = stages.choose(rng).unwrap();
        r.insert("status".into(), if p(rng, 0.5) { json!(s.id) } else { json!(s.name) });
    }
    let size = *[1u32, 2, 3, 5, 10, 25, 100].choose(rng).unwrap();
    if p(rng, 0.8) {
        r.insert("size".into(), json!(size));
    }
    if p(rng, 0.4) {
        let mut pages = Map::new();
        for s in stages.choose_multiple(rng, 3) {
            let page = rng.random_range(1..=6u32);
            if p(rng, 0.5) {
                pages.insert(s.id.clone(), json!(page));
            } else {
                pages.insert(s.name.clone().unwrap(), json!(page));
            }
        }
        r.insert("page".into(), Value::Object(pages));
    }
    if p(rng, 0.25) {
        let c = cards.choose(rng).unwrap();
        let term = match rng.random_range(0..5) {
            0 => c
                .phone_numbers
                .as_ref()
                .and_then(|ps| ps.first())
                .and_then(|p| p.value.clone())
                .map(|v| substring(&v, rng, 3))
                .unwrap_or_default(),
            1 => substring(c.last_name.as_deref().unwrap_or("x"), rng, 1),
            2 => "zz(.*)".to_string(),
            _ => random_case(&substring(c.full_name.as_deref().unwrap_or("x"), rng, 3), rng),
        };
        r.insert("search".into(), json!(format!("  {term} ")));
    }
    if !app && p(rng, 0.2) {
        r.insert("source".into(), json!(cards.choose(rng).unwrap().source));
    }
    match rng.random_range(0..10) {
        0 => {
            r.insert("ownerFilter".into(), json!("my"));
        }
        1 => {
            r.insert("ownerFilter".into(), json!("team"));
        }
        2 => {
            r.insert("ownerFilter".into(), json!("unassigned"));
        }
        3 => {
            r.insert("ownerFilter".into(), json!(snap.users.choose(rng).unwrap().id));
        }
        4 => {
            let n = rng.random_range(1..=3);
            let owners: Vec<String> = snap.users.choose_multiple(rng, n).map(|u| u.id.clone()).collect();
            r.insert("owner".into(), json!(owners));
            r.insert("ownerFilter".into(), json!("unassigned"));
        }
        5 => {
            r.insert("ownerFilter".into(), json!("all"));
        }
        _ => {}
    }
    if p(rng, 0.15) {
        let n = rng.random_range(1..=2);
        let a: Vec<String> = snap.users.choose_multiple(rng, n).map(|u| u.id.clone()).collect();
        r.insert("assignee".into(), json!(a));
    }
    if p(rng, 0.25) {
        // Bounds exactly on cards' createdAt: the range is inclusive on both ends.
        let mut times: Vec<i64> = cards.iter().filter_map(|c| c.created_at).collect();
        times.sort();
        let a = times[rng.random_range(0..times.len())];
        let b = times[rng.random_range(0..times.len())];
        let (lo, hi) = (a.min(b), a.max(b));
        let mut range = Map::new();
        if p(rng, 0.8) {
            range.insert("start".into(), json!(iso(lo)));
        }
        if p(rng, 0.8) {
            range.insert("end".into(), json!(iso(hi)));
        }
        let field = if p(rng, 0.3) { "dateRange" } else { "createdDateRange" };
        r.insert(field.into(), Value::Object(range));
    }
    if p(rng, 0.15) {
        r.insert("bulkOnly".into(), json!(p(rng, 0.7)));
    }
    if p(rng, 0.25) {
        r.insert("messageStatus".into(), json!(["all", "answered", "unanswered"].choose(rng).unwrap()));
    }
    let mut msg_times: Vec<i64> = snap.messages.iter().filter_map(|m| m.created_at).collect();
    msg_times.sort();
    if p(rng, 0.2) && !msg_times.is_empty() {
        // "now" placed so that the window starts exactly on a message: the edge is inclusive.
        let edge = msg_times[rng.random_range(0..msg_times.len())];
        let (value, unit_ms, unit) =
            if p(rng, 0.5) { (rng.random_range(0..=72i64), HOUR, "hours") } else { (rng.random_range(0..=30i64), 24 * HOUR, "days") };
        now = edge + value * unit_ms;
        r.insert("lastMessageTimeRange".into(), json!({"value": value, "unit": unit}));
    }
    if p(rng, 0.15) && !msg_times.is_empty() {
        let a = msg_times[rng.random_range(0..msg_times.len())];
        let b = msg_times[rng.random_range(0..msg_times.len())];
        let mut range = Map::new();
        if p(rng, 0.85) {
            range.insert("start".into(), json!(iso(a.min(b))));
        }
        if p(rng, 0.85) {
            range.insert("end".into(), json!(iso(a.max(b))));
        }
        r.insert("lastMessageDateRange".into(), Value::Object(range));
    }
    if p(rng, 0.1) {
        // stageIdByName never widens what is visible: this pipeline's names mapped to ids of
        // this pipeline, of another one, or to nothing.
        let mut map = Map::new();
        for s in stages.choose_multiple(rng, 2) {
            let other = snap.pipelines.choose(rng).unwrap().stages.clone().unwrap_or_default();
            let id = match rng.random_range(0..3) {
                0 => s.id.clone(),
                1 => other.choose(rng).map(|o| o.id.clone()).unwrap_or_default(),
                _ => format!("{:024x}", rng.random::<u64>()),
            };
            map.insert(s.name.clone().unwrap_or_default(), json!(id));
        }
        r.insert("stageIdByName".into(), Value::Object(map));
    }
    if p(rng, 0.1) {
        let c = cards.choose(rng).unwrap();
        let cf = c.custom_fields.clone().unwrap_or_default();
        let mut custom = Map::new();
        match rng.random_range(0..3) {
            0 => {
                let industry = cf.get("industry").and_then(Value::as_str).unwrap_or("Retail");
                custom.insert("industry".into(), json!(random_case(&substring(industry, rng, 2), rng)));
            }
            1 => {
                custom.insert("budget".into(), cf.get("budget").cloned().unwrap_or(json!(500)));
            }
            _ => {
                custom.insert("vip".into(), json!(p(rng, 0.3)));
            }
        }
        r.insert("customFields".into(), Value::Object(custom));
    }
    (Value::Object(r), user, now)
}

/// The service's answer against the oracle's: bucket names and ids in order, totals, page ids.
fn assert_same_as_oracle(i: usize, body: &Value, a: &BoardAnswer, expected: &[OracleBucket]) {
    let got: Vec<OracleBucket> = a
        .buckets
        .iter()
        .map(|b| OracleBucket {
            name: b.name.clone(),
            stage_id: b.stage_id.clone(),
            total: b.total,
            page: b.cards.iter().map(|c| c.doc.id.clone()).collect(),
        })
        .collect();
    for (g, e) in got.iter().zip(expected) {
        assert_eq!(g, e, "request #{i} {body}: the service and the oracle differ");
    }
    assert_eq!(got.len(), expected.len(), "request #{i} {body}: bucket count differs from the oracle's");
}

fn describe_difference(a: &BoardAnswer, b: &BoardAnswer) -> String {
    for (x, y) in a.buckets.iter().zip(&b.buckets) {
        if x.total != y.total {
            return format!("bucket {:?}: total {} (projection) vs {} (mongodb)", x.name, x.total, y.total);
        }
        let ids = |v: &Vec<board_api::query::board::CardOut>| v.iter().map(|c| c.doc.id.clone()).collect::<Vec<_>>();
        if ids(&x.cards) != ids(&y.cards) {
            return format!("bucket {:?}: cards {:?} vs {:?}", x.name, ids(&x.cards), ids(&y.cards));
        }
        for (c, d) in x.cards.iter().zip(&y.cards) {
            if c != d {
                return format!("card {}: {:?} vs {:?}", c.doc.id, c, d);
            }
        }
    }
    format!(
        "bucket lists differ: {:?} vs {:?}",
        a.buckets.iter().map(|b| &b.name).collect::<Vec<_>>(),
        b.buckets.iter().map(|b| &b.name).collect::<Vec<_>>()
    )
}

struct Round<'a> {
    projection: &'a ProjectionReader,
    mongo: &'a MongoReader,
    base_now: i64,
}

impl Round<'_> {
    /// `requests` random requests, each answered by the projection, MongoDB and the oracle.
    /// `customFields` requests: the projection answers among the ids MongoDB matched for them
    /// (as the API does).
    async fn run(&self, label: &str, snaps: &[(String, OrgSnapshot)], requests: usize, rng: &mut ChaCha8Rng) {
        let (mut non_empty, mut with_cards, mut not_found, mut custom) = (0, 0, 0, 0);
        let mut routes: std::collections::BTreeMap<&str, usize> = Default::default();
        for i in 0..requests {
            let (org, snap) = snaps.choose(rng).unwrap();
            let (body, user, now) = random_request(snap, rng, self.base_now);
            let query = ContactsRequest::parse(body.to_string().as_bytes()).unwrap().into_query().expect("generated requests are valid");
            let from_oracle = oracle::answer(snap, &user, &body, now);
            let from_mongo = self.mongo.answer(org, &user, &query, now).await;
            // Custom fields: MongoDB's ids of the matching cards, the projection among them.
            let among = if query.filters.custom_fields.is_empty() {
                None
            } else {
                custom += 1;
                Some(self.mongo.custom_field_ids(org, &query).await.expect("custom-field ids"))
            };
            let from_projection =
                self.projection.answer_with_token(org, &user, &query, now, among.clone()).await.map(|(a, route, _)| (a, route));
            // The API sends the cards rendered once per version: the same JSON.
            if let Ok((a, _)) = &from_projection {
                let (sent, _, _) = self.projection.rendered_answer(org, &user, &query, now, among).await.expect("rendered as answered");
                assert!(sent == a.clone().rendered(), "{label} request #{i} {body}: the rendered cards differ from the answer's");
            }
            match (from_projection, from_mongo) {
                (Ok((a, route)), Ok(b)) => {
                    *routes.entry(route.name()).or_default() += 1;
                    assert!(
                        a == b,
                        "{label} request #{i} {body} (user {user}, now {now}) answered differently: {}",
                        describe_difference(&a, &b)
                    );
                    let expected =
                        from_oracle.unwrap_or_else(|e| panic!("{label} request #{i} {body}: both paths answered, the oracle says {e}"));
                    assert_same_as_oracle(i, &body, &a, &expected);
                    non_empty += a.buckets.iter().any(|b| b.total > 0) as usize;
                    with_cards += a.buckets.iter().any(|b| !b.cards.is_empty()) as usize;
                }
                (Err(a), Err(b)) => {
                    assert_eq!(a.to_string(), b.to_string(), "{label} request #{i} {body}: both failed, differently");
                    assert_eq!(
                        from_oracle.err(),
                        Some("not_found"),
                        "{label} request #{i} {body}: both paths failed ({a}), the oracle answered"
                    );
                    not_found += 1;
                }
                (a, b) => panic!("{label} request #{i} {body}: projection {:?} vs mongodb {:?}", a.map(|_| "answer"), b.map(|_| "answer")),
            }
        }
        // The generator must produce answers with content, not only empty boards.
        assert!(non_empty > requests / 3, "{label}: only {non_empty} of {requests} requests matched any card");
        assert!(with_cards > requests / 4, "{label}: only {with_cards} of {requests} requests returned cards");
        // Both structures of the projection must have been compared.
        // (A tenth of the requests have custom fields.)
        for (route, share) in [("sorted_sets", 20), ("index", 20), ("index_among_mongodb_ids", 50)] {
            assert!(routes.get(route).copied().unwrap_or(0) > requests / share, "{label}: too few boards answered by {route}: {routes:?}");
        }
        eprintln!(
            "{label}: {requests} requests compared with the oracle: {non_empty} with matches, {with_cards} with cards on the page, \
             {custom} with customFields, {not_found} not found on every path; projection routes {routes:?}"
        );
    }
}

/// Renames the first stage of the org's active Contact pipeline, adds a stage, removes its last
/// one, and makes the inactive Contact pipeline the active one: as events and in MongoDB.
async fn change_pipelines(env: &TestEnv, db: &mongodb::Database, org: &str, snap: &OrgSnapshot) {
    let contact =
        |active: bool| snap.pipelines.iter().find(|p| p.kind.as_deref() == Some("Contact") && p.is_active == Some(active)).unwrap().clone();
    let (mut was_active, mut now_active) = (contact(true), contact(false));
    let stages = was_active.stages.as_mut().unwrap();
    stages[0].name = Some(format!("{} (renamed)", stages[0].name.clone().unwrap_or_default()));
    stages.pop();
    stages.push(board_model::model::Stage { id: format!("{:024x}", rand::random::<u64>()), name: Some("Added".into()), order: Some(99) });
    was_active.is_active = Some(false);
    now_active.is_active = Some(true);
    for p in [&mut was_active, &mut now_active] {
        p.version = Some(p.version.unwrap_or(1) + 1);
        let event = json!({"type": "pipeline.upserted", "eventId": format!("change-{}", p.id), "orgId": org,
            "occurredAt": "2026-11-30T09:00:00.000Z", "pipeline": p});
        env.produce(&env.topics.topic_pipelines, &p.id, &serde_json::to_vec(&event).unwrap()).await;
        db.collection::<bson::Document>("pipelines")
            .replace_one(bson::doc! {"_id": &p.id}, board_mongo::pipeline_to_bson(p))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_and_mongodb_answer_identically() {
    let env = TestEnv::new("diff").await;
    let seeded = env.seed_and_project(small_seed(2, 350, 99)).await;

    let projection = ProjectionReader::new(env.redis().await, env.keys.clone(), std::time::Duration::from_secs(10))
        // Pages from offset 5 on are selected by pb_union_page: both ways are compared.
        .with_deep_page_offset(5);
    let db = env.mongo().await;
    let mongo_reader = MongoReader::new(db.clone(), board_api::query::mongo_path::DEFAULT_MAX_IDS);
    let mut snaps = Vec::new();
    for org in &seeded.org_ids {
        snaps.push((org.clone(), board_mongo::load_org(&db, org).await.unwrap()));
    }
    let base_now = chrono::Utc::now().timestamp_millis();
    let requests: usize = std::env::var("DIFF_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut rng = ChaCha8Rng::seed_from_u64(std::env::var("DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(2026));
    let round = Round { projection: &projection, mongo: &mongo_reader, base_now };
    round.run("seeded", &snaps, requests, &mut rng).await;

    // The pipelines change after projection: a stage renamed, one added, one removed, and the
    // active Contact pipeline switched; an older version of a card arrives after its newer one
    // on another partition. Both paths and the oracle must follow.
    for (org, snap) in &snaps {
        change_pipelines(&env, &db, org, snap).await;
        if let Some(newer) = snap.contacts.iter().find(|c| c.version == Some(2)) {
            let mut older = newer.clone();
            older.version = Some(1);
            older.first_name = Some("Stale".into());
            let event =
                json!({"type": "contact.upserted", "eventId": "late-v1", "orgId": org, "occurredAt": iso(base_now), "contact": older});
            // Keyed differently from the card's other events: another partition, no order.
            env.produce(&env.topics.topic_contacts, &format!("late-{}", newer.id), &serde_json::to_vec(&event).unwrap()).await;
        }
    }
    let projector = env.spawn_projector();
    env.wait_caught_up(std::time::Duration::from_secs(120)).await;
    projector.stop().await.unwrap();
    let report = env.verify(&seeded.org_ids).await;
    assert!(report.is_clean(), "after the pipeline changes: {:#?}", report.samples);
    let mut snaps = Vec::new();
    for org in &seeded.org_ids {
        snaps.push((org.clone(), board_mongo::load_org(&db, org).await.unwrap()));
    }
    round.run("after pipeline changes", &snaps, requests / 3, &mut rng).await;
}

/// The same comparison on the stack's Redis Cluster (3 primaries + 3 replicas) with orgs on
/// every shard: the projector, the readers and `verify` run in cluster mode, where any
/// cross-slot pipeline or Function call is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_with_orgs_on_every_shard_both_paths_answer_identically() {
    let env = TestEnv::on_cluster("diff-cluster").await;
    let mut org_ids: Vec<String> = Vec::new();
    let mut node = redis::Client::open(board_redis::redis_conn::RedisTarget::parse(&cluster_url(), false).first_node())
        .unwrap()
        .get_connection()
        .unwrap();
    // Seed orgs (ids are random) until every shard holds at least one.
    let mut shards = std::collections::BTreeMap::<u16, usize>::new();
    for round in 0..8u64 {
        org_ids.extend(env.seed(small_seed(3, 60, 700 + round)).await.org_ids);
        shards.clear();
        for org in &org_ids {
            *shards.entry(crate::common::primary_of(&mut node, &env.keys.generation_pointer(org)).0).or_default() += 1;
        }
        if shards.len() == 3 {
            break;
        }
    }
    assert_eq!(shards.len(), 3, "orgs on every shard: {shards:?}");
    let projector = env.spawn_projector();
    env.wait_caught_up(std::time::Duration::from_secs(120)).await;
    projector.stop().await.unwrap();
    let report = env.verify(&org_ids).await;
    assert!(report.is_clean(), "verify on the cluster: {:#?}", report.samples);
    assert_eq!(report.orgs, org_ids.len());

    let projection =
        ProjectionReader::new(env.redis().await, env.keys.clone(), std::time::Duration::from_secs(10)).with_deep_page_offset(5);
    let db = env.mongo().await;
    let mongo_reader = MongoReader::new(db.clone(), board_api::query::mongo_path::DEFAULT_MAX_IDS);
    let mut snaps = Vec::new();
    for org in &org_ids {
        snaps.push((org.clone(), board_mongo::load_org(&db, org).await.unwrap()));
    }
    let requests: usize = std::env::var("DIFF_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(300) / 3;
    let mut rng = ChaCha8Rng::seed_from_u64(2027);
    let round = Round { projection: &projection, mongo: &mongo_reader, base_now: chrono::Utc::now().timestamp_millis() };
    round.run(&format!("cluster, orgs per shard {shards:?}"), &snaps, requests, &mut rng).await;
}
