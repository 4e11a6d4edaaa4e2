//! `bench run page` (deploy/board-bench.sh): the board page at scale.
//! - the time from the API's answer to the rendered board in headless Chromium (the page's
//!   performance marks; 5 loads), then one idle open board's requests per minute and 304 share;
//! - the server's cost of a column poll answered 304 against one answered 200 (wrk, 1 and 32
//!   connections), with the API's and Redis' CPU per poll, to size 1,000 open boards.
use super::harness::{process_cpu, redis_cpu, BenchRun};
use super::wrk::{ms, Script, Wrk};
use crate::seed::SeedArgs;
use std::time::Duration;

/// One org of `contacts` contacts (~3 messages each, events only), projected until caught up:
/// the org and a token of one of its users.
pub async fn seed_and_project_one_org(r: &mut BenchRun, contacts: usize) -> anyhow::Result<(String, String)> {
    let seeded = r.seed(SeedArgs { orgs: 1, contacts, messages: 3.0, no_mongo: true, quiet: true, ..SeedArgs::default() }).await?;
    let org = seeded.org_ids[0].clone();
    r.report.line("== the projection: pipeline-board project --exit-when-caught-up");
    r.project_until_caught_up(&[]).await?;
    let user = r.user_of(&org).await?;
    let token = r.token(&org, &user);
    Ok((org, token))
}

pub async fn run(r: &mut BenchRun, contacts: usize, idle_seconds: u64) -> anyhow::Result<()> {
    let mut version = std::process::Command::new("chromium");
    version.arg("--version");
    let chromium = super::harness::output_of(version).unwrap_or_default();
    r.report.line(format!("== browser: {}", chromium.trim()));
    let (_, token) = seed_and_project_one_org(r, contacts).await?;
    let api = r.start_projector_and_api().await?;
    r.report
        .line(format!("== the page in headless Chromium: 5 loads of the board, then the board left open and idle for {idle_seconds} s"));
    let mut node = std::process::Command::new("node");
    node.arg("tests/browser/measure.mjs").env("BOARD_URL", &api.base).env("TOKEN", &token).env("IDLE_SECONDS", idle_seconds.to_string());
    let measured: serde_json::Value = serde_json::from_str(&super::harness::output_of(node)?)?;
    for l in measured["loads"].as_array().into_iter().flatten() {
        r.report.line(format!(
            "load: API answer {:.1} ms (fetch), rendering {:.1} ms; {} columns, {} cards",
            l["answerMs"].as_f64().unwrap_or(f64::NAN),
            l["renderMs"].as_f64().unwrap_or(f64::NAN),
            l["columns"],
            l["cards"]
        ));
    }
    r.report.line(format!(
        "idle open board: {} polls in {} s = {:.0} requests/minute; statuses {}; {:.1}% answered 304",
        measured["polls"],
        measured["idleSeconds"],
        measured["perMinute"].as_f64().unwrap_or(f64::NAN),
        measured["statuses"],
        100.0 * measured["share304"].as_f64().unwrap_or(f64::NAN)
    ));

    r.report.line("== one column poll: 200 (no If-None-Match) against 304 (the current ETag), wrk 10 s each");
    let first = api.board_json(&token, r#"{"size":1}"#).await?;
    let stage = first["data"].as_object().and_then(|d| d.keys().next().cloned()).ok_or_else(|| anyhow::anyhow!("no stage: {first}"))?;
    let body = format!(r#"{{"size":25,"stages":["{stage}"]}}"#);
    let etag = api.board(&token, &body).await?.1.ok_or_else(|| anyhow::anyhow!("the column has no ETag"))?;
    let url = api.contacts_url();
    let mut redis = r.redis().await?;
    for conns in [1, 32] {
        for etag in ["", etag.as_str()] {
            let (api0, redis0) = (process_cpu(api.pid), redis_cpu(&mut redis).await?);
            let w = Wrk {
                url: &url,
                conns,
                duration: Duration::from_secs(10),
                script: Script::Post,
                env: vec![("BODY", body.clone()), ("TOKEN", token.clone()), ("ETAG", etag.to_string())],
                timeout: None,
            }
            .run()?;
            let (api_s, redis_s) = (process_cpu(api.pid) - api0, redis_cpu(&mut redis).await? - redis0);
            let per = |s: f64| s * 1e6 / w.requests.max(1) as f64;
            r.report.line(format!(
                "{:<4} conns {conns:>2}: {:.0} req/s, p50 {}, p99 {}; API {:.0} us CPU/poll, Redis {:.0} us CPU/poll {}",
                if etag.is_empty() { "200" } else { "304" },
                w.rps(),
                ms(w.p50),
                ms(w.p99),
                per(api_s),
                per(redis_s),
                w.trouble()
            ));
        }
    }
    Ok(())
}
