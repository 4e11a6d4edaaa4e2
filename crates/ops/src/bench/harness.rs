//! What every benchmark run shares: its sandbox on the stack (`sandbox::Sandbox`: its own
//! topics, keys, group and database, removed at the end), the product's commands as child
//! processes of this binary (so the API's and the projector's CPU are theirs alone), CPU and
//! memory readings, the report printed as it goes and written into docs/benchmarks.md.
use crate::sandbox::{Sandbox, Stack};
use crate::seed::{SeedArgs, SeedReport};
use board_model::keys::KeySpace;
use board_model::model::CardKind;
use board_redis::redis_conn::RedisConn;
use redis::AsyncCommands;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The secret the run's tokens are signed with (the run's own API reads it).
const JWT_SECRET: &str = "bench-secret-not-for-production-0123456789";

/// One benchmark run.
pub struct BenchRun {
    pub sandbox: Sandbox,
    pub bin: PathBuf,
    pub report: Report,
    /// Background processes, stopped when the run ends however it ends.
    children: Vec<Child>,
    /// Keys the run wrote outside its sandbox's key space: (Redis URL, pattern), removed at the end.
    pub extra_keys: Vec<(String, String)>,
    /// Consumer groups the run used beside its sandbox's, removed at the end.
    pub extra_groups: Vec<String>,
    keep: bool,
}

impl BenchRun {
    /// A sandbox on the stack named `<what>-...` with topics of 4 partitions.
    pub async fn start(what: &str, keep: bool) -> anyhow::Result<BenchRun> {
        let sandbox = Sandbox::new(what, "bench", &Stack::from_env());
        sandbox.create_topics(4).await?;
        Ok(BenchRun {
            sandbox,
            bin: std::env::current_exe()?,
            report: Report::default(),
            children: Vec::new(),
            extra_keys: Vec::new(),
            extra_groups: Vec::new(),
            keep,
        })
    }

    /// A `pipeline-board` command in the run's sandbox (quiet logs, the run's token secret),
    /// stopped with the run even when the run itself is killed.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = self.sandbox.command(&self.bin, args);
        cmd.env("JWT_SECRET", JWT_SECRET).env("LOG_FORMAT", "text").env("RUST_LOG", "warn").stdin(Stdio::null());
        stopped_with_parent(&mut cmd);
        cmd
    }

    /// Runs a command to its end: its stdout, or an error with its stderr.
    pub fn output<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> anyhow::Result<String> {
        output_of(self.command(args))
    }

    /// Starts a command in the background, its output discarded; stopped when the run ends.
    /// Returns its pid.
    pub fn spawn(&mut self, mut cmd: Command) -> anyhow::Result<u32> {
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Stops one background process (SIGTERM: a graceful stop) and waits for it.
    pub async fn stop(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            terminate(pid);
            let _ = tokio::task::spawn_blocking(move || c.wait()).await;
        }
    }

    /// A token of `user` in `org`, signed for the run's API.
    pub fn token(&self, org: &str, user: &str) -> String {
        board_api::http::auth::sign_hs256(JWT_SECRET.as_bytes(), user, org, 86_400)
    }

    /// Seeds in-process into the run's topics (and database unless `no_mongo`).
    pub async fn seed(&self, args: SeedArgs) -> anyhow::Result<SeedReport> {
        let s = &self.sandbox;
        let started = Instant::now();
        let r = crate::seed::run(&args, &projector::KafkaConnection::new(&s.brokers), &s.topics, &s.mongo_uri, &s.mongo_db).await?;
        self.report.line(r.summary(started.elapsed()));
        Ok(r)
    }

    pub async fn redis(&self) -> anyhow::Result<RedisConn> {
        Ok(board_redis::config::redis_connection(&self.sandbox.redis_url).await?)
    }

    pub fn keys(&self) -> &KeySpace {
        &self.sandbox.keys
    }

    /// `pipeline-board project --exit-when-caught-up` to its end; prints its summary and
    /// returns its CPU.
    pub async fn project_until_caught_up(&self, extra_env: &[(&str, String)]) -> anyhow::Result<Usage> {
        let mut cmd = self.command(&["project", "--exit-when-caught-up", "--metrics-addr", ""]);
        cmd.envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())));
        let (out, usage) = measured(cmd).await?;
        for line in out.lines().filter(|l| l.starts_with("applied")) {
            self.report.line(line);
        }
        Ok(usage)
    }

    /// One org's contact and application cards in the projection.
    pub async fn cards_of(&self, org: &str) -> anyhow::Result<u64> {
        let mut conn = self.redis().await?;
        let o = self.keys().org(org);
        let contacts: u64 = conn.hlen(o.cards(CardKind::Contact)).await?;
        let applications: u64 = conn.hlen(o.cards(CardKind::Application)).await?;
        Ok(contacts + applications)
    }

    /// A user of `org` with teams when one has (so `team` means something), else any.
    pub async fn user_of(&self, org: &str) -> anyhow::Result<String> {
        let users: Vec<(String, String)> = self.redis().await?.hgetall(self.keys().org(org).users()).await?;
        users
            .iter()
            .find(|(_, teams)| teams != "[]")
            .or(users.first())
            .map(|(id, _)| id.clone())
            .ok_or_else(|| anyhow::anyhow!("org {org} has no users in the projection"))
    }

    /// Starts a projector and the API on a free port and waits until the API is ready.
    pub async fn start_projector_and_api(&mut self) -> anyhow::Result<Api> {
        self.spawn(self.command(&["project", "--metrics-addr", ""]))?;
        let api = self.start_api(&[]).await?;
        api.wait(Duration::from_secs(60), "/readyz").await?;
        Ok(api)
    }

    /// Starts `serve` on a free port (with `extra_env`) and waits until it is live.
    pub async fn start_api(&mut self, extra_env: &[(&str, String)]) -> anyhow::Result<Api> {
        let port = free_port()?;
        let mut cmd = self.command(&["serve", "--listen-addr", &format!("127.0.0.1:{port}")]);
        cmd.envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())));
        let pid = self.spawn(cmd)?;
        let api = Api { base: format!("http://127.0.0.1:{port}"), pid, http: reqwest::Client::new() };
        api.wait(Duration::from_secs(30), "/healthz").await?;
        Ok(api)
    }

    /// Stops the background processes and removes the run's data (unless kept).
    pub async fn finish(mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        if self.keep {
            eprintln!("kept: topics {}.*, keys {}, database {}", self.sandbox.name, self.sandbox.keys.pattern(), self.sandbox.mongo_db);
            return;
        }
        // Keys are many (a 1M org holds millions): a long bound.
        self.sandbox.remove(&[self.sandbox.redis_url.clone()], Duration::from_secs(600)).await;
        for (url, pattern) in &self.extra_keys {
            let _ = crate::sandbox::remove_keys(url, pattern).await;
        }
        self.sandbox.remove_groups(&self.extra_groups).await;
    }
}

impl Drop for BenchRun {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The run's API.
pub struct Api {
    pub base: String,
    pub pid: u32,
    http: reqwest::Client,
}

impl Api {
    pub fn contacts_url(&self) -> String {
        format!("{}/api/contacts", self.base)
    }

    async fn wait(&self, within: Duration, path: &str) -> anyhow::Result<()> {
        wait_answering(|| self.http.get(format!("{}{path}", self.base)), within).await
    }

    /// POST /api/contacts: the status, the ETag and the body.
    pub async fn board(&self, token: &str, body: &str) -> anyhow::Result<(u16, Option<String>, String)> {
        let r = self
            .http
            .post(self.contacts_url())
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let etag = r.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok((r.status().as_u16(), etag, r.text().await?))
    }

    /// A board's JSON.
    pub async fn board_json(&self, token: &str, body: &str) -> anyhow::Result<serde_json::Value> {
        let (status, _, text) = self.board(token, body).await?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("status {status}, not JSON ({e}): {}", text.chars().take(300).collect::<String>()))
    }

    /// GET /readyz's JSON (whatever its status).
    pub async fn readiness(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self.http.get(format!("{}/readyz", self.base)).send().await?.json().await?)
    }

    /// Resident memory of the API process.
    pub fn rss_mib(&self) -> f64 {
        rss_kib(self.pid) as f64 / 1024.0
    }
}

/// Waits until `request` (made anew for each try) answers with a success: a server just started.
pub async fn wait_answering(request: impl Fn() -> reqwest::RequestBuilder, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let asked = request();
        let what = asked.try_clone().and_then(|r| r.build().ok()).map(|r| format!("{} {}", r.method(), r.url())).unwrap_or_default();
        if asked.send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what} did not answer within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// "total N, answered by X" of a board, or what came instead.
pub fn board_summary(v: &serde_json::Value) -> String {
    match v.get("data").and_then(|d| d.as_object()) {
        Some(data) => {
            let total: u64 = data.values().filter_map(|b| b.get("total")?.as_u64()).sum();
            format!("total {total}, answered by {}", v["meta"]["answeredBy"].as_str().unwrap_or("?"))
        }
        None => format!("reply: {}", v.to_string().chars().take(300).collect::<String>()),
    }
}

/// The lines of a run: printed as they come, kept for docs/benchmarks.md.
#[derive(Default)]
pub struct Report {
    lines: std::sync::Mutex<Vec<String>>,
}

impl Report {
    pub fn line(&self, line: impl Into<String>) {
        let line = line.into();
        println!("{line}");
        self.lines.lock().expect("not poisoned").push(line);
    }

    /// Several lines (a command's output), each reported.
    pub fn lines(&self, text: &str) {
        text.lines().filter(|l| !l.trim().is_empty()).for_each(|l| self.line(l));
    }

    pub fn text(&self) -> String {
        self.lines.lock().expect("not poisoned").join("\n")
    }

    /// Writes the run into `doc` between `<!-- marker -->` and `<!-- /marker -->`.
    pub fn write_into(&self, doc: &std::path::Path, marker: &str, title: &str, command: &str) -> anyhow::Result<()> {
        let today = chrono::Utc::now().date_naive().to_string();
        let text = std::fs::read_to_string(doc).unwrap_or_default();
        std::fs::write(doc, with_section(&text, marker, &format!("{title} ({today})"), command, &self.text()))?;
        println!("written to {}", doc.display());
        Ok(())
    }
}

/// `doc` with the run between `<!-- marker -->` and `<!-- /marker -->` under `## title`
/// (replacing an earlier run there, or appended).
pub fn with_section(doc: &str, marker: &str, title: &str, command: &str, run: &str) -> String {
    let (start, end) = (format!("<!-- {marker} -->"), format!("<!-- /{marker} -->"));
    let block = format!("{start}\n## {title}\nOutput of `{command}`, verbatim:\n\n```\n{}\n```\n{end}", run.trim());
    match (doc.find(&start), doc.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{block}{}", &doc[..a], &doc[b + end.len()..]),
        _ => format!("{}\n\n{block}\n", doc.trim_end_matches('\n')),
    }
}

/// The machine and the build, the first line of every run.
pub async fn machine_line(redis: &mut RedisConn) -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .unwrap_or(0)
        >> 20;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let info: String = redis::cmd("INFO").arg("server").query_async(redis).await.unwrap_or_default();
    let version = info_field(&info, "redis_version").unwrap_or("?");
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("== machine: {cores} cores, {gib} GiB, {model}; redis {version}; commit {commit}")
}

/// A field of a Redis INFO reply.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

/// CPU seconds a Redis server has used so far (INFO cpu: user + system).
pub async fn redis_cpu(conn: &mut RedisConn) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    let f = |n: &str| info_field(&info, n).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(f("used_cpu_user") + f("used_cpu_sys"))
}

/// CPU seconds of the Redis servers at `urls` (one `redis://` each) so far.
pub async fn redis_cpu_of(urls: &[String]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for url in urls {
        total += redis_cpu(&mut board_redis::config::redis_connection(url).await?).await?;
    }
    Ok(total)
}

/// Bytes Redis holds (INFO memory: used_memory).
pub async fn redis_used_memory(conn: &mut RedisConn) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    Ok(info_field(&info, "used_memory").and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// CPU seconds (user + system) a live process has used so far.
pub fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// Resident memory of a live process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()).unwrap_or(0)
}

/// What a finished child process used (as `/usr/bin/time` reports it).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub user: f64,
    pub system: f64,
    pub max_rss_kib: u64,
    pub wall: f64,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} s user + {:.2} s system CPU, {} KiB max RSS, {:.2} s", self.user, self.system, self.max_rss_kib, self.wall)
    }
}

/// `run_measured` off the async workers (it waits for as long as the command runs).
pub async fn measured(cmd: Command) -> anyhow::Result<(String, Usage)> {
    tokio::task::spawn_blocking(move || run_measured(cmd)).await?
}

/// Runs `cmd` to its end: its stdout and what it used (wait4's accounting of that child).
pub fn run_measured(mut cmd: Command) -> anyhow::Result<(String, Usage)> {
    let started = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (stdout, stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = loop {
        // SAFETY: waits for our own child, writing into the two locals.
        let w = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
        if w < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break w;
    };
    if waited <= 0 {
        let error = std::io::Error::last_os_error();
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!("wait4 failed: {error}");
    }
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    anyhow::ensure!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{cmd:?} failed: {out}{err}");
    let usage = Usage {
        user: seconds(usage.ru_utime),
        system: seconds(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
        wall: started.elapsed().as_secs_f64(),
    };
    Ok((format!("{out}{err}"), usage))
}

/// A command's stdout, or an error with what it said.
pub fn output_of(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The child gets SIGTERM when the thread that started it ends (this process killed, or the
/// blocking thread that waits for it gone): a killed benchmark leaves no projector, API or wrk
/// behind.
pub fn stopped_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child being made.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// SIGINT (wrk prints its summary on it).
pub fn interrupt(pid: u32) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
}

/// SIGTERM (a graceful stop of the product's commands).
pub fn terminate(pid: u32) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}

/// A loopback port free now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_replaces_its_section_and_leaves_the_rest() {
        let doc = "# Benchmarks\n\ntext\n\n<!-- r -->\n## old\n```\nold run\n```\n<!-- /r -->\n\nafter\n";
        let new = with_section(doc, "r", "Run (2026-12-04)", "pipeline-board bench run x", "line 1\nline 2\n");
        assert!(new.starts_with("# Benchmarks\n\ntext\n\n<!-- r -->\n## Run (2026-12-04)\n"));
        assert!(new.contains("```\nline 1\nline 2\n```\n<!-- /r -->\n\nafter\n"));
        assert!(!new.contains("old run"));
        let appended = with_section("# B\n", "s", "S", "c", "x");
        assert_eq!(appended, "# B\n\n<!-- s -->\n## S\nOutput of `c`, verbatim:\n\n```\nx\n```\n<!-- /s -->\n");
    }

    #[test]
    fn info_fields_and_this_process_are_read() {
        assert_eq!(info_field("# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:2.25\r\n", "used_cpu_user"), Some("2.25"));
        assert_eq!(info_field("used_cpu_user_children:9\n", "used_cpu_user"), None);
        let pid = std::process::id();
        assert!(rss_kib(pid) > 0);
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(30) {}
        assert!(process_cpu(pid) > 0.0, "a busy loop shows as CPU");
    }

    #[test]
    fn a_child_is_measured_and_its_failure_reported() {
        let (out, usage) = run_measured({
            let mut c = Command::new("sh");
            c.args(["-c", "echo hi; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"]);
            c
        })
        .unwrap();
        assert_eq!(out.trim(), "hi");
        assert!(usage.user + usage.system > 0.0 && usage.max_rss_kib > 0);
        assert!(run_measured({
            let mut c = Command::new("sh");
            c.args(["-c", "exit 3"]);
            c
        })
        .is_err());
    }
}
