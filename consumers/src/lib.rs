//! The event projection side: a Kafka consumer group that applies CRM events to the Redis read
//! model, at least once, with offsets stored only after Redis acknowledged the writes.

pub mod apply;
pub mod batch;
pub mod config;
pub mod dead_letter;
pub mod events;
pub mod group_source;
pub mod group_watch;
pub mod kafka;
pub mod pipeline;
pub mod progress;
pub mod projector;
pub mod rewind;
pub mod signal;
pub mod state;

pub use kafka::KafkaConnection;
pub use projector::{run, ProjectorSettings, RunCounters};
