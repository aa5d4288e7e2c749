//! `cargo xtask bench abuse`: the appliance under attack from the venue LAN while an event
//! runs normally.
//!
//! A release `labrack serve` and four real `labrack-host` agents (heartbeats every 2 s), an
//! event of 200 participants in 50 teams, each participant on its own loopback address
//! (127.0.1.N, as laptops on a LAN are) polling its view once a second and each team's first
//! member submitting a new version every 12 s. One team has a lab (a real box with its sshd
//! and xrdp) for the flooding participant. Phases, each `--phase-secs` long, the honest load
//! running throughout:
//!
//! 0. baseline;
//! 1. logins: 1,000 concurrent unauthenticated logins with random usernames from 40 addresses;
//! 2. slow connections: 5,000 connections from 100 addresses that never finish a request
//!    (reopened as the appliance closes them);
//! 3. terminal flood: one participant types into a terminal blocked in `sleep 1d` as fast
//!    as the socket takes it, with alternating resizes;
//! 4. desktop flood: Debian's Chromium floods the lab's desktop with input, clipboard and
//!    alternating 4K/VGA resize messages (`web/e2e/flood-desktop.mjs`);
//! 5. scoreboard crowd: 2,000 streams of the public scoreboard from 125 addresses;
//! 6. after: the honest load alone again.
//!
//! Measured: the honest requests' p50/p99 and failures per phase, heartbeats missed (a gap
//! between two heartbeats the appliance stored longer than twice the interval, or a host
//! marked unhealthy), the appliance's peak RSS (VmHWM) and whether it is still up.
//!
//! The attackers (this process's attack runtime and Chromium) would be other people's
//! laptops at a venue; here they share the two cores, so they run in a CPU cgroup of the
//! lowest weight (`cpu_groups.rs`) while the honest clients run on a runtime of their own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use labrack_e2e::{
    Api, DataDir, LabHost, LabUsers, Server, client_trusting, enrol_host_binary, websocket_from,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::cpu_groups::AttackerGroup;
use crate::util::{self, cargo, run};

const PHASES: [&str; 7] = [
    "baseline",
    "logins",
    "slow connections",
    "terminal flood",
    "desktop flood",
    "scoreboard crowd",
    "after",
];
const HEARTBEAT_SECS: u64 = 2;

struct Options {
    participants: usize,
    hosts: usize,
    phase_secs: u64,
    logins: usize,
    slow: usize,
    streams: usize,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut options = Options {
        participants: 200,
        hosts: 4,
        phase_secs: 20,
        logins: 1_000,
        slow: 5_000,
        streams: 2_000,
    };
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let value = iter
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let number = value
            .parse::<usize>()
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--participants" => options.participants = number,
            "--hosts" => options.hosts = number,
            "--phase-secs" => options.phase_secs = number as u64,
            "--logins" => options.logins = number,
            "--slow" => options.slow = number,
            "--streams" => options.streams = number,
            _ => bail!(
                "unknown option {flag}; options: --participants --hosts --phase-secs --logins --slow --streams"
            ),
        }
    }
    anyhow::ensure!(
        options.participants >= 4 && options.participants <= 250,
        "--participants: 4 to 250 (one loopback address each)"
    );
    anyhow::ensure!(
        options.hosts >= 1 && options.phase_secs >= 5,
        "--hosts at least 1, --phase-secs at least 5"
    );
    Ok(options)
}

pub(crate) fn bench_abuse(args: &[String]) -> anyhow::Result<()> {
    let options = parse(args)?;
    run(cargo().args(["build", "--release", "-p", "labrack", "-p", "labrack-host"]))?;
    // The honest clients on a runtime of their own at the normal weight, made before this
    // thread joins the attackers.
    let honest = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("honest")
        .enable_all()
        .build()?;
    let group = Arc::new(AttackerGroup::create());
    let attacker_threads = group.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("attack")
        .on_thread_start(move || attacker_threads.enter_current_thread())
        .enable_all()
        .build()?;
    // orchestration and attacks run here, on this thread and the attack runtime's
    group.enter_current_thread();
    let result = runtime.block_on(bench(&options, honest.handle(), &group));
    drop(runtime);
    drop(honest);
    drop(group);
    result
}

/// A client of the appliance from its own loopback address.
fn client_from(data: &Path, local: IpAddr) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(data.join("tls/ca.pem"))?;
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .tls_built_in_root_certs(false)
        .local_address(local)
        .timeout(Duration::from_secs(30))
        .build()?)
}

fn addr(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// 0 once the process is gone (the sampler outlives it at the end).
fn memory_mib(pid: u32, key: &str) -> u64 {
    labrack_e2e::process_memory_mib(pid, key).unwrap_or(0)
}

/// The process's CPU time so far (user + system), in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // fields after the command name, which is in parentheses and may hold spaces
            let rest = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// What the run measured, per phase.
#[derive(Default)]
struct PhaseStats {
    latencies_ms: Vec<f64>,
    failures: usize,
    peak_rss_mib: u64,
    /// the appliance's CPU over the phase, in percent of one core
    cpu_percent: f64,
    notes: Vec<String>,
}

struct Shared {
    phase: AtomicUsize,
    stop: AtomicBool,
    stats: std::sync::Mutex<Vec<PhaseStats>>,
}

impl Shared {
    fn record(&self, phase: usize, latency: Option<f64>) {
        if let Ok(mut stats) = self.stats.lock() {
            match latency {
                Some(ms) => stats[phase].latencies_ms.push(ms),
                None => stats[phase].failures += 1,
            }
        }
    }

    fn note(&self, phase: usize, note: String) {
        println!("  {note}");
        if let Ok(mut stats) = self.stats.lock() {
            stats[phase].notes.push(note);
        }
    }
}

async fn bench(
    options: &Options,
    honest_runtime: &tokio::runtime::Handle,
    group: &AttackerGroup,
) -> anyhow::Result<()> {
    println!("xtask: {}", group.describe());
    let release = util::target_dir().join("release");
    let data = DataDir::new("bench-abuse");
    let skeletons = DataDir::new("bench-abuse-skel");
    let skeleton = skeletons.0.join("desk");
    std::fs::create_dir_all(&skeleton)?;
    std::fs::write(skeleton.join(".xsession"), "exec xterm\n")?;
    let web = util::project_root().join("web");
    let web_dist = web.join("dist").display().to_string();
    let heartbeat = HEARTBEAT_SECS.to_string();
    let server = Server::start_binary(
        &release.join("labrack"),
        &data.0,
        "127.0.0.1:0",
        &[
            "--host-heartbeat-secs",
            &heartbeat,
            "--web-dir",
            &web_dist,
            "--webrtc-bind",
            "127.0.0.1:0",
        ],
    )?;
    let pid = server.pid();
    let mut admin = Api {
        client: client_trusting(&data.0)?,
        base: server.url.clone(),
        token: None,
    };
    admin
        .first_admin_login(
            server.admin_password.as_deref().context("otp")?,
            "a-strong-admin-password",
        )
        .await?;
    let (status, event) = admin.post("/api/v1/events", json!({"name": "Abuse", "starts_at": "2026-01-01T09:00:00Z", "ends_at": "2099-01-01T09:00:00Z"})).await?;
    anyhow::ensure!(status == 201, "{event}");
    let event_id = event["id"].as_i64().context("event id")?;
    let event_code = event["code"].as_str().context("code")?.to_owned();
    let (status, body) = admin
        .post(
            &format!("/api/v1/events/{event_id}/transition"),
            json!({"to": "live"}),
        )
        .await?;
    anyhow::ensure!(status == 200, "{body}");
    let templates = format!(
        "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n",
        skeleton.display()
    );
    let (status, body) = admin.put_toml("/api/v1/templates", &templates).await?;
    anyhow::ensure!(status == 200, "{body}");

    // The lab hosts: real agents, each with its own state and ports.
    let host_bin = release.join("labrack-host");
    let users = LabUsers::new();
    let mut hosts = Vec::new();
    let mut host_states = Vec::new();
    for n in 0..options.hosts {
        let (_, token) = admin
            .post("/api/v1/hosts/enrolment-tokens", json!({}))
            .await?;
        let state = DataDir::new(&format!("bench-abuse-host{n}"));
        let (ok, text) = enrol_host_binary(
            &host_bin,
            &server.url,
            &data.0,
            token["token"].as_str().context("token")?,
            &format!("host-{n}"),
            &state.0,
        )?;
        anyhow::ensure!(ok, "{text}");
        hosts.push(LabHost::start_binary(
            &host_bin,
            &state.0,
            &users,
            &skeletons.0,
            &[("LABRACK_HOST_QUIET", "1")],
            &[],
        )?);
        host_states.push(state);
    }
    let expected_hosts = options.hosts;
    admin
        .wait_for("/api/v1/hosts", Duration::from_secs(60), move |h| {
            h["hosts"].as_array().is_some_and(|hosts| {
                hosts.len() == expected_hosts && hosts.iter().all(|h| h["healthy"] == true)
            })
        })
        .await?;

    // The roster: 4 per team, plus the flooder in team 0.
    let teams = options.participants.div_ceil(4);
    let mut roster = String::from("team,name,email\n");
    for n in 0..options.participants {
        roster.push_str(&format!("Team {:03},Member {n:03},\n", n % teams));
    }
    roster.push_str("Team 000,Flooder,\n");
    let (status, imported) = admin
        .post_csv(
            &format!("/api/v1/events/{event_id}/participants/import"),
            &roster,
        )
        .await?;
    anyhow::ensure!(status == 200, "import: {imported}");
    let issued = imported["participants"]
        .as_array()
        .context("participants")?
        .clone();
    anyhow::ensure!(issued.len() == options.participants + 1, "{imported}");
    let base = server.url.trim_end_matches('/').to_owned();
    let mut participants = Vec::new();
    for (n, p) in issued.iter().enumerate() {
        let local = addr(1, (n / 250) as u8, (n % 250 + 1) as u8);
        let client = client_from(&data.0, local)?;
        let reply = client
            .post(format!("{base}/api/v1/join"))
            .json(&json!({"event_code": event_code, "join_code": p["join_code"], "bearer": true}))
            .send()
            .await?;
        let body: Value = reply.json().await?;
        let token = body["token"]
            .as_str()
            .with_context(|| format!("join: {body}"))?
            .to_owned();
        participants.push((
            client,
            token,
            p["name"].as_str().unwrap_or_default().to_owned(),
            local,
        ));
    }
    let (flooder_client, flooder_token, _, flooder_addr) =
        participants.pop().context("the flooder")?;
    let (_, me) = Api {
        client: flooder_client.clone(),
        base: base.clone(),
        token: Some(flooder_token.clone()),
    }
    .get("/api/v1/me")
    .await?;
    let flood_team = me["team"]["id"]
        .as_i64()
        .or_else(|| me["team_id"].as_i64())
        .with_context(|| format!("the flooder's team: {me}"))?;
    let (status, alloc) = admin
        .post(
            &format!("/api/v1/teams/{flood_team}/allocation"),
            json!({"template": "desk"}),
        )
        .await?;
    anyhow::ensure!(status == 201, "{alloc}");
    let lab_id = alloc["id"].as_i64().context("allocation")?;
    admin
        .wait_for(
            &format!("/api/v1/allocations/{lab_id}"),
            Duration::from_secs(120),
            |a| a["state"] == "active" && a["busy"] == false,
        )
        .await?;
    println!(
        "xtask: {} participants joined, {} hosts healthy, lab {lab_id} active; phases of {} s next",
        participants.len(),
        options.hosts,
        options.phase_secs
    );

    let shared = Arc::new(Shared {
        phase: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        stats: std::sync::Mutex::new((0..PHASES.len()).map(|_| PhaseStats::default()).collect()),
    });
    // The honest load.
    let mut honest = Vec::new();
    for (n, (_, token, _, local)) in participants.into_iter().enumerate() {
        let (shared, base) = (shared.clone(), base.clone());
        let submits = n < teams;
        // a fresh client, so its connections are driven by the honest runtime
        let client = client_from(&data.0, local)?;
        honest.push(honest_runtime.spawn(async move {
            // spread the 200 over the first second
            tokio::time::sleep(Duration::from_millis((n as u64 * 997) % 1000)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut round = 0u64;
            while !shared.stop.load(Ordering::Relaxed) {
                tick.tick().await;
                round += 1;
                let phase = shared.phase.load(Ordering::Relaxed);
                let request = if submits && round.is_multiple_of(12) {
                    client
                        .post(format!("{base}/api/v1/me/submissions"))
                        .json(&json!({"version": format!("r{round}")}))
                } else {
                    let path = [
                        "/api/v1/me",
                        "/api/v1/me/checks",
                        "/api/v1/me/announcements",
                    ][(round % 3) as usize];
                    client.get(format!("{base}{path}"))
                };
                let sent = Instant::now();
                let ok = match request.bearer_auth(&token).send().await {
                    Ok(reply) => {
                        let good = reply.status().is_success();
                        let _ = reply.bytes().await;
                        good
                    }
                    Err(_) => false,
                };
                shared.record(phase, ok.then(|| sent.elapsed().as_secs_f64() * 1000.0));
            }
        }));
    }
    // Heartbeats and memory, watched from outside.
    let missed = Arc::new(AtomicU64::new(0));
    let max_gap_ms = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (shared, missed, max_gap_ms) = (shared.clone(), missed.clone(), max_gap_ms.clone());
        let db_path = data.0.join("labrack.db");
        honest_runtime.spawn_blocking(move || -> anyhow::Result<()> {
            let conn = rusqlite::Connection::open_with_flags(
                &db_path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?;
            let mut last = std::collections::HashMap::<i64, i64>::new();
            let interval_ms = (HEARTBEAT_SECS * 1000) as i64;
            while !shared.stop.load(Ordering::Relaxed) {
                let phase = shared.phase.load(Ordering::Relaxed);
                let rss = memory_mib(pid, "VmRSS");
                if let Ok(mut stats) = shared.stats.lock() {
                    stats[phase].peak_rss_mib = stats[phase].peak_rss_mib.max(rss);
                }
                let rows: Vec<(i64, i64, bool)> = conn
                    .prepare_cached("SELECT id, last_seen_ms, healthy FROM hosts")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<_, _>>()?;
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis() as i64;
                for (id, seen, healthy) in rows {
                    if !healthy {
                        missed.fetch_add(1, Ordering::Relaxed);
                    }
                    let previous = *last.entry(id).or_insert(seen);
                    // the gap so far, whether or not the next beat has come
                    let gap = if seen != previous {
                        seen - previous
                    } else {
                        now_ms - seen
                    };
                    max_gap_ms.fetch_max(gap.max(0) as u64, Ordering::Relaxed);
                    if seen != previous {
                        if gap > 2 * interval_ms {
                            missed.fetch_add((gap / interval_ms - 1) as u64, Ordering::Relaxed);
                        }
                        last.insert(id, seen);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        })
    };

    let phase_time = Duration::from_secs(options.phase_secs);
    let server_addr: SocketAddr = base.trim_start_matches("https://").parse()?;
    for (index, name) in PHASES.iter().enumerate() {
        shared.phase.store(index, Ordering::Relaxed);
        println!("\nphase {index}: {name}");
        let started = Instant::now();
        let ticks = cpu_ticks(pid);
        let until = started + phase_time;
        match index {
            1 => logins(options, &data.0, &base, &shared, index).await?,
            2 => slow_connections(options, server_addr, until, &shared, index).await?,
            3 => {
                let flood = terminal_flood(
                    &data.0,
                    &base,
                    &flooder_client,
                    &flooder_token,
                    flooder_addr,
                    lab_id,
                    until,
                )
                .await?;
                shared.note(index, flood);
            }
            4 => {
                let flooder = Flooder {
                    base: &base,
                    admin: &admin,
                    event_id,
                    team_id: flood_team,
                    event_code: &event_code,
                };
                let flood = desktop_flood(&web, group, &flooder, options.phase_secs).await?;
                shared.note(index, flood);
            }
            5 => scoreboard_crowd(options, &data.0, &base, event_id, until, &shared, index).await?,
            _ => {}
        }
        tokio::time::sleep_until(until.into()).await;
        let used = cpu_ticks(pid).saturating_sub(ticks) as f64 / 100.0;
        if let Ok(mut stats) = shared.stats.lock() {
            stats[index].cpu_percent = 100.0 * used / started.elapsed().as_secs_f64();
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for task in honest {
        task.await?;
    }
    watcher.await??;
    let alive = std::fs::metadata(format!("/proc/{pid}")).is_ok();
    let health = admin.get("/healthz").await.map(|(s, _)| s).unwrap_or(0);
    let peak = memory_mib(pid, "VmHWM");
    let (_, hosts_now) = admin.get("/api/v1/hosts").await?;
    let healthy_hosts = hosts_now["hosts"]
        .as_array()
        .map_or(0, |h| h.iter().filter(|h| h["healthy"] == true).count());

    println!(
        "\nbench abuse: {} participants polling once a second, {} lab hosts (heartbeat {HEARTBEAT_SECS} s), phases of {} s",
        options.participants, options.hosts, options.phase_secs
    );
    println!(
        "  {:<26} {:>8} {:>9} {:>9} {:>8} {:>9} {:>11}",
        "phase", "requests", "p50 ms", "p99 ms", "failed", "RSS MiB", "CPU % core"
    );
    let mut stats = shared
        .stats
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut worst_p99 = 0.0_f64;
    let mut failures = 0;
    for (name, phase) in PHASES.iter().zip(stats.iter_mut()) {
        phase.latencies_ms.sort_by(f64::total_cmp);
        let p99 = percentile(&phase.latencies_ms, 0.99);
        worst_p99 = worst_p99.max(p99);
        failures += phase.failures;
        println!(
            "  {:<26} {:>8} {:>9.1} {:>9.1} {:>8} {:>9} {:>11.0}",
            name,
            phase.latencies_ms.len(),
            percentile(&phase.latencies_ms, 0.5),
            p99,
            phase.failures,
            phase.peak_rss_mib,
            phase.cpu_percent
        );
    }
    for (name, phase) in PHASES.iter().zip(stats.iter()) {
        for note in &phase.notes {
            println!("  {name}: {note}");
        }
    }
    let missed = missed.load(Ordering::Relaxed);
    println!(
        "  heartbeats missed {missed} (longest gap {:.1} s), hosts healthy at the end {healthy_hosts}/{}",
        max_gap_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        options.hosts
    );
    println!(
        "  peak RSS {peak} MiB; appliance {} (healthz {health})",
        if alive { "up" } else { "GONE" }
    );
    let verdict = [
        (
            worst_p99 <= 100.0,
            format!("honest p99 {worst_p99:.1} ms (target <= 100)"),
        ),
        (
            failures == 0,
            format!("{failures} honest requests failed (target 0)"),
        ),
        (
            missed == 0,
            format!("{missed} heartbeats missed (target 0)"),
        ),
        (peak <= 300, format!("peak RSS {peak} MiB (target <= 300)")),
        (alive && health == 200, "no crash".to_owned()),
    ];
    for (met, what) in &verdict {
        println!("  [{}] {what}", if *met { "met" } else { "MISSED" });
    }
    drop(hosts);
    drop(server);
    drop(host_states);
    Ok(())
}

/// (a) logins with random usernames, all at once, from 40 addresses.
async fn logins(
    options: &Options,
    data: &Path,
    base: &str,
    shared: &Shared,
    phase: usize,
) -> anyhow::Result<()> {
    let strangers: Vec<reqwest::Client> = (1..=40)
        .map(|n| client_from(data, addr(10, 0, n)))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let attempts = (0..options.logins).map(|n| {
        let stranger = strangers[n % strangers.len()].clone();
        let url = format!("{base}/api/v1/auth/login");
        async move {
            let reply = stranger
                .post(url)
                .json(&json!({"username": format!("guess{n}-{}", n * 7919 % 100_003), "password": "guess-guess-guess"}))
                .send()
                .await;
            reply.map(|r| r.status().as_u16()).unwrap_or(0)
        }
    });
    let statuses = futures_util::future::join_all(attempts).await;
    let mut counts = std::collections::BTreeMap::<u16, usize>::new();
    for status in statuses {
        *counts.entry(status).or_default() += 1;
    }
    shared.note(
        phase,
        format!(
            "{} logins answered in {:.1} s: {}",
            options.logins,
            started.elapsed().as_secs_f64(),
            counts
                .iter()
                .map(|(s, n)| format!(
                    "{n}× {}",
                    if *s == 0 {
                        "no answer".to_owned()
                    } else {
                        s.to_string()
                    }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok(())
}

/// (b) connections that never send a byte, reopened as they are closed, until `until`.
async fn slow_connections(
    options: &Options,
    server: SocketAddr,
    until: Instant,
    shared: &Shared,
    phase: usize,
) -> anyhow::Result<()> {
    let opened = Arc::new(AtomicU64::new(0));
    let closed_by_server = Arc::new(AtomicU64::new(0));
    let held = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..options.slow {
        let local = addr(20, (n / 50 / 250) as u8, (n / 50 % 250 + 1) as u8);
        let (opened, closed_by_server, held) =
            (opened.clone(), closed_by_server.clone(), held.clone());
        tasks.push(tokio::spawn(async move {
            // ramp up over the first second so the attack is not just a SYN backlog test
            tokio::time::sleep(Duration::from_micros((n as u64 * 200) % 1_000_000)).await;
            while Instant::now() < until {
                let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
                    return;
                };
                if socket.bind(SocketAddr::new(local, 0)).is_err() {
                    return;
                }
                let Ok(Ok(mut stream)) =
                    tokio::time::timeout(Duration::from_secs(2), socket.connect(server)).await
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                held.fetch_add(1, Ordering::Relaxed);
                let mut byte = [0_u8; 1];
                let left = until.saturating_duration_since(Instant::now());
                let read = tokio::time::timeout(
                    left,
                    tokio::io::AsyncReadExt::read(&mut stream, &mut byte),
                )
                .await;
                held.fetch_sub(1, Ordering::Relaxed);
                if read.is_ok() {
                    closed_by_server.fetch_add(1, Ordering::Relaxed);
                    // the attacker comes straight back
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    let mut most_held = 0;
    while Instant::now() < until {
        most_held = most_held.max(held.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in tasks {
        let _ = task.await;
    }
    shared.note(
        phase,
        format!(
            "{} slow connections from {} addresses: {} opened, {} closed by the appliance, at most {most_held} held at once",
            options.slow,
            options.slow.div_ceil(50),
            opened.load(Ordering::Relaxed),
            closed_by_server.load(Ordering::Relaxed)
        ),
    );
    Ok(())
}

/// (c) keystrokes into a terminal whose shell is blocked in `sleep 1d`, as fast as the
/// socket takes them, with alternating resizes.
async fn terminal_flood(
    data: &Path,
    base: &str,
    client: &reqwest::Client,
    token: &str,
    local: IpAddr,
    lab_id: i64,
    until: Instant,
) -> anyhow::Result<String> {
    let reply = client
        .post(format!(
            "{base}/api/v1/allocations/{lab_id}/terminal-ticket"
        ))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await?;
    let ticket: Value = reply.json().await?;
    let ticket = ticket["ticket"]
        .as_str()
        .with_context(|| format!("terminal ticket: {ticket}"))?;
    let mut ws = websocket_from(data, base, "/api/v1/terminal", token, Some(local)).await?;
    ws.send(Message::Text(
        json!({"ticket": ticket, "cols": 100, "rows": 30})
            .to_string()
            .into(),
    ))
    .await?;
    match tokio::time::timeout(Duration::from_secs(30), ws.next()).await? {
        Some(Ok(Message::Text(text))) if text.contains("ready") => {}
        other => bail!("the terminal did not open: {other:?}"),
    }
    ws.send(Message::Binary(b"sleep 1d\r".to_vec().into()))
        .await?;
    let (mut sink, mut stream) = ws.split();
    let reader = tokio::spawn(async move {
        let mut bytes = 0usize;
        while let Some(Ok(message)) = stream.next().await {
            bytes += message.len();
        }
        bytes
    });
    let keys = vec![b'x'; 16 * 1024];
    let (mut sent, mut messages, mut stalls) = (0usize, 0usize, 0usize);
    while Instant::now() < until {
        let message = if messages % 64 == 63 {
            let cols = if messages % 128 == 127 { 80 } else { 200 };
            Message::Text(
                json!({"type": "resize", "cols": cols, "rows": 40})
                    .to_string()
                    .into(),
            )
        } else {
            Message::Binary(keys.clone().into())
        };
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.min(Duration::from_secs(1)), sink.send(message)).await {
            Ok(Ok(())) => {
                messages += 1;
                sent += 16 * 1024;
            }
            Ok(Err(_)) => break,
            Err(_) => stalls += 1,
        }
    }
    drop(sink);
    reader.abort();
    Ok(format!(
        "terminal flood: {messages} messages ({} MiB) taken by the appliance; the socket pushed back {stalls} times (a send waiting 1 s)",
        sent / (1024 * 1024)
    ))
}

/// Who floods the desktop: a new participant of `team_id`, added by `admin`.
struct Flooder<'a> {
    base: &'a str,
    admin: &'a Api,
    event_id: i64,
    team_id: i64,
    event_code: &'a str,
}

/// (c) the lab's desktop flooded from Chromium: input on the data channel, clipboard and
/// resize messages on the signaling socket.
async fn desktop_flood(
    web: &Path,
    group: &AttackerGroup,
    flooder: &Flooder<'_>,
    secs: u64,
) -> anyhow::Result<String> {
    let Flooder {
        base,
        admin,
        event_id,
        team_id,
        event_code,
    } = *flooder;
    let (status, issued) = admin
        .post(
            &format!("/api/v1/events/{event_id}/participants"),
            json!({"team_id": team_id, "name": "Desktop flooder"}),
        )
        .await?;
    anyhow::ensure!(status == 201, "{issued}");
    // The attacker's laptop is another machine at a venue; here it shares the two cores with
    // the appliance and the honest clients, so it runs in the attackers' CPU group.
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{}exec nice -n 19 node e2e/flood-desktop.mjs",
            group.shell_prefix()
        ))
        .current_dir(web)
        .env("LABRACK_URL", base)
        .env("LABRACK_EVENT_CODE", event_code)
        .env(
            "LABRACK_JOIN_CODE",
            issued["join_code"].as_str().unwrap_or_default(),
        )
        .env(
            "LABRACK_FLOOD_SECS",
            secs.saturating_sub(3).max(2).to_string(),
        )
        .output()
        .await
        .context("running node e2e/flood-desktop.mjs")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "the desktop flood failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or("null"))?;
    Ok(format!(
        "desktop flood: {} input messages, {} clipboard and {} resize messages sent; the appliance dropped {} and reported {}; desktop {}",
        report["input_sent"],
        report["clipboard_sent"],
        report["resize_sent"],
        report["stats"]["input_dropped"],
        report["stats"],
        report["state"]
    ))
}

/// (d) the public scoreboard's streams from a crowd of 125 addresses, 16 each.
async fn scoreboard_crowd(
    options: &Options,
    data: &Path,
    base: &str,
    event_id: i64,
    until: Instant,
    shared: &Shared,
    phase: usize,
) -> anyhow::Result<()> {
    let per_client = 16;
    let clients: Vec<reqwest::Client> = (0..options.streams.div_ceil(per_client))
        .map(|n| client_from(data, addr(30, (n / 250) as u8, (n % 250 + 1) as u8)))
        .collect::<Result<_, _>>()?;
    let url = format!("{base}/api/v1/events/{event_id}/scoreboard/stream");
    let open = Arc::new(AtomicU64::new(0));
    let boards = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..options.streams {
        let (client, url) = (clients[n / per_client].clone(), url.clone());
        let (open, boards, refused) = (open.clone(), boards.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros((n as u64 * 500) % 1_000_000)).await;
            let Ok(Ok(mut reply)) =
                tokio::time::timeout(Duration::from_secs(10), client.get(&url).send()).await
            else {
                refused.fetch_add(1, Ordering::Relaxed);
                return;
            };
            if !reply.status().is_success() {
                refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            open.fetch_add(1, Ordering::Relaxed);
            let left = until.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(left, async {
                while let Ok(Some(chunk)) = reply.chunk().await {
                    let text = String::from_utf8_lossy(&chunk);
                    boards.fetch_add(
                        text.matches("event: board").count() as u64,
                        Ordering::Relaxed,
                    );
                }
            })
            .await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    shared.note(
        phase,
        format!(
            "{} scoreboard streams: {} opened, {} refused, {} boards received",
            options.streams,
            open.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
            boards.load(Ordering::Relaxed)
        ),
    );
    Ok(())
}
