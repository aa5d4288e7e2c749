//! A stranger on the venue LAN against the real `labrack serve`: connections that never
//! finish a request, and a burst of logins with random usernames. The appliance must stay
//! up and answer everyone else at once, close the slow connections, run argon2 only for the
//! few attempts its limits allow, and keep its memory small; junk methods, a readiness-probe
//! storm and a roster bomb change nothing.
//!
//! Each attacker and each honest client has its own loopback address (127.0.0.N), as
//! machines on a LAN have: the caps are per client.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use labrack_e2e::{Api, DataDir, Server, tls_connector};
use serde_json::json;
use tokio::io::AsyncReadExt as _;

fn client_from(data_dir: &std::path::Path, from: &str) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(data_dir.join("tls/ca.pem"))?;
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .tls_built_in_root_certs(false)
        .local_address(from.parse::<IpAddr>()?)
        .timeout(Duration::from_secs(30))
        .build()?)
}

fn server_addr(server: &Server) -> anyhow::Result<SocketAddr> {
    Ok(server.url.trim_start_matches("https://").parse()?)
}

/// Whether the server has closed `stream` (a read gives EOF or an error within `wait`).
async fn closed(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut byte = [0_u8; 1];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The server's peak resident memory (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> anyhow::Result<u64> {
    labrack_e2e::process_memory_mib(pid, "VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_are_capped_per_client_and_closed_while_others_are_served()
-> anyhow::Result<()> {
    let data = DataDir::new("abuse-slow");
    let server = Server::start_with(
        &data.0,
        "127.0.0.1:0",
        &[
            "--max-connections-per-client",
            "16",
            "--header-timeout-secs",
            "2",
        ],
    )?;
    let addr = server_addr(&server)?;
    let honest = client_from(&data.0, "127.0.0.9")?;

    // 60 connections from one stranger that never send a byte
    let mut silent = Vec::new();
    for _ in 0..60 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.2:0".parse()?)?;
        silent.push(socket.connect(addr).await?);
    }
    let mut refused = 0;
    for stream in &mut silent {
        if closed(stream, Duration::from_millis(300)).await {
            refused += 1;
        }
    }
    assert!(
        refused >= 44,
        "beyond 16 per client, connections are closed at once ({refused} of 60 were)"
    );
    // everyone else is served meanwhile
    let health = honest.get(format!("{}/healthz", server.url)).send().await?;
    assert_eq!(health.status(), 200);
    // and an honest kept-alive connection may idle past the 2 s header timeout (the idle
    // timeout is longer than clients keep idle connections, so they never send into one
    // being closed)
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        honest
            .get(format!("{}/healthz", server.url))
            .send()
            .await?
            .status(),
        200
    );
    // the stranger's 16 admitted connections were closed when their handshake timed out
    let mut still_open = 0;
    for stream in &mut silent {
        if !closed(stream, Duration::from_millis(200)).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "silent connections outlived the 2 s timeout");

    // a connection that finishes its handshake but sends its headers too slowly is closed too
    let connector = tls_connector(&data.0)?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.3:0".parse()?)?;
    let tcp = socket.connect(addr).await?;
    let mut tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned(),
            tcp,
        )
        .await?;
    tokio::io::AsyncWriteExt::write_all(&mut tls, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await?;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "a request whose headers never end is closed within the header timeout"
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "it was never answered as a request"
    );

    // and the stranger may connect again once it behaves
    let stranger = client_from(&data.0, "127.0.0.2")?;
    assert_eq!(
        stranger
            .get(format!("{}/healthz", server.url))
            .send()
            .await?
            .status(),
        200
    );
    let metrics = honest
        .get(format!("{}/metrics", server.url))
        .send()
        .await?
        .text()
        .await?;
    let refused_metric = metrics
        .lines()
        .find(|l| l.starts_with("labrack_connections_refused_total "))
        .unwrap_or_default()
        .to_owned();
    assert!(
        refused_metric
            .split(' ')
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= 44),
        "{refused_metric}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_runs_argon2_only_within_the_limits_and_the_admin_still_gets_in()
-> anyhow::Result<()> {
    let data = DataDir::new("abuse-login");
    let server = Server::start(&data.0, "127.0.0.1:0")?;
    let otp = server.admin_password.clone().expect("otp");
    let mut admin = Api {
        client: client_from(&data.0, "127.0.0.9")?,
        base: server.url.clone(),
        token: None,
    };
    admin
        .first_admin_login(&otp, "a-strong-admin-password")
        .await?;
    let rss_before = peak_rss_mib(server.pid())?;

    // 300 logins at once with random usernames, 15 from each of 20 strangers
    let strangers: Vec<reqwest::Client> = (1..=20)
        .map(|n| client_from(&data.0, &format!("127.0.1.{n}")))
        .collect::<Result<_, _>>()?;
    let attempts = (0..300).map(|n| {
        let stranger = strangers[n % strangers.len()].clone();
        let url = format!("{}/api/v1/auth/login", server.url);
        async move {
            let reply = stranger.post(url).json(&json!({"username": format!("user{n}-{}", rand::random::<u32>()), "password": "guess-guess-guess"})).send().await?;
            let status = reply.status().as_u16();
            let content_type = reply.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let retry_after = reply.headers().get("retry-after").is_some();
            anyhow::Ok((status, content_type, retry_after))
        }
    });
    // the signed-in admin keeps working while the flood runs: no argon2 on its path
    let honest = async {
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let started = std::time::Instant::now();
            let (status, _) = admin.get("/api/v1/events").await?;
            anyhow::ensure!(
                status == 200,
                "the admin was refused during the flood: {status}"
            );
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(slowest)
    };
    let (results, slowest) = tokio::join!(futures_util::future::join_all(attempts), honest);
    let slowest = slowest?;
    let mut counts = std::collections::BTreeMap::<u16, usize>::new();
    for result in results {
        let (status, content_type, retry_after) = result?;
        *counts.entry(status).or_default() += 1;
        assert_eq!(content_type, "application/problem+json", "status {status}");
        if status == 429 || status == 503 {
            assert!(retry_after, "a refusal says when to retry");
        }
    }
    assert!(
        counts.keys().all(|s| [401, 429, 503].contains(s)),
        "{counts:?}"
    );
    assert!(
        counts.get(&401).copied().unwrap_or(0) <= 200,
        "at most ten guesses per stranger reach argon2: {counts:?}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "an honest request took {slowest:?} during the flood"
    );
    let rss_after = peak_rss_mib(server.pid())?;
    assert!(
        rss_after < rss_before + 200,
        "peak memory grew from {rss_before} MiB to {rss_after} MiB"
    );
    // nor did it lock the admin out: a fresh login works once the pool has drained
    tokio::time::sleep(Duration::from_secs(2)).await;
    admin.login("admin", "a-strong-admin-password").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoreboard_crowd_is_capped_per_client_and_every_stream_gets_the_board()
-> anyhow::Result<()> {
    let data = DataDir::new("abuse-board");
    let server = Server::start(&data.0, "127.0.0.1:0")?;
    let otp = server.admin_password.clone().expect("otp");
    let mut admin = Api {
        client: client_from(&data.0, "127.0.0.9")?,
        base: server.url.clone(),
        token: None,
    };
    admin
        .first_admin_login(&otp, "a-strong-admin-password")
        .await?;
    let (_, event) = admin.post("/api/v1/events", json!({"name": "Crowd", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})).await?;
    let event_id = event["id"].as_i64().expect("id");
    let (status, _) = admin
        .post(
            &format!("/api/v1/events/{event_id}/transition"),
            json!({"to": "live"}),
        )
        .await?;
    assert_eq!(status, 200);
    let url = format!("{}/api/v1/events/{event_id}/scoreboard/stream", server.url);
    // One phone-wielding stranger opens streams until refused.
    let crowd = client_from(&data.0, "127.0.4.1")?;
    let mut open = Vec::new();
    for _ in 0..16 {
        let mut reply = crowd.get(&url).send().await?;
        assert_eq!(reply.status().as_u16(), 200);
        let first = tokio::time::timeout(Duration::from_secs(10), reply.chunk())
            .await??
            .unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&first).contains("event: board"),
            "every stream starts with the board"
        );
        open.push(reply);
    }
    let refused = crowd.get(&url).send().await?;
    assert_eq!(
        refused.status().as_u16(),
        429,
        "the 17th stream from one client is refused"
    );
    assert!(refused.headers().get("retry-after").is_some());
    assert_eq!(
        refused
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    // Another client still gets its board, and so does the projector's plain GET.
    let other = client_from(&data.0, "127.0.4.2")?;
    assert_eq!(other.get(&url).send().await?.status().as_u16(), 200);
    let board = other
        .get(format!(
            "{}/api/v1/events/{event_id}/scoreboard",
            server.url
        ))
        .send()
        .await?;
    assert_eq!(board.status().as_u16(), 200);
    let body: serde_json::Value = board.json().await?;
    assert_eq!(body["event"], "Crowd");
    // A closed stream gives its place back.
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = crowd.get(&url).send().await?;
        if again.status().as_u16() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the closed stream's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A counter's value in a Prometheus text exposition (0 when absent).
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_a_readiness_storm_and_a_roster_of_blank_rows_change_nothing()
-> anyhow::Result<()> {
    let data = DataDir::new("abuse-junk");
    let server = Server::start(&data.0, "127.0.0.1:0")?;
    let otp = server.admin_password.clone().expect("otp");
    let mut admin = Api {
        client: client_from(&data.0, "127.0.0.9")?,
        base: server.url.clone(),
        token: None,
    };
    admin
        .first_admin_login(&otp, "a-strong-admin-password")
        .await?;
    let (_, event) = admin.post("/api/v1/events", json!({"name": "Junk", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})).await?;
    let event_id = event["id"].as_i64().expect("id");
    let stranger = client_from(&data.0, "127.0.5.1")?;
    let metrics_text = || async {
        anyhow::Ok(
            admin
                .client
                .get(format!("{}/metrics", server.url))
                .send()
                .await?
                .text()
                .await?,
        )
    };
    let label_sets = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("labrack_http_requests_total{"))
            .count()
    };

    // 300 requests, each with a method of its own: answered, and never a metrics key
    for n in 0..300 {
        let method = reqwest::Method::from_bytes(format!("AAAA{n:04}").as_bytes())?;
        let reply = stranger
            .request(method, format!("{}/api/v1/events", server.url))
            .send()
            .await?;
        assert!(reply.status().is_client_error(), "{}", reply.status());
    }
    let metrics = metrics_text().await?;
    assert!(
        !metrics.contains("AAAA"),
        "invented methods are not metric labels"
    );
    assert!(
        label_sets(&metrics) < 20,
        "the request counter has a few label sets, not one per method: {}",
        label_sets(&metrics)
    );

    // 400 readiness probes at once: each answered, the database probed about once a second
    let writes_before = counter(&metrics, "labrack_writer_jobs_total");
    let started = std::time::Instant::now();
    // from 8 addresses: 50 connections each stay within the per-client cap
    let probers: Vec<reqwest::Client> = (1..=8)
        .map(|n| client_from(&data.0, &format!("127.0.5.{}", 10 + n)))
        .collect::<Result<_, _>>()?;
    let probes = (0..400).map(|n| {
        let (stranger, url) = (probers[n % 8].clone(), format!("{}/readyz", server.url));
        async move { anyhow::Ok(stranger.get(url).send().await?.status().as_u16()) }
    });
    for status in futures_util::future::join_all(probes).await {
        assert_eq!(status?, 200);
    }
    let seconds = started.elapsed().as_secs();
    let writes = counter(&metrics_text().await?, "labrack_writer_jobs_total") - writes_before;
    assert!(
        writes <= seconds + 2,
        "{writes} writes for 400 probes in {seconds} s: the probe is shared"
    );

    // A roster of 500,000 blank rows: parsed in linear time off the async workers, it imports
    // nobody, and everyone else is answered meanwhile.
    let mut bomb = String::from("team,name,email\n");
    bomb.push_str(&"\n".repeat(500_000));
    let import_path = format!("/api/v1/events/{event_id}/participants/import");
    let import = admin.post_csv(&import_path, &bomb);
    let honest = async {
        let mut slowest = Duration::ZERO;
        for _ in 0..10 {
            let sent = std::time::Instant::now();
            let (status, _) = admin.get("/api/v1/events").await?;
            anyhow::ensure!(status == 200, "refused during the import: {status}");
            slowest = slowest.max(sent.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(slowest)
    };
    let ((status, body), slowest) = {
        let (import, honest) = tokio::join!(import, honest);
        (import?, honest?)
    };
    assert!(
        status == 422 || (status == 200 && body["imported"] == 0),
        "{status} {body}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "an honest request took {slowest:?}"
    );
    let (_, participants) = admin
        .get(&format!("/api/v1/events/{event_id}/participants"))
        .await?;
    assert_eq!(
        participants["participants"].as_array().map(Vec::len),
        Some(0),
        "{participants}"
    );
    let (_, teams) = admin
        .get(&format!("/api/v1/events/{event_id}/teams"))
        .await?;
    assert_eq!(teams["teams"].as_array().map(Vec::len), Some(0), "{teams}");
    Ok(())
}
