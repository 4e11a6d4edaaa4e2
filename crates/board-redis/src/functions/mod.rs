//! The projection's Redis Function library: every server-side script of pipeline-board lives in
//! `library.lua` (one library, loaded by every process at start and again by `fcall` when a
//! Redis restarted without its data lost it). One module per Function group, mini-redis style:
//! a typed request that builds its `FCALL` and a reply enum parsed from the Function's answer.
//!
//! A Function whose arguments or meaning change takes a new name: a process that finds it
//! missing loads this library over the older one a Redis still holds (an API instance does not
//! load the library at start: only when a call finds a Function missing).
//!
//! | Function | module | what |
//! |---|---|---|
//! | `pb_commit` | `commit` | one org's writes of one batch, if what was read still holds |
//! | `pb_switch` | `switch` | moves an org to another generation if it holds all the live one does |
//! | `pb_progress` | `progress` | consumer progress, while the projection is still the one Redis holds |
//! | `pb_state_start`, `pb_state_whole`, `pb_state_rewind` | `state` | the projection's state in `{meta}` |
//! | `pb_mark_raise` | `mark` | a primary's write mark, to notice a Redis gone back in time |
//! | `pb_lease_renew`, `pb_lease_release` | `lease` | the rebuild's lease |
//! | `pb_union_page` (read-only) | `union_page` | a deep page of a bucket spanning several stages |
//! | `pb_image_put_parts` | `image` | an org's index image, while the org reads its generation |
pub mod commit;
pub mod image;
pub mod lease;
pub mod mark;
pub mod progress;
pub mod state;
pub mod switch;
pub mod union_page;

pub use commit::{commit_writes, score_arg, Commit, CommitOutcome, Guard, Write, CHANGES_MAXLEN};
pub use progress::{progress_cmd, ProgressOutcome};
pub use switch::{switch_cmd, SwitchOutcome};

pub const LIBRARY: &str = include_str!("library.lua");

/// Loads (or replaces) the library. Idempotent; every projector and test calls it at start.
pub async fn load_library<C: redis::aio::ConnectionLike + Send>(conn: &mut C) -> redis::RedisResult<()> {
    redis::cmd("FUNCTION").arg("LOAD").arg("REPLACE").arg(LIBRARY).query_async::<String>(conn).await.map(|_| ())
}

/// The server has no such Function: it lost the library (a restart without persistence) or
/// holds an older one.
pub fn is_missing(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// Runs one Function call; when the server lacks the library, loads it and runs the call again.
pub async fn fcall<T: redis::FromRedisValue, C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if is_missing(&e) => {
            load_library(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// An `FCALL` (or `FCALL_RO`) of `name` with `keys`.
fn call(fcall: &str, name: &str, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(fcall);
    cmd.arg(name).arg(keys.len()).arg(keys);
    cmd
}

#[cfg(test)]
mod tests {
    /// Every Function a module calls is registered in the library (a typo would only show as
    /// "Function not found" against a server).
    #[test]
    fn every_function_called_is_registered() {
        for name in [
            "pb_commit",
            "pb_switch",
            "pb_progress",
            "pb_state_start",
            "pb_state_whole",
            "pb_state_rewind",
            "pb_mark_raise",
            "pb_lease_renew",
            "pb_lease_release",
            "pb_union_page",
            "pb_image_put_parts",
            "pb_image_put",
        ] {
            assert!(super::LIBRARY.contains(&format!("'{name}'")), "{name} is not registered in library.lua");
        }
    }
}
