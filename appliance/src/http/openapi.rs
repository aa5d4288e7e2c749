//! The OpenAPI document (`GET /api/openapi.json`): generated from the handlers' annotations,
//! then completed with what every operation shares, so that it names every status, content
//! type and credential the server answers with. The UIs' types are generated from it and
//! `cargo xtask test` holds the server to it with schemathesis.
//!
//! What the annotations give: each operation's own answers (its success body, and the
//! refusals its rules make). What [`Conventions`] adds, from the operation's shape:
//! - every error as `application/problem+json` with the `Problem` schema;
//! - 400/413/415/422 where there is a body, 400 where there are parameters, 404 where the
//!   path names a thing;
//! - the credential (a session as bearer token or cookie, or a lab host's signature) with
//!   401 and 403, except for the few operations anyone may call;
//! - 503 with `Retry-After` everywhere (shutting down, or a bounded queue is full).

use std::sync::OnceLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi as _;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{Content, HeaderBuilder, OpenApi, Ref, RefOr, ResponseBuilder, Schema};

use super::auth::SESSION_COOKIE;

/// What the document says besides its paths: title, shared schemas, tags. The paths come
/// from the router ([`super::api_routes`]); see [`model`].
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "LabRack appliance API", version = "1", description = "Control plane of the LabRack edge appliance. Errors are application/problem+json (RFC 9457)."),
    components(schemas(super::problem::Problem, crate::error::RowError, super::auth::Principal, super::auth::Role)),
    tags((name = "auth"), (name = "staff"), (name = "events"), (name = "people"), (name = "audit"), (name = "hosts"), (name = "labs"), (name = "jobs"), (name = "checks"), (name = "scores"), (name = "assist"), (name = "billing")),
)]
pub struct ApiDoc;

/// Operations anyone may call, without a session.
const PUBLIC: &[(&str, &str)] = &[
    ("get", "/api/v1/appliance"),
    ("post", "/api/v1/auth/login"),
    ("post", "/api/v1/join"),
    ("post", "/api/v1/hosts/enrol"),
    ("get", "/api/v1/events/{event_id}/scoreboard"),
    ("get", "/api/v1/events/{event_id}/scoreboard/stream"),
];

/// Operations lab hosts call, signed with their key (`Authorization: LabrackHost …`).
const HOST_SIGNED: &[&str] = &[
    "/api/v1/host/poll",
    "/api/v1/host/report",
    "/api/v1/host/heartbeat",
];

/// The security schemes' names in the document.
const BEARER: &str = "session_bearer";
const COOKIE: &str = "session_cookie";
const HOST_SIGNATURE: &str = "host_signature";

/// Completes every operation with what they share (see the module's comment).
pub struct Conventions;

impl utoipa::Modify for Conventions {
    fn modify(&self, doc: &mut OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(COOKIE, SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
            SESSION_COOKIE,
            "the session cookie login and join set; writes with it also need the X-CSRF-Token header",
        ))));
        components.add_security_scheme(HOST_SIGNATURE, SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
            "Authorization",
            "`LabrackHost host=ID,ts=MS,sig=BASE64`: the body signed with the host's enrolled key",
        ))));
        for schema in components.schemas.values_mut() {
            printable_text_rule(schema);
        }
        if let Some(enrol) = doc
            .paths
            .paths
            .get_mut("/api/v1/hosts/enrol")
            .and_then(|item| item.post.as_mut())
            && let Some(body) = enrol.request_body.as_mut()
            && let Ok(schema) = serde_json::from_value::<RefOr<Schema>>(enrol_request_schema())
        {
            body.content
                .insert("application/json".to_owned(), Content::new(Some(schema)));
        }
        for (path, item) in doc.paths.paths.iter_mut() {
            let operations = [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
                ("patch", &mut item.patch),
            ];
            for (method, operation) in operations {
                if let Some(operation) = operation {
                    complete(method, path, operation);
                }
            }
        }
    }
}

/// The host protocol's `EnrolRequest` (its types live in labrack-provisioner, which has no
/// OpenAPI derive): what `labrack-host enrol` sends with the enrolment token.
fn enrol_request_schema() -> serde_json::Value {
    let enforcement = [
        "cpu",
        "memory",
        "pids",
        "io_weight",
        "devices",
        "disk",
        "network",
    ];
    serde_json::json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["version", "token", "name", "public_key", "address", "capacity", "resources"],
        "properties": {
            "version": {"type": "integer", "enum": [labrack_provisioner::protocol::PROTOCOL_VERSION]},
            "token": {"type": "string", "description": "the enrolment token staff issued"},
            "name": {"type": "string", "pattern": "^\\s*[A-Za-z0-9._-]{1,64}\\s*$", "description": "the host's name in the inventory (unique)"},
            "public_key": {"type": "string", "description": "the Ed25519 public key, base64 (standard, padded), 32 bytes"},
            "address": {"type": "string", "maxLength": 253, "pattern": PRINTABLE_TEXT},
            "capacity": {"type": "integer", "minimum": 1, "maximum": 256},
            "resources": {
                "type": "object",
                "additionalProperties": false,
                "required": ["cpus", "memory_mib", "pids_max", "gpus", "isolation", "enforces"],
                "properties": {
                    "cpus": {"type": "integer", "minimum": 1, "maximum": 4096},
                    "memory_mib": {"type": "integer", "minimum": 64, "maximum": 64u64 * 1024 * 1024},
                    "pids_max": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
                    "gpus": {"type": "integer", "minimum": 0, "maximum": 64},
                    "gpu_units": {"type": "array", "maxItems": 64, "items": {
                        "type": "object", "additionalProperties": false, "required": ["memory_mib", "mig"],
                        "properties": {"memory_mib": {"type": "integer", "minimum": 0}, "mig": {"type": "boolean"}},
                    }},
                    "isolation": {"type": "string", "pattern": "^[A-Za-z0-9-]{1,40}$"},
                    "enforces": {"type": "array", "maxItems": 16, "items": {"type": "string", "enum": enforcement}},
                },
            },
        },
    })
}

/// What `validate::name` accepts, as a pattern: not blank, no control characters. Every
/// request field it checks carries its `max_length`; such a string property without a
/// pattern or `min_length` of its own (passwords have one: any characters go) gets this one.
const PRINTABLE_TEXT: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$";

fn printable_text_rule(schema: &mut RefOr<Schema>) {
    let RefOr::T(Schema::Object(object)) = schema else {
        return;
    };
    for property in object.properties.values_mut() {
        if let RefOr::T(Schema::Object(field)) = property
            && field.max_length.is_some()
            && field.min_length.is_none()
            && field.pattern.is_none()
            && field.format.is_none()
        {
            field.pattern = Some(PRINTABLE_TEXT.to_owned());
        }
    }
}

fn complete(method: &str, path: &str, operation: &mut Operation) {
    let has_body = operation.request_body.is_some();
    let has_parameters =
        operation.parameters.as_ref().is_some_and(|p| !p.is_empty()) || path.contains('{');
    let mut shared: Vec<(&str, &str)> = vec![(
        "503",
        "the appliance is shutting down, or a bounded queue is full: retry after Retry-After",
    )];
    if has_body {
        shared.push(("400", "the body is not valid JSON (or not UTF-8)"));
        shared.push(("413", "the body is larger than this operation accepts"));
        shared.push((
            "415",
            "the body's content type is not the one this operation reads",
        ));
        shared.push(("422", "a field breaks a rule; `field` names it"));
    }
    if has_parameters {
        shared.push(("400", "a path or query parameter does not parse"));
    }
    let has_query = operation
        .parameters
        .iter()
        .flatten()
        .any(|p| matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Query));
    if has_query && !has_body {
        shared.push(("422", "a query parameter breaks a rule; `field` names it"));
    }
    if path.contains('{') {
        shared.push((
            "404",
            "the thing the path names does not exist, or the caller may not know of it",
        ));
    }
    if HOST_SIGNED.contains(&path) {
        operation.security = Some(vec![SecurityRequirement::new(
            HOST_SIGNATURE,
            Vec::<String>::new(),
        )]);
        shared.push((
            "401",
            "the host's signature is missing, wrong, stale or replayed, or the host is unknown",
        ));
    } else if !PUBLIC.contains(&(method, path)) {
        operation.security = Some(vec![
            SecurityRequirement::new(BEARER, Vec::<String>::new()),
            SecurityRequirement::new(COOKIE, Vec::<String>::new()),
        ]);
        shared.push(("401", "no valid session"));
        shared.push(("403", "the session's role or team may not do this, or a cookie-authenticated write lacks X-CSRF-Token"));
    }
    for (status, description) in shared {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| {
                ResponseBuilder::new()
                    .description(description)
                    .build()
                    .into()
            });
    }
    for (status, response) in operation.responses.responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        if !status.starts_with('4') && !status.starts_with('5') {
            continue;
        }
        response.content.clear();
        response.content.insert(
            "application/problem+json".to_owned(),
            Content::new(Some(RefOr::<Schema>::Ref(Ref::from_schema_name("Problem")))),
        );
        if matches!(status.as_str(), "429" | "503") {
            response.headers.insert(
                "Retry-After".to_owned(),
                HeaderBuilder::new()
                    .schema(
                        utoipa::openapi::ObjectBuilder::new()
                            .schema_type(utoipa::openapi::schema::Type::Integer),
                    )
                    .description(Some("seconds to wait before trying again"))
                    .build(),
            );
        }
    }
}

/// `GET /api/openapi.json`: the document, built once.
/// The whole document: the routes' own annotations under `/api`, completed by
/// [`Conventions`].
pub fn model() -> OpenApi {
    let (_, routes) = super::api_routes().split_for_parts();
    let mut doc = ApiDoc::openapi().nest("/api", routes);
    utoipa::Modify::modify(&Conventions, &mut doc);
    doc
}

pub async fn document() -> Response {
    static DOCUMENT: OnceLock<Vec<u8>> = OnceLock::new();
    let body = DOCUMENT
        .get_or_init(|| serde_json::to_vec(&model()).unwrap_or_default())
        .clone();
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query struct without `parameter_in = Query` is documented as path parameters.
    #[test]
    fn operation_ids_are_unique_so_generated_clients_can_name_them() {
        let doc = serde_json::to_value(model()).expect("document");
        let mut seen = std::collections::BTreeMap::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("path item") {
                let id = operation["operationId"]
                    .as_str()
                    .expect("an operationId")
                    .to_owned();
                if let Some(other) = seen.insert(id.clone(), format!("{method} {path}")) {
                    panic!("operationId {id} names both {other} and {method} {path}");
                }
            }
        }
    }

    #[test]
    fn every_path_parameter_is_in_its_path_and_every_error_a_problem_document() {
        let doc = serde_json::to_value(model()).expect("document");
        let paths = doc["paths"].as_object().expect("paths");
        assert!(paths.len() > 50);
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("path item") {
                for parameter in operation["parameters"].as_array().into_iter().flatten() {
                    let name = parameter["name"].as_str().expect("name");
                    let inside = path.contains(&format!("{{{name}}}"));
                    assert_eq!(
                        parameter["in"] == "path",
                        inside,
                        "{method} {path}: parameter {name} is in {}",
                        parameter["in"]
                    );
                }
                for (status, response) in operation["responses"].as_object().expect("responses") {
                    if status.starts_with('4') || status.starts_with('5') {
                        let content = response["content"].as_object().expect("content");
                        assert_eq!(
                            content.keys().collect::<Vec<_>>(),
                            ["application/problem+json"],
                            "{method} {path} {status}"
                        );
                    }
                }
                assert!(
                    operation["responses"].get("503").is_some(),
                    "{method} {path}"
                );
            }
        }
    }
}
