//! `cargo xtask bench reset`: how long a lab reset takes, end to end, on this machine, and
//! what a lab's box costs.
//!
//! Starts the release `labrack` and `labrack-host` and one `local-user` lab (in its box, with
//! its own xrdp and sshd) whose skeleton holds ~100 MB in ~1,000 files. Each round the
//! "team" fills its home with another ~50 MB in 500 files and holds a live desktop session
//! (opened by `labrack admin probe-desktop`); then `POST …/reset` is timed until the API
//! shows the lab active and idle again. The host's own task time is read from its log.
//!
//! The box's cost: the provision task's time (user, home, box up), the lab cgroup's memory
//! with no session and with a desktop session, and the latency the forwarded ports add
//! (connect to the lab's sshd and read its banner, through the lab's host port against
//! straight inside its network namespace).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use labrack_e2e::{Api, DataDir, LabHost, LabUsers, Server, client_trusting, enrol_host_binary};
use serde_json::json;

use crate::util::{self, cargo, run};

pub(crate) fn bench_reset(args: &[String]) -> anyhow::Result<()> {
    let mut rounds = 7_usize;
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        match flag.as_str() {
            "--rounds" => {
                rounds = iter
                    .next()
                    .context("--rounds needs a value")?
                    .parse()
                    .context("--rounds needs a number")?
            }
            other => bail!("unknown option {other}"),
        }
    }
    anyhow::ensure!(rounds > 0, "--rounds must be positive");
    run(cargo().args(["build", "--release", "-p", "labrack", "-p", "labrack-host"]))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(reset_rounds(rounds))
}

/// The lab cgroup's memory use (page cache and tmpfs included), MB.
fn box_memory_mb(user: &str) -> anyhow::Result<f64> {
    let bytes: u64 = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/labrack/{user}/memory.usage_in_bytes"
    ))
    .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/labrack/{user}/memory.current")))
    .context("the lab's memory cgroup")?
    .trim()
    .parse()?;
    Ok(bytes as f64 / 1e6)
}

/// Connect to the lab's sshd and read its banner `rounds` times; the median in ms. Through
/// the lab's host port, or (`inside`) from within its network namespace.
fn banner_ms(port: u16, netns: Option<&str>, rounds: usize) -> anyhow::Result<f64> {
    let script = format!(
        "import socket, time, statistics\nt = []\nfor _ in range({rounds}):\n    s = time.perf_counter(); c = socket.create_connection(('127.0.0.1', {port})); c.recv(64); t.append(time.perf_counter() - s); c.close()\nprint(statistics.median(t) * 1000)\n"
    );
    let mut command = match netns {
        Some(netns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns, "python3", "-c", &script]);
            c
        }
        None => {
            let mut c = Command::new("python3");
            c.args(["-c", &script]);
            c
        }
    };
    let output = command.output()?;
    anyhow::ensure!(
        output.status.success(),
        "banner probe: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
}

fn box_costs(
    host: &LabHost,
    id: i64,
    user: &str,
    target: &Path,
    data: &Path,
) -> anyhow::Result<()> {
    let task = format!("task=alloc-{id}-provision-");
    let provision_ms = host
        .log
        .lock()
        .ok()
        .and_then(|log| {
            log.iter()
                .rev()
                .find(|l| l.contains("task succeeded") && l.contains(&task))
                .cloned()
        })
        .and_then(|line| {
            line.rsplit("ms=")
                .next()
                .and_then(|ms| ms.trim().parse::<f64>().ok())
        });
    let idle = box_memory_mb(user)?;
    let probe = Command::new(target.join("labrack"))
        .args([
            "admin",
            "probe-desktop",
            &id.to_string(),
            "--watch-secs",
            "20",
            "--expect-rgb",
            "1e90ff",
            "--data-dir",
        ])
        .arg(data)
        .output()?;
    anyhow::ensure!(
        probe.status.success(),
        "the desktop did not come up: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    std::thread::sleep(Duration::from_secs(2));
    let session = box_memory_mb(user)?;
    // The lab's SSH port is the second of its two ports (the first lab: host ports +0, +1).
    let ssh_port = host.first_port + 1;
    let (mut forwarded, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        forwarded.push(banner_ms(ssh_port, None, 100)?);
        direct.push(banner_ms(22, Some(user), 100)?);
    }
    forwarded.sort_by(f64::total_cmp);
    direct.sort_by(f64::total_cmp);
    let (forwarded, direct) = (forwarded[2], direct[2]);
    println!("\nbench reset: the box");
    println!(
        "  provision (users, home, box up)   {} ms",
        provision_ms.map_or("?".into(), |ms| format!("{ms:.0}"))
    );
    println!(
        "  lab memory, no session            {idle:.1} MB (sshd, xrdp, sesman, the box's init)"
    );
    println!("  lab memory, one desktop session   {session:.1} MB");
    println!(
        "  sshd banner via the lab's port    {forwarded:.3} ms   straight in its namespace {direct:.3} ms   (forwarding adds {:.3} ms)",
        forwarded - direct
    );
    Ok(())
}

fn write_files(dir: &Path, small: usize, large: usize, large_mb: usize) -> anyhow::Result<()> {
    let block = vec![0x5a_u8; 4096];
    for i in 0..small {
        let sub = dir.join(format!("src/m{:02}", i % 40));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(format!("f{i}.txt")), &block)?;
    }
    let chunk = vec![0xa5_u8; 1024 * 1024];
    for i in 0..large {
        let mut bytes = Vec::with_capacity(large_mb * chunk.len());
        for _ in 0..large_mb {
            bytes.extend_from_slice(&chunk);
        }
        std::fs::write(dir.join(format!("data{i}.bin")), bytes)?;
    }
    Ok(())
}

async fn reset_rounds(rounds: usize) -> anyhow::Result<()> {
    let target = util::target_dir().join("release");
    let data = DataDir::new("bench-reset");
    let skeletons = DataDir::new("bench-reset-skel");
    let skeleton = skeletons.0.join("desk");
    write_files(&skeleton, 1000, 4, 25)?;
    std::fs::write(
        skeleton.join(".xsession"),
        "xsetroot -solid '#1e90ff'\nexec xterm -geometry 40x10+20+20\n",
    )?;
    let server = Server::start_binary(
        &target.join("labrack"),
        &data.0,
        "127.0.0.1:0",
        &["--host-heartbeat-secs", "2"],
    )?;
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
    let (_, event) = admin.post("/api/v1/events", json!({"name": "Bench", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"})).await?;
    let event_id = event["id"].as_i64().context("event")?;
    let (_, team) = admin
        .post(
            &format!("/api/v1/events/{event_id}/teams"),
            json!({"name": "Bench"}),
        )
        .await?;
    let team_id = team["id"].as_i64().context("team")?;
    let templates = format!(
        "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n",
        skeleton.display()
    );
    let (status, body) = admin.put_toml("/api/v1/templates", &templates).await?;
    anyhow::ensure!(status == 200, "{body}");
    let (_, token) = admin
        .post("/api/v1/hosts/enrolment-tokens", json!({}))
        .await?;
    let state = DataDir::new("bench-reset-host");
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
    // The lab's desktop is its box's own xrdp.
    let host = LabHost::start_binary(
        &host_bin,
        &state.0,
        &users,
        &skeletons.0,
        &[("LABRACK_HOST_QUIET", "1")],
        &[],
    )?;
    let (status, alloc) = admin
        .post(
            &format!("/api/v1/teams/{team_id}/allocation"),
            json!({"template": "desk"}),
        )
        .await?;
    anyhow::ensure!(status == 201, "{alloc}");
    let id = alloc["id"].as_i64().context("allocation")?;
    let path = format!("/api/v1/allocations/{id}");
    admin
        .wait_for(&path, Duration::from_secs(120), |a| {
            a["state"] == "active" && a["busy"] == false
        })
        .await?;
    let user = format!("{}a{id}", users.prefix);
    let home = Path::new("/home").join(&user);
    box_costs(&host, id, &user, &target, &data.0)?;

    let mut api_ms = Vec::new();
    let mut host_ms = Vec::new();
    for round in 1..=rounds {
        write_files(&home.join("work"), 500, 2, 25)?;
        run(Command::new("chown")
            .args(["-R", &format!("{user}:{user}")])
            .arg(home.join("work")))?;
        let live = {
            let probe = Command::new(target.join("labrack"))
                .args([
                    "admin",
                    "probe-desktop",
                    &id.to_string(),
                    "--watch-secs",
                    "20",
                    "--expect-rgb",
                    "1e90ff",
                    "--data-dir",
                ])
                .arg(&data.0)
                .output()?;
            probe.status.success()
        };
        let started = Instant::now();
        let (status, body) = admin.post(&format!("{path}/reset"), json!({})).await?;
        anyhow::ensure!(status == 200, "reset: {body}");
        admin
            .wait_for(&path, Duration::from_secs(60), |a| {
                a["state"] == "active" && a["busy"] == false
            })
            .await?;
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(
            !home.join("work").exists(),
            "the reset left the team's files behind"
        );
        let task = format!("task=alloc-{id}-reset-");
        let host_task = host
            .log
            .lock()
            .ok()
            .and_then(|log| {
                log.iter()
                    .rev()
                    .find(|l| l.contains("task succeeded") && l.contains(&task))
                    .cloned()
            })
            .and_then(|line| {
                line.rsplit("ms=")
                    .next()
                    .and_then(|ms| ms.trim().parse::<f64>().ok())
            });
        println!(
            "round {round}: reset {elapsed:.0} ms end to end, host task {} ms, live desktop session before: {live}",
            host_task.map_or("?".into(), |ms| format!("{ms:.0}"))
        );
        api_ms.push(elapsed);
        if let Some(ms) = host_task {
            host_ms.push(ms);
        }
    }
    let (status, _) = admin.post(&format!("{path}/release"), json!({})).await?;
    anyhow::ensure!(status == 200);
    admin
        .wait_for(&path, Duration::from_secs(60), |a| a["state"] == "released")
        .await?;
    drop(host);
    let stats = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        let pick = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        (pick(0.5), pick(0.95), values[values.len() - 1])
    };
    let (p50, p95, max) = stats(&mut api_ms);
    println!(
        "\nbench reset: {rounds} rounds, skeleton ~100 MB / 1,000 files, ~50 MB / 500 files written per round"
    );
    println!(
        "  end to end   p50 {p50:>6.0} ms   p95 {p95:>6.0} ms   max {max:>6.0} ms   (target <= 10000)"
    );
    if !host_ms.is_empty() {
        let (p50, p95, max) = stats(&mut host_ms);
        println!("  host task    p50 {p50:>6.0} ms   p95 {p95:>6.0} ms   max {max:>6.0} ms");
    }
    Ok(())
}
