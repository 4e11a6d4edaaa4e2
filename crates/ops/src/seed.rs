//! `pipeline-board seed`: a realistic, reproducible CRM data set (seeded RNG), written to MongoDB
//! and, as CONTRACT.md events, to Kafka. Generation streams in chunks so 1M contacts fit easily.
//!
//! What it makes per org: users in teams; an active and an inactive pipeline per type (5-12
//! stages); contacts with 1-3 phones, sources, creators, owners (some none), custom fields, legacy
//! cards (no `pipelineStage`, or no `pipelineId`), bulk-import cards, a few without `createdAt`;
//! applications of some contacts; conversations with assignee sets; messages over time. Some
//! documents get a second version (stage or owner moved) and some are deleted: Kafka carries
//! every version, MongoDB holds the last state, so the projection must apply the version rules to
//! end up equal to MongoDB.
use board_model::model::{CardDoc, Conversation, Message, Phone, Pipeline, Stage, User};
use board_model::time::{format_millis, Millis};
use indicatif::{ProgressBar, ProgressStyle};
use projector::config::Topics;
use projector::KafkaConnection;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct SeedArgs {
    /// Number of orgs.
    #[arg(long, default_value_t = 3)]
    pub orgs: usize,
    /// Contacts per org.
    #[arg(long, default_value_t = 2000)]
    pub contacts: usize,
    /// Share of contacts that also have an application (0..=1).
    #[arg(long, default_value_t = 0.3)]
    pub applications: f64,
    /// Messages per contact on average.
    #[arg(long, default_value_t = 2.0)]
    pub messages: f64,
    /// Users per org.
    #[arg(long, default_value_t = 24)]
    pub users: usize,
    /// Teams per org.
    #[arg(long, default_value_t = 4)]
    pub teams: usize,
    /// RNG seed: the same seed and sizes give the same data set.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// "Now" of the data set as RFC 3339 (default: the current hour). Message and creation times
    /// lie in the year before it.
    #[arg(long)]
    pub now: Option<String>,
    /// Skip the MongoDB writes (benchmarks of ingest only need the events).
    #[arg(long)]
    pub no_mongo: bool,
    /// Skip the Kafka writes.
    #[arg(long)]
    pub no_kafka: bool,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Orgs of several sizes instead of `--orgs` × `--contacts`: groups `ORGSxCONTACTS`,
    /// comma-separated (e.g. `1x1000000,20x50000,2000x500,10000x20`).
    #[arg(long, conflicts_with = "profile")]
    pub sizes: Option<OrgSizes>,
    /// A named mix of org sizes: `saas` is `1x1000000,20x50000,2000x500,10000x20` (≈ 3.2M
    /// contacts, a power law: one large org, a few mid-size ones, thousands of small ones).
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,
    /// Multiplies every group's contacts (at least one each) of `--sizes`/`--profile`: `0.01`
    /// gives the profile's shape at a hundredth of its size.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
}

/// Groups of orgs of one size: (orgs, contacts per org).
#[derive(Debug, Clone, PartialEq)]
pub struct OrgSizes(pub Vec<(usize, usize)>);

impl std::str::FromStr for OrgSizes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let group = |g: &str| -> Option<(usize, usize)> {
            let (orgs, contacts) = g.trim().split_once(['x', 'X'])?;
            Some((orgs.trim().parse().ok()?, contacts.trim().parse().ok()?))
        };
        let groups: Option<Vec<_>> = s.split(',').map(group).collect();
        match groups {
            Some(g) if !g.is_empty() => Ok(OrgSizes(g)),
            _ => Err(format!("{s:?}: expected groups ORGSxCONTACTS, comma-separated (e.g. 20x50000,2000x500)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    Saas,
}

impl Profile {
    pub fn sizes(self) -> OrgSizes {
        match self {
            Profile::Saas => OrgSizes(vec![(1, 1_000_000), (20, 50_000), (2_000, 500), (10_000, 20)]),
        }
    }
}

impl SeedArgs {
    /// (orgs, contacts per org, users per org) of each group. A mix gives small orgs fewer
    /// users (one per 20 contacts, 2 to `--users`); `--orgs` × `--contacts` keeps `--users`.
    pub fn groups(&self) -> Vec<(usize, usize, usize)> {
        match self.sizes.clone().or(self.profile.map(Profile::sizes)) {
            None => vec![(self.orgs, self.contacts, self.users)],
            Some(OrgSizes(groups)) => groups
                .into_iter()
                .map(|(orgs, contacts)| {
                    let contacts = ((contacts as f64 * self.scale).round() as usize).max(1);
                    (orgs, contacts, (contacts / 20).clamp(2, self.users.max(2)))
                })
                .collect(),
        }
    }
}

impl Default for SeedArgs {
    fn default() -> Self {
        SeedArgs {
            orgs: 3,
            contacts: 2000,
            applications: 0.3,
            messages: 2.0,
            users: 24,
            teams: 4,
            seed: 42,
            now: None,
            no_mongo: false,
            no_kafka: false,
            quiet: true,
            sizes: None,
            profile: None,
            scale: 1.0,
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct SeedReport {
    pub org_ids: Vec<String>,
    pub events: u64,
    pub contacts: u64,
    pub applications: u64,
    pub messages: u64,
}

impl SeedReport {
    /// The line `seed` prints.
    pub fn summary(&self, took: std::time::Duration) -> String {
        format!(
            "seeded {} orgs: {} contacts, {} applications, {} messages; {} events in {:.1} s",
            self.org_ids.len(),
            self.contacts,
            self.applications,
            self.messages,
            self.events,
            took.as_secs_f64()
        )
    }
}

const FIRST: &[&str] = &[
    "Jane",
    "John",
    "Maria",
    "José",
    "Zoë",
    "Łukasz",
    "Søren",
    "Aisha",
    "Chen",
    "Fatima",
    "Liam",
    "Olivia",
    "Noah",
    "Emma",
    "Mateo",
    "Sofía",
    "Yuki",
    "Ahmed",
    "Anna",
    "Pierre",
    "Ngozi",
    "Ivan",
    "Priya",
    "Kofi",
    "Élodie",
    "Björn",
    "李",
    "Jan",
    "Κώστας",
    "Σοφία",
    "Ольга",
    "Дмитрий",
    "İlker",
    "Işıl",
    "Çağla",
    "ΑΣΠΑΣΙΑ",
];
const LAST: &[&str] = &[
    "Doe",
    "Smith",
    "García",
    "Müller",
    "O'Brien",
    "Nguyen",
    "Kowalski",
    "Andersen",
    "Okafor",
    "Silva",
    "Rossi",
    "Janssen",
    "Dubois",
    "Yılmaz",
    "Sato",
    "Khan",
    "Ivanova",
    "Brown",
    "Wilson",
    "Martínez",
    "Lee",
    "Patel",
    "Mensah",
    "Novák",
    "王",
    "Παπαδόπουλος",
    "Смирнова",
    "Öztürk",
    "Weiß",
    "ŞAHİN",
    "山田",
];
/// Values with the characters keys are built from (`:`, `|`, `{`, `}`) are data like any other.
const SOURCES: &[&str] = &["facebook", "google", "referral", "website", "walk-in", "import", "instagram", "Trade Show", "ads:q4|{promo}"];
const STAGE_NAMES: &[&str] = &[
    "New Lead",
    "Contacted",
    "Qualified",
    "Demo Scheduled",
    "Proposal Sent",
    "Negotiation",
    "Follow Up",
    "On Hold",
    "Nurture",
    "Won",
    "Lost",
    "Closed",
    "Won: {big} | deal",
];
const INDUSTRIES: &[&str] = &["Retail", "Health care", "Real estate", "Education", "Finance", "Hospitality", "Logistics"];

/// ObjectId-like ids: 4 bytes of time, then a counter that never repeats within a run.
struct Ids {
    next: u64,
}
impl Ids {
    fn id(&mut self, at: Millis, rng: &mut ChaCha8Rng) -> String {
        self.next += 1;
        format!("{:08x}{:04x}{:012x}", (at / 1000).max(0) as u32, rng.random::<u16>(), self.next)
    }
}

struct Org {
    id: String,
    users: Vec<User>,
    pipelines: Vec<Pipeline>,
}

impl Org {
    fn pipeline(&self, kind: &str, active: bool) -> &Pipeline {
        self.pipelines.iter().find(|p| p.kind.as_deref() == Some(kind) && p.is_active == Some(active)).expect("seed makes one of each")
    }
}

pub struct Sink {
    producer: Option<FutureProducer>,
    db: Option<mongodb::Database>,
    topics: Topics,
    pending: Vec<(String, String, Vec<u8>)>,
    mongo_pending: std::collections::HashMap<&'static str, Vec<bson::Document>>,
    events: u64,
}

impl Sink {
    fn event(&mut self, topic: &str, key: &str, value: serde_json::Value) {
        self.events += 1;
        if self.producer.is_some() {
            self.pending.push((topic.to_string(), key.to_string(), serde_json::to_vec(&value).expect("json")));
        }
    }
    fn doc(&mut self, coll: &'static str, d: bson::Document) {
        if self.db.is_some() {
            self.mongo_pending.entry(coll).or_default().push(d);
        }
    }
    /// Flushes once enough is pending: thousands of small orgs are not one delivery wait each.
    async fn flush_if_full(&mut self) -> anyhow::Result<()> {
        if self.pending.len() >= 10_000 || self.mongo_pending.values().map(Vec::len).sum::<usize>() >= 10_000 {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(p) = &self.producer {
            let pending = std::mem::take(&mut self.pending);
            let sends =
                pending.iter().map(|(t, k, v)| p.send(FutureRecord::to(t).key(k.as_str()).payload(v.as_slice()), Duration::from_secs(60)));
            for r in futures::future::join_all(sends).await {
                r.map_err(|(e, _)| anyhow::anyhow!("kafka produce failed: {e}"))?;
            }
        }
        if let Some(db) = &self.db {
            for (coll, docs) in self.mongo_pending.drain() {
                if !docs.is_empty() {
                    db.collection::<bson::Document>(coll).insert_many(docs).ordered(false).await?;
                }
            }
        }
        Ok(())
    }
}

fn envelope(kind: &str, org: &str, at: Millis, ids: &mut Ids, rng: &mut ChaCha8Rng) -> serde_json::Value {
    json!({"type": kind, "eventId": format!("ev-{}", ids.id(at, rng)), "orgId": org, "occurredAt": format_millis(at)})
}

fn with(mut env: serde_json::Value, field: &str, v: serde_json::Value) -> serde_json::Value {
    env.as_object_mut().expect("object").insert(field.to_string(), v);
    env
}

pub async fn run(args: &SeedArgs, kafka: &KafkaConnection, topics: &Topics, mongo_uri: &str, mongo_db: &str) -> anyhow::Result<SeedReport> {
    let now: Millis = match &args.now {
        Some(s) => board_model::time::parse_rfc3339(s).ok_or_else(|| anyhow::anyhow!("--now is not RFC 3339: {s}"))?,
        None => chrono::Utc::now().timestamp_millis() / 3_600_000 * 3_600_000,
    };
    let producer: Option<FutureProducer> = if args.no_kafka {
        None
    } else {
        Some(
            kafka
                .client_config(&[
                    ("linger.ms", "20"),
                    ("batch.num.messages", "10000"),
                    ("queue.buffering.max.messages", "1000000"),
                    ("message.timeout.ms", "120000"),
                ])
                .create()?,
        )
    };
    let db = if args.no_mongo { None } else { Some(board_mongo::connect(mongo_uri, mongo_db).await?) };
    if let Some(db) = &db {
        for (index, why) in board_mongo::create_indexes(db).await {
            tracing::info!(index, why, "an index the API's queries use is not created: they scan instead");
        }
    }
    let mut sink = Sink { producer, db, topics: topics.clone(), pending: Vec::new(), mongo_pending: Default::default(), events: 0 };
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut ids = Ids { next: args.seed.wrapping_mul(1_000_003) % 1_000_000_000 };
    let mut report = SeedReport::default();

    let groups = args.groups();
    let total: usize = groups.iter().map(|(orgs, contacts, _)| orgs * contacts).sum();
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(total as u64) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} seed [{elapsed_precise}] {wide_bar} {pos}/{len} contacts ({per_sec}, eta {eta})")
            .expect("template"),
    );

    for (_, contacts, users) in groups.iter().flat_map(|g| std::iter::repeat_n(*g, g.0)) {
        let org = make_org(args, users, now, &mut ids, &mut rng);
        report.org_ids.push(org.id.clone());
        let t = sink.topics.clone();
        for p in &org.pipelines {
            let env = envelope("pipeline.upserted", &org.id, now, &mut ids, &mut rng);
            sink.event(&t.topic_pipelines, &p.id, with(env, "pipeline", serde_json::to_value(p)?));
            sink.doc("pipelines", board_mongo::pipeline_to_bson(p));
        }
        for u in &org.users {
            let env = envelope("user.upserted", &org.id, now, &mut ids, &mut rng);
            sink.event(&t.topic_users, &u.id, with(env, "user", serde_json::to_value(u)?));
            sink.doc("users", board_mongo::user_to_bson(u));
        }
        sink.flush_if_full().await?;

        let chunk = 2000;
        let mut done = 0;
        while done < contacts {
            let n = chunk.min(contacts - done);
            for _ in 0..n {
                contact_with_everything(args, &org, now, &mut ids, &mut rng, &mut sink, &mut report)?;
            }
            sink.flush_if_full().await?;
            done += n;
            bar.inc(n as u64);
        }
    }
    sink.flush().await?;
    bar.finish_and_clear();
    report.events = sink.events;
    Ok(report)
}

fn make_org(args: &SeedArgs, users: usize, now: Millis, ids: &mut Ids, rng: &mut ChaCha8Rng) -> Org {
    let year_ago = now - 365 * 86_400_000;
    let org_id = ids.id(year_ago, rng);
    let teams: Vec<String> = (0..args.teams.max(1)).map(|_| ids.id(year_ago, rng)).collect();
    let users = (0..users.max(1))
        .map(|_| {
            let n = rng.random_range(0..=2usize);
            let mut t: Vec<String> = teams.choose_multiple(rng, n).cloned().collect();
            t.sort();
            User { id: ids.id(year_ago, rng), org_id: org_id.clone(), team_ids: Some(t), version: Some(1) }
        })
        .collect();
    let mut pipelines = Vec::new();
    for kind in ["Contact", "Application"] {
        for active in [true, false] {
            let n = rng.random_range(5..=12usize);
            let mut names: Vec<&str> = STAGE_NAMES.to_vec();
            names.shuffle(rng);
            let stages = names[..n]
                .iter()
                .enumerate()
                .map(|(i, name)| Stage { id: ids.id(year_ago, rng), name: Some(name.to_string()), order: Some(i as i64) })
                .collect();
            pipelines.push(Pipeline {
                id: ids.id(year_ago, rng),
                org_id: org_id.clone(),
                name: Some(format!("{kind} {}", if active { "pipeline" } else { "archive" })),
                kind: Some(kind.to_string()),
                is_active: Some(active),
                stages: Some(stages),
                version: Some(1),
            });
        }
    }
    Org { id: org_id, users, pipelines }
}

fn make_card(org: &Org, kind: &str, now: Millis, ids: &mut Ids, rng: &mut ChaCha8Rng) -> CardDoc {
    let mut created = now - rng.random_range(0..365 * 86_400_000i64);
    // One card in ten on a week boundary: many cards share a createdAt, so the _id tie-break of
    // the board order is exercised.
    if rng.random_bool(0.1) {
        created -= created.rem_euclid(7 * 86_400_000);
    }
    let first = *FIRST.choose(rng).expect("names");
    let last = *LAST.choose(rng).expect("names");
    let phones = (0..rng.random_range(1..=3))
        .map(|i| Phone {
            value: Some(format!("+1{:03}{:07}", rng.random_range(200..999), rng.random_range(0..10_000_000))),
            kind: Some(["mobile", "work", "home"][i % 3].to_string()),
        })
        .collect();
    let active = org.pipeline(kind, true);
    let r: f64 = rng.random();
    // 80% on the active pipeline, 8% on the inactive one, 12% legacy without pipelineId.
    let pipeline = if r < 0.88 {
        if r < 0.80 {
            active
        } else {
            org.pipeline(kind, false)
        }
    } else {
        active
    };
    let stage = pipeline.stages.as_ref().expect("stages").choose(rng).expect("stage").clone();
    let legacy_stage = rng.random_bool(0.1);
    // 2%: neither a stage nor a status (on no board column at all).
    let stageless = rng.random_bool(0.02);
    let user = |rng: &mut ChaCha8Rng| org.users.choose(rng).expect("users").id.clone();
    let mut custom = serde_json::Map::new();
    custom.insert("industry".into(), json!(INDUSTRIES.choose(rng).expect("industries")));
    custom.insert("budget".into(), json!(rng.random_range(1..100) * 500));
    custom.insert("vip".into(), json!(rng.random_bool(0.1)));
    CardDoc {
        id: ids.id(created, rng),
        org_id: org.id.clone(),
        first_name: Some(first.to_string()),
        last_name: Some(last.to_string()),
        full_name: Some(format!("{first} {last}")),
        phone_numbers: Some(phones),
        source: Some(SOURCES.choose(rng).expect("sources").to_string()),
        created_by: Some(user(rng)),
        owner: if rng.random_bool(0.8) { Some(user(rng)) } else { None },
        pipeline_id: if r < 0.88 { Some(pipeline.id.clone()) } else { None },
        pipeline_stage: if legacy_stage || stageless { None } else { Some(stage.id.clone()) },
        status: if stageless { None } else { stage.name.clone() },
        is_bulk_sms: Some(rng.random_bool(0.15)),
        created_at: if rng.random_bool(0.01) { None } else { Some(created) },
        updated_at: Some(created),
        custom_fields: Some(custom),
        version: Some(1),
        contact_id: None,
    }
}

/// One contact with its application, conversations and messages; some get a second version or
/// are deleted.
fn contact_with_everything(
    args: &SeedArgs,
    org: &Org,
    now: Millis,
    ids: &mut Ids,
    rng: &mut ChaCha8Rng,
    sink: &mut Sink,
    report: &mut SeedReport,
) -> anyhow::Result<()> {
    let t = sink.topics.clone();
    let contact = make_card(org, "Contact", now, ids, rng);
    let at = contact.created_at.unwrap_or(now);
    let env = envelope("contact.upserted", &org.id, at, ids, rng);
    sink.event(&t.topic_contacts, &contact.id, with(env, "contact", serde_json::to_value(&contact)?));
    let last = card_lifecycle(org, "Contact", &contact, now, ids, rng, sink)?;
    if let Some(c) = &last {
        sink.doc("contacts", board_mongo::card_to_bson(c));
        report.contacts += 1;
    }

    if rng.random_bool(args.applications.clamp(0.0, 1.0)) {
        let mut app = make_card(org, "Application", now, ids, rng);
        app.contact_id = Some(contact.id.clone());
        app.source = None;
        let env = envelope("application.upserted", &org.id, at, ids, rng);
        sink.event(&t.topic_applications, &app.id, with(env, "application", serde_json::to_value(&app)?));
        if let Some(a) = card_lifecycle(org, "Application", &app, now, ids, rng, sink)? {
            sink.doc("applications", board_mongo::card_to_bson(&a));
            report.applications += 1;
        }
    }

    // Conversations: most contacts have one, some two; assignee sets change once for some.
    let convs = [0usize, 1, 1, 1, 2].choose(rng).copied().unwrap_or(1);
    let mut conv_ids = Vec::new();
    for _ in 0..convs {
        let pick = |rng: &mut ChaCha8Rng| {
            let n = rng.random_range(0..=3usize);
            let mut a: Vec<String> = org.users.choose_multiple(rng, n).map(|u| u.id.clone()).collect();
            a.sort();
            a
        };
        let mut conv = Conversation {
            id: ids.id(at, rng),
            org_id: org.id.clone(),
            contact_id: Some(contact.id.clone()),
            assignees: Some(pick(rng)),
            version: Some(1),
        };
        let env = envelope("conversation.upserted", &org.id, at, ids, rng);
        sink.event(&t.topic_conversations, &conv.id, with(env, "conversation", serde_json::to_value(&conv)?));
        if rng.random_bool(0.2) {
            conv.assignees = Some(pick(rng));
            conv.version = Some(2);
            let env = envelope("conversation.upserted", &org.id, at, ids, rng);
            sink.event(&t.topic_conversations, &conv.id, with(env, "conversation", serde_json::to_value(&conv)?));
        }
        sink.doc("conversations", board_mongo::conversation_to_bson(&conv));
        conv_ids.push(conv.id);
    }

    // Messages: Poisson-ish around the mean, only where there is a conversation.
    if !conv_ids.is_empty() {
        let n = (rng.random::<f64>() * 2.0 * args.messages).round() as usize;
        for _ in 0..n {
            let when = rng.random_range(at.min(now - 1)..now);
            let m = Message {
                id: ids.id(when, rng),
                org_id: org.id.clone(),
                contact_id: Some(contact.id.clone()),
                conversation_id: conv_ids.choose(rng).cloned(),
                direction: Some(if rng.random_bool(0.5) { "inbound" } else { "outbound" }.to_string()),
                created_at: Some(when),
            };
            let env = envelope("message.created", &org.id, when, ids, rng);
            sink.event(&t.topic_messages, &contact.id, with(env, "message", serde_json::to_value(&m)?));
            sink.doc("messages", board_mongo::message_to_bson(&m));
            report.messages += 1;
        }
    }
    Ok(())
}

/// Emits a second version (stage or owner moved) for 10% of cards and a delete for 2%. Returns
/// the state MongoDB holds at the end (None: deleted).
fn card_lifecycle(
    org: &Org,
    kind: &str,
    card: &CardDoc,
    now: Millis,
    ids: &mut Ids,
    rng: &mut ChaCha8Rng,
    sink: &mut Sink,
) -> anyhow::Result<Option<CardDoc>> {
    let t = sink.topics.clone();
    let (topic, field, deleted_type, id_field) = if kind == "Contact" {
        (t.topic_contacts.clone(), "contact", "contact.deleted", "contactId")
    } else {
        (t.topic_applications.clone(), "application", "application.deleted", "applicationId")
    };
    let r: f64 = rng.random();
    if r < 0.02 {
        let mut env = envelope(deleted_type, &org.id, now, ids, rng);
        env = with(env, id_field, json!(card.id));
        sink.event(&topic, &card.id, with(env, "version", json!(2)));
        return Ok(None);
    }
    if r < 0.12 {
        let mut moved = card.clone();
        let stages = org.pipeline(kind, true).stages.clone().unwrap_or_default();
        let stage = stages.choose(rng).expect("stage");
        moved.pipeline_id = Some(org.pipeline(kind, true).id.clone());
        moved.pipeline_stage = Some(stage.id.clone());
        moved.status = stage.name.clone();
        moved.owner = if rng.random_bool(0.7) { Some(org.users.choose(rng).expect("users").id.clone()) } else { None };
        moved.version = Some(2);
        moved.updated_at = Some(now);
        let env = envelope(&format!("{field}.upserted"), &org.id, now, ids, rng);
        sink.event(&topic, &card.id, with(env, field, serde_json::to_value(&moved)?));
        return Ok(Some(moved));
    }
    Ok(Some(card.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_profiles_scale() {
        assert_eq!("1x1000000, 20X50000".parse::<OrgSizes>(), Ok(OrgSizes(vec![(1, 1_000_000), (20, 50_000)])));
        for bad in ["", "20", "x5", "2x", "1x2,,3x4", "-1x5"] {
            assert!(bad.parse::<OrgSizes>().is_err(), "{bad:?}");
        }
        let saas = SeedArgs { profile: Some(Profile::Saas), ..SeedArgs::default() };
        assert_eq!(saas.groups(), [(1, 1_000_000, 24), (20, 50_000, 24), (2_000, 500, 24), (10_000, 20, 2)]);
        let total: usize = saas.groups().iter().map(|(o, c, _)| o * c).sum();
        assert_eq!(total, 3_200_000);
        let hundredth = SeedArgs { scale: 0.01, ..saas };
        assert_eq!(hundredth.groups(), [(1, 10_000, 24), (20, 500, 24), (2_000, 5, 2), (10_000, 1, 2)]);
        assert_eq!(SeedArgs::default().groups(), [(3, 2000, 24)], "--orgs x --contacts as before");
    }
}
