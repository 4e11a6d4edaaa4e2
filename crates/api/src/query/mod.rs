//! Answering `POST /api/contacts`: request parsing, the shared board plan, and the two data
//! paths (the Redis projection and MongoDB) that must give identical answers.
pub mod board;
pub mod card_json;
pub mod error;
pub mod index;
pub mod index_cache;
pub mod mongo_path;
pub mod projection;
pub mod request;
pub mod walk_pool;
