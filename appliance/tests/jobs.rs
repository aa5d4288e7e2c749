//! The job queue's staff endpoints in-process: who may see and change jobs, dead letters
//! and requeue, and what bad or out-of-order requests get (a problem document, no change).

use crate::common;

use common::{As, TestApp, join, seed};
use labrack::jobs::{self, NewJob};
use serde_json::json;

/// A job that failed its only attempt: a dead letter with its error.
async fn dead_job(app: &TestApp) -> i64 {
    app.db
        .writer()
        .write(|conn| {
            let mut job = NewJob::new("check", json!({"team": 7}));
            job.max_attempts = 1;
            let (id, _) = jobs::enqueue(conn, &job, 1_000)?;
            jobs::claim(conn, "worker-1", &[], 10_000, 1_000)?;
            jobs::fail(
                conn,
                id,
                "worker-1",
                "FAIL: the service did not answer",
                2_000,
            )?;
            Ok::<_, jobs::JobError>(id)
        })
        .await
        .expect("dead job")
}

#[tokio::test]
async fn staff_see_dead_letters_and_requeue_them() {
    let app = TestApp::new().await;
    let staff = As::Bearer(app.staff("staff1", "staff").await);
    let id = dead_job(&app).await;

    let dead = app
        .call("GET", "/api/v1/jobs?state=dead", &staff, None)
        .await;
    assert_eq!(dead.status.as_u16(), 200, "{}", dead.body);
    assert_eq!(dead.body["jobs"][0]["id"], id);
    assert_eq!(
        dead.body["jobs"][0]["last_error"],
        "FAIL: the service did not answer"
    );
    assert_eq!(dead.body["jobs"][0]["attempts"], 1);
    let one = app
        .call("GET", &format!("/api/v1/jobs/{id}"), &staff, None)
        .await;
    assert_eq!(one.body["payload"], json!({"team": 7}));

    let requeued = app
        .call("POST", &format!("/api/v1/jobs/{id}/requeue"), &staff, None)
        .await;
    assert_eq!(
        (
            requeued.status.as_u16(),
            requeued.body["state"].as_str(),
            requeued.body["attempts"].as_u64()
        ),
        (200, Some("queued"), Some(0)),
        "{}",
        requeued.body
    );
    // Out of order: a queued job cannot be requeued; nothing changes.
    let before = app.snapshot().await;
    let again = app
        .call("POST", &format!("/api/v1/jobs/{id}/requeue"), &staff, None)
        .await;
    assert!(
        again.problem(409)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("dead or cancelled")),
        "{}",
        again.body
    );
    assert_eq!(app.snapshot().await, before);

    let cancelled = app
        .call("POST", &format!("/api/v1/jobs/{id}/cancel"), &staff, None)
        .await;
    assert_eq!(cancelled.body["state"], "cancelled");
    let before = app.snapshot().await;
    app.call("POST", &format!("/api/v1/jobs/{id}/cancel"), &staff, None)
        .await
        .problem(409);
    assert_eq!(app.snapshot().await, before);

    let audited = app
        .db
        .read(move |conn| {
            conn.query_row(
                "SELECT group_concat(action, ',') FROM audit_log WHERE target = ?1",
                [format!("job:{id}")],
                |r| r.get::<_, String>(0),
            )
            .map_err(labrack::store::StoreError::from)
        })
        .await
        .expect("audit");
    assert_eq!(audited, "job.requeued,job.cancelled");
}

#[tokio::test]
async fn only_queue_staff_may_look_and_bad_requests_change_nothing() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let s = seed(&app, &organizer).await;
    let id = dead_job(&app).await;
    let judge = As::Bearer(app.staff("judge1", "judge").await);
    let participant = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    for who in [&judge, &participant] {
        app.call("GET", "/api/v1/jobs", who, None)
            .await
            .problem(403);
        app.call("POST", &format!("/api/v1/jobs/{id}/requeue"), who, None)
            .await
            .problem(403);
    }
    app.call("GET", "/api/v1/jobs", &As::Nobody, None)
        .await
        .problem(401);
    let before = app.snapshot().await;
    for (path, status, field) in [
        ("/api/v1/jobs?state=bogus", 422, "state"),
        ("/api/v1/jobs?limit=0", 422, "limit"),
        ("/api/v1/jobs?colour=red", 400, ""),
        ("/api/v1/jobs/999", 404, ""),
        ("/api/v1/jobs/abc", 400, ""),
    ] {
        let reply = app.call("GET", path, &organizer, None).await;
        let problem = reply.problem(status);
        if !field.is_empty() {
            assert!(problem.to_string().contains(field), "{path}: {problem}");
        }
    }
    app.call("POST", "/api/v1/jobs/999/requeue", &organizer, None)
        .await
        .problem(404);
    assert_eq!(
        app.snapshot().await,
        before,
        "refused requests change nothing"
    );
}

#[tokio::test]
async fn the_event_dashboard_counts_people_labs_and_jobs_and_names_the_problems() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let s = seed(&app, &organizer).await;
    let path = format!("/api/v1/events/{}/dashboard", s.event_id);
    let calm = app.call("GET", &path, &organizer, None).await;
    assert_eq!(calm.status.as_u16(), 200, "{}", calm.body);
    assert_eq!(
        calm.body["people"],
        json!({"teams": 2, "participants": 2, "joined": 0, "signed_in": 0})
    );
    assert_eq!(
        calm.body["queue"],
        json!({"queued": 0, "running": 0, "dead": 0})
    );
    assert_eq!(
        calm.body["sync"]["state"], "off",
        "no cloud configured: {}",
        calm.body
    );
    assert_eq!(calm.body["problems"], json!([]));
    assert!(
        ["before_start", "running", "after_end"]
            .contains(&calm.body["clock"]["phase"].as_str().unwrap_or_default()),
        "{}",
        calm.body
    );

    // A participant joins; a host goes quiet; a job dies.
    join(&app, &s.event_code, &s.code_a).await;
    let host = common::insert_host(&app, "rack-b", 2).await;
    app.db
        .writer()
        .write(move |conn| conn.execute("UPDATE hosts SET healthy = 0 WHERE id = ?1", [host]))
        .await
        .expect("host down");
    dead_job(&app).await;
    let busy = app.call("GET", &path, &organizer, None).await;
    assert_eq!(busy.body["people"]["joined"], 1, "{}", busy.body);
    assert_eq!(busy.body["people"]["signed_in"], 1, "{}", busy.body);
    assert_eq!(
        busy.body["hosts"],
        json!({"total": 1, "unhealthy": ["rack-b"], "identity_conflicts": []})
    );
    assert_eq!(busy.body["queue"]["dead"], 1);
    let keys: Vec<&str> = busy.body["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p["key"].as_str())
        .collect();
    assert_eq!(
        keys,
        ["host_down:rack-b", "dead_letters:1"],
        "{}",
        busy.body
    );

    // Staff only; a missing event or a bad id is a problem document.
    let participant = As::Bearer(join(&app, &s.event_code, &s.code_b).await);
    let refused = app.call("GET", &path, &participant, None).await;
    assert_eq!(refused.status.as_u16(), 403);
    assert_eq!(refused.problem(403)["status"], 403);
    let judge = As::Bearer(app.staff("judge1", "judge").await);
    assert_eq!(
        app.call("GET", &path, &judge, None).await.status.as_u16(),
        403,
        "judges score; they do not run the event"
    );
    assert_eq!(
        app.call("GET", &path, &As::Nobody, None)
            .await
            .status
            .as_u16(),
        401
    );
    app.call("GET", "/api/v1/events/999999/dashboard", &organizer, None)
        .await
        .problem(404);
    app.call("GET", "/api/v1/events/x/dashboard", &organizer, None)
        .await
        .problem(400);
}
