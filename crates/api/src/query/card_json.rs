//! Cards rendered once per version: a card's JSON is a function of its stored record alone
//! (the document and its derived fields), so it is kept under the record's bytes and spliced
//! into every board that shows that version of the card. Decoding the record and rendering it
//! were most of a board's CPU (a board shows each of its ~200 cards twice: `data` and
//! `dataByStatus`). Keyed by the whole record, not a hash of it: two records that render
//! differently can never share an entry, whatever their org.
use super::board::{CardJson, CardOut};
use board_model::record::CardRecord;
use moka::sync::Cache;

/// Default byte budget: the first pages of a few hundred boards.
pub const DEFAULT_BYTES: u64 = 32 << 20;

#[derive(Clone)]
pub struct CardJsonCache {
    /// foldhash: SipHash over every record of a board showed in its profile.
    cache: Cache<Box<[u8]>, Option<CardJson>, hashbrown::DefaultHashBuilder>,
}

impl CardJsonCache {
    pub fn new(bytes: u64) -> CardJsonCache {
        let cache = Cache::builder().max_capacity(bytes).weigher(weigh).build_with_hasher(hashbrown::DefaultHashBuilder::default());
        CardJsonCache { cache }
    }

    /// The card a stored record shows, as the API renders it; None for a tombstone.
    pub fn of(&self, record: &[u8]) -> Result<Option<CardJson>, String> {
        if let Some(hit) = self.cache.get(record) {
            return Ok(hit);
        }
        let rendered = render(record)?;
        self.cache.insert(record.into(), rendered.clone());
        Ok(rendered)
    }
}

/// An entry's bytes: the record, its JSON and the cache's own.
#[allow(clippy::borrowed_box)] // moka passes the key as stored
fn weigh(record: &Box<[u8]>, json: &Option<CardJson>) -> u32 {
    const ENTRY_OVERHEAD: usize = 96;
    u32::try_from(record.len() + json.as_ref().map_or(0, |j| j.0.get().len()) + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
}

/// A record as the API shows its card.
fn card_out(record: &CardRecord) -> Option<CardOut> {
    let card = record.card.as_ref()?;
    Some(CardOut { doc: card.to_doc(), assignees: record.derived.assignees.clone(), last_message_at: record.derived.last_message_at() })
}

/// A stored record as the API shows its card; None for a tombstone.
pub fn card_out_of(record: &[u8]) -> Result<Option<CardOut>, String> {
    let record = CardRecord::decode(record).map_err(|e| format!("card record: {e}"))?;
    Ok(card_out(&record))
}

fn render(record: &[u8]) -> Result<Option<CardJson>, String> {
    Ok(card_out_of(record)?.as_ref().map(CardJson::of))
}

#[cfg(test)]
mod tests {
    use super::*;
    use board_model::model::CardDoc;
    use board_model::record::Derived;

    fn record(name: &str, assignees: &[&str]) -> Vec<u8> {
        let doc = CardDoc { id: "c1".into(), org_id: "o".into(), first_name: Some(name.into()), version: Some(1), ..Default::default() };
        CardRecord::live(&doc, Derived { assignees: assignees.iter().map(|a| a.to_string()).collect(), message_times: vec![5_000] })
            .encode()
    }

    #[test]
    fn a_card_renders_as_its_parsed_form_and_each_version_as_itself() {
        let cache = CardJsonCache::new(1 << 20);
        let (v1, v2) = (record("Jane", &[]), record("Jane", &["u1"]));
        let expected = |bytes: &[u8]| serde_json::to_string(&card_out(&CardRecord::decode(bytes).unwrap()).unwrap()).unwrap();
        for _ in 0..2 {
            assert_eq!(cache.of(&v1).unwrap().unwrap().0.get(), expected(&v1));
            assert_eq!(cache.of(&v2).unwrap().unwrap().0.get(), expected(&v2), "a derived field changed: another version");
        }
        assert!(cache.of(&CardRecord::tombstone(3).encode()).unwrap().is_none());
        assert!(cache.of(b"not a record").is_err());
    }
}
