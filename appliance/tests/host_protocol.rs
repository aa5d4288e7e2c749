//! The signed host protocol in-process, played as an attacker with a host's own key: a
//! replayed call, one identity used by two machines, a host speaking for another host's
//! lab; and what the protocol promises under it — passwords only to their own host and
//! never at rest in a task body, GPU memory over a template's limit alerting staff, a
//! force-released lab cleaned up when its host comes back.

use crate::common;

use axum::body::Body;
use axum::http::Request;
use base64::Engine as _;
use common::{As, Reply, TestApp, seed};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{Value, json};
use sha2::Digest as _;

/// A host's identity, as `labrack-host` holds it, signing as one agent instance.
struct Host {
    id: i64,
    key: Ed25519KeyPair,
}

impl Host {
    fn sign(&self, path: &str, body: &[u8], instance: &str, counter: u64) -> String {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis();
        let digest = hex::encode(sha2::Sha256::digest(body));
        let message =
            format!("labrack-host-v2\nPOST\n{path}\n{ts}\n{instance}\n{counter}\n{digest}");
        let sig = base64::engine::general_purpose::STANDARD
            .encode(self.key.sign(message.as_bytes()).as_ref());
        format!(
            "LabrackHost host={},ts={ts},i={instance},n={counter},sig={sig}",
            self.id
        )
    }

    async fn call_signed(
        &self,
        app: &TestApp,
        path: &str,
        body: &Value,
        authorization: &str,
    ) -> Reply {
        let bytes = body.to_string();
        let request = Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/json")
            .header("authorization", authorization)
            .body(Body::from(bytes))
            .expect("request");
        app.send(request).await
    }

    async fn call(
        &self,
        app: &TestApp,
        path: &str,
        body: &Value,
        instance: &str,
        counter: u64,
    ) -> Reply {
        let authorization = self.sign(path, body.to_string().as_bytes(), instance, counter);
        self.call_signed(app, path, body, &authorization).await
    }
}

/// Enrols a host with a fresh key straight into the database.
async fn host(app: &TestApp, name: &str, gpus: u32) -> Host {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
    let public = key.public_key().as_ref().to_vec();
    let resources = common::HOST_RESOURCES.replace("\"gpus\":0", &format!("\"gpus\":{gpus}"));
    let name = name.to_owned();
    let id = app
        .db
        .writer()
        .write(move |conn| {
            let now = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)).unwrap_or(0);
            conn.execute(
                "INSERT INTO hosts (name, public_key, address, gpus, capacity, enrolled_at, last_seen_ms, resources) VALUES (?1, ?2, '10.0.0.9', ?3, 4, 'now', ?4, ?5)",
                rusqlite::params![name, public, gpus, now, resources],
            )?;
            Ok::<_, rusqlite::Error>(conn.last_insert_rowid())
        })
        .await
        .expect("host");
    Host { id, key }
}

fn heartbeat(labs: Value, gpus: u32) -> Value {
    let resources: Value = serde_json::from_str(
        &common::HOST_RESOURCES.replace("\"gpus\":0", &format!("\"gpus\":{gpus}")),
    )
    .expect("resources");
    json!({"version": 2, "cpu_percent": 1.0, "cpu_count": 8, "memory_total_bytes": 1u64 << 34, "memory_used_bytes": 1u64 << 30, "disks": [],
        "gpus": {"status": "no_gpu", "reason": "NVML unavailable"}, "resources": resources, "labs": labs})
}

async fn query(app: &TestApp, sql: &'static str) -> Value {
    app.db
        .read(move |conn| {
            let text: Option<String> = conn.query_row(sql, [], |r| r.get(0))?;
            Ok::<_, labrack::error::Error>(text.map_or(Value::Null, |t| {
                serde_json::from_str(&t).unwrap_or(Value::String(t))
            }))
        })
        .await
        .expect("query")
}

#[tokio::test]
async fn a_replayed_call_is_refused_and_two_machines_on_one_identity_are_caught() {
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    let s = seed(&app, &organizer).await;
    let rack = host(&app, "rack-1", 0).await;
    let poll = json!({"version": 2, "wait_ms": 0});
    let header = rack.sign(
        "/api/v1/host/poll",
        poll.to_string().as_bytes(),
        "00000000000000aa",
        1,
    );
    assert_eq!(
        rack.call_signed(&app, "/api/v1/host/poll", &poll, &header)
            .await
            .status
            .as_u16(),
        200
    );
    let replayed = rack
        .call_signed(&app, "/api/v1/host/poll", &poll, &header)
        .await;
    assert!(
        replayed.problem(401)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("replay")),
        "{}",
        replayed.body
    );
    // Counters may arrive out of order (calls run side by side), each once.
    assert_eq!(
        rack.call(&app, "/api/v1/host/poll", &poll, "00000000000000aa", 3)
            .await
            .status
            .as_u16(),
        200
    );
    assert_eq!(
        rack.call(&app, "/api/v1/host/poll", &poll, "00000000000000aa", 2)
            .await
            .status
            .as_u16(),
        200
    );
    rack.call(&app, "/api/v1/host/poll", &poll, "00000000000000aa", 2)
        .await
        .problem(401);

    // The agent restarts: a new instance takes over. The old one speaking again means a
    // second machine holds the same key.
    assert_eq!(
        rack.call(&app, "/api/v1/host/poll", &poll, "00000000000000bb", 1)
            .await
            .status
            .as_u16(),
        200
    );
    let before = query(
        &app,
        "SELECT CAST(count(*) AS TEXT) FROM audit_log WHERE action = 'host.identity_conflict'",
    )
    .await;
    assert_eq!(before, json!(0));
    let clone = rack
        .call(&app, "/api/v1/host/poll", &poll, "00000000000000aa", 4)
        .await;
    assert!(
        clone.problem(409)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("another machine")),
        "{}",
        clone.body
    );
    assert_eq!(
        query(
            &app,
            "SELECT CAST(count(*) AS TEXT) FROM audit_log WHERE action = 'host.identity_conflict'"
        )
        .await,
        json!(1)
    );
    let board = app
        .call(
            "GET",
            &format!("/api/v1/events/{}/dashboard", s.event_id),
            &organizer,
            None,
        )
        .await;
    let problems = board.body["problems"].to_string();
    assert!(
        problems.contains("host_identity_conflict:rack-1"),
        "staff see it: {problems}"
    );
    // The current instance goes on; a heartbeat stores where its counter is, so a replay
    // stays refused after an appliance restart too.
    assert_eq!(
        rack.call(
            &app,
            "/api/v1/host/heartbeat",
            &heartbeat(json!([]), 0),
            "00000000000000bb",
            2
        )
        .await
        .status
        .as_u16(),
        200
    );
    assert_eq!(
        query(
            &app,
            "SELECT instance || ':' || instance_counter FROM hosts"
        )
        .await,
        json!("00000000000000bb:2")
    );
    // A bad signature from the right instance changes nothing for the real one.
    let forged = format!(
        "{}x",
        rack.sign("/api/v1/host/poll", b"{}", "00000000000000bb", 3)
            .trim_end_matches('=')
    );
    rack.call_signed(&app, "/api/v1/host/poll", &poll, &forged)
        .await
        .problem(401);
    assert_eq!(
        rack.call(&app, "/api/v1/host/poll", &poll, "00000000000000bb", 3)
            .await
            .status
            .as_u16(),
        200
    );
}

#[tokio::test]
async fn passwords_reach_only_their_host_gpu_memory_alerts_and_force_released_labs_are_cleaned_up()
{
    let app = TestApp::new().await;
    let organizer = As::Bearer(app.staff("org", "organizer").await);
    let s = seed(&app, &organizer).await;
    let templates = "[[template]]\nname = \"gpu\"\nruntime = \"local-user\"\nskeleton = \"/srv/skel\"\ngpus = 1\ngpu_memory_mib = 1000\n";
    let a = host(&app, "rack-a", 2).await;
    let b = host(&app, "rack-b", 2).await;
    let reply = app
        .raw(
            "PUT",
            "/api/v1/templates",
            &organizer,
            "application/toml",
            templates,
        )
        .await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.body);
    let lab = app
        .call(
            "POST",
            &format!("/api/v1/teams/{}/allocation", s.team_a),
            &organizer,
            Some(json!({"template": "gpu"})),
        )
        .await;
    assert_eq!(lab.status.as_u16(), 201, "{}", lab.body);
    let id = lab.body["id"].as_i64().expect("id");
    assert_eq!(
        lab.body["gpus"],
        json!([0]),
        "the lab holds GPU 0 of its host: {}",
        lab.body
    );
    let second = app
        .call(
            "POST",
            &format!("/api/v1/teams/{}/allocation", s.team_b),
            &organizer,
            Some(json!({"template": "gpu"})),
        )
        .await;
    assert_eq!(second.status.as_u16(), 201, "{}", second.body);
    let (owner, other) = if lab.body["host_id"] == a.id {
        (&a, &b)
    } else {
        (&b, &a)
    };

    // The provision task carries the password the appliance chose, to its own host only;
    // the stored body never holds it.
    let poll = json!({"version": 2, "wait_ms": 0});
    let mine = owner
        .call(&app, "/api/v1/host/poll", &poll, "1000000000000001", 1)
        .await;
    let task = mine.body["tasks"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["kind"]["allocation_id"] == id))
        .cloned()
        .expect("the provision task");
    let password = task["kind"]["password"]
        .as_str()
        .expect("password")
        .to_owned();
    assert_eq!(password.len(), 20);
    assert_eq!(task["kind"]["gpus"], json!([0]));
    let theirs = other
        .call(&app, "/api/v1/host/poll", &poll, "2000000000000001", 1)
        .await;
    assert!(
        !theirs.body.to_string().contains(&password),
        "another host never sees it"
    );
    let body = query(
        &app,
        "SELECT body FROM host_tasks WHERE id LIKE 'alloc-1-provision%'",
    )
    .await;
    assert_eq!(
        body["kind"]["password"], "",
        "no password in the stored body: {body}"
    );
    assert!(
        !app.snapshot().await.contains(&password),
        "nor anywhere else in the database in the clear"
    );
    let report = json!({"version": 2, "id": task["id"], "outcome": {"result": "succeeded", "desktop": {"username": "lr-a1", "rdp_port": 42000, "ssh_port": 42001}}});
    let done = owner
        .call(&app, "/api/v1/host/report", &report, "1000000000000001", 2)
        .await;
    assert_eq!(done.body["applied"], true, "{}", done.body);
    assert_eq!(query(&app, "SELECT CAST(count(*) AS TEXT) FROM host_tasks WHERE secret IS NOT NULL AND done_ms IS NOT NULL").await, json!(0), "a reported task keeps no secret");

    // GPU memory over the template's limit raises one staff alert; a host speaking for a
    // lab that is not its own changes nothing.
    let usage = |allocation: i64, mib: u64| json!([{"allocation_id": allocation, "gpus": [0], "gpu_memory_bytes": mib << 20}]);
    other
        .call(
            &app,
            "/api/v1/host/heartbeat",
            &heartbeat(usage(id, 5000), 2),
            "2000000000000001",
            2,
        )
        .await;
    assert_eq!(
        query(&app, "SELECT CAST(count(*) AS TEXT) FROM alerts").await,
        json!(0),
        "not its lab"
    );
    owner
        .call(
            &app,
            "/api/v1/host/heartbeat",
            &heartbeat(usage(id, 900), 2),
            "1000000000000001",
            3,
        )
        .await;
    assert_eq!(
        query(&app, "SELECT CAST(count(*) AS TEXT) FROM alerts").await,
        json!(0),
        "under the limit"
    );
    owner
        .call(
            &app,
            "/api/v1/host/heartbeat",
            &heartbeat(usage(id, 1500), 2),
            "1000000000000001",
            4,
        )
        .await;
    owner
        .call(
            &app,
            "/api/v1/host/heartbeat",
            &heartbeat(usage(id, 1600), 2),
            "1000000000000001",
            5,
        )
        .await;
    let alert = query(
        &app,
        "SELECT detail FROM alerts WHERE kind = 'gpu_memory_over_limit'",
    )
    .await;
    assert_eq!(
        (alert["used_mib"].as_i64(), alert["limit_mib"].as_i64()),
        (Some(1500), Some(1000)),
        "{alert}"
    );
    assert_eq!(
        query(&app, "SELECT CAST(count(*) AS TEXT) FROM alerts").await,
        json!(1),
        "one alert, not one per heartbeat"
    );

    // Its host is written off: the lab is let go, and a release waits for the host.
    app.call(
        "POST",
        &format!("/api/v1/allocations/{id}/force-release"),
        &organizer,
        None,
    )
    .await;
    let back = owner
        .call(&app, "/api/v1/host/poll", &poll, "1000000000000001", 6)
        .await;
    let cleanup = back.body["tasks"]
        .as_array()
        .and_then(|t| {
            t.iter()
                .find(|t| t["kind"]["type"] == "release" && t["kind"]["allocation_id"] == id)
        })
        .cloned();
    let cleanup = cleanup.unwrap_or_else(|| {
        panic!(
            "the host is asked to remove the lab when it is back: {}",
            back.body
        )
    });
    assert!(
        cleanup["id"]
            .as_str()
            .is_some_and(|i| i.contains("cleanup")),
        "{cleanup}"
    );
    let done = owner
        .call(
            &app,
            "/api/v1/host/report",
            &json!({"version": 2, "id": cleanup["id"], "outcome": {"result": "succeeded"}}),
            "1000000000000001",
            7,
        )
        .await;
    assert_eq!(done.body["applied"], true, "{}", done.body);
    assert_eq!(
        query(
            &app,
            "SELECT CAST(count(*) AS TEXT) FROM audit_log WHERE action = 'allocation.cleaned_up'"
        )
        .await,
        json!(1)
    );
    let again = owner
        .call(&app, "/api/v1/host/poll", &poll, "1000000000000001", 8)
        .await;
    assert!(
        !again.body.to_string().contains("cleanup"),
        "asked once: {}",
        again.body
    );
    let view = app
        .call(
            "GET",
            &format!("/api/v1/allocations/{id}"),
            &organizer,
            None,
        )
        .await;
    assert_eq!(view.body["state"], "released");
}
