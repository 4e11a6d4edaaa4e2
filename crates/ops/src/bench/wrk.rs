//! `wrk` as the benchmarks' HTTP load: its Lua scripts and what its output says. Every script
//! ends with the same `done` hook printing one machine-readable line (`PB_WRK ...`), so no
//! benchmark parses wrk's human table.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// POSTs `$BODY` with `$TOKEN` (and `If-None-Match: $ETAG` when set, and the headers of
/// `$HEADERS`: `Name: value` pairs separated by `|`).
const POST: &str = r#"
wrk.method = "POST"
wrk.body = os.getenv("BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
if (os.getenv("ETAG") or "") ~= "" then wrk.headers["If-None-Match"] = os.getenv("ETAG") end
for name, value in string.gmatch(os.getenv("HEADERS") or "", "([^:|]+):%s*([^|]+)") do wrk.headers[name] = value end
"#;

/// POSTs `$BODY`, each request with the next token of `$TOKENS` (space-separated): requests
/// spread over several orgs.
const POST_ROUND_ROBIN: &str = r#"
local tokens, i = {}, 0
for t in string.gmatch(os.getenv("TOKENS"), "%S+") do tokens[#tokens + 1] = t end
request = function()
  i = i % #tokens + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. tokens[i]}, os.getenv("BODY"))
end
"#;

/// The one summary line every script prints at the end (latencies in microseconds).
const DONE: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("PB_WRK requests=%d errors=%d non2xx=%d seconds=%.3f bytes=%d p50=%d p99=%d p999=%d max=%d\n",
    summary.requests, e.connect + e.read + e.write + e.timeout, e.status, summary.duration / 1e6, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    Post,
    PostRoundRobin,
}

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    /// Socket errors and timeouts.
    pub errors: u64,
    pub non_2xx: u64,
    pub seconds: f64,
    /// Bytes read from the server, headers included.
    pub bytes: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
}

impl WrkResult {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    /// Bytes on the wire per response, headers included.
    pub fn bytes_per_request(&self) -> u64 {
        self.bytes / self.requests.max(1)
    }

    /// The summary line in `output`, if wrk printed one.
    pub fn parse(output: &str) -> Option<WrkResult> {
        let line = output.lines().find_map(|l| l.strip_prefix("PB_WRK "))?;
        let field = |name: &str| -> Option<&str> { line.split(' ').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')) };
        let int = |name: &str| field(name)?.parse::<u64>().ok();
        let us = |name: &str| int(name).map(Duration::from_micros);
        Some(WrkResult {
            requests: int("requests")?,
            errors: int("errors")?,
            non_2xx: int("non2xx")?,
            seconds: field("seconds")?.parse().ok()?,
            bytes: int("bytes")?,
            p50: us("p50")?,
            p99: us("p99")?,
            p999: us("p999")?,
            max: us("max")?,
        })
    }

    /// Errors as the tables show them (nothing when there were none).
    pub fn trouble(&self) -> String {
        match (self.non_2xx, self.errors) {
            (0, 0) => String::new(),
            (n, 0) => format!("non-2xx {n}"),
            (n, e) => format!("non-2xx {n}, errors {e}"),
        }
    }
}

/// Milliseconds with two decimals, as the tables print latencies.
pub fn ms(d: Duration) -> String {
    format!("{:.2}ms", d.as_secs_f64() * 1000.0)
}

/// A wrk invocation: `conns` connections for `seconds` against `url`, with the script's
/// environment in `env`.
pub struct Wrk<'a> {
    pub url: &'a str,
    pub conns: usize,
    pub duration: Duration,
    pub script: Script,
    pub env: Vec<(&'a str, String)>,
    /// A request slower than this counts as a timeout (wrk's own default, 2 s, when `None`).
    pub timeout: Option<Duration>,
}

impl Wrk<'_> {
    fn command(&self, script: &Path) -> Command {
        let mut cmd = Command::new("wrk");
        cmd.args(["-t", if self.conns > 1 { "2" } else { "1" }])
            .args(["-c", &self.conns.to_string()])
            .args(["-d", &format!("{}s", self.duration.as_secs().max(1))])
            .args(self.timeout.map(|t| format!("--timeout={}s", t.as_secs().max(1))))
            .arg("-s")
            .arg(script)
            .arg(self.url)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        super::harness::stopped_with_parent(&mut cmd);
        cmd
    }

    /// Runs to the end and parses the summary.
    pub fn run(&self) -> anyhow::Result<WrkResult> {
        let script = ScriptFile::write(self.script)?;
        let out = self.command(&script.0).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        WrkResult::parse(&text).ok_or_else(|| anyhow::anyhow!("wrk printed no summary: {text} {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// Starts in the background (stopped with `Background::stop`).
    pub fn start(&self) -> anyhow::Result<Background> {
        let script = ScriptFile::write(self.script)?;
        let child = self.command(&script.0).spawn()?;
        Ok(Background { child: Some(child), _script: script })
    }
}

/// A wrk running in the background; killed if dropped before `stop`.
pub struct Background {
    child: Option<Child>,
    _script: ScriptFile,
}

impl Background {
    /// Interrupts wrk (SIGINT: it prints its summary) and parses what it measured.
    pub fn stop(mut self) -> anyhow::Result<WrkResult> {
        let child = self.child.take().expect("running");
        super::harness::interrupt(child.id());
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        WrkResult::parse(&text).ok_or_else(|| anyhow::anyhow!("wrk printed no summary: {text}"))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The script on disk for wrk, removed when dropped.
struct ScriptFile(PathBuf);

impl ScriptFile {
    fn write(script: Script) -> anyhow::Result<ScriptFile> {
        let body = match script {
            Script::Post => POST,
            Script::PostRoundRobin => POST_ROUND_ROBIN,
        };
        let path = std::env::temp_dir().join(format!("pb-wrk-{}-{}.lua", std::process::id(), rand::random::<u32>()));
        std::fs::write(&path, format!("{body}{DONE}"))?;
        Ok(ScriptFile(path))
    }
}

impl Drop for ScriptFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_is_read_among_wrks_own_output() {
        let out = "Running 8s test @ http://127.0.0.1:1/api/contacts\n  2 threads and 32 connections\n\
                   PB_WRK requests=8000 errors=2 non2xx=5 seconds=8.000 bytes=16000000 p50=1500 p99=12000 p999=20000 max=31000\n";
        let r = WrkResult::parse(out).unwrap();
        assert_eq!((r.requests, r.errors, r.non_2xx), (8000, 2, 5));
        assert_eq!((r.rps(), r.bytes_per_request()), (1000.0, 2000));
        assert_eq!((r.p50, r.p99, r.max), (Duration::from_micros(1500), Duration::from_millis(12), Duration::from_millis(31)));
        assert_eq!(ms(r.p50), "1.50ms");
        assert_eq!(r.trouble(), "non-2xx 5, errors 2");
        assert_eq!(WrkResult::parse("Running 8s test\n"), None, "no summary, no result");
    }

    #[test]
    fn every_script_ends_with_the_summary_hook() {
        for s in [Script::Post, Script::PostRoundRobin] {
            let f = ScriptFile::write(s).unwrap();
            let text = std::fs::read_to_string(&f.0).unwrap();
            assert!(text.contains("PB_WRK requests="));
            let path = f.0.clone();
            drop(f);
            assert!(!path.exists(), "removed when dropped");
        }
    }
}
