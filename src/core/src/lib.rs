//! Shared core of pipeline-board: what the source-of-truth documents look like, how events
//! are parsed, how a card is laid out in the Redis read model, and the Redis Function library
//! that applies events atomically. Both the projector (`consumers/`) and the API (`src/`) use it.

pub mod card;
pub mod config;
pub mod events;
pub mod functions;
pub mod keys;
pub mod model;
pub mod record;
pub mod redis_conn;
pub mod telemetry;
pub mod text;
pub mod time;
