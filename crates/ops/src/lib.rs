//! pipeline-board's operator commands, kept out of the serving processes: `rebuild` (a new
//! generation from the topics or MongoDB, switched org by org), `verify` (the projection diffed
//! against MongoDB), `dlq` (dead letters listed and replayed), `seed` (a reproducible data set)
//! and `bench` (the benchmarks' Rust side).

pub mod bench;
pub mod cli;
pub mod dlq;
pub mod rebuild;
pub mod seed;
pub mod verify;
