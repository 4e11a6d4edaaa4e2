//! Loading and catching up the API's in-memory index: an index behind entries its org's change
//! stream no longer holds (trimmed by `MAXLEN`, which Redis 7.0 does not record in
//! `max-deleted-entry-id`) is loaded again, never caught up from what is left.
//!
//! Index images (issue 19): an API instance that has not loaded an org reads the image another
//! instance stored, catches it up from the change stream, and answers as MongoDB does; an image
//! the stream can no longer bring up to date is not used (the org is built from its records and
//! a new image stored); `pb_image_put_parts` refuses an image of a generation the org left and one
//! older than the image stored.
use crate::common::{answer_data, mongodb_answer, small_seed, TestEnv};
use board_api::query::index_cache::LoadedFrom;
use board_api::query::projection::{IndexLimits, ProjectionReader};
use board_api::query::request::ContactsRequest;
use board_model::keys::{Generation, OrgKeys};
use board_redis::functions::fcall;
use board_redis::functions::image::{image_head_cmd, image_part_cmd, image_put_cmd, ImageHead, ImagePut, IMAGE_PART_BYTES};
use board_redis::redis_conn::RedisConn;
use serde_json::json;
use std::time::Duration;

/// Index boards (each needs the in-memory index), and a search for the names changed below.
const BOARDS: [&str; 4] = [
    r#"{"search": "an", "size": 50}"#,
    r#"{"ownerFilter": "team", "size": 50}"#,
    r#"{"messageStatus": "answered"}"#,
    r#"{"search": "zebulon"}"#,
];

/// A reader of its own (an API instance that has loaded nothing), storing every org's image.
async fn instance(env: &TestEnv) -> ProjectionReader {
    ProjectionReader::new(env.redis().await, env.keys.clone(), Duration::from_secs(10))
        .with_index_limits(IndexLimits { image_min_cards: 1, ..Default::default() })
}

/// Asks every board of `BOARDS` and compares each with MongoDB's answer; where the org's index
/// came from.
async fn boards_match_mongodb(who: &str, reader: &ProjectionReader, db: &mongodb::Database, org: &str, user: &str) -> Option<LoadedFrom> {
    for body in BOARDS {
        let q = ContactsRequest::parse(body.as_bytes()).unwrap().into_query().unwrap();
        let (answer, route) = reader.answer(org, user, &q, chrono::Utc::now().timestamp_millis()).await.unwrap();
        assert_eq!(route.name(), "index", "{who}: {body}");
        assert!(answer_data(&answer) == mongodb_answer(db, org, user, body).await, "{who}: {body}: not MongoDB's answer");
    }
    reader.loaded_index(org).and_then(|slot| slot.loaded_from())
}

/// The image stored for `keys`, its parts joined (and counted as its head says).
async fn stored_image(r: &mut RedisConn, keys: &OrgKeys) -> Option<Vec<u8>> {
    let head = ImageHead::from_reply(image_head_cmd(keys).query_async(r).await.unwrap())?;
    let mut image = Vec::new();
    for n in 0..head.parts {
        let part = head.part_of(image_part_cmd(keys, n).query_async(r).await.unwrap());
        image.extend(part.expect("a part of the image"));
    }
    assert_eq!(image.len() as u64, head.bytes);
    Some(image)
}

/// The change-stream id the org's stored image is current to.
async fn image_at(env: &TestEnv, keys: &OrgKeys) -> Option<String> {
    let head = ImageHead::from_reply(image_head_cmd(keys).query_async(&mut env.redis().await).await.unwrap());
    head.map(|h| h.at)
}

async fn last_change(env: &TestEnv, keys: &OrgKeys) -> String {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(keys.changes())
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut env.redis().await)
        .await
        .unwrap();
    reply.ids[0].id.clone()
}

/// Renames `n` of the org's contacts in MongoDB and sends their events, one by one.
async fn rename_contacts(env: &TestEnv, db: &mongodb::Database, org: &str, n: usize, round: usize) {
    let contacts = board_mongo::load_org(db, org).await.unwrap().contacts;
    for c in contacts.iter().take(n) {
        let mut c = c.clone();
        c.first_name = Some(format!("Zebulon{round}"));
        c.version = Some(c.version.unwrap_or(1) + 1);
        db.collection::<bson::Document>("contacts").replace_one(bson::doc! {"_id": &c.id}, board_mongo::card_to_bson(&c)).await.unwrap();
        let event = json!({"type": "contact.upserted", "eventId": format!("rename-{round}-{}", c.id), "orgId": org,
            "occurredAt": "2026-12-01T00:00:00.000Z", "contact": c});
        env.produce(&env.topics.topic_contacts, &c.id, &serde_json::to_vec(&event).unwrap()).await;
        env.wait_caught_up(Duration::from_secs(60)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_reads_anothers_image_and_catches_it_up() {
    let env = TestEnv::new("index-images").await;
    let seeded = env.seed(small_seed(1, 300, 23)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let (db, org) = (env.mongo().await, seeded.org_ids[0].clone());
    let user = board_mongo::load_org(&db, &org).await.unwrap().users[0].id.clone();
    let keys = env.keys.org(&org);

    // The first instance builds the org from its records and stores its image.
    let first = instance(&env).await;
    assert_eq!(boards_match_mongodb("first", &first, &db, &org, &user).await, Some(LoadedFrom::Records));
    let stored = crate::common::eventually(Duration::from_secs(30), "the first instance stores the org's image", || {
        let (env, keys) = (&env, &keys);
        async move { image_at(env, keys).await.is_some() }
    });
    stored.await;
    // Stored again in parts of 1 KiB (an image this small is one part of `IMAGE_PART_BYTES`):
    // the second instance decodes the parts as they arrive.
    let mut r = env.redis().await;
    let head = ImageHead::from_reply(image_head_cmd(&keys).query_async(&mut r).await.unwrap()).unwrap();
    let image = stored_image(&mut r, &keys).await.unwrap();
    let _: () = redis::cmd("DEL").arg(keys.index_image()).query_async(&mut r).await.unwrap();
    let small_parts = image_put_cmd(&keys, &head.at, &head.layout, image.chunks(1024));
    assert_eq!(fcall::<ImagePut, _>(&mut r, &small_parts).await.unwrap(), ImagePut::Stored);
    let head = ImageHead::from_reply(image_head_cmd(&keys).query_async(&mut r).await.unwrap()).unwrap();
    assert!(head.parts > 3, "{} parts", head.parts);

    // Cards change after the image: a second instance reads the image and catches it up.
    rename_contacts(&env, &db, &org, 3, 1).await;
    let second = instance(&env).await;
    assert_eq!(boards_match_mongodb("second", &second, &db, &org, &user).await, Some(LoadedFrom::Image));

    // The stream no longer holds the image's position (it keeps ~1,000 entries; trimmed to none
    // here after more changes): a third instance builds from the records, and stores an image
    // current to the stream's end, which a fourth reads.
    rename_contacts(&env, &db, &org, 2, 2).await;
    let last = last_change(&env, &keys).await;
    let _: u64 = redis::cmd("XTRIM").arg(keys.changes()).arg("MAXLEN").arg(0).query_async(&mut env.redis().await).await.unwrap();
    let third = instance(&env).await;
    assert_eq!(boards_match_mongodb("third", &third, &db, &org, &user).await, Some(LoadedFrom::Records));
    crate::common::eventually(Duration::from_secs(30), "the third instance stores an image current to the stream", || {
        let (env, keys, last) = (&env, &keys, last.clone());
        async move { image_at(env, keys).await == Some(last) }
    })
    .await;
    let fourth = instance(&env).await;
    assert_eq!(boards_match_mongodb("fourth", &fourth, &db, &org, &user).await, Some(LoadedFrom::Image));
    projector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_of_a_left_generation_or_older_than_the_stored_one_is_refused() {
    let env = TestEnv::new("image-put").await;
    let org = "64f0a1b2c3d4e5f6a7b8c9d1";
    let mut r = env.redis().await;
    let (base, g7) = (env.keys.org(org), env.keys.org_in(&Generation::numbered(7), org));
    // This build's Functions, whatever a Redis of the test stack kept from another build.
    board_redis::functions::load_library(&mut r).await.unwrap();
    let put = |keys: &OrgKeys, at: &str, image: &[u8]| image_put_cmd(keys, at, "ours", image.chunks(IMAGE_PART_BYTES));
    // Images of 3 parts, 1 part and 2 parts: a shorter one leaves no part of the longer behind.
    let image = |byte: u8, parts: usize| vec![byte; IMAGE_PART_BYTES * (parts - 1) + 5];
    let (a, b, c, d, e) = (image(1, 3), image(2, 1), image(3, 1), image(4, 2), image(5, 1));

    assert_eq!(fcall::<ImagePut, _>(&mut r, &put(&base, "10-0", &a)).await.unwrap(), ImagePut::Stored);
    assert_eq!(stored_image(&mut r, &base).await.as_ref(), Some(&a));
    assert_eq!(fcall::<ImagePut, _>(&mut r, &put(&base, "9-5", &b)).await.unwrap(), ImagePut::Older);
    // Nor other bytes at the same position: a reader that sees the same position and layout
    // beside every part has read one image.
    assert_eq!(fcall::<ImagePut, _>(&mut r, &put(&base, "10-0", &b)).await.unwrap(), ImagePut::Older);
    assert_eq!(fcall::<ImagePut, _>(&mut r, &put(&base, "10-1", &c)).await.unwrap(), ImagePut::Stored);
    assert_eq!(stored_image(&mut r, &base).await.as_ref(), Some(&c));
    let fields: u64 = redis::cmd("HLEN").arg(base.index_image()).query_async(&mut r).await.unwrap();
    assert_eq!(fields, 5, "at, layout, parts, bytes and one part");
    // An image of another layout (another build's, unreadable here) is replaced whatever its
    // position: only an image of the same layout can be more recent.
    let theirs = image_put_cmd(&base, "10-9", "theirs", b.chunks(IMAGE_PART_BYTES));
    assert_eq!(fcall::<ImagePut, _>(&mut r, &theirs).await.unwrap(), ImagePut::Stored);
    assert_eq!(fcall::<ImagePut, _>(&mut r, &put(&base, "10-1", &c)).await.unwrap(), ImagePut::Stored);
    assert_eq!(stored_image(&mut r, &base).await.as_ref(), Some(&c));
    // The org reads the base generation: an image of g7 is not stored.
    assert_eq!(fcall::<ImagePut, _>(&mut r, &put(&g7, "11-0", &d)).await.unwrap(), ImagePut::Moved);
    assert_eq!(stored_image(&mut r, &g7).await, None);
    // Once the org reads g7, the base generation's image is the refused one.
    let _: () = redis::cmd("SET").arg(env.keys.generation_pointer(org)).arg("g7").query_async(&mut r).await.unwrap();
    assert_eq!(fcall::<ImagePut, _>(&mut r, &put(&g7, "11-0", &d)).await.unwrap(), ImagePut::Stored);
    assert_eq!(stored_image(&mut r, &g7).await.as_ref(), Some(&d));
    assert_eq!(fcall::<ImagePut, _>(&mut r, &put(&base, "12-0", &e)).await.unwrap(), ImagePut::Moved);
    assert_eq!(stored_image(&mut r, &base).await.as_ref(), Some(&c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_behind_a_trimmed_stream_is_loaded_again() {
    let env = TestEnv::new("index-trimmed").await;
    let seeded = env.seed(small_seed(1, 200, 29)).await;
    let projector = env.spawn_projector();
    env.wait_caught_up(Duration::from_secs(120)).await;
    let (db, org) = (env.mongo().await, seeded.org_ids[0].clone());
    let user = board_mongo::load_org(&db, &org).await.unwrap().users[0].id.clone();
    let keys = env.keys.org(&org);
    let reader = ProjectionReader::new(env.redis().await, env.keys.clone(), Duration::from_secs(10));
    assert_eq!(boards_match_mongodb("loaded", &reader, &db, &org, &user).await, Some(LoadedFrom::Records));
    // Three commits, then the stream keeps only the last (as after more than ~1,000 commits
    // while the index was not asked): the two before it are gone unread.
    rename_contacts(&env, &db, &org, 3, 1).await;
    let _: u64 = redis::cmd("XTRIM").arg(keys.changes()).arg("MAXLEN").arg(1).query_async(&mut env.redis().await).await.unwrap();
    boards_match_mongodb("behind the trimmed stream", &reader, &db, &org, &user).await;
    // A commit after the trim is caught up as usual.
    rename_contacts(&env, &db, &org, 1, 2).await;
    boards_match_mongodb("caught up", &reader, &db, &org, &user).await;
    projector.stop().await.unwrap();
}
