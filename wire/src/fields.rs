//! Field rules shared by everything people type: names and e-mail addresses.

/// A field that breaks its rule: which field, and the rule in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn broken(field: &str, message: String) -> FieldError {
    FieldError {
        field: field.to_owned(),
        message,
    }
}

/// A trimmed, non-empty, printable name of at most `max` characters.
pub fn name(field: &str, value: &str, max: usize) -> Result<String, FieldError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(broken(field, format!("{field} must not be empty")));
    }
    // counted before trimming, as the API document's maxLength counts
    if value.chars().count() > max {
        return Err(broken(
            field,
            format!("{field} must be at most {max} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(broken(
            field,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// An optional e-mail address: empty means none.
pub fn email(field: &str, value: Option<&str>) -> Result<Option<String>, FieldError> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let valid = value.len() <= 254
        && !value.chars().any(|c| c.is_whitespace() || c.is_control())
        && value.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.contains('@')
        });
    if valid {
        Ok(Some(value.to_owned()))
    } else {
        Err(broken(field, format!("{field} is not an e-mail address")))
    }
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
}
