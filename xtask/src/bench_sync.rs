//! `cargo xtask bench sync`: the outbox over QUIC to `labrack-cloud`, on loopback.
//!
//! 1. **Throughput.** A fresh appliance data dir gets N outbox rows (ledger-sized JSON)
//!    written straight into its SQLite file while the appliance is stopped; a fresh cloud is
//!    started and enrols it; the appliance starts and the clock runs from the link coming up
//!    until the cloud acknowledges the last row. Several runs; the median is reported.
//! 2. **Lag while writing.** With the link up, a writer adds teams through the API (one
//!    outbox row each) for a while; the oldest unacknowledged row's age is sampled every
//!    100 ms (`GET /api/v1/sync`).
//! 3. **Partition.** The link runs through a UDP fault proxy that cuts it for P seconds
//!    while the writer keeps going; then the time until nothing is pending is measured.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use labrack_e2e::cloud::Cloud;
use labrack_e2e::{Api, DataDir, Faults, Server, UdpFaultProxy, client_trusting, free_port};
use serde_json::{Value, json};

use crate::util::{self, cargo, run};

struct Options {
    rows: usize,
    runs: usize,
    partition_secs: u64,
    write_secs: u64,
}

pub(crate) fn bench_sync(args: &[String]) -> anyhow::Result<()> {
    let mut options = Options {
        rows: 1_000_000,
        runs: 3,
        partition_secs: 60,
        write_secs: 20,
    };
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let value: u64 = iter
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--rows" => options.rows = usize::try_from(value)?,
            "--runs" => options.runs = usize::try_from(value)?,
            "--partition-secs" => options.partition_secs = value,
            "--write-secs" => options.write_secs = value,
            other => bail!(
                "unknown option {other}; options: --rows --runs --partition-secs --write-secs"
            ),
        }
    }
    anyhow::ensure!(
        options.rows > 0 && options.runs > 0,
        "values must be positive"
    );
    run(cargo().args(["build", "--release", "-p", "labrack", "-p", "labrack-cloud"]))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench(&options))
}

fn labrack() -> std::path::PathBuf {
    util::target_dir().join("release/labrack")
}

fn labrack_cloud() -> std::path::PathBuf {
    util::target_dir().join("release/labrack-cloud")
}

fn start_cloud(data: &Path, port: u16) -> anyhow::Result<Cloud> {
    Cloud::start_binary(&labrack_cloud(), data, port)
}

fn enrol_token(data: &Path) -> anyhow::Result<String> {
    labrack_e2e::cloud::enrol_token_binary(&labrack_cloud(), data)
}

/// Makes the appliance's database (by starting it once) and writes `rows` outbox rows;
/// returns the first admin's one-time password.
fn seed_outbox(data: &Path, rows: usize) -> anyhow::Result<String> {
    let server = Server::start_binary(&labrack(), data, "127.0.0.1:0", &[])?;
    let otp = server
        .admin_password
        .clone()
        .context("no one-time password")?;
    server.terminate()?;
    let mut conn = rusqlite::Connection::open(data.join("labrack.db"))?;
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO outbox (kind, entity, body, created_ms) VALUES ('ledger', ?1, ?2, ?3)",
        )?;
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis(),
        )?;
        for n in 0..rows {
            let body = format!(
                r#"{{"id":{n},"event_id":1,"team_id":{},"kind":"gpu_hours","quantity":0.25,"unit":"GPU-hours","amount_cents":-25,"reference":"allocation:{}:window:{n}","note":"lab {}: 1 GPU(s) for 0.25 h","at_ms":{now}}}"#,
                n % 2000,
                n % 2000,
                n % 2000
            );
            insert.execute(rusqlite::params![format!("ledger:{n}"), body, now])?;
        }
    }
    tx.commit()?;
    Ok(otp)
}

async fn sync_view(api: &Api) -> Option<Value> {
    match api.get("/api/v1/sync").await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

async fn admin_of(server: &Server, data: &Path, otp: Option<&str>) -> anyhow::Result<Api> {
    let mut admin = Api {
        client: client_trusting(data)?,
        base: server.url.clone(),
        token: None,
    };
    let otp = otp
        .or(server.admin_password.as_deref())
        .context("no one-time password")?;
    admin
        .first_admin_login(otp, "a-strong-admin-password")
        .await?;
    Ok(admin)
}

/// One throughput run: seconds from the link coming up to the last row acknowledged.
async fn throughput(rows: usize) -> anyhow::Result<f64> {
    let cloud_data = DataDir::new("bench-sync-cloud");
    let data = DataDir::new("bench-sync");
    let otp = seed_outbox(&data.0, rows)?;
    let port = free_port()?;
    let _cloud = start_cloud(&cloud_data.0, port)?;
    let token = enrol_token(&cloud_data.0)?;
    let ca = cloud_data.0.join("tls/ca.pem");
    let server = Server::start_binary(
        &labrack(),
        &data.0,
        "127.0.0.1:0",
        &[
            "--cloud",
            &format!("127.0.0.1:{port}"),
            "--cloud-ca",
            ca.to_str().context("utf8")?,
            "--cloud-token",
            &token,
        ],
    )?;
    let admin = admin_of(&server, &data.0, Some(&otp)).await?;
    let target = i64::try_from(rows)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(view) = sync_view(&admin).await
            && view["link"]["acked"]
                .as_i64()
                .is_some_and(|acked| acked >= target)
        {
            // From the moment the appliance saw the link up (its own clock) to now.
            let linked = view["link"]["linked_since_ms"]
                .as_i64()
                .context("linked_since_ms")?;
            let now = i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis(),
            )?;
            return Ok((now - linked) as f64 / 1000.0);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{rows} rows did not sync within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn bench(options: &Options) -> anyhow::Result<()> {
    let mut rates = Vec::new();
    for index in 0..options.runs {
        let seconds = throughput(options.rows).await?;
        let rate = options.rows as f64 / seconds;
        println!(
            "run {}: {} rows in {seconds:.2} s = {rate:.0} rows/s",
            index + 1,
            options.rows
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);

    // Lag and partition, through the fault proxy.
    let cloud_data = DataDir::new("bench-sync-cloud-lag");
    let data = DataDir::new("bench-sync-lag");
    let port = free_port()?;
    let cloud = start_cloud(&cloud_data.0, port)?;
    let proxy = UdpFaultProxy::start(format!("127.0.0.1:{port}").parse()?).await?;
    let token = enrol_token(&cloud_data.0)?;
    let ca = cloud_data.0.join("tls/ca.pem");
    let server = Server::start_binary(
        &labrack(),
        &data.0,
        "127.0.0.1:0",
        &[
            "--cloud",
            &format!("127.0.0.1:{}", proxy.port),
            "--cloud-ca",
            ca.to_str().context("utf8")?,
            "--cloud-token",
            &token,
        ],
    )?;
    let admin = admin_of(&server, &data.0, None).await?;
    let (_, event) = admin.post("/api/v1/events", json!({"name": "Bench", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})).await?;
    let event_id = event["id"].as_i64().context("event")?;
    let writer = {
        let api = Api {
            client: admin.client.clone(),
            base: admin.base.clone(),
            token: admin.token.clone(),
        };
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                // 50 teams a request, about 10 requests a second: ~500 rows/s.
                let mut roster = String::from("team,name,email\n");
                for k in 0..50 {
                    roster.push_str(&format!("T{n}-{k},M{n}-{k},\n"));
                }
                let _ = api
                    .post_csv(
                        &format!("/api/v1/events/{event_id}/participants/import"),
                        &roster,
                    )
                    .await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut ages = Vec::new();
    let sampled = Instant::now();
    while sampled.elapsed() < Duration::from_secs(options.write_secs) {
        if let Some(view) = sync_view(&admin).await
            && view["link"]["state"] == "linked"
        {
            ages.push(view["pending_age_ms"].as_f64().unwrap_or(0.0));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ages.sort_by(f64::total_cmp);
    let pick = |values: &[f64], q: f64| {
        if values.is_empty() {
            f64::NAN
        } else {
            values[((values.len() - 1) as f64 * q).round() as usize]
        }
    };
    proxy.set(Faults {
        partitioned: true,
        ..Faults::default()
    });
    tokio::time::sleep(Duration::from_secs(options.partition_secs)).await;
    let backlog = sync_view(&admin)
        .await
        .and_then(|v| v["pending_rows"].as_i64())
        .unwrap_or(0);
    proxy.set(Faults::default());
    let healed = Instant::now();
    writer.abort();
    let catch_up = loop {
        if let Some(view) = sync_view(&admin).await
            && view["pending_rows"] == 0
            && view["link"]["state"] == "linked"
        {
            break healed.elapsed().as_secs_f64();
        }
        anyhow::ensure!(
            healed.elapsed() < Duration::from_secs(300),
            "no catch-up within 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(server);
    drop(cloud);

    println!(
        "\nbench sync: {} rows over loopback QUIC, median of {} runs",
        options.rows, options.runs
    );
    println!(
        "  throughput        {:>9.0} rows/s   (target >= 50000)",
        rates[rates.len() / 2]
    );
    println!(
        "  lag while writing p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} samples (~500 rows/s written; target <= 1000 ms)",
        pick(&ages, 0.5),
        pick(&ages, 0.99),
        pick(&ages, 1.0),
        ages.len()
    );
    println!(
        "  partition         {} s, {backlog} rows waiting when it healed; caught up {catch_up:.1} s after",
        options.partition_secs
    );
    Ok(())
}
