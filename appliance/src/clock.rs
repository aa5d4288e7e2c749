//! The appliance's one reader of the wall clock (a tidy check keeps it so). Everything else
//! asks here, or takes the time as an argument, so every place time enters is visible and
//! stored times have one form: milliseconds since the Unix epoch, or RFC 3339 text for
//! people.

/// Now, in milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Now, in milliseconds since the Unix epoch, as SQLite stores it.
pub fn now_ms() -> i64 {
    i64::try_from(unix_ms()).unwrap_or(i64::MAX)
}

/// Now, in whole seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    now_utc().unix_timestamp()
}

/// Now, as a date and time in UTC.
pub fn now_utc() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Now, as RFC 3339 UTC with second precision.
pub fn now_rfc3339() -> String {
    format_time(now_utc())
}

/// `t` as RFC 3339 UTC with second precision.
pub fn format_time(t: time::OffsetDateTime) -> String {
    let t = t
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Stored milliseconds as RFC 3339 text; None when out of range.
pub fn format_ms(ms: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .map(format_time)
}

/// Optional stored milliseconds as RFC 3339 text.
pub fn format_ms_opt(ms: Option<i64>) -> Option<String> {
    ms.and_then(format_ms)
}

/// Stored milliseconds as RFC 3339 text, empty when out of range.
pub fn format_ms_or_empty(ms: i64) -> String {
    format_ms(ms).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_print_as_utc_seconds() {
        assert_eq!(
            format_ms(1_700_000_000_999).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(format_ms(i64::MAX), None);
        assert!(now_ms() > 1_700_000_000_000);
    }
}
