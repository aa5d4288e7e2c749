//! Fixtures the lab-host test binaries share: an appliance with an event, two teams and a
//! `desk` template; lab hosts with a per-run user prefix; signing host calls; a team's own
//! server inside its lab; checks and their batches.

#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use labrack_e2e::{Api, DataDir, LabHost, LabUsers, Server, client_trusting, enrol_host};
use ring::signature::Ed25519KeyPair;
use serde_json::{Value, json};
use sha2::Digest as _;

pub const LONG: Duration = Duration::from_secs(40);

pub struct Fixture {
    pub data: DataDir,
    /// the hosts' skeleton root; the `desk` template's skeleton is `desk/` in it
    pub skeletons: DataDir,
    pub server: Option<Server>,
    pub url: String,
    pub admin: Api,
    pub event_id: i64,
    pub team_id: i64,
    pub other_team_id: i64,
    pub users: LabUsers,
}

pub fn write_skeleton(dir: &Path) {
    std::fs::create_dir_all(dir.join("project")).expect("skeleton dir");
    std::fs::write(dir.join("README.txt"), "welcome to the lab\n").expect("readme");
    std::fs::write(dir.join("project/main.py"), "print('hello')\n").expect("main.py");
    std::fs::write(dir.join(".xsession"), "exec xterm\n").expect(".xsession");
}

pub async fn fixture(tag: &str, listen: &str) -> anyhow::Result<Fixture> {
    fixture_with(tag, listen, &[]).await
}

/// [`fixture`] with extra `labrack serve` arguments.
pub async fn fixture_with(tag: &str, listen: &str, extra: &[&str]) -> anyhow::Result<Fixture> {
    let data = DataDir::new(tag);
    let skeletons = DataDir::new(&format!("{tag}-skel"));
    write_skeleton(&skeletons.0.join("desk"));
    let web = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../web/dist")
        .display()
        .to_string();
    let mut args = vec![
        "--host-heartbeat-secs",
        "1",
        "--web-dir",
        &web,
        "--webrtc-bind",
        "127.0.0.1:0",
        "--job-attempts",
        "run_check=2",
    ];
    args.extend_from_slice(extra);
    let server = Server::start_with(&data.0, listen, &args)?;
    let mut admin = Api {
        client: client_trusting(&data.0)?,
        base: server.url.clone(),
        token: None,
    };
    admin
        .first_admin_login(
            server.admin_password.as_deref().expect("otp"),
            "a-strong-admin-password",
        )
        .await?;
    let (status, event) = admin
        .post("/api/v1/events", json!({"name": "Lab Day", "starts_at": "2026-12-01T09:00:00Z", "ends_at": "2099-12-02T18:00:00Z"}))
        .await?;
    anyhow::ensure!(status == 201, "{event}");
    let event_id = event["id"].as_i64().expect("event id");
    let (_, red) = admin
        .post(
            &format!("/api/v1/events/{event_id}/teams"),
            json!({"name": "Red"}),
        )
        .await?;
    let (_, blue) = admin
        .post(
            &format!("/api/v1/events/{event_id}/teams"),
            json!({"name": "Blue"}),
        )
        .await?;
    let templates = format!(
        "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n",
        skeletons.0.join("desk").display()
    );
    let (status, body) = admin.put_toml("/api/v1/templates", &templates).await?;
    anyhow::ensure!(status == 200, "{body}");
    Ok(Fixture {
        data,
        skeletons,
        url: server.url.clone(),
        server: Some(server),
        admin,
        event_id,
        team_id: red["id"].as_i64().expect("team id"),
        other_team_id: blue["id"].as_i64().expect("team id"),
        users: LabUsers::new(),
    })
}

impl Fixture {
    pub async fn token(&self) -> anyhow::Result<String> {
        let (status, body) = self
            .admin
            .post("/api/v1/hosts/enrolment-tokens", json!({"note": "rack 1"}))
            .await?;
        anyhow::ensure!(status == 201, "{body}");
        Ok(body["token"].as_str().expect("token").to_owned())
    }

    pub async fn enrol(&self, name: &str, state: &Path) -> anyhow::Result<()> {
        let token = self.token().await?;
        let (ok, text) = enrol_host(&self.url, &self.data.0, &token, name, state)?;
        anyhow::ensure!(ok, "enrol failed: {text}");
        Ok(())
    }

    pub fn start_host(&self, state: &Path, env: &[(&str, &str)]) -> anyhow::Result<LabHost> {
        LabHost::start(state, &self.users, &self.skeletons.0, env, &[])
    }

    /// A skeleton `name` under the hosts' skeleton root, filled like the default one.
    pub fn skeleton(&self, name: &str) -> std::path::PathBuf {
        let dir = self.skeletons.0.join(name);
        write_skeleton(&dir);
        dir
    }

    pub async fn allocate(&self, team_id: i64) -> anyhow::Result<i64> {
        let (status, body) = self
            .admin
            .post(
                &format!("/api/v1/teams/{team_id}/allocation"),
                json!({"template": "desk"}),
            )
            .await?;
        anyhow::ensure!(status == 201, "allocate: {status} {body}");
        Ok(body["id"].as_i64().expect("allocation id"))
    }

    pub async fn wait_state(&self, id: i64, state: &str) -> anyhow::Result<Value> {
        let want = state.to_owned();
        self.admin
            .wait_for(&format!("/api/v1/allocations/{id}"), LONG, move |a| {
                a["state"] == want.as_str() && a["busy"] == false
            })
            .await
    }

    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.data.0.join("labrack.db"))
            .expect("open the appliance's database")
    }

    /// `node SCRIPT` in web/ with what every Chromium driver needs: the appliance's URL and
    /// the event and personal codes of a new participant of the Red team named `name`.
    pub async fn chromium_driver(
        &self,
        script: &str,
        name: &str,
    ) -> anyhow::Result<tokio::process::Command> {
        let (_, event) = self
            .admin
            .get(&format!("/api/v1/events/{}", self.event_id))
            .await?;
        let (status, issued) = self
            .admin
            .post(
                &format!("/api/v1/events/{}/participants", self.event_id),
                json!({"team_id": self.team_id, "name": name}),
            )
            .await?;
        anyhow::ensure!(status == 201, "{issued}");
        let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
        anyhow::ensure!(
            web.join("node_modules/playwright-core").exists(),
            "run `npm ci` in web/ (cargo xtask test does)"
        );
        let mut command = tokio::process::Command::new("node");
        command
            .arg(script)
            .current_dir(&web)
            .env("LABRACK_URL", &self.url)
            .env(
                "LABRACK_EVENT_CODE",
                event["code"].as_str().unwrap_or_default(),
            )
            .env(
                "LABRACK_JOIN_CODE",
                issued["join_code"].as_str().unwrap_or_default(),
            );
        if let Some(dir) = std::env::var_os("LABRACK_SCREENSHOT_DIR") {
            command.env("LABRACK_SCREENSHOT_DIR", dir);
        }
        Ok(command)
    }

    pub async fn participant(&self, team_id: i64) -> anyhow::Result<Api> {
        let (_, event) = self
            .admin
            .get(&format!("/api/v1/events/{}", self.event_id))
            .await?;
        let (status, issued) = self
            .admin
            .post(
                &format!("/api/v1/events/{}/participants", self.event_id),
                json!({"team_id": team_id, "name": format!("p{team_id}")}),
            )
            .await?;
        anyhow::ensure!(status == 201, "{issued}");
        let mut api = Api {
            client: self.admin.client.clone(),
            base: self.url.clone(),
            token: None,
        };
        let (status, joined) = api
            .post("/api/v1/join", json!({"event_code": event["code"], "join_code": issued["join_code"], "bearer": true}))
            .await?;
        anyhow::ensure!(status == 200, "{joined}");
        api.token = joined["token"].as_str().map(str::to_owned);
        Ok(api)
    }
}

/// Signs host-protocol calls with a host's key, as `labrack-host` does: as one agent
/// instance, counting its calls.
pub struct Signer {
    pub host_id: i64,
    pub key: Ed25519KeyPair,
    pub instance: String,
    pub counter: std::sync::atomic::AtomicU64,
}

impl Signer {
    pub fn load(state: &Path) -> anyhow::Result<Self> {
        let config: toml::Table =
            toml::from_str(&std::fs::read_to_string(state.join("host.toml"))?)?;
        let key = Ed25519KeyPair::from_pkcs8(&std::fs::read(state.join("host.key"))?)
            .map_err(|_| anyhow::anyhow!("key"))?;
        let instance = format!("{:016x}", rand::random::<u64>());
        Ok(Self {
            host_id: config["host_id"].as_integer().expect("host_id"),
            key,
            instance,
            counter: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn header(&self, claimed_host: i64, path: &str, body: &[u8]) -> String {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        self.header_numbered(claimed_host, path, body, n)
    }

    pub fn header_numbered(&self, claimed_host: i64, path: &str, body: &[u8], n: u64) -> String {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis();
        let digest = hex::encode(sha2::Sha256::digest(body));
        let message = format!(
            "labrack-host-v2\nPOST\n{path}\n{ts}\n{}\n{n}\n{digest}",
            self.instance
        );
        let sig = base64::engine::general_purpose::STANDARD
            .encode(self.key.sign(message.as_bytes()).as_ref());
        format!(
            "LabrackHost host={claimed_host},ts={ts},i={},n={n},sig={sig}",
            self.instance
        )
    }

    pub async fn post(
        &self,
        api: &Api,
        claimed_host: i64,
        path: &str,
        body: &Value,
    ) -> anyhow::Result<(u16, Value)> {
        let bytes = serde_json::to_vec(body)?;
        let response = api
            .client
            .post(format!("{}{path}", api.base))
            .header("content-type", "application/json")
            .header("authorization", self.header(claimed_host, path, &bytes))
            .body(bytes)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }
}

/// A tiny HTTP server run as the lab user inside its box's network namespace (as a team's
/// own server would be), answering `body` on `port` of every address the lab has.
pub fn serve_in_lab(user: &str, port: u16, body: &str) -> anyhow::Result<Killed> {
    let script = format!(
        "import http.server\nclass H(http.server.BaseHTTPRequestHandler):\n  def do_GET(self):\n    self.send_response(200); self.end_headers(); self.wfile.write(b{body:?})\n  def log_message(self, *a): pass\nhttp.server.HTTPServer(('0.0.0.0', {port}), H).serve_forever()\n"
    );
    let child = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{user}"),
            "--",
            "runuser",
            "-u",
            user,
            "--",
            "python3",
            "-c",
            &script,
        ])
        .spawn()
        .context("starting the lab's server")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let up = Command::new("ip")
            .args([
                "netns",
                "exec",
                user,
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/127.0.0.1/{port}"),
            ])
            .stderr(std::process::Stdio::null())
            .status()?;
        if up.success() {
            return Ok(Killed(child));
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the lab's server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when dropped.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Replaces the templates with `desk` carrying `checks` (TOML `[[template.check]]` tables).
pub async fn put_checks(fx: &Fixture, checks: &str) -> anyhow::Result<()> {
    let templates = format!(
        "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n{checks}",
        fx.skeletons.0.join("desk").display()
    );
    let (status, body) = fx.admin.put_toml("/api/v1/templates", &templates).await?;
    anyhow::ensure!(status == 200, "{body}");
    Ok(())
}

/// Waits until every run of the batch has ended; rides over an appliance restart.
pub async fn wait_batch(fx: &Fixture, batch: i64) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let last = fx
            .admin
            .get(&format!("/api/v1/check-batches/{batch}"))
            .await;
        if let Ok((200, body)) = &last
            && body["done"] == true
        {
            return Ok(body.clone());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "batch {batch} did not finish: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn run_by_name<'a>(runs: &'a Value, name: &str) -> &'a Value {
    runs.as_array()
        .and_then(|runs| runs.iter().find(|r| r["check"] == name))
        .unwrap_or(&Value::Null)
}

/// A Linux account with a password and a home, as a venue's own machine would have.
pub fn make_account(name: &str, password: &str, extra: &[&str]) -> anyhow::Result<()> {
    anyhow::ensure!(
        Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/bash"])
            .args(extra)
            .arg(name)
            .status()?
            .success(),
        "useradd {name}"
    );
    let mut chpasswd = Command::new("chpasswd")
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write as _;
    chpasswd
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{name}:{password}\n").as_bytes())?;
    anyhow::ensure!(chpasswd.wait()?.success(), "chpasswd");
    Ok(())
}

/// Runs `script` (bash) as the lab's team, where the team's own shell runs: inside the
/// lab's box (its mount, UTS, IPC, network and PID namespaces), in the box's cgroup, as the
/// lab user. Returns its output, stdout and stderr together.
pub fn as_team(user: &str, script: &str) -> anyhow::Result<(bool, String)> {
    let procs = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/labrack/{user}/box/cgroup.procs"
    ))
    .context("the lab's box is not running")?;
    let pid = procs
        .lines()
        .next()
        .context("the lab's box is empty")?
        .trim()
        .to_owned();
    let join = format!(
        "for c in pids memory cpu devices freezer blkio; do [ -d /sys/fs/cgroup/$c/labrack/{user}/box ] && echo 0 > /sys/fs/cgroup/$c/labrack/{user}/box/cgroup.procs; done; exec runuser -u {user} -- /bin/bash -c \"$1\""
    );
    let output = Command::new("nsenter")
        .args([
            "-t", &pid, "-m", "-u", "-i", "-n", "-p", "--", "/bin/sh", "-c", &join, "sh", script,
        ])
        .output()
        .context("entering the lab's box")?;
    Ok((
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    ))
}

/// Fake NVIDIA device nodes (`mknod`, major 195) for a machine without a GPU: opening an
/// allowed one fails with ENXIO (no driver), a denied one with EPERM (the lab's cgroup).
/// Removes the nodes it made when dropped.
pub struct FakeGpus(Vec<std::path::PathBuf>);

impl FakeGpus {
    pub fn make(count: u32) -> anyhow::Result<Self> {
        let mut made = Vec::new();
        let nodes = (0..count)
            .map(|n| (format!("/dev/nvidia{n}"), n))
            .chain([("/dev/nvidiactl".to_owned(), 255)]);
        for (path, minor) in nodes {
            if Path::new(&path).exists() {
                continue;
            }
            let status = Command::new("mknod")
                .args(["-m", "666", &path, "c", "195", &minor.to_string()])
                .status()?;
            anyhow::ensure!(status.success(), "mknod {path}");
            made.push(std::path::PathBuf::from(path));
        }
        Ok(Self(made))
    }
}

impl Drop for FakeGpus {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}
