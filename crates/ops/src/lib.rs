//! pipeline-board's operator commands, kept out of the serving processes: `rebuild` (a new
//! generation from the topics or MongoDB, switched org by org), `verify` (the projection diffed
//! against MongoDB), `dlq` (dead letters listed and replayed), `seed` (a reproducible data set)
//! `bench` (the benchmarks' Rust side) and `keys`
//! (key names for scripts).

pub mod bench;
pub mod cli;
pub mod dlq;
pub mod keys;
pub mod rebuild;
pub mod sandbox;
pub mod seed;
pub mod verify;
