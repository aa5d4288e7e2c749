//! Lab endpoints in-process: who may touch templates, hosts and allocations, and what bad
//! input gets (a problem document naming the field, and no change to stored state).

use crate::common;

use common::{As, TestApp, force_state, insert_host, join, seed};
use serde_json::json;

const TEMPLATES: &str =
    "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"/srv/skel\"\n";

async fn with_templates(app: &TestApp, organizer: &As) {
    let reply = app
        .raw(
            "PUT",
            "/api/v1/templates",
            organizer,
            "application/toml",
            TEMPLATES,
        )
        .await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.body);
}

/// A fresh team with an allocation in `state`; returns (team id, allocation id).
async fn allocation_in(app: &TestApp, organizer: &As, event_id: i64, state: &str) -> (i64, i64) {
    let team = app
        .call(
            "POST",
            &format!("/api/v1/events/{event_id}/teams"),
            organizer,
            Some(json!({"name": format!("T{}", next())})),
        )
        .await;
    let team_id = team.body["id"].as_i64().expect("team id");
    let alloc = app
        .call(
            "POST",
            &format!("/api/v1/teams/{team_id}/allocation"),
            organizer,
            Some(json!({"template": "desk"})),
        )
        .await;
    assert_eq!(alloc.status.as_u16(), 201, "{}", alloc.body);
    let id = alloc.body["id"].as_i64().expect("allocation id");
    force_state(app, id, state).await;
    (team_id, id)
}

fn next() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// (what, method, path, body, roles allowed, how a participant is refused)
type MatrixCase<'a> = (
    &'a str,
    &'a str,
    String,
    Option<serde_json::Value>,
    &'a [&'a str],
    u16,
);

#[tokio::test]
async fn lab_authorization_matrix() {
    let app = TestApp::new().await;
    let mut callers = common::staff_cast(&app).await;
    let organizer = callers[1].1.clone();
    let s = seed(&app, &organizer).await;
    insert_host(&app, "rack-1", 256).await;
    with_templates(&app, &organizer).await;
    // Participant A's team has a lab; the participant may see and reset it, nothing else.
    let own = app
        .call(
            "POST",
            &format!("/api/v1/teams/{}/allocation", s.team_a),
            &organizer,
            Some(json!({"template": "desk"})),
        )
        .await;
    let own_id = own.body["id"].as_i64().expect("id");
    force_state(&app, own_id, "active").await;
    callers.push((
        "participant",
        As::Bearer(join(&app, &s.event_code, &s.code_a).await),
    ));
    callers.push(("nobody", As::Nobody));

    let staff_read: &[&str] = &["admin", "organizer", "staff", "judge"];
    let operators: &[&str] = &["admin", "organizer", "staff"];
    let admins: &[&str] = &["admin", "organizer"];
    for (role, who) in &callers {
        // (what, method, path, body, roles allowed, how a participant is refused)
        let (team, active) = allocation_in(&app, &organizer, s.event_id, "active").await;
        let (_, active2) = allocation_in(&app, &organizer, s.event_id, "active").await;
        let (_, failed) = allocation_in(&app, &organizer, s.event_id, "failed").await;
        let (_, idle) = allocation_in(&app, &organizer, s.event_id, "active").await;
        let fresh_team = app
            .call(
                "POST",
                &format!("/api/v1/events/{}/teams", s.event_id),
                &organizer,
                Some(json!({"name": format!("F{}", next())})),
            )
            .await;
        let fresh_team = fresh_team.body["id"].as_i64().expect("team");
        let cases: Vec<MatrixCase<'_>> = vec![
            (
                "list hosts",
                "GET",
                "/api/v1/hosts".into(),
                None,
                staff_read,
                403,
            ),
            (
                "enrolment token",
                "POST",
                "/api/v1/hosts/enrolment-tokens".into(),
                Some(json!({})),
                admins,
                403,
            ),
            (
                "list templates",
                "GET",
                "/api/v1/templates".into(),
                None,
                staff_read,
                403,
            ),
            (
                "list allocations",
                "GET",
                format!("/api/v1/events/{}/allocations", s.event_id),
                None,
                staff_read,
                403,
            ),
            (
                "allocate",
                "POST",
                format!("/api/v1/teams/{fresh_team}/allocation"),
                Some(json!({"template": "desk"})),
                operators,
                403,
            ),
            (
                "another team's lab",
                "GET",
                format!("/api/v1/allocations/{active}"),
                None,
                staff_read,
                404,
            ),
            (
                "reset another team's lab",
                "POST",
                format!("/api/v1/allocations/{active}/reset"),
                None,
                operators,
                404,
            ),
            (
                "release",
                "POST",
                format!("/api/v1/allocations/{active2}/release"),
                None,
                operators,
                403,
            ),
            (
                "force-release",
                "POST",
                format!("/api/v1/allocations/{failed}/force-release"),
                None,
                admins,
                403,
            ),
            (
                "terminal of another team's lab",
                "POST",
                format!("/api/v1/allocations/{idle}/terminal-ticket"),
                None,
                operators,
                404,
            ),
            (
                "watch another team's desktop",
                "POST",
                format!("/api/v1/allocations/{idle}/desktop-ticket"),
                None,
                staff_read,
                404,
            ),
        ];
        let _ = team;
        for (what, method, path, body, allowed, participant_refusal) in cases {
            let before = app.snapshot().await;
            let reply = app.call(method, &path, who, body).await;
            let said = format!(
                "{role} {what} ({method} {path}): {} {}",
                reply.status, reply.body
            );
            if *role == "nobody" {
                reply.problem(401);
                assert_eq!(
                    before,
                    app.snapshot().await,
                    "refused request changed state: {said}"
                );
            } else if allowed.contains(role) {
                assert!(reply.status.is_success(), "{said}");
            } else {
                let expected = if *role == "participant" {
                    participant_refusal
                } else {
                    403
                };
                reply.problem(expected);
                assert_eq!(
                    before,
                    app.snapshot().await,
                    "refused request changed state: {said}"
                );
            }
        }
    }
    // The participant's own lab: visible and resettable by its team.
    let participant = &callers[4].1;
    let mine = app
        .call("GET", "/api/v1/me/allocation", participant, None)
        .await;
    assert_eq!(mine.body["allocation"]["id"], own_id);
    let view = app
        .call(
            "GET",
            &format!("/api/v1/allocations/{own_id}"),
            participant,
            None,
        )
        .await;
    assert_eq!(view.status.as_u16(), 200);
    let desktop = app
        .call(
            "POST",
            &format!("/api/v1/allocations/{own_id}/desktop-ticket"),
            participant,
            None,
        )
        .await;
    assert_eq!(
        (desktop.status.as_u16(), desktop.body["mode"].as_str()),
        (201, Some("interactive")),
        "{}",
        desktop.body
    );
    let judge = app
        .call(
            "POST",
            &format!("/api/v1/allocations/{own_id}/desktop-ticket"),
            &callers[3].1,
            None,
        )
        .await;
    assert_eq!(judge.body["mode"], "view", "judges only watch");
    let terminal = app
        .call(
            "POST",
            &format!("/api/v1/allocations/{own_id}/terminal-ticket"),
            participant,
            None,
        )
        .await;
    assert_eq!(terminal.status.as_u16(), 201, "{}", terminal.body);
    let reset = app
        .call(
            "POST",
            &format!("/api/v1/allocations/{own_id}/reset"),
            participant,
            None,
        )
        .await;
    assert_eq!(
        (reset.status.as_u16(), reset.body["busy"].as_bool()),
        (200, Some(true)),
        "{}",
        reset.body
    );
    for staff in &callers[..4] {
        app.call("GET", "/api/v1/me/allocation", &staff.1, None)
            .await
            .problem(403);
    }
    // Templates are replaced by organizers and admins only.
    for (role, who) in &callers {
        let reply = app
            .raw(
                "PUT",
                "/api/v1/templates",
                who,
                "application/toml",
                TEMPLATES,
            )
            .await;
        match *role {
            "admin" | "organizer" => assert_eq!(reply.status.as_u16(), 200, "{role}"),
            "nobody" => assert_eq!(reply.problem(401)["status"], 401),
            _ => assert_eq!(reply.problem(403)["status"], 403, "{role}"),
        }
    }
}

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
async fn bad_lab_input_gets_a_problem_and_changes_nothing() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    let s = seed(&app, &organizer).await;
    with_templates(&app, &organizer).await;
    let json_ct = "application/json";
    let team = format!("/api/v1/teams/{}/allocation", s.team_a);
    let enrol = "/api/v1/hosts/enrol".to_owned();
    let key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let enrol_body = |field: &str, value: serde_json::Value| {
        let resources: serde_json::Value =
            serde_json::from_str(common::HOST_RESOURCES).expect("resources");
        let mut body = json!({"version": 2, "token": "lrh_x", "name": "h1", "public_key": key, "address": "10.0.0.2", "capacity": 4, "resources": resources});
        body[field] = value;
        body.to_string().into_bytes()
    };
    let cases: Vec<BadCase> = vec![
        (
            "template syntax error",
            "PUT",
            "/api/v1/templates".into(),
            "application/toml",
            b"[[template]]\nname = \"a\"\nruntime = \"local-user\"\nskeleton = \n".to_vec(),
            422,
            None,
        ),
        (
            "template unknown runtime",
            "PUT",
            "/api/v1/templates".into(),
            "application/toml",
            b"[[template]]\nname = \"a\"\nruntime = \"vm\"\nskeleton = \"/s\"\n".to_vec(),
            422,
            None,
        ),
        (
            "template as json",
            "PUT",
            "/api/v1/templates".into(),
            json_ct,
            b"{}".to_vec(),
            415,
            None,
        ),
        (
            "template not utf-8",
            "PUT",
            "/api/v1/templates".into(),
            "application/toml",
            b"name = \"\xff\"\n".to_vec(),
            400,
            None,
        ),
        (
            "template too large",
            "PUT",
            "/api/v1/templates".into(),
            "application/toml",
            vec![b'#'; 300 * 1024],
            413,
            None,
        ),
        (
            "unknown template",
            "POST",
            team.clone(),
            json_ct,
            br#"{"template": "gpu-monster"}"#.to_vec(),
            422,
            Some("template"),
        ),
        (
            "no host enrolled",
            "POST",
            team.clone(),
            json_ct,
            br#"{"template": "desk"}"#.to_vec(),
            409,
            Some("template"),
        ),
        (
            "allocate unknown team",
            "POST",
            "/api/v1/teams/4242/allocation".into(),
            json_ct,
            br#"{"template": "desk"}"#.to_vec(),
            404,
            None,
        ),
        (
            "allocate extra field",
            "POST",
            team.clone(),
            json_ct,
            br#"{"template": "desk", "host": 1}"#.to_vec(),
            422,
            Some("host"),
        ),
        (
            "token ttl too short",
            "POST",
            "/api/v1/hosts/enrolment-tokens".into(),
            json_ct,
            br#"{"ttl_secs": 5}"#.to_vec(),
            422,
            Some("ttl_secs"),
        ),
        (
            "token ttl too long",
            "POST",
            "/api/v1/hosts/enrolment-tokens".into(),
            json_ct,
            br#"{"ttl_secs": 9999999}"#.to_vec(),
            422,
            Some("ttl_secs"),
        ),
        (
            "enrol bad key",
            "POST",
            enrol.clone(),
            json_ct,
            enrol_body("public_key", json!("short")),
            422,
            Some("public_key"),
        ),
        (
            "enrol bad name",
            "POST",
            enrol.clone(),
            json_ct,
            enrol_body("name", json!("rack 1; rm")),
            422,
            Some("name"),
        ),
        (
            "enrol bad address",
            "POST",
            enrol.clone(),
            json_ct,
            enrol_body("address", json!("http://x/")),
            422,
            Some("address"),
        ),
        (
            "enrol zero capacity",
            "POST",
            enrol.clone(),
            json_ct,
            enrol_body("capacity", json!(0)),
            422,
            Some("capacity"),
        ),
        (
            "enrol other version",
            "POST",
            enrol.clone(),
            json_ct,
            enrol_body("version", json!(1)),
            422,
            Some("version"),
        ),
        (
            "enrol odd resources",
            "POST",
            enrol.clone(),
            json_ct,
            enrol_body(
                "resources",
                json!({"cpus": 0, "memory_mib": 1, "pids_max": 1, "gpus": 0, "isolation": "x", "enforces": []}),
            ),
            422,
            Some("resources.cpus"),
        ),
        (
            "enrol unknown token",
            "POST",
            enrol.clone(),
            json_ct,
            enrol_body("token", json!("lrh_nope")),
            401,
            None,
        ),
        (
            "host poll unsigned",
            "POST",
            "/api/v1/host/poll".into(),
            json_ct,
            br#"{"version": 2, "wait_ms": 0}"#.to_vec(),
            401,
            None,
        ),
        (
            "missing allocation",
            "GET",
            "/api/v1/allocations/999".into(),
            json_ct,
            Vec::new(),
            404,
            None,
        ),
        (
            "reset missing allocation",
            "POST",
            "/api/v1/allocations/999/reset".into(),
            json_ct,
            Vec::new(),
            404,
            None,
        ),
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
    // Template errors name their lines.
    let reply = app
        .raw(
            "PUT",
            "/api/v1/templates",
            &organizer,
            "application/toml",
            "[[template]]\nname = \"a\"\nruntime = \"vm\"\nskeleton = \"relative\"\n",
        )
        .await;
    let lines: Vec<u64> = reply.body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["line"].as_u64())
        .collect();
    assert_eq!(lines, vec![3, 4], "{}", reply.body);

    // Out of order: a lab that is not active cannot be reset; a released one not released again.
    insert_host(&app, "rack-1", 4).await;
    // A template no host can run is refused on the line of the field at fault; one asking
    // for a limit no host enforces cannot be placed, and the refusal names the field.
    let before = app.snapshot().await;
    let big = "[[template]]\nname = \"big\"\nruntime = \"local-user\"\nskeleton = \"/s\"\nmemory_mib = 65536\n";
    let reply = app
        .raw(
            "PUT",
            "/api/v1/templates",
            &organizer,
            "application/toml",
            big,
        )
        .await;
    assert_eq!(reply.status.as_u16(), 422, "{}", reply.body);
    assert_eq!(reply.body["errors"][0]["line"], 5, "{}", reply.body);
    assert!(
        reply.body["errors"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("memory_mib") && r.contains("32000 MiB")),
        "{}",
        reply.body
    );
    let cpus = "[[template]]\nname = \"big\"\nruntime = \"local-user\"\nskeleton = \"/s\"\ngpus = 2\ncpu = 16\n";
    let reply = app
        .raw(
            "PUT",
            "/api/v1/templates",
            &organizer,
            "application/toml",
            cpus,
        )
        .await;
    assert_eq!(reply.status.as_u16(), 422, "{}", reply.body);
    assert_eq!(
        before,
        app.snapshot().await,
        "refused templates change nothing"
    );
    let quota = "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"/s\"\n[[template]]\nname = \"quota\"\nruntime = \"local-user\"\nskeleton = \"/s\"\ndisk_mib = 1024\n";
    let reply = app
        .raw(
            "PUT",
            "/api/v1/templates",
            &organizer,
            "application/toml",
            quota,
        )
        .await;
    assert_eq!(
        reply.status.as_u16(),
        422,
        "no host enforces a disk quota: {}",
        reply.body
    );
    assert_eq!(reply.body["errors"][0]["line"], 9, "{}", reply.body);
    let io = "[[template]]\nname = \"io\"\nruntime = \"local-user\"\nskeleton = \"/s\"\nio_weight = 300\n";
    let reply = app
        .raw(
            "PUT",
            "/api/v1/templates",
            &organizer,
            "application/toml",
            io,
        )
        .await;
    assert_eq!(
        (
            reply.status.as_u16(),
            reply.body["errors"][0]["line"].as_u64()
        ),
        (422, Some(5)),
        "no host has an IO weight: {}",
        reply.body
    );
    assert!(
        reply.body["errors"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("io_weight") && r.contains("cannot enforce")),
        "{}",
        reply.body
    );
    assert_eq!(
        before,
        app.snapshot().await,
        "refused templates change nothing"
    );
    let alloc = app
        .call("POST", &team, &organizer, Some(json!({"template": "desk"})))
        .await;
    let id = alloc.body["id"].as_i64().expect("id");
    let again = app
        .call("POST", &team, &organizer, Some(json!({"template": "desk"})))
        .await;
    again.problem(409);
    let before = app.snapshot().await;
    app.call(
        "POST",
        &format!("/api/v1/allocations/{id}/reset"),
        &organizer,
        None,
    )
    .await
    .problem(409);
    app.call(
        "POST",
        &format!("/api/v1/allocations/{id}/terminal-ticket"),
        &organizer,
        None,
    )
    .await
    .problem(409);
    app.call(
        "POST",
        &format!("/api/v1/allocations/{id}/desktop-ticket"),
        &organizer,
        None,
    )
    .await
    .problem(409);
    assert_eq!(
        before,
        app.snapshot().await,
        "a refused reset leaves no audit row"
    );
    force_state(&app, id, "released").await;
    let before = app.snapshot().await;
    app.call(
        "POST",
        &format!("/api/v1/allocations/{id}/release"),
        &organizer,
        None,
    )
    .await
    .problem(409);
    app.call(
        "POST",
        &format!("/api/v1/allocations/{id}/force-release"),
        &organizer,
        None,
    )
    .await
    .problem(409);
    assert_eq!(before, app.snapshot().await);
}

#[tokio::test]
async fn hosts_without_an_agent_and_their_labs_refuse_bad_or_unauthorised_input() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let staff = As::Bearer(app.staff("staff1", "staff").await);
    let s = seed(&app, &organizer).await;
    with_templates(&app, &organizer).await;
    let team = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let key = format!("ssh-ed25519 {}", "A".repeat(68));
    let good = json!({"name": "ext", "address": "10.0.0.9", "ssh_port": 22, "ssh_host_key": key});
    let before = app.snapshot().await;
    for (body, field) in [
        (
            json!({"name": "ext", "address": "10.0.0.9", "ssh_host_key": "not a key"}),
            "ssh_host_key",
        ),
        (
            json!({"name": "bad name!", "address": "10.0.0.9", "ssh_host_key": key}),
            "name",
        ),
        (
            json!({"name": "ext", "address": "10.0.0.9 ; rm", "ssh_host_key": key}),
            "address",
        ),
        (
            json!({"name": "ext", "address": "10.0.0.9", "ssh_port": 0, "ssh_host_key": key}),
            "ssh_port",
        ),
        (
            json!({"name": "ext", "address": "10.0.0.9", "capacity": 0, "ssh_host_key": key}),
            "capacity",
        ),
        (
            json!({"name": "ext", "address": "10.0.0.9", "ssh_host_key": key, "colour": 1}),
            "colour",
        ),
    ] {
        let reply = app
            .call(
                "POST",
                "/api/v1/hosts/agentless",
                &organizer,
                Some(body.clone()),
            )
            .await;
        assert_eq!(reply.status.as_u16(), 422, "{body}: {}", reply.body);
        assert!(
            reply.body.to_string().contains(field),
            "{body}: {}",
            reply.body
        );
    }
    for who in [&staff, &team] {
        app.call("POST", "/api/v1/hosts/agentless", who, Some(good.clone()))
            .await
            .problem(403);
    }
    assert_eq!(app.snapshot().await, before, "refused hosts change nothing");
    let host = app
        .call(
            "POST",
            "/api/v1/hosts/agentless",
            &organizer,
            Some(good.clone()),
        )
        .await;
    assert_eq!(host.status.as_u16(), 201, "{}", host.body);
    app.call("POST", "/api/v1/hosts/agentless", &organizer, Some(good))
        .await
        .problem(409);
    let host_id = host.body["id"].as_i64().expect("id");
    let agent_host = insert_host(&app, "with-agent", 2).await;

    let path = format!("/api/v1/teams/{}/agentless-lab", s.team_a);
    let lab = |host: i64, user: &str, password: &str| json!({"host_id": host, "template": "desk", "username": user, "password": password});
    let before = app.snapshot().await;
    for (body, status, field) in [
        (lab(host_id, "Bad User", "pw"), 422, "username"),
        (lab(host_id, "team1", ""), 422, "password"),
        (lab(agent_host, "team1", "pw"), 422, "host_id"),
        (lab(999_999, "team1", "pw"), 422, "host_id"),
        (
            json!({"host_id": host_id, "template": "nope", "username": "team1", "password": "pw"}),
            422,
            "template",
        ),
    ] {
        let reply = app
            .call("POST", &path, &organizer, Some(body.clone()))
            .await;
        assert_eq!(reply.status.as_u16(), status, "{body}: {}", reply.body);
        assert!(
            reply.body.to_string().contains(field),
            "{body}: {}",
            reply.body
        );
    }
    app.call("POST", &path, &staff, Some(lab(host_id, "team1", "pw")))
        .await
        .problem(403);
    app.call("POST", &path, &team, Some(lab(host_id, "team1", "pw")))
        .await
        .problem(403);
    app.call(
        "POST",
        "/api/v1/teams/999999/agentless-lab",
        &organizer,
        Some(lab(host_id, "team1", "pw")),
    )
    .await
    .problem(404);
    assert_eq!(app.snapshot().await, before, "refused labs change nothing");
    let made = app
        .call(
            "POST",
            &path,
            &organizer,
            Some(lab(host_id, "team1", "secret-pw")),
        )
        .await;
    assert_eq!(made.status.as_u16(), 201, "{}", made.body);
    assert!(
        !made.body.to_string().contains("secret-pw"),
        "the password never comes back"
    );
    // Capacity 1 is used up; and a team has one live lab at most.
    let other = app
        .call(
            "POST",
            &format!("/api/v1/teams/{}/agentless-lab", s.team_b),
            &organizer,
            Some(lab(host_id, "team2", "pw")),
        )
        .await;
    assert_eq!(
        other.problem(409)["detail"]
            .as_str()
            .map(|d| d.contains("in use")),
        Some(true),
        "{}",
        other.body
    );
    app.call("POST", &path, &organizer, Some(lab(host_id, "team1", "pw")))
        .await
        .problem(409);
    // Check runs: a bad query is refused.
    app.call(
        "GET",
        &format!("/api/v1/events/{}/check-runs?state=bogus", s.event_id),
        &organizer,
        None,
    )
    .await
    .problem(422);
    app.call(
        "GET",
        &format!("/api/v1/events/{}/check-runs?limit=0", s.event_id),
        &organizer,
        None,
    )
    .await
    .problem(422);
    app.call(
        "GET",
        &format!("/api/v1/events/{}/check-runs", s.event_id),
        &team,
        None,
    )
    .await
    .problem(403);
    app.call("GET", "/api/v1/events/999999/check-runs", &organizer, None)
        .await
        .problem(404);
}

#[tokio::test]
async fn a_team_is_reassigned_off_a_dead_host_in_one_step_and_bad_requests_change_nothing() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org1", "organizer").await);
    let staff = As::Bearer(app.staff("staff1", "staff").await);
    let s = seed(&app, &organizer).await;
    let first = insert_host(&app, "rack-1", 4).await;
    with_templates(&app, &organizer).await;
    let lab = app
        .call(
            "POST",
            &format!("/api/v1/teams/{}/allocation", s.team_a),
            &organizer,
            Some(json!({"template": "desk"})),
        )
        .await;
    let id = lab.body["id"].as_i64().expect("id");
    assert_eq!(lab.body["host_id"], first);
    force_state(&app, id, "active").await;
    let second = insert_host(&app, "rack-2", 4).await;
    let path = format!("/api/v1/allocations/{id}/reassign");

    // While its host is healthy and the lab works, staff reset or release instead.
    let before = app.snapshot().await;
    let refused = app.call("POST", &path, &organizer, Some(json!({}))).await;
    assert!(
        refused.problem(409)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("rack-1 is healthy")),
        "{}",
        refused.body
    );
    assert_eq!(before, app.snapshot().await);

    // The host dies.
    app.db
        .writer()
        .write(move |conn| conn.execute("UPDATE hosts SET healthy = 0 WHERE id = ?1", [first]))
        .await
        .expect("host down");
    let participant = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let before = app.snapshot().await;
    let refusals = [
        (&staff, Some(json!({})), 403, "operators may not move labs"),
        (
            &participant,
            Some(json!({})),
            403,
            "teams may not move labs",
        ),
        (&As::Nobody, Some(json!({})), 401, "anonymous"),
        (
            &organizer,
            Some(json!({"host_id": first})),
            422,
            "the current host",
        ),
        (
            &organizer,
            Some(json!({"host_id": 999_999})),
            422,
            "an unknown host",
        ),
        (
            &organizer,
            Some(json!({"host": second})),
            422,
            "an unknown field",
        ),
        (&organizer, Some(json!("rack-2")), 422, "not an object"),
    ];
    for (who, body, status, what) in refusals {
        let reply = app.call("POST", &path, who, body).await;
        assert_eq!(reply.status.as_u16(), status, "{what}: {}", reply.body);
        assert_eq!(reply.content_type, "application/problem+json", "{what}");
        assert_eq!(before, app.snapshot().await, "{what} changed stored state");
    }
    app.call(
        "POST",
        "/api/v1/allocations/999999/reassign",
        &organizer,
        Some(json!({})),
    )
    .await
    .problem(404);

    let moved = app.call("POST", &path, &organizer, Some(json!({}))).await;
    assert_eq!(moved.status.as_u16(), 201, "{}", moved.body);
    assert_eq!(moved.body["host_id"], second);
    assert_eq!(moved.body["team_id"], s.team_a);
    assert_eq!(moved.body["template"], "desk");
    let old = app
        .call(
            "GET",
            &format!("/api/v1/allocations/{id}"),
            &organizer,
            None,
        )
        .await;
    assert_eq!(old.body["state"], "released", "{}", old.body);
    let mine = app
        .call("GET", "/api/v1/me/allocation", &participant, None)
        .await;
    assert_eq!(
        mine.body["allocation"]["id"], moved.body["id"],
        "the team sees its new lab"
    );
    // A released lab cannot be moved again.
    app.call("POST", &path, &organizer, Some(json!({})))
        .await
        .problem(409);

    // Thumbnails: a released lab has no desktop (409), teams may not look (403), and a desktop
    // that cannot be reached is a 502 naming it; none of these changes anything.
    let before = app.snapshot().await;
    let thumbnail = format!("/api/v1/allocations/{id}/thumbnail");
    app.call("GET", &thumbnail, &organizer, None)
        .await
        .problem(409);
    app.call("GET", &thumbnail, &participant, None)
        .await
        .problem(403);
    app.call(
        "GET",
        "/api/v1/allocations/999999/thumbnail",
        &organizer,
        None,
    )
    .await
    .problem(404);
    assert_eq!(before, app.snapshot().await, "refused looks change nothing");
    let fresh = moved.body["id"].as_i64().expect("new lab");
    force_state(&app, fresh, "active").await;
    let before_unreachable = app.snapshot().await;
    let unreachable = app
        .call(
            "GET",
            &format!("/api/v1/allocations/{fresh}/thumbnail"),
            &organizer,
            None,
        )
        .await;
    assert!(
        unreachable.problem(502)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("could not be opened")),
        "{}",
        unreachable.body
    );
    assert_eq!(
        before_unreachable,
        app.snapshot().await,
        "a failed look changes nothing"
    );
}

#[tokio::test]
async fn once_the_event_ends_the_team_only_watches_its_lab() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org-end", "organizer").await);
    let s = seed(&app, &organizer).await;
    insert_host(&app, "rack-1", 256).await;
    with_templates(&app, &organizer).await;
    let own = app
        .call(
            "POST",
            &format!("/api/v1/teams/{}/allocation", s.team_a),
            &organizer,
            Some(json!({"template": "desk"})),
        )
        .await;
    let own_id = own.body["id"].as_i64().expect("id");
    force_state(&app, own_id, "active").await;
    let participant = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let transition = format!("/api/v1/events/{}/transition", s.event_id);
    for to in ["live", "ended"] {
        let moved = app
            .call("POST", &transition, &organizer, Some(json!({"to": to})))
            .await;
        assert_eq!(moved.status.as_u16(), 200, "{}", moved.body);
    }
    let desktop = app
        .call(
            "POST",
            &format!("/api/v1/allocations/{own_id}/desktop-ticket"),
            &participant,
            None,
        )
        .await;
    assert_eq!(
        (desktop.status.as_u16(), desktop.body["mode"].as_str()),
        (201, Some("view")),
        "the team watches while judges look: {}",
        desktop.body
    );
    let before = app.snapshot().await;
    let terminal = app
        .call(
            "POST",
            &format!("/api/v1/allocations/{own_id}/terminal-ticket"),
            &participant,
            None,
        )
        .await;
    assert!(
        terminal.problem(409)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("ended")),
        "{}",
        terminal.body
    );
    let reset = app
        .call(
            "POST",
            &format!("/api/v1/allocations/{own_id}/reset"),
            &participant,
            None,
        )
        .await;
    assert!(
        reset.problem(409)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("ended")),
        "{}",
        reset.body
    );
    assert_eq!(
        app.snapshot().await,
        before,
        "refused lab work changes nothing"
    );
    // Staff still operate the lab.
    let staff_terminal = app
        .call(
            "POST",
            &format!("/api/v1/allocations/{own_id}/terminal-ticket"),
            &organizer,
            None,
        )
        .await;
    assert_eq!(
        staff_terminal.status.as_u16(),
        201,
        "{}",
        staff_terminal.body
    );
}

#[tokio::test]
async fn staff_resume_a_lab_that_failed_while_its_host_was_silent() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org-resume", "organizer").await);
    let judge = As::Bearer(app.staff("judge-resume", "judge").await);
    let s = seed(&app, &organizer).await;
    let host = insert_host(&app, "rack-1", 256).await;
    with_templates(&app, &organizer).await;
    let own = app
        .call(
            "POST",
            &format!("/api/v1/teams/{}/allocation", s.team_a),
            &organizer,
            Some(json!({"template": "desk"})),
        )
        .await;
    let id = own.body["id"].as_i64().expect("id");
    force_state(&app, id, "active").await;
    let resume = format!("/api/v1/allocations/{id}/resume");
    // An active lab has nothing to resume.
    app.call("POST", &resume, &organizer, None)
        .await
        .problem(409);
    // It failed because the host stayed silent past the grace, and the host is still away.
    app.db
        .writer()
        .write(move |conn| {
            conn.execute("UPDATE allocations SET state = 'failed', resume_to = 'active', reason = 'silent' WHERE id = ?1", [id])?;
            conn.execute("UPDATE hosts SET healthy = 0 WHERE id = ?1", [host])?;
            Ok::<_, rusqlite::Error>(())
        })
        .await
        .expect("failed for silence");
    let participant = As::Bearer(join(&app, &s.event_code, &s.code_a).await);
    let before = app.snapshot().await;
    app.call("POST", &resume, &participant, None)
        .await
        .problem(403);
    app.call("POST", &resume, &judge, None).await.problem(403);
    let silent = app.call("POST", &resume, &organizer, None).await;
    assert!(
        silent.problem(409)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("still silent")),
        "{}",
        silent.body
    );
    assert_eq!(
        app.snapshot().await,
        before,
        "refused resumes change nothing"
    );
    app.db
        .writer()
        .write(move |conn| conn.execute("UPDATE hosts SET healthy = 1 WHERE id = ?1", [host]))
        .await
        .expect("host back");
    let resumed = app.call("POST", &resume, &organizer, None).await;
    assert_eq!(
        (resumed.status.as_u16(), resumed.body["state"].as_str()),
        (200, Some("active")),
        "{}",
        resumed.body
    );
    app.call("POST", &resume, &organizer, None)
        .await
        .problem(409);
}
