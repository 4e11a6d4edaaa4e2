//! Times travel as RFC 3339 UTC strings outside MongoDB and as epoch milliseconds inside the
//! projection (a sorted-set score holds every millisecond of the next 285,000 years exactly).
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};

pub type Millis = i64;

/// The wall clock in Unix milliseconds: the one clock of progress stamps, lease and
/// readiness ages.
pub fn now_millis() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    DateTime::parse_from_rfc3339(s).ok().map(|d| d.with_timezone(&Utc).timestamp_millis())
}

pub fn format_millis(ms: Millis) -> String {
    Utc.timestamp_millis_opt(ms).single().map(|d| d.to_rfc3339_opts(SecondsFormat::Millis, true)).unwrap_or_default()
}

/// serde adapter: `Option<Millis>` <-> RFC 3339 string or null. A string that is not a valid
/// RFC 3339 time is a deserialization error (the event goes to the dead-letter topic).
pub mod opt_rfc3339 {
    use super::*;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Millis>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(ms) => s.serialize_str(&format_millis(*ms)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Millis>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => parse_rfc3339(&s).map(Some).ok_or_else(|| D::Error::custom(format!("not an RFC 3339 time: {s:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_millisecond_times() {
        let ms = parse_rfc3339("2026-11-30T09:25:59.123Z").unwrap();
        assert_eq!(format_millis(ms), "2026-11-30T09:25:59.123Z");
        assert_eq!(parse_rfc3339("2026-11-30T10:25:59.123+01:00"), Some(ms));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
