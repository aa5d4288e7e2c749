//! Rubrics, judges' scores, submissions and boards in-process: line-precise rubric errors,
//! judges' limits, the deadline, and a freeze that hides changes from the public board
//! only. Bad or unauthorised requests get a problem document and change nothing.

use crate::common;

use common::{As, TestApp, join, seed};
use serde_json::json;

const RUBRIC: &str = "[[dimension]]\nname = \"functionality\"\njudge_max = 0\n\n[[dimension]]\nname = \"presentation\"\njudge_max = 10\n\n[[bracket]]\nname = \"first\"\nteams = [\"Alpha\"]\n";

#[tokio::test]
async fn rubrics_are_validated_line_by_line_and_judges_stay_within_them() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let s = seed(&app, &organizer).await;
    let judge = As::Bearer(app.staff("judge1", "judge").await);
    let participant = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let path = format!("/api/v1/events/{}/rubric", s.event_id);

    let default = app.call("GET", &path, &judge, None).await;
    assert_eq!(
        default.body["dimensions"].as_array().map(Vec::len),
        Some(5),
        "{}",
        default.body
    );
    let before = app.snapshot().await;
    let bad = RUBRIC
        .replace("judge_max = 10", "judge_max = 10\ncolour = 1")
        .replace("[\"Alpha\"]", "[\"Alpha\", \"Gamma\"]");
    let refused = app
        .raw("PUT", &path, &organizer, "application/toml", bad)
        .await;
    let problem = refused.problem(422);
    assert_eq!(problem["errors"][0]["line"], 8, "{problem}");
    assert!(
        problem["errors"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("colour")),
        "{problem}"
    );
    let unknown_team = app
        .raw(
            "PUT",
            &path,
            &organizer,
            "application/toml",
            RUBRIC.replace("[\"Alpha\"]", "[\"Alpha\", \"Gamma\"]"),
        )
        .await;
    let problem = unknown_team.problem(422);
    assert_eq!(
        (
            problem["errors"][0]["line"].as_u64(),
            problem["errors"][0]["reason"].as_str()
        ),
        (
            Some(11),
            Some("bracket \"first\": no team named \"Gamma\" in this event")
        ),
        "{problem}"
    );
    app.raw("PUT", &path, &judge, "application/toml", RUBRIC)
        .await
        .problem(403);
    app.raw("PUT", &path, &participant, "application/toml", RUBRIC)
        .await
        .problem(403);
    assert_eq!(
        app.snapshot().await,
        before,
        "refused rubrics change nothing"
    );
    let stored = app
        .raw("PUT", &path, &organizer, "application/toml", RUBRIC)
        .await;
    assert_eq!(stored.status.as_u16(), 200, "{}", stored.body);

    // Judges score only while the event runs, within each dimension's limit.
    let scores = format!("/api/v1/teams/{}/judge-scores", s.team_a);
    app.call(
        "POST",
        &scores,
        &judge,
        Some(json!({"scores": {"presentation": 5}})),
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
    let staff = As::Bearer(app.staff("staff1", "staff").await);
    let before = app.snapshot().await;
    for (body, field_hint) in [
        (json!({"scores": {"presentation": 11}}), "0 to 10"),
        (json!({"scores": {"functionality": 1}}), "checks only"),
        (json!({"scores": {"style": 1}}), "not a dimension"),
        (json!({"scores": {}}), "at least one"),
        (json!({"scores": {"presentation": -1}}), "scores"),
    ] {
        let reply = app.call("POST", &scores, &judge, Some(body.clone())).await;
        assert!(reply.status.as_u16() == 422, "{body}: {}", reply.body);
        assert!(
            reply.body.to_string().contains(field_hint),
            "{body}: {}",
            reply.body
        );
    }
    app.call(
        "POST",
        &scores,
        &participant,
        Some(json!({"scores": {"presentation": 10}})),
    )
    .await
    .problem(403);
    app.call(
        "POST",
        &scores,
        &staff,
        Some(json!({"scores": {"presentation": 10}})),
    )
    .await
    .problem(403);
    app.call(
        "POST",
        "/api/v1/teams/999999/judge-scores",
        &judge,
        Some(json!({"scores": {"presentation": 1}})),
    )
    .await
    .problem(404);
    assert_eq!(
        app.snapshot().await,
        before,
        "refused scores change nothing"
    );

    let judged = app
        .call(
            "POST",
            &scores,
            &judge,
            Some(json!({"scores": {"presentation": 6}, "comment": "clear demo"})),
        )
        .await;
    assert_eq!(judged.status.as_u16(), 200, "{}", judged.body);
    let second = As::Bearer(app.staff("judge2", "judge").await);
    app.call(
        "POST",
        &scores,
        &second,
        Some(json!({"scores": {"presentation": 9}})),
    )
    .await;
    // A judge's later score replaces their earlier one.
    app.call(
        "POST",
        &scores,
        &judge,
        Some(json!({"scores": {"presentation": 8}})),
    )
    .await;
    let board = app
        .call(
            "GET",
            &format!("/api/v1/events/{}/leaderboard", s.event_id),
            &judge,
            None,
        )
        .await;
    assert_eq!(board.body["rows"][0]["team_id"], s.team_a, "{}", board.body);
    assert_eq!(
        board.body["rows"][0]["total"], 8.5,
        "the mean of the judges' latest scores"
    );
    let bracket = app
        .call(
            "GET",
            &format!("/api/v1/events/{}/leaderboard?bracket=first", s.event_id),
            &judge,
            None,
        )
        .await;
    assert_eq!(
        bracket.body["rows"].as_array().map(Vec::len),
        Some(1),
        "{}",
        bracket.body
    );
    app.call(
        "GET",
        &format!("/api/v1/events/{}/leaderboard?bracket=nope", s.event_id),
        &judge,
        None,
    )
    .await
    .problem(422);
    app.call(
        "GET",
        &format!("/api/v1/events/{}/leaderboard", s.event_id),
        &participant,
        None,
    )
    .await
    .problem(403);
}

#[tokio::test]
async fn a_freeze_hides_changes_from_the_public_board_only() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let s = seed(&app, &organizer).await;
    let judge = As::Bearer(app.staff("judge1", "judge").await);
    let public = format!("/api/v1/events/{}/scoreboard", s.event_id);
    app.call("GET", &public, &As::Nobody, None)
        .await
        .problem(404);
    app.call(
        "POST",
        &format!("/api/v1/events/{}/transition", s.event_id),
        &organizer,
        Some(json!({"to": "live"})),
    )
    .await;
    app.call(
        "POST",
        &format!("/api/v1/teams/{}/judge-scores", s.team_b),
        &judge,
        Some(json!({"scores": {"quality": 3}})),
    )
    .await;
    let live = app.call("GET", &public, &As::Nobody, None).await;
    assert_eq!(live.status.as_u16(), 200, "{}", live.body);
    assert_eq!(
        (
            live.body["board"]["rows"][0]["team_id"].as_i64(),
            live.body["frozen_at"].as_str()
        ),
        (Some(s.team_b), None)
    );

    let frozen = app
        .call(
            "POST",
            &format!("/api/v1/events/{}/transition", s.event_id),
            &organizer,
            Some(json!({"to": "frozen"})),
        )
        .await;
    assert_eq!(frozen.status.as_u16(), 200, "{}", frozen.body);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    app.call(
        "POST",
        &format!("/api/v1/teams/{}/judge-scores", s.team_a),
        &judge,
        Some(json!({"scores": {"quality": 9}})),
    )
    .await;
    let staff_view = app
        .call(
            "GET",
            &format!("/api/v1/events/{}/leaderboard", s.event_id),
            &judge,
            None,
        )
        .await;
    assert_eq!(
        staff_view.body["rows"][0]["team_id"], s.team_a,
        "staff see live: {}",
        staff_view.body
    );
    let public_view = app.call("GET", &public, &As::Nobody, None).await;
    assert_eq!(
        public_view.body["board"]["rows"][0]["team_id"], s.team_b,
        "the public board is frozen: {}",
        public_view.body
    );
    assert_eq!(public_view.body["board"]["rows"][1]["total"], 0.0);
    assert!(
        public_view.body["frozen_at"].is_string(),
        "{}",
        public_view.body
    );

    // Unfrozen, the public board catches up.
    app.call(
        "POST",
        &format!("/api/v1/events/{}/transition", s.event_id),
        &organizer,
        Some(json!({"to": "live"})),
    )
    .await;
    let caught_up = app.call("GET", &public, &As::Nobody, None).await;
    assert_eq!(
        caught_up.body["board"]["rows"][0]["team_id"], s.team_a,
        "{}",
        caught_up.body
    );
}

#[tokio::test]
async fn submissions_are_idempotent_queued_for_scoring_and_refused_after_the_deadline() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let s = seed(&app, &organizer).await;
    let participant = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let before = app.snapshot().await;
    app.call(
        "POST",
        "/api/v1/me/submissions",
        &participant,
        Some(json!({"version": "v1"})),
    )
    .await
    .problem(409);
    app.call(
        "POST",
        "/api/v1/me/submissions",
        &organizer,
        Some(json!({"version": "v1"})),
    )
    .await
    .problem(403);
    assert_eq!(
        app.snapshot().await,
        before,
        "a draft event takes no submissions"
    );
    app.call(
        "POST",
        &format!("/api/v1/events/{}/transition", s.event_id),
        &organizer,
        Some(json!({"to": "live"})),
    )
    .await;
    let before = app.snapshot().await;
    for body in [
        json!({"version": ""}),
        json!({"version": "x".repeat(101)}),
        json!({"version": "v1", "extra": 1}),
        json!({"note": "no version"}),
    ] {
        let reply = app
            .call(
                "POST",
                "/api/v1/me/submissions",
                &participant,
                Some(body.clone()),
            )
            .await;
        assert_eq!(reply.status.as_u16(), 422, "{body}: {}", reply.body);
    }
    assert_eq!(app.snapshot().await, before);
    let first = app
        .call(
            "POST",
            "/api/v1/me/submissions",
            &participant,
            Some(json!({"version": "v1", "note": "MVP"})),
        )
        .await;
    assert_eq!(first.status.as_u16(), 201, "{}", first.body);
    let again = app
        .call(
            "POST",
            "/api/v1/me/submissions",
            &participant,
            Some(json!({"version": "v1"})),
        )
        .await;
    assert_eq!(
        (again.status.as_u16(), &again.body["id"]),
        (200, &first.body["id"]),
        "a retried submission is the same one"
    );
    let jobs = app
        .call("GET", "/api/v1/jobs?state=queued", &organizer, None)
        .await;
    assert_eq!(
        jobs.body["jobs"][0]["kind"], "score_submission",
        "{}",
        jobs.body
    );
    assert_eq!(
        jobs.body["jobs"].as_array().map(Vec::len),
        Some(1),
        "one scoring job per submission"
    );
    let mine = app
        .call("GET", "/api/v1/me/submissions", &participant, None)
        .await;
    assert_eq!(mine.body.as_array().map(Vec::len), Some(1));
    // A new version right away is rate limited and changes nothing.
    let before = app.snapshot().await;
    let hurried = app
        .call(
            "POST",
            "/api/v1/me/submissions",
            &participant,
            Some(json!({"version": "v2"})),
        )
        .await;
    hurried.problem(429);
    let wait: u64 = hurried
        .retry_after
        .as_deref()
        .and_then(|w| w.parse().ok())
        .expect("Retry-After");
    assert!((1..=10).contains(&wait), "{wait}");
    assert_eq!(
        app.snapshot().await,
        before,
        "a rate-limited submission changes nothing"
    );

    // An event whose end has passed refuses new submissions.
    let past = app
        .call("POST", "/api/v1/events", &organizer, Some(json!({"name": "Yesterday", "starts_at": "2026-01-01T09:00:00Z", "ends_at": "2026-01-02T18:00:00Z"})))
        .await;
    let past_id = past.body["id"].as_i64().expect("id");
    let import = app
        .raw(
            "POST",
            &format!("/api/v1/events/{past_id}/participants/import"),
            &organizer,
            "text/csv",
            "team,name,email\nLate,Lou,\n",
        )
        .await;
    let code = import.body["participants"][0]["join_code"]
        .as_str()
        .expect("code")
        .to_owned();
    app.call(
        "POST",
        &format!("/api/v1/events/{past_id}/transition"),
        &organizer,
        Some(json!({"to": "live"})),
    )
    .await;
    let late = As::Bearer(join(&app, past.body["code"].as_str().expect("code"), &code).await);
    let before = app.snapshot().await;
    let refused = app
        .call(
            "POST",
            "/api/v1/me/submissions",
            &late,
            Some(json!({"version": "v9"})),
        )
        .await;
    assert!(
        refused.problem(409)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("deadline passed")),
        "{}",
        refused.body
    );
    assert_eq!(
        app.snapshot().await,
        before,
        "a late submission changes nothing"
    );
}
