//! Case-insensitive text as CONTRACT.md 3 defines it: two strings are equal when they are equal
//! after mapping each character by Unicode simple case folding (CaseFolding.txt statuses C and
//! S): no locale rules, no expansions. `ΚΏΣ` finds `Κώστας` (`ς`, `σ`, `Σ` are one letter),
//! `YILMAZ` does not find `Yılmaz`, `WEISS` does not find `Weiß`. MongoDB's `$regex` with `i`
//! (PCRE) and FerretDB's (Go `regexp`) compare per character by the same orbits.
//!
//! The tables are regex-syntax's (the `regex` crate's), Unicode 16.0. This is the one home of
//! that rule: the projection folds the stored search fields, their
//! trigrams and the search term with `fold`; nothing else lower-cases for matching.
use regex_syntax::hir::{ClassUnicode, ClassUnicodeRange};

/// The representative of `c`'s simple case-folding orbit: its smallest member. Any fixed choice
/// works, as long as stored text and search terms use the same one; the smallest keeps every
/// character of an orbit (`K`, `k` and the Kelvin sign `K`) on one key.
pub fn fold_char(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_uppercase();
    }
    match FOLDED_BELOW_800.get(c as usize - 0x80) {
        Some(folded) => *folded,
        None => fold_by_class(c),
    }
}

/// `fold_by_class` of U+0080..U+07FF (Latin, Greek, Cyrillic, ...: most non-ASCII letters of
/// names), computed once: building and folding a class per character was 2% of a 1M-card index
/// build.
static FOLDED_BELOW_800: std::sync::LazyLock<Vec<char>> = std::sync::LazyLock::new(|| ('\u{80}'..='\u{7FF}').map(fold_by_class).collect());

fn fold_by_class(c: char) -> char {
    let mut class = ClassUnicode::new([ClassUnicodeRange::new(c, c)]);
    class.case_fold_simple();
    class.iter().next().map(|r| r.start()).unwrap_or(c)
}

/// `text` with every character folded (same number of characters: simple folding never expands).
pub fn fold(text: &str) -> String {
    text.chars().map(fold_char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn finds(haystack: &str, needle: &str) -> bool {
        fold(haystack).contains(&fold(needle))
    }

    #[test]
    fn the_contracts_examples() {
        assert!(finds("Κώστας", "ΚΏΣ"));
        assert!(finds("Κώστας", "ΚΏΣΤΑΣ"), "final sigma and sigma are one letter");
        assert!(!finds("Yılmaz", "YILMAZ"), "no Turkish dotless-i rule");
        assert!(!finds("Weiß", "WEISS"), "no expansions");
        assert!(finds("Weiß", "WEIẞ"), "capital sharp s folds to ß (status S)");
        assert!(finds("İlker", "İLKER"), "İ is itself, no locale rule");
        assert!(!finds("İlker", "ilker"));
        assert!(finds("Ольга", "ОЛЬГА"));
        assert!(finds("Zoë Ångström", "zoË åNG"));
        assert!(finds("王李", "李"));
        assert!(finds("Kelvin", "\u{212A}elvin"), "the Kelvin sign is a K");
        assert!(finds("+1 (555) 0101", "(555)"));
    }

    #[test]
    fn the_table_folds_every_character_it_holds_as_the_classes_do() {
        for c in '\u{80}'..='\u{7FF}' {
            assert_eq!(fold_char(c), fold_by_class(c), "{c:?}");
        }
    }

    proptest! {
        #[test]
        fn the_table_folds_as_the_classes_do(c in any::<char>()) {
            prop_assert_eq!(fold_char(c), if c.is_ascii() { c.to_ascii_uppercase() } else { fold_by_class(c) });
        }
    }

    #[test]
    fn whole_string_lowercasing_is_not_the_rule() {
        // `to_lowercase` turns İ into two characters and applies the final-sigma rule; folding
        // per character does neither.
        assert_eq!(fold("İ").chars().count(), 1);
        assert_eq!(fold("ΣΑΣ"), fold("σας"));
    }

    proptest! {
        #[test]
        fn folding_is_idempotent_and_keeps_length(text in "\\PC{0,30}") {
            let once = fold(&text);
            prop_assert_eq!(fold(&once), once.clone());
            prop_assert_eq!(once.chars().count(), text.chars().count());
        }

        /// In the Basic Multilingual Plane: the folding tables are regex-syntax's (Unicode 16),
        /// the standard library's case mappings may be of a newer Unicode, whose new cased
        /// letters (e.g. U+16EA0) the tables do not know yet and compare as themselves.
        #[test]
        fn a_character_folds_like_its_one_character_lower_case(c in proptest::char::range('\0', '\u{FFFF}')) {
            let mut lower = c.to_lowercase();
            if let (Some(l), None) = (lower.next(), lower.next()) {
                prop_assert_eq!(fold_char(l), fold_char(c), "{:?} and its lower case {:?}", c, l);
            }
        }
    }
}
