//! The rules of pipeline-board, without I/O: what the source-of-truth documents look like
//! (`model`), how events are parsed (`events`), the Redis key model (`keys`), how a card is laid
//! out in the read model (`card`, `record`), text folding for search (`text`), time (`time`) and
//! Kafka offsets as the projection records them (`offsets`), board order (`order`) and version
//! supersession (`version`). Every other crate builds on it.

pub mod card;
pub mod events;
pub mod keys;
pub mod model;
pub mod offsets;
pub mod order;
pub mod record;
pub mod text;
pub mod time;
pub mod version;
