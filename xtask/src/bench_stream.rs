//! `cargo xtask bench stream`, the end-to-end half: real xrdp sessions, the release
//! `labrack` and `labrack-host`, and Debian's Chromium, all on this machine.
//!
//! 1. Concurrency (no browser): N labs run a full-motion workload and N
//!    `labrack admin probe-desktop --stream-secs` processes each run the appliance's desktop
//!    pipeline (RDP decode → I420 → H.264) against one of them at 1280×720; N grows while
//!    every stream keeps ≥ 25 fps (steady, after its first 2 s). Each probe reports its CPU
//!    share.
//! 2. In Chromium (web/e2e/bench-stream.mjs) on one lab: glass-to-glass latency at 1280×720
//!    and 1920×1080 (xsetroot on the lab's display → the first frame with the colour handed
//!    to Chromium's compositor),
//!    then bandwidth and frame rate for idle, typing and motion, while this harness samples
//!    the appliance's CPU.
//!
//! Everything shares 2 cores: the lab desktops (Xorg, xterm, xrdp's RemoteFX encoder) and
//! the browser's decoder compete with the appliance, as they would not on a real rack.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use labrack_e2e::{Api, DataDir, LabHost, LabUsers, Server, client_trusting, enrol_host_args};
use serde_json::{Value, json};

use crate::util::{self, cargo, run};

/// The lab session: a dark root window (the latency probe's canvas, right side) and an xterm
/// (left) running a workload chosen by `$HOME/mode`.
const XSESSION: &str =
    "xsetroot -solid '#202020'\nexec xterm -geometry 150x45+0+0 -e sh \"$HOME/workload\"\n";
const WORKLOAD: &str = r#"while :; do
  case "$(cat "$HOME/mode" 2>/dev/null)" in
    motion) head -c 100000 /dev/urandom | base64 ;;
    typing) printf 'x'; sleep 0.1 ;;
    *) sleep 0.2 ;;
  esac
done
"#;

pub(crate) struct Options {
    pub max_streams: usize,
    pub flips: usize,
    pub phase_secs: u64,
}

pub(crate) fn bench_stream_e2e(options: &Options) -> anyhow::Result<()> {
    crate::build_web()?;
    run(cargo().args(["build", "--release", "-p", "labrack", "-p", "labrack-host"]))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(e2e(options))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Total CPU ticks (user + system, 1/100 s) of a process.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The X display (":10") of a lab user's session.
fn display_of(user: &str) -> anyhow::Result<String> {
    let output = Command::new("pgrep")
        .args(["-a", "-u", user, "Xorg"])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .find(|w| w.starts_with(':') && w[1..].chars().all(|c| c.is_ascii_digit()))
        .map(str::to_owned)
        .with_context(|| format!("no Xorg session for {user}: {text}"))
}

struct Lab {
    id: i64,
    user: String,
    home: PathBuf,
}

impl Lab {
    fn set_mode(&self, mode: &str) -> anyhow::Result<()> {
        std::fs::write(self.home.join("mode"), format!("{mode}\n"))
            .context("writing the workload mode")
    }
}

fn probe(labrack: &Path, data: &Path, lab: &Lab, extra: &[&str]) -> Command {
    let mut command = Command::new(labrack);
    command
        .args(["admin", "probe-desktop", &lab.id.to_string(), "--data-dir"])
        .arg(data)
        .args(extra);
    command
}

async fn e2e(options: &Options) -> anyhow::Result<()> {
    let release = util::target_dir().join("release");
    let labrack = release.join("labrack");
    let data = DataDir::new("bench-stream");
    let skeletons = DataDir::new("bench-stream-skel");
    let skeleton = skeletons.0.join("desk");
    std::fs::create_dir_all(&skeleton)?;
    std::fs::write(skeleton.join(".xsession"), XSESSION)?;
    std::fs::write(skeleton.join("workload"), WORKLOAD)?;
    let web = util::project_root().join("web");
    let web_dist = web.join("dist").display().to_string();
    let server = Server::start_binary(
        &labrack,
        &data.0,
        "127.0.0.1:0",
        &[
            "--host-heartbeat-secs",
            "2",
            "--web-dir",
            &web_dist,
            "--webrtc-bind",
            "127.0.0.1:0",
        ],
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
    let templates = format!(
        "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n",
        skeleton.display()
    );
    let (status, body) = admin.put_toml("/api/v1/templates", &templates).await?;
    anyhow::ensure!(status == 200, "{body}");
    let (_, token) = admin
        .post("/api/v1/hosts/enrolment-tokens", json!({}))
        .await?;
    let state = DataDir::new("bench-stream-host");
    let host_bin = release.join("labrack-host");
    let capacity = options.max_streams.to_string();
    let (ok, text) = enrol_host_args(
        &host_bin,
        &server.url,
        &data.0,
        token["token"].as_str().context("token")?,
        "bench-host",
        &state.0,
        &["--capacity", &capacity],
    )?;
    anyhow::ensure!(ok, "{text}");
    let users = LabUsers::new();
    // Each lab's desktop is its box's own xrdp.
    let _host = LabHost::start_binary(
        &host_bin,
        &state.0,
        &users,
        &skeletons.0,
        &[("LABRACK_HOST_QUIET", "1")],
        &[],
    )?;

    let mut labs = Vec::new();
    let mut first_team_id = 0;
    for n in 0..options.max_streams {
        let (_, team) = admin
            .post(
                &format!("/api/v1/events/{event_id}/teams"),
                json!({"name": format!("Team {n}")}),
            )
            .await?;
        let team_id = team["id"].as_i64().context("team")?;
        if n == 0 {
            first_team_id = team_id;
        }
        let (status, alloc) = admin
            .post(
                &format!("/api/v1/teams/{team_id}/allocation"),
                json!({"template": "desk"}),
            )
            .await?;
        anyhow::ensure!(status == 201, "{alloc}");
        let id = alloc["id"].as_i64().context("allocation")?;
        admin
            .wait_for(
                &format!("/api/v1/allocations/{id}"),
                Duration::from_secs(120),
                |a| a["state"] == "active" && a["busy"] == false,
            )
            .await?;
        let user = format!("{}a{id}", users.prefix);
        let lab = Lab {
            id,
            home: Path::new("/home").join(&user),
            user,
        };
        lab.set_mode("idle")?;
        // Log in once so the session (Xorg, xterm, workload) is up before anything is timed.
        let output = probe(
            &labrack,
            &data.0,
            &lab,
            &["--watch-secs", "4", "--size", "1280x720"],
        )
        .output()?;
        anyhow::ensure!(
            output.status.success(),
            "warming up lab {id}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        labs.push(lab);
    }
    println!("xtask: {} labs up; concurrency next", labs.len());

    // 1. Concurrent 720p streams in full motion.
    let mut sustained = 0;
    let mut concurrency = Vec::new();
    for n in 1..=labs.len() {
        for (i, lab) in labs.iter().enumerate() {
            lab.set_mode(if i < n { "motion" } else { "idle" })?;
        }
        std::thread::sleep(Duration::from_secs(2));
        let spawned: Vec<_> = labs[..n]
            .iter()
            .map(|lab| {
                probe(
                    &labrack,
                    &data.0,
                    lab,
                    &[
                        "--watch-secs",
                        "10",
                        "--stream-secs",
                        "10",
                        "--size",
                        "1280x720",
                    ],
                )
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
            })
            .collect::<Result<_, _>>()?;
        let mut fps = Vec::new();
        let mut cpu = Vec::new();
        for child in spawned {
            let output = child.wait_with_output()?;
            // A probe that fails under load counts as a stream that did not keep up.
            match serde_json::from_slice::<Value>(&output.stdout) {
                Ok(report) => {
                    fps.push(report["stream"]["steady_fps"].as_f64().unwrap_or(0.0));
                    cpu.push(report["stream"]["cpu_core_share"].as_f64().unwrap_or(0.0));
                }
                Err(_) => {
                    println!(
                        "  a probe failed: {}",
                        String::from_utf8_lossy(&output.stderr)
                            .lines()
                            .next()
                            .unwrap_or("no output")
                    );
                    fps.push(0.0);
                    cpu.push(0.0);
                }
            }
        }
        let min_fps = fps.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "  {n} stream(s) in motion: steady fps {:?}, CPU per stream {:?} of a core",
            round(&fps),
            round(&cpu)
        );
        concurrency.push(json!({"streams": n, "fps": fps, "cpu_core_share": cpu}));
        if min_fps >= 25.0 {
            sustained = n;
        } else {
            break;
        }
    }
    for lab in &labs {
        lab.set_mode("idle")?;
    }

    // 2. In Chromium: latency, bandwidth, appliance CPU.
    let lab = &labs[0];
    let display = display_of(&lab.user)?;
    let (_, event) = admin.get(&format!("/api/v1/events/{event_id}")).await?;
    let (status, issued) = admin
        .post(
            &format!("/api/v1/events/{event_id}/participants"),
            json!({"team_id": first_team_id, "name": "Bench"}),
        )
        .await?;
    anyhow::ensure!(status == 201, "{issued}");
    let pid = server.pid();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = std::thread::spawn({
        let sampling = sampling.clone();
        move || {
            let mut samples = Vec::new();
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(ticks) = cpu_ticks(pid) {
                    samples.push((now_ms(), ticks));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            samples
        }
    });
    let output = Command::new("node")
        .arg("e2e/bench-stream.mjs")
        .current_dir(&web)
        .env("LABRACK_URL", &server.url)
        .env(
            "LABRACK_EVENT_CODE",
            event["code"].as_str().unwrap_or_default(),
        )
        .env(
            "LABRACK_JOIN_CODE",
            issued["join_code"].as_str().unwrap_or_default(),
        )
        .env("LABRACK_LAB_USER", &lab.user)
        .env("LABRACK_LAB_DISPLAY", &display)
        .env("LABRACK_MODE_FILE", lab.home.join("mode"))
        .env("LABRACK_FLIPS", options.flips.to_string())
        .env("LABRACK_PHASE_SECS", options.phase_secs.to_string())
        .output()
        .context("running node e2e/bench-stream.mjs")?;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the CPU sampler panicked"))?;
    if !output.status.success() {
        bail!(
            "the browser half failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let browser: Value = serde_json::from_slice(
        output
            .stdout
            .split(|b| *b == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap_or_default(),
    )
    .with_context(|| {
        format!(
            "browser output: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })?;
    // The appliance's CPU share of one core over a phase, from the samples inside it.
    let cpu_share = |from: u64, to: u64| -> Option<f64> {
        let inside: Vec<_> = samples
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .collect();
        let (first, last) = (inside.first()?, inside.last()?);
        let secs = (last.0.saturating_sub(first.0)) as f64 / 1000.0;
        (secs > 0.0).then(|| (last.1.saturating_sub(first.1)) as f64 / 100.0 / secs)
    };

    println!("\nbench stream (end to end, real xrdp + Chromium on this machine):");
    for (size, latency) in browser["latency"].as_object().into_iter().flatten() {
        println!(
            "  glass-to-glass {size:<10} p50 {:>6.1} ms   p95 {:>6.1} ms   ({} samples; last packet in the browser at p50 {:.1} ms; appliance RDP in → frame out {:.1} ms; in the browser: jitter buffer {:.1} ms, decode {:.1} ms a frame)",
            latency["p50_ms"].as_f64().unwrap_or(f64::NAN),
            latency["p95_ms"].as_f64().unwrap_or(f64::NAN),
            latency["samples"].as_array().map_or(0, Vec::len),
            latency["received_p50_ms"].as_f64().unwrap_or(f64::NAN),
            latency["appliance_change_to_send_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
            latency["browser"]["jitter_buffer_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
            latency["browser"]["decode_ms"].as_f64().unwrap_or(f64::NAN),
        );
    }
    let mut phases = serde_json::Map::new();
    for (mode, phase) in browser["phases"].as_object().into_iter().flatten() {
        let share = cpu_share(
            phase["started_at_ms"].as_u64().unwrap_or(0),
            phase["ended_at_ms"].as_u64().unwrap_or(0),
        );
        println!(
            "  720p {mode:<7} sent {:>7.0} kbit/s {:>5.1} fps; received {:>7.0} kbit/s, decoded {:>5.1} fps; appliance CPU {:>5.1} % of a core",
            phase["sent_kbit_per_s"].as_f64().unwrap_or(f64::NAN),
            phase["sent_fps"].as_f64().unwrap_or(f64::NAN),
            phase["kbit_per_s"].as_f64().unwrap_or(f64::NAN),
            phase["fps"].as_f64().unwrap_or(f64::NAN),
            share.unwrap_or(f64::NAN) * 100.0
        );
        let mut phase = phase.clone();
        phase["appliance_cpu_core_share"] = json!(share);
        phases.insert(mode.clone(), phase);
    }
    println!(
        "  concurrent 720p streams in full motion at >= 25 fps each: {sustained} (tried up to {})",
        labs.len()
    );
    let summary = json!({"latency": browser["latency"], "phases": phases, "concurrency": concurrency, "sustained_720p_streams": sustained});
    let out = util::target_dir().join("bench-stream.json");
    std::fs::write(&out, serde_json::to_vec_pretty(&summary)?)?;
    println!("xtask: details in {}", out.display());
    Ok(())
}

fn round(values: &[f64]) -> Vec<f64> {
    values.iter().map(|v| (v * 100.0).round() / 100.0).collect()
}
