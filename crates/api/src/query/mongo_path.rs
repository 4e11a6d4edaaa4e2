//! The MongoDB path: the same answer computed from the source-of-truth collections. It answers
//! requests with `customFields`, and every request while the projection cannot. User input only
//! ever reaches a `$regex` escaped (it is matched literally).
use super::board::{self, BoardAnswer, BoardPlan, BucketAnswer, BucketSpec, CardOut};
use super::error::ApiError;
use super::request::{BoardQuery, CustomValue, MessageStatus, OwnerScope, TimeRange};
use board_model::model::{CardKind, Pipeline};
use board_model::order::MONGO_SORT;
use board_model::time::Millis;
use board_mongo::{card_from_bson, pipeline_from_bson};
use bson::{doc, Bson, DateTime, Document};
use futures::TryStreamExt;
use mongodb::options::{CountOptions, FindOptions};
use mongodb::Database;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

const OP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum MongoPathError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("mongodb: {0}")]
    Unavailable(String),
    /// The filter needs more contact ids than the path may hold (`max_ids`): answering would
    /// mean an unbounded `$in` list.
    #[error("the filter matches more than {0} contacts")]
    TooBroad(usize),
}

impl From<mongodb::error::Error> for MongoPathError {
    fn from(e: mongodb::error::Error) -> Self {
        MongoPathError::Unavailable(e.to_string())
    }
}

type Result<T> = std::result::Result<T, MongoPathError>;

#[derive(Clone)]
pub struct MongoReader {
    db: Database,
    /// Most contact ids one filter may collect for an `$in`/`$nin` (bounded memory, and far
    /// below MongoDB's 16 MB document limit: 100,000 ids are ~2.6 MB).
    max_ids: usize,
}

/// The default of `max_ids`.
pub const DEFAULT_MAX_IDS: usize = 100_000;

fn find_opts() -> FindOptions {
    FindOptions::builder().max_time(OP_TIMEOUT).build()
}

/// Escapes every regex metacharacter: the term is matched as literal text, case-insensitively.
fn literal_regex(term: &str) -> Bson {
    Bson::Document(doc! {"$regex": regex::escape(term), "$options": "i"})
}

fn date(ms: Millis) -> Bson {
    Bson::DateTime(DateTime::from_millis(ms))
}

fn range_doc(r: &TimeRange) -> Document {
    let mut d = Document::new();
    if let Some(s) = r.start {
        d.insert("$gte", date(s));
    }
    if let Some(e) = r.end {
        d.insert("$lte", date(e));
    }
    d
}

fn str_list(v: impl IntoIterator<Item = String>) -> Bson {
    Bson::Array(v.into_iter().map(Bson::String).collect())
}

/// The request's custom-field conditions, one per field: a string is a case-insensitive
/// literal substring, a number or a boolean an equality (CONTRACT.md 3).
fn custom_field_conditions(fields: &[(String, CustomValue)]) -> Document {
    let mut d = Document::new();
    for (key, v) in fields {
        let path = format!("customFields.{key}");
        match v {
            CustomValue::Text(s) => d.insert(path, literal_regex(s)),
            CustomValue::Number(n) => d.insert(path, *n),
            CustomValue::Bool(b) => d.insert(path, *b),
        };
    }
    d
}

impl MongoReader {
    pub fn new(db: Database, max_ids: usize) -> Self {
        MongoReader { db, max_ids }
    }

    async fn docs(&self, coll: &str, filter: Document, projection: Option<Document>) -> Result<Vec<Document>> {
        let mut opts = find_opts();
        opts.projection = projection;
        Ok(self.db.collection::<Document>(coll).find(filter).with_options(opts).await?.try_collect().await?)
    }

    pub async fn pipelines(&self, org: &str) -> Result<Vec<Pipeline>> {
        Ok(self.docs("pipelines", doc! {"orgId": org}, None).await?.iter().map(pipeline_from_bson).collect())
    }

    /// Contact ids that have a conversation with any of `users` assigned.
    async fn contacts_assigned_to(&self, org: &str, users: &[String]) -> Result<Vec<String>> {
        self.distinct_contacts("conversations", doc! {"orgId": org, "assignees": {"$in": str_list(users.to_vec())}}).await
    }

    /// The distinct contact ids of the documents of `coll` that match `filter`: at most
    /// `max_ids` of them, read as a stream of a `$group` limited to one more than that, so
    /// neither this process nor MongoDB ever builds an unbounded list.
    async fn distinct_contacts(&self, coll: &str, filter: Document) -> Result<Vec<String>> {
        let pipeline = vec![doc! {"$match": filter}, doc! {"$group": {"_id": "$contactId"}}, doc! {"$limit": (self.max_ids + 1) as i64}];
        let opts = mongodb::options::AggregateOptions::builder().max_time(OP_TIMEOUT).build();
        let cursor = self.db.collection::<Document>(coll).aggregate(pipeline).with_options(opts).await?;
        self.bounded_ids(cursor).await
    }

    /// The `_id`s a cursor yields, at most `max_ids` (one more is `TooBroad`).
    async fn bounded_ids(&self, mut cursor: mongodb::Cursor<Document>) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            if let Ok(id) = d.get_str("_id") {
                ids.push(id.to_string());
            }
            if ids.len() > self.max_ids {
                return Err(MongoPathError::TooBroad(self.max_ids));
            }
        }
        Ok(ids)
    }

    /// Contact ids with at least one assignee on some conversation.
    async fn contacts_with_assignees(&self, org: &str) -> Result<Vec<String>> {
        self.distinct_contacts("conversations", doc! {"orgId": org, "assignees.0": {"$exists": true}}).await
    }

    /// Contact ids with a message (whose createdAt meets `created`, if given). Messages without
    /// `createdAt` do not count (CONTRACT.md 2).
    async fn contacts_with_messages(&self, org: &str, created: Option<Document>) -> Result<Vec<String>> {
        let created = created.unwrap_or_else(|| doc! {"$type": "date"});
        self.distinct_contacts("messages", doc! {"orgId": org, "createdAt": created}).await
    }

    async fn team_members(&self, org: &str, user: &str) -> Result<Vec<String>> {
        let me = self.docs("users", doc! {"orgId": org, "_id": user}, None).await?;
        let teams: Vec<String> = me
            .first()
            .and_then(|d| d.get_array("teamIds").ok())
            .map(|a| a.iter().filter_map(|b| b.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if teams.is_empty() {
            return Ok(Vec::new());
        }
        let members = self.docs("users", doc! {"orgId": org, "teamIds": {"$in": str_list(teams)}}, Some(doc! {"_id": 1})).await?;
        Ok(members.iter().filter_map(|d| d.get_str("_id").ok().map(str::to_string)).collect())
    }

    /// The conditions every card of the board must meet, besides its bucket.
    async fn filter_conditions(&self, org: &str, user: &str, q: &BoardQuery, now: Millis) -> Result<Vec<Document>> {
        let f = &q.filters;
        // Messages and conversations belong to the contact: an application's is its contactId.
        let cid = match q.kind {
            CardKind::Contact => "_id",
            CardKind::Application => "contactId",
        };
        let mut and = Vec::new();
        if let Some(term) = &f.search {
            let re = literal_regex(term);
            and.push(doc! {"$or": [
                {"firstName": re.clone()}, {"lastName": re.clone()}, {"fullName": re.clone()},
                // A dotted path, not `$elemMatch`: one condition on an array of sub-documents
                // means the same on MongoDB, and FerretDB answers `$elemMatch` there with nothing.
                {"phoneNumbers.value": re},
            ]});
        }
        if let Some(s) = &f.source {
            and.push(doc! {"source": s});
        }
        let people = match &f.owner {
            OwnerScope::All => None,
            OwnerScope::Mine => Some(vec![user.to_string()]),
            OwnerScope::Team => Some(self.team_members(org, user).await?),
            OwnerScope::Users(u) => Some(u.clone()),
            OwnerScope::Unassigned => {
                let assigned = self.contacts_with_assignees(org).await?;
                and.push(doc! {"owner": {"$in": [Bson::Null]}, cid: {"$nin": str_list(assigned)}});
                None
            }
        };
        if let Some(users) = people {
            let contacts = self.contacts_assigned_to(org, &users).await?;
            and.push(doc! {"$or": [
                {"createdBy": {"$in": str_list(users.clone())}},
                {"owner": {"$in": str_list(users)}},
                {cid: {"$in": str_list(contacts)}},
            ]});
        }
        if let Some(a) = &f.assignees {
            let contacts = self.contacts_assigned_to(org, a).await?;
            and.push(doc! {cid: {"$in": str_list(contacts)}});
        }
        if let Some(r) = &f.created {
            and.push(doc! {"createdAt": range_doc(r)});
        }
        if f.bulk_only {
            and.push(doc! {"isBulkSms": true});
        }
        match f.message_status {
            MessageStatus::All => {}
            MessageStatus::Answered => and.push(doc! {cid: {"$in": str_list(self.contacts_with_messages(org, None).await?)}}),
            MessageStatus::Unanswered => and.push(doc! {cid: {"$nin": str_list(self.contacts_with_messages(org, None).await?)}}),
        }
        if let Some(d) = f.quiet_for {
            let recent = self.contacts_with_messages(org, Some(doc! {"$gte": date(now - d)})).await?;
            and.push(doc! {cid: {"$nin": str_list(recent)}});
        }
        if let Some(r) = &f.messaged_in {
            let inside = self.contacts_with_messages(org, Some(range_doc(r))).await?;
            and.push(doc! {cid: {"$in": str_list(inside)}});
        }
        if !f.custom_fields.is_empty() {
            and.push(custom_field_conditions(&f.custom_fields));
        }
        Ok(and)
    }

    /// The ids of the cards of `q`'s kind whose custom fields match `q`'s (the projection
    /// computes the rest of the board among them): one query of `_id`s, at most `max_ids`.
    pub async fn custom_field_ids(&self, org: &str, q: &BoardQuery) -> Result<Vec<String>> {
        let mut filter = doc! {"orgId": org};
        // At the filter's root, not under `$and`: FerretDB pushes root equalities down to
        // PostgreSQL (an `$and` it evaluates itself, document by document).
        filter.extend(custom_field_conditions(&q.filters.custom_fields));
        let opts = FindOptions::builder()
            .projection(doc! {"_id": 1})
            .limit((self.max_ids + 1) as i64)
            .batch_size(10_000)
            .max_time(OP_TIMEOUT)
            .build();
        let cursor = self.db.collection::<Document>(q.kind.collection()).find(filter).with_options(opts).await?;
        self.bounded_ids(cursor).await
    }

    fn bucket_filter(org: &str, plan: &BoardPlan, bucket: &BucketSpec, conditions: &[Document]) -> Option<Document> {
        let stage = bucket.stage.as_ref()?;
        let pid = &plan.pipeline.id;
        let in_pipeline = if plan.includes_legacy {
            doc! {"$or": [{"pipelineId": pid}, {"pipelineId": {"$in": [Bson::Null]}}]}
        } else {
            doc! {"pipelineId": pid}
        };
        let in_stage = match &stage.name {
            Some(name) => doc! {"$or": [
                {"pipelineStage": &stage.id},
                {"pipelineStage": {"$in": [Bson::Null]}, "status": name},
            ]},
            None => doc! {"pipelineStage": &stage.id},
        };
        let mut and = vec![in_pipeline, in_stage];
        and.extend(conditions.iter().cloned());
        Some(doc! {"orgId": org, "$and": and})
    }

    pub async fn answer(&self, org: &str, user: &str, q: &BoardQuery, now: Millis) -> Result<BoardAnswer> {
        let pipelines = self.pipelines(org).await?;
        let plan = board::plan(&pipelines, q)?;
        let conditions = self.filter_conditions(org, user, q, now).await?;
        let coll = self.db.collection::<Document>(q.kind.collection());
        let mut buckets = Vec::with_capacity(plan.buckets.len());
        for b in &plan.buckets {
            let (total, docs) = match Self::bucket_filter(org, &plan, b, &conditions) {
                None => (0, Vec::new()),
                Some(filter) => {
                    let count_opts = CountOptions::builder().max_time(OP_TIMEOUT).build();
                    let total = coll.count_documents(filter.clone()).with_options(count_opts).await?;
                    let docs: Vec<Document> = if b.limit == 0 {
                        Vec::new()
                    } else {
                        let opts = FindOptions::builder()
                            .sort(MONGO_SORT.iter().map(|(field, dir)| (field.to_string(), Bson::Int32(*dir))).collect::<Document>())
                            .skip(b.offset)
                            .limit(b.limit as i64)
                            .max_time(OP_TIMEOUT)
                            .build();
                        coll.find(filter).with_options(opts).await?.try_collect().await?
                    };
                    (total, docs)
                }
            };
            let cards: Vec<_> = docs.iter().map(card_from_bson).collect();
            let cards = self.with_derived(org, q.kind, cards).await?;
            buckets.push(BucketAnswer { name: b.name.clone(), stage_id: b.stage.as_ref().map(|s| s.id.clone()), total, cards });
        }
        Ok(BoardAnswer { kind: q.kind, buckets })
    }

    /// Adds the assignee union and the last message time of each card's contact.
    async fn with_derived(&self, org: &str, kind: CardKind, cards: Vec<board_model::model::CardDoc>) -> Result<Vec<CardOut>> {
        let cid_of = |c: &board_model::model::CardDoc| kind.shown_contact(&c.id, c.contact_id.as_deref()).map(str::to_string);
        let cids: Vec<String> = cards.iter().filter_map(cid_of).collect::<HashSet<_>>().into_iter().collect();
        let mut assignees: HashMap<String, BTreeSet<String>> = HashMap::new();
        let mut last: HashMap<String, Millis> = HashMap::new();
        if !cids.is_empty() {
            for d in self.docs("conversations", doc! {"orgId": org, "contactId": {"$in": str_list(cids.clone())}}, None).await? {
                if let (Ok(c), Ok(a)) = (d.get_str("contactId"), d.get_array("assignees")) {
                    assignees.entry(c.to_string()).or_default().extend(a.iter().filter_map(|b| b.as_str().map(str::to_string)));
                }
            }
            // The latest message per contact, computed here from a projected find: FerretDB's
            // `$group` has only `$sum` and `$count`, no `$max`.
            let filter = doc! {"orgId": org, "contactId": {"$in": str_list(cids)}};
            for d in self.docs("messages", filter, Some(doc! {"contactId": 1, "createdAt": 1})).await? {
                if let (Ok(c), Ok(t)) = (d.get_str("contactId"), d.get_datetime("createdAt")) {
                    let e = last.entry(c.to_string()).or_insert(t.timestamp_millis());
                    *e = (*e).max(t.timestamp_millis());
                }
            }
        }
        Ok(cards
            .into_iter()
            .map(|doc| {
                let cid = cid_of(&doc);
                CardOut {
                    assignees: cid.as_ref().and_then(|c| assignees.get(c)).map(|s| s.iter().cloned().collect()).unwrap_or_default(),
                    last_message_at: cid.as_ref().and_then(|c| last.get(c)).copied(),
                    doc,
                }
            })
            .collect())
    }
}
