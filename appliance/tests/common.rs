//! In-process test harness: the real router on a real SQLite file in a temp dir, driven
//! with `tower::ServiceExt::oneshot`.

#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt as _;
use labrack::http::{self, AppState, auth};
use labrack::metrics::Metrics;
use labrack::store::Db;
use serde_json::{Value, json};
use tower::ServiceExt as _;

pub struct TestApp {
    pub router: Router,
    pub db: Db,
    pub dir: PathBuf,
    /// the state behind the router, for calling background work (agents) directly
    pub state: AppState,
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub set_cookie: Option<String>,
    pub retry_after: Option<String>,
    pub body: Value,
}

impl Reply {
    /// Asserts a problem document with this status; returns it.
    #[track_caller]
    pub fn problem(&self, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(
            self.content_type, "application/problem+json",
            "body: {}",
            self.body
        );
        assert_eq!(self.body["status"], status);
        assert!(
            self.body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "no detail: {}",
            self.body
        );
        &self.body
    }
}

/// How a request authenticates.
#[derive(Clone, Debug)]
pub enum As {
    Nobody,
    Bearer(String),
    /// session cookie plus the CSRF token to send (None: send none)
    Cookie(String, Option<String>),
}

impl TestApp {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// A test app whose state `adjust` changes first (e.g. an LLM gateway).
    pub async fn with(adjust: impl FnOnce(&mut AppState)) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "labrack-api-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let metrics = Arc::new(Metrics::default());
        let db = Db::open(&dir.join("labrack.db"), metrics.clone()).expect("open db");
        let mut state = AppState::new(
            db.clone(),
            metrics,
            true,
            None,
            labrack::secrets::SecretBox::from_key(&[9; 32]),
        );
        adjust(&mut state);
        Self {
            router: http::app(state.clone()),
            db,
            dir,
            state,
        }
    }

    pub async fn call(&self, method: &str, path: &str, who: &As, body: Option<Value>) -> Reply {
        let mut builder = Request::builder().method(method).uri(path);
        match who {
            As::Nobody => {}
            As::Bearer(token) => {
                builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"))
            }
            As::Cookie(token, csrf) => {
                builder =
                    builder.header(header::COOKIE, format!("{}={token}", auth::SESSION_COOKIE));
                if let Some(csrf) = csrf {
                    builder = builder.header(auth::CSRF_HEADER, csrf);
                }
            }
        }
        let request = match body {
            Some(body) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => builder.body(Body::empty()),
        };
        self.send(request.expect("request")).await
    }

    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        who: &As,
        content_type: &str,
        body: impl Into<Body>,
    ) -> Reply {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, content_type);
        if let As::Bearer(token) = who {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        self.send(builder.body(body.into()).expect("request")).await
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let set_cookie = response
            .headers()
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply {
            status,
            content_type,
            set_cookie,
            retry_after,
            body,
        }
    }

    /// Creates a staff account directly and logs it in; returns its bearer token.
    pub async fn staff(&self, username: &str, role: &str) -> String {
        let hash = auth::hash_password("correct-horse-battery").expect("hash");
        let (name, role_name) = (username.to_owned(), role.to_owned());
        self.db
            .writer()
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO staff (username, password_hash, role, must_change_password, created_at) VALUES (?1, ?2, ?3, 0, 'now')",
                    rusqlite::params![name, hash, role_name],
                )
            })
            .await
            .map_err(|e| format!("{e:?}"))
            .expect("insert staff");
        self.login(username, "correct-horse-battery").await
    }

    pub async fn login(&self, username: &str, password: &str) -> String {
        let reply = self
            .call(
                "POST",
                "/api/v1/auth/login",
                &As::Nobody,
                Some(json!({"username": username, "password": password, "bearer": true})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body["token"].as_str().expect("token").to_owned()
    }

    /// Every row of every table except sessions, as text: a fingerprint of stored state. The
    /// audit rows that record a refusal (a wrong password, a lockout, a refused ticket) are
    /// the one trace a refused request is meant to leave, and are left out.
    pub async fn snapshot(&self) -> String {
        self.db
            .read(|conn| {
                let mut out = String::new();
                for table in [
                    "staff", "events", "teams", "participants", "audit_log", "hosts", "enrolment_tokens",
                    "lab_templates", "lab_template_source", "allocations", "host_tasks", "jobs", "check_batches", "check_runs",
                    "rubrics", "judge_scores", "submissions", "hints", "score_adjustments", "llm_usage", "agent_messages", "alerts", "outbox", "billing_ledger", "announcements",
                    "sync_epochs", "sync_state",
                ] {
                    let refusals = labrack::audit::REFUSAL_AUDITS.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(", ");
                    let only = match table {
                        "audit_log" => format!("WHERE action NOT IN ({refusals})"),
                        // (and their copies on the way to the cloud)
                        "outbox" => format!("WHERE NOT (kind = 'audit' AND json_extract(body, '$.action') IN ({refusals}))"),
                        _ => String::new(),
                    };
                    let mut stmt = conn.prepare(&format!("SELECT * FROM {table} {only} ORDER BY rowid"))?;
                    let columns = stmt.column_count();
                    let mut rows = stmt.query([])?;
                    while let Some(row) = rows.next()? {
                        out.push_str(table);
                        for i in 0..columns {
                            let value: rusqlite::types::Value = row.get(i)?;
                            out.push_str(&format!("|{value:?}"));
                        }
                        out.push('\n');
                    }
                }
                Ok::<_, labrack::store::StoreError>(out)
            })
            .await
            .expect("snapshot")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.db.writer().shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// One bearer session per staff role (`admin1`, `organizer1`, `staff1`, `judge1`), in that
/// order: the cast every authorization matrix runs through.
pub async fn staff_cast(app: &TestApp) -> Vec<(&'static str, As)> {
    let mut cast = Vec::new();
    for role in ["admin", "organizer", "staff", "judge"] {
        cast.push((role, As::Bearer(app.staff(&format!("{role}1"), role).await)));
    }
    cast
}

/// An event with two teams and a participant in each; returns ids and join codes.
pub struct Seed {
    pub event_id: i64,
    pub event_code: String,
    pub team_a: i64,
    pub team_b: i64,
    pub participant_a: i64,
    pub participant_b: i64,
    pub code_a: String,
    pub code_b: String,
}

pub async fn seed(app: &TestApp, organizer: &As) -> Seed {
    let event = app
        .call("POST", "/api/v1/events", organizer, Some(json!({"name": "Hack", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})))
        .await;
    assert_eq!(event.status, StatusCode::CREATED, "{}", event.body);
    let event_id = event.body["id"].as_i64().expect("id");
    let import = app
        .raw(
            "POST",
            &format!("/api/v1/events/{event_id}/participants/import"),
            organizer,
            "text/csv",
            "team,name,email\nAlpha,Ada,ada@x.io\nBeta,Bob,\n",
        )
        .await;
    assert_eq!(import.status, StatusCode::OK, "{}", import.body);
    let people = import.body["participants"]
        .as_array()
        .expect("participants");
    Seed {
        event_id,
        event_code: event.body["code"].as_str().expect("code").to_owned(),
        team_a: people[0]["participant"]["team_id"].as_i64().expect("team"),
        team_b: people[1]["participant"]["team_id"].as_i64().expect("team"),
        participant_a: people[0]["participant"]["id"].as_i64().expect("id"),
        participant_b: people[1]["participant"]["id"].as_i64().expect("id"),
        code_a: people[0]["join_code"].as_str().expect("code").to_owned(),
        code_b: people[1]["join_code"].as_str().expect("code").to_owned(),
    }
}

pub async fn join(app: &TestApp, event_code: &str, join_code: &str) -> String {
    let reply = app
        .call(
            "POST",
            "/api/v1/join",
            &As::Nobody,
            Some(json!({"event_code": event_code, "join_code": join_code, "bearer": true})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body["token"].as_str().expect("token").to_owned()
}

/// What a test host says it has: 8 CPUs, 32 GB, no GPU, every limit but disk and IO weight.
pub const HOST_RESOURCES: &str = r#"{"cpus":8,"memory_mib":32000,"pids_max":4194304,"gpus":0,"isolation":"cgroup-v1","enforces":["cpu","memory","pids","devices","network"]}"#;

/// Inserts an enrolled host directly (its agent is not needed in-process); returns its id.
pub async fn insert_host(app: &TestApp, name: &str, capacity: u32) -> i64 {
    let name = name.to_owned();
    app.db
        .writer()
        .write(move |conn| {
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
            conn.execute(
                "INSERT INTO hosts (name, public_key, address, gpus, capacity, enrolled_at, last_seen_ms, resources) VALUES (?1, zeroblob(32), '127.0.0.1', 0, ?2, 'now', ?3, ?4)",
                rusqlite::params![name, capacity, i64::try_from(now_ms).unwrap_or(i64::MAX), HOST_RESOURCES],
            )?;
            Ok::<_, rusqlite::Error>(conn.last_insert_rowid())
        })
        .await
        .map_err(|e| format!("{e:?}"))
        .expect("insert host")
}

/// Sets an allocation's state directly, as if its host had reported.
pub async fn force_state(app: &TestApp, allocation_id: i64, state: &str) {
    let state = state.to_owned();
    app.db
        .writer()
        .write(move |conn| {
            conn.execute(
                "UPDATE allocations SET state = ?2, in_flight = NULL, retry_at_ms = NULL WHERE id = ?1",
                rusqlite::params![allocation_id, state],
            )?;
            // An active lab has a (sealed) desktop password; its bytes do not matter here.
            conn.execute(
                "UPDATE allocations SET desktop_secret = CASE WHEN state = 'active' THEN x'00' ELSE NULL END WHERE id = ?1",
                [allocation_id],
            )?;
            conn.execute("UPDATE host_tasks SET done_ms = 1, outcome = 'test' WHERE allocation_id = ?1", [allocation_id])
        })
        .await
        .map_err(|e| format!("{e:?}"))
        .expect("force state");
}
