//! `cargo xtask bench api`: durable writes against a real release `labrack serve`.
//!
//! Each run starts a fresh server on a temp data dir (timing cold start to `/readyz`),
//! seeds an event with participants, then fires N write requests from C concurrent
//! HTTP/1.1 connections: half participant joins (each creates a session and stamps the
//! participant), half team creations. Every request is a durable, acknowledged SQLite
//! write (synchronous=FULL). Prints requests/s, p50/p99 latency, idle and peak RSS.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::util::{self, cargo, run};

struct Options {
    requests: usize,
    concurrency: usize,
    runs: usize,
}

pub(crate) fn cmd_bench(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("api") => bench_api(parse_options(&args[1..])?),
        Some("reset") => crate::bench_reset::bench_reset(&args[1..]),
        Some("stream") => bench_stream(&args[1..]),
        Some("scoring") => crate::bench_scoring::bench_scoring(&args[1..]),
        Some("sync") => crate::bench_sync::bench_sync(&args[1..]),
        Some("abuse") => crate::bench_abuse::bench_abuse(&args[1..]),
        Some("drill") => crate::bench_drill::bench_drill(&args[1..]),
        other => bail!(
            "unknown benchmark {other:?}; available: api, reset, stream, scoring, sync, abuse, drill"
        ),
    }
}

fn parse_options(args: &[String]) -> anyhow::Result<Options> {
    let mut options = Options {
        requests: 20_000,
        concurrency: 64,
        runs: 3,
    };
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let value: usize = iter
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--requests" => options.requests = value,
            "--concurrency" => options.concurrency = value,
            "--runs" => options.runs = value,
            _ => bail!("unknown option {flag}"),
        }
    }
    anyhow::ensure!(
        options.requests > 0 && options.concurrency > 0 && options.runs > 0,
        "values must be positive"
    );
    Ok(options)
}

struct RunResult {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    cold_start_ms: f64,
    idle_rss_mb: f64,
    peak_rss_mb: f64,
    errors: usize,
}

fn bench_api(options: Options) -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "-p", "labrack"]))?;
    let binary = util::target_dir().join("release/labrack");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    for index in 0..options.runs {
        let result = runtime.block_on(one_run(&binary, &options))?;
        println!(
            "run {}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, cold start {:.0} ms, idle RSS {:.1} MB, peak RSS {:.1} MB, errors {}",
            index + 1,
            result.requests_per_sec,
            result.p50_ms,
            result.p99_ms,
            result.cold_start_ms,
            result.idle_rss_mb,
            result.peak_rss_mb,
            result.errors
        );
        results.push(result);
    }
    let median = |f: fn(&RunResult) -> f64| {
        let mut values: Vec<f64> = results.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    println!(
        "\nbench api: {} durable writes, concurrency {}, median of {} runs",
        options.requests, options.concurrency, options.runs
    );
    println!(
        "  throughput      {:>8.0} req/s   (target >= 2000)",
        median(|r| r.requests_per_sec)
    );
    println!("  latency p50     {:>8.2} ms", median(|r| r.p50_ms));
    println!(
        "  latency p99     {:>8.2} ms      (target <= 50)",
        median(|r| r.p99_ms)
    );
    println!(
        "  cold start      {:>8.0} ms      (to /readyz; target <= 1000)",
        median(|r| r.cold_start_ms)
    );
    println!(
        "  idle RSS        {:>8.1} MB      (target <= 60)",
        median(|r| r.idle_rss_mb)
    );
    println!("  peak RSS        {:>8.1} MB", median(|r| r.peak_rss_mb));
    let errors: usize = results.iter().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

fn rss_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn one_run(binary: &std::path::Path, options: &Options) -> anyhow::Result<RunResult> {
    let data = util::temp_dir("bench")?;
    let spawned = Instant::now();
    let server = util::start_server(binary, &data)?;
    let pid = server.pid();
    let ca = std::fs::read(labrack_e2e::Server::ca_cert(&data))?;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .tls_built_in_root_certs(false)
        .http1_only()
        .pool_max_idle_per_host(options.concurrency)
        .build()?;
    let base = server.url.clone();
    loop {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        if spawned.elapsed() > Duration::from_secs(30) {
            bail!("server not ready after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cold_start_ms = spawned.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss_mb = rss_mb(pid, "VmRSS:");

    // Seed: admin password, one event, 2,000 participants in 20 teams.
    let otp = server
        .admin_password
        .clone()
        .context("no one-time password printed")?;
    let token = login(&client, &base, &otp).await?;
    let auth = format!("Bearer {token}");
    let event: Value = client
        .post(format!("{base}/api/v1/events"))
        .header("authorization", &auth)
        .json(&json!({"name": "Bench", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2026-12-02T09:00:00Z"}))
        .send().await?.error_for_status()?.json().await?;
    let event_id = event["id"].as_i64().context("event id")?;
    let event_code = event["code"].as_str().context("event code")?.to_owned();
    let mut csv = String::from("team,name\n");
    for i in 0..2_000 {
        csv.push_str(&format!("Team {},Participant {i}\n", i % 20));
    }
    let imported: Value = client
        .post(format!(
            "{base}/api/v1/events/{event_id}/participants/import"
        ))
        .header("authorization", &auth)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let codes: Arc<Vec<String>> = Arc::new(
        imported["participants"]
            .as_array()
            .context("participants")?
            .iter()
            .filter_map(|p| p["join_code"].as_str().map(str::to_owned))
            .collect(),
    );

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..options.concurrency {
        // Each connection is its own machine on the venue LAN (127.0.2.N), as participants
        // are: the appliance's per-client limits see 64 clients, not one.
        let octets = u8::try_from(worker % 250).unwrap_or(0);
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .tls_built_in_root_certs(false)
            .http1_only()
            .local_address(std::net::IpAddr::from([127, 0, 2, octets + 1]))
            .build()?;
        let (base, auth, codes, next, event_code) = (
            base.clone(),
            auth.clone(),
            codes.clone(),
            next.clone(),
            event_code.clone(),
        );
        let total = options.requests;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0_usize;
            let mut first_error = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let sent = Instant::now();
                let request = if i % 2 == 0 {
                    client.post(format!("{base}/api/v1/join")).json(
                        &json!({"event_code": event_code, "join_code": codes[i / 2 % codes.len()]}),
                    )
                } else {
                    client
                        .post(format!("{base}/api/v1/events/{event_id}/teams"))
                        .header("authorization", &auth)
                        .json(&json!({"name": format!("Bench team {i}")}))
                };
                match request.send().await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                        latencies.push(sent.elapsed());
                    }
                    other => {
                        errors += 1;
                        if first_error.is_none() {
                            first_error = Some(match other {
                                Ok(response) => format!(
                                    "{} {}",
                                    response.status(),
                                    response.text().await.unwrap_or_default()
                                ),
                                Err(error) => error.to_string(),
                            });
                        }
                    }
                }
            }
            if let Some(error) = first_error {
                eprintln!("bench: worker {worker}: {errors} failed, first: {error}");
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(options.requests);
    let mut errors = 0;
    for worker in workers {
        let (mut l, e) = worker.await?;
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = started.elapsed();
    let peak_rss_mb = rss_mb(pid, "VmHWM:");
    latencies.sort();
    let pct = |p: f64| {
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies
            .get(index)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let result = RunResult {
        requests_per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cold_start_ms,
        idle_rss_mb,
        peak_rss_mb,
        errors,
    };
    anyhow::ensure!(
        server.terminate()?.success(),
        "labrack did not exit cleanly"
    );
    let _ = std::fs::remove_dir_all(&data);
    Ok(result)
}

/// Logs in as admin with the one-time password, sets a new one, returns a bearer token.
async fn login(client: &reqwest::Client, base: &str, otp: &str) -> anyhow::Result<String> {
    let session: Value = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"username": "admin", "password": otp, "bearer": true}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = session["token"].as_str().context("token")?.to_owned();
    client
        .post(format!("{base}/api/v1/auth/password"))
        .header("authorization", format!("Bearer {token}"))
        .json(&json!({"current_password": otp, "new_password": "bench-password-1234"}))
        .send()
        .await?
        .error_for_status()?;
    Ok(token)
}

/// `cargo xtask bench stream`: the encode side (convert + H.264 per frame, bandwidth) on
/// synthetic desktop content, then the end-to-end half (`bench_stream.rs`): concurrent
/// streams, glass-to-glass latency, bandwidth and CPU with real xrdp and Chromium.
/// `--encode-only` / `--e2e-only` run one half.
fn bench_stream(args: &[String]) -> anyhow::Result<()> {
    let mut frames = "300".to_owned();
    let mut runs = 3_usize;
    let (mut encode, mut e2e) = (true, true);
    let mut e2e_options = crate::bench_stream::Options {
        max_streams: 6,
        flips: 30,
        phase_secs: 10,
    };
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let mut number = |name: &str| -> anyhow::Result<usize> {
            iter.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--frames" => frames = number("--frames")?.to_string(),
            "--runs" => runs = number("--runs")?,
            "--max-streams" => e2e_options.max_streams = number("--max-streams")?.max(1),
            "--flips" => e2e_options.flips = number("--flips")?.max(1),
            "--phase-secs" => e2e_options.phase_secs = number("--phase-secs")?.max(1) as u64,
            "--encode-only" => e2e = false,
            "--e2e-only" => encode = false,
            other => bail!("unknown option {other}"),
        }
    }
    if encode {
        bench_encode(&frames, runs)?;
    }
    if e2e {
        crate::bench_stream::bench_stream_e2e(&e2e_options)?;
    }
    Ok(())
}

fn bench_encode(frames: &str, runs: usize) -> anyhow::Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "labrack-streamer",
        "--example",
        "encode_bench",
    ]))?;
    let binary = util::target_dir().join("release/examples/encode_bench");
    let mut all: Vec<Vec<Value>> = Vec::new();
    for index in 0..runs {
        let output = std::process::Command::new(&binary)
            .arg(frames)
            .output()
            .context("running encode_bench")?;
        anyhow::ensure!(
            output.status.success(),
            "encode_bench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        println!(
            "run {}: {}",
            index + 1,
            lines
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n       ")
        );
        all.push(lines);
    }
    println!(
        "\nbench stream (encode side), median of {runs} runs, {frames} frames each, one thread:"
    );
    for (i, first) in all[0].iter().enumerate() {
        let median = |key: &str| {
            let mut values: Vec<f64> = all
                .iter()
                .filter_map(|run| run.get(i)?.get(key)?.as_f64())
                .collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let p50 = median("encode_ms_p50");
        if first["workload"] == "thumbnail" {
            println!(
                "  thumb {:<10} box filter + JPEG p50 {:>6.2} ms  p95 {:>6.2} ms  {:>6.0} bytes  ~{:.0} desktops on a wall (one picture a second each) per core",
                first["size"].as_str().unwrap_or("?"),
                p50,
                median("encode_ms_p95"),
                median("bytes"),
                1000.0 / p50.max(0.001),
            );
            continue;
        }
        println!(
            "  {:<5} {:<10} {:<7} encode p50 {:>6.2} ms  p95 {:>6.2} ms  {:>6.0} kbit/s at 30 fps  ~{:.0} streams at 25 fps per core",
            first["codec"].as_str().unwrap_or("?"),
            first["size"].as_str().unwrap_or("?"),
            first["workload"].as_str().unwrap_or("?"),
            p50,
            median("encode_ms_p95"),
            median("kbit_per_s_at_30fps"),
            1000.0 / (25.0 * p50.max(0.001)),
        );
    }
    Ok(())
}
