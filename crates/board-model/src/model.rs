//! The source-of-truth documents (CONTRACT.md section 1) as they travel in events.
//! Any field but `_id` and `orgId` may be missing or null, so almost everything is optional.
use crate::time::{opt_rfc3339, Millis};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Phone {
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// A contact or an application: the card of a pipeline board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CardDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub org_id: String,
    #[serde(default)]
    pub first_name: Option<String>,
    #[serde(default)]
    pub last_name: Option<String>,
    #[serde(default)]
    pub full_name: Option<String>,
    #[serde(default)]
    pub phone_numbers: Option<Vec<Phone>>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub pipeline_id: Option<String>,
    #[serde(default)]
    pub pipeline_stage: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub is_bulk_sms: Option<bool>,
    #[serde(default, with = "opt_rfc3339")]
    pub created_at: Option<Millis>,
    #[serde(default, with = "opt_rfc3339")]
    pub updated_at: Option<Millis>,
    #[serde(default)]
    pub custom_fields: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub version: Option<i64>,
    /// Applications only: the contact the application belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    #[serde(rename = "_id")]
    pub id: String,
    pub org_id: String,
    #[serde(default)]
    pub contact_id: Option<String>,
    #[serde(default)]
    pub assignees: Option<Vec<String>>,
    #[serde(default)]
    pub version: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    #[serde(rename = "_id")]
    pub id: String,
    pub org_id: String,
    #[serde(default)]
    pub contact_id: Option<String>,
    #[serde(default)]
    pub conversation_id: Option<String>,
    #[serde(default)]
    pub direction: Option<String>,
    #[serde(default, with = "opt_rfc3339")]
    pub created_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Stage {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub order: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Pipeline {
    #[serde(rename = "_id")]
    pub id: String,
    pub org_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub is_active: Option<bool>,
    #[serde(default)]
    pub stages: Option<Vec<Stage>>,
    #[serde(default)]
    pub version: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(rename = "_id")]
    pub id: String,
    pub org_id: String,
    #[serde(default)]
    pub team_ids: Option<Vec<String>>,
    #[serde(default)]
    pub version: Option<i64>,
}

/// Which board a card lives on. Contacts answer `pipelineType: Contact`, applications
/// `pipelineType: Application`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CardKind {
    Contact,
    Application,
}

impl CardKind {
    /// The contact whose conversations and messages a card of this kind shows (CONTRACT.md 1):
    /// a contact its own, an application the contact it was made for (none if it names none).
    /// The one home of this rule: the projector, `verify`, the MongoDB path and the records ask it.
    pub fn shown_contact<'a>(self, id: &'a str, contact_id: Option<&'a str>) -> Option<&'a str> {
        match self {
            CardKind::Contact => Some(id),
            CardKind::Application => contact_id,
        }
    }

    /// The one-letter tag used in Redis key names.
    pub fn tag(self) -> &'static str {
        match self {
            CardKind::Contact => "c",
            CardKind::Application => "a",
        }
    }
    pub fn pipeline_type(self) -> &'static str {
        match self {
            CardKind::Contact => "Contact",
            CardKind::Application => "Application",
        }
    }
    pub fn collection(self) -> &'static str {
        match self {
            CardKind::Contact => "contacts",
            CardKind::Application => "applications",
        }
    }
    pub fn from_pipeline_type(s: &str) -> Option<Self> {
        match s {
            "Contact" => Some(CardKind::Contact),
            "Application" => Some(CardKind::Application),
            _ => None,
        }
    }
}

/// A 24-hex-char ObjectId string, lower case. Ids from outside are checked with this before
/// they are ever put into a Redis key or a MongoDB filter.
pub fn is_object_id(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod shown_contact_tests {
    use super::CardKind;

    #[test]
    fn a_contact_shows_itself_and_an_application_its_contact() {
        assert_eq!(CardKind::Contact.shown_contact("c1", Some("other")), Some("c1"));
        assert_eq!(CardKind::Application.shown_contact("a1", Some("c1")), Some("c1"));
        assert_eq!(CardKind::Application.shown_contact("a1", None), None);
    }
}
