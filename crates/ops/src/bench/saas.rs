//! `bench run saas` (deploy/saas-bench.sh): the many-org shape (issue 19). `seed --profile saas`
//! (1 × 1M + 20 × 50k + 2,000 × 500 + 10,000 × 20 contacts, times `--scale`), events only; then
//! seed and ingest rates, Redis bytes per card, the first index board of each size class cold and
//! warm, a sweep of every org's index board (the API's RSS and index bytes after it, against
//! `INDEX_MEMORY_LIMIT`), the first boards again in a second API instance (cold: read from the
//! index images the first stored), board p50/p99 per size class at 1 and 32 connections, a small
//! org's p99 while 16 connections hammer the big org's worst board, and while one mid-size org
//! is rebuilt (`rebuild --org`).
use super::harness::{redis_used_memory, run_measured, Api, BenchRun};
use super::wrk::{ms, Script, Wrk, WrkResult};
use crate::seed::{OrgSizes, Profile, SeedArgs};
use board_redis::functions::image::{image_head_cmd, ImageHead};
use std::time::{Duration, Instant};

/// The index board every measurement asks (team: answered by the in-memory index).
const TEAM_BOARD: &str = r#"{"size":25,"ownerFilter":"team"}"#;
/// The big org's worst board: a one-character search over every card.
const WORST_BOARD: &str = r#"{"size":25,"search":"a"}"#;

/// Orgs of one size, each with a user's token.
struct SizeClass {
    label: String,
    contacts: usize,
    orgs: Vec<(String, String)>,
}

pub async fn run(
    r: &mut BenchRun,
    scale: f64,
    sizes: Option<OrgSizes>,
    seconds: u64,
    index_memory_limit: Option<String>,
) -> anyhow::Result<()> {
    let profile = if sizes.is_some() { "--sizes" } else { "--profile saas" };
    let seed = SeedArgs { profile: Some(Profile::Saas), sizes, scale, no_mongo: true, quiet: false, ..SeedArgs::default() };
    let groups = seed.groups();
    r.report.line(format!(
        "== seed {profile} --scale {scale}: {} (events only)",
        groups.iter().map(|(o, c, _)| format!("{o} x {c}")).collect::<Vec<_>>().join(" + ")
    ));
    let mut redis = r.redis().await?;
    let memory0 = redis_used_memory(&mut redis).await?;
    let seeded = r.seed(seed).await?;

    r.report.line("== ingest: pipeline-board project --exit-when-caught-up");
    let usage = r.project_until_caught_up(&[]).await?;
    r.report.line(format!(
        "{} events in {:.1} s: {:.0} events/s; projector {:.1} s CPU",
        seeded.events,
        usage.wall,
        seeded.events as f64 / usage.wall.max(1e-9),
        usage.user + usage.system
    ));
    let mut classes = Vec::new();
    let mut orgs = seeded.org_ids.iter();
    for (count, contacts, _) in &groups {
        let mut class = SizeClass { label: format!("{count} x {contacts}"), contacts: *contacts, orgs: Vec::new() };
        for org in orgs.by_ref().take(*count) {
            let user = r.user_of(org).await?;
            class.orgs.push((org.clone(), r.token(org, &user)));
        }
        classes.push(class);
    }
    let mut total_cards = 0;
    for org in &seeded.org_ids {
        total_cards += r.cards_of(org).await?;
    }
    let grown = redis_used_memory(&mut redis).await?.saturating_sub(memory0);
    r.report.line(format!(
        "redis used_memory grew by {} MiB for {total_cards} cards: {} bytes per card",
        grown >> 20,
        grown / total_cards.max(1)
    ));

    let env: Vec<(&str, String)> = index_memory_limit.iter().map(|l| ("INDEX_MEMORY_LIMIT", l.clone())).collect();
    let api = r.start_api(&env).await?;
    r.report.line(format!(
        "== the API (INDEX_MEMORY_LIMIT {}): {:.0} MiB RSS at start",
        index_memory_limit.as_deref().unwrap_or("default"),
        api.rss_mib()
    ));
    first_boards(r, &api, &classes, "== first index board (team) per size class: cold (loads the org's index from its records) | warm (the next one); median / max of up to 5 orgs").await?;
    image_boards(r, &env, &classes).await?;
    sweep(r, &api, &classes).await?;
    per_class(r, &api, &classes, Duration::from_secs(seconds)).await?;
    fairness(r, &api, &classes, Duration::from_secs(seconds)).await?;
    rebuild_one_org(r, &api, &classes, Duration::from_secs(seconds)).await?;
    r.report.line(format!("== after the run: the API {:.0} MiB RSS; {}", api.rss_mib(), index_metrics(&api).await?));
    Ok(())
}

/// A board's time until it is answered 200 (asked again after a `503 timeout`, as a client
/// would: a cold org's index load goes on past one request's deadline), its route and how many
/// 503s came first.
async fn timed_board(api: &Api, token: &str, body: &str) -> anyhow::Result<(Duration, String, usize)> {
    let started = Instant::now();
    let mut refused = 0;
    loop {
        let v = api.board_json(token, body).await?;
        if let Some(route) = v["meta"]["route"].as_str() {
            return Ok((started.elapsed(), route.to_string(), refused));
        }
        anyhow::ensure!(
            v["error"]["code"] == "timeout" && started.elapsed() < Duration::from_secs(120),
            "not answered: {}",
            v.to_string().chars().take(300).collect::<String>()
        );
        refused += 1;
    }
}

/// The first index board of up to 5 orgs of each class, cold (the org's index loaded by it) and
/// then warm: medians and maxima.
async fn first_boards(r: &BenchRun, api: &Api, classes: &[SizeClass], title: &str) -> anyhow::Result<()> {
    r.report.line(title);
    for c in classes {
        let (mut cold, mut warm, mut refused) = (Vec::new(), Vec::new(), 0);
        for (org, token) in c.orgs.iter().take(5) {
            let (t, route, timeouts) = timed_board(api, token, TEAM_BOARD).await?;
            anyhow::ensure!(route == "index", "org {org}: answered by {route}");
            cold.push(t);
            refused += timeouts;
            warm.push(timed_board(api, token, TEAM_BOARD).await?.0);
        }
        let refused = if refused > 0 { format!(" ({refused} x 503 timeout before the first answer)") } else { String::new() };
        r.report.line(format!("{:<14} cold {} | warm {}{refused}", c.label, median_max(&mut cold), median_max(&mut warm)));
    }
    Ok(())
}

/// The same first boards in a second API instance, which has loaded nothing: orgs of
/// `INDEX_IMAGE_MIN_CARDS` or more read the images the first instance stored (waited for here:
/// it stores them after its loads), smaller ones are built from their records again.
async fn image_boards(r: &mut BenchRun, env: &[(&str, String)], classes: &[SizeClass]) -> anyhow::Result<()> {
    let mut redis = r.redis().await?;
    let started = Instant::now();
    let mut sizes = Vec::new();
    for c in classes.iter().filter(|c| c.contacts >= board_api::query::index_cache::DEFAULT_IMAGE_MIN_CARDS) {
        for (org, _) in c.orgs.iter().take(5) {
            let keys = r.keys().org(org);
            loop {
                let head = ImageHead::from_reply(image_head_cmd(&keys).query_async(&mut redis).await?);
                if let Some(ImageHead { bytes, .. }) = head {
                    sizes.push(format!("{}: {} MiB ({} bytes a card)", c.label, bytes >> 20, bytes / c.contacts as u64));
                    break;
                }
                anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "org {org}: no index image stored");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    sizes.dedup_by(|a, b| a.split(':').next() == b.split(':').next());
    r.report.line(format!("index images stored by the first instance: {}", sizes.join(", ")));
    let second = r.start_api(env).await?;
    first_boards(
        r,
        &second,
        classes,
        "== the same in a second API instance: cold (orgs of 5,000 cards or more read the image the first stored) | warm",
    )
    .await?;
    r.stop(second.pid).await;
    Ok(())
}

/// `rebuild --org` of one mid-size org (its topics replayed from the beginning into a new
/// generation, then switched) while small orgs' boards are measured: their p99 during the
/// rebuild against alone, and the generations after it.
async fn rebuild_one_org(r: &BenchRun, api: &Api, classes: &[SizeClass], duration: Duration) -> anyhow::Result<()> {
    let (Some(mid), Some(small)) = (
        classes.iter().find(|c| (10_000..500_000).contains(&c.contacts)),
        classes.iter().find(|c| c.contacts < 1000 && c.contacts >= 100).or(classes.last()),
    ) else {
        return Ok(());
    };
    let (org, token) = &mid.orgs[0];
    r.report
        .line(format!("== rebuild --org of one {} org: {} boards at 1 connection, alone and during the rebuild", mid.label, small.label));
    let url = api.contacts_url();
    warm_up(api, small.orgs.iter().take(50)).await?;
    let alone = class_wrk(&url, small, 1, duration).run()?;
    // Its own thread: the measurement below blocks this one.
    let rebuild = std::thread::spawn({
        let cmd = r.command(&["rebuild", "--org", org, "--metrics-addr", ""]);
        move || run_measured(cmd)
    });
    let during = class_wrk(&url, small, 1, duration).run()?;
    let (out, usage) = rebuild.join().map_err(|_| anyhow::anyhow!("the rebuild's thread panicked"))??;
    r.report.line(format!("{:<30} {:>9} {:>9} {:>9} {:>9}", "", "boards/s", "p50", "p99", "max"));
    r.report.line(row("small orgs alone", &alone));
    r.report.line(row("small orgs during the rebuild", &during));
    r.report.line(format!(
        "small orgs' p99 during the rebuild: {:.2}x their p99 alone; the rebuild: {:.1} s ({usage}): {}",
        during.p99.as_secs_f64() / alone.p99.as_secs_f64().max(1e-9),
        usage.wall,
        out.lines().last().unwrap_or_default()
    ));
    let mut redis = r.redis().await?;
    let pointers = redis.scan_match(&r.keys().generation_pointer("*")).await?;
    let (t, route, _) = timed_board(api, token, TEAM_BOARD).await?;
    r.report.line(format!(
        "orgs that read another generation than the base one: {} (the rebuilt org: {}); its next team board: {} by {route}",
        pointers.len(),
        pointers.iter().any(|p| p.contains(org.as_str())),
        super::wrk::ms(t)
    ));
    Ok(())
}

fn median_max(v: &mut [Duration]) -> String {
    v.sort();
    match (v.get(v.len().saturating_sub(1) / 2), v.last()) {
        (Some(m), Some(x)) => format!("{} / {}", ms(*m), ms(*x)),
        _ => "-".into(),
    }
}

/// Every org's index board, 8 at a time: the API's memory after it.
async fn sweep(r: &BenchRun, api: &Api, classes: &[SizeClass]) -> anyhow::Result<()> {
    let all: Vec<&(String, String)> = classes.iter().flat_map(|c| &c.orgs).collect();
    let started = Instant::now();
    let mut failures = 0;
    for chunk in all.chunks(8) {
        let answers = futures::future::join_all(chunk.iter().map(|(_, token)| api.board(token, TEAM_BOARD))).await;
        failures += answers.iter().filter(|a| !matches!(a, Ok((200, _, _)))).count();
    }
    r.report.line(format!(
        "== sweep: one index board of each of the {} orgs in {:.1} s ({failures} not 200); the API {:.0} MiB RSS; {}",
        all.len(),
        started.elapsed().as_secs_f64(),
        api.rss_mib(),
        index_metrics(api).await?
    ));
    Ok(())
}

/// The index gauges and counters of the API's `/metrics`.
async fn index_metrics(api: &Api) -> anyhow::Result<String> {
    let text = reqwest::get(format!("{}/metrics", api.base)).await?.text().await?;
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    };
    let (bytes, cards) = (value("pb_index_bytes"), value("pb_index_cards"));
    Ok(format!(
        "indexes: {} orgs, {cards:.0} cards, {:.1} MiB ({:.0} bytes per card), evictions {:.0}",
        value("pb_index_orgs"),
        bytes / 1048576.0,
        bytes / cards.max(1.0),
        value("pb_index_evictions_total")
    ))
}

/// `conns` connections of the team board spread over up to 50 orgs of the class.
fn class_wrk<'a>(api_url: &'a str, c: &SizeClass, conns: usize, duration: Duration) -> Wrk<'a> {
    let tokens: Vec<&str> = c.orgs.iter().take(50).map(|(_, t)| t.as_str()).collect();
    Wrk {
        url: api_url,
        conns,
        duration,
        script: Script::PostRoundRobin,
        env: vec![("TOKENS", tokens.join(" ")), ("BODY", TEAM_BOARD.to_string())],
        timeout: Some(Duration::from_secs(10)),
    }
}

fn row(label: &str, w: &WrkResult) -> String {
    format!("{label:<30} {:>9.0} {:>9} {:>9} {:>9}{}", w.rps(), ms(w.p50), ms(w.p99), ms(w.max), w.trouble())
}

async fn per_class(r: &BenchRun, api: &Api, classes: &[SizeClass], duration: Duration) -> anyhow::Result<()> {
    r.report.line(format!(
        "== team board per size class (wrk, {} s, over up to 50 orgs of the class, their indexes loaded first)",
        duration.as_secs()
    ));
    r.report.line(format!("{:<30} {:>9} {:>9} {:>9} {:>9}", "class, connections", "boards/s", "p50", "p99", "max"));
    let url = api.contacts_url();
    for c in classes {
        warm_up(api, c.orgs.iter().take(50)).await?;
        for conns in [1, 32] {
            let w = class_wrk(&url, c, conns, duration);
            let result = w.run()?;
            r.report.line(row(&format!("{} ({} contacts), {conns}", c.label, c.contacts), &result));
        }
    }
    Ok(())
}

/// One index board of each org (answered, after its load): the measurement that follows
/// times warm boards.
async fn warm_up(api: &Api, orgs: impl Iterator<Item = &(String, String)>) -> anyhow::Result<()> {
    for (_, token) in orgs {
        timed_board(api, token, TEAM_BOARD).await?;
    }
    Ok(())
}

/// A small org's p99 alone, then while 16 connections ask the big org's worst board.
async fn fairness(r: &BenchRun, api: &Api, classes: &[SizeClass], duration: Duration) -> anyhow::Result<()> {
    let (Some(big), Some(small)) = (classes.first(), classes.iter().find(|c| c.contacts < 1000 && c.contacts >= 100).or(classes.last()))
    else {
        return Ok(());
    };
    r.report.line(format!(
        "== fair sharing: {} boards at 1 connection, alone and while 16 connections ask the big org {WORST_BOARD}",
        small.label
    ));
    let url = api.contacts_url();
    warm_up(api, big.orgs.iter().take(1).chain(small.orgs.iter().take(50))).await?;
    let alone = class_wrk(&url, small, 1, duration);
    let alone = alone.run()?;
    let hammer = Wrk {
        url: &url,
        conns: 16,
        duration: duration * 3,
        script: Script::Post,
        env: vec![("TOKEN", big.orgs[0].1.clone()), ("BODY", WORST_BOARD.to_string())],
        timeout: Some(Duration::from_secs(10)),
    }
    .start()?;
    let during = class_wrk(&url, small, 1, duration);
    let during = during.run()?;
    let hammered = hammer.stop()?;
    r.report.line(format!("{:<30} {:>9} {:>9} {:>9} {:>9}", "", "boards/s", "p50", "p99", "max"));
    r.report.line(row("small orgs alone", &alone));
    r.report.line(row("small orgs while hammered", &during));
    r.report.line(row("the big org's worst board, 16", &hammered));
    r.report.line(format!(
        "small orgs' p99 while the big org is hammered: {:.2}x their p99 alone",
        during.p99.as_secs_f64() / alone.p99.as_secs_f64().max(1e-9)
    ));
    Ok(())
}
