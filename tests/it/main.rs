//! The integration tests: one binary (one link of rdkafka, mongodb and the rest), a module per
//! capability, all against the real stack `deploy/stack.sh up` starts (Kafka, Redis single and
//! cluster, FerretDB). Helpers live in `common`; each test's topics, keys and database are its
//! own and are removed when its `TestEnv` drops, pass or fail.
//!
//! Run one module: `cargo test --test it projection::`. `deploy/test.sh` runs the modules one
//! after another (each module's tests in parallel), so the heavy ones never overlap. The
//! stack-free tier is `cargo test --workspace --lib` (pure logic, seconds, no server).

mod common;

mod api;
mod benchmarks;
mod board_page;
mod bounded_work;
mod browser;
mod case_folding;
mod chaos;
mod cluster;
mod differential;
mod failures;
mod index_loads;
mod operations;
mod projection;
mod rebuild;
mod routing;
mod serving;
mod sparse_documents;
