//! What an org's in-memory index costs, measured by a counting allocator (this test binary's
//! only test, so nothing else allocates meanwhile): the bytes `OrgIndex::bytes` accounts (the
//! API's index budget, `INDEX_MEMORY_LIMIT`, is enforced on them) must be what the index really
//! holds, and a card of seed-like shape must cost at most 250 bytes (issue 19).
use board_api::query::index::OrgIndex;
use board_model::model::{CardDoc, CardKind, Phone};
use board_model::record::{CardRecord, Derived};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const FIRST: &[&str] = &["Jane", "John", "Maria", "José", "Zoë", "Łukasz", "Søren", "Aisha", "Chen", "Fatima", "Liam", "Olivia"];
const LAST: &[&str] = &["Doe", "Smith", "García", "Müller", "Nakamura", "O'Brien", "Kowalski", "Okafor", "Ivanova", "Rossi"];

/// A small deterministic generator (the shapes of `seed`'s cards: names, 1-3 phones, owner and
/// creator among 24 users, 10 stages, 5 sources, some assignees and messages).
struct Gen(u64);
impl Gen {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
    fn record(&mut self, i: usize) -> (String, CardRecord) {
        let id = format!("{:024x}", 0x65f1_0000_0000_0000_0000u128 + i as u128 * 7919);
        let (first, last) = (FIRST[self.next(12) as usize], LAST[self.next(10) as usize]);
        let phones = (0..1 + self.next(3))
            .map(|_| Phone {
                value: Some(format!("+1{:03}{:07}", 200 + self.next(799), self.next(10_000_000))),
                kind: Some("mobile".into()),
            })
            .collect();
        let user = |g: &mut Gen| format!("{:024x}", 0xabc0 + g.next(24));
        let card = CardDoc {
            id: id.clone(),
            org_id: "o".into(),
            first_name: Some(first.into()),
            last_name: Some(last.into()),
            full_name: Some(format!("{first} {last}")),
            phone_numbers: Some(phones),
            source: Some(["web", "ads", "referral", "import", "event"][self.next(5) as usize].into()),
            created_by: Some(user(self)),
            owner: if self.next(10) < 8 { Some(user(self)) } else { None },
            pipeline_id: Some("66aa00000000000000000001".into()),
            pipeline_stage: Some(format!("66bb000000000000000000{:02}", self.next(10))),
            status: Some("New".into()),
            is_bulk_sms: Some(self.next(100) < 15),
            created_at: Some(1_700_000_000_000 + self.next(31_536_000_000) as i64),
            version: Some(1),
            ..Default::default()
        };
        let assignees = if self.next(10) < 3 { vec![user(self)] } else { vec![] };
        let mut message_times: Vec<i64> = (0..self.next(5)).map(|_| 1_700_000_000_000 + self.next(31_536_000_000) as i64).collect();
        message_times.sort_unstable();
        message_times.dedup();
        (id, CardRecord::live(&card, Derived { assignees, message_times }))
    }
}

/// Builds an index of `n` cards; (bytes it accounts, bytes the allocator saw it keep).
fn build(n: usize) -> (usize, usize) {
    let mut g = Gen(n as u64);
    let records: Vec<(String, CardRecord)> = (0..n).map(|i| g.record(i)).collect();
    // Folding's table of U+0080..U+07FF is made on the first non-ASCII letter, once per
    // process: not the index's.
    board_model::text::fold("é");
    let before = LIVE.load(Ordering::Relaxed);
    let mut index = OrgIndex::new("0-0".into());
    index.start_load(n);
    for (id, rec) in &records {
        index.put(CardKind::Contact, id, Some(rec));
    }
    index.finish_load();
    let held = (LIVE.load(Ordering::Relaxed) - before) as usize;
    assert_eq!(index.len(), n);
    eprintln!("{:?}", index.bytes_by_part().map(|(part, b)| format!("{part} {:.1}", b as f64 / n as f64)));
    (index.bytes(), held)
}

#[test]
fn an_index_holds_what_it_accounts_and_at_most_250_bytes_a_card() {
    for n in [20, 500, 50_000] {
        let (accounted, held) = build(n);
        let per_card = held as f64 / n as f64;
        eprintln!(
            "{n:>7} cards: {held:>11} bytes held ({per_card:.0} a card), {accounted:>11} accounted ({:+.1}%)",
            (accounted as f64 / held as f64 - 1.0) * 100.0
        );
        let error = (accounted as f64 - held as f64).abs() / held as f64;
        assert!(error < 0.15, "{n} cards: accounted {accounted} bytes, held {held}");
        if n >= 50_000 {
            assert!(per_card <= 250.0, "{n} cards: {per_card:.0} bytes a card");
        }
    }
}
