//! Lab hosts end to end, as root on this machine: the real `labrack` appliance, the real
//! `labrack-host` agent, real Linux users made by the `local-user` runtime, each lab in its
//! box (its own sshd and xrdp, namespaces and cgroup). Users made here carry a per-run
//! prefix (`lrt{n}-`) and are removed, with their boxes, even when a test fails.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use labrack_e2e::{
    Api, AppSocket, DataDir, LabHost, Server, Sshd, client_trusting, enrol_host, free_port,
    websocket,
};
use serde_json::{Value, json};
use sha2::Digest as _;
use tokio_tungstenite::tungstenite::Message;

use crate::common;

use common::{
    Fixture, LONG, Signer, fixture, fixture_with, make_account, put_checks, run_by_name,
    serve_in_lab, wait_batch,
};

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg(name)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn shadow_hash(name: &str) -> String {
    std::fs::read_to_string("/etc/shadow")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_lab_is_provisioned_reset_and_released_on_a_real_host() -> anyhow::Result<()> {
    let fx = fixture("lab-life", "127.0.0.1:0").await?;
    let state = DataDir::new("lab-life-host");
    fx.enrol("host-a", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let hosts = fx
        .admin
        .wait_for("/api/v1/hosts", LONG, |h| {
            h["hosts"][0]["telemetry"]["cpu_count"]
                .as_u64()
                .is_some_and(|n| n > 0)
        })
        .await?;
    assert_eq!(hosts["hosts"][0]["name"], "host-a");
    assert_eq!(hosts["hosts"][0]["healthy"], true);
    assert_eq!(
        hosts["hosts"][0]["telemetry"]["gpus"]["status"], "no_gpu",
        "no NVIDIA here: the clean no-GPU path"
    );

    let id = fx.allocate(fx.team_id).await?;
    let active = fx.wait_state(id, "active").await?;
    assert_eq!(active["desktop_ready"], true);
    assert_eq!(active["host_name"], "host-a");
    let user = format!("{}a{id}", fx.users.prefix);
    assert!(user_exists(&user), "the lab user {user} exists");
    let home = std::path::PathBuf::from(format!("/home/{user}"));
    assert_eq!(
        std::fs::read_to_string(home.join("README.txt"))?,
        "welcome to the lab\n"
    );
    let uid: u32 = String::from_utf8(Command::new("id").args(["-u", &user]).output()?.stdout)?
        .trim()
        .parse()?;
    assert_eq!(
        std::fs::metadata(home.join("project/main.py"))?.uid(),
        uid,
        "the home belongs to the lab user"
    );

    // The team sees its lab, never the credentials; the sealed password is not in the clear.
    let red = fx.participant(fx.team_id).await?;
    let (status, mine) = red.get("/api/v1/me/allocation").await?;
    assert_eq!(status, 200);
    assert_eq!(mine["allocation"]["id"], id);
    let text = mine.to_string();
    assert!(
        !text.contains("password") && !text.contains(&user),
        "no credentials for browsers: {text}"
    );
    let sealed: Vec<u8> = fx.db().query_row(
        "SELECT desktop_secret FROM allocations WHERE id = ?1",
        [id],
        |r| r.get(0),
    )?;
    assert_eq!(
        sealed.len(),
        12 + 20 + 16,
        "nonce + 20-character password + tag"
    );

    // Work happens; then a reset: sessions end, the home is restored, the password rotates.
    std::fs::write(home.join("scratch.txt"), "work in progress")?;
    std::fs::remove_file(home.join("README.txt"))?;
    let mut session = Command::new("runuser")
        .args(["-u", &user, "--", "sleep", "600"])
        .spawn()?;
    let before = shadow_hash(&user);
    let (status, resetting) = red
        .post(&format!("/api/v1/allocations/{id}/reset"), json!({}))
        .await?;
    assert_eq!(status, 200, "a team may reset its own lab: {resetting}");
    assert_eq!(resetting["busy"], true);
    fx.wait_state(id, "active").await?;
    assert!(
        !home.join("scratch.txt").exists(),
        "the reset removed the team's file"
    );
    assert_eq!(
        std::fs::read_to_string(home.join("README.txt"))?,
        "welcome to the lab\n"
    );
    assert_ne!(shadow_hash(&user), before, "the password was rotated");
    let ended = session.wait()?;
    assert!(!ended.success(), "the user's session was ended: {ended}");
    let resealed: Vec<u8> = fx.db().query_row(
        "SELECT desktop_secret FROM allocations WHERE id = ?1",
        [id],
        |r| r.get(0),
    )?;
    assert_ne!(resealed, sealed);
    // A second reset is a new task, not a repeat of the first.
    std::fs::write(home.join("scratch.txt"), "more work")?;
    let (status, _) = fx
        .admin
        .post(&format!("/api/v1/allocations/{id}/reset"), json!({}))
        .await?;
    assert_eq!(status, 200);
    fx.wait_state(id, "active").await?;
    assert!(
        !home.join("scratch.txt").exists(),
        "the second reset ran too"
    );

    // Release: the user and everything it owned are gone.
    std::fs::write(format!("/tmp/{user}-leftover"), "x")?;
    Command::new("chown")
        .args([&user, &format!("/tmp/{user}-leftover")])
        .status()?;
    let (status, _) = fx
        .admin
        .post(&format!("/api/v1/allocations/{id}/release"), json!({}))
        .await?;
    assert_eq!(status, 200);
    fx.wait_state(id, "released").await?;
    assert!(!user_exists(&user), "the lab user was removed");
    assert!(!home.exists(), "its home was removed");
    assert!(
        !Path::new(&format!("/tmp/{user}-leftover")).exists(),
        "its temp files were removed"
    );
    let secret: Option<Vec<u8>> = fx.db().query_row(
        "SELECT desktop_secret FROM allocations WHERE id = ?1",
        [id],
        |r| r.get(0),
    )?;
    assert!(secret.is_none(), "credentials are dropped with the desktop");
    let (status, again) = fx
        .admin
        .post(&format!("/api/v1/allocations/{id}/release"), json!({}))
        .await?;
    assert_eq!(status, 409, "releasing twice is refused: {again}");

    let (_, audit) = fx.admin.get("/api/v1/audit?limit=200").await?;
    let transitions: Vec<String> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| {
            e["action"] == "allocation.state" && e["target"] == format!("allocation:{id}").as_str()
        })
        .map(|e| {
            format!(
                "{}->{}",
                e["detail"]["from"].as_str().unwrap_or("?"),
                e["detail"]["to"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let mut expected = vec![
        "requested->provisioning",
        "provisioning->active",
        "active->releasing",
        "releasing->released",
    ];
    let mut seen = transitions.clone();
    seen.sort();
    expected.sort_unstable();
    assert_eq!(seen, expected, "{transitions:?}");
    drop(host);
    Ok(())
}

#[tokio::test]
async fn enrolment_tokens_are_one_time_and_expire() -> anyhow::Result<()> {
    let fx = fixture("enrol", "127.0.0.1:0").await?;
    let token = fx.token().await?;
    let first = DataDir::new("enrol-a");
    let (ok, text) = enrol_host(&fx.url, &fx.data.0, &token, "host-a", &first.0)?;
    assert!(ok, "{text}");
    let second = DataDir::new("enrol-b");
    let (ok, text) = enrol_host(&fx.url, &fx.data.0, &token, "host-b", &second.0)?;
    assert!(
        !ok && text.contains("already used"),
        "a reused token is refused: {text}"
    );
    assert!(
        !second.0.join("host.toml").exists(),
        "nothing saved on refusal"
    );

    let stale = fx.token().await?;
    // The database keeps a keyed hash: its plain SHA-256 is nowhere, so a copy of the
    // file alone cannot test guesses.
    let plain = hex::encode(sha2::Sha256::digest(stale.as_bytes()));
    let found: i64 = fx.db().query_row(
        "SELECT count(*) FROM enrolment_tokens WHERE token_hash = ?1",
        [&plain],
        |r| r.get(0),
    )?;
    assert_eq!(found, 0, "enrolment tokens are stored as HMAC, not SHA-256");
    // Let the token's hour pass: move its expiry into the past.
    let moved = fx.db().execute("UPDATE enrolment_tokens SET expires_at_ms = 1 WHERE id = (SELECT max(id) FROM enrolment_tokens)", [])?;
    assert_eq!(moved, 1);
    let (ok, text) = enrol_host(&fx.url, &fx.data.0, &stale, "host-c", &second.0)?;
    assert!(
        !ok && text.contains("expired"),
        "an expired token is refused: {text}"
    );
    let (ok, text) = enrol_host(&fx.url, &fx.data.0, "lrh_not-a-token", "host-c", &second.0)?;
    assert!(!ok && text.contains("unknown enrolment token"), "{text}");
    let (ok, text) = enrol_host(&fx.url, &fx.data.0, &fx.token().await?, "host-a", &second.0)?;
    assert!(
        !ok && text.contains("already enrolled"),
        "host names are unique: {text}"
    );

    let (_, hosts) = fx.admin.get("/api/v1/hosts").await?;
    assert_eq!(
        hosts["hosts"].as_array().map(Vec::len),
        Some(1),
        "only the first enrolment made a host"
    );
    Ok(())
}

#[tokio::test]
async fn hosts_see_and_answer_only_their_own_tasks_and_teams_only_their_own_lab()
-> anyhow::Result<()> {
    let fx = fixture("isolation", "127.0.0.1:0").await?;
    let (state_a, state_b) = (DataDir::new("iso-a"), DataDir::new("iso-b"));
    fx.enrol("host-a", &state_a.0).await?;
    fx.enrol("host-b", &state_b.0).await?;
    let (a, b) = (Signer::load(&state_a.0)?, Signer::load(&state_b.0)?);
    let id = fx.allocate(fx.team_id).await?;
    let (_, view) = fx.admin.get(&format!("/api/v1/allocations/{id}")).await?;
    assert_eq!(view["host_id"], a.host_id, "ties go to the lowest host id");

    let poll = json!({"version": 2, "wait_ms": 0});
    let (status, mine) = a
        .post(&fx.admin, a.host_id, "/api/v1/host/poll", &poll)
        .await?;
    assert_eq!(status, 200, "{mine}");
    let task_id = mine["tasks"][0]["id"]
        .as_str()
        .expect("host A has the provision task")
        .to_owned();
    let (status, theirs) = b
        .post(&fx.admin, b.host_id, "/api/v1/host/poll", &poll)
        .await?;
    assert_eq!(
        (status, theirs["tasks"].as_array().map(Vec::len)),
        (200, Some(0)),
        "host B sees none of A's tasks"
    );

    let report =
        json!({"version": 2, "id": task_id, "outcome": {"result": "failed", "error": "sabotage"}});
    let (status, refused) = b
        .post(&fx.admin, b.host_id, "/api/v1/host/report", &report)
        .await?;
    assert_eq!(status, 404, "B cannot answer A's task: {refused}");
    let (status, refused) = b
        .post(&fx.admin, a.host_id, "/api/v1/host/report", &report)
        .await?;
    assert_eq!(status, 401, "B cannot pass for A: {refused}");
    assert_eq!(refused["detail"], "bad host signature");
    let unsigned = fx
        .admin
        .client
        .post(format!("{}/api/v1/host/poll", fx.admin.base))
        .json(&poll)
        .send()
        .await?;
    assert_eq!(unsigned.status(), 401);
    // A signature binds the body: the same header with another body is refused.
    let header = a.header(a.host_id, "/api/v1/host/report", br#"{"version":2}"#);
    let moved = fx
        .admin
        .client
        .post(format!("{}/api/v1/host/report", fx.admin.base))
        .header("content-type", "application/json")
        .header("authorization", header)
        .body(serde_json::to_vec(&report)?)
        .send()
        .await?;
    assert_eq!(moved.status(), 401);
    let (_, view) = fx.admin.get(&format!("/api/v1/allocations/{id}")).await?;
    assert_eq!(
        (view["state"].as_str(), view["reason"].is_null()),
        (Some("provisioning"), true),
        "nothing changed"
    );

    // A's own report is taken once; a repeat is acknowledged and changes nothing.
    let (status, ack) = a
        .post(&fx.admin, a.host_id, "/api/v1/host/report", &report)
        .await?;
    assert_eq!((status, ack["applied"].as_bool()), (200, Some(true)));
    let (status, ack) = a
        .post(&fx.admin, a.host_id, "/api/v1/host/report", &report)
        .await?;
    assert_eq!((status, ack["applied"].as_bool()), (200, Some(false)));

    // Teams: Blue cannot see or reset Red's lab.
    let blue = fx.participant(fx.other_team_id).await?;
    let (status, _) = blue.get(&format!("/api/v1/allocations/{id}")).await?;
    assert_eq!(status, 404);
    let (status, _) = blue
        .post(&format!("/api/v1/allocations/{id}/reset"), json!({}))
        .await?;
    assert_eq!(status, 404);
    let (status, _) = blue
        .post(&format!("/api/v1/allocations/{id}/release"), json!({}))
        .await?;
    assert_eq!(status, 403);
    let (_, none) = blue.get("/api/v1/me/allocation").await?;
    assert!(none["allocation"].is_null());
    Ok(())
}

#[tokio::test]
async fn a_host_killed_mid_task_completes_the_lab_exactly_once() -> anyhow::Result<()> {
    let fx = fixture("kill-host", "127.0.0.1:0").await?;
    let state = DataDir::new("kill-host-state");
    fx.enrol("host-k", &state.0).await?;
    let host = fx.start_host(&state.0, &[("LABRACK_HOST_TEST_PAUSE_MS", "60000")])?;
    let id = fx.allocate(fx.team_id).await?;
    host.wait_for_log("running task", LONG).await?;
    host.kill_hard()?;
    let host = fx.start_host(&state.0, &[])?;
    fx.wait_state(id, "active").await?;
    let tasks: Vec<(String, String)> = fx
        .db()
        .prepare(
            "SELECT id, outcome FROM host_tasks WHERE allocation_id = ?1 ORDER BY created_ms, id",
        )?
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert_eq!(tasks[0].0, format!("alloc-{id}-provision-1"));
    assert!(
        tasks[0].1.contains("not run twice"),
        "the interrupted task was reported, not re-run: {tasks:?}"
    );
    assert_eq!(tasks[1].0, format!("alloc-{id}-provision-2"));
    assert!(tasks[1].1.contains("succeeded"), "{tasks:?}");
    let activations: i64 = fx.db().query_row(
        "SELECT count(*) FROM audit_log WHERE action = 'allocation.state' AND target = ?1 AND detail LIKE '%\"to\":\"active\"%'",
        [format!("allocation:{id}")],
        |r| r.get(0),
    )?;
    assert_eq!(activations, 1, "the lab became active exactly once");
    assert_eq!(
        fx.users.labs(),
        vec![format!("{}a{id}", fx.users.prefix)],
        "exactly one lab user"
    );
    drop(host);
    Ok(())
}

#[tokio::test]
async fn a_result_finished_while_the_appliance_is_down_arrives_after_restart() -> anyhow::Result<()>
{
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let mut fx = fixture("down", &listen).await?;
    let state = DataDir::new("down-host");
    fx.enrol("host-d", &state.0).await?;
    let host = fx.start_host(&state.0, &[("LABRACK_HOST_TEST_PAUSE_MS", "1500")])?;
    let id = fx.allocate(fx.team_id).await?;
    host.wait_for_log("running task", LONG).await?;
    // The appliance stops while the host works.
    let status = fx.server.take().expect("server").terminate()?;
    assert!(status.success(), "{status}");
    host.wait_for_log("task succeeded", LONG).await?;
    host.wait_for_log("delivery failed; kept in the spool", LONG)
        .await?;
    let stuck: String =
        fx.db()
            .query_row("SELECT state FROM allocations WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
    assert_eq!(
        stuck, "provisioning",
        "the appliance is down: nothing arrived yet"
    );
    // It comes back where the host knows it; the spooled report arrives.
    fx.server = Some(Server::start_with(
        &fx.data.0,
        &listen,
        &["--host-heartbeat-secs", "1"],
    )?);
    fx.wait_state(id, "active").await?;
    drop(host);
    Ok(())
}

#[tokio::test]
async fn a_silent_host_s_lab_waits_and_comes_back_with_its_work() -> anyhow::Result<()> {
    let fx = fixture("silent", "127.0.0.1:0").await?;
    let state = DataDir::new("silent-host");
    fx.enrol("host-s", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let id = fx.allocate(fx.team_id).await?;
    fx.wait_state(id, "active").await?;
    let user = format!("{}a{id}", fx.users.prefix);
    std::fs::write(format!("/home/{user}/work.txt"), "the team's work")?;
    host.kill_hard()?;
    fx.admin
        .wait_for("/api/v1/hosts", LONG, |h| h["hosts"][0]["healthy"] == false)
        .await?;
    let waiting = fx.wait_state(id, "unreachable").await?;
    assert!(
        waiting["reason"]
            .as_str()
            .is_some_and(|r| r.contains("heartbeats")),
        "{waiting}"
    );
    let (status, body) = fx
        .admin
        .post(
            &format!("/api/v1/teams/{}/allocation", fx.other_team_id),
            json!({"template": "desk"}),
        )
        .await?;
    assert_eq!(status, 409, "no healthy host for a new lab: {body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no healthy lab host")),
        "{body}"
    );

    // The host comes back (a switch rebooted): the lab is active again, work and all.
    let host = fx.start_host(&state.0, &[])?;
    fx.admin
        .wait_for("/api/v1/hosts", LONG, |h| h["hosts"][0]["healthy"] == true)
        .await?;
    let back = fx.wait_state(id, "active").await?;
    assert!(back["reason"].is_null(), "{back}");
    assert_eq!(
        std::fs::read_to_string(format!("/home/{user}/work.txt"))?,
        "the team's work"
    );
    let (status, _) = fx
        .admin
        .post(&format!("/api/v1/allocations/{id}/release"), json!({}))
        .await?;
    assert_eq!(status, 200);
    fx.wait_state(id, "released").await?;
    assert!(fx.users.list().is_empty(), "the host removed the lab user");
    drop(host);
    Ok(())
}

#[tokio::test]
async fn past_the_grace_a_silent_host_s_lab_fails_keeps_its_work_and_staff_resume_it()
-> anyhow::Result<()> {
    let fx = fixture_with("grace", "127.0.0.1:0", &["--host-grace-secs", "2"]).await?;
    let state = DataDir::new("grace-host");
    fx.enrol("host-g", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let id = fx.allocate(fx.team_id).await?;
    fx.wait_state(id, "active").await?;
    let user = format!("{}a{id}", fx.users.prefix);
    host.kill_hard()?;
    fx.wait_state(id, "unreachable").await?;
    let failed = fx.wait_state(id, "failed").await?;
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("nothing was removed")),
        "{failed}"
    );
    let (status, refused) = fx
        .admin
        .post(&format!("/api/v1/allocations/{id}/resume"), json!({}))
        .await?;
    assert_eq!(status, 409, "not while the host is silent: {refused}");
    // The host comes back late: the failed lab stays as it is until staff decide.
    let host = fx.start_host(&state.0, &[])?;
    fx.admin
        .wait_for("/api/v1/hosts", LONG, |h| h["hosts"][0]["healthy"] == true)
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, still) = fx.admin.get(&format!("/api/v1/allocations/{id}")).await?;
    assert_eq!(still["state"], "failed", "{still}");
    assert!(
        fx.users.list().contains(&user),
        "nothing removed the lab without staff"
    );
    let (status, resumed) = fx
        .admin
        .post(&format!("/api/v1/allocations/{id}/resume"), json!({}))
        .await?;
    assert_eq!(
        (status, resumed["state"].as_str()),
        (200, Some("active")),
        "{resumed}"
    );
    let red = fx.participant(fx.team_id).await?;
    let (status, ticket) = red
        .post(
            &format!("/api/v1/allocations/{id}/terminal-ticket"),
            json!({}),
        )
        .await?;
    assert_eq!(status, 201, "the team works in its lab again: {ticket}");
    drop(host);
    Ok(())
}

/// Reads terminal output until it contains `needle` (or the socket says something else).
async fn read_until(ws: &mut AppSocket, needle: &str) -> anyhow::Result<String> {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("no {needle:?} in terminal output: {seen:?}"))?;
        match next {
            Some(Ok(Message::Binary(bytes))) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Some(Ok(Message::Text(text))) => seen.push_str(text.as_str()),
            Some(Ok(_)) => {}
            other => anyhow::bail!(
                "terminal closed before {needle:?} ({other:?}); output so far {seen:?}"
            ),
        }
        if seen.contains(needle) {
            return Ok(seen);
        }
    }
}

async fn hello(fx: &Fixture, token: &str, ticket: &str) -> anyhow::Result<(AppSocket, String)> {
    let mut ws = websocket(&fx.data.0, &fx.url, "/api/v1/terminal", token).await?;
    ws.send(Message::Text(
        json!({"ticket": ticket, "cols": 100, "rows": 30})
            .to_string()
            .into(),
    ))
    .await?;
    let first = match tokio::time::timeout(LONG, ws.next()).await? {
        Some(Ok(Message::Text(text))) => text.to_string(),
        other => anyhow::bail!("unexpected first answer {other:?}"),
    };
    Ok((ws, first))
}

/// The appliance's resident memory (VmRSS), in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<u64> {
    labrack_e2e::process_memory_mib(pid, "VmRSS")
}

/// A participant types into a terminal whose shell never reads (`sleep 1d`) as fast as the
/// socket takes it: the appliance pushes back instead of buffering, its memory stays flat,
/// everyone is still served, and closing the tab ends the shell (the flood had stalled the
/// appliance's side for good before a stalled shell's input was dropped after 5 s).
#[tokio::test]
async fn a_keystroke_flood_into_a_shell_that_never_reads_is_pushed_back_not_buffered()
-> anyhow::Result<()> {
    let fx = fixture("terminal-flood", "127.0.0.1:0").await?;
    let state = DataDir::new("terminal-flood-host");
    fx.enrol("host-tf", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let id = fx.allocate(fx.team_id).await?;
    fx.wait_state(id, "active").await?;
    let user = format!("{}a{id}", fx.users.prefix);
    let red = fx.participant(fx.team_id).await?;
    let token = red.token.clone().expect("token");
    let (_, ticket) = red
        .post(
            &format!("/api/v1/allocations/{id}/terminal-ticket"),
            json!({}),
        )
        .await?;
    let (mut ws, first) = hello(&fx, &token, ticket["ticket"].as_str().expect("ticket")).await?;
    assert!(first.contains("ready"), "{first}");
    ws.send(Message::Binary(b"sleep 1d\r".to_vec().into()))
        .await?;
    let pid = fx.server.as_ref().expect("server").pid();
    let before = rss_mib(pid)?;
    // Offer 1 GiB of keystrokes with resizes between them; the shell reads none of it.
    let keys = vec![b'x'; 64 * 1024];
    let (mut taken, mut pushed_back) = (0usize, false);
    let started = std::time::Instant::now();
    while taken < 1 << 30 && started.elapsed() < Duration::from_secs(15) {
        let message = if taken % (64 << 20) == 0 {
            Message::Text(
                json!({"type": "resize", "cols": 80 + (taken >> 20) % 100, "rows": 30})
                    .to_string()
                    .into(),
            )
        } else {
            Message::Binary(keys.clone().into())
        };
        match tokio::time::timeout(Duration::from_secs(2), ws.send(message)).await {
            Ok(Ok(())) => taken += keys.len(),
            Ok(Err(e)) => anyhow::bail!("the terminal closed under the flood: {e}"),
            Err(_) => {
                pushed_back = true;
                break;
            }
        }
    }
    assert!(
        pushed_back,
        "the appliance took {} MiB without pushing back",
        taken >> 20
    );
    assert!(
        taken < 256 << 20,
        "took {} MiB before pushing back",
        taken >> 20
    );
    let after = rss_mib(pid)?;
    assert!(
        after < before + 64,
        "the appliance grew from {before} MiB to {after} MiB under the flood"
    );
    // Everyone else is served meanwhile, the flooding team included.
    let (status, _) = fx.admin.get("/api/v1/hosts").await?;
    assert_eq!(status, 200);
    let (status, _) = red.get("/api/v1/me").await?;
    assert_eq!(status, 200);
    // Closing the tab ends the shell and its `sleep`.
    drop(ws);
    let deadline = std::time::Instant::now() + LONG;
    while Command::new("pgrep")
        .args(["-u", &user, "sleep"])
        .output()?
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the flooded shell outlived its closed terminal"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(host);
    Ok(())
}

#[tokio::test]
async fn the_terminal_reaches_the_lab_shell_with_single_use_tickets_and_closes_with_the_tab()
-> anyhow::Result<()> {
    let fx = fixture("terminal", "127.0.0.1:0").await?;
    let state = DataDir::new("terminal-host");
    fx.enrol("host-t", &state.0).await?;
    // The lab's shell is its box's own sshd, reached through the lab's SSH port.
    let host = fx.start_host(&state.0, &[])?;
    let id = fx.allocate(fx.team_id).await?;
    fx.wait_state(id, "active").await?;
    let user = format!("{}a{id}", fx.users.prefix);
    let red = fx.participant(fx.team_id).await?;
    let red_token = red.token.clone().expect("token");
    let ticket_path = format!("/api/v1/allocations/{id}/terminal-ticket");

    let (status, ticket) = red.post(&ticket_path, json!({})).await?;
    assert_eq!(status, 201, "{ticket}");
    let ticket = ticket["ticket"].as_str().expect("ticket").to_owned();
    let (mut ws, first) = hello(&fx, &red_token, &ticket).await?;
    assert_eq!(first, r#"{"type":"ready"}"#);
    ws.send(Message::Binary(
        "echo $((6*7))-$(whoami); stty size\n"
            .as_bytes()
            .to_vec()
            .into(),
    ))
    .await?;
    let seen = read_until(&mut ws, "30 100").await?;
    assert!(
        seen.contains(&format!("42-{user}")),
        "the command ran as the lab user: {seen:?}"
    );
    ws.send(Message::Text(
        json!({"type": "resize", "cols": 120, "rows": 40})
            .to_string()
            .into(),
    ))
    .await?;
    ws.send(Message::Binary("stty size\n".as_bytes().to_vec().into()))
        .await?;
    read_until(&mut ws, "40 120").await?;
    let shells = || {
        Command::new("pgrep")
            .args(["-u", &user])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    };
    assert!(shells() > 0, "the lab user's shell runs");
    // Closing the tab closes the SSH channel: the user's shell goes away.
    ws.close(None).await?;
    drop(ws);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shells() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the shell outlived the closed terminal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A ticket works once, only for its own session, only for the lab's team.
    let (_, first) = hello(&fx, &red_token, &ticket).await?;
    assert!(first.contains("unknown or already used"), "{first}");
    let (status, staff_ticket) = fx.admin.post(&ticket_path, json!({})).await?;
    assert_eq!(status, 201, "staff may open any lab's terminal");
    let (_, first) = hello(
        &fx,
        &red_token,
        staff_ticket["ticket"].as_str().expect("ticket"),
    )
    .await?;
    assert!(first.contains("another session"), "{first}");
    let blue = fx.participant(fx.other_team_id).await?;
    let (status, _) = blue.post(&ticket_path, json!({})).await?;
    assert_eq!(
        status, 404,
        "another team's terminal does not exist for Blue"
    );
    let (_, first) = hello(&fx, &red_token, "not-a-ticket").await?;
    assert!(first.contains("unknown or already used"), "{first}");

    // A machine answering with another host key never gets the password.
    let other = DataDir::new("other-key");
    Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(other.0.join("k"))
        .status()?;
    let wrong = std::fs::read_to_string(other.0.join("k.pub"))?;
    let right_key: String = fx.db().query_row(
        "SELECT ssh_host_key FROM allocations WHERE id = ?1",
        [id],
        |r| r.get(0),
    )?;
    fx.db().execute(
        "UPDATE allocations SET ssh_host_key = ?2 WHERE id = ?1",
        rusqlite::params![id, wrong.trim()],
    )?;
    let (_, ticket) = red.post(&ticket_path, json!({})).await?;
    let (_, first) = hello(&fx, &red_token, ticket["ticket"].as_str().expect("ticket")).await?;
    assert!(first.contains("host key does not match"), "{first}");
    fx.db().execute(
        "UPDATE allocations SET ssh_host_key = ?2 WHERE id = ?1",
        rusqlite::params![id, right_key],
    )?;

    // An open terminal ends with the session: staff sign Red out, and its socket says so.
    let (_, me) = red.get("/api/v1/me").await?;
    let red_id = me["participant"]["id"].as_i64().context("participant id")?;
    let (_, ticket) = red.post(&ticket_path, json!({})).await?;
    let (mut ws, first) = hello(
        &fx,
        &red_token,
        ticket["ticket"].as_str().context("ticket")?,
    )
    .await?;
    assert_eq!(first, r#"{"type":"ready"}"#);
    let (status, signed_out) = fx
        .admin
        .post(
            &format!("/api/v1/participants/{red_id}/sign-out"),
            json!({}),
        )
        .await?;
    assert_eq!(status, 200, "{signed_out}");
    let said = read_until(&mut ws, "session ended").await?;
    assert!(said.contains("\"type\":\"error\""), "{said}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shells() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the shell outlived the ended session"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The event ends: Red's open terminal (signed in again) closes, and no new one opens.
    let (_, issued) = fx
        .admin
        .post(
            &format!("/api/v1/participants/{red_id}/join-code"),
            json!({}),
        )
        .await?;
    let (_, event) = fx
        .admin
        .get(&format!("/api/v1/events/{}", fx.event_id))
        .await?;
    let mut teammate = Api {
        client: fx.admin.client.clone(),
        base: fx.url.clone(),
        token: None,
    };
    let (status, joined) = teammate
        .post(
            "/api/v1/join",
            json!({"event_code": event["code"], "join_code": issued["join_code"], "bearer": true}),
        )
        .await?;
    assert_eq!(status, 200, "{joined}");
    teammate.token = joined["token"].as_str().map(str::to_owned);
    let (_, ticket) = teammate.post(&ticket_path, json!({})).await?;
    let (mut ws, first) = hello(
        &fx,
        teammate.token.as_deref().context("token")?,
        ticket["ticket"].as_str().context("ticket")?,
    )
    .await?;
    assert_eq!(first, r#"{"type":"ready"}"#);
    for to in ["live", "ended"] {
        let (status, moved) = fx
            .admin
            .post(
                &format!("/api/v1/events/{}/transition", fx.event_id),
                json!({"to": to}),
            )
            .await?;
        assert_eq!(status, 200, "{moved}");
    }
    let said = read_until(&mut ws, "view-only").await?;
    assert!(said.contains("ended"), "{said}");
    let (status, refused) = teammate.post(&ticket_path, json!({})).await?;
    assert_eq!(status, 409, "{refused}");

    drop(host);
    Ok(())
}

#[tokio::test]
async fn the_browser_terminal_runs_a_command_in_chromium() -> anyhow::Result<()> {
    let fx = fixture("browser-terminal", "127.0.0.1:0").await?;
    let state = DataDir::new("browser-terminal-host");
    fx.enrol("host-b", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let id = fx.allocate(fx.team_id).await?;
    fx.wait_state(id, "active").await?;
    let user = format!("{}a{id}", fx.users.prefix);
    let mut command = fx
        .chromium_driver("e2e/drive-terminal.mjs", "Browser")
        .await?;
    command.env("LABRACK_EXPECT", format!("42-{user}"));
    let output = tokio::time::timeout(Duration::from_secs(120), command.output()).await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chromium run failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("resized"), "{stdout}");
    // The tab is closed: its shell must go away.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Command::new("pgrep")
        .args(["-u", &user])
        .output()?
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the shell outlived the closed tab"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened: i64 = fx.db().query_row(
        "SELECT count(*) FROM audit_log WHERE action = 'terminal.opened' AND target = ?1",
        [format!("allocation:{id}")],
        |r| r.get(0),
    )?;
    assert_eq!(opened, 1, "every terminal is audited");
    drop(host);
    Ok(())
}

/// A JPEG's width and RGB pixels.
fn decode_jpeg(jpeg: &[u8]) -> anyhow::Result<(usize, Vec<u8>)> {
    let mut decoder = jpeg_decoder::Decoder::new(jpeg);
    let rgb = decoder.decode()?;
    let info = decoder.info().context("JPEG info")?;
    anyhow::ensure!(
        info.pixel_format == jpeg_decoder::PixelFormat::RGB24,
        "{:?}",
        info.pixel_format
    );
    Ok((usize::from(info.width), rgb))
}

/// The pixel 5 % in from the right edge, half way down (the desktop's background there).
fn pixel_at_right_middle(width: usize, rgb: &[u8]) -> [u8; 3] {
    let height = rgb.len() / 3 / width.max(1);
    let at = ((height / 2) * width + width * 95 / 100) * 3;
    [rgb[at], rgb[at + 1], rgb[at + 2]]
}

fn close(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(y) < 24)
}

/// Polls a desktop's thumbnail until its background shows `colour` (15 s at most).
async fn wait_for_thumbnail(api: &Api, path: &str, colour: [u8; 3]) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _, jpeg) = api.get_bytes(path).await?;
        anyhow::ensure!(
            status == 200,
            "{status}: {}",
            String::from_utf8_lossy(&jpeg)
        );
        let (width, rgb) = decode_jpeg(&jpeg)?;
        let got = pixel_at_right_middle(width, &rgb);
        if close(got, colour) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the thumbnail never showed {colour:?} (last {got:?})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn probe_desktop(fx: &Fixture, id: i64, expect_rgb: &str) -> anyhow::Result<(bool, String)> {
    let output = Command::new(labrack_e2e::labrack_bin())
        .args([
            "admin",
            "probe-desktop",
            &id.to_string(),
            "--watch-secs",
            "30",
            "--expect-rgb",
            expect_rgb,
            "--data-dir",
        ])
        .arg(&fx.data.0)
        .output()?;
    Ok((
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    ))
}

#[tokio::test]
async fn the_lab_desktop_is_live_over_rdp_and_a_reset_starts_it_afresh() -> anyhow::Result<()> {
    let fx = fixture("rdp", "127.0.0.1:0").await?;
    // The template's desktop paints its background a known colour, so the probe can tell
    // the lab user's own live session from a login screen or a black frame.
    let skeleton = fx.skeleton("rdp");
    std::fs::write(
        skeleton.join(".xsession"),
        "xsetroot -solid '#1e90ff'\nexec xterm -geometry 40x10+20+20\n",
    )?;
    let templates = format!(
        "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n",
        skeleton.display()
    );
    let (status, body) = fx.admin.put_toml("/api/v1/templates", &templates).await?;
    assert_eq!(status, 200, "{body}");
    let state = DataDir::new("rdp-host");
    fx.enrol("host-r", &state.0).await?;
    // The lab's desktop is its box's own xrdp, reached through the lab's RDP port.
    let host = fx.start_host(&state.0, &[])?;
    let id = fx.allocate(fx.team_id).await?;
    fx.wait_state(id, "active").await?;

    let (ok, text) = tokio::task::spawn_blocking({
        let data = fx.data.0.clone();
        move || {
            let output = Command::new(labrack_e2e::labrack_bin())
                .args([
                    "admin",
                    "probe-desktop",
                    &id.to_string(),
                    "--watch-secs",
                    "30",
                    "--expect-rgb",
                    "1e90ff",
                    "--data-dir",
                ])
                .arg(&data)
                .output()?;
            anyhow::Ok((
                output.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            ))
        }
    })
    .await??;
    assert!(
        ok,
        "the lab desktop shows the session's colour over RDP: {text}"
    );
    let user = format!("{}a{id}", fx.users.prefix);
    // The streaming pipeline (one encode per desktop) turns the live desktop into H.264,
    // starting with a keyframe.
    let output = Command::new(labrack_e2e::labrack_bin())
        .args([
            "admin",
            "probe-desktop",
            &id.to_string(),
            "--stream-secs",
            "2",
            "--data-dir",
        ])
        .arg(&fx.data.0)
        .output()?;
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    assert!(
        output.status.success(),
        "{report} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(report["stream"]["first_is_keyframe"], true, "{report}");
    assert!(
        report["stream"]["frames"].as_u64().is_some_and(|n| n >= 1),
        "{report}"
    );
    assert!(
        Command::new("pgrep")
            .args(["-u", &user, "Xorg"])
            .output()?
            .status
            .success(),
        "the lab user's X session runs: {text}"
    );

    // A reset ends that session and rotates the password: the old session is gone and a
    // fresh login with the new credentials draws the desktop again.
    let (status, _) = fx
        .admin
        .post(&format!("/api/v1/allocations/{id}/reset"), json!({}))
        .await?;
    assert_eq!(status, 200);
    fx.wait_state(id, "active").await?;
    assert!(
        !Command::new("pgrep")
            .args(["-u", &user])
            .output()?
            .status
            .success(),
        "the reset ended the session"
    );
    let (ok, text) = probe_desktop(&fx, id, "1e90ff")?;
    assert!(ok, "after the reset the desktop comes back: {text}");

    // Staff see the desktop as a thumbnail (the console's wall); it follows the desktop.
    let thumbnail = format!("/api/v1/allocations/{id}/thumbnail");
    let (status, kind, jpeg) = fx.admin.get_bytes(&thumbnail).await?;
    assert_eq!(
        (status, kind.as_str()),
        (200, "image/jpeg"),
        "{}",
        String::from_utf8_lossy(&jpeg)
    );
    let (width, _) = decode_jpeg(&jpeg)?;
    assert!(width <= 480, "a thumbnail fits 480×270: {width}");
    wait_for_thumbnail(&fx.admin, &thumbnail, [0x1e, 0x90, 0xff]).await?;
    let xorg = String::from_utf8_lossy(
        &Command::new("pgrep")
            .args(["-a", "-u", &user, "Xorg"])
            .output()?
            .stdout,
    )
    .into_owned();
    let display = xorg
        .split_whitespace()
        .find(|w| w.starts_with(':'))
        .map(str::to_owned)
        .context("the lab user's X display")?;
    let xorg_pid = xorg
        .split_whitespace()
        .next()
        .context("the X server's pid")?
        .to_owned();
    // The X server's sockets are the box's own (its /tmp, its network namespace) and its
    // cookie names the box's host name: enter it.
    let recolour = Command::new("nsenter")
        .args([
            "-t", &xorg_pid, "-m", "-n", "-u", "--", "xsetroot", "-display", &display, "-solid",
            "#00c800",
        ])
        .env("XAUTHORITY", format!("/home/{user}/.Xauthority"))
        .status()?;
    assert!(recolour.success());
    wait_for_thumbnail(&fx.admin, &thumbnail, [0, 0xc8, 0]).await?;
    // Only staff and judges may look; one audited watch however often the wall asks.
    let red = fx.participant(fx.team_id).await?;
    let (status, kind, body) = red.get_bytes(&thumbnail).await?;
    assert_eq!(
        (status, kind.as_str()),
        (403, "application/problem+json"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let anonymous = Api {
        client: fx.admin.client.clone(),
        base: fx.admin.base.clone(),
        token: None,
    };
    assert_eq!(anonymous.get_bytes(&thumbnail).await?.0, 401);
    assert_eq!(
        fx.admin
            .get_bytes("/api/v1/allocations/999999/thumbnail")
            .await?
            .0,
        404
    );
    let (status, _, body) = fx
        .admin
        .get_bytes("/api/v1/allocations/nope/thumbnail")
        .await?;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let watched: i64 = fx.db().query_row(
        "SELECT count(*) FROM audit_log WHERE action = 'desktop.thumbnail_watched' AND target = ?1",
        [format!("allocation:{id}")],
        |r| r.get(0),
    )?;
    assert_eq!(watched, 1, "the first look is audited, not every poll");

    // A certificate that does not match the host's report is refused.
    fx.db().execute(
        "UPDATE allocations SET rdp_cert_sha256 = ?2 WHERE id = ?1",
        rusqlite::params![id, "00".repeat(32)],
    )?;
    let (ok, text) = probe_desktop(&fx, id, "1e90ff")?;
    assert!(!ok && text.contains("certificate does not match"), "{text}");
    drop(host);
    Ok(())
}

#[tokio::test]
async fn the_desktop_streams_to_chromium_and_takes_input() -> anyhow::Result<()> {
    // A fixed port: the appliance restarts mid-test where the page and the host know it.
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut fx = fixture("desktop", &listen).await?;
    let skeleton = fx.skeleton("desktop");
    std::fs::write(
        skeleton.join(".xsession"),
        "xsetroot -solid '#1e90ff'\nexec xterm -geometry 40x10+20+20\n",
    )?;
    // Typed into the remote xterm by the browser test: paste the X clipboard into a file,
    // and copy text on the desktop (the helpers keep what is typed free of shifted keys).
    // The browser's text reaches the X clipboard a moment after it is sent (over RDP, then
    // xrdp's chansrv), so the script waits up to 10 s for it, as a user would before pasting.
    std::fs::write(
        skeleton.join("cbout"),
        "for i in $(seq 50); do t=$(xclip -o -selection clipboard 2>/dev/null) && [ -n \"$t\" ] && break; sleep 0.2; done\nprintf '%s' \"$t\" > \"$HOME/from-browser.txt\"\n",
    )?;
    std::fs::write(
        skeleton.join("cbin"),
        "printf '%s' 'copied on the desktop ✓' | xclip -selection clipboard\n",
    )?;
    std::fs::write(
        skeleton.join("typed"),
        "stty sane\necho ready > \"$HOME/typed.ready\"\nIFS= read -r line\nprintf '%s\\n' \"$line\" > \"$HOME/typed.txt\"\n",
    )?;
    let templates = format!(
        "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n",
        skeleton.display()
    );
    let (status, body) = fx.admin.put_toml("/api/v1/templates", &templates).await?;
    assert_eq!(status, 200, "{body}");
    let state = DataDir::new("desktop-host");
    fx.enrol("host-v", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let id = fx.allocate(fx.team_id).await?;
    fx.wait_state(id, "active").await?;
    let mut command = fx
        .chromium_driver("e2e/drive-desktop.mjs", "Viewer")
        .await?;
    command
        .env("LABRACK_ALLOCATION", id.to_string())
        .env(
            "LABRACK_LAB_HOME",
            format!("/home/{}a{id}", fx.users.prefix),
        )
        .env("LABRACK_STAFF_PASSWORD", "a-strong-admin-password")
        .env("LABRACK_RESTART_SIGNAL", fx.data.0.join("restart-rdp"))
        .env(
            "LABRACK_APPLIANCE_RESTART_SIGNAL",
            fx.data.0.join("restart-appliance"),
        )
        .env("LABRACK_RESET_SIGNAL", fx.data.0.join("reset-lab"));
    // Restart the lab's RDP server (its box's xrdp and session manager; the box's init
    // starts them again) when the browser asks for it, while it keeps watching.
    let signal = fx.data.0.join("restart-rdp");
    let box_user = format!("{}a{id}", fx.users.prefix);
    let restarter = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(170);
        while !signal.exists() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the browser never asked for the restart"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        restart_box_rdp(&box_user)?;
        std::fs::write(signal.with_extension("done"), "")?;
        anyhow::Ok(())
    });
    // Restart the appliance when the browser asks, on the same port and data dir.
    let server = fx.server.take().expect("server");
    let (data_dir, appliance_signal) = (fx.data.0.clone(), fx.data.0.join("restart-appliance"));
    let web_dist = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../web/dist")
        .display()
        .to_string();
    let appliance_restarter = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(190);
        while !appliance_signal.exists() {
            if std::time::Instant::now() > deadline {
                return anyhow::Ok(server);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = server.terminate()?;
        anyhow::ensure!(status.success(), "labrack exited with {status}");
        Server::start_with(
            &data_dir,
            &listen,
            &[
                "--host-heartbeat-secs",
                "1",
                "--web-dir",
                &web_dist,
                "--webrtc-bind",
                "127.0.0.1:0",
            ],
        )
    });
    // Reset the lab when the browser asks (through the API, like staff would).
    let (admin, reset_signal) = (fx.admin.clone(), fx.data.0.join("reset-lab"));
    let resetter = tokio::spawn(async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(190);
        while !reset_signal.exists() {
            if std::time::Instant::now() > deadline {
                return anyhow::Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, body) = admin
            .post(&format!("/api/v1/allocations/{id}/reset"), json!({}))
            .await?;
        anyhow::ensure!(status == 200, "reset: {status} {body}");
        Ok(true)
    });
    let output = tokio::time::timeout(Duration::from_secs(200), command.output()).await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chromium run failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(resetter.await??, "the browser asked for the reset");
    restarter.await??;
    fx.server = Some(appliance_restarter.await??);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or("null"))?;
    eprintln!("desktop in chromium: {report}");
    // The desktop took the page's size at connect, and again when the window shrank.
    assert_ne!(
        report["video"],
        json!([1280, 720]),
        "the desktop follows the window, not its 1280×720 start: {report}"
    );
    assert!(
        report["resized"][0].as_u64() < report["video"][0].as_u64(),
        "{report}"
    );
    assert_eq!(
        report["clipboard_pasted_on_desktop"], "labrack → desktop ✓ 42",
        "{report}"
    );
    assert_eq!(
        report["clipboard_from_desktop"], "copied on the desktop ✓",
        "{report}"
    );
    assert_eq!(report["unicode_typed"], "~ok\n", "{report}");
    // Chromium's receiver reports reached the rate controller (clean loopback: no loss, so
    // this viewer's target has grown past the 4 Mbit/s start). The shared encoder keeps its
    // rate meanwhile: a mostly idle desktop uses far less, and a rebuild would buy nothing.
    let feedback = &report["feedback"];
    assert!(
        feedback["target_bps"]
            .as_u64()
            .is_some_and(|bps| bps > 4_000_000),
        "{report}"
    );
    assert_eq!(feedback["encoder_bps"], 4_000_000, "{report}");
    assert_eq!(
        report["vp8_codec"], "VP8",
        "a browser without H.264 is sent VP8: {report}"
    );
    assert_eq!(report["recovered_after_rdp_restart"], true, "{report}");
    assert_eq!(
        report["reconnected_after_appliance_restart"], true,
        "{report}"
    );
    assert_eq!(report["reconnected_after_reset"], true, "{report}");

    // Staff watch view-only: a ticket says so, and the viewer was audited.
    let (status, watch) = fx
        .admin
        .post(
            &format!("/api/v1/allocations/{id}/desktop-ticket"),
            json!({}),
        )
        .await?;
    assert_eq!(
        (status, watch["mode"].as_str()),
        (201, Some("view")),
        "{watch}"
    );
    // Tickets are single use, bound to their session and to what they open.
    let red = fx.participant(fx.team_id).await?;
    let red_token = red.token.clone().expect("token");
    let desktop_hello = |ticket: &str| json!({"ticket": ticket, "offer": "v=0"}).to_string();
    let first_answer = |mut ws: labrack_e2e::AppSocket, hello: String| async move {
        ws.send(Message::Text(hello.into())).await?;
        match tokio::time::timeout(LONG, ws.next()).await? {
            Some(Ok(Message::Text(text))) => anyhow::Ok(text.to_string()),
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    };
    let ws = websocket(&fx.data.0, &fx.url, "/api/v1/desktop", &red_token).await?;
    let answer = first_answer(ws, desktop_hello(watch["ticket"].as_str().expect("ticket"))).await?;
    assert!(answer.contains("another session"), "{answer}");
    let (_, own) = red
        .post(
            &format!("/api/v1/allocations/{id}/desktop-ticket"),
            json!({}),
        )
        .await?;
    assert_eq!(own["mode"], "interactive");
    let ws = websocket(&fx.data.0, &fx.url, "/api/v1/desktop", &red_token).await?;
    let answer = first_answer(ws, desktop_hello(own["ticket"].as_str().expect("ticket"))).await?;
    assert!(
        answer.contains("WebRTC") || answer.contains("offer"),
        "a bad offer is refused clearly: {answer}"
    );
    let ws = websocket(&fx.data.0, &fx.url, "/api/v1/desktop", &red_token).await?;
    let answer = first_answer(ws, desktop_hello(own["ticket"].as_str().expect("ticket"))).await?;
    assert!(
        answer.contains("unknown or already used desktop ticket"),
        "{answer}"
    );
    let (_, terminal) = red
        .post(
            &format!("/api/v1/allocations/{id}/terminal-ticket"),
            json!({}),
        )
        .await?;
    let ws = websocket(&fx.data.0, &fx.url, "/api/v1/desktop", &red_token).await?;
    let answer = first_answer(
        ws,
        desktop_hello(terminal["ticket"].as_str().expect("ticket")),
    )
    .await?;
    assert!(answer.contains("does not open a desktop"), "{answer}");
    let blue = fx.participant(fx.other_team_id).await?;
    let (status, _) = blue
        .post(
            &format!("/api/v1/allocations/{id}/desktop-ticket"),
            json!({}),
        )
        .await?;
    assert_eq!(
        status, 404,
        "another team's desktop does not exist for Blue"
    );
    let joined: i64 = fx.db().query_row(
        "SELECT count(*) FROM audit_log WHERE action = 'desktop.viewer_joined' AND target = ?1 AND detail LIKE '%interactive%'",
        [format!("allocation:{id}")],
        |r| r.get(0),
    )?;
    assert_eq!(
        joined, 3,
        "every viewer connection is audited: the first, after the appliance restart, after the reset"
    );
    // Both staff viewers (H.264 and VP8) were audited with their codec.
    let codecs: Vec<String> = fx
        .db()
        .prepare("SELECT json_extract(detail, '$.codec') FROM audit_log WHERE action = 'desktop.viewer_joined' AND target = ?1 AND detail LIKE '%\"view\"%'")?
        .query_map([format!("allocation:{id}")], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    assert_eq!(codecs, ["H264", "VP8"], "staff viewers and their codecs");
    // The staff viewer's keystrokes were dropped and counted (written when its socket closed;
    // the VP8 viewer, which typed nothing, may leave first).
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let dropped: Option<i64> = fx.db().query_row(
            "SELECT max(json_extract(detail, '$.inputs_dropped')) FROM audit_log WHERE action = 'desktop.viewer_left' AND target = ?1 AND detail LIKE '%\"view\"%'",
            [format!("allocation:{id}")],
            |r| r.get(0),
        )?;
        if dropped.is_some_and(|n| n > 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "view-only input is dropped and counted (audited when the viewer leaves): {dropped:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(host);
    Ok(())
}

/// Kills a lab box's xrdp and session manager (found in the box's cgroup) and waits until
/// its init has started both again.
fn restart_box_rdp(user: &str) -> anyhow::Result<()> {
    let daemons = || -> Vec<String> {
        std::fs::read_to_string(format!(
            "/sys/fs/cgroup/pids/labrack/{user}/box/cgroup.procs"
        ))
        .unwrap_or_default()
        .lines()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "xrdp" || c.trim() == "xrdp-sesman")
        })
        .map(str::to_owned)
        .collect()
    };
    // xrdp forks a process per connection: the listener, its sessions' and the session manager.
    let before = daemons();
    anyhow::ensure!(
        before.len() >= 2,
        "expected the box's xrdp and session manager, found {before:?}"
    );
    for pid in &before {
        Command::new("kill").args(["-KILL", pid]).status()?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = daemons();
        if now.len() >= 2 && now.iter().all(|pid| !before.contains(pid)) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the box's init did not start xrdp again: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn checks_run_sandboxed_on_the_real_host_and_score_the_team() -> anyhow::Result<()> {
    let fx = fixture("checks", "127.0.0.1:0").await?;
    let port = fx
        .url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let checks = format!(
        r#"
[[template.check]]
name = "readme"
script = "test -f README.txt || {{ echo 'FAIL: README.txt is missing'; exit 1; }}; echo found it"
timeout_secs = 10
weight = 10
dimension = "functionality"

[[template.check]]
name = "as the checker"
script = "[ \"$(id -u)\" != 0 ] && [ \"$(id -un)\" = \"${{LABRACK_LAB_USER}}c\" ] && [ \"$USER\" = \"$(id -un)\" ] && [ \"$PWD\" = \"$HOME\" ] || {{ echo \"FAIL: ran as $(id -un) in $PWD\"; exit 1; }}"
timeout_secs = 10
weight = 5
dimension = "security"

[[template.check]]
name = "no network"
script = "for p in {port} 8080; do if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo \"FAIL: reached port $p\"; exit 1; fi; done"
timeout_secs = 10
weight = 3
dimension = "security"

[[template.check]]
name = "network allowed"
script = "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q 'the lab answers' <&3 || {{ echo 'FAIL: the lab server on localhost:8080 did not answer'; exit 1; }}"
timeout_secs = 10
weight = 2
dimension = "performance"
network = true

[[template.check]]
name = "memory limit"
script = "python3 -c 'bytearray(8 << 20)' || {{ echo 'FAIL: python3 cannot run'; exit 1; }}; python3 -c 'bytearray(512 << 20)' 2>/dev/null && exit 0; echo 'FAIL: could not allocate 512 MiB'; exit 1"
timeout_secs = 20
weight = 7
dimension = "performance"
memory_mib = 128

[[template.check]]
name = "server up"
script = "echo checking; echo 'FAIL: port 8080 is closed' >&2; exit 1"
timeout_secs = 10
weight = 20
dimension = "functionality"

[[template.check]]
name = "slow"
script = "sleep 60"
timeout_secs = 2
weight = 4
dimension = "quality"
hidden = true
"#
    );
    put_checks(&fx, &checks).await?;
    let state = DataDir::new("checks-host");
    fx.enrol("host-c", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let lab = fx.allocate(fx.team_id).await?;
    fx.wait_state(lab, "active").await?;
    let event = fx.event_id;
    // The team runs a server in its lab, on its own localhost:8080.
    let user = format!("{}a{lab}", fx.users.prefix);
    let _server = serve_in_lab(&user, 8080, "the lab answers")?;

    // Bad requests are refused and queue nothing.
    for (body, want) in [
        (json!({"check": "no such check"}), 422),
        (json!({"team_id": 999_999}), 404),
        (json!({"team_id": "red"}), 422),
        (json!({"colour": "red"}), 422),
    ] {
        let (status, problem) = fx
            .admin
            .post(
                &format!("/api/v1/events/{event}/check-batches"),
                body.clone(),
            )
            .await?;
        assert_eq!(status, want, "{body}: {problem}");
    }
    let red = fx.participant(fx.team_id).await?;
    let (status, _) = red
        .post(&format!("/api/v1/events/{event}/check-batches"), json!({}))
        .await?;
    assert_eq!(status, 403, "participants do not queue batches");
    let batches: i64 = fx
        .db()
        .query_row("SELECT count(*) FROM check_batches", [], |r| r.get(0))?;
    assert_eq!(batches, 0, "refused requests changed nothing");

    let (status, queued) = fx
        .admin
        .post(
            &format!("/api/v1/events/{event}/check-batches"),
            json!({"reason": "first pass"}),
        )
        .await?;
    assert_eq!(status, 201, "{queued}");
    assert_eq!(queued["queued"], 7);
    assert_eq!(
        queued["skipped"][0]["team"], "Blue",
        "a team without a lab is skipped and named: {queued}"
    );
    let started = std::time::Instant::now();
    let batch = wait_batch(&fx, queued["batch_id"].as_i64().expect("batch id")).await?;
    assert_eq!(batch["counts"]["passed"], 4, "{batch}");
    assert_eq!(batch["counts"]["failed"], 3, "{batch}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "checks ran side by side: {:?}",
        started.elapsed()
    );

    let (status, runs) = fx
        .admin
        .get(&format!(
            "/api/v1/events/{event}/check-runs?team_id={}",
            fx.team_id
        ))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(run_by_name(&runs, "readme")["state"], "passed");
    assert!(
        run_by_name(&runs, "readme")["output"]
            .as_str()
            .unwrap_or_default()
            .contains("found it")
    );
    assert_eq!(
        run_by_name(&runs, "as the checker")["state"],
        "passed",
        "{}",
        run_by_name(&runs, "as the checker")
    );
    assert_eq!(
        run_by_name(&runs, "no network")["state"],
        "passed",
        "{}",
        run_by_name(&runs, "no network")
    );
    assert_eq!(
        run_by_name(&runs, "network allowed")["state"],
        "passed",
        "{}",
        run_by_name(&runs, "network allowed")
    );
    let memory = run_by_name(&runs, "memory limit");
    assert_eq!(
        (memory["state"].as_str(), memory["message"].as_str()),
        (Some("failed"), Some("could not allocate 512 MiB")),
        "{memory}"
    );
    let server = run_by_name(&runs, "server up");
    assert_eq!(
        server["message"], "port 8080 is closed",
        "the FAIL line (here on stderr) is the message: {server}"
    );
    assert!(
        server["output"]
            .as_str()
            .unwrap_or_default()
            .contains("--- stderr ---")
    );
    let slow = run_by_name(&runs, "slow");
    assert_eq!(
        (slow["state"].as_str(), slow["timed_out"].as_bool()),
        (Some("failed"), Some(true)),
        "{slow}"
    );
    assert_eq!(slow["message"], "the check did not finish within 2 s");
    assert!(
        slow["duration_ms"]
            .as_i64()
            .is_some_and(|ms| (2_000..10_000).contains(&ms)),
        "{slow}"
    );
    let sleeping = Command::new("pgrep")
        .args(["-u", &format!("{user}c"), "-x", "sleep"])
        .output()?;
    assert!(
        !sleeping.status.success(),
        "the timed-out check's processes were killed"
    );
    let tasks: i64 = fx.db().query_row(
        "SELECT count(*) FROM host_tasks WHERE check_run_id IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(tasks, 7, "one host task per run");

    // The leaderboard: Red has 10 + 5 + 3 + 2 = 20 points; Blue none.
    let (status, board) = fx
        .admin
        .get(&format!("/api/v1/events/{event}/leaderboard"))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(board["rows"][0]["team"], "Red", "{board}");
    assert_eq!(board["rows"][0]["total"], 20.0);
    assert_eq!(board["rows"][0]["dimensions"]["security"], 8.0);
    assert_eq!(
        (
            board["rows"][0]["checks_passed"].as_u64(),
            board["rows"][0]["checks_scored"].as_u64()
        ),
        (Some(4), Some(7))
    );
    assert_eq!(
        (
            board["rows"][1]["team"].as_str(),
            board["rows"][1]["total"].as_f64()
        ),
        (Some("Blue"), Some(0.0))
    );
    let (status, _) = red
        .get(&format!("/api/v1/events/{event}/leaderboard"))
        .await?;
    assert_eq!(status, 403, "the live board is for staff and judges");

    // The team sees its visible checks and messages, never the hidden one or any output.
    let (status, mine) = red.get("/api/v1/me/checks").await?;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(mine["hidden_checks"], 1);
    assert_eq!(mine["checks"].as_array().map(Vec::len), Some(6));
    assert_eq!(mine["visible_points"], 20);
    let text = mine.to_string();
    assert!(
        !text.contains("slow") && !text.contains("output") && !text.contains("found it"),
        "{text}"
    );
    assert!(text.contains("port 8080 is closed"));
    // Teams run their own checks while the event is live, and not twice at once.
    let (status, problem) = red.post("/api/v1/me/checks/run", json!({})).await?;
    assert_eq!(status, 409, "the event is still a draft: {problem}");
    let (status, _) = fx
        .admin
        .post(
            &format!("/api/v1/events/{event}/transition"),
            json!({"to": "live"}),
        )
        .await?;
    assert_eq!(status, 200);
    let (status, again) = red.post("/api/v1/me/checks/run", json!({})).await?;
    assert_eq!(status, 201, "{again}");
    let (status, _) = red.post("/api/v1/me/checks/run", json!({})).await?;
    assert!(
        status == 409 || status == 429,
        "a second request right away is refused: {status}"
    );
    wait_batch(&fx, again["batch_id"].as_i64().expect("batch id")).await?;
    let (status, problem) = red.post("/api/v1/me/checks/run", json!({})).await?;
    assert_eq!(status, 429, "at most every 30 s: {problem}");
    // A submission runs the team's checks through the queue.
    let (status, submitted) = red
        .post(
            "/api/v1/me/submissions",
            json!({"version": "v1.0", "note": "final"}),
        )
        .await?;
    assert_eq!(status, 201, "{submitted}");
    let deadline = std::time::Instant::now() + LONG;
    let scored = loop {
        let batch: Option<i64> = fx
            .db()
            .query_row(
                "SELECT id FROM check_batches WHERE reason = 'submission v1.0'",
                [],
                |r| r.get(0),
            )
            .ok();
        if let Some(batch) = batch {
            break wait_batch(&fx, batch).await?;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the submission was never scored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(scored["counts"]["passed"], 4, "{scored}");

    // A check that cannot run (its checker is gone) backs off to a dead letter; once the
    // lab is back, staff requeue it and it runs.
    let checker = format!("{user}c");
    assert!(Command::new("userdel").arg(&checker).status()?.success());
    let (status, rerun) = fx
        .admin
        .post(
            &format!("/api/v1/events/{event}/check-batches"),
            json!({"check": "as the checker", "team_id": fx.team_id}),
        )
        .await?;
    assert_eq!(status, 201, "{rerun}");
    let dead = wait_batch(&fx, rerun["batch_id"].as_i64().expect("batch id")).await?;
    assert_eq!(dead["counts"]["error"], 1, "{dead}");
    let (_, runs) = fx
        .admin
        .get(&format!(
            "/api/v1/events/{event}/check-runs?batch_id={}",
            rerun["batch_id"]
        ))
        .await?;
    let errored = &runs[0];
    assert!(
        errored["message"]
            .as_str()
            .unwrap_or_default()
            .contains("is not on this host"),
        "{errored}"
    );
    let job_id = errored["job_id"].as_i64().expect("job id");
    let (_, job) = fx.admin.get(&format!("/api/v1/jobs/{job_id}")).await?;
    assert_eq!(
        (job["state"].as_str(), job["attempts"].as_u64()),
        (Some("dead"), Some(2)),
        "two attempts (--job-attempts run_check=2): {job}"
    );
    assert!(
        Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                &user,
                &checker
            ])
            .status()?
            .success()
    );
    let (status, _) = fx
        .admin
        .post(&format!("/api/v1/jobs/{job_id}/requeue"), json!({}))
        .await?;
    assert_eq!(status, 200);
    let requeued = wait_batch(&fx, rerun["batch_id"].as_i64().expect("batch id")).await?;
    assert_eq!(requeued["counts"]["passed"], 1, "{requeued}");
    drop(host);
    Ok(())
}

#[tokio::test]
async fn checks_survive_the_appliance_killed_mid_queue_and_none_runs_twice() -> anyhow::Result<()> {
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let mut fx = fixture("checks-kill", &listen).await?;
    let checks: String = (1..=8)
        .map(|n| {
            format!(
                "[[template.check]]\nname = \"step {n}\"\nscript = \"echo $LABRACK_CHECK_RUN >> $HOME/runs.log; sleep 1\"\ntimeout_secs = 10\ndimension = \"quality\"\n"
            )
        })
        .collect();
    put_checks(&fx, &checks).await?;
    let state = DataDir::new("checks-kill-host");
    fx.enrol("host-q", &state.0).await?;
    let host = LabHost::start(
        &state.0,
        &fx.users,
        &fx.skeletons.0,
        &[],
        &["--check-concurrency", "2"],
    )?;
    let lab = fx.allocate(fx.team_id).await?;
    fx.wait_state(lab, "active").await?;
    // Checks cannot write to a team's home, only to what the team lets its group write.
    let log = format!("/home/{}a{lab}/runs.log", fx.users.prefix);
    let made = Command::new("runuser")
        .args([
            "-u",
            &format!("{}a{lab}", fx.users.prefix),
            "--",
            "sh",
            "-c",
            &format!("touch {log} && chmod 0660 {log}"),
        ])
        .status()?;
    assert!(made.success());
    let (status, queued) = fx
        .admin
        .post(
            &format!("/api/v1/events/{}/check-batches", fx.event_id),
            json!({}),
        )
        .await?;
    assert_eq!(status, 201, "{queued}");
    let batch = queued["batch_id"].as_i64().expect("batch id");
    // Kill -9 once some runs have results and others are in flight.
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let finished: i64 = fx.db().query_row(
            "SELECT count(*) FROM check_runs WHERE state = 'passed'",
            [],
            |r| r.get(0),
        )?;
        if finished >= 2 {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no check finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.server.take().expect("server").kill_hard()?;
    let in_flight: i64 = fx.db().query_row(
        "SELECT count(*) FROM check_runs WHERE state <> 'passed'",
        [],
        |r| r.get(0),
    )?;
    assert!(in_flight > 0, "the appliance died with work left");
    fx.server = Some(Server::start_with(
        &fx.data.0,
        &listen,
        &["--host-heartbeat-secs", "1"],
    )?);
    let done = wait_batch(&fx, batch).await?;
    assert_eq!(done["counts"]["passed"], 8, "no run lost: {done}");
    let log = std::fs::read_to_string(&log)?;
    let mut ran: Vec<i64> = log.lines().filter_map(|l| l.trim().parse().ok()).collect();
    ran.sort_unstable();
    let runs: Vec<i64> = fx
        .db()
        .prepare("SELECT id FROM check_runs WHERE batch_id = ?1 ORDER BY id")?
        .query_map([batch], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    assert_eq!(ran, runs, "every check ran exactly once on the host");
    // The dead appliance's jobs are taken again once their leases lapse; each finds its
    // run already has its result (reported to the new process) and completes.
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let states: Vec<(String, i64)> = fx
            .db()
            .prepare("SELECT state, attempts FROM jobs WHERE kind = 'run_check' ORDER BY id")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        if states.iter().all(|(state, _)| state == "succeeded") {
            assert_eq!(states.len(), 8);
            assert!(
                states.iter().any(|(_, attempts)| *attempts == 2),
                "some job was retried after its lease: {states:?}"
            );
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "jobs did not finish: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tasks: i64 = fx.db().query_row(
        "SELECT count(*) FROM host_tasks WHERE check_run_id IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(tasks, 8, "no check was issued twice");
    drop(host);
    Ok(())
}

#[tokio::test]
async fn the_team_page_and_the_projector_scoreboard_work_in_chromium() -> anyhow::Result<()> {
    let fx = fixture("browser-scoring", "127.0.0.1:0").await?;
    let checks = r#"
[[template.check]]
name = "readme"
script = "test -f README.txt"
timeout_secs = 10
weight = 10
dimension = "functionality"

[[template.check]]
name = "server up"
script = "echo 'FAIL: port 8080 is closed'; exit 1"
timeout_secs = 10
weight = 20
dimension = "functionality"
"#;
    put_checks(&fx, checks).await?;
    let state = DataDir::new("browser-scoring-host");
    fx.enrol("host-s", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let lab = fx.allocate(fx.team_id).await?;
    fx.wait_state(lab, "active").await?;
    let (status, _) = fx
        .admin
        .post(
            &format!("/api/v1/events/{}/transition", fx.event_id),
            json!({"to": "live"}),
        )
        .await?;
    assert_eq!(status, 200);
    let (status, hint) = fx
        .admin
        .post(
            &format!("/api/v1/events/{}/hints", fx.event_id),
            json!({"title": "Ports", "body": "Listen on 0.0.0.0:8080", "cost": 3}),
        )
        .await?;
    assert_eq!(status, 201, "{hint}");
    // A judge with a password of their own (new staff must change the one they were given).
    let (status, _) = fx
        .admin
        .post(
            "/api/v1/staff",
            json!({"username": "judy", "password": "first-password-1", "role": "judge"}),
        )
        .await?;
    assert_eq!(status, 201);
    let mut judge = Api {
        client: client_trusting(&fx.data.0)?,
        base: fx.url.clone(),
        token: None,
    };
    judge.login("judy", "first-password-1").await?;
    let (status, changed) = judge
        .post(
            "/api/v1/auth/password",
            json!({"current_password": "first-password-1", "new_password": "judging-password-2"}),
        )
        .await?;
    assert_eq!(status, 200, "{changed}");
    let (status, _) = fx
        .admin
        .post(
            &format!("/api/v1/events/{}/announcements", fx.event_id),
            json!({"text": "Doors close at 18:00"}),
        )
        .await?;
    assert_eq!(status, 201);
    let mut command = fx
        .chromium_driver("e2e/drive-scoring.mjs", "Scorer")
        .await?;
    command
        .env("LABRACK_EVENT_ID", fx.event_id.to_string())
        .env("LABRACK_TEAM", "Red")
        .env("LABRACK_JUDGE_USER", "judy")
        .env("LABRACK_JUDGE_PASSWORD", "judging-password-2");
    let output = tokio::time::timeout(Duration::from_secs(150), command.output()).await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chromium run failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("board Red 10 -> 7 -> 11"), "{stdout}");
    let (submissions, charged, answers): (i64, f64, i64) = fx.db().query_row(
        "SELECT (SELECT count(*) FROM submissions), (SELECT sum(points) FROM score_adjustments), (SELECT count(*) FROM agent_messages WHERE source = 'rules')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    assert_eq!((submissions, charged, answers), (1, -3.0, 1));
    drop(host);
    Ok(())
}

#[tokio::test]
async fn checks_run_over_ssh_on_a_host_without_an_agent() -> anyhow::Result<()> {
    let fx = fixture("agentless", "127.0.0.1:0").await?;
    let port = fx
        .url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let checks = format!(
        r#"
[[template.check]]
name = "readme"
script = "test -f README.txt || {{ echo 'FAIL: README.txt is missing'; exit 1; }}"
timeout_secs = 10
weight = 10
dimension = "functionality"

[[template.check]]
name = "as the checker"
script = "echo $LABRACK_CHECK_RUN >> runs.log; [ \"$(id -un)\" = \"$USER\" ] && [ \"$(id -un)\" != \"$LABRACK_LAB_USER\" ] && [ \"$(id -u)\" != 0 ]"
timeout_secs = 10
weight = 5
dimension = "security"

[[template.check]]
name = "no network"
script = "if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; then echo 'FAIL: reached the appliance'; exit 1; fi"
timeout_secs = 10
weight = 3
dimension = "security"

[[template.check]]
name = "slow"
script = "setsid sleep 300 & sleep 60"
timeout_secs = 2
weight = 1
dimension = "quality"
"#
    );
    put_checks(&fx, &checks).await?;
    // The team's own machine: its account, and a checker account (in the team's group, so it
    // reads the team's home) whose SSH logins can only run the check program (ForceCommand).
    let user = format!("{}ext", fx.users.prefix);
    let checker = format!("{}chk", fx.users.prefix);
    make_account(&user, "team-secret-1", &[])?;
    make_account(&checker, "checker-secret-1", &[])?;
    anyhow::ensure!(
        Command::new("usermod")
            .args(["-aG", &user, &checker])
            .status()?
            .success(),
        "usermod"
    );
    std::fs::set_permissions(
        format!("/home/{user}"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )?;
    std::fs::write(format!("/home/{user}/README.txt"), "hello\n")?;
    // What the team leaves for its checks: a log they may append to, and a planted "result"
    // and a .bashrc that claim success (neither is ever read).
    Command::new("runuser").args(["-u", &user, "--", "sh", "-c", "touch ~/runs.log && chmod 0660 ~/runs.log && mkdir -p ~/.labrack/checks/run-1 && echo 0 > ~/.labrack/checks/run-1/status && echo 'exit 0' > ~/.bashrc"]).status()?;
    let sshd = Sshd::start_with(
        &fx.users.prefix,
        &format!(
            "Match User {checker}\n  ForceCommand /bin/bash --noprofile --norc -s\n  PermitTTY no\n"
        ),
    )?;
    let key = std::fs::read_to_string(&sshd.host_key_pub)?;

    let (status, problem) = fx.admin.post("/api/v1/hosts/agentless", json!({"name": "ext", "address": "127.0.0.1", "ssh_port": sshd.port, "ssh_host_key": "not a key"})).await?;
    assert_eq!(status, 422, "{problem}");
    let (status, problem) =
        fx.admin.post("/api/v1/hosts/agentless", json!({"name": "ext", "address": "127.0.0.1", "ssh_port": sshd.port, "ssh_host_key": key.trim(), "checker": {"username": "Not A User", "password": "x"}})).await?;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("checker.username")),
        "{problem}"
    );
    // A host offering no checker account takes no lab whose template is scored by checks.
    let (status, bare) = fx.admin.post("/api/v1/hosts/agentless", json!({"name": "bare", "address": "127.0.0.1", "ssh_port": sshd.port, "ssh_host_key": key.trim()})).await?;
    assert_eq!(
        (status, bare["checker"].as_bool()),
        (201, Some(false)),
        "{bare}"
    );
    let (status, refused) = fx
        .admin
        .post(&format!("/api/v1/teams/{}/agentless-lab", fx.team_id), json!({"host_id": bare["id"], "template": "desk", "username": user, "password": "team-secret-1"}))
        .await?;
    assert_eq!(
        (status, refused["field"].as_str()),
        (422, Some("host_id")),
        "{refused}"
    );
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no checker account")),
        "{refused}"
    );
    let (status, host) = fx
        .admin
        .post("/api/v1/hosts/agentless", json!({"name": "ext", "address": "127.0.0.1", "ssh_port": sshd.port, "ssh_host_key": key.trim(), "checker": {"username": checker, "password": "checker-secret-1"}}))
        .await?;
    assert_eq!(
        (status, host["checker"].as_bool()),
        (201, Some(true)),
        "{host}"
    );
    let host_id = host["id"].as_i64().expect("host id");
    let (status, lab) = fx
        .admin
        .post(&format!("/api/v1/teams/{}/agentless-lab", fx.team_id), json!({"host_id": host_id, "template": "desk", "username": user, "password": "team-secret-1"}))
        .await?;
    assert_eq!(status, 201, "{lab}");
    assert_eq!(lab["state"], "active");
    assert!(
        !lab.to_string().contains("team-secret-1"),
        "the password never comes back"
    );
    let (status, _) = fx
        .admin
        .post(
            &format!("/api/v1/allocations/{}/reset", lab["id"]),
            json!({}),
        )
        .await?;
    assert_eq!(status, 409, "no agent: the appliance cannot reset it");

    let (status, queued) = fx
        .admin
        .post(
            &format!("/api/v1/events/{}/check-batches", fx.event_id),
            json!({"team_id": fx.team_id}),
        )
        .await?;
    assert_eq!(
        (status, queued["queued"].as_u64()),
        (201, Some(4)),
        "{queued}"
    );
    let done = wait_batch(&fx, queued["batch_id"].as_i64().expect("batch")).await?;
    assert_eq!(
        (
            done["counts"]["passed"].as_u64(),
            done["counts"]["failed"].as_u64()
        ),
        (Some(3), Some(1)),
        "{done}"
    );
    let (_, runs) = fx
        .admin
        .get(&format!(
            "/api/v1/events/{}/check-runs?team_id={}",
            fx.event_id, fx.team_id
        ))
        .await?;
    let slow = run_by_name(&runs, "slow");
    assert_eq!(
        (slow["timed_out"].as_bool(), slow["message"].as_str()),
        (Some(true), Some("the check did not finish within 2 s")),
        "{slow}"
    );
    assert_eq!(
        run_by_name(&runs, "as the checker")["state"],
        "passed",
        "{}",
        run_by_name(&runs, "as the checker")
    );
    let log = std::fs::read_to_string(format!("/home/{user}/runs.log"))?;
    assert_eq!(log.lines().count(), 1, "ran once: {log}");
    // What the slow check started in a new session died with its PID namespace.
    let left = Command::new("pgrep")
        .args(["-u", &checker, "-x", "sleep"])
        .output()?;
    assert!(
        !left.status.success(),
        "no process of the check outlives it: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    // Results live in the checker's home, under the run's nonce; the team's planted one was never read.
    let nonce: String = fx.db().query_row(
        "SELECT ssh_nonce FROM check_runs WHERE check_name = 'readme'",
        [],
        |r| r.get(0),
    )?;
    let run: i64 = fx.db().query_row(
        "SELECT id FROM check_runs WHERE check_name = 'readme'",
        [],
        |r| r.get(0),
    )?;
    assert!(
        Path::new(&format!(
            "/home/{checker}/.labrack/runs/run-{run}-{nonce}/status"
        ))
        .exists()
    );
    // Nothing is ever queued for a host without an agent to pull.
    let tasks: i64 = fx
        .db()
        .query_row("SELECT count(*) FROM host_tasks", [], |r| r.get(0))?;
    assert_eq!(tasks, 0, "no host tasks for a host without an agent");
    let (status, released) = fx
        .admin
        .post(
            &format!("/api/v1/allocations/{}/release", lab["id"]),
            json!({}),
        )
        .await?;
    assert_eq!(
        (status, released["state"].as_str()),
        (200, Some("released")),
        "{released}"
    );
    drop(sshd);
    Ok(())
}
