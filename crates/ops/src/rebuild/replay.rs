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
    /// Next offset per partition (what is applied).
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
        let watermarks = progress::Watermarks::new(kafka)?;
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
    /// re-measured while it runs).
    pub(super) async fn until_caught_up(
        &mut self,
        applier: &mut RedisApplier,
        conn: &mut RedisConn,
        lease_lost: &AtomicBool,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        let mut ends = self.watermarks.fetch(&self.topics).await?;
        let initial_lag = self.lag(&ends);
        let bar = bar(initial_lag as u64, "replay: events");
        let mut last_report = Instant::now();
        let started = Instant::now();
        let mut read_here = 0u64;
        while self.lag(&ends) > 0 {
            ensure_not_lost(lease_lost)?;
            let mut batch = Vec::new();
            projector::kafka::fill_batch(&self.consumer, &mut batch, self.max_batch, Duration::from_millis(200), |m| m).await;
            let parsed: Vec<Option<Event>> =
                batch.iter().map(|m| m.payload().and_then(|p| parse_event(p).ok()).filter(|e| self.keep(e))).collect();
            let mut events = Vec::new();
            let mut positions = Vec::new();
            let mut orgs = BTreeSet::new();
            for (m, e) in batch.iter().zip(&parsed) {
                if let Some(e) = e {
                    orgs.insert(e.org_id().to_string());
                    events.push(e);
                    positions.push(Position { topic: m.topic(), partition: m.partition(), offset: m.offset() });
                }
            }
            let mut backoff = Duration::from_millis(100);
            let outcomes = loop {
                match applier.apply(&events, &positions).await {
                    Ok(o) => break o,
                    Err(e) => {
                        warn!(error = %e, "batch not applied; retrying");
                        ensure_not_lost(lease_lost)?;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            report.events_applied += outcomes.iter().filter(|o| **o == projector::batch::Outcome::Applied).count() as u64;
            report.events_read += batch.len() as u64;
            read_here += batch.len() as u64;
            for m in &batch {
                self.position.advance(m.topic(), m.partition(), m.offset());
            }
            // Recorded after the data (a rerun re-reads at most this batch, idempotently).
            let fields = self.position.fields();
            let mut pipe = redis::pipe();
            pipe.hset_multiple(&self.progress_key, &fields);
            if !orgs.is_empty() {
                pipe.sadd(self.keys.rebuild_orgs(&self.generation), orgs.iter().collect::<Vec<_>>());
            }
            pipe.query_async::<()>(conn).await?;
            bar.set_position(initial_lag.saturating_sub(self.lag(&ends)).max(0) as u64);
            if last_report.elapsed() > Duration::from_secs(2) {
                ends = self.watermarks.fetch(&self.topics).await?;
                let lag = self.lag(&ends);
                let rate = read_here as f64 / started.elapsed().as_secs_f64().max(1e-9);
                bar.set_length(bar.position() + lag as u64);
                bar.set_message(format!("lag {lag}"));
                RebuildProgress { lag, events_read: report.events_read as i64, events_per_second: Some(rate) }.show();
                let _: () = conn
                    .hset_multiple(
                        self.keys.rebuild_state(),
                        &[
                            (field::LAG, lag.to_string()),
                            (field::EVENTS_READ, report.events_read.to_string()),
                            (field::EVENTS_PER_SECOND, format!("{rate:.0}")),
                        ],
                    )
                    .await?;
                info!(generation = %self.generation, lag, events_read = report.events_read, events_per_second = rate as u64, "rebuild replay");
                last_report = Instant::now();
            }
        }
        bar.finish_and_clear();
        let _: () = conn.hset(self.keys.rebuild_state(), field::LAG, 0).await?;
        RebuildProgress { lag: 0, events_read: report.events_read as i64, events_per_second: None }.show();
        Ok(())
    }

    fn keep(&self, e: &Event) -> bool {
        self.filter.is_empty() || self.filter.contains(e.org_id())
    }
}
