//! Structured logs: `LOG_FORMAT=text|json`, level from `RUST_LOG` (default info), on stderr;
//! coloured only when stderr is a terminal (piped into a file or a collector, colour codes are
//! noise).
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    // A second init (tests) is harmless: try_init just reports that one exists.
    let _ = if format == "json" { builder.json().try_init() } else { builder.try_init() };
}
