//! Which generation holds an org now: read from its pointer before any read of its keys.
use board_model::keys::{Generation, KeySpace, OrgKeys};

/// `keyspace.live_org(conn, org)`: the org's keys in the generation its pointer names (absent:
/// the base generation); a pointer that names no generation is an error, never a guess.
pub trait LiveOrg {
    fn live_org<C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
        org_id: &str,
    ) -> impl std::future::Future<Output = redis::RedisResult<OrgKeys>> + Send;
}

impl LiveOrg for KeySpace {
    async fn live_org<C: redis::aio::ConnectionLike + Send>(&self, conn: &mut C, org_id: &str) -> redis::RedisResult<OrgKeys> {
        let name: Option<String> = redis::cmd("GET").arg(self.generation_pointer(org_id)).query_async(conn).await?;
        let name = name.unwrap_or_default();
        let generation = Generation::parse(&name).ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "not a generation",
                format!("{}: {name:?}", self.generation_pointer(org_id)),
            ))
        })?;
        Ok(self.org_in(&generation, org_id))
    }
}
