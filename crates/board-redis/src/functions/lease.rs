//! The rebuild's lease (`KeySpace::rebuild_lease`): a string holding the holder's run id, with a
//! TTL. Taken with `SET NX PX`; renewed and released only by its holder.

/// `FCALL pb_lease_renew`: extends the lease by `ttl_ms` if `holder` still holds it. Answers
/// whether it did.
pub fn renew_cmd(lease: &str, holder: &str, ttl_ms: u64) -> redis::Cmd {
    let mut cmd = super::call("FCALL", "pb_lease_renew", &[lease]);
    cmd.arg(holder).arg(ttl_ms);
    cmd
}

/// `FCALL pb_lease_release`: deletes the lease if `holder` still holds it. Answers whether it
/// did.
pub fn release_cmd(lease: &str, holder: &str) -> redis::Cmd {
    let mut cmd = super::call("FCALL", "pb_lease_release", &[lease]);
    cmd.arg(holder);
    cmd
}
