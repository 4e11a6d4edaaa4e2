//! pipeline-board's Redis side: one connection type for a server or a cluster (`redis_conn`),
//! its flags (`config`), the Function library that applies events and switches generations
//! atomically (`functions`: every server-side script, one module per Function), which generation holds an org (`live`) and what
//! Redis says about the projection (`projection`) and what a rebuild keeps there
//! (`rebuild_state`). The projector, the API and the operator
//! commands all reach Redis through it.

pub mod config;
pub mod functions;
pub mod live;
pub mod projection;
pub mod rebuild_state;
pub mod redis_conn;

pub use live::LiveOrg;
