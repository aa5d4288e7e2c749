//! Hints, the score ledger, the LLM gateway and the agents, in-process, against a small
//! local HTTP server that speaks the OpenAI chat-completions API (the test peer).

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use common::{As, TestApp, join, seed};
use labrack::llm::{ChatMessage, Gateway, LlmEndpoint, LlmError, LlmSettings, Payer};
use serde_json::{Value, json};

/// A chat-completions server: answers (or fails with 500) and counts the calls it got.
struct Peer {
    url: String,
    calls: Arc<AtomicUsize>,
}

async fn peer(healthy: bool) -> Peer {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            post(move |State(calls): State<Arc<AtomicUsize>>, Json(request): Json<Value>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if !healthy {
                    return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": "model crashed"})));
                }
                let asked = request["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or_default().to_owned();
                let max = request["max_tokens"].as_u64().unwrap_or(0);
                (
                    StatusCode::OK,
                    Json(json!({
                        "model": request["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("Model hint for: {}", asked.lines().next().unwrap_or_default())}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": max.min(30)}
                    })),
                )
            }),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Peer { url, calls }
}

fn settings(urls: &[&str], budget: u64, per_minute: u32) -> LlmSettings {
    LlmSettings {
        endpoints: urls
            .iter()
            .map(|url| LlmEndpoint {
                url: (*url).to_owned(),
                model: "test-model".into(),
                api_key_env: None,
            })
            .collect(),
        team_token_budget: budget,
        requests_per_minute: per_minute,
        cents_per_1k_tokens: 200,
    }
}

/// Answers a question as the queue's job `job_id` does: the answer is posted in its own write.
async fn answer(app: &TestApp, job_id: i64, payload: &Value) {
    let hint: labrack::jobs::AgentHint =
        serde_json::from_value(payload.clone()).expect("a hint job's payload");
    let answer = labrack::agents::answer_question(&app.state.agents(), job_id, &hint)
        .await
        .expect("answered");
    let now = i64::try_from(labrack::clock::unix_ms()).unwrap_or(0);
    app.db
        .writer()
        .write(move |conn| {
            Ok::<_, labrack::store::StoreError>(labrack::agents::post_answer(
                conn, job_id, &answer, now,
            )?)
        })
        .await
        .expect("posted");
}

async fn used(app: &TestApp, team_id: i64) -> i64 {
    app.db
        .read(move |conn| {
            conn.query_row("SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM llm_usage WHERE team_id = ?1", [team_id], |r| r.get(0))
                .map_err(labrack::store::StoreError::from)
        })
        .await
        .expect("usage")
}

#[tokio::test]
async fn budgets_stop_a_team_before_it_overspends() {
    let good = peer(true).await;
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let s = seed(&app, &organizer).await;
    let gateway = Gateway::new(settings(&[&good.url], 200, 1000));
    let payer = Payer {
        event_id: s.event_id,
        team_id: Some(s.team_a),
        job_id: None,
    };
    let mut answered = 0;
    let refusal = loop {
        match gateway
            .chat(
                &app.db,
                payer,
                "hint",
                vec![ChatMessage::user("why does my server not start?")],
                30,
            )
            .await
        {
            Ok(reply) => {
                assert!(
                    reply.content.starts_with("Model hint for"),
                    "{}",
                    reply.content
                );
                answered += 1;
                assert!(answered < 50, "the budget never stopped the team");
            }
            Err(error) => break error,
        }
    };
    assert!(
        matches!(refusal, LlmError::BudgetExceeded { budget: 200, .. }),
        "{refusal}"
    );
    assert_eq!(
        good.calls.load(Ordering::SeqCst),
        answered,
        "the refused call never reached the model"
    );
    let spent = used(&app, s.team_a).await;
    assert!(spent <= 200 && spent > 150, "used {spent} of 200 tokens");
    // Another team has its own budget; the platform's own calls are not budgeted.
    assert!(
        gateway
            .chat(
                &app.db,
                Payer {
                    event_id: s.event_id,
                    team_id: Some(s.team_b),
                    job_id: None
                },
                "hint",
                vec![ChatMessage::user("hi")],
                30
            )
            .await
            .is_ok()
    );
    assert!(
        gateway
            .chat(
                &app.db,
                Payer {
                    event_id: s.event_id,
                    team_id: None,
                    job_id: None
                },
                "commentary",
                vec![ChatMessage::user("hi")],
                30
            )
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_failing_endpoint_fails_over_and_its_breaker_opens() {
    let broken = peer(false).await;
    let good = peer(true).await;
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let s = seed(&app, &organizer).await;
    let gateway = Gateway::new(settings(&[&broken.url, &good.url], 100_000, 1000));
    for _ in 0..6 {
        let reply = gateway
            .chat(
                &app.db,
                Payer {
                    event_id: s.event_id,
                    team_id: Some(s.team_a),
                    job_id: None,
                },
                "hint",
                vec![ChatMessage::user("help")],
                20,
            )
            .await
            .expect("the second endpoint answers");
        assert_eq!(reply.endpoint, good.url);
    }
    assert_eq!(
        broken.calls.load(Ordering::SeqCst),
        labrack::llm::BREAKER_FAILURES as usize,
        "the open breaker skips the broken endpoint"
    );
    assert_eq!(good.calls.load(Ordering::SeqCst), 6);
    let only_broken = Gateway::new(settings(&[&broken.url], 100_000, 1000));
    let failed = only_broken
        .chat(
            &app.db,
            Payer {
                event_id: s.event_id,
                team_id: Some(s.team_a),
                job_id: None,
            },
            "hint",
            vec![ChatMessage::user("x")],
            20,
        )
        .await;
    assert!(
        matches!(failed, Err(LlmError::Unavailable(ref e)) if e.contains("500")),
        "{failed:?}"
    );
    // Rate limit: a third request in the same minute is refused before any call.
    let limited = Gateway::new(settings(&[&good.url], 100_000, 2));
    let payer = Payer {
        event_id: s.event_id,
        team_id: Some(s.team_b),
        job_id: None,
    };
    let before = good.calls.load(Ordering::SeqCst);
    for _ in 0..2 {
        limited
            .chat(&app.db, payer, "hint", vec![ChatMessage::user("x")], 20)
            .await
            .expect("within the limit");
    }
    let third = limited
        .chat(&app.db, payer, "hint", vec![ChatMessage::user("x")], 20)
        .await;
    assert!(
        matches!(third, Err(LlmError::RateLimited { .. })),
        "{third:?}"
    );
    assert_eq!(good.calls.load(Ordering::SeqCst), before + 2);
}

async fn messages(app: &TestApp, who: &As) -> Value {
    let reply = app.call("GET", "/api/v1/me/messages", who, None).await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.body);
    reply.body
}

#[tokio::test]
async fn the_hint_agent_uses_the_model_within_budget_and_its_rules_otherwise() {
    let good = peer(true).await;
    let url = good.url.clone();
    let app = TestApp::with(move |state| {
        state.llm = Arc::new(Gateway::new(settings(&[&url], 120, 1000)))
    })
    .await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let s = seed(&app, &organizer).await;
    let team = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    app.call(
        "POST",
        "/api/v1/me/assistant",
        &team,
        Some(json!({"question": "help"})),
    )
    .await
    .problem(409);
    app.call(
        "POST",
        &format!("/api/v1/events/{}/transition", s.event_id),
        &organizer,
        Some(json!({"to": "live"})),
    )
    .await;
    let asked = app
        .call(
            "POST",
            "/api/v1/me/assistant",
            &team,
            Some(json!({"question": "How do I start the server?"})),
        )
        .await;
    assert_eq!(asked.status.as_u16(), 202, "{}", asked.body);
    app.call(
        "POST",
        "/api/v1/me/assistant",
        &team,
        Some(json!({"question": "again"})),
    )
    .await
    .problem(409);
    app.call(
        "POST",
        "/api/v1/me/assistant",
        &team,
        Some(json!({"question": ""})),
    )
    .await
    .problem(422);
    let payload = json!({"event_id": s.event_id, "team_id": s.team_a, "question": "How do I start the server?"});
    answer(&app, 1, &payload).await;
    let mine = messages(&app, &team).await;
    assert_eq!(mine["messages"][0]["source"], "llm", "{mine}");
    assert!(
        mine["messages"][0]["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("Model hint for")),
        "{mine}"
    );
    assert_eq!(mine["model_configured"], true);
    // Spend the rest of the budget; then the agent answers by rule and says why.
    for job in 2..12 {
        answer(&app, job, &payload).await;
    }
    let mine = messages(&app, &team).await;
    let last = mine["messages"][0]["body"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(mine["messages"][0]["source"], "rules", "{mine}");
    assert!(last.contains("budget is spent"), "{last}");
    assert!(
        mine["tokens_used"].as_u64().is_some_and(|used| used <= 120),
        "{mine}"
    );
    let usage = app
        .call(
            "GET",
            &format!("/api/v1/events/{}/llm-usage", s.event_id),
            &organizer,
            None,
        )
        .await;
    assert_eq!(
        usage.body[0]["team_id"], s.team_a,
        "token use is recorded for billing: {}",
        usage.body
    );
    let ledger = app
        .call(
            "GET",
            &format!("/api/v1/events/{}/ledger?team_id={}", s.event_id, s.team_a),
            &organizer,
            None,
        )
        .await;
    let tokens: Vec<&Value> = ledger.body["entries"]
        .as_array()
        .map(|e| e.iter().filter(|e| e["kind"] == "llm_tokens").collect())
        .unwrap_or_default();
    assert!(
        !tokens.is_empty()
            && tokens
                .iter()
                .all(|e| e["amount_cents"].as_i64().is_some_and(|c| c <= 0)),
        "every call is a ledger charge: {}",
        ledger.body
    );

    // With no model configured the agent still answers, and says it used its rules.
    let plain = TestApp::new().await;
    let organizer = As::Bearer(plain.staff("org1", "organizer").await);
    let s = seed(&plain, &organizer).await;
    let team = As::Bearer(join(&plain, &s.event_code, &s.code_a).await);
    answer(
        &plain,
        1,
        &json!({"event_id": s.event_id, "team_id": s.team_a, "question": "?"}),
    )
    .await;
    let mine = messages(&plain, &team).await;
    assert_eq!(
        (
            mine["messages"][0]["source"].as_str(),
            mine["model_configured"].as_bool()
        ),
        (Some("rules"), Some(false))
    );
    assert!(
        mine["messages"][0]["body"]
            .as_str()
            .is_some_and(|b| b.ends_with("(rule-based: no language model is configured)")),
        "{mine}"
    );
}

#[tokio::test]
async fn hints_cost_points_once_and_only_a_correction_gives_them_back() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let judge = As::Bearer(app.staff("judge1", "judge").await);
    let s = seed(&app, &organizer).await;
    let team = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let hints = format!("/api/v1/events/{}/hints", s.event_id);
    let before = app.snapshot().await;
    for body in [
        json!({"title": "", "body": "b", "cost": 1}),
        json!({"title": "t", "body": "b", "cost": 5000}),
        json!({"title": "t", "body": "b"}),
    ] {
        assert_eq!(
            app.call("POST", &hints, &organizer, Some(body.clone()))
                .await
                .status
                .as_u16(),
            422,
            "{body}"
        );
    }
    app.call(
        "POST",
        &hints,
        &judge,
        Some(json!({"title": "t", "body": "b", "cost": 1})),
    )
    .await
    .problem(403);
    app.call(
        "POST",
        &hints,
        &team,
        Some(json!({"title": "t", "body": "b", "cost": 1})),
    )
    .await
    .problem(403);
    assert_eq!(app.snapshot().await, before);
    let hint = app
        .call(
            "POST",
            &hints,
            &organizer,
            Some(json!({"title": "Ports", "body": "Bind 0.0.0.0, not 127.0.0.1", "cost": 5})),
        )
        .await;
    assert_eq!(hint.status.as_u16(), 201, "{}", hint.body);
    let id = hint.body["id"].as_i64().expect("id");
    let listed = app.call("GET", "/api/v1/me/hints", &team, None).await;
    assert_eq!(
        (
            listed.body[0]["title"].as_str(),
            listed.body[0]["body"].is_null()
        ),
        (Some("Ports"), true),
        "locked hints hide their text"
    );
    app.call(
        "POST",
        &format!("/api/v1/me/hints/{id}/unlock"),
        &team,
        None,
    )
    .await
    .problem(409);
    app.call(
        "POST",
        &format!("/api/v1/events/{}/transition", s.event_id),
        &organizer,
        Some(json!({"to": "live"})),
    )
    .await;
    let unlocked = app
        .call(
            "POST",
            &format!("/api/v1/me/hints/{id}/unlock"),
            &team,
            None,
        )
        .await;
    assert_eq!(
        (unlocked.status.as_u16(), unlocked.body["body"].as_str()),
        (200, Some("Bind 0.0.0.0, not 127.0.0.1")),
        "{}",
        unlocked.body
    );
    let again = app
        .call(
            "POST",
            &format!("/api/v1/me/hints/{id}/unlock"),
            &team,
            None,
        )
        .await;
    assert_eq!(again.status.as_u16(), 200);
    app.call("POST", "/api/v1/me/hints/999999/unlock", &team, None)
        .await
        .problem(404);
    let board = app
        .call(
            "GET",
            &format!("/api/v1/events/{}/leaderboard", s.event_id),
            &judge,
            None,
        )
        .await;
    let row = board.body["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["team_id"] == s.team_a))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (row["total"].as_f64(), row["adjustments"].as_f64()),
        (Some(-5.0), Some(-5.0)),
        "charged once: {}",
        board.body
    );
    // The ledger cannot be edited; a correction is a new, audited entry with a reason.
    let ledger = format!("/api/v1/teams/{}/score-ledger", s.team_a);
    let before = app.snapshot().await;
    app.call(
        "POST",
        &ledger,
        &organizer,
        Some(json!({"points": 5, "reason": ""})),
    )
    .await
    .problem(422);
    app.call(
        "POST",
        &ledger,
        &organizer,
        Some(json!({"points": 0, "reason": "nothing"})),
    )
    .await
    .problem(422);
    app.call(
        "POST",
        &ledger,
        &judge,
        Some(json!({"points": 5, "reason": "refund"})),
    )
    .await
    .problem(403);
    assert_eq!(app.snapshot().await, before);
    let corrected = app
        .call(
            "POST",
            &ledger,
            &organizer,
            Some(json!({"points": 5, "reason": "the hint was wrong"})),
        )
        .await;
    assert_eq!(corrected.status.as_u16(), 201, "{}", corrected.body);
    assert_eq!(
        corrected.body.as_array().map(Vec::len),
        Some(2),
        "the unlock stays in the ledger beside its correction"
    );
    let tampered = app
        .db
        .writer()
        .write(|conn| conn.execute("UPDATE score_adjustments SET points = 0", []))
        .await;
    assert!(tampered.is_err(), "the ledger refuses updates");
}

#[tokio::test]
async fn the_observer_flags_failing_streaks_once() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let s = seed(&app, &organizer).await;
    app.call(
        "POST",
        &format!("/api/v1/events/{}/transition", s.event_id),
        &organizer,
        Some(json!({"to": "live"})),
    )
    .await;
    let (event_id, team_id) = (s.event_id, s.team_a);
    let found = app
        .db
        .writer()
        .write(move |conn| {
            conn.execute("INSERT INTO hosts (name, public_key, address, gpus, capacity, enrolled_at, last_seen_ms) VALUES ('h', zeroblob(32), 'x', 0, 1, 'now', 0)", [])?;
            conn.execute(
                "INSERT INTO allocations (event_id, team_id, host_id, template, runtime, skeleton, gpus, state, created_at, updated_at)
                 VALUES (?1, ?2, 1, 't', 'local-user', '/s', 0, 'active', '2000-01-01T00:00:00Z', 'now')",
                rusqlite::params![event_id, team_id],
            )?;
            conn.execute("INSERT INTO check_batches (event_id, reason, requested_by, created_ms) VALUES (?1, 'x', 'y', 0)", [event_id])?;
            for (n, state) in ["passed", "failed", "failed", "failed"].iter().enumerate() {
                conn.execute(
                    "INSERT INTO check_runs (batch_id, event_id, team_id, allocation_id, check_name, script, timeout_secs, memory_mib, network, weight, dimension,
                                             hidden, state, created_ms, finished_ms) VALUES (1, ?1, ?2, 1, 'server up', 'x', 1, 16, 0, 1, 'q', 0, ?3, ?4, ?4)",
                    rusqlite::params![event_id, team_id, state, i64::try_from(n).unwrap_or(0)],
                )?;
            }
            let now = labrack::clock::now_ms();
            let first = labrack::agents::observe(conn, now, 60_000)?;
            let second = labrack::agents::observe(conn, now + 1000, 60_000)?;
            Ok::<_, rusqlite::Error>((first, second))
        })
        .await
        .expect("observe");
    let kinds: Vec<&str> = found
        .0
        .alerts
        .iter()
        .map(|(_, _, kind, _)| kind.as_str())
        .collect();
    assert_eq!(kinds, ["failing_check", "idle_lab"], "{:?}", found.0);
    assert!(found.0.alerts[0].3.contains("failed 3 times in a row"));
    assert!(
        found.1.alerts.is_empty(),
        "alerts are not repeated within the hour"
    );
    let alerts = app
        .call(
            "GET",
            &format!("/api/v1/events/{}/alerts", s.event_id),
            &organizer,
            None,
        )
        .await;
    assert_eq!(
        alerts.body.as_array().map(Vec::len),
        Some(2),
        "{}",
        alerts.body
    );
}

#[tokio::test]
async fn commentary_announces_a_new_leader_once_in_the_models_words_or_by_rule() {
    let good = peer(true).await;
    let url = good.url.clone();
    let app =
        TestApp::with(move |state| state.llm = Arc::new(Gateway::new(settings(&[&url], 10, 1000))))
            .await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let judge = As::Bearer(app.staff("judge1", "judge").await);
    let s = seed(&app, &organizer).await;
    app.call(
        "POST",
        &format!("/api/v1/events/{}/transition", s.event_id),
        &organizer,
        Some(json!({"to": "live"})),
    )
    .await;
    let mut leaders = std::collections::HashMap::new();
    labrack::agents::commentary(&app.state.agents(), &mut leaders)
        .await
        .expect("commentary");
    let path = format!(
        "/api/v1/events/{}/agent-messages?agent=commentary",
        s.event_id
    );
    assert_eq!(
        app.call("GET", &path, &judge, None)
            .await
            .body
            .as_array()
            .map(Vec::len),
        Some(0),
        "nobody leads with no points"
    );
    app.call(
        "POST",
        &format!("/api/v1/teams/{}/judge-scores", s.team_b),
        &judge,
        Some(json!({"scores": {"quality": 5}})),
    )
    .await;
    labrack::agents::commentary(&app.state.agents(), &mut leaders)
        .await
        .expect("commentary");
    labrack::agents::commentary(&app.state.agents(), &mut leaders)
        .await
        .expect("commentary");
    let said = app.call("GET", &path, &judge, None).await;
    assert_eq!(
        said.body.as_array().map(Vec::len),
        Some(1),
        "announced once: {}",
        said.body
    );
    assert_eq!(
        said.body[0]["source"], "llm",
        "the platform's commentary is not held to a team's budget: {}",
        said.body
    );
    assert!(
        said.body[0]["body"]
            .as_str()
            .is_some_and(|b| b.contains("Beta takes the lead with 5 points")),
        "{}",
        said.body
    );

    let plain = TestApp::new().await;
    let organizer = As::Bearer(plain.staff("org1", "organizer").await);
    let judge = As::Bearer(plain.staff("judge1", "judge").await);
    let s = seed(&plain, &organizer).await;
    plain
        .call(
            "POST",
            &format!("/api/v1/events/{}/transition", s.event_id),
            &organizer,
            Some(json!({"to": "live"})),
        )
        .await;
    plain
        .call(
            "POST",
            &format!("/api/v1/teams/{}/judge-scores", s.team_a),
            &judge,
            Some(json!({"scores": {"quality": 2}})),
        )
        .await;
    labrack::agents::commentary(&plain.state.agents(), &mut std::collections::HashMap::new())
        .await
        .expect("commentary");
    let said = plain
        .call(
            "GET",
            &format!("/api/v1/events/{}/agent-messages", s.event_id),
            &judge,
            None,
        )
        .await;
    assert_eq!(
        said.body[0]["body"],
        "Alpha takes the lead with 2 points. (rule-based: no language model is configured)",
        "{}",
        said.body
    );
}

#[tokio::test]
async fn announcements_reach_the_events_participants_only() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let staff = As::Bearer(app.staff("staff1", "staff").await);
    let judge = As::Bearer(app.staff("judge1", "judge").await);
    let s = seed(&app, &organizer).await;
    let team = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let path = format!("/api/v1/events/{}/announcements", s.event_id);
    let before = app.snapshot().await;
    app.call("POST", &path, &staff, Some(json!({"text": ""})))
        .await
        .problem(422);
    app.call(
        "POST",
        &path,
        &staff,
        Some(json!({"text": "x".repeat(1001)})),
    )
    .await
    .problem(422);
    app.call("POST", &path, &judge, Some(json!({"text": "hi"})))
        .await
        .problem(403);
    app.call("POST", &path, &team, Some(json!({"text": "hi"})))
        .await
        .problem(403);
    app.call(
        "POST",
        "/api/v1/events/999999/announcements",
        &staff,
        Some(json!({"text": "hi"})),
    )
    .await
    .problem(404);
    assert_eq!(
        app.snapshot().await,
        before,
        "refused announcements change nothing"
    );
    let sent = app
        .call(
            "POST",
            &path,
            &staff,
            Some(json!({"text": "Pizza in the hall at 19:00"})),
        )
        .await;
    assert_eq!(sent.status.as_u16(), 201, "{}", sent.body);
    let seen = app
        .call("GET", "/api/v1/me/announcements", &team, None)
        .await;
    assert_eq!(
        seen.body[0]["text"], "Pizza in the hall at 19:00",
        "{}",
        seen.body
    );
    assert_eq!(
        app.call("GET", &path, &judge, None)
            .await
            .body
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    // Another event's participant does not see it.
    let other = app
        .call("POST", "/api/v1/events", &organizer, Some(json!({"name": "Other", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})))
        .await;
    let other_id = other.body["id"].as_i64().expect("id");
    let import = app
        .raw(
            "POST",
            &format!("/api/v1/events/{other_id}/participants/import"),
            &organizer,
            "text/csv",
            "team,name,email\nZed,Zoe,\n",
        )
        .await;
    let code = import.body["participants"][0]["join_code"]
        .as_str()
        .expect("code")
        .to_owned();
    let stranger = As::Bearer(join(&app, other.body["code"].as_str().expect("code"), &code).await);
    let none = app
        .call("GET", "/api/v1/me/announcements", &stranger, None)
        .await;
    assert_eq!(none.body.as_array().map(Vec::len), Some(0), "{}", none.body);
}

#[tokio::test]
async fn a_retried_question_is_asked_billed_and_answered_once() {
    let good = peer(true).await;
    let url = good.url.clone();
    let app = TestApp::with(move |state| {
        state.llm = Arc::new(Gateway::new(settings(&[&url], 10_000, 1000)))
    })
    .await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let s = seed(&app, &organizer).await;
    let team = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let payload = json!({"event_id": s.event_id, "team_id": s.team_a, "question": "Why?"});
    // The first attempt got the model's reply (recorded and billed with the job), then its
    // worker died before posting; the retry must not ask or bill again.
    let hint: labrack::jobs::AgentHint =
        serde_json::from_value(payload.clone()).expect("a hint job's payload");
    labrack::agents::answer_question(&app.state.agents(), 77, &hint)
        .await
        .expect("answered");
    assert_eq!(good.calls.load(Ordering::SeqCst), 1);
    answer(&app, 77, &payload).await;
    assert_eq!(
        good.calls.load(Ordering::SeqCst),
        1,
        "the retry used the recorded reply"
    );
    // And a retry after the answer was posted posts nothing new.
    answer(&app, 77, &payload).await;
    let mine = messages(&app, &team).await;
    let hints = mine["messages"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["agent"] == "hint").count());
    assert_eq!(hints, Some(1), "{mine}");
    assert!(
        mine["messages"][0]["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("Model hint for")),
        "{mine}"
    );
    let counts = app
        .db
        .read(|conn| {
            let usage: i64 = conn.query_row(
                "SELECT count(*) FROM llm_usage WHERE job_id = 77",
                [],
                |r| r.get(0),
            )?;
            let billed: i64 = conn.query_row(
                "SELECT count(*) FROM billing_ledger WHERE kind = 'llm_tokens'",
                [],
                |r| r.get(0),
            )?;
            Ok::<_, labrack::store::StoreError>((usage, billed))
        })
        .await
        .expect("counts");
    assert_eq!(counts, (1, 1), "one use, one ledger charge");
}
