//! The real `labrack` binary over HTTPS: create an event, import a roster, join as a
//! participant, restart the process (SIGTERM → exit 0) and find everything intact.

use labrack_e2e::{Api, DataDir, Server, client_trusting};
use serde_json::json;

#[tokio::test]
async fn event_roster_join_survive_a_restart() -> anyhow::Result<()> {
    let data = DataDir::new("flow");
    let server = Server::start(&data.0, "127.0.0.1:0")?;
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let fingerprint = server
        .ca_fingerprint
        .clone()
        .expect("CA fingerprint printed");
    assert!(
        fingerprint.starts_with("SHA256:") && fingerprint.len() == 7 + 95,
        "{fingerprint}"
    );
    let otp = server
        .admin_password
        .clone()
        .expect("one-time password printed at first start");

    // Only the appliance's user may read its data: the directory and every file in it.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode(&data.0)?, 0o700, "the data dir");
        let mut files = vec![data.0.clone()];
        while let Some(dir) = files.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    assert_eq!(mode(&path)?, 0o700, "{}", path.display());
                    files.push(path);
                } else {
                    assert_eq!(mode(&path)? & 0o077, 0, "{} is private", path.display());
                }
            }
        }
        assert!(data.0.join("labrack.db").exists());
    }

    let client = client_trusting(&data.0)?;
    // Only the generated CA is trusted, and it is enough.
    let ready = client.get(format!("{}/readyz", server.url)).send().await?;
    assert_eq!(ready.status(), 200);

    let mut admin = Api {
        client: client.clone(),
        base: server.url.clone(),
        token: None,
    };
    admin
        .first_admin_login(&otp, "a-strong-admin-password")
        .await?;
    let (status, event) = admin
        .post("/api/v1/events", json!({"name": "Venue Hack", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2026-12-02T18:00:00+02:00"}))
        .await?;
    assert_eq!(status, 201, "{event}");
    assert_eq!(
        event["ends_at"], "2026-12-02T16:00:00Z",
        "schedule normalised to UTC"
    );
    let event_id = event["id"].as_i64().expect("id");
    let event_code = event["code"].as_str().expect("code").to_owned();
    let (status, imported) = admin
        .post_csv(
            &format!("/api/v1/events/{event_id}/participants/import"),
            "team,name,email\nRed,Ada,ada@example.org\nRed,Bob,\nBlue,Cy,\n",
        )
        .await?;
    assert_eq!(status, 200, "{imported}");
    assert_eq!(imported["imported"], 3);
    assert_eq!(imported["teams_created"], 2);
    let ada_code = imported["participants"][0]["join_code"]
        .as_str()
        .expect("code")
        .to_owned();
    let (status, _) = admin
        .post(
            &format!("/api/v1/events/{event_id}/transition"),
            json!({"to": "live", "from": "draft"}),
        )
        .await?;
    assert_eq!(status, 200);

    let mut ada = Api {
        client: client.clone(),
        base: server.url.clone(),
        token: None,
    };
    let (status, joined) = ada
        .post(
            "/api/v1/join",
            json!({"event_code": event_code, "join_code": ada_code, "bearer": true}),
        )
        .await?;
    assert_eq!(status, 200, "{joined}");
    ada.token = joined["token"].as_str().map(str::to_owned);
    let (_, me) = ada.get("/api/v1/me").await?;
    assert_eq!(me["team"]["name"], "Red");

    let status = server.terminate()?;
    assert!(status.success(), "SIGTERM must exit 0, got {status}");

    // Restart on the same data dir: same CA, no new admin password, everything intact.
    let server = Server::start(&data.0, "127.0.0.1:0")?;
    assert_eq!(
        server.ca_fingerprint.as_deref(),
        Some(fingerprint.as_str()),
        "CA kept across restarts"
    );
    assert!(
        server.admin_password.is_none(),
        "no second one-time password"
    );
    let client = client_trusting(&data.0)?;
    let mut admin = Api {
        client: client.clone(),
        base: server.url.clone(),
        token: None,
    };
    admin.login("admin", "a-strong-admin-password").await?;
    let (_, event) = admin.get(&format!("/api/v1/events/{event_id}")).await?;
    assert_eq!(event["state"], "live");
    assert_eq!(event["participant_count"], 3);
    assert_eq!(event["team_count"], 2);
    let (_, people) = admin
        .get(&format!("/api/v1/events/{event_id}/participants"))
        .await?;
    let joined: Vec<_> = people["participants"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|p| p["joined_at"].is_string())
        .collect();
    assert_eq!(joined.len(), 1);
    assert_eq!(joined[0]["name"], "Ada");
    // The participant's session survived too (sessions are durable rows).
    let ada = Api {
        client,
        base: server.url.clone(),
        token: ada.token,
    };
    let (status, me) = ada.get("/api/v1/me").await?;
    assert_eq!(status, 200, "{me}");
    let (_, audit) = admin.get("/api/v1/audit?limit=100").await?;
    let actions: Vec<_> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for expected in [
        "staff.bootstrap_admin",
        "auth.password_changed",
        "event.created",
        "participants.imported",
        "event.transition",
        "participant.joined",
    ] {
        assert!(
            actions.contains(&expected),
            "audit lacks {expected}: {actions:?}"
        );
    }
    assert!(server.terminate()?.success());
    Ok(())
}

#[tokio::test]
async fn plain_http_only_with_the_dev_flag() -> anyhow::Result<()> {
    let data = DataDir::new("https-only");
    let server = Server::start(&data.0, "127.0.0.1:0")?;
    // An HTTP request to the HTTPS port gets no API answer.
    let plain = reqwest::Client::new()
        .get(format!(
            "{}/healthz",
            server.url.replace("https://", "http://")
        ))
        .send()
        .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
    assert!(server.terminate()?.success());

    // With --dev-http: plain HTTP, no TLS material needed, and cookies lose `Secure`.
    let dev_data = DataDir::new("dev-http");
    let dev = Server::start_with(&dev_data.0, "127.0.0.1:0", &["--dev-http"])?;
    assert!(dev.url.starts_with("http://"), "{}", dev.url);
    let otp = dev.admin_password.clone().expect("otp");
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/auth/login", dev.url))
        .json(&json!({"username": "admin", "password": otp}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && !cookie.contains("Secure"),
        "{cookie}"
    );
    assert!(
        !dev_data.0.join("tls").exists(),
        "dev mode made TLS material"
    );
    assert!(dev.terminate()?.success());
    Ok(())
}

#[tokio::test]
async fn sigterm_right_after_start_is_still_a_clean_exit() -> anyhow::Result<()> {
    // Signal handlers are registered before "listening" is printed; a supervisor that
    // stops the appliance at once must still get a graceful exit 0, every time.
    for round in 0..5 {
        let data = DataDir::new("early-term");
        let server = Server::start_with(&data.0, "127.0.0.1:0", &["--dev-http"])?;
        let status = server.terminate()?;
        assert!(status.success(), "round {round}: {status}");
    }
    Ok(())
}
