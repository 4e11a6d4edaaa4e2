//! pipeline-board: the API service (coming with the query issue), the operator commands and the
//! adapters to the source of truth. The shared core lives in `src/core` (crate `board-core`), the
//! projection side in `consumers/`.

pub mod api;
pub mod bench;
pub mod dlq;
pub mod metrics_setup;
pub mod mongo;
pub mod query;
pub mod rebuild;
pub mod seed;
pub mod verify;

pub use board_core as core;
pub use pipeline_board_consumers as consumers;
