//! How one card is stored in the projection (a compact bincode body: what the API returns) and
//! what `search` looks into: the case-folded fields and their trigrams.
use crate::model::{CardDoc, Phone};
use crate::time::Millis;
use serde::{Deserialize, Serialize};

/// The card body as stored (bincode). bincode cannot carry `serde_json::Value`, so custom
/// fields travel as their JSON text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCard {
    pub id: String,
    pub org_id: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub full_name: Option<String>,
    pub phone_numbers: Option<Vec<(Option<String>, Option<String>)>>,
    pub source: Option<String>,
    pub created_by: Option<String>,
    pub owner: Option<String>,
    pub pipeline_id: Option<String>,
    pub pipeline_stage: Option<String>,
    pub status: Option<String>,
    pub is_bulk_sms: Option<bool>,
    pub created_at: Option<Millis>,
    pub updated_at: Option<Millis>,
    pub custom_fields_json: Option<String>,
    pub version: Option<i64>,
    pub contact_id: Option<String>,
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

impl StoredCard {
    pub fn from_doc(d: &CardDoc) -> Self {
        StoredCard {
            id: d.id.clone(),
            org_id: d.org_id.clone(),
            first_name: d.first_name.clone(),
            last_name: d.last_name.clone(),
            full_name: d.full_name.clone(),
            phone_numbers: d.phone_numbers.as_ref().map(|ps| ps.iter().map(|p| (p.value.clone(), p.kind.clone())).collect()),
            source: d.source.clone(),
            created_by: d.created_by.clone(),
            owner: d.owner.clone(),
            pipeline_id: d.pipeline_id.clone(),
            pipeline_stage: d.pipeline_stage.clone(),
            status: d.status.clone(),
            is_bulk_sms: d.is_bulk_sms,
            created_at: d.created_at,
            updated_at: d.updated_at,
            custom_fields_json: d.custom_fields.as_ref().map(|m| serde_json::to_string(m).unwrap_or_default()),
            version: d.version,
            contact_id: d.contact_id.clone(),
        }
    }

    pub fn to_doc(&self) -> CardDoc {
        CardDoc {
            id: self.id.clone(),
            org_id: self.org_id.clone(),
            first_name: self.first_name.clone(),
            last_name: self.last_name.clone(),
            full_name: self.full_name.clone(),
            phone_numbers: self
                .phone_numbers
                .as_ref()
                .map(|ps| ps.iter().map(|(value, kind)| Phone { value: value.clone(), kind: kind.clone() }).collect()),
            source: self.source.clone(),
            created_by: self.created_by.clone(),
            owner: self.owner.clone(),
            pipeline_id: self.pipeline_id.clone(),
            pipeline_stage: self.pipeline_stage.clone(),
            status: self.status.clone(),
            is_bulk_sms: self.is_bulk_sms,
            created_at: self.created_at,
            updated_at: self.updated_at,
            custom_fields: self.custom_fields_json.as_deref().and_then(|s| serde_json::from_str(s).ok()),
            version: self.version,
            contact_id: self.contact_id.clone(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode_config()).expect("a StoredCard always encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(bytes, bincode_config()).map(|(c, _)| c)
    }
}

/// The fields `search` looks into, case-folded (`text::fold`), empty ones dropped. It reads the
/// stored card, not a `CardDoc`: an index build calls it for every card, and `to_doc` would copy
/// every field and parse the custom fields' JSON for nothing.
pub fn search_fields(c: &StoredCard) -> Vec<String> {
    let phones = c.phone_numbers.iter().flatten().filter_map(|(value, _)| value.as_deref());
    [c.first_name.as_deref(), c.last_name.as_deref(), c.full_name.as_deref()]
        .into_iter()
        .flatten()
        .chain(phones)
        .map(crate::text::fold)
        .filter(|s| !s.is_empty())
        .collect()
}

/// A trigram: three Unicode scalars (a map key without an allocation).
pub type Trigram = [char; 3];

/// The distinct trigrams of case-folded texts, by Unicode scalar: a search term of 3+
/// characters is found only among cards that have every trigram of it (the API's index).
pub fn trigrams<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<Trigram> {
    let mut out = Vec::new();
    for t in texts {
        let chars: Vec<char> = t.chars().collect();
        out.extend(chars.windows(3).map(|w| [w[0], w[1], w[2]]));
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn trigrams_are_by_character() {
        assert_eq!(trigrams(["zoë"]), vec![['z', 'o', 'ë']]);
        assert_eq!(trigrams(["aaaa", "xaaa"]), vec![['a', 'a', 'a'], ['x', 'a', 'a']]);
        assert!(trigrams(["ab"]).is_empty());
    }

    proptest! {
        #[test]
        fn bodies_round_trip(first in proptest::option::of(".*"), created in proptest::option::of(0i64..4_000_000_000_000),
                             phones in proptest::option::of(proptest::collection::vec((proptest::option::of("[0-9+ ]{0,14}"), proptest::option::of("mobile|work")), 0..3)),
                             cf in proptest::option::of(proptest::collection::btree_map("[a-z]{1,5}", -5i64..5, 0..3))) {
            let doc = CardDoc {
                id: "64f0a1b2c3d4e5f6a7b8c9d1".into(), org_id: "64f0a1b2c3d4e5f6a7b8c9d2".into(),
                first_name: first, created_at: created,
                phone_numbers: phones.map(|ps| ps.into_iter().map(|(value, kind)| Phone { value, kind }).collect()),
                custom_fields: cf.map(|m| m.into_iter().map(|(k, v)| (k, serde_json::json!(v))).collect()),
                ..Default::default()
            };
            let stored = StoredCard::from_doc(&doc);
            prop_assert_eq!(StoredCard::decode(&stored.encode()).unwrap().to_doc(), doc);
        }

        #[test]
        fn every_substring_of_three_or_more_chars_has_its_trigrams_indexed(text in "\\PC{0,20}", start in 0usize..20, len in 3usize..8) {
            let lower = crate::text::fold(&text);
            let chars: Vec<char> = lower.chars().collect();
            prop_assume!(start + len <= chars.len());
            let term: String = chars[start..start + len].iter().collect();
            let indexed = trigrams([lower.as_str()]);
            for g in trigrams([term.as_str()]) { prop_assert!(indexed.contains(&g)); }
        }
    }
}
