//! Helpers for end-to-end tests: start the real `labrack` binary on a temp data dir and
//! talk to it over HTTPS, trusting only the CA it generated.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

pub mod cloud;
pub mod drill;

/// The `labrack` binary: `$LABRACK_BIN` (set by `cargo xtask test`), else the one beside
/// the test executable's target directory.
pub fn labrack_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LABRACK_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/e2e-HASH → target/debug/labrack
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("labrack"))
        .unwrap_or_default()
}

/// A temp data directory removed on drop.
pub struct DataDir(pub PathBuf);

impl DataDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("labrack-e2e-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        Self(dir)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `labrack serve`.
pub struct Server {
    child: Child,
    pub url: String,
    pub admin_password: Option<String>,
    pub ca_fingerprint: Option<String>,
    pub stdout_lines: Vec<String>,
}

impl Server {
    /// Starts the server on `listen` (use `127.0.0.1:0` for a free port) and waits until it
    /// prints where it listens.
    pub fn start(data_dir: &Path, listen: &str) -> anyhow::Result<Self> {
        Self::start_with(data_dir, listen, &[])
    }

    /// Like [`Server::start`] with extra `labrack serve` arguments.
    pub fn start_with(data_dir: &Path, listen: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_binary(&labrack_bin(), data_dir, listen, extra)
    }

    /// Starts a given `labrack` binary (xtask uses the release build for benchmarks).
    pub fn start_binary(
        binary: &Path,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("LABRACK_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        let (mut url, mut admin_password, mut ca_fingerprint) = (None, None, None);
        for line in lines.by_ref() {
            let line = line?;
            if let Some(rest) = line.strip_prefix("labrack: one-time password for admin: ") {
                admin_password = Some(rest.trim().to_owned());
            }
            if let Some(rest) = line.strip_prefix("labrack: ca fingerprint ") {
                ca_fingerprint = Some(rest.trim().to_owned());
            }
            let done = line
                .strip_prefix("labrack: listening on ")
                .map(|rest| rest.trim().trim_end_matches('/').to_owned());
            seen.push(line);
            if done.is_some() {
                url = done;
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let Some(url) = url else {
            let status = child.wait()?;
            bail!("labrack exited before listening ({status}); printed: {seen:?}");
        };
        Ok(Self {
            child,
            url,
            admin_password,
            ca_fingerprint,
            stdout_lines: seen,
        })
    }

    /// The generated CA certificate of a server started on `data_dir`.
    pub fn ca_cert(data_dir: &Path) -> PathBuf {
        data_dir.join("tls/ca.pem")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        signal(self.child.id(), "TERM")?;
        Ok(self.child.wait()?)
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill_hard(mut self) -> anyhow::Result<()> {
        signal(self.child.id(), "KILL")?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// An HTTPS client that trusts only the appliance's CA (no system roots).
pub fn client_trusting(data_dir: &Path) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(data_dir.join("tls/ca.pem")).context("reading the generated CA")?;
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// A small API client with a bearer token.
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub base: String,
    pub token: Option<String>,
}

impl Api {
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// A GET whose answer is not JSON (a picture): status, content type and body.
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<(u16, String, Vec<u8>)> {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((status, kind, response.bytes().await?.to_vec()))
    }

    pub async fn post_csv(&self, path: &str, csv: &str) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "text/csv")
            .body(csv.to_owned());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Logs in as admin with the one-time password, sets `new_password`, keeps the token.
    pub async fn first_admin_login(&mut self, otp: &str, new_password: &str) -> anyhow::Result<()> {
        let (status, body) = self
            .post(
                "/api/v1/auth/login",
                json!({"username": "admin", "password": otp, "bearer": true}),
            )
            .await?;
        anyhow::ensure!(status == 200, "login: {status} {body}");
        self.token = body["token"].as_str().map(str::to_owned);
        let (status, body) = self
            .post(
                "/api/v1/auth/password",
                json!({"current_password": otp, "new_password": new_password}),
            )
            .await?;
        anyhow::ensure!(status == 200, "password change: {status} {body}");
        Ok(())
    }

    pub async fn login(&mut self, username: &str, password: &str) -> anyhow::Result<()> {
        let (status, body) = self
            .post(
                "/api/v1/auth/login",
                json!({"username": username, "password": password, "bearer": true}),
            )
            .await?;
        anyhow::ensure!(status == 200, "login: {status} {body}");
        self.token = body["token"].as_str().map(str::to_owned);
        Ok(())
    }
}

impl Api {
    /// PUTs a TOML file (lab templates).
    pub async fn put_toml(&self, path: &str, toml: &str) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .client
            .put(format!("{}{path}", self.base))
            .header("content-type", "application/toml")
            .body(toml.to_owned());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Polls `GET path` until `done` holds for the body, or fails after `timeout` with the
    /// last body seen.
    pub async fn wait_for(
        &self,
        path: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let (status, body) = self.get(path).await?;
            if status == 200 && done(&body) {
                return Ok(body);
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting on {path}; last answer {status}: {body}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The `labrack-host` binary beside `labrack`.
pub fn labrack_host_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LABRACK_HOST_BIN") {
        return PathBuf::from(path);
    }
    labrack_bin().with_file_name("labrack-host")
}

/// A memory figure of a running process from `/proc/PID/status`, in MiB: `key` is
/// `VmRSS` (now) or `VmHWM` (its peak).
pub fn process_memory_mib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?
        .parse()
        .with_context(|| format!("{key} of process {pid}"))?;
    Ok(kib / 1024)
}

/// The `labrack-cloud` binary beside `labrack`.
pub fn labrack_cloud_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LABRACK_CLOUD_BIN") {
        return PathBuf::from(path);
    }
    labrack_bin().with_file_name("labrack-cloud")
}

/// `labrack-host enrol` into `state_dir`; returns (success, stdout + stderr).
pub fn enrol_host(
    server_url: &str,
    data_dir: &Path,
    token: &str,
    name: &str,
    state_dir: &Path,
) -> anyhow::Result<(bool, String)> {
    enrol_host_binary(
        &labrack_host_bin(),
        server_url,
        data_dir,
        token,
        name,
        state_dir,
    )
}

/// [`enrol_host`] with a given `labrack-host` binary (benchmarks use the release build).
pub fn enrol_host_binary(
    binary: &Path,
    server_url: &str,
    data_dir: &Path,
    token: &str,
    name: &str,
    state_dir: &Path,
) -> anyhow::Result<(bool, String)> {
    enrol_host_args(binary, server_url, data_dir, token, name, state_dir, &[])
}

/// [`enrol_host_binary`] with more `labrack-host enrol` options (e.g. `--capacity`).
pub fn enrol_host_args(
    binary: &Path,
    server_url: &str,
    data_dir: &Path,
    token: &str,
    name: &str,
    state_dir: &Path,
    extra: &[&str],
) -> anyhow::Result<(bool, String)> {
    let output = Command::new(binary)
        .args([
            "enrol",
            "--appliance",
            server_url,
            "--token",
            token,
            "--name",
            name,
            "--address",
            "127.0.0.1",
            "--ca",
        ])
        .arg(Server::ca_cert(data_dir))
        .arg("--state-dir")
        .arg(state_dir)
        .args(extra)
        .env("LABRACK_LOG", "warn")
        .output()
        .context("running labrack-host enrol")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

/// A running `labrack-host run`, its log lines collected for the test to wait on.
pub struct LabHost {
    child: Child,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// the first of the host ports its labs get (two each: RDP, SSH)
    pub first_port: u16,
}

/// How many labs one test host has ports for.
const TEST_HOST_SLOTS: u16 = 32;

/// The ports and lab network of a test host: chosen once per state dir (kept in it), so a
/// restarted agent keeps them, and several agents on this machine never share them.
fn test_host_network(state_dir: &Path) -> anyhow::Result<(u16, String)> {
    let file = state_dir.join(".test-host-network");
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Some((port, network)) = text.trim().split_once(' ')
    {
        return Ok((port.parse()?, network.to_owned()));
    }
    let seed = rand_suffix();
    for attempt in 0..200u32 {
        let port = 20_000
            + u16::try_from((seed.wrapping_add(attempt * 7919)) % 600).unwrap_or(0)
                * (TEST_HOST_SLOTS * 2);
        let all_free = (port..port + TEST_HOST_SLOTS * 2)
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            let block = (seed.wrapping_add(attempt)) % 16_384;
            let network = format!("100.{}.{}.0/24", 64 + block / 256, block % 256);
            std::fs::create_dir_all(state_dir)?;
            std::fs::write(&file, format!("{port} {network}\n"))?;
            return Ok((port, network));
        }
    }
    bail!(
        "no free range of {} ports for a test host",
        TEST_HOST_SLOTS * 2
    )
}

impl LabHost {
    /// Starts the agent with the run's user prefix, SSH host key and a skeleton root.
    pub fn start(
        state_dir: &Path,
        users: &LabUsers,
        skeleton_root: &Path,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_binary(
            &labrack_host_bin(),
            state_dir,
            users,
            skeleton_root,
            env,
            extra,
        )
    }

    /// [`LabHost::start`] with a given binary (benchmarks use the release build).
    pub fn start_binary(
        binary: &Path,
        state_dir: &Path,
        users: &LabUsers,
        skeleton_root: &Path,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let (first_port, network) = test_host_network(state_dir)?;
        let ports = format!("{first_port}-{}", first_port + TEST_HOST_SLOTS * 2 - 1);
        let mut command = Command::new(binary);
        command
            .args([
                "run",
                "--user-prefix",
                &users.prefix,
                "--lab-ports",
                &ports,
                "--lab-listen",
                "127.0.0.1",
                "--lab-network",
                &network,
                "--state-dir",
            ])
            .arg(state_dir)
            .arg("--skeleton-root")
            .arg(skeleton_root)
            .arg("--ssh-host-key-file")
            .arg(&users.ssh_host_key)
            .args([
                "--rdp-cert-file",
                "/etc/xrdp/cert.pem",
                "--rdp-key-file",
                "/etc/xrdp/key.pem",
            ])
            .args(extra)
            .env("LABRACK_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        // LABRACK_HOST_QUIET in `env`: keep the agent's log for waiting, but do not echo it.
        let quiet = env.iter().any(|(key, _)| *key == "LABRACK_HOST_QUIET");
        let mut child = command.spawn().context("starting labrack-host run")?;
        let stderr = child.stderr.take().context("stderr")?;
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let echo = !quiet;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[labrack-host] {line}");
                }
                if let Ok(mut log) = sink.lock() {
                    log.push(line);
                }
            }
        });
        Ok(Self {
            child,
            log,
            first_port,
        })
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self
                .log
                .lock()
                .map(|log| log.iter().any(|l| l.contains(needle)))
                .unwrap_or(false)
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("labrack-host never logged {needle:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill_hard(mut self) -> anyhow::Result<()> {
        signal(self.child.id(), "KILL")?;
        self.child.wait()?;
        Ok(())
    }

    pub fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        signal(self.child.id(), "TERM")?;
        Ok(self.child.wait()?)
    }
}

impl Drop for LabHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Linux users, boxes, network namespaces and cgroups of one test run's labs: removed
/// on creation and on drop, so a failed test leaves nothing behind. Also the SSH host key
/// the run's lab hosts present.
pub struct LabUsers {
    pub prefix: String,
    /// private key; `.pub` beside it
    pub ssh_host_key: PathBuf,
    _keys: DataDir,
}

impl LabUsers {
    /// A fresh prefix `lrt{n}-` unique to this test run.
    pub fn new() -> Self {
        let prefix = format!("lrt{}-", rand_suffix());
        let keys = DataDir::new("host-key");
        let ssh_host_key = keys.0.join("ssh_host_ed25519_key");
        let _ = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&ssh_host_key)
            .status();
        let users = Self {
            prefix,
            ssh_host_key,
            _keys: keys,
        };
        users.sweep();
        users
    }

    pub fn list(&self) -> Vec<String> {
        std::fs::read_to_string("/etc/passwd")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(':').next())
            .filter(|name| name.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect()
    }

    /// The lab users (not their checkers).
    pub fn labs(&self) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|name| !name.ends_with('c'))
            .collect()
    }

    pub fn sweep(&self) {
        // Boxes first: their supervisors, then whatever is left in their cgroups.
        let _ = Command::new("pkill")
            .args([
                "-KILL",
                "-f",
                &format!("lab-box --state-dir .* --lab {}", self.prefix),
            ])
            .status();
        for controller in [
            "pids", "freezer", "memory", "cpu", "devices", "blkio", "cpuacct", "cpuset",
        ] {
            let base = PathBuf::from(format!("/sys/fs/cgroup/{controller}/labrack"));
            for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&self.prefix)
                {
                    remove_cgroup_tree(&entry.path());
                }
            }
        }
        for entry in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&self.prefix) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
        for line in std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
        {
            if let Some(target) = line.split_whitespace().nth(1)
                && target.starts_with(&format!("/home/{}", self.prefix))
            {
                let _ = Command::new("umount").arg("-l").arg(target).status();
            }
        }
        let mut names = self.list();
        // Checkers first: their group is their lab user's.
        names.sort_by_key(|name| !name.ends_with('c'));
        for name in names {
            let _ = Command::new("pkill").args(["-KILL", "-u", &name]).status();
            let _ = Command::new("userdel")
                .args([&name])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(format!("/home/{name}"));
        }
    }
}

/// Kills what is left in a test's cgroup directory and removes it, bottom-up.
fn remove_cgroup_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    for _ in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs.lines() {
            let _ = Command::new("kill")
                .args(["-KILL", pid.trim()])
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir(dir);
}

impl Default for LabUsers {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for LabUsers {
    fn drop(&mut self) {
        self.sweep();
    }
}

fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ std::process::id().rotate_left(16)) % 100_000
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A real OpenSSH server on 127.0.0.1 with its own host key, accepting passwords only
/// for users of the given prefix.
pub struct Sshd {
    child: Child,
    pub port: u16,
    /// the host's public key file (`ssh-ed25519 …`), what a lab host reports
    pub host_key_pub: PathBuf,
    _dir: DataDir,
}

impl Sshd {
    pub fn start(user_prefix: &str) -> anyhow::Result<Self> {
        Self::start_with(user_prefix, "")
    }

    /// [`Sshd::start`] with more configuration at the end (`Match` blocks, say).
    pub fn start_with(user_prefix: &str, extra: &str) -> anyhow::Result<Self> {
        let dir = DataDir::new("sshd");
        let key = dir.0.join("host_key");
        let keygen = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .context("ssh-keygen")?;
        anyhow::ensure!(keygen.success(), "ssh-keygen failed");
        let port = free_port()?;
        let config = dir.0.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nPasswordAuthentication yes\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\nAllowUsers {user_prefix}*\nStrictModes no\n{extra}",
                key.display(),
                dir.0.join("sshd.pid").display()
            ),
        )?;
        std::fs::create_dir_all("/run/sshd")?;
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting /usr/sbin/sshd (apt package openssh-server)")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "sshd did not start listening on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            child,
            port,
            host_key_pub: key.with_extension("pub"),
            _dir: dir,
        })
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebSocket over TLS to the appliance, trusting only its CA, with a bearer token.
pub type AppSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A TLS connector that trusts only the appliance's CA.
pub fn tls_connector(data_dir: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let pem = std::fs::read(data_dir.join("tls/ca.pem"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

pub async fn websocket(
    data_dir: &Path,
    base_url: &str,
    path: &str,
    bearer: &str,
) -> anyhow::Result<AppSocket> {
    websocket_from(data_dir, base_url, path, bearer, None).await
}

/// [`websocket`] from a given local address (a machine of its own on the venue LAN, for the
/// per-client limits), or the system's choice with `None`.
pub async fn websocket_from(
    data_dir: &Path,
    base_url: &str,
    path: &str,
    bearer: &str,
    local: Option<std::net::IpAddr>,
) -> anyhow::Result<AppSocket> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let authority = base_url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let tcp = match local {
        None => tokio::net::TcpStream::connect(&authority).await?,
        Some(local) => {
            let remote: std::net::SocketAddr = authority.parse()?;
            let socket = match remote {
                std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(std::net::SocketAddr::new(local, 0))?;
            socket.connect(remote).await?
        }
    };
    let server_name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
    let tls = tls_connector(data_dir)?.connect(server_name, tcp).await?;
    let mut request = format!("wss://{authority}{path}").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bearer}").parse()?);
    let (socket, _) = tokio_tungstenite::client_async(request, tls).await?;
    Ok(socket)
}

/// Faults a [`UdpFaultProxy`] applies to every datagram, both ways.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// datagrams lost, in percent
    pub drop_percent: u32,
    /// every datagram waits this long
    pub delay_ms: u64,
    /// datagrams held back an extra 1–30 ms (so later ones overtake them), in percent
    pub reorder_percent: u32,
    /// datagrams sent twice, in percent
    pub duplicate_percent: u32,
    /// nothing gets through
    pub partitioned: bool,
}

/// A UDP proxy between a QUIC client and server that drops, delays, reorders, duplicates
/// or partitions traffic as told — the bad venue uplink, on loopback.
pub struct UdpFaultProxy {
    pub port: u16,
    faults: std::sync::Arc<std::sync::Mutex<Faults>>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpFaultProxy {
    pub async fn start(target: std::net::SocketAddr) -> anyhow::Result<Self> {
        use std::collections::HashMap;
        use std::sync::Arc;
        let listener = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
        let port = listener.local_addr()?.port();
        let faults = Arc::new(std::sync::Mutex::new(Faults::default()));
        let shared = faults.clone();
        let task = tokio::spawn(async move {
            let mut upstreams: HashMap<std::net::SocketAddr, Arc<tokio::net::UdpSocket>> =
                HashMap::new();
            let mut buffer = vec![0u8; 65_536];
            loop {
                let Ok((n, client)) = listener.recv_from(&mut buffer).await else {
                    return;
                };
                let packet = buffer[..n].to_vec();
                let upstream = match upstreams.get(&client) {
                    Some(socket) => socket.clone(),
                    None => {
                        let Ok(socket) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        if socket.connect(target).await.is_err() {
                            continue;
                        }
                        let socket = Arc::new(socket);
                        upstreams.insert(client, socket.clone());
                        // The way back: server → client, through the same faults.
                        let (back, listener, faults) =
                            (socket.clone(), listener.clone(), shared.clone());
                        tokio::spawn(async move {
                            let mut buffer = vec![0u8; 65_536];
                            while let Ok(n) = back.recv(&mut buffer).await {
                                let packet = buffer[..n].to_vec();
                                let listener = listener.clone();
                                forward(&faults, packet, move |p| {
                                    let listener = listener.clone();
                                    async move {
                                        let _ = listener.send_to(&p, client).await;
                                    }
                                });
                            }
                        });
                        socket
                    }
                };
                forward(&shared, packet, move |p| {
                    let upstream = upstream.clone();
                    async move {
                        let _ = upstream.send(&p).await;
                    }
                });
            }
        });
        Ok(Self { port, faults, task })
    }

    pub fn set(&self, faults: Faults) {
        if let Ok(mut current) = self.faults.lock() {
            *current = faults;
        }
    }
}

impl Drop for UdpFaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A tiny xorshift: the proxy's dice (no need for a crate).
fn roll(percent: u32) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let mut x = STATE.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    (x % 100) < u64::from(percent)
}

fn forward<F, Fut>(faults: &std::sync::Mutex<Faults>, packet: Vec<u8>, send: F)
where
    F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let faults = faults.lock().map(|f| f.clone()).unwrap_or_default();
    if faults.partitioned || roll(faults.drop_percent) {
        return;
    }
    let copies = if roll(faults.duplicate_percent) { 2 } else { 1 };
    let extra = if roll(faults.reorder_percent) {
        1 + (rand_suffix() % 30) as u64
    } else {
        0
    };
    let delay = Duration::from_millis(faults.delay_ms + extra);
    tokio::spawn(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        for _ in 0..copies {
            send(packet.clone()).await;
        }
    });
}
