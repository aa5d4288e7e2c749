//! The billing ledger and the outbox in-process: credits and corrections as new entries
//! only, refusals that change nothing, CSV export, and outbox rows written with their
//! changes in one gap-free sequence.

use crate::common;

use common::{As, TestApp, join, seed};
use serde_json::json;

async fn outbox(app: &TestApp) -> Vec<(i64, String, String)> {
    app.db
        .read(|conn| {
            let mut statement =
                conn.prepare("SELECT seq, kind, entity FROM outbox ORDER BY seq")?;
            let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(labrack::store::StoreError::from)
        })
        .await
        .expect("outbox")
}

#[tokio::test]
async fn credits_and_corrections_are_new_entries_and_bad_ones_change_nothing() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let staff = As::Bearer(app.staff("staff1", "staff").await);
    let judge = As::Bearer(app.staff("judge1", "judge").await);
    let s = seed(&app, &organizer).await;
    let team = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let path = format!("/api/v1/events/{}/ledger", s.event_id);
    let before = app.snapshot().await;
    for (body, field) in [
        (
            json!({"kind": "gpu_hours", "amount_cents": -5, "note": "sneaky"}),
            "kind",
        ),
        (
            json!({"kind": "credit", "amount_cents": -500, "note": "negative"}),
            "amount_cents",
        ),
        (
            json!({"kind": "credit", "amount_cents": 0, "note": "nothing"}),
            "amount_cents",
        ),
        (
            json!({"kind": "credit", "amount_cents": 500, "note": ""}),
            "note",
        ),
        (
            json!({"kind": "credit", "amount_cents": 500, "note": "prepaid", "team_id": 999_999}),
            "team_id",
        ),
        (json!({"kind": "credit", "amount_cents": 500}), "note"),
    ] {
        let reply = app
            .call("POST", &path, &organizer, Some(body.clone()))
            .await;
        assert_eq!(reply.status.as_u16(), 422, "{body}: {}", reply.body);
        assert!(
            reply.body.to_string().contains(field),
            "{body}: {}",
            reply.body
        );
    }
    for who in [&staff, &judge, &team] {
        app.call(
            "POST",
            &path,
            who,
            Some(json!({"kind": "credit", "amount_cents": 500, "note": "prepaid"})),
        )
        .await
        .problem(403);
    }
    app.call("GET", &path, &judge, None).await.problem(403);
    app.call("GET", &path, &team, None).await.problem(403);
    app.call(
        "POST",
        "/api/v1/events/999999/ledger",
        &organizer,
        Some(json!({"kind": "credit", "amount_cents": 500, "note": "prepaid"})),
    )
    .await
    .problem(404);
    assert_eq!(
        app.snapshot().await,
        before,
        "refused entries change nothing"
    );

    let credited = app
        .call(
            "POST",
            &path,
            &organizer,
            Some(
                json!({"kind": "credit", "amount_cents": 10_000, "note": "prepaid by the sponsor"}),
            ),
        )
        .await;
    assert_eq!(credited.status.as_u16(), 201, "{}", credited.body);
    let corrected = app
        .call("POST", &path, &organizer, Some(json!({"kind": "correction", "amount_cents": -8_500, "team_id": s.team_a, "note": "=HYPERLINK(\"x\") damage"})))
        .await;
    assert_eq!(
        corrected.body["balance"]["balance_cents"], 1_500,
        "{}",
        corrected.body
    );
    assert_eq!(
        corrected.body["balance"]["status"], "low",
        "under a fifth of the credits left"
    );
    let view = app.call("GET", &path, &staff, None).await;
    assert_eq!(view.body["entries"].as_array().map(Vec::len), Some(2));
    let csv = app.call("GET", &format!("{path}.csv"), &staff, None).await;
    assert_eq!(csv.status.as_u16(), 200);
    assert!(
        csv.content_type.starts_with("text/csv"),
        "{}",
        csv.content_type
    );
    let text = csv.body.as_str().unwrap_or_default().to_owned();
    assert!(
        text.starts_with(
            "id,at,team_id,kind,quantity,unit,amount_cents,amount,reference,note,actor\n"
        ),
        "{text}"
    );
    assert!(text.contains(",-8500,-85.00,"), "{text}");
    assert!(
        text.contains("\"'=HYPERLINK(\"\"x\"\") damage\""),
        "a formula is defused: {text}"
    );
    let alerts = app
        .call(
            "GET",
            &format!("/api/v1/events/{}/alerts", s.event_id),
            &organizer,
            None,
        )
        .await;
    assert_eq!(alerts.body[0]["kind"], "billing_low", "{}", alerts.body);
    let tampered = app
        .db
        .writer()
        .write(|conn| conn.execute("DELETE FROM billing_ledger", []))
        .await;
    assert!(tampered.is_err(), "no delete path, not even in SQL");
}

#[tokio::test]
async fn changes_the_cloud_must_see_go_to_the_outbox_with_them_in_one_gap_free_sequence() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let judge = As::Bearer(app.staff("judge1", "judge").await);
    let s = seed(&app, &organizer).await;
    let team = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    app.call(
        "POST",
        &format!("/api/v1/events/{}/transition", s.event_id),
        &organizer,
        Some(json!({"to": "live"})),
    )
    .await;
    app.call(
        "POST",
        "/api/v1/me/submissions",
        &team,
        Some(json!({"version": "v1"})),
    )
    .await;
    // A refused request in between leaves no row and no hole.
    app.call(
        "POST",
        "/api/v1/me/submissions",
        &team,
        Some(json!({"version": ""})),
    )
    .await
    .problem(422);
    app.call(
        "POST",
        &format!("/api/v1/teams/{}/judge-scores", s.team_a),
        &judge,
        Some(json!({"scores": {"quality": 6}})),
    )
    .await;
    let hint = app
        .call(
            "POST",
            &format!("/api/v1/events/{}/hints", s.event_id),
            &organizer,
            Some(json!({"title": "t", "body": "b", "cost": 2})),
        )
        .await;
    app.call(
        "POST",
        &format!("/api/v1/me/hints/{}/unlock", hint.body["id"]),
        &team,
        None,
    )
    .await;
    let all = outbox(&app).await;
    let seqs: Vec<i64> = all.iter().map(|(seq, _, _)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=i64::try_from(all.len()).unwrap_or(0)).collect::<Vec<i64>>(),
        "gap-free, audit rows included"
    );
    assert!(
        all.iter()
            .any(|(_, kind, entity)| kind == "audit" && entity.starts_with("audit:")),
        "the audit log goes to the cloud too"
    );
    let rows: Vec<(i64, String, String)> = all
        .into_iter()
        .filter(|(_, kind, _)| kind != "audit")
        .collect();
    let kinds: Vec<&str> = rows.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "event",
            "team",
            "team",
            "event",
            "submission",
            "judge_score",
            "score_adjustment",
            "ledger"
        ],
        "event created, two teams imported, event live, then scoring: {rows:?}"
    );
    assert_eq!(rows.len(), 8);
}
