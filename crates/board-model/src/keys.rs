//! The Redis key model. Every key of one org starts with `<prefix>:{<orgId>}` so that all of an
//! org's keys share one Redis Cluster hash slot: one commit writes many of them atomically and
//! one board pipelines reads of many, which Redis Cluster allows only within one slot.
//!
//! Every name is built here, for the projector, the API and `verify` alike (the Functions get
//! them as arguments). docs/key-model.md describes them; a unit test pins them.
use crate::model::CardKind;

/// Where the raw stage of a card is: `<pipelineId or "-">|s:<pipelineStage>` when the card has a
/// stage id, `<pipelineId or "-">|n:<status>` when it has only a status name. "-" marks legacy
/// cards without a `pipelineId` (they belong to their org's active pipeline of their kind).
/// Stage membership is resolved at query time from these raw keys, so a pipeline that is
/// renamed, activated or deactivated never forces a rewrite of its cards.
/// Every value inside a key passes through here (its `pid`, stage, status and user parts), so that no two different values give one key: `%`, `:`, `|`, `{`, `}` and `-` (the
/// key model's separators and the legacy marker) become `%XX`. Injective: `%` is escaped too.
pub fn encode_component(value: &str) -> std::borrow::Cow<'_, str> {
    const SPECIAL: &[char] = &['%', ':', '|', '{', '}', '-'];
    if !value.contains(SPECIAL) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if SPECIAL.contains(&c) {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

pub fn raw_stage_key(pipeline_id: Option<&str>, stage_id: Option<&str>, status: Option<&str>) -> Option<String> {
    let pid = pipeline_id.map(encode_component).unwrap_or(std::borrow::Cow::Borrowed("-"));
    match (stage_id, status) {
        (Some(s), _) => Some(format!("{pid}|s:{}", encode_component(s))),
        (None, Some(n)) => Some(format!("{pid}|n:{}", encode_component(n))),
        (None, None) => None,
    }
}

/// The read model this build writes (2: card records, contact states, four sorted-set families,
/// the change stream; 1 was the Lua-per-event model with trigram sets).
pub const MODEL_VERSION: &str = "2";

/// A projection generation: the base one (`""`, the keys without a generation segment) or
/// `g<number>`, built by a rebuild beside the live one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Generation(String);

impl Generation {
    pub fn base() -> Self {
        Generation(String::new())
    }
    /// `g<number>`, or "" for the base; anything else is not a generation.
    pub fn parse(name: &str) -> Option<Self> {
        let valid = name.is_empty() || name.strip_prefix('g').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        valid.then(|| Generation(name.to_string()))
    }
    pub fn numbered(n: u64) -> Self {
        Generation(format!("g{n}"))
    }
    pub fn name(&self) -> &str {
        &self.0
    }
    pub fn is_base(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "base" } else { &self.0 })
    }
}

#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    pub fn new(prefix: impl Into<String>) -> Self {
        KeySpace { prefix: prefix.into() }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Every key of this key space, every org and generation (for a SCAN MATCH).
    pub fn pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }
    /// The org's keys in the base generation (`<prefix>:{<orgId>}`), where an org lives until a
    /// rebuild moves it. `org_id` must already be a validated ObjectId (no braces can reach the
    /// hash tag).
    pub fn org(&self, org_id: &str) -> OrgKeys {
        self.org_in(&Generation::base(), org_id)
    }
    /// The org's keys in `generation`: `<prefix>:<generation>:{<orgId>}` (the same hash slot as
    /// the base generation and the pointer: a switch is one atomic call in the org's slot).
    pub fn org_in(&self, generation: &Generation, org_id: &str) -> OrgKeys {
        let base = match generation.name() {
            "" => format!("{}:{{{}}}", self.prefix, org_id),
            g => format!("{}:{g}:{{{}}}", self.prefix, org_id),
        };
        OrgKeys { base, generation: generation.clone(), pointer: self.generation_pointer(org_id) }
    }
    /// Which generation holds the org now (a string; absent: the base generation). Readers
    /// resolve it first; the projector's commits are guarded by it; `rebuild` switches it.
    pub fn generation_pointer(&self, org_id: &str) -> String {
        format!("{}:{{{}}}:generation", self.prefix, org_id)
    }
    /// Whether the projection under this prefix is whole (hash: `instance`, `status`
    /// building|whole, `since`, `wholeAt`). It lives beside the progress in one hash slot
    /// (`{meta}`): a progress write is accepted only while the instance it was made for is the
    /// one Redis holds, so a Redis that lost its data cannot be handed a position past the data.
    pub fn state(&self) -> String {
        format!("{}:{{meta}}:state", self.prefix)
    }
    /// The partitions' ends when the projection (re)started from nothing: it is whole once
    /// every partition is applied up to these.
    pub fn state_target(&self) -> String {
        format!("{}:{{meta}}:target", self.prefix)
    }
    /// The running rebuild's lease (a string with a TTL, renewed while it runs).
    pub fn rebuild_lease(&self) -> String {
        format!("{}:{{meta}}:rebuild:lease", self.prefix)
    }
    /// What the last rebuild was doing (hash: generation, source, orgs, phase, counters): a
    /// rebuild killed at any point is resumed from here.
    pub fn rebuild_state(&self) -> String {
        format!("{}:{{meta}}:rebuild", self.prefix)
    }
    /// The orgs a rebuild wrote into its generation (a set).
    pub fn rebuild_orgs(&self, generation: &Generation) -> String {
        format!("{}:{{meta}}:rebuild:{}:orgs", self.prefix, generation.name())
    }
    /// Dead letters the dead-letter topic refused (too large, topic missing, not authorized):
    /// a Redis stream, kept until an operator re-drives them (never trimmed: nothing is lost).
    pub fn parked_dead_letters(&self) -> String {
        format!("{}:dlq:parked", self.prefix)
    }
    /// Ids of the dead letters `dlq replay` re-produced (a second replay skips them).
    pub fn replayed_dead_letters(&self) -> String {
        format!("{}:dlq:replayed", self.prefix)
    }
    /// Which read model built the projection under this prefix (`MODEL_VERSION`): a projector
    /// never writes one model's records beside another's. In `{meta}`, beside the state: the
    /// heal that makes a new state writes it in the same atomic call, so a projection healed
    /// after a loss is claimed by the model that healed it.
    pub fn model(&self) -> String {
        format!("{}:{{meta}}:model", self.prefix)
    }
    /// Where read model 2 kept its marker before it moved into `{meta}` (read, never written).
    pub fn legacy_model(&self) -> String {
        format!("{}:model", self.prefix)
    }
    /// A write mark (hash: `seq`, `progress`): written into every primary every second by each
    /// projector (`rewind.rs`), to notice a Redis that went back in time. `tag` is the hash tag
    /// that puts the mark on its node (`meta` on a single server).
    pub fn write_mark(&self, tag: &str) -> String {
        format!("{}:{{{tag}}}:mark", self.prefix)
    }
    /// The last `seq` seen in each write mark (hash: mark key -> seq), so a projector that
    /// starts later still notices a shard that went back in time while it was away.
    pub fn write_marks_seen(&self) -> String {
        format!("{}:{{meta}}:marks", self.prefix)
    }
    /// Consumer progress (next offset per topic-partition), written after each applied batch:
    /// where a consumer starts (what Redis holds, not the group's commits). A rebuild keeps its
    /// own under the group name `rebuild-<generation>`.
    pub fn progress(&self, group: &str) -> String {
        format!("{}:{{meta}}:progress:{group}", self.prefix)
    }
    /// The partitions' ends (high watermarks) as the projector last saw them, field
    /// `<topic>/<partition>`: with `progress`, the projection's lag from Redis alone (the API
    /// never opens a Kafka client).
    pub fn partition_ends(&self, group: &str) -> String {
        format!("{}:ends:{group}", self.prefix)
    }
}

/// A document whose last applied version lives in the org's `versions` hash (cards and
/// conversations keep theirs in their records): its field there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionField<'a> {
    Pipeline(&'a str),
    User(&'a str),
}

impl VersionField<'_> {
    pub fn field(&self) -> String {
        match self {
            VersionField::Pipeline(id) => format!("p:{id}"),
            VersionField::User(id) => format!("u:{id}"),
        }
    }
}

/// One line of an entry of the org's change stream (`OrgKeys::changes`): what a batch changed,
/// so the API's index re-reads just that (`c:<id>`, `a:<id>` for cards, `u:<id>` for a user).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Changed {
    Card(CardKind, String),
    User(String),
}

impl Changed {
    pub fn line(&self) -> String {
        match self {
            Changed::Card(kind, id) => format!("{}:{id}", kind.tag()),
            Changed::User(id) => format!("u:{id}"),
        }
    }
    /// `None` for a line this build does not know (a newer projector's): the reader skips it.
    pub fn parse(line: &str) -> Option<Self> {
        match line.split_once(':')? {
            ("c", id) => Some(Changed::Card(CardKind::Contact, id.to_string())),
            ("a", id) => Some(Changed::Card(CardKind::Application, id.to_string())),
            ("u", id) => Some(Changed::User(id.to_string())),
            _ => None,
        }
    }
}

/// The keys of one org. `base` is also the first KEYS argument of every Function call: it
/// routes the call to the org's slot on Redis Cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgKeys {
    pub base: String,
    generation: Generation,
    pointer: String,
}

impl OrgKeys {
    fn k(&self, parts: &[&str]) -> String {
        let mut s = self.base.clone();
        for p in parts {
            s.push(':');
            s.push_str(p);
        }
        s
    }
    /// The offsets of this org's events applied here, per `<topic>/<partition>` (the offset after
    /// the last one), written by the same atomic commit as the data: a switch of generations
    /// compares them.
    pub fn offsets(&self) -> String {
        self.k(&["offsets"])
    }
    /// How many commits this org's keys took (a counter `pb_commit` raises and answers): a
    /// committer that is handed a number it already saw found a Redis gone back in time.
    pub fn writes(&self) -> String {
        self.k(&["writes"])
    }
    /// Last applied version (tombstones stay) of pipelines and users, field `p:<id>` / `u:<id>`
    /// (cards and conversations keep theirs in their records).
    pub fn versions(&self) -> String {
        self.k(&["ver"])
    }
    /// The generation these keys are of.
    pub fn generation(&self) -> &Generation {
        &self.generation
    }
    /// The org's generation pointer (`KeySpace::generation_pointer`).
    pub fn pointer(&self) -> &str {
        &self.pointer
    }
    /// The API's in-memory index of the org in this generation, as an image (board-api
    /// `query/index/image.rs`), in a hash: `at` = the change-stream id it is current to,
    /// `parts`, `bytes`, and the parts of its bytes as fields `0`, `1`, ... (board-redis
    /// `functions/image.rs`). Written by an API instance that built the index from the records,
    /// read by one that has not loaded the org yet; removed with the generation.
    pub fn index_image(&self) -> String {
        self.k(&["index-image"])
    }
    /// Every key of the org in this generation (for a SCAN MATCH).
    pub fn pattern(&self) -> String {
        self.k(&["*"])
    }
    /// Every sorted set of the org (for a SCAN MATCH): the `z`, `zn`, `zp` and `zpn` families.
    pub fn index_pattern(&self) -> String {
        self.k(&["z*"])
    }
    /// Card records (`record::CardRecord`, bincode), field = card id; deleted cards stay as
    /// tombstones.
    pub fn cards(&self, kind: CardKind) -> String {
        self.k(&["card", kind.tag()])
    }
    /// Contact states (`record::ContactState`, bincode), field = contact id.
    pub fn contact_states(&self) -> String {
        self.k(&["cs"])
    }
    /// Conversations (`record::ConversationRecord`, bincode), field = conversation id.
    pub fn conversations(&self) -> String {
        self.k(&["conv"])
    }
    pub fn pipelines(&self) -> String {
        self.k(&["pipelines"])
    }
    pub fn users(&self) -> String {
        self.k(&["users"])
    }
    pub fn team(&self, team_id: &str) -> String {
        self.k(&["team", team_id])
    }
    /// The org's change stream: one entry per applied batch, listing the cards it changed. The
    /// API's in-memory index follows it (board-api query/index.rs).
    pub fn changes(&self) -> String {
        self.k(&["changes"])
    }
    /// Every card of a raw stage; score = createdAt millis (-inf when missing), member = id.
    pub fn stage(&self, kind: CardKind, rk: &str) -> String {
        self.k(&["z", kind.tag(), rk])
    }
    /// Cards of a raw stage whose contact has no message (unanswered); score = createdAt.
    pub fn stage_unanswered(&self, kind: CardKind, rk: &str) -> String {
        self.k(&["zn", kind.tag(), rk])
    }
    /// Cards of a raw stage where `user` is creator, owner or conversation assignee.
    pub fn stage_person(&self, kind: CardKind, rk: &str, user: &str) -> String {
        self.k(&["zp", kind.tag(), rk, &encode_component(user)])
    }
    /// The same, of cards whose contact has no message.
    pub fn stage_person_unanswered(&self, kind: CardKind, rk: &str, user: &str) -> String {
        self.k(&["zpn", kind.tag(), rk, &encode_component(user)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_keys_of_an_org_share_one_hash_tag() {
        let o = KeySpace::new("pb").org("64f0a1b2c3d4e5f6a7b8c9d1");
        let rk = raw_stage_key(Some("p1"), None, Some("Won {big}")).unwrap();
        for key in
            [o.versions(), o.stage_person(CardKind::Contact, &rk, "u1"), o.stage_person_unanswered(CardKind::Application, &rk, "}{x")]
        {
            let open = key.find('{').unwrap();
            let close = open + key[open..].find('}').unwrap();
            assert_eq!(&key[open + 1..close], "64f0a1b2c3d4e5f6a7b8c9d1", "{key}");
        }
        assert_eq!(o.stage(CardKind::Contact, &rk), "pb:{64f0a1b2c3d4e5f6a7b8c9d1}:z:c:p1|n:Won %7Bbig%7D");
    }

    #[test]
    fn generations_share_the_orgs_slot_and_never_each_others_names() {
        let ks = KeySpace::new("pb");
        let org = "64f0a1b2c3d4e5f6a7b8c9d1";
        let g = Generation::parse("g17").unwrap();
        assert_eq!(ks.org_in(&g, org).cards(CardKind::Contact), "pb:g17:{64f0a1b2c3d4e5f6a7b8c9d1}:card:c");
        assert_eq!(ks.org(org).cards(CardKind::Contact), "pb:{64f0a1b2c3d4e5f6a7b8c9d1}:card:c");
        assert_eq!(ks.generation_pointer(org), "pb:{64f0a1b2c3d4e5f6a7b8c9d1}:generation");
        assert!(!ks.generation_pointer(org).starts_with(&format!("{}:", ks.org_in(&g, org).base)));
        for bad in ["g", "x1", "g1:", "g1{", "base"] {
            assert_eq!(Generation::parse(bad), None, "{bad}");
        }
        assert!(Generation::parse("").unwrap().is_base());
    }

    #[test]
    fn raw_stage_key_prefers_the_stage_id() {
        assert_eq!(raw_stage_key(Some("p"), Some("s"), Some("New")).as_deref(), Some("p|s:s"));
        assert_eq!(raw_stage_key(None, None, Some("New")).as_deref(), Some("-|n:New"));
        assert_eq!(raw_stage_key(Some("-"), None, Some("New")).as_deref(), Some("%2D|n:New"), "a pipeline id '-' is not legacy");
        assert_eq!(raw_stage_key(Some("p"), None, None), None);
    }

    /// The review's example: status `Won:abc` with owner `def` against stage `Won` with owner
    /// `abc:def`, and the same with sources.
    #[test]
    fn values_with_separators_never_share_a_key() {
        let o = KeySpace::new("pb").org("64f0a1b2c3d4e5f6a7b8c9d1");
        let (a, b) = (raw_stage_key(Some("p"), None, Some("Won:abc")).unwrap(), raw_stage_key(Some("p"), None, Some("Won")).unwrap());
        assert_ne!(o.stage_person(CardKind::Contact, &a, "def"), o.stage_person(CardKind::Contact, &b, "abc:def"));
        assert_ne!(o.stage_person_unanswered(CardKind::Contact, &a, "def"), o.stage_person_unanswered(CardKind::Contact, &b, "abc:def"));
        assert_ne!(raw_stage_key(Some("p|s:x"), Some("y"), None), raw_stage_key(Some("p"), Some("x|s:y"), None));
    }

    #[test]
    fn change_lines_and_version_fields_round_trip() {
        for c in
            [Changed::Card(CardKind::Contact, "x:1".into()), Changed::Card(CardKind::Application, "a".into()), Changed::User("u".into())]
        {
            assert_eq!(Changed::parse(&c.line()), Some(c));
        }
        assert_eq!(Changed::parse("q:1"), None, "an unknown kind is skipped");
        assert_eq!(VersionField::Pipeline("p1").field(), "p:p1");
        assert_ne!(VersionField::Pipeline("x").field(), VersionField::User("x").field());
    }

    /// Any two different tuples of values give different keys, for every kind of index key.
    mod injective {
        use super::super::*;
        use proptest::prelude::*;

        /// Short strings over the separators, where collisions would be found fast.
        fn part() -> impl Strategy<Value = Option<String>> {
            proptest::option::of("[a:|{}%\\-sn]{0,4}")
        }

        fn keys(t: &(Option<String>, Option<String>, Option<String>, String, String)) -> Vec<String> {
            let o = KeySpace::new("pb").org("64f0a1b2c3d4e5f6a7b8c9d1");
            let Some(rk) = raw_stage_key(t.0.as_deref(), t.1.as_deref(), t.2.as_deref()) else { return vec![] };
            vec![
                o.stage(CardKind::Contact, &rk),
                o.stage_person(CardKind::Contact, &rk, &t.3),
                o.stage_person_unanswered(CardKind::Contact, &rk, &t.3),
                o.stage_unanswered(CardKind::Contact, &rk),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

            #[test]
            fn different_values_different_keys(
                x in (part(), part(), part(), "[a:|{}%\\-]{0,4}", "[a:|{}%\\-]{0,4}"),
                y in (part(), part(), part(), "[a:|{}%\\-]{0,4}", "[a:|{}%\\-]{0,4}"),
            ) {
                // A stage id wins over a status: the status does not take part in the key then.
                let norm = |t: &(Option<String>, Option<String>, Option<String>, String, String)| {
                    (t.0.clone(), t.1.clone(), if t.1.is_some() { None } else { t.2.clone() }, t.3.clone(), t.4.clone())
                };
                let (kx, ky) = (keys(&x), keys(&y));
                if !kx.is_empty() && !ky.is_empty() {
                    // stage: (pid, stage, status); the person sets add the user.
                    prop_assert_eq!(kx[0] == ky[0], (norm(&x).0, norm(&x).1, norm(&x).2) == (norm(&y).0, norm(&y).1, norm(&y).2));
                    prop_assert_eq!(kx[1] == ky[1], kx[0] == ky[0] && x.3 == y.3);
                    prop_assert_eq!(kx[2] == ky[2], kx[1] == ky[1]);
                    prop_assert_eq!(kx[3] == ky[3], kx[0] == ky[0]);
                }
            }
        }
    }
}
