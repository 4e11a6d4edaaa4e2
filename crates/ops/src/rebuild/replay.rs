//! The replay of the topics into the generation being built, from the progress it holds.
use super::*;

/// The replay of the topics into the generation being built, from the progress it holds.
pub(super) struct Replay {
    consumer: StreamConsumer,
    /// One client for every look at the ends while replaying (it looks every 2 s).
    watermarks: progress::Watermarks,
    topics: Vec<String>,
    keys: KeySpace,
    generation: Generation,
    progress_key: String,
    filter: BTreeSet<String>,
    max_batch: usize,
    /// Next offset per partition read; each batch carries it as its checkpoint, recorded in
    /// Redis once the batch is applied.
    position: Checkpoint,
}

impl Replay {
    pub(super) async fn new(
        kafka: &KafkaConnection,
        keys: &KeySpace,
        generation: &Generation,
        topics: &[String],
        mut conn: RedisConn,
        filter: BTreeSet<String>,
        max_batch: usize,
    ) -> anyhow::Result<Replay> {
        let progress_key = keys.progress(&progress_group(generation));
        let held: HashMap<String, i64> = conn.hgetall(&progress_key).await?;
        let held = Checkpoint::from_fields(&held);
        // Taken again: a snapshot may have lasted long enough for retention to move the lows.
        let watermarks = progress::Watermarks::new(kafka);
        let marks = watermarks.fetch(topics).await?;
        let consumer: StreamConsumer = kafka
            .client_config(&[("group.id", "pipeline-board-rebuild"), ("enable.auto.commit", "false"), ("auto.offset.reset", "earliest")])
            .create()?;
        let mut tpl = TopicPartitionList::new();
        let mut position = Checkpoint::default();
        for ((t, p), (low, _)) in &marks {
            let at = held.get(t, *p).unwrap_or(*low).max(*low);
            tpl.add_partition_offset(t, *p, Offset::Offset(at))?;
            position.set(t, *p, at);
        }
        consumer.assign(&tpl)?;
        Ok(Replay {
            consumer,
            watermarks,
            topics: topics.to_vec(),
            keys: keys.clone(),
            generation: generation.clone(),
            progress_key,
            filter,
            max_batch,
            position,
        })
    }

    fn lag(&self, ends: &BTreeMap<(String, i32), (i64, i64)>) -> i64 {
        self.position.lag(ends)
    }

    /// Applies events until every partition is applied up to the ends measured now (and
    /// re-measured while it runs): the replay is the pipeline's source.
    pub(super) async fn until_caught_up(
        &mut self,
        applier: &mut RedisApplier,
        conn: &mut RedisConn,
        lease_lost: &CancellationToken,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        let ends = self.watermarks.fetch(&self.topics).await?;
        let initial_lag = self.lag(&ends);
        let max_batch = self.max_batch;
        let mut run = ReplayRun {
            bar: bar(initial_lag as u64, "replay: events"),
            initial_lag,
            ends,
            replay: self,
            conn,
            last_report: Instant::now(),
            started: Instant::now(),
            read_here: 0,
            read_before: report.events_read,
        };
        let counters = RunCounters::default();
        let drained = pipeline::drain(&mut run, &mut Sink::new(applier, &counters, max_batch), lease_lost.cancelled()).await?;
        ensure_not_lost(lease_lost)?;
        report.events_read += drained.read;
        report.events_applied += drained.applied;
        run.bar.finish_and_clear();
        let _: () = run.conn.hset(run.replay.keys.rebuild_state(), field::LAG, 0).await?;
        RebuildProgress { lag: 0, events_read: report.events_read as i64, events_per_second: None }.show();
        Ok(())
    }

    fn keep(&self, e: &Event) -> bool {
        self.filter.is_empty() || self.filter.contains(e.org_id())
    }
}

/// One `until_caught_up`: the replay as the pipeline's source, up to the ends it measures.
struct ReplayRun<'a> {
    replay: &'a mut Replay,
    conn: &'a mut RedisConn,
    /// The partitions' ends, measured again every 2 s while replaying.
    ends: BTreeMap<(String, i32), (i64, i64)>,
    initial_lag: i64,
    bar: ProgressBar,
    last_report: Instant,
    started: Instant,
    /// Records read by this run, and by the rebuild before it.
    read_here: u64,
    read_before: u64,
}

impl pipeline::Source for ReplayRun<'_> {
    async fn next_batch(&mut self, max: usize) -> anyhow::Result<Option<SourceBatch>> {
        if self.replay.lag(&self.ends) <= 0 {
            return Ok(None);
        }
        let mut records = Vec::new();
        projector::kafka::fill_batch(&self.replay.consumer, &mut records, max, Duration::from_millis(200), |m| m).await;
        let mut batch = SourceBatch { read: records.len() as u64, ..SourceBatch::default() };
        for m in &records {
            // Unparsable records were dead-lettered by the live projectors: skipped here.
            let event = m.payload().and_then(|p| parse_event(p).ok()).filter(|e| self.replay.keep(e));
            if let Some(event) = event {
                batch.push(event, Some(Origin { topic: m.topic().to_string(), partition: m.partition(), offset: m.offset() }));
            }
            self.replay.position.advance(m.topic(), m.partition(), m.offset());
        }
        batch.checkpoint = Some(self.replay.position.clone());
        Ok(Some(batch))
    }

    /// The replay's checkpoint (every record read, kept or skipped) and the orgs it wrote,
    /// recorded after their data; then, every 2 s, its progress.
    async fn applied(&mut self, batch: &SourceBatch, _outcomes: &[projector::batch::Outcome]) -> anyhow::Result<()> {
        let replay = &*self.replay;
        let orgs: BTreeSet<&str> = batch.events.iter().map(Event::org_id).collect();
        let mut pipe = redis::pipe();
        let checkpoint = batch.checkpoint.as_ref().expect("a replay's batches carry their checkpoint");
        pipe.hset_multiple(&replay.progress_key, &checkpoint.fields());
        if !orgs.is_empty() {
            pipe.sadd(replay.keys.rebuild_orgs(&replay.generation), orgs.iter().collect::<Vec<_>>());
        }
        pipe.query_async::<()>(self.conn).await?;
        self.read_here += batch.read;
        let read_total = self.read_before + self.read_here;
        self.bar.set_position(self.initial_lag.saturating_sub(replay.lag(&self.ends)).max(0) as u64);
        if self.last_report.elapsed() > Duration::from_secs(2) {
            self.ends = replay.watermarks.fetch(&replay.topics).await?;
            let lag = replay.lag(&self.ends);
            let rate = self.read_here as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            self.bar.set_length(self.bar.position() + lag as u64);
            self.bar.set_message(format!("lag {lag}"));
            RebuildProgress { lag, events_read: read_total as i64, events_per_second: Some(rate) }.show();
            let _: () = self
                .conn
                .hset_multiple(
                    replay.keys.rebuild_state(),
                    &[
                        (field::LAG, lag.to_string()),
                        (field::EVENTS_READ, read_total.to_string()),
                        (field::EVENTS_PER_SECOND, format!("{rate:.0}")),
                    ],
                )
                .await?;
            info!(generation = %replay.generation, lag, events_read = read_total, events_per_second = rate as u64, "rebuild replay");
            self.last_report = Instant::now();
        }
        Ok(())
    }
}
