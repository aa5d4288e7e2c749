//! `cargo xtask bench scoring`: the scoring queue under a submission wave, and check
//! throughput against a real lab host.
//!
//! 1. **Wave.** A release `labrack serve` on a fresh data dir, an event with 2,000 teams
//!    (one participant each, joined with bearer sessions), then 20,000 submissions (ten
//!    versions per team) from C concurrent connections. Timed from the first request to
//!    the last answer; every submission must be acknowledged (201) and be in SQLite with
//!    its scoring job — counted in the database file afterwards. Then how long the
//!    workers take to turn the 20,000 scoring jobs into (empty: no labs) check batches.
//! 2. **Checks.** The same appliance with N check workers (restarted for each N), the real
//!    `labrack-host` (8 checks at once), T teams with `local-user` labs and a template of
//!    K trivial checks (`true`, each still sandboxed: its own network namespace, limits,
//!    lab user). One batch per N; checks/s from queueing to the last result.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use labrack_e2e::{
    Api, DataDir, LabHost, LabUsers, Server, client_trusting, enrol_host_binary, free_port,
};
use serde_json::{Value, json};

use crate::util::{self, cargo, run};

struct Options {
    teams: usize,
    per_team: usize,
    concurrency: usize,
    runs: usize,
    lab_teams: usize,
    checks: usize,
    workers: Vec<usize>,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut options = Options {
        teams: 2_000,
        per_team: 10,
        concurrency: 64,
        runs: 3,
        lab_teams: 4,
        checks: 25,
        workers: vec![1, 2, 4, 8],
    };
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let value = iter
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .with_context(|| format!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--teams" => options.teams = number()?,
            "--per-team" => options.per_team = number()?,
            "--concurrency" => options.concurrency = number()?,
            "--runs" => options.runs = number()?,
            "--lab-teams" => options.lab_teams = number()?,
            "--checks" => options.checks = number()?,
            "--workers" => {
                options.workers = value
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--workers takes a list like 1,2,4")?
            }
            _ => bail!(
                "unknown option {flag}; options: --teams --per-team --concurrency --runs --lab-teams --checks --workers"
            ),
        }
    }
    anyhow::ensure!(
        options.teams > 0 && options.per_team > 0 && options.concurrency > 0 && options.runs > 0,
        "values must be positive"
    );
    anyhow::ensure!(
        options.teams <= 5_000,
        "--teams: one roster import takes at most 5,000 rows"
    );
    Ok(options)
}

pub(crate) fn bench_scoring(args: &[String]) -> anyhow::Result<()> {
    let options = parse(args)?;
    run(cargo().args(["build", "--release", "-p", "labrack", "-p", "labrack-host"]))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut waves = Vec::new();
    for index in 0..options.runs {
        let wave = runtime.block_on(wave(&options))?;
        println!(
            "run {}: {} submissions accepted in {:.2} s ({:.0}/s), p50 {:.1} ms, p99 {:.1} ms, stored {} with {} jobs; scoring jobs drained in {:.1} s",
            index + 1,
            wave.accepted,
            wave.seconds,
            wave.accepted as f64 / wave.seconds,
            wave.p50_ms,
            wave.p99_ms,
            wave.stored,
            wave.jobs,
            wave.drain_seconds
        );
        waves.push(wave);
    }
    let median = |f: fn(&Wave) -> f64| {
        let mut values: Vec<f64> = waves.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let total = options.teams * options.per_team;
    println!(
        "\nbench scoring: wave of {total} submissions from {} teams, concurrency {}, median of {} runs",
        options.teams, options.concurrency, options.runs
    );
    println!(
        "  accepted in     {:>8.2} s     (target <= 30 s, none lost)",
        median(|w| w.seconds)
    );
    println!(
        "  throughput      {:>8.0} /s",
        median(|w| w.accepted as f64 / w.seconds)
    );
    println!("  latency p50     {:>8.1} ms", median(|w| w.p50_ms));
    println!("  latency p99     {:>8.1} ms", median(|w| w.p99_ms));
    println!(
        "  jobs drained in {:>8.1} s     (20,000 scoring jobs → check batches, 4 workers)",
        median(|w| w.drain_seconds)
    );
    if options.lab_teams > 0 && options.checks > 0 {
        runtime.block_on(checks(&options))?;
    }
    Ok(())
}

struct Wave {
    accepted: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    stored: i64,
    jobs: i64,
    drain_seconds: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn db(data: &Path) -> anyhow::Result<rusqlite::Connection> {
    Ok(rusqlite::Connection::open_with_flags(
        data.join("labrack.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?)
}

async fn admin_of(server: &Server, data: &Path) -> anyhow::Result<Api> {
    let mut admin = Api {
        client: client_trusting(data)?,
        base: server.url.clone(),
        token: None,
    };
    admin
        .first_admin_login(
            server
                .admin_password
                .as_deref()
                .context("no one-time password")?,
            "a-strong-admin-password",
        )
        .await?;
    Ok(admin)
}

/// An event that is live now and ends tomorrow.
async fn live_event(admin: &Api, name: &str) -> anyhow::Result<(i64, String)> {
    let (status, event) = admin.post("/api/v1/events", json!({"name": name, "starts_at": "2026-01-01T09:00:00Z", "ends_at": "2099-01-01T09:00:00Z"})).await?;
    anyhow::ensure!(status == 201, "{event}");
    let id = event["id"].as_i64().context("event id")?;
    let (status, body) = admin
        .post(
            &format!("/api/v1/events/{id}/transition"),
            json!({"to": "live"}),
        )
        .await?;
    anyhow::ensure!(status == 200, "{body}");
    Ok((id, event["code"].as_str().context("code")?.to_owned()))
}

async fn wave(options: &Options) -> anyhow::Result<Wave> {
    let binary = util::target_dir().join("release/labrack");
    let data = DataDir::new("bench-scoring");
    let server = Server::start_binary(&binary, &data.0, "127.0.0.1:0", &[])?;
    let admin = admin_of(&server, &data.0).await?;
    let (event_id, code) = live_event(&admin, "Wave").await?;
    let mut roster = String::from("team,name,email\n");
    for n in 0..options.teams {
        roster.push_str(&format!("Team {n:04},Member {n:04},\n"));
    }
    let (status, imported) = admin
        .post_csv(
            &format!("/api/v1/events/{event_id}/participants/import"),
            &roster,
        )
        .await?;
    anyhow::ensure!(status == 200, "import: {imported}");
    let codes: Vec<String> = imported["participants"]
        .as_array()
        .context("participants")?
        .iter()
        .filter_map(|p| p["join_code"].as_str().map(str::to_owned))
        .collect();
    anyhow::ensure!(
        codes.len() == options.teams,
        "imported {} of {}",
        codes.len(),
        options.teams
    );
    let client = admin.client.clone();
    let base = server.url.trim_end_matches('/').to_owned();
    // Each team's participant joins (a bearer session per team).
    let mut tokens = Vec::with_capacity(codes.len());
    for chunk in codes.chunks(32) {
        let joins: Vec<_> = chunk
            .iter()
            .map(|join_code| {
                let (client, base, code, join_code) = (
                    client.clone(),
                    base.clone(),
                    code.clone(),
                    join_code.clone(),
                );
                tokio::spawn(async move {
                    let response = client
                        .post(format!("{base}/api/v1/join"))
                        .json(&json!({"event_code": code, "join_code": join_code, "bearer": true}))
                        .send()
                        .await?;
                    let body: Value = response.json().await?;
                    body["token"]
                        .as_str()
                        .map(str::to_owned)
                        .context("join gave no token")
                })
            })
            .collect();
        for join in joins {
            tokens.push(join.await??);
        }
    }
    // The wave: every team submits `per_team` versions, spread over `concurrency` tasks.
    let work: Arc<Vec<(String, String)>> = Arc::new(
        (0..options.per_team)
            .flat_map(|v| tokens.iter().map(move |t| (t.clone(), format!("v{v}"))))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..options.concurrency {
        let (client, base, work, next) = (client.clone(), base.clone(), work.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some((token, version)) = work.get(index) else {
                    break;
                };
                let sent = Instant::now();
                let response = client
                    .post(format!("{base}/api/v1/me/submissions"))
                    .bearer_auth(token)
                    .json(&json!({"version": version}))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().as_u16() == 201 => {
                        latencies.push(sent.elapsed().as_secs_f64() * 1000.0)
                    }
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    for task in tasks {
        let (mut l, f) = task.await?;
        latencies.append(&mut l);
        failures += f;
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        failures == 0,
        "{failures} submissions were not acknowledged"
    );
    latencies.sort_by(f64::total_cmp);
    let conn = db(&data.0)?;
    let stored: i64 = conn.query_row("SELECT count(*) FROM submissions", [], |r| r.get(0))?;
    let jobs: i64 = conn.query_row(
        "SELECT count(*) FROM jobs WHERE kind = 'score_submission'",
        [],
        |r| r.get(0),
    )?;
    anyhow::ensure!(
        stored == work.len() as i64 && jobs == stored,
        "lost work: {stored} stored, {jobs} jobs for {} accepted",
        work.len()
    );
    let drain_started = Instant::now();
    loop {
        let open: i64 = conn.query_row(
            "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')",
            [],
            |r| r.get(0),
        )?;
        if open == 0 {
            break;
        }
        anyhow::ensure!(
            drain_started.elapsed() < Duration::from_secs(600),
            "{open} scoring jobs still open after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    drop(server);
    Ok(Wave {
        accepted: latencies.len(),
        seconds,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        stored,
        jobs,
        drain_seconds,
    })
}

async fn checks(options: &Options) -> anyhow::Result<()> {
    let target = util::target_dir().join("release");
    let data = DataDir::new("bench-checks");
    let skeletons = DataDir::new("bench-checks-skel");
    let skeleton = skeletons.0.join("bench");
    std::fs::create_dir_all(&skeleton)?;
    std::fs::write(skeleton.join("README.txt"), "bench\n")?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let start = |workers: usize| {
        Server::start_binary(
            &target.join("labrack"),
            &data.0,
            &listen,
            &[
                "--host-heartbeat-secs",
                "2",
                "--check-workers",
                &workers.to_string(),
            ],
        )
    };
    let mut server = start(options.workers.first().copied().unwrap_or(4))?;
    let admin = admin_of(&server, &data.0).await?;
    let (event_id, _) = live_event(&admin, "Checks").await?;
    let mut template = format!(
        "[[template]]\nname = \"bench\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n",
        skeleton.display()
    );
    for n in 0..options.checks {
        template.push_str(&format!("[[template.check]]\nname = \"c{n}\"\nscript = \"true\"\ntimeout_secs = 10\ndimension = \"quality\"\n"));
    }
    let (status, body) = admin.put_toml("/api/v1/templates", &template).await?;
    anyhow::ensure!(status == 200, "{body}");
    let (_, token) = admin
        .post("/api/v1/hosts/enrolment-tokens", json!({}))
        .await?;
    let state = DataDir::new("bench-checks-host");
    let host_bin = target.join("labrack-host");
    let (ok, text) = enrol_host_binary(
        &host_bin,
        &server.url,
        &data.0,
        token["token"].as_str().context("token")?,
        "bench-host",
        &state.0,
    )?;
    anyhow::ensure!(ok, "{text}");
    let users = LabUsers::new();
    let host = LabHost::start_binary(
        &host_bin,
        &state.0,
        &users,
        &skeletons.0,
        &[("LABRACK_HOST_QUIET", "1")],
        &["--check-concurrency", "8"],
    )?;
    for n in 0..options.lab_teams {
        let (_, team) = admin
            .post(
                &format!("/api/v1/events/{event_id}/teams"),
                json!({"name": format!("Lab team {n}")}),
            )
            .await?;
        let team_id = team["id"].as_i64().context("team")?;
        let (status, alloc) = admin
            .post(
                &format!("/api/v1/teams/{team_id}/allocation"),
                json!({"template": "bench"}),
            )
            .await?;
        anyhow::ensure!(status == 201, "{alloc}");
        let id = alloc["id"].as_i64().context("allocation")?;
        admin
            .wait_for(
                &format!("/api/v1/allocations/{id}"),
                Duration::from_secs(60),
                |a| a["state"] == "active" && a["busy"] == false,
            )
            .await?;
    }
    let runs = options.lab_teams * options.checks;
    println!(
        "\nchecks: {} teams × {} checks = {runs} sandboxed runs per batch on one lab host (8 at once)",
        options.lab_teams, options.checks
    );
    for (index, workers) in options.workers.iter().enumerate() {
        if index > 0 {
            server.terminate()?;
            server = start(*workers)?;
        }
        let admin = Api {
            client: client_trusting(&data.0)?,
            base: server.url.clone(),
            token: admin.token.clone(),
        };
        let mut rates = Vec::new();
        for _ in 0..options.runs {
            let started = Instant::now();
            let (status, queued) = admin
                .post(
                    &format!("/api/v1/events/{event_id}/check-batches"),
                    json!({"reason": format!("bench {workers} workers")}),
                )
                .await?;
            anyhow::ensure!(status == 201 && queued["queued"] == runs, "{queued}");
            let batch = queued["batch_id"].as_i64().context("batch")?;
            let done = admin
                .wait_for(
                    &format!("/api/v1/check-batches/{batch}"),
                    Duration::from_secs(600),
                    |b| b["done"] == true,
                )
                .await?;
            let seconds = started.elapsed().as_secs_f64();
            anyhow::ensure!(
                done["counts"]["passed"] == runs,
                "not every check passed: {done}"
            );
            rates.push(runs as f64 / seconds);
        }
        rates.sort_by(f64::total_cmp);
        let shown: Vec<String> = rates.iter().map(|r| format!("{r:.1}")).collect();
        println!(
            "  {workers} worker(s): median {:.1} checks/s over {} batches ({})",
            rates[rates.len() / 2],
            rates.len(),
            shown.join(", ")
        );
    }
    drop(host);
    drop(server);
    Ok(())
}
