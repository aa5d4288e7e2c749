//! The real `labrack-cloud` for end-to-end tests and benchmarks: start it, kill it, read its
//! API, and compare what it holds with an appliance's outbox.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use sha2::Digest as _;

use crate::{Api, client_trusting, labrack_cloud_bin};

/// A running `labrack-cloud serve`.
pub struct Cloud {
    child: Child,
    /// its read API, `https://127.0.0.1:PORT`
    pub http: String,
    /// printed at its first start only
    pub admin_token: Option<String>,
}

impl Cloud {
    /// The test build's `labrack-cloud serve` with its QUIC port on 127.0.0.1.
    pub fn start(data: &Path, quic_port: u16) -> anyhow::Result<Self> {
        Self::start_binary(&labrack_cloud_bin(), data, quic_port)
    }

    /// [`Cloud::start`] with a given `labrack-cloud` (benchmarks use the release build).
    pub fn start_binary(binary: &Path, data: &Path, quic_port: u16) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{quic_port}"),
                "--http-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data)
            .env("LABRACK_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting labrack-cloud")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let (mut http, mut admin_token) = (None, None);
        for line in lines.by_ref() {
            let line = line?;
            if let Some(token) =
                line.strip_prefix("labrack-cloud: admin token for the read API (shown once): ")
            {
                admin_token = Some(token.trim().to_owned());
            }
            if let Some(url) = line.strip_prefix("labrack-cloud: read API on ") {
                http = Some(url.trim().trim_end_matches('/').to_owned());
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Self {
            child,
            http: http.context("the cloud never said where it listens")?,
            admin_token,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill_hard(mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-time enrolment token for an appliance, made by `labrack-cloud enrol-token`.
pub fn enrol_token(data: &Path) -> anyhow::Result<String> {
    enrol_token_binary(&labrack_cloud_bin(), data)
}

/// [`enrol_token`] with a given `labrack-cloud`.
pub fn enrol_token_binary(binary: &Path, data: &Path) -> anyhow::Result<String> {
    let output = Command::new(binary)
        .args(["enrol-token", "--data-dir"])
        .arg(data)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// A GET on the cloud's read API with its admin token.
pub async fn cloud_get(
    cloud_data: &Path,
    http: &str,
    token: &str,
    path: &str,
) -> anyhow::Result<(u16, Value)> {
    let api = Api {
        client: client_trusting(cloud_data)?,
        base: http.to_owned(),
        token: Some(token.to_owned()),
    };
    api.get(path).await
}

/// Count and checksum of the appliance's outbox, computed the way the cloud does.
pub fn appliance_rows(data: &Path) -> anyhow::Result<(i64, String)> {
    let conn = rusqlite::Connection::open(data.join("labrack.db"))?;
    let mut statement = conn.prepare("SELECT seq, kind, entity, body FROM outbox ORDER BY seq")?;
    let rows: Vec<(i64, String, String, String)> = statement
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    for (index, row) in rows.iter().enumerate() {
        anyhow::ensure!(
            row.0 == i64::try_from(index).unwrap_or(0) + 1,
            "the outbox has a gap at {}",
            row.0
        );
    }
    let mut hasher = sha2::Sha256::new();
    for (seq, kind, entity, body) in &rows {
        hasher.update(format!("{seq}\t{kind}\t{entity}\t{body}\n").as_bytes());
    }
    Ok((
        i64::try_from(rows.len()).unwrap_or(0),
        hex::encode(hasher.finalize()),
    ))
}

/// Waits (up to `timeout`) until the cloud holds exactly appliance `appliance_id`'s rows:
/// the same count, all acknowledged, the same checksum. Gives the cloud's summary.
pub async fn converged_within(
    timeout: Duration,
    appliance_id: i64,
    appliance_data: &Path,
    cloud_data: &Path,
    http: &str,
    token: &str,
) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (count, checksum) = appliance_rows(appliance_data)?;
        let summary = cloud_get(
            cloud_data,
            http,
            token,
            &format!("/api/v1/appliances/{appliance_id}/summary"),
        )
        .await
        .ok();
        if let Some((200, body)) = &summary
            && body["rows"] == count
            && body["acked"] == count
            && body["checksum"] == checksum.as_str()
        {
            return Ok(body.clone());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no convergence: appliance {count} rows {checksum}, cloud {summary:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
