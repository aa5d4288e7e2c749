//! Cloud sync end to end: the real `labrack serve` relaying its outbox over real QUIC to
//! the real `labrack-cloud` in another process. After every disturbance — no cloud at all
//! while the event runs, the cloud killed with -9 mid-stream, the appliance killed with -9 —
//! the cloud holds exactly the appliance's rows: the same count and the same checksum.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use labrack_e2e::cloud::{Cloud, cloud_get, converged_within, enrol_token};
use labrack_e2e::{Api, DataDir, Faults, Server, UdpFaultProxy, client_trusting, free_port};
use serde_json::{Value, json};

/// Waits until the cloud holds exactly the appliance's rows.
async fn converged(
    appliance_data: &Path,
    cloud_data: &Path,
    http: &str,
    token: &str,
) -> anyhow::Result<Value> {
    converged_as(1, appliance_data, cloud_data, http, token).await
}

async fn converged_as(
    appliance_id: i64,
    appliance_data: &Path,
    cloud_data: &Path,
    http: &str,
    token: &str,
) -> anyhow::Result<Value> {
    converged_within(
        Duration::from_secs(120),
        appliance_id,
        appliance_data,
        cloud_data,
        http,
        token,
    )
    .await
}

async fn admin(server: &Server, data: &Path) -> anyhow::Result<Api> {
    let mut admin = Api {
        client: client_trusting(data)?,
        base: server.url.clone(),
        token: None,
    };
    admin
        .first_admin_login(
            server.admin_password.as_deref().context("otp")?,
            "a-strong-admin-password",
        )
        .await?;
    Ok(admin)
}

async fn teams(admin: &Api, event_id: i64, from: usize, to: usize) -> anyhow::Result<()> {
    let mut roster = String::from("team,name,email\n");
    for n in from..to {
        roster.push_str(&format!("Team {n},Member {n},\n"));
    }
    let (status, body) = admin
        .post_csv(
            &format!("/api/v1/events/{event_id}/participants/import"),
            &roster,
        )
        .await?;
    anyhow::ensure!(status == 200, "{body}");
    Ok(())
}

#[tokio::test]
async fn the_cloud_receives_exactly_the_appliances_rows_through_outages_and_kills()
-> anyhow::Result<()> {
    let cloud_data = DataDir::new("cloud");
    let data = DataDir::new("sync-appliance");
    let quic_port = free_port()?;
    let token = enrol_token(&cloud_data.0)?;
    let ca = cloud_data.0.join("tls/ca.pem");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let args = [
        "--cloud",
        &format!("127.0.0.1:{quic_port}"),
        "--cloud-ca",
        ca.to_str().context("utf8")?,
        "--cloud-token",
        &token,
        "--cloud-name",
        "rack-1",
    ];

    // The event starts with no cloud at all.
    let server = Server::start_with(&data.0, &listen, &args)?;
    let admin = admin(&server, &data.0).await?;
    let (status, event) = admin.post("/api/v1/events", json!({"name": "Offline Day", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})).await?;
    anyhow::ensure!(status == 201, "{event}");
    let event_id = event["id"].as_i64().context("event id")?;
    teams(&admin, event_id, 0, 300).await?;
    let (_, sync) = admin.get("/api/v1/sync").await?;
    assert_ne!(sync["link"]["state"], "linked", "{sync}");
    assert!(
        sync["pending_rows"].as_i64().is_some_and(|n| n >= 301),
        "the outbox waits: {sync}"
    );
    assert!(
        sync["link"]["last_error"].is_string(),
        "the link says why it is down: {sync}"
    );

    // The link appears: everything arrives.
    let cloud = Cloud::start(&cloud_data.0, quic_port)?;
    let cloud_token = cloud
        .admin_token
        .clone()
        .context("admin token at first start")?;
    let http = cloud.http.clone();
    converged(&data.0, &cloud_data.0, &http, &cloud_token).await?;
    let (_, sync) = admin.get("/api/v1/sync").await?;
    assert_eq!(
        (
            sync["link"]["state"].as_str(),
            sync["pending_rows"].as_i64()
        ),
        (Some("linked"), Some(0)),
        "{sync}"
    );

    // The cloud dies with -9 while rows stream; the appliance keeps writing; it comes back.
    teams(&admin, event_id, 300, 2300).await?;
    tokio::time::sleep(Duration::from_millis(150)).await;
    cloud.kill_hard()?;
    teams(&admin, event_id, 2300, 2600).await?;
    let cloud = Cloud::start(&cloud_data.0, quic_port)?;
    converged(&data.0, &cloud_data.0, &http_of(&cloud), &cloud_token).await?;

    // The appliance dies with -9 mid-batch and restarts; nothing is lost or doubled.
    teams(&admin, event_id, 2600, 4600).await?;
    server.kill_hard()?;
    let server = Server::start_with(&data.0, &listen, &args)?;
    let admin = Api {
        client: client_trusting(&data.0)?,
        base: server.url.clone(),
        token: admin.token.clone(),
    };
    let (status, _) = admin
        .post(
            &format!("/api/v1/events/{event_id}/transition"),
            json!({"to": "live"}),
        )
        .await?;
    anyhow::ensure!(status == 200);
    let summary = converged(&data.0, &cloud_data.0, &http_of(&cloud), &cloud_token).await?;
    assert_eq!(
        non_audit_rows(&data.0)?,
        4602,
        "event, 4,600 teams, the transition (besides the audit log's copy): {summary}"
    );

    // What the cloud serves is built from those rows.
    let (status, list) = cloud_get(
        &cloud_data.0,
        &http_of(&cloud),
        &cloud_token,
        "/api/v1/appliances",
    )
    .await?;
    assert_eq!(
        (status, list[0]["name"].as_str()),
        (200, Some("rack-1")),
        "{list}"
    );
    let (status, board) = cloud_get(
        &cloud_data.0,
        &http_of(&cloud),
        &cloud_token,
        &format!("/api/v1/appliances/1/events/{event_id}/scores"),
    )
    .await?;
    assert_eq!(
        (status, board.as_array().map(Vec::len)),
        (200, Some(4600)),
        "every team is on the cloud's board"
    );
    let (status, _) = cloud_get(
        &cloud_data.0,
        &http_of(&cloud),
        "wrong-token",
        "/api/v1/appliances",
    )
    .await?;
    assert_eq!(status, 401);

    // An appliance the cloud never enrolled is refused, and says so.
    let stranger_data = DataDir::new("sync-stranger");
    let stranger_args = [
        "--cloud",
        &format!("127.0.0.1:{quic_port}"),
        "--cloud-ca",
        ca.to_str().context("utf8")?,
        "--cloud-name",
        "stranger",
    ];
    let stranger = Server::start_with(&stranger_data.0, "127.0.0.1:0", &stranger_args)?;
    let stranger_admin = self::admin(&stranger, &stranger_data.0).await?;
    let refused = stranger_admin
        .wait_for("/api/v1/sync", Duration::from_secs(30), |s| {
            s["link"]["state"] == "refused"
        })
        .await?;
    assert!(
        refused["link"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not enrolled")),
        "{refused}"
    );
    let (_, list) = cloud_get(
        &cloud_data.0,
        &http_of(&cloud),
        &cloud_token,
        "/api/v1/appliances",
    )
    .await?;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "the stranger left no trace: {list}"
    );
    drop(stranger);
    drop(server);
    drop(cloud);
    Ok(())
}

fn http_of(cloud: &Cloud) -> String {
    cloud.http.clone()
}

#[tokio::test]
async fn a_lossy_partitioned_link_and_repeated_kills_still_deliver_every_row_once()
-> anyhow::Result<()> {
    let cloud_data = DataDir::new("cloud-faults");
    let quic_port = free_port()?;
    let mut cloud = Cloud::start(&cloud_data.0, quic_port)?;
    let cloud_token = cloud.admin_token.clone().context("admin token")?;
    let proxy = UdpFaultProxy::start(format!("127.0.0.1:{quic_port}").parse()?).await?;
    proxy.set(Faults {
        drop_percent: 5,
        delay_ms: 10,
        reorder_percent: 10,
        duplicate_percent: 5,
        partitioned: false,
    });
    let ca = cloud_data.0.join("tls/ca.pem");
    let ca = ca.to_str().context("utf8")?.to_owned();

    // Two appliances sync into the one receiver: one through the bad link, one direct.
    let data = DataDir::new("faults-appliance");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let token = enrol_token(&cloud_data.0)?;
    let args = [
        "--cloud",
        &format!("127.0.0.1:{}", proxy.port),
        "--cloud-ca",
        &ca,
        "--cloud-token",
        &token,
        "--cloud-name",
        "lossy",
    ];
    let mut server = Server::start_with(&data.0, &listen, &args)?;
    let admin_api = admin(&server, &data.0).await?;
    let bearer = admin_api.token.clone();
    let (_, event) = admin_api.post("/api/v1/events", json!({"name": "Lossy", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})).await?;
    let event_id = event["id"].as_i64().context("event id")?;
    let other_data = DataDir::new("faults-other");
    let other_token = enrol_token(&cloud_data.0)?;
    let other_args = [
        "--cloud",
        &format!("127.0.0.1:{quic_port}"),
        "--cloud-ca",
        &ca,
        "--cloud-token",
        &other_token,
        "--cloud-name",
        "direct",
    ];
    let other = Server::start_with(&other_data.0, "127.0.0.1:0", &other_args)?;
    let other_admin = admin(&other, &other_data.0).await?;
    let (_, other_event) = other_admin.post("/api/v1/events", json!({"name": "Direct", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})).await?;
    teams(
        &other_admin,
        other_event["id"].as_i64().context("id")?,
        0,
        500,
    )
    .await?;

    let mut next = 0;
    for round in 0..3 {
        // Rows stream over the lossy link; then it is cut for a while; then a side dies.
        let api = Api {
            client: client_trusting(&data.0)?,
            base: server.url.clone(),
            token: bearer.clone(),
        };
        teams(&api, event_id, next, next + 1500).await?;
        next += 1500;
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.set(Faults {
            partitioned: true,
            ..Faults::default()
        });
        teams(&api, event_id, next, next + 200).await?;
        next += 200;
        tokio::time::sleep(Duration::from_secs(3)).await;
        proxy.set(Faults {
            drop_percent: 5,
            delay_ms: 10,
            reorder_percent: 10,
            duplicate_percent: 5,
            partitioned: false,
        });
        if round % 2 == 0 {
            cloud.kill_hard()?;
            cloud = Cloud::start(&cloud_data.0, quic_port)?;
        } else {
            server.kill_hard()?;
            server = Server::start_with(&data.0, &listen, &args)?;
        }
    }
    let lossy_id = {
        let (_, list) = cloud_get(
            &cloud_data.0,
            &cloud.http,
            &cloud_token,
            "/api/v1/appliances",
        )
        .await?;
        list.as_array()
            .and_then(|l| l.iter().find(|a| a["name"] == "lossy"))
            .and_then(|a| a["id"].as_i64())
            .context("the lossy appliance enrolled")?
    };
    let summary = converged_as(lossy_id, &data.0, &cloud_data.0, &cloud.http, &cloud_token).await?;
    assert_eq!(non_audit_rows(&data.0)?, 1 + 3 * 1700, "{summary}");
    let direct_id = if lossy_id == 1 { 2 } else { 1 };
    converged_as(
        direct_id,
        &other_data.0,
        &cloud_data.0,
        &cloud.http,
        &cloud_token,
    )
    .await?;
    drop(other);
    drop(server);
    drop(cloud);
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn an_appliance_restored_from_a_backup_is_refused_loudly_until_an_admin_starts_a_new_epoch()
-> anyhow::Result<()> {
    let cloud_data = DataDir::new("epoch-cloud");
    let data = DataDir::new("epoch-appliance");
    let backup = DataDir::new("epoch-backup");
    let quic_port = free_port()?;
    let token = enrol_token(&cloud_data.0)?;
    let ca = cloud_data.0.join("tls/ca.pem");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let args = [
        "--cloud",
        &format!("127.0.0.1:{quic_port}"),
        "--cloud-ca",
        ca.to_str().context("utf8")?,
        "--cloud-token",
        &token,
        "--cloud-name",
        "rack-1",
    ];
    let cloud = Cloud::start(&cloud_data.0, quic_port)?;
    let cloud_token = cloud.admin_token.clone().context("admin token")?;
    let server = Server::start_with(&data.0, &listen, &args)?;
    let admin = admin(&server, &data.0).await?;
    let (_, event) = admin.post("/api/v1/events", json!({"name": "Backed up", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})).await?;
    let event_id = event["id"].as_i64().context("event id")?;
    teams(&admin, event_id, 0, 50).await?;
    converged(&data.0, &cloud_data.0, &cloud.http, &cloud_token).await?;

    // A backup is taken; the event goes on and the cloud gets more.
    let status = server.terminate()?;
    anyhow::ensure!(status.success(), "{status}");
    copy_dir(&data.0, &backup.0)?;
    let server = Server::start_with(&data.0, &listen, &args)?;
    let admin = Api {
        client: client_trusting(&data.0)?,
        base: server.url.clone(),
        token: admin.token.clone(),
    };
    teams(&admin, event_id, 50, 150).await?;
    let ahead = converged(&data.0, &cloud_data.0, &cloud.http, &cloud_token).await?;

    // The box is restored from the backup: its outbox went back, and would reuse sequence
    // numbers the cloud holds. The cloud refuses, and the appliance says so.
    server.terminate()?;
    std::fs::remove_dir_all(&data.0)?;
    copy_dir(&backup.0, &data.0)?;
    let server = Server::start_with(&data.0, &listen, &args)?;
    let admin = Api {
        client: client_trusting(&data.0)?,
        base: server.url.clone(),
        token: admin.token.clone(),
    };
    teams(&admin, event_id, 150, 160).await?;
    let stopped = admin
        .wait_for("/api/v1/sync", Duration::from_secs(30), |s| {
            s["link"]["state"] == "mismatch"
        })
        .await?;
    assert!(
        stopped["link"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("went back")),
        "{stopped}"
    );
    let (_, summary) = cloud_get(
        &cloud_data.0,
        &cloud.http,
        &cloud_token,
        "/api/v1/appliances/1/summary",
    )
    .await?;
    assert_eq!(
        (&summary["rows"], &summary["checksum"]),
        (&ahead["rows"], &ahead["checksum"]),
        "nothing of the restored box was applied: {summary}"
    );
    let (_, dashboard) = admin
        .get(&format!("/api/v1/events/{event_id}/dashboard"))
        .await?;
    assert!(
        dashboard.to_string().contains("sync_mismatch"),
        "staff see it on the dashboard: {dashboard}"
    );
    let (_, audit) = admin.get("/api/v1/audit?limit=50").await?;
    assert!(
        audit.to_string().contains("sync.mismatch"),
        "and in the audit log: {audit}"
    );

    // An admin starts a new epoch: what the restored box holds goes up as a new stream that
    // continues the old one, and the cloud's view is exactly the box's outbox.
    let (status, started) = admin.post("/api/v1/sync/epoch", json!({})).await?;
    assert_eq!(status, 201, "{started}");
    admin
        .wait_for("/api/v1/sync", Duration::from_secs(30), |s| {
            s["link"]["state"] == "linked"
        })
        .await?;
    teams(&admin, event_id, 160, 170).await?;
    let summary = converged(&data.0, &cloud_data.0, &cloud.http, &cloud_token).await?;
    assert_eq!(
        non_audit_rows(&data.0)?,
        1 + 50 + 10 + 10,
        "the event, the backup's 50 teams and the 20 made since: {summary}"
    );
    drop(server);
    drop(cloud);
    Ok(())
}

#[tokio::test]
async fn a_cloud_restored_from_a_backup_behind_what_the_appliance_pruned_is_refused_loudly()
-> anyhow::Result<()> {
    let cloud_data = DataDir::new("behind-cloud");
    let cloud_backup = DataDir::new("behind-cloud-backup");
    let data = DataDir::new("behind-appliance");
    let quic_port = free_port()?;
    let token = enrol_token(&cloud_data.0)?;
    let ca = cloud_data.0.join("tls/ca.pem");
    let args = [
        "--cloud",
        &format!("127.0.0.1:{quic_port}"),
        "--cloud-ca",
        ca.to_str().context("utf8")?,
        "--cloud-token",
        &token,
        "--cloud-name",
        "rack-1",
        "--outbox-retention-secs",
        "0",
    ];
    let cloud = Cloud::start(&cloud_data.0, quic_port)?;
    let server = Server::start_with(&data.0, "127.0.0.1:0", &args)?;
    let admin = admin(&server, &data.0).await?;
    let (_, event) = admin.post("/api/v1/events", json!({"name": "Pruned", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})).await?;
    let event_id = event["id"].as_i64().context("event id")?;
    teams(&admin, event_id, 0, 20).await?;
    let first = admin
        .wait_for("/api/v1/sync", Duration::from_secs(30), |s| {
            s["pending_rows"] == 0
        })
        .await?;
    let first = first["link"]["acked"].as_i64().context("acked")?;
    // The cloud's backup is taken here; then it receives more, and the appliance prunes
    // what it acknowledged (no retention).
    drop(cloud);
    copy_dir(&cloud_data.0, &cloud_backup.0)?;
    let cloud = Cloud::start(&cloud_data.0, quic_port)?;
    teams(&admin, event_id, 20, 40).await?;
    let second = admin
        .wait_for("/api/v1/sync", Duration::from_secs(30), |s| {
            s["pending_rows"] == 0 && s["link"]["acked"].as_i64() > Some(first)
        })
        .await?;
    let second = second["link"]["acked"].as_i64().context("acked")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while appliance_outbox_len(&data.0)? > 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the appliance never pruned"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The cloud is restored from its backup: it would ask for rows nobody holds any more.
    cloud.kill_hard()?;
    std::fs::remove_dir_all(&cloud_data.0)?;
    copy_dir(&cloud_backup.0, &cloud_data.0)?;
    let _cloud = Cloud::start(&cloud_data.0, quic_port)?;
    let stopped = admin
        .wait_for("/api/v1/sync", Duration::from_secs(60), |s| {
            s["link"]["state"] == "mismatch"
        })
        .await?;
    let error = stopped["link"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("already pruned") && error.contains(&format!("{}–{second}", first + 1)),
        "{stopped}"
    );
    drop(server);
    Ok(())
}

/// Outbox rows other than the audit log's copy.
fn non_audit_rows(data: &Path) -> anyhow::Result<i64> {
    let conn = rusqlite::Connection::open(data.join("labrack.db"))?;
    Ok(conn.query_row(
        "SELECT count(*) FROM outbox WHERE kind <> 'audit'",
        [],
        |r| r.get(0),
    )?)
}

fn appliance_outbox_len(data: &Path) -> anyhow::Result<i64> {
    let conn = rusqlite::Connection::open(data.join("labrack.db"))?;
    Ok(conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?)
}

#[tokio::test]
async fn strangers_that_never_say_hello_are_dropped_and_cannot_crowd_out_an_appliance()
-> anyhow::Result<()> {
    let cloud_data = DataDir::new("hello-cloud");
    let data = DataDir::new("hello-appliance");
    let quic_port = free_port()?;
    let token = enrol_token(&cloud_data.0)?;
    let cloud = Cloud::start(&cloud_data.0, quic_port)?;
    let cloud_token = cloud.admin_token.clone().context("admin token")?;
    let ca = cloud_data.0.join("tls/ca.pem");
    // Strangers on another address finish the QUIC handshake with a certificate of their
    // own, then say nothing.
    let stranger_dir = DataDir::new("hello-stranger");
    let (chain, key) = labrack_serving::certificates::client_identity(&stranger_dir.0, "stranger")?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.2:0".parse()?)?;
    endpoint.set_default_client_config(labrack_serving::sync_link::client_config(
        &std::fs::read(&ca)?,
        chain,
        key,
    )?);
    let address: std::net::SocketAddr = format!("127.0.0.1:{quic_port}").parse()?;
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..20 {
        match tokio::time::timeout(
            Duration::from_secs(5),
            endpoint.connect(address, "127.0.0.1")?,
        )
        .await
        {
            Ok(Ok(connection)) => held.push(connection),
            _ => refused += 1,
        }
    }
    assert_eq!(
        (held.len(), refused),
        (labrack_cloud::receiver::MAX_UNIDENTIFIED_PER_ADDRESS, 12),
        "one address holds a bounded number"
    );
    // Meanwhile a real appliance links and delivers.
    let args = [
        "--cloud",
        &format!("127.0.0.1:{quic_port}"),
        "--cloud-ca",
        ca.to_str().context("utf8")?,
        "--cloud-token",
        &token,
        "--cloud-name",
        "rack-1",
    ];
    let server = Server::start_with(&data.0, "127.0.0.1:0", &args)?;
    let admin = admin(&server, &data.0).await?;
    let (_, event) = admin.post("/api/v1/events", json!({"name": "Crowded", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})).await?;
    teams(&admin, event["id"].as_i64().context("event id")?, 0, 10).await?;
    converged(&data.0, &cloud_data.0, &cloud.http, &cloud_token).await?;
    assert!(
        held.iter().all(|c| c.close_reason().is_none()),
        "the strangers were still there"
    );
    // Those that never said hello are dropped by the cloud.
    for connection in &held {
        tokio::time::timeout(
            labrack_cloud::receiver::HELLO_WAIT + Duration::from_secs(10),
            connection.closed(),
        )
        .await
        .context("a silent stranger was kept")?;
    }
    drop(server);
    Ok(())
}
