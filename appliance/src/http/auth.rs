//! Who is calling: sessions (cookie or bearer), CSRF on cookie-authenticated writes,
//! roles and password hashing at start-up (guesses are limited in `crate::attempts`).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Method, header};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::extract::RequestMeta;
use crate::error::Error;

pub const SESSION_COOKIE: &str = "labrack_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
pub const STAFF_SESSION_SECS: i64 = 12 * 3600;
pub const PARTICIPANT_SESSION_SECS: i64 = 7 * 24 * 3600;

pub use labrack_provisioner::roles::Role;

/// Who a session belongs to.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Principal {
    Staff {
        id: i64,
        username: String,
        role: Role,
        must_change_password: bool,
    },
    Participant {
        id: i64,
        name: String,
        team_id: i64,
        event_id: i64,
    },
}

impl Principal {
    /// How the audit log names this caller.
    pub fn actor(&self) -> String {
        match self {
            Self::Staff { username, .. } => format!("staff:{username}"),
            Self::Participant { id, .. } => format!("participant:{id}"),
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub token_hash: String,
    pub csrf_token: String,
    pub meta: RequestMeta,
}

/// Paths a staff member who must still change the one-time password may call.
const ALLOWED_BEFORE_PASSWORD_CHANGE: [&str; 3] = [
    "/api/v1/auth/session",
    "/api/v1/auth/password",
    "/api/v1/auth/logout",
];

impl Caller {
    /// The staff member's role if it is one of `allowed`; otherwise 403.
    pub fn require_staff(&self, allowed: &[Role]) -> Result<(i64, Role), Error> {
        match &self.principal {
            Principal::Staff { id, role, .. } if allowed.contains(role) => Ok((*id, *role)),
            Principal::Staff { role, .. } => Err(Error::forbidden(format!(
                "the {} role may not do this",
                role.as_str()
            ))),
            Principal::Participant { .. } => Err(Error::forbidden("participants may not do this")),
        }
    }

    pub fn actor(&self) -> String {
        self.principal.actor()
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let meta = super::extract::request_meta(parts);
        let (token, from_cookie) = session_token(parts)
            .ok_or_else(|| Error::Unauthenticated("no session: log in first".into()))?;
        let token_hash = hash_secret(&token);
        let lookup_hash = token_hash.clone();
        let now = crate::clock::now_secs();
        let found = state
            .db
            .read(move |conn| load_session(conn, &lookup_hash, now))
            .await?;
        let (principal, csrf_token) = found.ok_or_else(|| {
            Error::Unauthenticated("session expired or unknown: log in again".into())
        })?;
        let writes = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        if from_cookie && writes {
            let sent = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !constant_time_eq(sent.as_bytes(), csrf_token.as_bytes()) {
                return Err(Error::forbidden("missing or wrong X-CSRF-Token header"));
            }
        }
        if let Principal::Staff {
            must_change_password: true,
            ..
        } = principal
        {
            // Inside the nested /api router the URI is stripped of its prefix; use the original.
            let path = parts
                .extensions
                .get::<axum::extract::OriginalUri>()
                .map_or_else(|| parts.uri.path().to_owned(), |u| u.path().to_owned());
            if !ALLOWED_BEFORE_PASSWORD_CHANGE.contains(&path.as_str()) {
                return Err(Error::forbidden(
                    "change the one-time password first (POST /api/v1/auth/password)",
                ));
            }
        }
        Ok(Self {
            principal,
            token_hash,
            csrf_token,
            meta,
        })
    }
}

/// The session token and whether it came from the cookie (true) or a bearer header.
fn session_token(parts: &Parts) -> Option<(String, bool)> {
    if let Some(value) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return value
            .strip_prefix("Bearer ")
            .map(|t| (t.trim().to_owned(), false));
    }
    for value in parts.headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            if let Some((name, token)) = pair.trim().split_once('=')
                && name == SESSION_COOKIE
                && !token.is_empty()
            {
                return Some((token.to_owned(), true));
            }
        }
    }
    None
}

fn load_session(
    conn: &Connection,
    token_hash: &str,
    now: i64,
) -> Result<Option<(Principal, String)>, Error> {
    let row = conn
        .prepare_cached(
            "SELECT s.csrf_token, s.staff_id, st.username, st.role, st.must_change_password,
                    s.participant_id, p.name, p.team_id, p.event_id
             FROM sessions s
             LEFT JOIN staff st ON st.id = s.staff_id
             LEFT JOIN participants p ON p.id = s.participant_id
             WHERE s.token_hash = ?1 AND s.expires_at > ?2",
        )?
        .query_row(params![token_hash, now], |r| {
            let csrf: String = r.get(0)?;
            let staff_id: Option<i64> = r.get(1)?;
            let principal = match staff_id {
                Some(id) => {
                    let role: String = r.get(3)?;
                    Some(Principal::Staff {
                        id,
                        username: r.get(2)?,
                        role: Role::parse(&role).unwrap_or(Role::Judge),
                        must_change_password: r.get(4)?,
                    })
                }
                None => match r.get::<_, Option<i64>>(5)? {
                    Some(id) => Some(Principal::Participant {
                        id,
                        name: r.get(6)?,
                        team_id: r.get(7)?,
                        event_id: r.get(8)?,
                    }),
                    None => None,
                },
            };
            Ok(principal.map(|p| (p, csrf)))
        })
        .optional()?;
    Ok(row.flatten())
}

/// Why an open terminal or desktop must stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Revoked {
    #[error("your session ended; sign in again")]
    SessionEnded,
    /// the event's state: participants watch from now on
    #[error("the event is {0}: the lab is view-only now")]
    EventEnded(String),
}

/// Whether the session `token_hash` may go on with an open terminal or desktop: `Some(why)`
/// when it may not (the session ended, or — for participants who `work` in their lab, not
/// just watch — the event has ended).
pub fn revoked_because(
    conn: &Connection,
    token_hash: &str,
    work: bool,
) -> Result<Option<Revoked>, Error> {
    let Some((principal, _)) = load_session(conn, token_hash, crate::clock::now_secs())? else {
        return Ok(Some(Revoked::SessionEnded));
    };
    if let Principal::Participant { event_id, .. } = principal
        && work
    {
        let state: String =
            conn.query_row("SELECT state FROM events WHERE id = ?1", [event_id], |r| {
                r.get(0)
            })?;
        if !crate::events::participants_may_work(&state) {
            return Ok(Some(Revoked::EventEnded(state)));
        }
    }
    Ok(None)
}

/// How often an open terminal or desktop looks at its session without being told to.
const ACCESS_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Resolves when the session `token_hash` may no longer go on (see [`revoked_because`]),
/// with the reason to show; looks when [`AppState::access_changed`] is called and every
/// [`ACCESS_RECHECK`].
pub async fn until_revoked(state: &AppState, token_hash: String, work: bool) -> Revoked {
    let mut changed = state.access.subscribe();
    loop {
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep(ACCESS_RECHECK) => {}
        }
        let hash = token_hash.clone();
        match state
            .db
            .read(move |conn| revoked_because(conn, &hash, work))
            .await
        {
            Ok(Some(why)) => return why,
            Ok(None) => {}
            // A database that cannot answer ends nothing; the next look decides.
            Err(error) => tracing::warn!(error = ?error, "could not look at a session"),
        }
    }
}

/// Creates a session row; returns (token, csrf token). Runs inside a write.
pub fn create_session(conn: &Connection, principal: &Principal) -> Result<(String, String), Error> {
    let token = random_token();
    let csrf = random_token();
    let (staff_id, participant_id, lifetime) = match principal {
        Principal::Staff { id, .. } => (Some(*id), None, STAFF_SESSION_SECS),
        Principal::Participant { id, .. } => (None, Some(*id), PARTICIPANT_SESSION_SECS),
    };
    let now = crate::clock::now_secs();
    // Expired sessions are swept as new ones are made, so the table stays small.
    conn.prepare_cached("DELETE FROM sessions WHERE expires_at <= ?1")?
        .execute([now])?;
    conn.prepare_cached(
        "INSERT INTO sessions (token_hash, staff_id, participant_id, csrf_token, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![hash_secret(&token), staff_id, participant_id, csrf, crate::clock::now_rfc3339(), now + lifetime])?;
    Ok((token, csrf))
}

/// The Set-Cookie value for a session.
pub fn session_cookie(token: &str, secure: bool, max_age: i64) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    )
}

pub use labrack_serving::tokens::{hash_secret, random_token};

/// An argon2id hash (blocking: at start-up; handlers use [`crate::passwords::PasswordPool`]).
pub fn hash_password(password: &str) -> Result<String, Error> {
    crate::passwords::hash_password(password).map_err(|e| Error::Internal(format!("argon2: {e}")))
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_against_their_hash() {
        let hash = hash_password("correct horse battery").expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(crate::passwords::verify_password(
            "correct horse battery",
            Some(&hash)
        ));
        assert!(!crate::passwords::verify_password("wrong", Some(&hash)));
        assert!(!crate::passwords::verify_password(
            "correct horse battery",
            None
        ));
    }
}
