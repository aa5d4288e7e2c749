//! API fuzzing: schemathesis (PyPI) against `/api/openapi.json` of a running `labrack serve`,
//! once as a participant and once as the admin, with every schemathesis check (conformance
//! to the document included) and two of ours (`tests/schemathesis/hooks.py`): every error a
//! problem document, and a refused request changes nothing in the database.
//!
//! schemathesis lives in a virtual environment in the build cache, installed once at the
//! pinned version in `tests/schemathesis/requirements.txt`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use labrack_e2e::Api;
use serde_json::json;

use crate::util::{project_root, run, step};

/// How long each credential's run may fuzz (schemathesis's `--max-time`).
pub(crate) const SECONDS_PER_RUN: u64 = 150;
/// Test cases per operation and phase.
const MAX_EXAMPLES: u32 = 25;

fn harness_dir() -> PathBuf {
    project_root().join("tests/schemathesis")
}

fn venv_dir() -> PathBuf {
    crate::util::target_dir().with_file_name("schemathesis-venv")
}

fn schemathesis() -> PathBuf {
    venv_dir().join("bin/st")
}

/// The version `requirements.txt` pins, e.g. `4.32.5`.
fn pinned_version() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(harness_dir().join("requirements.txt"))?;
    text.lines()
        .find_map(|line| line.trim().strip_prefix("schemathesis=="))
        .map(str::to_owned)
        .context("tests/schemathesis/requirements.txt pins no schemathesis version")
}

/// Creates the virtual environment and installs the pinned schemathesis (once; again when
/// the pin changes).
pub(crate) fn ensure_tools() -> anyhow::Result<()> {
    let wanted = pinned_version()?;
    let installed = Command::new(schemathesis()).arg("--version").output();
    if installed.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim().ends_with(&wanted)) {
        return Ok(());
    }
    step(&format!(
        "installing schemathesis {wanted} (PyPI) into {}",
        venv_dir().display()
    ));
    let _ = std::fs::remove_dir_all(venv_dir());
    run(Command::new("python3").args(["-m", "venv"]).arg(venv_dir()))
        .context("creating the schemathesis virtual environment (Debian: python3-venv)")?;
    run(Command::new(venv_dir().join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(harness_dir().join("requirements.txt")))
    .context("installing schemathesis from PyPI")
}

/// The credentials the runs use.
struct Seeded {
    admin_token: String,
    participant_token: String,
}

/// An event that is live, two teams with a participant each, the admin's password set.
async fn seed(server: &labrack_e2e::Server, data: &Path) -> anyhow::Result<Seeded> {
    let client = labrack_e2e::client_trusting(data)?;
    let mut admin = Api {
        client: client.clone(),
        base: server.url.clone(),
        token: None,
    };
    let otp = server
        .admin_password
        .as_deref()
        .context("the server printed no one-time admin password")?;
    admin
        .first_admin_login(otp, "schemathesis-admin-password")
        .await?;
    let (status, event) = admin
        .post("/api/v1/events", json!({"name": "Fuzzing night", "starts_at": "2026-01-01T09:00:00Z", "ends_at": "2099-01-01T18:00:00Z"}))
        .await?;
    anyhow::ensure!(status == 201, "creating the event: {status} {event}");
    let event_id = event["id"].as_i64().context("event id")?;
    let event_code = event["code"].as_str().context("event code")?.to_owned();
    let mut codes = Vec::new();
    for team in ["Red", "Blue"] {
        let (status, created) = admin
            .post(
                &format!("/api/v1/events/{event_id}/teams"),
                json!({"name": team}),
            )
            .await?;
        anyhow::ensure!(status == 201, "creating team {team}: {status} {created}");
        let team_id = created["id"].as_i64().context("team id")?;
        let (status, issued) = admin
            .post(
                &format!("/api/v1/events/{event_id}/participants"),
                json!({"team_id": team_id, "name": format!("{team} One"), "email": null}),
            )
            .await?;
        anyhow::ensure!(
            status == 201,
            "adding a participant to {team}: {status} {issued}"
        );
        codes.push(
            issued["join_code"]
                .as_str()
                .context("join code")?
                .to_owned(),
        );
    }
    let (status, body) = admin
        .post(
            &format!("/api/v1/events/{event_id}/transition"),
            json!({"from": "draft", "to": "live"}),
        )
        .await?;
    anyhow::ensure!(status == 200, "opening the event: {status} {body}");
    // the second team's participant: the one whose team fuzzing as a participant may reach
    let participant = Api {
        client,
        base: server.url.clone(),
        token: None,
    };
    let (status, joined) = participant
        .post(
            "/api/v1/join",
            json!({"event_code": event_code, "join_code": codes[1], "bearer": true}),
        )
        .await?;
    anyhow::ensure!(status == 200, "joining: {status} {joined}");
    Ok(Seeded {
        admin_token: admin.token.context("admin token")?,
        participant_token: joined["token"]
            .as_str()
            .context("participant token")?
            .to_owned(),
    })
}

/// `cargo xtask api-fuzz [--seconds N]`: the test command's step on its own, longer if asked.
pub(crate) fn cmd_api_fuzz(args: &[String]) -> anyhow::Result<()> {
    let seconds = match args {
        [] => SECONDS_PER_RUN,
        [flag, n] if flag == "--seconds" => n.parse().context("--seconds takes a number")?,
        _ => bail!("usage: cargo xtask api-fuzz [--seconds N]"),
    };
    ensure_tools()?;
    run_for(seconds)
}

/// Starts a server on a fresh data dir and runs schemathesis as a participant, then as the
/// admin (in that order: the admin's run may sign participants out).
pub(crate) fn test_run() -> anyhow::Result<()> {
    run_for(SECONDS_PER_RUN)
}

fn run_for(seconds: u64) -> anyhow::Result<()> {
    let data = crate::util::temp_dir("schemathesis")?;
    let server =
        crate::util::start_server(&crate::util::target_dir().join("debug/labrack"), &data)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let seeded = runtime.block_on(seed(&server, &data))?;
    let reports = crate::util::target_dir().join("schemathesis");
    let mut failed = Vec::new();
    for (who, token) in [
        ("participant", &seeded.participant_token),
        ("admin", &seeded.admin_token),
    ] {
        step(&format!("schemathesis as {who} ({seconds} s at most)"));
        if let Err(error) =
            schemathesis_run(&server.url, &data, who, token, seconds, &reports.join(who))
        {
            eprintln!("xtask: {error:#}");
            failed.push(who);
        }
    }
    let status = server.terminate()?;
    anyhow::ensure!(
        status.success(),
        "labrack exited with {status} after SIGTERM"
    );
    if !failed.is_empty() {
        bail!(
            "schemathesis found failures as {} (reports in {})",
            failed.join(" and "),
            reports.display()
        );
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

fn schemathesis_run(
    url: &str,
    data: &Path,
    who: &str,
    token: &str,
    seconds: u64,
    report_dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(report_dir)?;
    let mut command = Command::new(schemathesis());
    command
        .current_dir(harness_dir())
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("PYTHONPATH", harness_dir())
        .env("LABRACK_DB", data.join("labrack.db"))
        .arg("run")
        .arg(format!("{url}/api/openapi.json"))
        .args([
            "--checks",
            "all",
            "--workers",
            "1",
            "--max-examples",
            &MAX_EXAMPLES.to_string(),
        ])
        .args([
            "--max-time",
            &seconds.to_string(),
            "--seed",
            "20261202",
            "--request-timeout",
            "30",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .arg("--tls-verify")
        .arg(labrack_e2e::Server::ca_cert(data))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        // ends the very session the run authenticates with; the API tests cover it
        .args(["--exclude-path", "/api/v1/auth/logout"])
        .args(["--report", "junit", "--report-dir"])
        .arg(report_dir)
        .args(["--warnings", "off"]);
    run(&mut command).with_context(|| format!("schemathesis as {who}"))
}
