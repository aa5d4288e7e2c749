//! Field rules shared by handlers.

use super::error::ApiError;

/// A trimmed, non-empty, printable name of at most `max` characters.
pub fn name(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    labrack_wire::fields::name(field, value, max).map_err(|e| ApiError::invalid(&e.field, e.message))
}

/// An optional e-mail address: empty means none.
pub fn email(field: &str, value: Option<&str>) -> Result<Option<String>, ApiError> {
    labrack_wire::fields::email(field, value).map_err(|e| ApiError::invalid(&e.field, e.message))
}

/// An RFC 3339 timestamp, returned normalised to UTC.
pub fn timestamp(field: &str, value: &str) -> Result<time::OffsetDateTime, ApiError> {
    time::OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|_| ApiError::invalid(field, format!("{field} must be an RFC 3339 timestamp like 2026-12-01T09:00:00Z")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(name("n", "  Ada  ", 10).ok().as_deref(), Some("Ada"));
        assert!(name("n", "   ", 10).is_err());
        assert!(name("n", "abcdefghijk", 10).is_err());
        assert!(name("n", "a\u{7}b", 10).is_err());
    }

    #[test]
    fn emails() {
        assert_eq!(email("e", Some("")).ok(), Some(None));
        assert!(email("e", Some("a@b.io")).is_ok_and(|e| e.as_deref() == Some("a@b.io")));
        for bad in ["a", "a@b", "@b.io", "a b@c.io", "a@b@c.io"] {
            assert!(email("e", Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps() {
        assert!(timestamp("t", "2026-12-01T09:00:00Z").is_ok());
        assert!(timestamp("t", "2026-12-01T10:00:00+01:00").is_ok());
        assert!(timestamp("t", "tomorrow").is_err());
    }
}
