//! The projection path and the MongoDB path give identical answers (CONTRACT.md 3), on a seeded
//! data set and hundreds of randomized requests covering every field and their combinations.
mod common;

use common::{small_seed, TestEnv};
use pipeline_board::core::model::CardDoc;
use pipeline_board::mongo::{self, OrgSnapshot};
use pipeline_board::query::board::BoardAnswer;
use pipeline_board::query::mongo_path::MongoReader;
use pipeline_board::query::projection::ProjectionReader;
use pipeline_board::query::request::ContactsRequest;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

const HOUR: i64 = 3_600_000;

fn iso(ms: i64) -> String {
    pipeline_board::core::time::format_millis(ms)
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
    (Value::Object(r), user, now)
}

fn describe_difference(a: &BoardAnswer, b: &BoardAnswer) -> String {
    for (x, y) in a.buckets.iter().zip(&b.buckets) {
        if x.total != y.total {
            return format!("bucket {:?}: total {} (projection) vs {} (mongodb)", x.name, x.total, y.total);
        }
        let ids = |v: &Vec<pipeline_board::query::board::CardOut>| v.iter().map(|c| c.doc.id.clone()).collect::<Vec<_>>();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_and_mongodb_answer_identically() {
    let env = TestEnv::new("diff").await;
    let seeded = env.seed_and_project(small_seed(2, 350, 99)).await;

    let projection = ProjectionReader::new(env.redis().await, env.keys.clone());
    let db = env.mongo().await;
    let mongo_reader = MongoReader::new(db.clone(), pipeline_board::query::mongo_path::DEFAULT_MAX_IDS);
    let mut snaps = Vec::new();
    for org in &seeded.org_ids {
        snaps.push((org.clone(), mongo::load_org(&db, org).await.unwrap()));
    }
    let base_now = chrono::Utc::now().timestamp_millis();
    let requests: usize = std::env::var("DIFF_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut rng = ChaCha8Rng::seed_from_u64(std::env::var("DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(2026));
    let (mut non_empty, mut with_cards, mut not_found) = (0, 0, 0);
    for i in 0..requests {
        let (org, snap) = snaps.choose(&mut rng).unwrap();
        let (body, user, now) = random_request(snap, &mut rng, base_now);
        let query = ContactsRequest::parse(body.to_string().as_bytes()).unwrap().into_query().expect("generated requests are valid");
        let from_projection = projection.answer(org, &user, &query, now).await;
        let from_mongo = mongo_reader.answer(org, &user, &query, now).await;
        match (from_projection, from_mongo) {
            (Ok(a), Ok(b)) => {
                assert!(a == b, "request #{i} {body} (user {user}, now {now}) answered differently: {}", describe_difference(&a, &b));
                non_empty += a.buckets.iter().any(|b| b.total > 0) as usize;
                with_cards += a.buckets.iter().any(|b| !b.cards.is_empty()) as usize;
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.to_string(), b.to_string(), "request #{i} {body}: both failed, differently");
                not_found += 1;
            }
            (a, b) => panic!("request #{i} {body}: projection {:?} vs mongodb {:?}", a.map(|_| "answer"), b.map(|_| "answer")),
        }
    }
    // The generator must produce answers with content, not only empty boards.
    assert!(non_empty > requests / 3, "only {non_empty} of {requests} requests matched any card");
    assert!(with_cards > requests / 4, "only {with_cards} of {requests} requests returned cards");
    eprintln!(
        "{requests} requests compared: {non_empty} with matches, {with_cards} with cards on the page, {not_found} errors on both paths"
    );
    env.cleanup().await;
}
