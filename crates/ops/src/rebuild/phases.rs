//! The phase machine of one rebuild run: its context, how it begins (a resumed or a new plan),
//! and one method per phase (snapshot, replay, switch, cleanup), each returning the next.
use super::*;

/// What every phase of one rebuild run needs.
pub(super) struct RunContext<'a> {
    pub(super) args: &'a RebuildArgs,
    pub(super) keys: &'a KeySpace,
    pub(super) kafka: &'a KafkaConnection,
    pub(super) topics: &'a [String],
    pub(super) lease_lost: &'a CancellationToken,
}

/// How this run begins: the plan Redis holds (if any), whether it is resumed, what was asked.
pub(super) struct Start<'a> {
    pub(super) previous: Option<Plan>,
    /// The generation of an unfinished rebuild Redis holds, resumed or not (also when its plan
    /// is one this build cannot read: it is discarded, not leaked).
    pub(super) unfinished: Option<Generation>,
    pub(super) resume: bool,
    pub(super) orgs: &'a [String],
    pub(super) source: PlanSource,
}

/// The phase machine: each phase runs, then the plan moves to the next one and Redis records
/// it, so a run killed anywhere resumes in the phase it was in.
pub(super) async fn rebuild(ctx: &RunContext<'_>, conn: &mut RedisConn, start: Start<'_>) -> anyhow::Result<Report> {
    let started = Instant::now();
    if !ctx.args.metrics_addr.is_empty() {
        let addr: std::net::SocketAddr = ctx.args.metrics_addr.parse().context("--metrics-addr")?;
        if let Err(e) = board_api::metrics_setup::prometheus_builder().with_http_listener(addr).install() {
            warn!(error = %e, "rebuild metrics endpoint not started");
        }
    }
    let resumed = start.resume;
    let plan = begin(ctx, conn, start).await?;
    let applier =
        RedisApplier::connect(&ctx.args.redis.url(), ctx.keys.clone()).await?.with_target(Target::Building(plan.generation.clone()));
    let mut run = Phases {
        ctx,
        filter: plan.org_filter(),
        report: Report { generation: plan.generation.to_string(), resumed, ..Report::default() },
        plan,
        applier,
        replay: None,
    };
    loop {
        RebuildPhase::show(Some(run.plan.phase));
        let next = match run.plan.phase {
            RebuildPhase::Snapshot => run.snapshot(conn).await?,
            RebuildPhase::Replay => run.replay(conn).await?,
            RebuildPhase::Switch => run.switch(conn).await?,
            RebuildPhase::Cleanup => run.cleanup(conn).await?,
            RebuildPhase::Done => break,
        };
        run.plan.phase = next;
    }
    let mut report = run.report;
    report.total_seconds = started.elapsed().as_secs_f64();
    info!(summary = report.summary(), "rebuild finished");
    Ok(report)
}

/// The plan of this run: the resumed one, or a new one recorded with its replay's start (after
/// checking the topics still hold what the replay needs, and discarding an unfinished earlier
/// rebuild that is not resumed).
async fn begin(ctx: &RunContext<'_>, conn: &mut RedisConn, start: Start<'_>) -> anyhow::Result<Plan> {
    let keys = ctx.keys;
    let marks = progress::fetch_watermarks(ctx.kafka, ctx.topics).await?;
    if let (true, Some(p)) = (start.resume, &start.previous) {
        // Replayed from the offsets it holds: the topics must still hold what follows them
        // (a snapshot still in its snapshot phase replays from the ends it took).
        if p.phase <= RebuildPhase::Replay {
            let held: BTreeMap<String, i64> = conn.hgetall(keys.progress(&progress_group(&p.generation))).await?;
            let starts = Checkpoint::from_fields(&held);
            refuse_missing_history(&missing_history(&marks, &starts, true))?;
        }
        info!(generation = %p.generation, phase = %p.phase, "resuming the unfinished rebuild");
        return Ok(p.clone());
    }
    // The replay's start, checked against what the topics still hold before anything is
    // discarded or written.
    let starts: Checkpoint = match start.source {
        PlanSource::Mongodb => marks.iter().map(|(k, (_, high))| (k.clone(), *high)).collect(),
        PlanSource::TopicsFrom(t) => offsets_for_time(ctx.kafka, &marks, t)?,
        PlanSource::Topics => marks.iter().map(|(k, (low, _))| (k.clone(), *low)).collect(),
    };
    refuse_missing_history(&missing_history(&marks, &starts, start.source == PlanSource::Mongodb))?;
    if let Some(g) = &start.unfinished {
        let removed = discard(conn, keys, g).await?;
        info!(generation = %g, removed, "discarded the unfinished rebuild");
    }
    let plan = Plan {
        generation: Generation::numbered(board_model::time::now_millis() as u64),
        source: start.source,
        orgs: start.orgs.join(","),
        phase: start.source.first_phase(),
        started: board_model::time::now_millis(),
    };
    // The replay's start: recorded before anything is written, so a rerun knows it.
    let fields = starts.fields();
    let mut pipe = redis::pipe();
    pipe.atomic().del(keys.rebuild_state()).hset_multiple(keys.rebuild_state(), &plan.fields());
    // Kept for the switch: an org whose events in a partition all precede the start can never
    // be caught up by this generation.
    let start_fields: BTreeMap<String, i64> = fields.iter().cloned().collect();
    pipe.hset(keys.rebuild_state(), field::STARTS, serde_json::to_string(&start_fields)?);
    pipe.del(keys.progress(&progress_group(&plan.generation)));
    if !fields.is_empty() {
        pipe.hset_multiple(keys.progress(&progress_group(&plan.generation)), &fields);
    }
    pipe.query_async::<()>(conn).await?;
    info!(generation = %plan.generation, source = %plan.source, orgs = %plan.orgs, "rebuild started");
    Ok(plan)
}

/// One run's phases and what they share.
struct Phases<'a> {
    ctx: &'a RunContext<'a>,
    plan: Plan,
    /// The orgs asked for (empty: every org).
    filter: BTreeSet<String>,
    report: Report,
    applier: RedisApplier,
    /// The replay of the topics, made when a phase first needs it (the replay and the switch,
    /// which replays more for orgs still behind).
    replay: Option<Replay>,
}

impl Phases<'_> {
    /// Records the phase the run moves to.
    async fn enter(&self, conn: &mut RedisConn, phase: RebuildPhase) -> anyhow::Result<RebuildPhase> {
        let _: () = conn.hset(self.ctx.keys.rebuild_state(), field::PHASE, phase.name()).await?;
        Ok(phase)
    }

    async fn replay_ready(&mut self, conn: &RedisConn) -> anyhow::Result<&mut Replay> {
        if self.replay.is_none() {
            let (ctx, plan) = (self.ctx, &self.plan);
            let replay =
                Replay::new(ctx.kafka, ctx.keys, &plan.generation, ctx.topics, conn.clone(), self.filter.clone(), ctx.args.max_batch)
                    .await?;
            self.replay = Some(replay);
        }
        Ok(self.replay.as_mut().expect("made above"))
    }

    /// `--source mongodb`: every org's documents applied as upserts.
    async fn snapshot(&mut self, conn: &mut RedisConn) -> anyhow::Result<RebuildPhase> {
        let (ctx, keys) = (self.ctx, self.ctx.keys);
        let db = board_mongo::connect(&ctx.args.mongo.mongodb_uri, &ctx.args.mongo.mongodb_db).await?;
        let snapshot_orgs: Vec<String> =
            if self.filter.is_empty() { board_mongo::org_ids(&db).await? } else { self.filter.iter().cloned().collect() };
        let held: BTreeMap<String, i64> = conn.hgetall(keys.progress(&progress_group(&self.plan.generation))).await?;
        let bar = bar(snapshot_orgs.len() as u64, "snapshot: orgs");
        for org in &snapshot_orgs {
            ensure_not_lost(ctx.lease_lost)?;
            self.report.snapshot_documents +=
                snapshot::snapshot_org(ctx, &mut self.applier, &self.plan.generation, &db, org, &held).await?;
            let _: () = conn.sadd(keys.rebuild_orgs(&self.plan.generation), org).await?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        info!(orgs = snapshot_orgs.len(), documents = self.report.snapshot_documents, "snapshot applied");
        self.enter(conn, RebuildPhase::Replay).await
    }

    /// The topics replayed into the new generation up to their ends.
    async fn replay(&mut self, conn: &mut RedisConn) -> anyhow::Result<RebuildPhase> {
        let replay_started = Instant::now();
        self.replay_more(conn).await?;
        self.report.replay_seconds = replay_started.elapsed().as_secs_f64();
        self.enter(conn, RebuildPhase::Switch).await
    }

    async fn replay_more(&mut self, conn: &mut RedisConn) -> anyhow::Result<()> {
        let lease_lost = self.ctx.lease_lost;
        self.replay_ready(conn).await?;
        let replay = self.replay.as_mut().expect("made above");
        replay.until_caught_up(&mut self.applier, conn, lease_lost, &mut self.report).await
    }

    /// Each org's generation pointer moved, org by org, once the new generation holds every
    /// event its live one holds (replaying more for orgs still behind).
    async fn switch(&mut self, conn: &mut RedisConn) -> anyhow::Result<RebuildPhase> {
        let (ctx, keys) = (self.ctx, self.ctx.keys);
        let generation = self.plan.generation.clone();
        let switch_started = Instant::now();
        let built: BTreeSet<String> = conn.smembers(keys.rebuild_orgs(&generation)).await?;
        // An org asked for by name that the replay met no event of has nothing in the new
        // generation: it keeps its live one, and the run says so.
        for org in self.filter.iter().filter(|o| !built.contains(*o)) {
            warn!(org, "org not switched: the replay met none of its events");
            self.report.orgs_refused.push(format!("{org} (no event from the replay's start on)"));
        }
        let mut pending: Vec<String> = built.into_iter().filter(|o| self.filter.is_empty() || self.filter.contains(o)).collect();
        let starts: Option<String> = conn.hget(keys.rebuild_state(), field::STARTS).await?;
        let starts: BTreeMap<String, i64> = starts.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
        // A replay from a time holds only documents with an event since then: each org's
        // documents are compared with its live generation's before its switch.
        let from_a_time = matches!(self.plan.source, PlanSource::TopicsFrom(_));
        let not_switched = |org: &str| (OrgField::NotSwitched(org.to_string()).name(), generation.name().to_string());
        for round in 0.. {
            ensure_not_lost(ctx.lease_lost)?;
            let mut behind = Vec::new();
            for org in pending {
                let current: Option<String> = conn.get(keys.generation_pointer(&org)).await?;
                let current = Generation::parse(current.as_deref().unwrap_or_default()).unwrap_or_default();
                if current == generation {
                    continue;
                }
                if from_a_time {
                    match coverage_check(conn, keys, &org, &current, &generation).await? {
                        // Behind: `pb_switch` answers so too (nothing writes the new
                        // generation during a round, and the live one only moves on), and its
                        // answer tells a partition replay can bring from one it cannot.
                        Coverage::Complete | Coverage::Behind => {}
                        Coverage::Lacks(missing) => {
                            warn!(org, %missing, "org not switched: the replay from the time lacks a document its live generation holds");
                            self.report.orgs_refused.push(format!(
                                "{org} (its live generation holds {missing}, which had no event since --from: use --source mongodb)"
                            ));
                            let _: () = conn.hset(keys.rebuild_state(), not_switched(&org).0, not_switched(&org).1).await?;
                            continue;
                        }
                    }
                }
                let reply: String = fcall(conn, &switch_cmd(keys, &org, &current, &generation)).await?;
                match SwitchOutcome::parse(&reply) {
                    Some(SwitchOutcome::Switched) => {
                        let _: () = conn.hset(keys.rebuild_state(), OrgField::Left(org.clone()).name(), current.name()).await?;
                        self.report.orgs_switched += 1;
                    }
                    Some(SwitchOutcome::Behind(field)) => {
                        // Behind on events before the replay's start (`--from`): no replay
                        // brings them; the org keeps its live generation.
                        let live: Option<i64> = conn.hget(keys.org_in(&current, &org).offsets(), &field).await?;
                        match (live, starts.get(&field)) {
                            (Some(live), Some(start)) if live <= *start => {
                                warn!(org, field, live, start, "org not switched: its events in this partition precede the replay's start");
                                self.report.orgs_refused.push(format!("{org} ({field}: events before offset {start})"));
                                // Its keys in the new generation go with the cleanup.
                                let _: () = conn.hset(keys.rebuild_state(), not_switched(&org).0, not_switched(&org).1).await?;
                            }
                            _ => behind.push(org),
                        }
                    }
                    Some(SwitchOutcome::Moved(_)) => behind.push(org),
                    None => bail!("unexpected pb_switch reply {reply:?}"),
                }
            }
            if behind.is_empty() {
                break;
            }
            if round >= 30 {
                bail!("{} orgs stay behind their live generation after 30 rounds of replay; run again to resume", behind.len());
            }
            // The live projectors applied events the new generation has not read yet.
            self.replay_more(conn).await?;
            pending = behind;
        }
        self.replay = None;
        self.report.switch_seconds = switch_started.elapsed().as_secs_f64();
        // A snapshot of every org made the projection whole where the topics could not.
        if self.plan.source == PlanSource::Mongodb && self.filter.is_empty() {
            let _: () = conn.hdel(keys.state(), board_redis::projection::field::INCOMPLETE).await?;
        }
        let now = board_model::time::now_millis().to_string();
        let _: () = conn
            .hset_multiple(keys.rebuild_state(), &[(field::PHASE, RebuildPhase::Cleanup.name()), (field::SWITCHED_AT, now.as_str())])
            .await?;
        info!(generation = %generation, orgs = self.report.orgs_switched, seconds = self.report.switch_seconds, "switched");
        Ok(RebuildPhase::Cleanup)
    }

    /// The old generations' keys removed after the grace period (reads that resolved them
    /// finish first); then the rebuild's state.
    async fn cleanup(&mut self, conn: &mut RedisConn) -> anyhow::Result<RebuildPhase> {
        let (ctx, keys) = (self.ctx, self.ctx.keys);
        let switched_at: Option<i64> = conn.hget(keys.rebuild_state(), field::SWITCHED_AT).await?;
        let grace = ctx.args.grace_ms as i64;
        let wait = switched_at.map(|t| grace - (board_model::time::now_millis() - t)).unwrap_or(grace);
        if wait > 0 {
            info!(ms = wait, "waiting for reads of the old generation to finish");
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        let state: HashMap<String, String> = conn.hgetall(keys.rebuild_state()).await?;
        let fields: Vec<(OrgField, Generation)> =
            state.iter().filter_map(|(k, v)| Some((OrgField::parse(k)?, Generation::parse(v)?))).collect();
        // The generations orgs left at their switch, then the new generation's keys of orgs not
        // switched: for an org with both (refused by one run, switched by a resumed one), the
        // second wins, as it always did.
        let left = fields.iter().filter(|(f, g)| matches!(f, OrgField::Left(_)) && *g != self.plan.generation);
        let not_switched = fields.iter().filter(|(f, _)| matches!(f, OrgField::NotSwitched(_)));
        let old: HashMap<String, Generation> = left.chain(not_switched).map(|(f, g)| (f.org().to_string(), g.clone())).collect();
        self.report.keys_removed = remove_org_generations(conn, keys, &old).await?;
        let mut pipe = redis::pipe();
        let generation = &self.plan.generation;
        pipe.del(keys.rebuild_orgs(generation)).del(keys.progress(&progress_group(generation))).del(keys.rebuild_state());
        pipe.query_async::<()>(conn).await?;
        RebuildPhase::show(Some(RebuildPhase::Done));
        Ok(RebuildPhase::Done)
    }
}

/// What the coverage check before a `--from` switch found.
enum Coverage {
    /// The new generation holds every document of the live one.
    Complete,
    /// It lacks one, but has not applied every event the live one has yet: replay on.
    Behind,
    /// It lacks one although it applied every event the live one has: the document's events all
    /// precede the replay's start, no replay brings it.
    Lacks(coverage::Missing),
}

async fn coverage_check(conn: &mut RedisConn, keys: &KeySpace, org: &str, live: &Generation, new: &Generation) -> anyhow::Result<Coverage> {
    let (live_keys, new_keys) = (keys.org_in(live, org), keys.org_in(new, org));
    let Some(missing) = coverage::first_missing(conn, &live_keys, &new_keys).await? else {
        return Ok(Coverage::Complete);
    };
    // Read after the scan: the live generation's offsets then cover every document it scanned,
    // so a new generation at or past them has applied those documents' events, if any.
    let live_offsets: HashMap<String, i64> = conn.hgetall(live_keys.offsets()).await?;
    let new_offsets: HashMap<String, i64> = conn.hgetall(new_keys.offsets()).await?;
    let caught_up = live_offsets.iter().all(|(field, o)| new_offsets.get(field).is_some_and(|n| n >= o));
    Ok(if caught_up { Coverage::Lacks(missing) } else { Coverage::Behind })
}
