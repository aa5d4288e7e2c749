//! The power-cut drill: a scripted event against the real appliance, a real lab host and the
//! real cloud (through a lossy UDP proxy), while `kill -9` hits one of the three at random
//! moments and it comes back a moment later. Then nothing may be lost and nothing doubled:
//!
//! - every write a client was told succeeded (submissions, ledger credits, judges' scores)
//!   is in the appliance's database exactly once; a write whose answer never came is there
//!   at most once (clients retry only what is idempotent: a submission's version);
//! - no check ran twice for one batch and team, and every batch finished;
//! - the cloud holds exactly the appliance's outbox: the same count and checksum.
//!
//! Shared by the drill test (a couple of minutes, debug builds) and `cargo xtask bench
//! drill --minutes N` (release builds).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::Rng as _;
use serde_json::{Value, json};

use crate::cloud::{Cloud, converged_within, enrol_token_binary};
use crate::{
    Api, DataDir, Faults, LabHost, LabUsers, Server, UdpFaultProxy, client_trusting,
    enrol_host_binary, free_port,
};

/// What to run and for how long.
pub struct DrillOptions {
    pub labrack: PathBuf,
    pub labrack_host: PathBuf,
    pub duration: Duration,
    /// mean time between two kills
    pub kill_every: Duration,
    pub teams: usize,
}

/// What the drill did and found.
#[derive(Debug, Default)]
pub struct DrillReport {
    pub kills: BTreeMap<&'static str, usize>,
    pub acknowledged: BTreeMap<&'static str, usize>,
    pub unanswered: BTreeMap<&'static str, usize>,
    pub check_batches: usize,
    pub check_runs: i64,
    pub outbox_rows: i64,
    pub catch_up: Duration,
    /// every broken promise found; empty when the drill passed
    pub problems: Vec<String>,
}

impl std::fmt::Display for DrillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "kills: {:?}", self.kills)?;
        writeln!(f, "acknowledged writes: {:?}", self.acknowledged)?;
        writeln!(f, "writes never answered: {:?}", self.unanswered)?;
        writeln!(
            f,
            "check batches: {} ({} runs); outbox rows {} matched by the cloud {:.1} s after the last kill",
            self.check_batches,
            self.check_runs,
            self.outbox_rows,
            self.catch_up.as_secs_f64()
        )?;
        if self.problems.is_empty() {
            write!(f, "nothing lost, nothing twice")
        } else {
            write!(f, "PROBLEMS:\n  {}", self.problems.join("\n  "))
        }
    }
}

/// One write a client attempted, and whether it was told it succeeded.
#[derive(Debug, Clone)]
struct Attempt {
    kind: &'static str,
    team_id: i64,
    /// what identifies it in the database: a version, a ledger note, a judge's comment
    key: String,
    acknowledged: bool,
}

/// The three processes, each restartable.
struct Rack {
    labrack: PathBuf,
    labrack_host: PathBuf,
    data: PathBuf,
    cloud_data: PathBuf,
    host_state: PathBuf,
    skeletons: PathBuf,
    listen: String,
    quic_port: u16,
    server_args: Vec<String>,
    server: Option<Server>,
    host: Option<LabHost>,
    cloud: Option<Cloud>,
    users: LabUsers,
}

impl Rack {
    fn start_server(&mut self) -> anyhow::Result<()> {
        let args: Vec<&str> = self.server_args.iter().map(String::as_str).collect();
        self.server = Some(Server::start_binary(
            &self.labrack,
            &self.data,
            &self.listen,
            &args,
        )?);
        Ok(())
    }

    fn start_host(&mut self) -> anyhow::Result<()> {
        self.host = Some(LabHost::start_binary(
            &self.labrack_host,
            &self.host_state,
            &self.users,
            &self.skeletons,
            &[("LABRACK_HOST_QUIET", "1")],
            &[],
        )?);
        Ok(())
    }

    fn start_cloud(&mut self) -> anyhow::Result<()> {
        self.cloud = Some(Cloud::start_binary(
            &self.labrack.with_file_name("labrack-cloud"),
            &self.cloud_data,
            self.quic_port,
        )?);
        Ok(())
    }

    fn kill(&mut self, victim: &str) -> anyhow::Result<()> {
        match victim {
            "appliance" => self.server.take().map(Server::kill_hard).transpose()?,
            "lab host" => self.host.take().map(LabHost::kill_hard).transpose()?,
            _ => self.cloud.take().map(Cloud::kill_hard).transpose()?,
        };
        Ok(())
    }

    fn restart(&mut self, victim: &str) -> anyhow::Result<()> {
        match victim {
            "appliance" => self.start_server(),
            "lab host" => self.start_host(),
            _ => self.start_cloud(),
        }
    }
}

/// Runs the drill; an error means it could not run, problems found are in the report.
pub async fn run(options: &DrillOptions) -> anyhow::Result<DrillReport> {
    let data = DataDir::new("drill");
    let cloud_data = DataDir::new("drill-cloud");
    let host_state = DataDir::new("drill-host");
    let skeletons = DataDir::new("drill-skel");
    std::fs::create_dir_all(skeletons.0.join("desk"))?;
    std::fs::write(skeletons.0.join("desk/README.txt"), "drill\n")?;
    let quic_port = free_port()?;
    let token = enrol_token_binary(
        &options.labrack.with_file_name("labrack-cloud"),
        &cloud_data.0,
    )?;
    let proxy = UdpFaultProxy::start(format!("127.0.0.1:{quic_port}").parse()?).await?;
    proxy.set(Faults {
        drop_percent: 3,
        delay_ms: 5,
        reorder_percent: 5,
        duplicate_percent: 2,
        partitioned: false,
    });
    let ca = cloud_data.0.join("tls/ca.pem");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut rack = Rack {
        labrack: options.labrack.clone(),
        labrack_host: options.labrack_host.clone(),
        data: data.0.clone(),
        cloud_data: cloud_data.0.clone(),
        host_state: host_state.0.clone(),
        skeletons: skeletons.0.clone(),
        listen: listen.clone(),
        quic_port,
        server_args: [
            "--cloud",
            &format!("127.0.0.1:{}", proxy.port),
            "--cloud-ca",
            ca.to_str().context("utf8")?,
            "--cloud-token",
            &token,
            "--cloud-name",
            "drill-rack",
            "--host-heartbeat-secs",
            "1",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
        server: None,
        host: None,
        cloud: None,
        users: LabUsers::new(),
    };
    rack.start_cloud()?;
    let cloud_token = rack
        .cloud
        .as_ref()
        .and_then(|c| c.admin_token.clone())
        .context("the cloud's admin token at first start")?;
    rack.start_server()?;
    let server = rack.server.as_ref().context("server")?;
    let base = server.url.trim_end_matches('/').to_owned();
    let mut admin = Api {
        client: client_trusting(&data.0)?,
        base: base.clone(),
        token: None,
    };
    admin
        .first_admin_login(
            server.admin_password.as_deref().context("otp")?,
            "a-strong-admin-password",
        )
        .await?;
    let event_id = setup_event(&admin, &skeletons.0).await?;
    let (_, enrolment) = admin
        .post("/api/v1/hosts/enrolment-tokens", json!({}))
        .await?;
    let (ok, text) = enrol_host_binary(
        &options.labrack_host,
        &base,
        &data.0,
        enrolment["token"].as_str().context("token")?,
        "drill-host",
        &host_state.0,
    )?;
    anyhow::ensure!(ok, "{text}");
    rack.start_host()?;
    let participants = roster(&admin, &base, event_id, options.teams, &data.0).await?;
    for (team_id, _) in &participants {
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
    }

    // The event: clients at work until the end, kills meanwhile.
    let attempts = Arc::new(Mutex::new(Vec::<Attempt>::new()));
    let batches = Arc::new(Mutex::new(Vec::<i64>::new()));
    let until = Instant::now() + options.duration;
    let mut clients = Vec::new();
    for (team_id, token) in participants.iter().cloned() {
        let participant = Api {
            client: client_trusting(&data.0)?,
            base: base.clone(),
            token: Some(token),
        };
        clients.push(tokio::spawn(participant_work(
            participant,
            team_id,
            until,
            attempts.clone(),
            batches.clone(),
        )));
    }
    let team_ids: Vec<i64> = participants.iter().map(|(t, _)| *t).collect();
    clients.push(tokio::spawn(staff_work(
        admin.clone(),
        event_id,
        team_ids,
        until,
        attempts.clone(),
    )));
    let mut report = DrillReport::default();
    let mut last_kill = Instant::now();
    loop {
        let gap = {
            let mut rng = rand::thread_rng();
            let mean = options.kill_every.as_millis() as u64;
            Duration::from_millis(rng.gen_range(mean / 2..=mean * 3 / 2))
        };
        if Instant::now() + gap >= until {
            break;
        }
        tokio::time::sleep(gap).await;
        let (victim, down) = {
            let mut rng = rand::thread_rng();
            (
                ["appliance", "lab host", "cloud"][rng.gen_range(0..3)],
                Duration::from_millis(rng.gen_range(200..2_500)),
            )
        };
        rack.kill(victim)?;
        *report.kills.entry(victim).or_default() += 1;
        last_kill = Instant::now();
        tokio::time::sleep(down).await;
        rack.restart(victim)?;
    }
    for client in clients {
        client.await??;
    }
    let admin = Api {
        client: client_trusting(&data.0)?,
        base: base.clone(),
        token: admin.token.clone(),
    };

    // Every batch finishes (the host's and the appliance's kills delayed some).
    let batch_ids = batches
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    report.check_batches = batch_ids.len();
    for batch in &batch_ids {
        let done = admin
            .wait_for(
                &format!("/api/v1/check-batches/{batch}"),
                Duration::from_secs(180),
                |b| b["done"] == true,
            )
            .await;
        if let Err(e) = done {
            report
                .problems
                .push(format!("check batch {batch} never finished: {e}"));
        }
    }
    // The cloud catches up with everything.
    let http = rack.cloud.as_ref().context("cloud")?.http.clone();
    match converged_within(
        Duration::from_secs(180),
        1,
        &data.0,
        &cloud_data.0,
        &http,
        &cloud_token,
    )
    .await
    {
        Ok(summary) => {
            report.outbox_rows = summary["rows"].as_i64().unwrap_or(0);
            report.catch_up = last_kill.elapsed();
        }
        Err(e) => report
            .problems
            .push(format!("the cloud did not converge: {e}")),
    }
    let attempts = attempts
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    compare(&data.0, event_id, &attempts, &mut report)?;
    drop(rack);
    drop(proxy);
    Ok(report)
}

/// A live event with a `desk` template of two trivial checks.
async fn setup_event(admin: &Api, skeletons: &Path) -> anyhow::Result<i64> {
    let (status, event) = admin.post("/api/v1/events", json!({"name": "Drill", "starts_at": "2026-01-01T09:00:00Z", "ends_at": "2099-01-01T09:00:00Z"})).await?;
    anyhow::ensure!(status == 201, "{event}");
    let event_id = event["id"].as_i64().context("event id")?;
    let (status, body) = admin
        .post(
            &format!("/api/v1/events/{event_id}/transition"),
            json!({"to": "live"}),
        )
        .await?;
    anyhow::ensure!(status == 200, "{body}");
    let template = format!(
        "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n\
         [[template.check]]\nname = \"builds\"\nscript = \"true\"\ntimeout_secs = 10\ndimension = \"functionality\"\n\
         [[template.check]]\nname = \"tests\"\nscript = \"sleep 1\"\ntimeout_secs = 10\ndimension = \"functionality\"\n",
        skeletons.join("desk").display()
    );
    let (status, body) = admin.put_toml("/api/v1/templates", &template).await?;
    anyhow::ensure!(status == 200, "{body}");
    Ok(event_id)
}

/// `teams` teams of one participant each, joined: (team id, bearer token).
async fn roster(
    admin: &Api,
    base: &str,
    event_id: i64,
    teams: usize,
    data: &Path,
) -> anyhow::Result<Vec<(i64, String)>> {
    let (_, event) = admin.get(&format!("/api/v1/events/{event_id}")).await?;
    let code = event["code"].as_str().context("event code")?.to_owned();
    let mut csv = String::from("team,name,email\n");
    for n in 0..teams {
        csv.push_str(&format!("Team {n},Member {n},\n"));
    }
    let (status, imported) = admin
        .post_csv(
            &format!("/api/v1/events/{event_id}/participants/import"),
            &csv,
        )
        .await?;
    anyhow::ensure!(status == 200, "{imported}");
    let client = client_trusting(data)?;
    let mut joined = Vec::new();
    for p in imported["participants"]
        .as_array()
        .context("participants")?
    {
        let body: Value = client
            .post(format!("{base}/api/v1/join"))
            .json(&json!({"event_code": code, "join_code": p["join_code"], "bearer": true}))
            .send()
            .await?
            .json()
            .await?;
        let token = body["token"].as_str().context("join token")?.to_owned();
        let me = Api {
            client: client.clone(),
            base: base.to_owned(),
            token: Some(token.clone()),
        };
        let (_, view) = me.get("/api/v1/me").await?;
        joined.push((view["team"]["id"].as_i64().context("team id")?, token));
    }
    Ok(joined)
}

fn record(attempts: &Mutex<Vec<Attempt>>, attempt: Attempt) {
    if let Ok(mut attempts) = attempts.lock() {
        attempts.push(attempt);
    }
}

/// A participant: a new version every 11 s (retried until answered: the same version is
/// idempotent), its checks every 35 s.
async fn participant_work(
    me: Api,
    team_id: i64,
    until: Instant,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    batches: Arc<Mutex<Vec<i64>>>,
) -> anyhow::Result<()> {
    let mut version = 0;
    let mut next_checks = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        version += 1;
        let key = format!("v{version}");
        let mut acknowledged = false;
        let tried_until = Instant::now() + Duration::from_secs(11);
        while !acknowledged && Instant::now() < tried_until.min(until) {
            match me
                .post("/api/v1/me/submissions", json!({"version": key}))
                .await
            {
                Ok((200 | 201, _)) => acknowledged = true,
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        record(
            &attempts,
            Attempt {
                kind: "submission",
                team_id,
                key,
                acknowledged,
            },
        );
        if Instant::now() >= next_checks {
            if let Ok((201, queued)) = me.post("/api/v1/me/checks/run", json!({})).await
                && let Some(batch) = queued["batch_id"].as_i64()
                && let Ok(mut batches) = batches.lock()
            {
                batches.push(batch);
            }
            next_checks = Instant::now() + Duration::from_secs(35);
        }
        let left = tried_until.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(until.saturating_duration_since(Instant::now()))).await;
    }
    Ok(())
}

/// Staff: a ledger credit for a team every 700 ms and a judge's score every 1.5 s, each
/// sent once (neither is idempotent, so an unanswered one is not retried).
async fn staff_work(
    admin: Api,
    event_id: i64,
    teams: Vec<i64>,
    until: Instant,
    attempts: Arc<Mutex<Vec<Attempt>>>,
) -> anyhow::Result<()> {
    let mut n = 0usize;
    while Instant::now() < until {
        n += 1;
        let team_id = teams[n % teams.len()];
        let note = format!("drill credit {n}");
        let answer = admin
            .post(
                &format!("/api/v1/events/{event_id}/ledger"),
                json!({"kind": "credit", "team_id": team_id, "amount_cents": 100, "note": note}),
            )
            .await;
        record(
            &attempts,
            Attempt {
                kind: "ledger credit",
                team_id,
                key: note,
                acknowledged: matches!(answer, Ok((201, _))),
            },
        );
        if n.is_multiple_of(2) {
            let comment = format!("drill score {n}");
            let answer = admin
                .post(
                    &format!("/api/v1/teams/{team_id}/judge-scores"),
                    json!({"scores": {"functionality": n % 11}, "comment": comment}),
                )
                .await;
            record(
                &attempts,
                Attempt {
                    kind: "judge score",
                    team_id,
                    key: comment,
                    acknowledged: matches!(answer, Ok((200, _))),
                },
            );
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    Ok(())
}

/// Each attempt against the database: acknowledged exactly once, unanswered at most once;
/// no check run twice for one batch.
fn compare(
    data: &Path,
    event_id: i64,
    attempts: &[Attempt],
    report: &mut DrillReport,
) -> anyhow::Result<()> {
    let conn = rusqlite::Connection::open_with_flags(
        data.join("labrack.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    for attempt in attempts {
        let stored: i64 = match attempt.kind {
            "submission" => conn.query_row(
                "SELECT count(*) FROM submissions WHERE team_id = ?1 AND version = ?2",
                rusqlite::params![attempt.team_id, attempt.key],
                |r| r.get(0),
            )?,
            "ledger credit" => conn.query_row(
                "SELECT count(*) FROM billing_ledger WHERE event_id = ?1 AND team_id = ?2 AND note = ?3",
                rusqlite::params![event_id, attempt.team_id, attempt.key],
                |r| r.get(0),
            )?,
            _ => conn.query_row(
                "SELECT count(*) FROM judge_scores WHERE event_id = ?1 AND team_id = ?2 AND comment = ?3",
                rusqlite::params![event_id, attempt.team_id, attempt.key],
                |r| r.get(0),
            )?,
        };
        let counts = if attempt.acknowledged {
            &mut report.acknowledged
        } else {
            &mut report.unanswered
        };
        *counts.entry(attempt.kind).or_default() += 1;
        if attempt.acknowledged && stored != 1 {
            report.problems.push(format!(
                "{} {:?} of team {} was acknowledged and is stored {stored} times",
                attempt.kind, attempt.key, attempt.team_id
            ));
        }
        if !attempt.acknowledged && stored > 1 {
            report.problems.push(format!(
                "{} {:?} of team {} was never answered and is stored {stored} times",
                attempt.kind, attempt.key, attempt.team_id
            ));
        }
    }
    report.check_runs = conn.query_row("SELECT count(*) FROM check_runs", [], |r| r.get(0))?;
    let twice: Vec<(i64, i64, String, i64)> = conn
        .prepare(
            "SELECT batch_id, team_id, check_name, count(*) FROM check_runs
             GROUP BY batch_id, team_id, check_name HAVING count(*) > 1",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    for (batch, team, check, count) in twice {
        report.problems.push(format!(
            "check {check:?} of team {team} ran {count} times in batch {batch}"
        ));
    }
    Ok(())
}
