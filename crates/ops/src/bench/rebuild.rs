//! `bench run rebuild` (deploy/rebuild-bench.sh): rebuild and self-healing at scale.
//! 1. seeds one org's events and projects them (the live projection);
//! 2. with a live projector and the API running and a client asking board (a) in a loop (wrk,
//!    one connection), runs `pipeline-board rebuild`: its time and CPU, and the client's
//!    latencies over the whole rebuild, switch included;
//! 3. FLUSHALL under the running projector and API: the time until the projection is whole again.
//!
//! FLUSHALL empties the whole Redis: run it where nothing else uses that Redis.
use super::harness::{board_summary, measured, BenchRun};
use super::wrk::{ms, Script, Wrk};
use board_redis::projection::Status;
use std::time::{Duration, Instant};

pub async fn run(r: &mut BenchRun, contacts: usize) -> anyhow::Result<()> {
    let (org, token) = super::page::seed_and_project_one_org(r, contacts).await?;
    let api = r.start_projector_and_api().await?;
    let body = r#"{"size":25}"#;
    r.report.line(format!("board (a) before: {}", board_summary(&api.board_json(&token, body).await?)));
    r.report.line("== rebuild of every org from the topics' beginning, while the projector runs and a client asks board (a) in a loop");
    let url = api.contacts_url();
    let client = Wrk {
        url: &url,
        conns: 1,
        duration: Duration::from_secs(3600),
        script: Script::Post,
        env: vec![("BODY", body.into()), ("TOKEN", token.clone())],
        timeout: Some(Duration::from_secs(10)),
    }
    .start()?;
    let (out, usage) = measured(r.command(&["rebuild", "--metrics-addr", ""])).await?;
    out.lines().filter(|l| l.starts_with("rebuilt")).for_each(|l| r.report.line(l));
    r.report.line(format!("rebuild process: {usage}"));
    let w = client.stop()?;
    r.report.line(format!(
        "client during the rebuild: {} boards, {} non-2xx or errors; latency p50 {}, p99 {}, p99.9 {}, max {}",
        w.requests,
        w.non_2xx + w.errors,
        ms(w.p50),
        ms(w.p99),
        ms(w.p999),
        ms(w.max)
    ));
    let mut redis = r.redis().await?;
    let generation: Option<String> = redis::AsyncCommands::get(&mut redis, r.keys().generation_pointer(&org)).await?;
    r.report.line(format!(
        "board (a) after: {}; generation {}",
        board_summary(&api.board_json(&token, body).await?),
        generation.unwrap_or_default()
    ));

    r.report.line("== FLUSHALL under the running projector and API");
    let _: () = redis::cmd("FLUSHALL").query_async(&mut redis).await?;
    let flushed = Instant::now();
    let mut seen: Option<String> = None;
    loop {
        if board_redis::projection::status(&mut redis, r.keys()).await.ok() == Some(Status::Whole) {
            break;
        }
        if seen.is_none() {
            // (This org is events only, not in MongoDB: the fallback shows through readiness.)
            if let Ok(v) = api.readiness().await {
                if v["status"] == "projection_not_ready" {
                    let projection = v["projection"].as_str().map(str::to_string).unwrap_or_else(|| v["projection"].to_string());
                    seen = Some(format!("readyz projection_not_ready {projection} after {:.2} s", flushed.elapsed().as_secs_f64()));
                }
            }
        }
        anyhow::ensure!(flushed.elapsed() < Duration::from_secs(3600), "not whole an hour after FLUSHALL");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    r.report.line(format!(
        "from FLUSHALL to a whole projection again: {:.1} s ({})",
        flushed.elapsed().as_secs_f64(),
        seen.as_deref().unwrap_or("readiness change not observed")
    ));
    r.report.line(format!("board (a) when whole: {}", board_summary(&api.board_json(&token, body).await?)));
    Ok(())
}
