//! `pb_union_page` (read-only): a page deep inside the union of a bucket's raw stage sets, in
//! board order, in work proportional to the page.

/// `FCALL_RO pb_union_page` over `sets` (one slot: the org's): the ids of ranks
/// [offset, offset + limit), with `min`/`max` the created range's ZCOUNT bounds (`-inf`/`+inf`
/// when none). Answers the ids.
pub fn union_page_cmd(sets: &[String], offset: u64, limit: u64, min: &str, max: &str) -> redis::Cmd {
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let mut cmd = super::call("FCALL_RO", "pb_union_page", &sets);
    cmd.arg(offset).arg(limit).arg(min).arg(max);
    cmd
}
