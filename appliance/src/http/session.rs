//! Logging in and out, the session, password change and participant join.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rusqlite::{OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::auth::{
    Caller, PARTICIPANT_SESSION_SECS, Principal, Role, STAFF_SESSION_SECS, create_session,
    hash_secret, session_cookie,
};
use super::extract::{ApiJson, RequestMeta};
use super::problem::Problem;
use crate::attempts;
use crate::audit;
use crate::error::Error;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
    /// also return the session token in the body, for clients that send it as a bearer
    /// token (scripts, the desktop console) instead of keeping the cookie
    #[serde(default)]
    pub bearer: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionInfo {
    pub principal: Principal,
    /// send as `X-CSRF-Token` on every cookie-authenticated write
    pub csrf_token: String,
    /// only when asked for with `bearer: true`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

fn with_cookie(state: &AppState, token: &str, lifetime: i64, body: SessionInfo) -> Response {
    let mut response = Json(body).into_response();
    if let Ok(value) = HeaderValue::from_str(&session_cookie(token, state.secure_cookies, lifetime))
    {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// Staff login with username and password.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = SessionInfo), (status = 401, body = Problem), (status = 429, body = Problem)))]
pub async fn login(
    State(state): State<AppState>,
    meta: RequestMeta,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response, Error> {
    if req.username.len() > 64 || req.password.len() > 256 {
        return Err(Error::Unauthenticated("wrong username or password".into()));
    }
    // Counted before the lookup and argon2, so a burst cannot pass the check together.
    let client = meta.client_key();
    let account = format!("user:{}", req.username.to_lowercase());
    let keys = [
        (client.clone(), attempts::CLIENT),
        (
            format!("{account} from {client}"),
            attempts::ACCOUNT_FROM_CLIENT,
        ),
        (account, attempts::ACCOUNT),
    ];
    if let Err(refused) = state.attempts.begin(&keys) {
        state.metrics.login_rate_limited.inc();
        if refused.first {
            let detail = serde_json::json!({"username": req.username, "retry_after_secs": refused.retry_after.as_secs().max(1)});
            audit_refused(&state, &meta, "auth.lockout", None, detail).await;
        }
        return Err(refused.into());
    }
    let username = req.username.clone();
    let found = state
        .db
        .read(move |conn| {
            conn.query_row(
                "SELECT id, username, password_hash, role, must_change_password FROM staff WHERE username = ?1",
                [&username],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, bool>(4)?)),
            )
            .optional()
            .map_err(Error::from)
        })
        .await?;
    let stored = found.as_ref().map(|f| f.2.clone());
    let password = req.password.clone();
    let verified = match state.passwords.verify(password, stored).await {
        Ok(verified) => verified,
        Err(error) => {
            // not a guess: the pool was full, so nothing was tried
            state.attempts.refund(&keys);
            return Err(error.into());
        }
    };
    let Some((id, username, _, role, must_change_password)) = found.clone().filter(|_| verified)
    else {
        tracing::info!(remote_addr = %meta.remote_addr, "login failed");
        let target = found.map(|f| format!("staff:{}", f.0));
        audit_refused(
            &state,
            &meta,
            "auth.login_failed",
            target,
            serde_json::json!({"username": req.username}),
        )
        .await;
        return Err(Error::Unauthenticated("wrong username or password".into()));
    };
    state.attempts.refund(&keys[..1]);
    state
        .attempts
        .succeeded(&[keys[1].0.clone(), keys[2].0.clone()]);
    let principal = Principal::Staff {
        id,
        username,
        role: Role::parse(&role).unwrap_or(Role::Judge),
        must_change_password,
    };
    let session_principal = principal.clone();
    let (token, csrf) = state
        .db
        .writer()
        .write(move |conn| {
            let created = create_session(conn, &session_principal)?;
            audit::record(
                conn,
                &session_principal.actor(),
                &meta,
                "auth.login",
                None,
                serde_json::json!({}),
            )?;
            Ok::<_, Error>(created)
        })
        .await?;
    let body = SessionInfo {
        principal,
        csrf_token: csrf,
        token: req.bearer.then(|| token.clone()),
    };
    Ok(with_cookie(&state, &token, STAFF_SESSION_SECS, body))
}

/// Ends the current session.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", responses((status = 204), (status = 401, body = Problem)))]
pub async fn logout(State(state): State<AppState>, caller: Caller) -> Result<Response, Error> {
    let token_hash = caller.token_hash.clone();
    state
        .db
        .writer()
        .write(move |conn| {
            conn.execute("DELETE FROM sessions WHERE token_hash = ?1", [&token_hash])?;
            audit::record(
                conn,
                &caller.actor(),
                &caller.meta,
                "auth.logout",
                None,
                serde_json::json!({}),
            )
        })
        .await?;
    state.access_changed();
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(value) = HeaderValue::from_str(&session_cookie("", state.secure_cookies, 0)) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// The current session's principal and CSRF token.
#[utoipa::path(get, path = "/v1/auth/session", tag = "auth", responses((status = 200, body = SessionInfo), (status = 401, body = Problem)))]
pub async fn current(caller: Caller) -> Json<SessionInfo> {
    Json(SessionInfo {
        principal: caller.principal,
        csrf_token: caller.csrf_token,
        token: None,
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    pub current_password: String,
    /// 12 to 256 characters
    #[schema(min_length = 12, max_length = 256)]
    pub new_password: String,
}

/// Changes the caller's own password (staff). Other sessions of the account end.
#[utoipa::path(post, path = "/v1/auth/password", tag = "auth", request_body = PasswordChange,
    responses((status = 200, body = SessionInfo), (status = 401, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn change_password(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<PasswordChange>,
) -> Result<Json<SessionInfo>, Error> {
    let Principal::Staff {
        id, username, role, ..
    } = caller.principal.clone()
    else {
        return Err(Error::forbidden("participants have no password"));
    };
    validate_password(&req.new_password, "new_password")?;
    if req.new_password == req.current_password {
        return Err(Error::invalid(
            "new_password",
            "the new password must differ from the current one",
        ));
    }
    let stored: String = state
        .db
        .read(move |conn| {
            conn.query_row("SELECT password_hash FROM staff WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .map_err(Error::from)
        })
        .await?;
    // a stolen session must not guess the password it would change
    let keys = [(
        format!("password-change:{id}"),
        attempts::ACCOUNT_FROM_CLIENT,
    )];
    state.attempts.begin(&keys)?;
    let verified = state
        .passwords
        .verify(req.current_password.clone(), Some(stored))
        .await
        .inspect_err(|_| state.attempts.refund(&keys))?;
    if !verified {
        return Err(Error::invalid(
            "current_password",
            "the current password is wrong",
        ));
    }
    state.attempts.succeeded(&[keys[0].0.clone()]);
    let new_hash = state.passwords.hash(req.new_password.clone()).await?;
    let token_hash = caller.token_hash.clone();
    let actor = caller.actor();
    let meta = caller.meta.clone();
    state
        .db
        .writer()
        .write(move |conn| {
            conn.execute(
                "UPDATE staff SET password_hash = ?1, must_change_password = 0 WHERE id = ?2",
                params![new_hash, id],
            )?;
            conn.execute(
                "DELETE FROM sessions WHERE staff_id = ?1 AND token_hash <> ?2",
                params![id, token_hash],
            )?;
            audit::record(
                conn,
                &actor,
                &meta,
                "auth.password_changed",
                Some(&format!("staff:{id}")),
                serde_json::json!({}),
            )
        })
        .await?;
    state.access_changed();
    Ok(Json(SessionInfo {
        principal: Principal::Staff {
            id,
            username,
            role,
            must_change_password: false,
        },
        csrf_token: caller.csrf_token,
        token: None,
    }))
}

pub fn validate_password(password: &str, field: &str) -> Result<(), Error> {
    let chars = password.chars().count();
    if !(12..=256).contains(&chars) {
        return Err(Error::invalid(
            field,
            "password must be 12 to 256 characters",
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// the event's code, shown on the venue screen
    pub event_code: String,
    /// the participant's personal join code
    pub join_code: String,
    #[serde(default)]
    pub bearer: bool,
}

/// Participant join: event code + personal join code → participant session.
#[utoipa::path(post, path = "/v1/join", tag = "auth", request_body = JoinRequest,
    responses((status = 200, body = SessionInfo), (status = 401, body = Problem), (status = 409, body = Problem), (status = 429, body = Problem)))]
pub async fn join(
    State(state): State<AppState>,
    meta: RequestMeta,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<Response, Error> {
    let keys = [(meta.client_key(), attempts::JOIN_CLIENT)];
    if let Err(refused) = state.attempts.begin(&keys) {
        state.metrics.login_rate_limited.inc();
        if refused.first {
            let detail =
                serde_json::json!({"retry_after_secs": refused.retry_after.as_secs().max(1)});
            audit_refused(&state, &meta, "participant.join_lockout", None, detail).await;
        }
        return Err(refused.into());
    }
    let event_code_typed: String = req.event_code.chars().take(64).collect();
    let meta_for_audit = meta.clone();
    let event_code = normalize_code(&req.event_code);
    let typed = normalize_code(&req.join_code);
    let code_hash = super::people::join_code_hash(&state.secrets, &typed);
    // Codes issued before they were keyed are plain SHA-256; one that joins is re-hashed.
    let legacy_hash = hash_secret(&typed);
    let result = state
        .db
        .writer()
        .write(move |conn| {
            let found = conn
                .query_row(
                    "SELECT p.id, p.name, p.team_id, p.event_id, e.state FROM participants p
                     JOIN events e ON e.id = p.event_id WHERE p.join_code_hash IN (?1, ?3) AND e.code = ?2",
                    params![code_hash, event_code, legacy_hash],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?, r.get::<_, String>(4)?)),
                )
                .optional()?;
            let Some((id, name, team_id, event_id, event_state)) = found else {
                return Err(Error::Unauthenticated("unknown event code or join code".into()));
            };
            if matches!(event_state.as_str(), "ended" | "archived") {
                return Err(Error::conflict(Some("event_code"), format!("the event has {event_state}; joining is closed")));
            }
            conn.execute(
                "UPDATE participants SET joined_at = COALESCE(joined_at, ?1), join_code_hash = ?3 WHERE id = ?2",
                params![crate::clock::now_rfc3339(), id, code_hash],
            )?;
            let principal = Principal::Participant { id, name, team_id, event_id };
            let (token, csrf) = create_session(conn, &principal)?;
            audit::record(conn, &principal.actor(), &meta, "participant.joined", Some(&format!("team:{team_id}")), serde_json::json!({}))?;
            Ok((principal, token, csrf))
        })
        .await
        .map_err(Error::from);
    // only a wrong code is a guess
    if matches!(result, Err(Error::Unauthenticated(_))) {
        audit_refused(
            &state,
            &meta_for_audit,
            "participant.join_failed",
            None,
            serde_json::json!({"event_code": event_code_typed}),
        )
        .await;
    } else {
        state.attempts.refund(&keys);
    }
    let (principal, token, csrf) = result?;
    let body = SessionInfo {
        principal,
        csrf_token: csrf,
        token: req.bearer.then(|| token.clone()),
    };
    Ok(with_cookie(&state, &token, PARTICIPANT_SESSION_SECS, body))
}

/// Records a refused sign-in (a wrong password or code, the start of a lockout) by whoever
/// tried. A full writer queue loses the row, not the refusal: the answer is the same.
pub(crate) async fn audit_refused(
    state: &AppState,
    meta: &RequestMeta,
    action: &'static str,
    target: Option<String>,
    detail: serde_json::Value,
) {
    let meta = meta.clone();
    let written = state
        .db
        .writer()
        .write(move |conn| {
            audit::record(conn, "anonymous", &meta, action, target.as_deref(), detail)
        })
        .await;
    if let Err(error) = written {
        tracing::warn!(action, error = ?Error::from(error), "a refused sign-in could not be audited");
    }
}

/// Codes are typed by people: case, spaces and dashes do not matter.
pub fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}
