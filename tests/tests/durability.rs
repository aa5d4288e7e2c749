//! Acknowledged writes survive `kill -9` and SIGTERM: many concurrent writers, the server
//! stopped mid-stream, then every write that got a success answer must be there after restart
//! (and a SIGTERM stop must exit 0).

use std::sync::Arc;
use std::time::Duration;

use labrack_e2e::{Api, DataDir, Server, client_trusting};
use serde_json::json;
use tokio::sync::Mutex;

#[tokio::test]
async fn every_acknowledged_write_survives_kill_9() -> anyhow::Result<()> {
    writes_survive_a_stop(Stop::Kill9).await
}

#[tokio::test]
async fn sigterm_finishes_in_flight_writes_and_exits_0() -> anyhow::Result<()> {
    writes_survive_a_stop(Stop::Sigterm).await
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill9,
    Sigterm,
}

async fn writes_survive_a_stop(stop: Stop) -> anyhow::Result<()> {
    let data = DataDir::new("durability");
    let server = Server::start(&data.0, "127.0.0.1:0")?;
    let otp = server.admin_password.clone().expect("otp");
    let client = client_trusting(&data.0)?;
    let mut admin = Api {
        client: client.clone(),
        base: server.url.clone(),
        token: None,
    };
    admin
        .first_admin_login(&otp, "a-strong-admin-password")
        .await?;
    let (_, event) = admin.post("/api/v1/events", json!({"name": "Durable", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2026-12-02T09:00:00Z"})).await?;
    let event_id = event["id"].as_i64().expect("id");

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for writer in 0..16 {
        let (api, acknowledged) = (admin.clone(), acknowledged.clone());
        writers.push(tokio::spawn(async move {
            for n in 0..100_000 {
                let name = format!("w{writer}-{n}");
                match api
                    .post(
                        &format!("/api/v1/events/{event_id}/teams"),
                        json!({"name": name}),
                    )
                    .await
                {
                    Ok((201, _)) => acknowledged.lock().await.push(name),
                    Ok((status, body)) => panic!("unexpected answer {status} {body}"),
                    Err(_) => break, // the server is gone
                }
            }
        }));
    }
    // Let writes flow, then kill the server without warning.
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if acknowledged.lock().await.len() >= 300 {
            break;
        }
    }
    match stop {
        Stop::Kill9 => server.kill_hard()?,
        Stop::Sigterm => {
            let status = server.terminate()?;
            assert!(
                status.success(),
                "SIGTERM under load must exit 0, got {status}"
            );
        }
    }
    for writer in writers {
        writer.await?;
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert!(acknowledged.len() >= 300);

    let server = Server::start(&data.0, "127.0.0.1:0")?;
    let mut admin = Api {
        client: client_trusting(&data.0)?,
        base: server.url.clone(),
        token: None,
    };
    admin.login("admin", "a-strong-admin-password").await?;
    let (_, teams) = admin
        .get(&format!("/api/v1/events/{event_id}/teams"))
        .await?;
    let stored: std::collections::HashSet<String> = teams["teams"]
        .as_array()
        .expect("teams")
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|name| !stored.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    // The audit log agrees with the data: one team.created row per stored team.
    let db = rusqlite::Connection::open(data.0.join("labrack.db"))?;
    let audited: i64 = db.query_row(
        "SELECT count(*) FROM audit_log WHERE action = 'team.created'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(usize::try_from(audited)?, stored.len());
    assert!(server.terminate()?.success());
    Ok(())
}
