//! Request extractors that fail with problem documents: strict JSON (unknown fields
//! rejected, the failing field named), CSV bodies, and request metadata for the audit log.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;

use super::problem::Rejection;
pub use crate::audit::RequestMeta;
use crate::error::Error;

/// Largest JSON body any endpoint accepts.
pub const JSON_LIMIT: usize = 64 * 1024;
/// Largest CSV upload.
pub const CSV_LIMIT: usize = 1024 * 1024;

/// A JSON body parsed strictly into `T` (which should `deny_unknown_fields`).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Rejection;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        require_content_type(req.headers(), "application/json")?;
        let body = read_limited(req, JSON_LIMIT).await?;
        Ok(Self(parse_json(&body)?))
    }
}

/// Parses a JSON object strictly into `T`, naming the failing field.
///
/// JSON has one number type: `3.0` is the integer 3 (JSON Schema agrees), so integral
/// numbers are accepted where integers are expected. Every body is an object: serde would
/// also take a struct written as an array of its fields, which no client means to send.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    let mut value: serde_json::Value = {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let value =
            serde::Deserialize::deserialize(&mut deserializer).map_err(|e| Error::Malformed {
                detail: format!("body is not valid JSON: {e}"),
                field: None,
            })?;
        deserializer.end().map_err(|e| Error::Malformed {
            detail: format!("trailing data after JSON: {e}"),
            field: None,
        })?;
        value
    };
    if !value.is_object() {
        return Err(Error::Invalid {
            detail: "the body must be a JSON object".into(),
            field: Some("body".into()),
        });
    }
    integral_numbers_as_integers(&mut value);
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let message = inner.to_string();
        let field = if path != "." {
            Some(path.clone())
        } else {
            // serde names an unknown or missing field only in its message: `name`.
            message.split('`').nth(1).map(str::to_owned)
        };
        let detail = if path == "." {
            message
        } else {
            format!("{path}: {message}")
        };
        Error::Invalid { detail, field }
    })
}

/// Turns every number with no fraction that fits an integer (`3.0`, `-2e3`) into that integer.
fn integral_numbers_as_integers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(number) if number.is_f64() => {
            if let Some(float) = number.as_f64().filter(|f| f.fract() == 0.0) {
                // within ±2^53 every integer is exact; beyond it a float names no one integer
                if float.abs() <= 9_007_199_254_740_992.0 {
                    *value = serde_json::Value::from(float as i64);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_numbers_as_integers),
        serde_json::Value::Object(members) => {
            members.values_mut().for_each(integral_numbers_as_integers)
        }
        _ => {}
    }
}

/// A UTF-8 CSV body (`text/csv`).
#[derive(Debug)]
pub struct CsvBody(pub String);

impl<S: Send + Sync> FromRequest<S> for CsvBody {
    type Rejection = Rejection;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        require_content_type(req.headers(), "text/csv")?;
        let body = read_limited(req, CSV_LIMIT).await?;
        let text = String::from_utf8(body.to_vec()).map_err(|e| Error::Malformed {
            detail: format!(
                "csv is not valid UTF-8 (byte {})",
                e.utf8_error().valid_up_to()
            ),
            field: None,
        })?;
        Ok(Self(text))
    }
}

pub(crate) fn require_content_type(
    headers: &HeaderMap,
    expected: &'static str,
) -> Result<(), Rejection> {
    let given = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = given
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == expected {
        Ok(())
    } else {
        Err(Rejection::UnsupportedMediaType { expected })
    }
}

pub(crate) async fn read_limited(req: Request, limit: usize) -> Result<axum::body::Bytes, Error> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(Error::TooLarge { limit });
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| Error::TooLarge { limit })
}

/// Where the request in `parts` came from: the peer address and the request id header.
pub(crate) fn request_meta(parts: &Parts) -> RequestMeta {
    let remote_addr = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string())
        .unwrap_or_else(|| "local".to_owned());
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    RequestMeta {
        remote_addr,
        request_id,
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestMeta {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(request_meta(parts))
    }
}

/// A path parameter that answers a problem document when it does not parse.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(value) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        amount: i64,
        note: Option<String>,
    }

    #[test]
    fn integral_numbers_are_integers_and_fractions_are_not() {
        assert_eq!(
            parse_json::<Entry>(br#"{"amount": 3.0}"#).expect("3.0 is 3"),
            Entry {
                amount: 3,
                note: None
            }
        );
        assert_eq!(
            parse_json::<Entry>(br#"{"amount": -2e3}"#)
                .expect("-2e3 is -2000")
                .amount,
            -2000
        );
        assert!(
            matches!(parse_json::<Entry>(br#"{"amount": 2.5}"#), Err(Error::Invalid { field: Some(f), .. }) if f == "amount")
        );
        assert!(matches!(
            parse_json::<Entry>(br#"{"amount": 1e300}"#),
            Err(Error::Invalid { .. })
        ));
    }

    #[test]
    fn a_body_is_an_object_and_broken_json_is_malformed() {
        assert!(
            matches!(parse_json::<Entry>(br#"[5, null]"#), Err(Error::Invalid { field: Some(f), .. }) if f == "body")
        );
        assert!(matches!(
            parse_json::<Entry>(br#"{"amount": 1"#),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            parse_json::<Entry>(br#"{"amount": 1} {}"#),
            Err(Error::Malformed { .. })
        ));
        assert!(
            matches!(parse_json::<Entry>(br#"{"amount": "1"}"#), Err(Error::Invalid { field: Some(f), .. }) if f == "amount")
        );
        assert!(matches!(
            parse_json::<Entry>(br#"{"amount": 1, "extra": 2}"#),
            Err(Error::Invalid { .. })
        ));
    }
}
