//! What both data paths share: which pipeline and which stages a request answers, which raw
//! stage keys make up a bucket, and the response shape. Keeping this in one place is what lets the
//! projection path and the MongoDB path differ only in where they read.
use super::error::ApiError;
use super::request::BoardQuery;
use board_model::keys::raw_stage_key;
use board_model::model::{CardDoc, CardKind, Pipeline, Stage};
use board_model::time::{format_millis, Millis};
use serde::Serialize;

/// One column of the board to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketSpec {
    pub name: String,
    /// None: a name from `stages` that the pipeline does not have (an empty bucket).
    pub stage: Option<Stage>,
    /// 0-based offset of the requested page.
    pub offset: u64,
    pub limit: u64,
}

/// The pipeline and the buckets a request answers (CONTRACT.md 3, "which stages are answered").
#[derive(Debug, Clone, PartialEq)]
pub struct BoardPlan {
    pub pipeline: Pipeline,
    /// Legacy cards (no pipelineId) belong here: it is the org's active pipeline of its type.
    pub includes_legacy: bool,
    pub buckets: Vec<BucketSpec>,
}

pub fn plan(pipelines: &[Pipeline], q: &BoardQuery) -> Result<BoardPlan, ApiError> {
    let kind = q.kind.pipeline_type();
    let of_kind = |p: &&Pipeline| p.kind.as_deref() == Some(kind);
    let pipeline = match &q.pipeline_id {
        Some(id) => pipelines
            .iter()
            .filter(of_kind)
            .find(|p| &p.id == id)
            .ok_or_else(|| ApiError::NotFound(format!("no {kind} pipeline {id:?} in your organization")))?,
        None => pipelines
            .iter()
            .filter(of_kind)
            .filter(|p| p.is_active == Some(true))
            .min_by(|a, b| a.id.cmp(&b.id))
            .ok_or_else(|| ApiError::NotFound(format!("your organization has no active {kind} pipeline")))?,
    };
    let mut stages: Vec<(usize, Stage)> = pipeline.stages.clone().unwrap_or_default().into_iter().enumerate().collect();
    stages.sort_by_key(|(i, s)| (s.order.is_none(), s.order, *i));
    let stages: Vec<Stage> = stages.into_iter().map(|(_, s)| s).collect();
    let named = |s: &Stage| s.name.clone().unwrap_or_default();

    let mut chosen: Vec<(String, Option<Stage>)> = match (&q.status, &q.stages) {
        (Some(status), _) => {
            match stages.iter().find(|s| &s.id == status).or_else(|| stages.iter().find(|s| s.name.as_ref() == Some(status))) {
                Some(s) => vec![(named(s), Some(s.clone()))],
                None => vec![(status.clone(), None)],
            }
        }
        (None, Some(names)) => names.iter().map(|n| (n.clone(), stages.iter().find(|s| s.name.as_ref() == Some(n)).cloned())).collect(),
        (None, None) => stages.iter().map(|s| (named(s), Some(s.clone()))).collect(),
    };
    // A stage asked for twice (or a name the pipeline lacks, twice) is one column. Two stages
    // of the pipeline that share a name stay two columns: `dataByStatus` keys them by id, and
    // `data`, keyed by name, shows the first (see `Body`).
    let mut seen = std::collections::HashSet::new();
    chosen.retain(|(n, s)| seen.insert(s.as_ref().map(|s| format!("id:{}", s.id)).unwrap_or_else(|| format!("name:{n}"))));
    let buckets = chosen
        .into_iter()
        .map(|(name, stage)| {
            let page = q.page_of(stage.as_ref().map(|s| s.id.as_str()), &name) as u64;
            BucketSpec { offset: (page - 1) * q.size as u64, limit: q.size as u64, name, stage }
        })
        .collect();
    Ok(BoardPlan { includes_legacy: pipeline.is_active == Some(true), pipeline: pipeline.clone(), buckets })
}

impl BoardPlan {
    /// The raw stage keys whose union is the bucket (see docs/key-model.md).
    pub fn raw_keys(&self, bucket: &BucketSpec) -> Vec<String> {
        let Some(stage) = &bucket.stage else { return Vec::new() };
        let mut pids = vec![Some(self.pipeline.id.as_str())];
        if self.includes_legacy {
            pids.push(None);
        }
        let mut out = Vec::new();
        for pid in pids {
            out.extend(raw_stage_key(pid, Some(&stage.id), None));
            if let Some(name) = &stage.name {
                out.extend(raw_stage_key(pid, None, Some(name)));
            }
        }
        out
    }
}

/// A card as the API returns it: the stored document plus its derived fields.
#[derive(Debug, Clone, PartialEq)]
pub struct CardOut {
    pub doc: CardDoc,
    pub assignees: Vec<String>,
    pub last_message_at: Option<Millis>,
}

impl Serialize for CardOut {
    /// The stored document plus `assignees` and `lastMessageAt`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Card<'a> {
            #[serde(flatten)]
            doc: &'a CardDoc,
            assignees: &'a [String],
            #[serde(rename = "lastMessageAt")]
            last_message_at: Option<String>,
        }
        Card { doc: &self.doc, assignees: &self.assignees, last_message_at: self.last_message_at.map(format_millis) }.serialize(s)
    }
}

/// A card rendered as JSON once (`card_json`), spliced into every answer that shows it.
#[derive(Debug, Clone)]
pub struct CardJson(pub std::sync::Arc<Box<serde_json::value::RawValue>>);

impl PartialEq for CardJson {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl CardJson {
    pub fn of(card: &CardOut) -> CardJson {
        let json = serde_json::value::to_raw_value(card).expect("a card always serializes");
        CardJson(std::sync::Arc::new(json))
    }
}

impl Serialize for CardJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// One column: its cards as `C`, the parsed `CardOut` or its rendered `CardJson`.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketAnswer<C = CardOut> {
    pub name: String,
    pub stage_id: Option<String>,
    pub total: u64,
    pub cards: Vec<C>,
}

/// Which path answered, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AnswerMeta {
    pub answered_by: &'static str,
    /// Which structure of the projection answered: `sorted_sets` or `index`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub projection_lag: Option<i64>,
    /// Reads from Redis Cluster replicas: how far behind their primaries the replicas were at
    /// the last measurement (milliseconds; the largest over the shards).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_staleness_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BoardAnswer<C = CardOut> {
    pub kind: CardKind,
    pub buckets: Vec<BucketAnswer<C>>,
}

impl<C: Serialize> BoardAnswer<C> {
    /// The response body: buckets in board order (JSON key order), plus `meta`, serialized
    /// straight from the answer (no intermediate JSON tree: a board can hold hundreds of cards).
    pub fn to_json_bytes(&self, meta: &AnswerMeta) -> Vec<u8> {
        serde_json::to_vec(&Body { answer: self, meta }).expect("a board always serializes")
    }
}

impl BoardAnswer<CardOut> {
    /// Each card rendered once, as the API sends it.
    pub fn rendered(self) -> BoardAnswer<CardJson> {
        let buckets = self
            .buckets
            .into_iter()
            .map(|b| BucketAnswer { name: b.name, stage_id: b.stage_id, total: b.total, cards: b.cards.iter().map(CardJson::of).collect() })
            .collect();
        BoardAnswer { kind: self.kind, buckets }
    }
}

struct Body<'a, C> {
    answer: &'a BoardAnswer<C>,
    meta: &'a AnswerMeta,
}

#[derive(Serialize)]
struct BucketJson<'a, C> {
    contacts: &'a [C],
    total: u64,
}

fn bucket<C>(x: &BucketAnswer<C>) -> BucketJson<'_, C> {
    BucketJson { contacts: &x.cards, total: x.total }
}

/// A JSON object written from an iterator of pairs, in iteration order.
struct Ordered<I>(std::cell::Cell<Option<I>>);

impl<K: Serialize, V: Serialize, I: Iterator<Item = (K, V)>> Serialize for Ordered<I> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.take().expect("serialized once"))
    }
}

fn ordered<K, V, I: Iterator<Item = (K, V)>>(it: I) -> Ordered<I> {
    Ordered(std::cell::Cell::new(Some(it)))
}

impl<C: Serialize> Serialize for Body<'_, C> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let b = &self.answer.buckets;
        let with_id = || b.iter().filter_map(|x| x.stage_id.as_ref().map(|id| (id, x)));
        // Keyed by name, a JSON object holds one bucket per name: the first in board order.
        let first_of_name = |x: &&BucketAnswer<C>| b.iter().find(|y| y.name == x.name).is_some_and(|y| std::ptr::eq(y, *x));
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("data", &ordered(b.iter().filter(first_of_name).map(|x| (&x.name, bucket(x)))))?;
        m.serialize_entry("dataByStatus", &ordered(with_id().map(|(id, x)| (id, bucket(x)))))?;
        m.serialize_entry("stageIdByName", &ordered(with_id().filter(|(_, x)| first_of_name(x)).map(|(id, x)| (&x.name, id))))?;
        m.serialize_entry("stageNameById", &ordered(with_id().map(|(id, x)| (id, &x.name))))?;
        m.serialize_entry("meta", self.meta)?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::request::ContactsRequest;

    fn pipeline(id: &str, kind: &str, active: bool, stages: &[(&str, &str, i64)]) -> Pipeline {
        Pipeline {
            id: id.into(),
            org_id: "o".into(),
            name: None,
            kind: Some(kind.into()),
            is_active: Some(active),
            stages: Some(stages.iter().map(|(i, n, o)| Stage { id: i.to_string(), name: Some(n.to_string()), order: Some(*o) }).collect()),
            version: Some(1),
        }
    }

    fn q(json: &str) -> BoardQuery {
        ContactsRequest::parse(json.as_bytes()).unwrap().into_query().unwrap()
    }

    #[test]
    fn picks_the_active_pipeline_of_the_type_and_orders_stages() {
        let ps = vec![
            pipeline("aaaaaaaaaaaaaaaaaaaaaaa1", "Contact", false, &[("s1", "A", 0)]),
            pipeline("aaaaaaaaaaaaaaaaaaaaaaa2", "Contact", true, &[("s3", "Won", 2), ("s2", "New", 1)]),
            pipeline("aaaaaaaaaaaaaaaaaaaaaaa3", "Application", true, &[("s4", "X", 0)]),
        ];
        let plan = plan(&ps, &q("{}")).unwrap();
        assert_eq!(plan.pipeline.id, "aaaaaaaaaaaaaaaaaaaaaaa2");
        assert_eq!(plan.buckets.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["New", "Won"]);
        assert_eq!(
            plan.raw_keys(&plan.buckets[0]),
            ["aaaaaaaaaaaaaaaaaaaaaaa2|s:s2", "aaaaaaaaaaaaaaaaaaaaaaa2|n:New", "-|s:s2", "-|n:New"]
        );

        let inactive = super::plan(&ps, &q(r#"{"pipelineId": "aaaaaaaaaaaaaaaaaaaaaaa1"}"#)).unwrap();
        assert!(!inactive.includes_legacy);
        assert_eq!(inactive.raw_keys(&inactive.buckets[0]), ["aaaaaaaaaaaaaaaaaaaaaaa1|s:s1", "aaaaaaaaaaaaaaaaaaaaaaa1|n:A"]);
        assert!(matches!(super::plan(&ps, &q(r#"{"pipelineId": "aaaaaaaaaaaaaaaaaaaaaaa3"}"#)), Err(ApiError::NotFound(_))));
        assert!(matches!(super::plan(&ps, &q(r#"{"pipelineId": "aaaaaaaaaaaaaaaaaaaaaaa9"}"#)), Err(ApiError::NotFound(_))));
    }

    #[test]
    fn stages_and_status_choose_columns_and_pages_offsets() {
        let ps = vec![pipeline("p", "Contact", true, &[("s1", "New", 0), ("s2", "Won", 1)])];
        let plan = super::plan(&ps, &q(r#"{"stages": ["Won", "Ghost", "Won"], "page": {"Won": 3}, "size": 10}"#)).unwrap();
        assert_eq!(plan.buckets.len(), 2);
        assert_eq!((plan.buckets[0].name.as_str(), plan.buckets[0].offset), ("Won", 20));
        assert_eq!(plan.buckets[1].stage, None);
        assert!(plan.raw_keys(&plan.buckets[1]).is_empty());
        let by_id = super::plan(&ps, &q(r#"{"status": "s1", "page": {"s1": 2}}"#)).unwrap();
        assert_eq!((by_id.buckets.len(), by_id.buckets[0].name.as_str(), by_id.buckets[0].offset), (1, "New", 25));
    }

    #[test]
    fn stages_sharing_a_name_are_two_columns_and_data_shows_the_first() {
        let (p, won1, won2) = ("aaaaaaaaaaaaaaaaaaaaaaa1", "bbbbbbbbbbbbbbbbbbbbbbb1", "bbbbbbbbbbbbbbbbbbbbbbb2");
        let ps = vec![pipeline(p, "Contact", true, &[(won1, "Won", 0), (won2, "Won", 1), ("s3", "Lost", 2)])];
        let plan = plan(&ps, &q("{}")).unwrap();
        assert_eq!(plan.buckets.iter().map(|b| b.stage.as_ref().unwrap().id.as_str()).collect::<Vec<_>>(), [won1, won2, "s3"]);
        // Asking for one name twice is still one column.
        let asked = plan_names(&ps, r#"{"stages": ["Lost", "Lost", "Nope", "Nope"]}"#);
        assert_eq!(asked, ["Lost", "Nope"]);

        let answer = BoardAnswer {
            kind: CardKind::Contact,
            buckets: plan
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| BucketAnswer::<CardOut> {
                    name: b.name.clone(),
                    stage_id: b.stage.as_ref().map(|s| s.id.clone()),
                    total: i as u64,
                    cards: vec![],
                })
                .collect(),
        };
        let meta = AnswerMeta { answered_by: "projection", route: None, reason: None, projection_lag: None, replica_staleness_ms: None };
        let json: serde_json::Value = serde_json::from_slice(&answer.to_json_bytes(&meta)).unwrap();
        assert_eq!(json["dataByStatus"].as_object().unwrap().len(), 3, "{json}");
        assert_eq!((json["dataByStatus"][won1]["total"].as_u64(), json["dataByStatus"][won2]["total"].as_u64()), (Some(0), Some(1)));
        assert_eq!(json["data"].as_object().unwrap().keys().collect::<Vec<_>>(), ["Won", "Lost"]);
        assert_eq!(json["data"]["Won"]["total"], 0);
        assert_eq!(json["stageIdByName"]["Won"], won1);
        assert_eq!(json["stageNameById"][won2], "Won");
    }

    #[test]
    fn cards_rendered_once_make_the_same_bytes_as_cards_rendered_in_the_answer() {
        let card = |id: &str, name: &str| CardOut {
            doc: CardDoc { id: id.into(), org_id: "o".into(), first_name: Some(name.into()), created_at: Some(1), ..Default::default() },
            assignees: vec!["u\"1".into()],
            last_message_at: Some(86_400_000),
        };
        let answer = BoardAnswer {
            kind: CardKind::Contact,
            buckets: vec![
                BucketAnswer {
                    name: "Né\"w".into(),
                    stage_id: Some("s1".into()),
                    total: 7,
                    cards: vec![card("c1", "Zoë </script>"), card("c2", "\u{1F600}\n")],
                },
                BucketAnswer { name: "Gone".into(), stage_id: None, total: 0, cards: vec![] },
            ],
        };
        let meta = AnswerMeta {
            answered_by: "projection",
            route: Some("index"),
            reason: None,
            projection_lag: Some(3),
            replica_staleness_ms: None,
        };
        assert_eq!(
            String::from_utf8(answer.clone().rendered().to_json_bytes(&meta)).unwrap(),
            String::from_utf8(answer.to_json_bytes(&meta)).unwrap()
        );
    }

    fn plan_names(ps: &[Pipeline], body: &str) -> Vec<String> {
        plan(ps, &q(body)).unwrap().buckets.into_iter().map(|b| b.name).collect()
    }
}
