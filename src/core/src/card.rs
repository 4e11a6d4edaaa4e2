//! How one card is stored in the projection: a compact bincode body (what the API returns)
//! and the small index metadata the Redis Functions derive the card's index entries from.
use crate::keys::raw_stage_key;
use crate::model::{CardDoc, CardKind, Phone};
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

/// What the Functions need to place a card in its indexes. Absent fields are omitted (not
/// null) because Lua's cjson turns null into a value that is not `nil`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoreMeta {
    /// Raw stage key, see `keys::raw_stage_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rk: Option<String>,
    /// createdAt millis: the score of every createdAt-ordered index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sc: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    pub bulk: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cre: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub own: Option<String>,
    /// The contact whose conversations and messages this card shows (itself for a contact).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    /// Lower-cased searchable fields: names and phone numbers.
    pub txt: Vec<String>,
}

impl CoreMeta {
    pub fn from_doc(kind: CardKind, d: &CardDoc) -> Self {
        CoreMeta {
            rk: raw_stage_key(d.pipeline_id.as_deref(), d.pipeline_stage.as_deref(), d.status.as_deref()),
            sc: d.created_at,
            // `source` filters only the Contact board (CONTRACT.md section 3).
            src: if kind == CardKind::Contact { d.source.clone() } else { None },
            bulk: d.is_bulk_sms == Some(true),
            cre: d.created_by.clone(),
            own: d.owner.clone(),
            cid: match kind {
                CardKind::Contact => Some(d.id.clone()),
                CardKind::Application => d.contact_id.clone(),
            },
            txt: search_fields(d),
        }
    }
}

/// The fields `search` looks into, case-folded (`text::fold`), empty ones dropped.
pub fn search_fields(d: &CardDoc) -> Vec<String> {
    let phones = d.phone_numbers.iter().flatten().filter_map(|p| p.value.as_deref());
    [d.first_name.as_deref(), d.last_name.as_deref(), d.full_name.as_deref()]
        .into_iter()
        .flatten()
        .chain(phones)
        .map(crate::text::fold)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The distinct trigrams (by Unicode scalar) of a case-folded text. `functions.lua` splits the
/// same way, so a search term's trigrams name the same index keys.
pub fn trigrams(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out: Vec<String> = chars.windows(3).map(|w| w.iter().collect()).collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn trigrams_are_by_character() {
        assert_eq!(trigrams("zoë"), vec!["zoë"]);
        assert_eq!(trigrams("aaaa"), vec!["aaa"]);
        assert!(trigrams("ab").is_empty());
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
            let indexed = trigrams(&lower);
            for g in trigrams(&term) { prop_assert!(indexed.contains(&g)); }
        }
    }
}
