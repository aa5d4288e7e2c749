//! Staff accounts (admin only).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use rusqlite::params;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::auth::{Caller, Role};
use super::extract::ApiJson;
use super::problem::Problem;
use super::session::validate_password;
use crate::audit;
use crate::error::Error;
use labrack_provisioner::roles;

#[derive(Debug, Serialize, ToSchema)]
pub struct StaffAccount {
    pub id: i64,
    pub username: String,
    pub role: Role,
    pub must_change_password: bool,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StaffList {
    pub staff: Vec<StaffAccount>,
}

/// Lists staff accounts.
#[utoipa::path(get, operation_id = "list_staff", path = "/v1/staff", tag = "staff", responses((status = 200, body = StaffList), (status = 403, body = Problem)))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<StaffList>, Error> {
    caller.require_staff(&roles::ADMINS)?;
    let staff = state
        .db
        .read(|conn| {
            let mut stmt = conn.prepare("SELECT id, username, role, must_change_password, created_at FROM staff ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                let role: String = r.get(2)?;
                Ok(StaffAccount {
                    id: r.get(0)?,
                    username: r.get(1)?,
                    role: Role::parse(&role).unwrap_or(Role::Judge),
                    must_change_password: r.get(3)?,
                    created_at: r.get(4)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Error::from)
        })
        .await?;
    Ok(Json(StaffList { staff }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewStaff {
    /// 3–64 characters: letters, digits, `.`, `_`, `-`
    #[schema(pattern = "^\\s*[A-Za-z0-9._-]{3,64}\\s*$")]
    pub username: String,
    /// an initial password (12–256 characters) the person must change at first login
    #[schema(min_length = 12, max_length = 256)]
    pub password: String,
    pub role: Role,
}

/// Creates a staff account. The person must change the password at first login.
#[utoipa::path(post, operation_id = "create_staff", path = "/v1/staff", tag = "staff", request_body = NewStaff,
    responses((status = 201, body = StaffAccount), (status = 403, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewStaff>,
) -> Result<(StatusCode, Json<StaffAccount>), Error> {
    caller.require_staff(&roles::ADMINS)?;
    let username = req.username.trim().to_owned();
    let valid = (3..=64).contains(&username.len())
        && username
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(Error::invalid(
            "username",
            "username must be 3–64 characters of letters, digits, '.', '_' or '-'",
        ));
    }
    validate_password(&req.password, "password")?;
    let password = req.password.clone();
    let hash = state.passwords.hash(password).await?;
    let role = req.role;
    let account = state
        .db
        .writer()
        .write(move |conn| {
            let taken: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM staff WHERE username = ?1)", [&username], |r| r.get(0))?;
            if taken {
                return Err(Error::conflict(Some("username"), format!("username {username:?} is taken")));
            }
            let created_at = crate::clock::now_rfc3339();
            conn.execute(
                "INSERT INTO staff (username, password_hash, role, must_change_password, created_at) VALUES (?1, ?2, ?3, 1, ?4)",
                params![username, hash, role.as_str(), created_at],
            )?;
            let id = conn.last_insert_rowid();
            audit::record(conn, &caller.actor(), &caller.meta, "staff.created", Some(&format!("staff:{id}")), serde_json::json!({"username": username, "role": role.as_str()}))?;
            Ok(StaffAccount { id, username, role, must_change_password: true, created_at })
        })
        .await?;
    Ok((StatusCode::CREATED, Json(account)))
}
