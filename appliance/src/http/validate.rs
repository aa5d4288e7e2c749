//! Field rules shared by handlers.

use crate::error::Error;

/// A trimmed, non-empty, printable name of at most `max` characters.
pub fn name(field: &str, value: &str, max: usize) -> Result<String, Error> {
    labrack_wire::fields::name(field, value, max).map_err(|e| Error::invalid(&e.field, e.message))
}

/// An optional e-mail address: empty means none.
pub fn email(field: &str, value: Option<&str>) -> Result<Option<String>, Error> {
    labrack_wire::fields::email(field, value).map_err(|e| Error::invalid(&e.field, e.message))
}

/// An RFC 3339 timestamp, returned normalised to UTC.
pub fn timestamp(field: &str, value: &str) -> Result<time::OffsetDateTime, Error> {
    time::OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            Error::invalid(
                field,
                format!("{field} must be an RFC 3339 timestamp like 2026-12-01T09:00:00Z"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_rule_is_a_problem_naming_its_field() {
        // The rules themselves are tested in labrack-wire; here, that the field travels.
        assert!(
            matches!(name("team", "   ", 10), Err(Error::Invalid { field: Some(f), .. }) if f == "team")
        );
        assert!(
            matches!(email("email", Some("a@b")), Err(Error::Invalid { field: Some(f), .. }) if f == "email")
        );
    }

    #[test]
    fn timestamps() {
        assert!(timestamp("t", "2026-12-01T09:00:00Z").is_ok());
        assert!(timestamp("t", "2026-12-01T10:00:00+01:00").is_ok());
        assert!(timestamp("t", "tomorrow").is_err());
    }
}
