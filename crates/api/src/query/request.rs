//! `POST /api/contacts` request bodies, parsed at the edge into a `BoardQuery` ("parse, don't
//! validate"): past this module every value is known to be in range.
use super::error::ApiError;
use board_model::model::{is_object_id, CardKind};
use board_model::time::{parse_rfc3339, Millis};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use utoipa::ToSchema;

/// `{start, end}`: RFC 3339 times, either may be missing.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct RawRange {
    pub start: Option<String>,
    pub end: Option<String>,
}

/// `{value, unit}` with unit `hours` or `days`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct RawWindow {
    #[schema(value_type = Option<f64>)]
    pub value: Option<Value>,
    pub unit: Option<String>,
}

/// The request body as the client sends it (CONTRACT.md section 3).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContactsRequest {
    /// Per-stage page numbers keyed by stage id or stage name (1-based).
    #[schema(value_type = Option<HashMap<String, u32>>)]
    pub page: Option<Map<String, Value>>,
    /// Page size of every stage, 1..=100 (default 25).
    #[schema(value_type = Option<u32>)]
    pub size: Option<Value>,
    /// Case-insensitive literal substring of first/last/full name or a phone number.
    pub search: Option<String>,
    /// Exact source (Contact pipelines only).
    pub source: Option<String>,
    /// `my`, `all`, `team`, `unassigned`, or a user id.
    pub owner_filter: Option<String>,
    /// User ids: any is creator, owner or conversation assignee. Overrides ownerFilter.
    pub owner: Option<Vec<String>>,
    /// User ids: any is a conversation assignee.
    pub assignee: Option<Vec<String>>,
    /// `Contact` (default) or `Application`.
    pub pipeline_type: Option<String>,
    pub pipeline_id: Option<String>,
    /// One stage (name or id) instead of all.
    pub status: Option<String>,
    /// Legacy alias of createdDateRange.
    pub date_range: Option<RawRange>,
    pub created_date_range: Option<RawRange>,
    /// `{key: value}`: strings match as case-insensitive substrings, numbers and booleans exactly.
    #[serde(alias = "customFilters")]
    #[schema(value_type = Option<HashMap<String, Object>>)]
    pub custom_fields: Option<Map<String, Value>>,
    /// Stage names to answer, in this order.
    pub stages: Option<Vec<String>>,
    /// Accepted for compatibility; it can only name stages of the pipeline and never widens what is visible.
    pub stage_id_by_name: Option<HashMap<String, String>>,
    pub bulk_only: Option<bool>,
    /// `all`, `answered` or `unanswered`.
    pub message_status: Option<String>,
    /// Contacts with no message inside this recent window.
    pub last_message_time_range: Option<RawWindow>,
    /// Contacts with a message inside this window.
    pub last_message_date_range: Option<RawRange>,
}

/// A closed time interval; a missing bound is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub start: Option<Millis>,
    pub end: Option<Millis>,
}

impl TimeRange {
    pub fn contains(&self, t: Millis) -> bool {
        self.start.is_none_or(|s| t >= s) && self.end.is_none_or(|e| t <= e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerScope {
    All,
    Mine,
    Team,
    Unassigned,
    /// Any of these users is creator, owner or conversation assignee.
    Users(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageStatus {
    All,
    Answered,
    Unanswered,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CustomValue {
    Text(String),
    Number(f64),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Filters {
    /// Trimmed, as typed (each path lower-cases or escapes it as it needs).
    pub search: Option<String>,
    pub source: Option<String>,
    pub owner: OwnerScope,
    pub assignees: Option<Vec<String>>,
    pub created: Option<TimeRange>,
    pub bulk_only: bool,
    pub message_status: MessageStatus,
    /// lastMessageTimeRange as a duration in milliseconds.
    pub quiet_for: Option<Millis>,
    pub messaged_in: Option<TimeRange>,
    pub custom_fields: Vec<(String, CustomValue)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BoardQuery {
    pub kind: CardKind,
    pub pipeline_id: Option<String>,
    pub stages: Option<Vec<String>>,
    pub status: Option<String>,
    pub pages: HashMap<String, u32>,
    pub size: u32,
    pub filters: Filters,
}

impl BoardQuery {
    /// Whether its answer is a function of the stored data alone, so that the org's change
    /// token (with the caller and the request) can name it: not with custom fields (answered
    /// by MongoDB) nor with `lastMessageTimeRange` (it moves with the current time).
    pub fn nameable_by_change_token(&self) -> bool {
        self.filters.custom_fields.is_empty() && self.filters.quiet_for.is_none()
    }

    /// Whether the answer depends on who asks (`my`, `team`), so that it is shared only with
    /// the same caller.
    pub fn depends_on_caller(&self) -> bool {
        // Every scope named here (no wildcard): a new one must say whether it is relative to
        // the caller, or the shared answers would give one caller's board to another.
        match self.filters.owner {
            OwnerScope::Mine | OwnerScope::Team => true,
            OwnerScope::All | OwnerScope::Unassigned | OwnerScope::Users(_) => false,
        }
    }

    /// The 1-based page of a bucket: by stage id first, then by name.
    pub fn page_of(&self, id: Option<&str>, name: &str) -> u32 {
        id.and_then(|i| self.pages.get(i)).or_else(|| self.pages.get(name)).copied().unwrap_or(1)
    }
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::BadRequest { code, message: message.into() }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn range(field: &str, r: Option<RawRange>) -> Result<Option<TimeRange>, ApiError> {
    let Some(r) = r else { return Ok(None) };
    let parse = |v: Option<String>, bound: &str| -> Result<Option<Millis>, ApiError> {
        match non_empty(v) {
            None => Ok(None),
            Some(s) => {
                parse_rfc3339(&s).map(Some).ok_or_else(|| bad("invalid_date", format!("{field}.{bound} is not an RFC 3339 time: {s:?}")))
            }
        }
    };
    let out = TimeRange { start: parse(r.start, "start")?, end: parse(r.end, "end")? };
    Ok(if out.start.is_none() && out.end.is_none() { None } else { Some(out) })
}

/// Documented limits of the request's lists (CONTRACT.md 3, README "Request limits"): a longer
/// list is a 400, so no request can make either path walk an unbounded set.
pub const MAX_USER_IDS: usize = 50;
pub const MAX_STAGES: usize = 100;
pub const MAX_PAGES: usize = 100;
pub const MAX_CUSTOM_FIELDS: usize = 20;
pub const MAX_SEARCH_CHARS: usize = 200;

fn too_long(field: &str, limit: usize) -> ApiError {
    bad("list_too_long", format!("{field} may hold at most {limit} entries"))
}

/// A list of user ids: each an ObjectId, at most `MAX_USER_IDS`; empty means no filter.
fn ids(field: &str, list: Option<Vec<String>>) -> Result<Option<Vec<String>>, ApiError> {
    let mut v: Vec<String> = list.unwrap_or_default().into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if v.len() > MAX_USER_IDS {
        return Err(too_long(field, MAX_USER_IDS));
    }
    if let Some(bad_id) = v.iter().find(|id| !is_object_id(id)) {
        return Err(bad("invalid_user_id", format!("{field} holds {bad_id:?}, which is not a 24-hex-character ObjectId")));
    }
    v.sort();
    v.dedup();
    Ok(if v.is_empty() { None } else { Some(v) })
}

impl ContactsRequest {
    pub fn parse(body: &[u8]) -> Result<ContactsRequest, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(ContactsRequest::default());
        }
        serde_json::from_slice(body).map_err(|e| bad("malformed_body", format!("the request body is not a valid request: {e}")))
    }

    pub fn into_query(self) -> Result<BoardQuery, ApiError> {
        let kind = match self.pipeline_type.as_deref().map(str::trim) {
            None | Some("") => CardKind::Contact,
            Some(t) => CardKind::from_pipeline_type(t)
                .ok_or_else(|| bad("invalid_pipeline_type", format!("pipelineType must be Contact or Application, not {t:?}")))?,
        };
        let size = match self.size {
            None | Some(Value::Null) => 25,
            Some(v) => match v.as_u64() {
                Some(n @ 1..=100) => n as u32,
                _ => return Err(bad("invalid_size", format!("size must be an integer from 1 to 100, not {v}"))),
            },
        };
        if self.stage_id_by_name.as_ref().is_some_and(|m| m.len() > MAX_STAGES) {
            return Err(too_long("stageIdByName", MAX_STAGES));
        }
        let page = self.page.unwrap_or_default();
        if page.len() > MAX_PAGES {
            return Err(too_long("page", MAX_PAGES));
        }
        let mut pages = HashMap::new();
        for (stage, v) in page {
            match v.as_u64() {
                Some(n) if n >= 1 && n <= u32::MAX as u64 => {
                    pages.insert(stage, n as u32);
                }
                _ => return Err(bad("invalid_page", format!("page[{stage:?}] must be an integer of at least 1, not {v}"))),
            }
        }
        let owner = match ids("owner", self.owner)? {
            Some(users) => OwnerScope::Users(users),
            None => match non_empty(self.owner_filter).as_deref() {
                None | Some("all") => OwnerScope::All,
                Some("my") => OwnerScope::Mine,
                Some("team") => OwnerScope::Team,
                Some("unassigned") => OwnerScope::Unassigned,
                Some(user) if is_object_id(user) => OwnerScope::Users(vec![user.to_string()]),
                Some(other) => {
                    return Err(bad(
                        "invalid_owner_filter",
                        format!("ownerFilter must be all, my, team, unassigned or a user's ObjectId, not {other:?}"),
                    ))
                }
            },
        };
        let message_status = match non_empty(self.message_status).as_deref() {
            None | Some("all") => MessageStatus::All,
            Some("answered") => MessageStatus::Answered,
            Some("unanswered") => MessageStatus::Unanswered,
            Some(other) => {
                return Err(bad("invalid_message_status", format!("messageStatus must be all, answered or unanswered, not {other:?}")))
            }
        };
        let quiet_for = match self.last_message_time_range {
            None => None,
            Some(RawWindow { value: None | Some(Value::Null), unit: None }) => None,
            Some(w) => {
                let unit_ms: i64 = match w.unit.as_deref() {
                    Some("hours") => 3_600_000,
                    Some("days") => 86_400_000,
                    other => return Err(bad("invalid_unit", format!("lastMessageTimeRange.unit must be hours or days, not {other:?}"))),
                };
                let value =
                    w.value.as_ref().and_then(Value::as_f64).filter(|v| v.is_finite() && *v >= 0.0 && *v <= 1e6).ok_or_else(|| {
                        bad("invalid_window", format!("lastMessageTimeRange.value must be a number from 0 to 1000000, not {:?}", w.value))
                    })?;
                Some((value * unit_ms as f64).round() as i64)
            }
        };
        let created = match self.created_date_range {
            Some(r) => range("createdDateRange", Some(r))?,
            None => range("dateRange", self.date_range)?,
        };
        let custom = self.custom_fields.unwrap_or_default();
        if custom.len() > MAX_CUSTOM_FIELDS {
            return Err(too_long("customFields", MAX_CUSTOM_FIELDS));
        }
        let mut custom_fields = Vec::new();
        for (key, v) in custom {
            if key.is_empty() || key.starts_with('$') || key.contains('.') || key.contains('\0') {
                return Err(bad("invalid_custom_field", format!("custom field name {key:?} is not allowed")));
            }
            let value = match v {
                Value::String(s) if s.trim().is_empty() => continue,
                Value::String(s) => CustomValue::Text(s.trim().to_string()),
                Value::Number(n) => CustomValue::Number(n.as_f64().unwrap_or_default()),
                Value::Bool(b) => CustomValue::Bool(b),
                Value::Null => continue,
                other => {
                    return Err(bad("invalid_custom_field", format!("customFields.{key} must be a string, number or boolean, not {other}")))
                }
            };
            custom_fields.push((key, value));
        }
        custom_fields.sort_by(|a, b| a.0.cmp(&b.0));
        if self.stages.as_ref().is_some_and(|s| s.len() > MAX_STAGES) {
            return Err(too_long("stages", MAX_STAGES));
        }
        let stages = self
            .stages
            .map(|v| v.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect::<Vec<_>>())
            .filter(|v| !v.is_empty());
        let pipeline_id = non_empty(self.pipeline_id);
        if let Some(p) = pipeline_id.as_deref().filter(|p| !is_object_id(p)) {
            return Err(bad("invalid_pipeline_id", format!("pipelineId {p:?} is not a 24-hex-character ObjectId")));
        }
        let search = non_empty(self.search);
        if search.as_ref().is_some_and(|s| s.chars().count() > MAX_SEARCH_CHARS) {
            return Err(bad("search_too_long", format!("search may be at most {MAX_SEARCH_CHARS} characters")));
        }
        Ok(BoardQuery {
            kind,
            pipeline_id,
            stages,
            status: non_empty(self.status),
            pages,
            size,
            filters: Filters {
                search,
                // "equals the value exactly" (CONTRACT.md 3): not trimmed; only "" means no filter.
                source: if kind == CardKind::Contact { self.source.filter(|s| !s.is_empty()) } else { None },
                owner,
                assignees: ids("assignee", self.assignee)?,
                created,
                bulk_only: self.bulk_only == Some(true),
                message_status,
                quiet_for,
                messaged_in: range("lastMessageDateRange", self.last_message_date_range)?,
                custom_fields,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<BoardQuery, ApiError> {
        ContactsRequest::parse(json.as_bytes())?.into_query()
    }

    fn code(r: Result<BoardQuery, ApiError>) -> &'static str {
        match r {
            Err(ApiError::BadRequest { code, .. }) => code,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let q = parse("{}").unwrap();
        assert_eq!((q.kind, q.size, q.filters.owner.clone()), (CardKind::Contact, 25, OwnerScope::All));
        assert_eq!(parse("").unwrap(), q);
        assert_eq!(parse(r#"{"search": "   ", "owner": [], "stages": [], "dateRange": {}}"#).unwrap(), q);
    }

    #[test]
    fn rejects_out_of_range_values() {
        assert_eq!(code(parse(r#"{"pipelineType": "Deal"}"#)), "invalid_pipeline_type");
        assert_eq!(code(parse(r#"{"size": 0}"#)), "invalid_size");
        assert_eq!(code(parse(r#"{"size": 101}"#)), "invalid_size");
        assert_eq!(code(parse(r#"{"size": 2.5}"#)), "invalid_size");
        assert_eq!(code(parse(r#"{"page": {"New": 0}}"#)), "invalid_page");
        assert_eq!(code(parse(r#"{"createdDateRange": {"start": "last week"}}"#)), "invalid_date");
        assert_eq!(code(parse(r#"{"lastMessageTimeRange": {"value": 3, "unit": "weeks"}}"#)), "invalid_unit");
        assert_eq!(code(parse(r#"{"lastMessageTimeRange": {"value": -1, "unit": "days"}}"#)), "invalid_window");
        assert_eq!(code(parse(r#"{"messageStatus": "maybe"}"#)), "invalid_message_status");
        assert_eq!(code(parse(r#"{"customFields": {"$where": "1"}}"#)), "invalid_custom_field");
        assert_eq!(code(parse(r#"{"customFields": {"a": [1]}}"#)), "invalid_custom_field");
        assert_eq!(code(parse(r#"{"size": "#)), "malformed_body");
        assert_eq!(code(parse(r#"{"owner": "not-a-list"}"#)), "malformed_body");
    }

    #[test]
    fn owner_overrides_owner_filter_and_any_other_value_is_a_user() {
        let (a, b) = ("65a00000000000000000000a", "65a00000000000000000000b");
        let q = parse(&format!(r#"{{"owner": ["{b}", "{a}", " {a} "], "ownerFilter": "my"}}"#)).unwrap();
        assert_eq!(q.filters.owner, OwnerScope::Users(vec![a.into(), b.into()]));
        assert_eq!(parse(&format!(r#"{{"ownerFilter": "{a}"}}"#)).unwrap().filters.owner, OwnerScope::Users(vec![a.into()]));
    }

    #[test]
    fn ids_are_object_ids_and_lists_have_limits() {
        assert_eq!(code(parse(r#"{"owner": ["65a00000000000000000000a", "bob"]}"#)), "invalid_user_id");
        assert_eq!(code(parse(r#"{"assignee": ["{$ne: 1}"]}"#)), "invalid_user_id");
        assert_eq!(code(parse(r#"{"ownerFilter": "someone"}"#)), "invalid_owner_filter");
        assert_eq!(code(parse(r#"{"pipelineId": "p1"}"#)), "invalid_pipeline_id");
        let users: Vec<String> = (0..=MAX_USER_IDS).map(|i| format!("{i:024x}")).collect();
        assert_eq!(code(parse(&serde_json::json!({"owner": users}).to_string())), "list_too_long");
        assert!(parse(&serde_json::json!({"owner": users[..MAX_USER_IDS]}).to_string()).is_ok());
        let stages: Vec<String> = (0..=MAX_STAGES).map(|i| format!("S{i}")).collect();
        assert_eq!(code(parse(&serde_json::json!({"stages": stages}).to_string())), "list_too_long");
        let pages: serde_json::Map<String, Value> = (0..=MAX_PAGES).map(|i| (format!("S{i}"), Value::from(1))).collect();
        assert_eq!(code(parse(&serde_json::json!({"page": pages}).to_string())), "list_too_long");
        let custom: serde_json::Map<String, Value> = (0..=MAX_CUSTOM_FIELDS).map(|i| (format!("f{i}"), Value::from(1))).collect();
        assert_eq!(code(parse(&serde_json::json!({"customFields": custom}).to_string())), "list_too_long");
        assert_eq!(code(parse(&serde_json::json!({"search": "x".repeat(MAX_SEARCH_CHARS + 1)}).to_string())), "search_too_long");
    }

    #[test]
    fn source_is_matched_exactly_untrimmed() {
        assert_eq!(parse(r#"{"source": " website "}"#).unwrap().filters.source.as_deref(), Some(" website "));
        assert_eq!(parse(r#"{"source": ""}"#).unwrap().filters.source, None);
    }

    #[test]
    fn date_range_is_a_legacy_alias() {
        let q = parse(r#"{"dateRange": {"start": "2026-01-01T00:00:00Z"}}"#).unwrap();
        assert_eq!(q.filters.created.unwrap().start, Some(1767225600000));
        let q = parse(r#"{"dateRange": {"start": "2026-01-01T00:00:00Z"}, "createdDateRange": {"end": "2026-01-02T00:00:00Z"}}"#).unwrap();
        assert_eq!(q.filters.created.unwrap(), TimeRange { start: None, end: Some(1767312000000) });
    }

    #[test]
    fn source_is_ignored_for_applications_and_windows_become_durations() {
        let q = parse(r#"{"pipelineType": "Application", "source": "web", "lastMessageTimeRange": {"value": 2, "unit": "days"}}"#).unwrap();
        assert_eq!(q.filters.source, None);
        assert_eq!(q.filters.quiet_for, Some(2 * 86_400_000));
        assert_eq!(
            parse(r#"{"customFilters": {"vip": true}}"#).unwrap().filters.custom_fields,
            vec![("vip".to_string(), CustomValue::Bool(true))]
        );
    }

    /// The request parser never panics: any body is a query or a structured 400.
    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        fn outcome(body: &[u8]) -> Result<(), TestCaseError> {
            match ContactsRequest::parse(body).and_then(ContactsRequest::into_query) {
                Ok(_) => Ok(()),
                Err(e) => {
                    prop_assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{:?}", e);
                    prop_assert!(!e.code().is_empty());
                    Ok(())
                }
            }
        }

        /// JSON values biased towards what the parser looks at: ids, keywords, dates, numbers
        /// at the edges of their ranges, nested lists and maps.
        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                prop_oneof![Just(0i64), Just(1), Just(100), Just(101), Just(-1), Just(i64::MAX), any::<i64>()].prop_map(Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
                prop_oneof![
                    Just("65a0000000000000000000aa".to_string()),
                    Just("my".to_string()),
                    Just("team".to_string()),
                    Just("unassigned".to_string()),
                    Just("Application".to_string()),
                    Just("hours".to_string()),
                    Just("2026-11-30T09:25:59.123Z".to_string()),
                    Just("$where".to_string()),
                    "\\PC{0,12}",
                ]
                .prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::vec(("\\PC{0,8}", inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
                ]
            })
        }

        const FIELDS: &[&str] = &[
            "page",
            "size",
            "search",
            "source",
            "ownerFilter",
            "owner",
            "assignee",
            "pipelineType",
            "pipelineId",
            "status",
            "dateRange",
            "createdDateRange",
            "customFields",
            "customFilters",
            "stages",
            "stageIdByName",
            "bulkOnly",
            "messageStatus",
            "lastMessageTimeRange",
            "lastMessageDateRange",
            "start",
            "end",
            "value",
            "unit",
        ];

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_bytes_are_a_query_or_a_400(body in proptest::collection::vec(any::<u8>(), 0..256)) {
                outcome(&body)?;
            }

            #[test]
            fn any_request_shaped_json_is_a_query_or_a_400(
                fields in proptest::collection::vec((proptest::sample::select(FIELDS), value()), 0..8)
            ) {
                let body: serde_json::Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                outcome(&serde_json::to_vec(&body).unwrap())?;
            }
        }
    }
}
