//! Handler tests, in-process: the authorization matrix, the bad-input table, sessions,
//! CSRF, the one-time password gate, rate limiting and the OpenAPI document.

use crate::common;

use axum::http::StatusCode;
use common::{As, TestApp, join, seed};
use serde_json::{Value, json};

/// Every API endpoint, with a body that is valid for it.
fn endpoints(s: &common::Seed) -> Vec<(&'static str, String, Option<Value>)> {
    let e = s.event_id;
    vec![
        ("GET", "/api/v1/staff".into(), None),
        (
            "POST",
            "/api/v1/staff".into(),
            Some(
                json!({"username": format!("new{}", rand()), "password": "a-long-password-1", "role": "judge"}),
            ),
        ),
        ("GET", "/api/v1/events".into(), None),
        (
            "POST",
            "/api/v1/events".into(),
            Some(
                json!({"name": "Other", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2026-12-01T10:00:00Z"}),
            ),
        ),
        ("GET", format!("/api/v1/events/{e}"), None),
        (
            "PATCH",
            format!("/api/v1/events/{e}"),
            Some(json!({"name": "Renamed"})),
        ),
        (
            "POST",
            format!("/api/v1/events/{e}/transition"),
            Some(json!({"to": "live"})),
        ),
        ("GET", format!("/api/v1/events/{e}/teams"), None),
        (
            "POST",
            format!("/api/v1/events/{e}/teams"),
            Some(json!({"name": format!("T{}", rand())})),
        ),
        ("GET", format!("/api/v1/events/{e}/participants"), None),
        (
            "POST",
            format!("/api/v1/events/{e}/participants"),
            Some(json!({"team_id": s.team_a, "name": format!("P{}", rand())})),
        ),
        // participant B's: a new code ends that participant's sessions, not the caller's
        (
            "POST",
            format!("/api/v1/participants/{}/join-code", s.participant_b),
            None,
        ),
        ("GET", format!("/api/v1/teams/{}", s.team_b), None),
        ("GET", "/api/v1/audit".into(), None),
        ("GET", "/api/v1/me".into(), None),
        ("GET", format!("/api/v1/events/{e}/leaderboard"), None),
        ("GET", format!("/api/v1/events/{e}/rubric"), None),
        (
            "GET",
            format!("/api/v1/teams/{}/judge-scores", s.team_b),
            None,
        ),
        (
            "POST",
            format!("/api/v1/teams/{}/judge-scores", s.team_b),
            Some(json!({"scores": {"quality": 4}})),
        ),
        ("GET", format!("/api/v1/events/{e}/check-runs"), None),
        (
            "POST",
            format!("/api/v1/events/{e}/check-batches"),
            Some(json!({})),
        ),
        ("GET", "/api/v1/me/checks".into(), None),
        ("GET", "/api/v1/me/submissions".into(), None),
        // participant B's: not the caller's own session
        (
            "POST",
            format!("/api/v1/participants/{}/sign-out", s.participant_b),
            None,
        ),
    ]
}

fn rand() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Which callers may use each endpoint (by index in `endpoints`).
fn allowed(role: &str, index: usize) -> bool {
    let staff_read = ["admin", "organizer", "staff", "judge"].contains(&role);
    let event_write = ["admin", "organizer"].contains(&role);
    let people_write = ["admin", "organizer", "staff"].contains(&role);
    match index {
        0 | 1 => role == "admin",
        2 | 4 | 7 | 9 => staff_read,
        3 | 5 | 6 => event_write,
        8 | 10 | 11 => people_write,
        12 => staff_read, // team B: not participant A's team
        13 => event_write,
        14 | 21 | 22 => role == "participant",
        15..=17 | 19 => staff_read,
        18 => ["admin", "organizer", "judge"].contains(&role),
        20 | 23 => people_write,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn authorization_matrix_every_role_times_every_endpoint() {
    let app = TestApp::new().await;
    let mut callers = common::staff_cast(&app).await;
    let organizer = callers[1].1.clone();
    let s = seed(&app, &organizer).await;
    callers.push((
        "participant",
        As::Bearer(join(&app, &s.event_code, &s.code_a).await),
    ));
    callers.push(("nobody", As::Nobody));

    for (role, who) in &callers {
        for (index, (method, path, body)) in endpoints(&s).into_iter().enumerate() {
            let mut body = body;
            if index == 6 {
                // Toggle live ⇄ frozen so every allowed caller makes a legal transition.
                let event = app
                    .call(
                        "GET",
                        &format!("/api/v1/events/{}", s.event_id),
                        &organizer,
                        None,
                    )
                    .await;
                let to = if event.body["state"] == "live" {
                    "frozen"
                } else {
                    "live"
                };
                body = Some(json!({"to": to}));
            }
            let before = app.snapshot().await;
            let reply = app.call(method, &path, who, body).await;
            let what = format!("{role} {method} {path}: {} {}", reply.status, reply.body);
            if *role == "nobody" {
                reply.problem(401);
                assert_eq!(
                    before,
                    app.snapshot().await,
                    "refused request changed state: {what}"
                );
            } else if allowed(role, index) {
                assert!(reply.status.is_success(), "{what}");
            } else {
                reply.problem(403);
                assert_eq!(
                    before,
                    app.snapshot().await,
                    "refused request changed state: {what}"
                );
            }
        }
    }
}

#[tokio::test]
async fn participant_sees_only_its_own_team_without_contact_details() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    let s = seed(&app, &organizer).await;
    let participant = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let own = app
        .call(
            "GET",
            &format!("/api/v1/teams/{}", s.team_a),
            &participant,
            None,
        )
        .await;
    assert_eq!(own.status, StatusCode::OK);
    assert_eq!(own.body["participants"][0]["name"], "Ada");
    assert_eq!(own.body["participants"][0]["email"], Value::Null);
    app.call(
        "GET",
        &format!("/api/v1/teams/{}", s.team_b),
        &participant,
        None,
    )
    .await
    .problem(403);
    let me = app.call("GET", "/api/v1/me", &participant, None).await;
    assert_eq!(me.body["team"]["name"], "Alpha");
    assert_eq!(
        me.body["event"]["code"],
        Value::String(s.event_code.clone())
    );
    // The staff view still has the e-mail.
    let staff_view = app
        .call(
            "GET",
            &format!("/api/v1/teams/{}", s.team_a),
            &organizer,
            None,
        )
        .await;
    assert_eq!(staff_view.body["participants"][0]["email"], "ada@x.io");
}

/// (description, method, path, content type, body, expected status, expected field)
type BadCase = (
    &'static str,
    &'static str,
    String,
    &'static str,
    Vec<u8>,
    u16,
    Option<&'static str>,
);

#[tokio::test]
async fn bad_input_gets_a_problem_and_changes_nothing() {
    let app = TestApp::new().await;
    let organizer_token = app.staff("org", "organizer").await;
    let organizer = As::Bearer(organizer_token.clone());
    let s = seed(&app, &organizer).await;
    let e = s.event_id;
    let json_ct = "application/json";
    let events = "/api/v1/events".to_owned();
    let teams = format!("/api/v1/events/{e}/teams");
    let import = format!("/api/v1/events/{e}/participants/import");
    let big = format!("{{\"name\":\"{}\"}}", "x".repeat(70 * 1024)).into_bytes();
    let cases: Vec<BadCase> = vec![
        ("malformed json", "POST", events.clone(), json_ct, b"{\"name\": ".to_vec(), 400, None),
        ("trailing garbage", "POST", teams.clone(), json_ct, b"{\"name\":\"A\"} x".to_vec(), 400, None),
        ("wrong type", "POST", events.clone(), json_ct, br#"{"name": 5, "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2026-12-01T10:00:00Z"}"#.to_vec(), 422, Some("name")),
        ("unknown field", "POST", teams.clone(), json_ct, br#"{"name": "Z", "colour": "red"}"#.to_vec(), 422, Some("colour")),
        ("missing field", "POST", events.clone(), json_ct, br#"{"name": "X"}"#.to_vec(), 422, Some("starts_at")),
        ("empty name", "POST", teams.clone(), json_ct, br#"{"name": "   "}"#.to_vec(), 422, Some("name")),
        ("bad timestamp", "POST", events.clone(), json_ct, br#"{"name": "X", "starts_at": "soon", "ends_at": "2026-12-01T10:00:00Z"}"#.to_vec(), 422, Some("starts_at")),
        ("end before start", "POST", events.clone(), json_ct, br#"{"name": "X", "starts_at": "2026-12-02T09:00:00Z", "ends_at": "2026-12-01T10:00:00Z"}"#.to_vec(), 422, Some("ends_at")),
        ("oversize body", "POST", teams.clone(), json_ct, big, 413, None),
        ("wrong content type", "POST", teams.clone(), "text/plain", b"{\"name\":\"A\"}".to_vec(), 415, None),
        ("duplicate team", "POST", teams.clone(), json_ct, br#"{"name": "alpha"}"#.to_vec(), 409, Some("name")),
        ("team of another event", "POST", format!("/api/v1/events/{e}/participants"), json_ct, br#"{"team_id": 999, "name": "Q"}"#.to_vec(), 422, Some("team_id")),
        ("bad email", "POST", format!("/api/v1/events/{e}/participants"), json_ct, format!(r#"{{"team_id": {}, "name": "Q", "email": "nope"}}"#, s.team_a).into_bytes(), 422, Some("email")),
        ("illegal transition", "POST", format!("/api/v1/events/{e}/transition"), json_ct, br#"{"to": "archived"}"#.to_vec(), 409, Some("to")),
        ("stale transition", "POST", format!("/api/v1/events/{e}/transition"), json_ct, br#"{"to": "frozen", "from": "live"}"#.to_vec(), 409, Some("from")),
        ("unknown state", "POST", format!("/api/v1/events/{e}/transition"), json_ct, br#"{"to": "paused"}"#.to_vec(), 422, Some("to")),
        ("empty patch", "PATCH", format!("/api/v1/events/{e}"), json_ct, b"{}".to_vec(), 422, Some("body")),
        ("bad path id", "GET", "/api/v1/events/abc".into(), json_ct, Vec::new(), 400, Some("path")),
        ("missing event", "POST", "/api/v1/events/424242/teams".into(), json_ct, br#"{"name": "Z"}"#.to_vec(), 404, None),
        ("csv with bad rows", "POST", import.clone(), "text/csv", b"team,name,email\nGamma,,\nGamma,Cy,bad\nGamma,Di,,x\n".to_vec(), 422, None),
        ("csv duplicate of existing", "POST", import.clone(), "text/csv", b"team,name\nGamma,Zed\nalpha,ada\n".to_vec(), 422, None),
        ("csv bad header", "POST", import.clone(), "text/csv", b"who,what\nA,B\n".to_vec(), 422, None),
        ("csv not utf-8", "POST", import.clone(), "text/csv", b"team,name\nA,\xff\xfe\n".to_vec(), 400, None),
        ("csv as json", "POST", import.clone(), json_ct, b"{}".to_vec(), 415, None),
        ("audit limit", "GET", "/api/v1/audit?limit=0".into(), json_ct, Vec::new(), 422, Some("limit")),
        ("unknown query", "GET", "/api/v1/audit?sort=x".into(), json_ct, Vec::new(), 400, Some("query")),
        ("unknown route", "GET", "/api/v1/nope".into(), json_ct, Vec::new(), 404, None),
        ("wrong method", "DELETE", events.clone(), json_ct, Vec::new(), 405, None),
    ];
    let before = app.snapshot().await;
    for (what, method, path, content_type, body, status, field) in cases {
        let reply = app.raw(method, &path, &organizer, content_type, body).await;
        assert_eq!(reply.status.as_u16(), status, "{what}: {}", reply.body);
        assert_eq!(reply.content_type, "application/problem+json", "{what}");
        if let Some(field) = field {
            assert_eq!(reply.body["field"], field, "{what}: {}", reply.body);
        }
        assert_eq!(before, app.snapshot().await, "{what} changed stored state");
    }
    // The CSV row errors name every bad line.
    let reply = app
        .raw(
            "POST",
            &import,
            &organizer,
            "text/csv",
            "team,name,email\nGamma,,\nGamma,Cy,bad\nGamma,Di,,x\n",
        )
        .await;
    let lines: Vec<u64> = reply.body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["line"].as_u64())
        .collect();
    assert_eq!(lines, vec![2, 3, 4]);
    let reply = app
        .raw(
            "POST",
            &import,
            &organizer,
            "text/csv",
            "team,name\nGamma,Zed\nalpha,ada\n",
        )
        .await;
    assert_eq!(reply.body["errors"][0]["line"], 3, "{}", reply.body);
}

#[tokio::test]
async fn ended_events_refuse_changes_and_joins() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    let s = seed(&app, &organizer).await;
    for to in ["live", "ended"] {
        let reply = app
            .call(
                "POST",
                &format!("/api/v1/events/{}/transition", s.event_id),
                &organizer,
                Some(json!({"to": to})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    let before = app.snapshot().await;
    app.call(
        "POST",
        &format!("/api/v1/events/{}/teams", s.event_id),
        &organizer,
        Some(json!({"name": "Late"})),
    )
    .await
    .problem(409);
    app.call(
        "PATCH",
        &format!("/api/v1/events/{}", s.event_id),
        &organizer,
        Some(json!({"name": "Late"})),
    )
    .await
    .problem(409);
    app.call(
        "POST",
        "/api/v1/join",
        &As::Nobody,
        Some(json!({"event_code": s.event_code, "join_code": s.code_b})),
    )
    .await
    .problem(409);
    assert_eq!(before, app.snapshot().await);
}

#[tokio::test]
async fn join_codes_are_forgiving_to_type_and_regeneration_revokes_the_old_one() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    let s = seed(&app, &organizer).await;
    let sloppy = s.code_a.to_lowercase().replace('-', " ");
    let old_session = As::Bearer(join(&app, &s.event_code.to_lowercase(), &sloppy).await);
    assert_eq!(
        app.call("GET", "/api/v1/me", &old_session, None)
            .await
            .status,
        StatusCode::OK
    );
    app.call(
        "POST",
        "/api/v1/join",
        &As::Nobody,
        Some(json!({"event_code": "ZZZZZZ", "join_code": s.code_a})),
    )
    .await
    .problem(401);
    let renewed = app
        .call(
            "POST",
            &format!("/api/v1/participants/{}/join-code", s.participant_a),
            &organizer,
            None,
        )
        .await;
    assert_eq!(renewed.status, StatusCode::OK);
    app.call(
        "POST",
        "/api/v1/join",
        &As::Nobody,
        Some(json!({"event_code": s.event_code, "join_code": s.code_a})),
    )
    .await
    .problem(401);
    app.call("GET", "/api/v1/me", &old_session, None)
        .await
        .problem(401);
    let fresh = As::Bearer(
        join(
            &app,
            &s.event_code,
            renewed.body["join_code"].as_str().expect("code"),
        )
        .await,
    );
    assert_eq!(
        app.call("GET", "/api/v1/me", &fresh, None).await.status,
        StatusCode::OK
    );
    // staff can sign a participant out without a new code
    let path = format!("/api/v1/participants/{}/sign-out", s.participant_a);
    app.call("POST", &path, &fresh, None).await.problem(403);
    let signed_out = app.call("POST", &path, &organizer, None).await;
    assert_eq!(signed_out.body["sessions_ended"], 1, "{}", signed_out.body);
    app.call("GET", "/api/v1/me", &fresh, None)
        .await
        .problem(401);
    app.call(
        "POST",
        "/api/v1/participants/999999/sign-out",
        &organizer,
        None,
    )
    .await
    .problem(404);
    let people = app
        .call(
            "GET",
            &format!("/api/v1/events/{}/participants", s.event_id),
            &organizer,
            None,
        )
        .await;
    let ada = people.body["participants"]
        .as_array()
        .expect("list")
        .iter()
        .find(|p| p["name"] == "Ada")
        .cloned()
        .expect("ada");
    assert!(ada["joined_at"].is_string());
}

#[tokio::test]
async fn cookie_sessions_need_the_csrf_token_for_writes_and_logout_ends_them() {
    let app = TestApp::new().await;
    app.staff("org", "organizer").await;
    let login = app
        .call(
            "POST",
            "/api/v1/auth/login",
            &As::Nobody,
            Some(json!({"username": "org", "password": "correct-horse-battery"})),
        )
        .await;
    assert_eq!(login.status, StatusCode::OK);
    assert!(
        login.body.get("token").is_none(),
        "token leaked into a cookie login"
    );
    let cookie = login.set_cookie.expect("set-cookie");
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    let token = cookie
        .split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_owned())
        .expect("token");
    let csrf = login.body["csrf_token"].as_str().expect("csrf").to_owned();
    let body = json!({"name": "E", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2026-12-01T10:00:00Z"});
    let before = app.snapshot().await;
    app.call(
        "POST",
        "/api/v1/events",
        &As::Cookie(token.clone(), None),
        Some(body.clone()),
    )
    .await
    .problem(403);
    app.call(
        "POST",
        "/api/v1/events",
        &As::Cookie(token.clone(), Some("wrong".into())),
        Some(body.clone()),
    )
    .await
    .problem(403);
    assert_eq!(before, app.snapshot().await);
    let reads = app
        .call(
            "GET",
            "/api/v1/events",
            &As::Cookie(token.clone(), None),
            None,
        )
        .await;
    assert_eq!(reads.status, StatusCode::OK, "reads need no CSRF token");
    let created = app
        .call(
            "POST",
            "/api/v1/events",
            &As::Cookie(token.clone(), Some(csrf.clone())),
            Some(body),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let out = app
        .call(
            "POST",
            "/api/v1/auth/logout",
            &As::Cookie(token.clone(), Some(csrf)),
            None,
        )
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    app.call("GET", "/api/v1/events", &As::Cookie(token, None), None)
        .await
        .problem(401);
}

#[tokio::test]
async fn one_time_password_must_be_changed_before_anything_else() {
    let app = TestApp::new().await;
    let admin = As::Bearer(app.staff("boss", "admin").await);
    let created = app
        .call(
            "POST",
            "/api/v1/staff",
            &admin,
            Some(json!({"username": "newbie", "password": "initial-password-1", "role": "staff"})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let newbie = As::Bearer(app.login("newbie", "initial-password-1").await);
    app.call("GET", "/api/v1/events", &newbie, None)
        .await
        .problem(403);
    let session = app.call("GET", "/api/v1/auth/session", &newbie, None).await;
    assert_eq!(session.body["principal"]["must_change_password"], true);
    let short = app
        .call(
            "POST",
            "/api/v1/auth/password",
            &newbie,
            Some(json!({"current_password": "initial-password-1", "new_password": "short"})),
        )
        .await;
    assert_eq!(short.problem(422)["field"], "new_password");
    let wrong = app.call("POST", "/api/v1/auth/password", &newbie, Some(json!({"current_password": "nope-nope-nope", "new_password": "a-much-better-password"}))).await;
    assert_eq!(wrong.problem(422)["field"], "current_password");
    let changed = app.call("POST", "/api/v1/auth/password", &newbie, Some(json!({"current_password": "initial-password-1", "new_password": "a-much-better-password"}))).await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    assert_eq!(
        app.call("GET", "/api/v1/events", &newbie, None)
            .await
            .status,
        StatusCode::OK
    );
    app.login("newbie", "a-much-better-password").await;
    let dup = app
        .call(
            "POST",
            "/api/v1/staff",
            &admin,
            Some(json!({"username": "NEWBIE", "password": "initial-password-1", "role": "staff"})),
        )
        .await;
    assert_eq!(dup.problem(409)["field"], "username");
}

#[tokio::test]
async fn logins_are_rate_limited() {
    let app = TestApp::new().await;
    app.staff("org", "organizer").await;
    for _ in 0..5 {
        app.call(
            "POST",
            "/api/v1/auth/login",
            &As::Nobody,
            Some(json!({"username": "org", "password": "wrong-password!"})),
        )
        .await
        .problem(401);
    }
    // Even the right password is refused while the account waits, and the wait is said.
    let limited = app
        .call(
            "POST",
            "/api/v1/auth/login",
            &As::Nobody,
            Some(json!({"username": "org", "password": "correct-horse-battery"})),
        )
        .await;
    limited.problem(429);
    assert_eq!(limited.retry_after.as_deref(), Some("1"));
    let again = app
        .call(
            "POST",
            "/api/v1/auth/login",
            &As::Nobody,
            Some(json!({"username": "org", "password": "correct-horse-battery"})),
        )
        .await;
    again.problem(429);
    // A backoff, not a lock: after the wait the right password works, and forgets the failures.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    app.login("org", "correct-horse-battery").await;
    app.call(
        "POST",
        "/api/v1/auth/login",
        &As::Nobody,
        Some(json!({"username": "org", "password": "wrong-password!"})),
    )
    .await
    .problem(401);
    // Every failure is audited, and the lockout once (not each refusal during it).
    let audited = |action: &'static str| {
        let db = app.db.clone();
        async move {
            db.read(move |conn| {
                Ok::<_, labrack::store::StoreError>(conn.query_row(
                    "SELECT count(*) FROM audit_log WHERE action = ?1",
                    [action],
                    |r| r.get::<_, i64>(0),
                )?)
            })
            .await
            .expect("audit")
        }
    };
    assert_eq!(audited("auth.login_failed").await, 6);
    assert_eq!(audited("auth.lockout").await, 1);
    let target: String = app
        .db
        .read(|conn| {
            Ok::<_, labrack::store::StoreError>(conn.query_row(
                "SELECT target FROM audit_log WHERE action = 'auth.login_failed' LIMIT 1",
                [],
                |r| r.get(0),
            )?)
        })
        .await
        .expect("target");
    assert!(
        target.starts_with("staff:"),
        "a guess at a real account names it: {target}"
    );
}

#[tokio::test]
async fn wrong_join_codes_are_audited() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    let s = seed(&app, &organizer).await;
    let wrong = app
        .call(
            "POST",
            "/api/v1/join",
            &As::Nobody,
            Some(json!({"event_code": s.event_code, "join_code": "NOPE-NOPE"})),
        )
        .await;
    wrong.problem(401);
    let rows: Vec<(String, String)> = app
        .db
        .read(|conn| {
            let mut statement = conn.prepare(
                "SELECT actor, detail FROM audit_log WHERE action = 'participant.join_failed'",
            )?;
            let rows = statement
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, labrack::store::StoreError>(rows)
        })
        .await
        .expect("audit");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "anonymous");
    assert!(
        rows[0].1.contains(&s.event_code),
        "the typed event code is kept: {}",
        rows[0].1
    );
}

#[tokio::test]
async fn audit_log_records_who_what_and_where() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    let s = seed(&app, &organizer).await;
    join(&app, &s.event_code, &s.code_a).await;
    let page = app
        .call("GET", "/api/v1/audit?limit=10", &organizer, None)
        .await;
    let actions: Vec<&str> = page.body["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        vec![
            "participant.joined",
            "participants.imported",
            "event.created",
            "auth.login"
        ]
    );
    let created = &page.body["entries"][2];
    assert_eq!(created["actor"], "staff:org");
    assert_eq!(created["target"], format!("event:{}", s.event_id));
    assert!(created["remote_addr"].is_string() && created["request_id"].is_string());
}

/// The API fuzzing's "refused requests change nothing" check ignores the audit rows that
/// record refusals; its list must be this one.
#[test]
fn the_api_fuzzing_hooks_know_every_refusal_audit() {
    let hooks = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/schemathesis/hooks.py"
    ))
    .expect("hooks.py");
    let listed = hooks
        .split("REFUSAL_AUDITS = [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .expect("a REFUSAL_AUDITS list in hooks.py");
    let listed: Vec<&str> = listed
        .split(',')
        .map(|a| a.trim().trim_matches('"'))
        .filter(|a| !a.is_empty())
        .collect();
    assert_eq!(listed, labrack::audit::REFUSAL_AUDITS);
}

/// The web UI's types are generated from a copy of the document kept in its tree
/// (`cargo xtask web` refreshes it); that copy must be the document the server serves.
#[test]
fn the_web_ui_s_copy_of_the_document_is_current() {
    let copy =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/src/generated/openapi.json");
    let text = std::fs::read_to_string(&copy).expect("web/src/generated/openapi.json");
    let kept: Value = serde_json::from_str(&text).expect("the copy is JSON");
    let served = serde_json::to_value(labrack::http::openapi::model()).expect("document");
    assert!(
        kept == served,
        "web/src/generated/openapi.json is not the document the server serves: run `cargo xtask web`"
    );
}

/// The router and the document come from one list, so every documented operation must be
/// served: called with made-up ids and no credentials, none may meet the router's own "no
/// such endpoint" or "method not allowed".
#[tokio::test]
async fn every_documented_operation_is_routed() {
    let app = TestApp::new().await;
    let doc = app
        .call("GET", "/api/openapi.json", &As::Nobody, None)
        .await;
    assert_eq!(doc.status, StatusCode::OK);
    let paths = doc.body["paths"].as_object().expect("paths");
    assert!(paths.len() > 60, "{} paths documented", paths.len());
    let mut operations = 0;
    for (path, item) in paths {
        assert!(path.starts_with("/api/v1/"), "{path} is outside /api/v1");
        let concrete = path
            .split('/')
            .map(|part| if part.starts_with('{') { "1" } else { part })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().expect("path item").keys() {
            operations += 1;
            let method = method.to_ascii_uppercase();
            let answer = app.call(&method, &concrete, &As::Nobody, None).await;
            assert_ne!(
                answer.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not routed"
            );
            let unrouted = answer.status == StatusCode::NOT_FOUND
                && answer.body["detail"] == "no such API endpoint";
            assert!(!unrouted, "{method} {path} is documented but not routed");
        }
    }
    assert!(operations > 80, "{operations} operations documented");
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let app = TestApp::new().await;
    assert_eq!(
        app.call("GET", "/healthz", &As::Nobody, None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.call("GET", "/readyz", &As::Nobody, None).await.status,
        StatusCode::OK
    );
    // a probe flood costs one write a second, not one each
    let writes_before = app.state.metrics.writer_jobs.get();
    for _ in 0..50 {
        assert_eq!(
            app.call("GET", "/readyz", &As::Nobody, None).await.status,
            StatusCode::OK
        );
    }
    let writes = app.state.metrics.writer_jobs.get() - writes_before;
    assert!(writes <= 1, "{writes} writes for 50 probes");
    app.call("GET", "/api/v1/events", &As::Nobody, None).await;
    let metrics = app.call("GET", "/metrics", &As::Nobody, None).await;
    let text = metrics.body.as_str().expect("text").to_owned();
    assert!(
        text.contains(
            "labrack_http_requests_total{method=\"GET\",route=\"/api/v1/events\",status=\"401\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("labrack_writer_queue_depth 0"));
    assert!(text.contains("labrack_http_request_duration_seconds_bucket"));
}

#[tokio::test]
async fn the_connection_card_names_the_url_used_and_the_fingerprint_with_a_qr_code() {
    let app = TestApp::with(|state| state.ca_fingerprint = Some("SHA256:AB:CD".into())).await;
    let ask = |host: &str| {
        axum::http::Request::builder()
            .uri("/api/v1/appliance")
            .header("host", host)
            .body(axum::body::Body::empty())
            .expect("request")
    };
    let card = app.send(ask("rack-1.local:8443")).await;
    assert_eq!(card.status, StatusCode::OK);
    assert_eq!(card.body["url"], "https://rack-1.local:8443");
    assert_eq!(card.body["ca_fingerprint"], "SHA256:AB:CD");
    assert!(
        card.body["qr_svg"]
            .as_str()
            .is_some_and(|svg| svg.contains("<svg")),
        "{}",
        card.body
    );
    // A Host header that is not a plain host name is not echoed (nor drawn into the code).
    let odd = app.send(ask("evil.example/<script>")).await;
    assert_eq!(
        (odd.body["url"].clone(), odd.body["qr_svg"].clone()),
        (Value::Null, Value::Null),
        "{}",
        odd.body
    );
    // Over plain HTTP (development) there is no CA to pin.
    let plain = TestApp::new().await;
    let card = plain.send(ask("localhost:8080")).await;
    assert_eq!(
        (
            card.body["url"].as_str(),
            card.body["ca_fingerprint"].clone()
        ),
        (Some("http://localhost:8080"), Value::Null)
    );
}

#[tokio::test]
async fn join_codes_are_stored_keyed_and_codes_from_before_still_work_once_rehashed() {
    use sha2::Digest as _;
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    let s = seed(&app, &organizer).await;
    let plain = |code: &str| {
        hex::encode(sha2::Sha256::digest(
            labrack::http::session::normalize_code(code).as_bytes(),
        ))
    };
    let stored = |db: labrack::store::Db| async move {
        db.read(|conn| {
            let mut statement =
                conn.prepare("SELECT join_code_hash FROM participants ORDER BY id")?;
            let rows = statement
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, labrack::store::StoreError>(rows)
        })
        .await
        .expect("hashes")
    };
    let hashes = stored(app.db.clone()).await;
    assert!(
        !hashes.contains(&plain(&s.code_a)) && !hashes.contains(&plain(&s.code_b)),
        "a copy of the database cannot test codes offline"
    );
    // A participant whose code was stored the old way (plain SHA-256) still joins, and the
    // stored hash becomes the keyed one.
    let legacy = plain(&s.code_b);
    let (set, id) = (legacy.clone(), s.participant_b);
    app.db
        .writer()
        .write(move |conn| {
            Ok::<_, labrack::store::StoreError>(conn.execute(
                "UPDATE participants SET join_code_hash = ?1 WHERE id = ?2",
                rusqlite::params![set, id],
            )?)
        })
        .await
        .expect("legacy hash");
    join(&app, &s.event_code, &s.code_b).await;
    let hashes = stored(app.db.clone()).await;
    assert!(!hashes.contains(&legacy), "re-hashed on join: {hashes:?}");
    join(&app, &s.event_code, &s.code_b).await;
}

#[tokio::test]
async fn the_audit_chain_shows_a_row_edited_behind_the_appliances_back() {
    let app = TestApp::new().await;
    let admin = As::Bearer(app.staff("root", "admin").await);
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    seed(&app, &organizer).await;
    let verified = app.call("GET", "/api/v1/audit/verify", &admin, None).await;
    assert_eq!(verified.status, StatusCode::OK, "{}", verified.body);
    assert!(
        verified.body["rows"].as_i64().is_some_and(|n| n >= 3)
            && verified.body["first_broken"].is_null(),
        "{}",
        verified.body
    );
    app.call("GET", "/api/v1/audit/verify", &organizer, None)
        .await
        .problem(403);
    // Someone with the database file removes the append-only guard and rewrites history.
    let edited: i64 = app
        .db
        .writer()
        .write(|conn| {
            conn.execute_batch("DROP TRIGGER audit_log_is_append_only_update;")?;
            conn.execute(
                "UPDATE audit_log SET actor = 'staff:nobody' WHERE action = 'event.created'",
                [],
            )?;
            conn.query_row(
                "SELECT id FROM audit_log WHERE action = 'event.created'",
                [],
                |r| r.get(0),
            )
        })
        .await
        .expect("tampered");
    let verified = app.call("GET", "/api/v1/audit/verify", &admin, None).await;
    assert_eq!(verified.body["first_broken"], edited, "{}", verified.body);
}

#[tokio::test]
async fn only_admins_start_a_sync_epoch_and_a_refusal_changes_nothing() {
    let app = TestApp::new().await;
    let admin = As::Bearer(app.staff("root", "admin").await);
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    let s = seed(&app, &organizer).await;
    let participant = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let before = app.snapshot().await;
    for who in [&organizer, &participant] {
        app.call("POST", "/api/v1/sync/epoch", who, None)
            .await
            .problem(403);
    }
    app.call("POST", "/api/v1/sync/epoch", &As::Nobody, None)
        .await
        .problem(401);
    assert_eq!(
        app.snapshot().await,
        before,
        "refused epochs change nothing"
    );
    let started = app.call("POST", "/api/v1/sync/epoch", &admin, None).await;
    assert_eq!(started.status, StatusCode::CREATED, "{}", started.body);
    let base = started.body["base"].as_i64().expect("base");
    assert_eq!(
        base, 0,
        "the outbox still holds its first row, so the new stream starts there"
    );
    assert_ne!(app.snapshot().await, before, "the new epoch is stored");
}
