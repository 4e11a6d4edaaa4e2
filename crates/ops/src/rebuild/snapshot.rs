//! `--source mongodb`: one org's documents, read from MongoDB, as the pipeline's source.
use super::phases::RunContext;
use super::*;

/// An org's documents as upserts, in the order a projection needs them (pipelines and users
/// before the cards that name them, conversations before messages).
struct MongoSnapshot {
    events: std::vec::IntoIter<Event>,
}

impl MongoSnapshot {
    async fn load(db: &mongodb::Database, org: &str) -> anyhow::Result<(MongoSnapshot, u64)> {
        let snap = board_mongo::load_org(db, org).await?;
        let mut events: Vec<Event> = Vec::new();
        events.extend(snap.pipelines.into_iter().map(Event::PipelineUpserted));
        events.extend(snap.users.into_iter().map(Event::UserUpserted));
        events.extend(snap.contacts.into_iter().map(|c| Event::CardUpserted(CardKind::Contact, Box::new(c))));
        events.extend(snap.applications.into_iter().map(|c| Event::CardUpserted(CardKind::Application, Box::new(c))));
        events.extend(snap.conversations.into_iter().map(Event::ConversationUpserted));
        events.extend(snap.messages.into_iter().map(Event::MessageCreated));
        let documents = events.len() as u64;
        Ok((MongoSnapshot { events: events.into_iter() }, documents))
    }
}

impl pipeline::Source for MongoSnapshot {
    async fn next_batch(&mut self, max: usize) -> anyhow::Result<Option<SourceBatch>> {
        let mut batch = SourceBatch::default();
        // Documents have no offsets: what they reflect is the snapshot's checkpoint, recorded
        // once the whole org is applied (`snapshot_org`).
        for event in self.events.by_ref().take(max) {
            batch.push(event, None);
        }
        batch.read = batch.events.len() as u64;
        Ok((!batch.events.is_empty()).then_some(batch))
    }

    async fn applied(&mut self, _batch: &SourceBatch, _outcomes: &[projector::batch::Outcome]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Applies one org's MongoDB documents into the generation as upserts, then sets the org's
/// applied offsets to `held` (the ends taken before the snapshot began: every event below
/// them is reflected in the documents). Returns the number of documents.
pub(super) async fn snapshot_org(
    ctx: &RunContext<'_>,
    applier: &mut RedisApplier,
    generation: &Generation,
    db: &mongodb::Database,
    org: &str,
    held: &BTreeMap<String, i64>,
) -> anyhow::Result<u64> {
    let keys = ctx.keys;
    let (mut source, documents) = MongoSnapshot::load(db, org).await?;
    let counters = RunCounters::default();
    pipeline::drain(&mut source, &mut Sink::new(applier, &counters, ctx.args.max_batch), ctx.lease_lost.cancelled()).await?;
    ensure_not_lost(ctx.lease_lost)?;
    let mut conn = applier.connection();
    let org_keys = keys.org_in(generation, org);
    let offsets: Vec<(String, i64)> = held.iter().map(|(f, o)| (f.clone(), *o)).collect();
    let commit = Commit { org: org_keys, guards: Vec::new(), writes: Vec::new(), generation: None, offsets, min_writes: None };
    let _: String = commit.to_cmd().query_async(&mut conn).await?;
    Ok(documents)
}
