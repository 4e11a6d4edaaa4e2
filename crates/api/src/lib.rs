//! pipeline-board's read side: the board query (`query`: the request, the board plan, the
//! projection's sorted sets, the in-memory index and the MongoDB path) and the HTTP API that
//! serves it with its page (`http`), what it reports (`events`), plus the Prometheus exporter the
//! serving processes share.

pub mod events;
pub mod http;
pub mod metrics_setup;
pub mod query;
