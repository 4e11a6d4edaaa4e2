//! Board order: the order of the cards in one stage's column (CONTRACT.md 3). `createdAt`
//! descending, cards without one last, ties by id descending. The API's in-memory index, the
//! sorted-set path (`ZRANGE ... REV` over `record::created_score`: the same order, since a
//! missing `createdAt` scores -inf and Redis breaks score ties by member descending in REV), and
//! the MongoDB path (`MONGO_SORT`) all order by this rule; so does `pb_union_page` in the
//! Function library, which merges several sets' `ZRANGE ... REV` (score, then member, descending).
use crate::time::Millis;
use std::cmp::Reverse;

/// A card's place in its column: the smaller place comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BoardPlace<'a>(Reverse<(Option<Millis>, &'a str)>);

impl<'a> BoardPlace<'a> {
    pub fn new(created: Option<Millis>, id: &'a str) -> Self {
        BoardPlace(Reverse((created, id)))
    }
    pub fn id(&self) -> &'a str {
        (self.0).0 .1
    }
    /// From a sorted set's score (`record::created_score`: -inf for a card without `createdAt`).
    pub fn of_score(score: f64, id: &'a str) -> Self {
        BoardPlace::new(score.is_finite().then_some(score as Millis), id)
    }
}

/// The MongoDB path's sort document, as (field, direction) pairs: MongoDB sorts a missing
/// `createdAt` (null) below every date, so descending puts it last, as `BoardPlace` does.
pub const MONGO_SORT: [(&str, i32); 2] = [("createdAt", -1), ("_id", -1)];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::created_score;

    #[test]
    fn newest_first_then_greater_id_then_cards_without_a_time() {
        let mut cards = vec![(Some(5), "a"), (None, "z"), (Some(9), "b"), (Some(5), "c"), (None, "y")];
        cards.sort_by_key(|(created, id)| BoardPlace::new(*created, id));
        assert_eq!(cards, [(Some(9), "b"), (Some(5), "c"), (Some(5), "a"), (None, "z"), (None, "y")]);
    }

    #[test]
    fn a_sorted_set_score_gives_the_same_place() {
        let card = |created_at| crate::card::StoredCard::from_doc(&crate::model::CardDoc { created_at, ..Default::default() });
        for created in [None, Some(0), Some(-5), Some(1_700_000_000_123)] {
            assert_eq!(BoardPlace::of_score(created_score(&card(created)), "x"), BoardPlace::new(created, "x"));
        }
        assert!(BoardPlace::of_score(1.0, "a") < BoardPlace::of_score(f64::NEG_INFINITY, "z"));
    }
}
