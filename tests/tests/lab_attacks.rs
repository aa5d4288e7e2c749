//! Attacks on a shared lab host, as a team would make them: two labs on one real
//! `labrack-host`, each in its box with its own xrdp and sshd, the team's shell entered
//! exactly where the box's sshd would start it (the box's namespaces and cgroup, the lab
//! user). Every attack must fail and leave the other lab, the host and the scores as they
//! were. Runs as root; users, boxes, namespaces and cgroups carry the run's prefix and are
//! removed even when a test fails.

use crate::common;

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use common::{
    FakeGpus, Fixture, LONG, Signer, as_team, fixture, put_checks, run_by_name, serve_in_lab,
    wait_batch,
};
use labrack_e2e::{DataDir, LabHost};
use serde_json::{Value, json};
use sha2::Digest as _;

/// The host's own first IPv4 address on a real interface (not loopback).
fn host_address() -> anyhow::Result<String> {
    let text = String::from_utf8(
        Command::new("ip")
            .args(["-4", "-o", "addr", "show", "scope", "global"])
            .output()?
            .stdout,
    )?;
    text.lines()
        .filter(|l| {
            !l.split_whitespace()
                .nth(1)
                .is_some_and(|dev| dev.starts_with("lv"))
        })
        .find_map(|l| {
            l.split_whitespace()
                .nth(3)
                .and_then(|a| a.split('/').next())
                .map(str::to_owned)
        })
        .context("no global IPv4 address on this host")
}

/// The lab's own address on its link (inside its network namespace).
fn lab_address(user: &str) -> anyhow::Result<String> {
    let text = String::from_utf8(
        Command::new("ip")
            .args(["-n", user, "-4", "-o", "addr", "show", "dev", "eth0"])
            .output()?
            .stdout,
    )?;
    text.split_whitespace()
        .nth(3)
        .and_then(|a| a.split('/').next())
        .map(str::to_owned)
        .context("the lab has no link address")
}

fn sha256_of(path: &str) -> anyhow::Result<String> {
    Ok(hex::encode(sha2::Sha256::digest(std::fs::read(path)?)))
}

/// A host service on every address of the host, that no lab may reach.
fn host_server(port: u16, body: &str) -> anyhow::Result<common::Killed> {
    let script = format!(
        "import http.server\nclass H(http.server.BaseHTTPRequestHandler):\n  def do_GET(self):\n    self.send_response(200); self.end_headers(); self.wfile.write(b{body:?})\n  def log_message(self, *a): pass\nhttp.server.HTTPServer(('0.0.0.0', {port}), H).serve_forever()\n"
    );
    let child = Command::new("python3").args(["-c", &script]).spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the host server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(common::Killed(child))
}

/// `curl`-like GET from the team's shell: prints the body or `UNREACHABLE`.
fn fetch(address: &str, port: u16) -> String {
    format!(
        "if ! (exec 3<>/dev/tcp/{address}/{port}) 2>/dev/null; then echo UNREACHABLE; exit 0; fi; exec 3<>/dev/tcp/{address}/{port}; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; timeout 5 cat <&3 | tail -1"
    )
}

async fn allocate_both(fx: &Fixture) -> anyhow::Result<(i64, i64, String, String)> {
    let red = fx.allocate(fx.team_id).await?;
    let blue = fx.allocate(fx.other_team_id).await?;
    fx.wait_state(red, "active").await?;
    fx.wait_state(blue, "active").await?;
    let prefix = &fx.users.prefix;
    Ok((
        red,
        blue,
        format!("{prefix}a{red}"),
        format!("{prefix}a{blue}"),
    ))
}

#[tokio::test]
async fn two_labs_on_one_host_are_sealed_from_each_other_and_from_the_host() -> anyhow::Result<()> {
    let fx = fixture("sealed", "127.0.0.1:0").await?;
    let _gpus = FakeGpus::make(2)?;
    let host_ip = host_address()?;
    let (allowed_port, closed_port) = (labrack_e2e::free_port()?, labrack_e2e::free_port()?);
    let _allowed = host_server(allowed_port, "allowed host service")?;
    let _closed = host_server(closed_port, "private host service")?;
    let templates = format!(
        r#"[[template]]
name = "desk"
runtime = "local-user"
skeleton = "{}"
gpus = 1
network = "venue"
allow = ["{host_ip}:{allowed_port}"]
memory_mib = 256
pids = 128

[[template.check]]
name = "own server"
script = "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3 | tail -1"
timeout_secs = 10
dimension = "functionality"
network = true

[[template.check]]
name = "gpus"
script = "echo visible=$CUDA_VISIBLE_DEVICES; for n in 0 1; do head -c1 /dev/nvidia$n 2>&1 | sed 's/^.*: //'; done; true"
timeout_secs = 10
dimension = "functionality"
"#,
        fx.skeletons.0.join("desk").display()
    );
    let (status, body) = fx.admin.put_toml("/api/v1/templates", &templates).await?;
    anyhow::ensure!(status == 200, "{body}");
    let state = DataDir::new("sealed-host");
    fx.enrol("host-sealed", &state.0).await?;
    let host = LabHost::start(&state.0, &fx.users, &fx.skeletons.0, &[], &["--gpus", "2"])?;
    fx.admin
        .wait_for("/api/v1/hosts", LONG, |h| {
            h["hosts"][0]["telemetry"]["resources"]["gpus"] == 2
        })
        .await?;
    let (red, blue, red_user, blue_user) = allocate_both(&fx).await?;
    let (_, red_view) = fx.admin.get(&format!("/api/v1/allocations/{red}")).await?;
    let (_, blue_view) = fx.admin.get(&format!("/api/v1/allocations/{blue}")).await?;
    assert_eq!(
        (red_view["gpus"].clone(), blue_view["gpus"].clone()),
        (json!([0]), json!([1])),
        "each lab holds its own GPU"
    );

    // Both teams serve on 8080: each lab's port space is its own.
    let _red_server = serve_in_lab(&red_user, 8080, "red answers")?;
    let _blue_server = serve_in_lab(&blue_user, 8080, "blue answers")?;
    let (_, mine) = as_team(&red_user, &fetch("127.0.0.1", 8080))?;
    assert_eq!(
        mine.trim(),
        "red answers",
        "Red's localhost:8080 is Red's own"
    );

    // Red's attacks on Blue.
    let blue_ip = lab_address(&blue_user)?;
    let (_, reached) = as_team(&red_user, &fetch(&blue_ip, 8080))?;
    assert_eq!(
        reached.trim(),
        "UNREACHABLE",
        "Red cannot reach Blue's lab at {blue_ip}"
    );
    let (ok, listing) = as_team(&red_user, "ls -1 /home")?;
    assert!(
        ok && listing.trim() == red_user,
        "the box's /home shows only its own: {listing}"
    );
    let (ok, stolen) = as_team(&red_user, &format!("cat /home/{blue_user}/README.txt"))?;
    assert!(
        !ok && !stolen.contains("welcome"),
        "inside the box Blue's home does not exist: {stolen}"
    );
    let outside = Command::new("runuser")
        .args([
            "-u",
            &red_user,
            "--",
            "cat",
            &format!("/home/{blue_user}/README.txt"),
        ])
        .output()?;
    assert!(
        !outside.status.success(),
        "even outside a box, Red's uid cannot read Blue's home"
    );
    let (ok, _) = as_team(
        &red_user,
        "echo red-secret > /tmp/red-secret && echo red-shm > /dev/shm/red-shm && echo red > /var/tmp/red-tmp",
    )?;
    assert!(ok);
    let (_, seen) = as_team(
        &blue_user,
        "ls -a /tmp /dev/shm /var/tmp; cat /tmp/red-secret /dev/shm/red-shm 2>&1",
    )?;
    assert!(
        !seen.contains("red-secret\n") && !seen.contains("red-shm\n") && !seen.contains("red-tmp"),
        "Blue's /tmp, /dev/shm and /var/tmp are its own: {seen}"
    );
    assert!(
        !Path::new("/tmp/red-secret").exists() && !Path::new("/dev/shm/red-shm").exists(),
        "nor the host's"
    );
    let (_, owners) = as_team(&red_user, "ps -e -o user= | sort -u")?;
    assert_eq!(
        owners.trim(),
        red_user,
        "Red sees only its own processes: {owners}"
    );
    let blue_pid = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/labrack/{blue_user}/box/cgroup.procs"
    ))?
    .lines()
    .last()
    .context("a Blue process")?
    .to_owned();
    let (killed, why) = as_team(&red_user, &format!("kill -9 {blue_pid}"))?;
    assert!(
        !killed,
        "Red cannot signal Blue's process {blue_pid}: {why}"
    );
    assert!(
        Path::new(&format!("/proc/{blue_pid}")).exists(),
        "Blue's process lives"
    );
    // The host: its services and its secrets.
    let (_, private) = as_team(&red_user, &fetch(&host_ip, closed_port))?;
    assert_eq!(
        private.trim(),
        "UNREACHABLE",
        "the host's own services are out of reach"
    );
    let (_, gateway) = as_team(&red_user, &fetch("169.254.1.1", closed_port))?;
    assert_eq!(gateway.trim(), "UNREACHABLE");
    let (_, allowed) = as_team(&red_user, &fetch(&host_ip, allowed_port))?;
    assert_eq!(
        allowed.trim(),
        "allowed host service",
        "what the template allows is reachable"
    );
    let (ok, key) = as_team(
        &red_user,
        &format!(
            "cat {}/host.key; cat {}/labs/{blue_user}.json",
            state.0.display(),
            state.0.display()
        ),
    )?;
    assert!(
        !ok && !key.contains("allocation_id"),
        "the host's state is not Red's to read: {key}"
    );
    let outside = Command::new("runuser")
        .args(["-u", &red_user, "--", "ls", &state.0.display().to_string()])
        .output()?;
    assert!(!outside.status.success(), "the state dir is root's alone");

    // GPUs: each lab may open only its own (EPERM for the other; ENXIO: allowed, no driver).
    let (_, gpus) = as_team(
        &red_user,
        "for n in 0 1; do head -c1 /dev/nvidia$n 2>&1 | sed 's/^.*: //'; done",
    )?;
    let lines: Vec<&str> = gpus.lines().collect();
    assert_eq!(
        lines,
        ["No such device or address", "Operation not permitted"],
        "Red opens GPU 0 only: {gpus}"
    );
    // A desktop session (opened as the appliance's streamer would) sees only its GPU too.
    let probe = Command::new(labrack_e2e::labrack_bin())
        .args([
            "admin",
            "probe-desktop",
            &red.to_string(),
            "--watch-secs",
            "5",
            "--data-dir",
        ])
        .arg(&fx.data.0)
        .output()?;
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let (_, environ) = as_team(
        &red_user,
        "for p in $(pgrep xterm); do cat /proc/$p/environ 2>/dev/null; done | tr '\\0' '\\n' | grep -m1 CUDA_VISIBLE_DEVICES",
    )?;
    assert_eq!(
        environ.trim(),
        "CUDA_VISIBLE_DEVICES=0",
        "the desktop session sees only its GPU"
    );

    // Checks run in each lab's own network namespace and see only its GPUs.
    let (status, queued) = fx
        .admin
        .post(
            &format!("/api/v1/events/{}/check-batches", fx.event_id),
            json!({}),
        )
        .await?;
    assert_eq!(status, 201, "{queued}");
    let batch_id = queued["batch_id"].as_i64().context("batch")?;
    wait_batch(&fx, batch_id).await?;
    let (_, runs) = fx
        .admin
        .get(&format!(
            "/api/v1/events/{}/check-runs?batch_id={batch_id}",
            fx.event_id
        ))
        .await?;
    let output_of = |team: i64, name: &str| -> String {
        runs.as_array()
            .and_then(|r| {
                r.iter()
                    .find(|run| run["team_id"] == team && run["check"] == name)
            })
            .and_then(|run| run["output"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(output_of(fx.team_id, "own server").trim(), "red answers");
    assert_eq!(
        output_of(fx.other_team_id, "own server").trim(),
        "blue answers"
    );
    assert_eq!(
        output_of(fx.team_id, "gpus").trim(),
        "visible=0\nNo such device or address\nOperation not permitted"
    );
    assert_eq!(
        output_of(fx.other_team_id, "gpus").trim(),
        "visible=1\nOperation not permitted\nNo such device or address"
    );

    // Red exhausts its memory, then its pids: Red's processes die or stall, Blue serves on.
    let (_, hog) = as_team(
        &red_user,
        "python3 -c 'b = bytearray(400 << 20); print(\"ALLOC\" + \"-OK\")'; echo exit=$?",
    )?;
    assert!(
        !hog.contains("ALLOC-OK") && hog.contains("exit=137"),
        "256 MiB for the whole lab: {hog}"
    );
    let bomb = std::thread::spawn({
        let red_user = red_user.clone();
        move || {
            as_team(
                &red_user,
                "timeout -s KILL 6 bash -c ':(){ :|:& };:' 2>/dev/null; echo bomb-done",
            )
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let pids: u32 = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/labrack/{red_user}/pids.current"
    ))?
    .trim()
    .parse()?;
    assert!(
        pids <= 128,
        "the fork bomb stops at the lab's pids limit: {pids}"
    );
    let (_, still) = as_team(&blue_user, &fetch("127.0.0.1", 8080))?;
    assert_eq!(
        still.trim(),
        "blue answers",
        "Blue is unaffected by Red's fork bomb"
    );
    let _ = bomb.join();
    // A reset gives Red its lab back, clean.
    let (status, _) = fx
        .admin
        .post(&format!("/api/v1/allocations/{red}/reset"), json!({}))
        .await?;
    assert_eq!(status, 200);
    fx.wait_state(red, "active").await?;
    let (ok, alive) = as_team(&red_user, "echo alive")?;
    assert!(ok && alive.trim() == "alive", "{alive}");
    let leftovers: u32 = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/labrack/{red_user}/pids.current"
    ))?
    .trim()
    .parse()?;
    assert!(
        leftovers < 20,
        "the reset ended the bomb: {leftovers} processes left"
    );
    drop(host);
    Ok(())
}

#[tokio::test]
async fn judging_cannot_be_forged_by_the_team() -> anyhow::Result<()> {
    let fx = fixture("forge", "127.0.0.1:0").await?;
    let checks = r#"
[[template.check]]
name = "server"
script = "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET / HTTP/1.0\r\n\r\n' >&3 && grep -q 'the real answer' <&3 || { echo 'FAIL: no real server'; exit 1; }"
timeout_secs = 10
weight = 10
dimension = "functionality"
network = true

[[template.check]]
name = "team tool"
script = "\"$HOME/bin/tool\""
timeout_secs = 10
weight = 10
dimension = "quality"

[[template.check]]
name = "long"
script = "sleep 4; echo SECRET-MARKER-7731 > /dev/null; exit 1"
timeout_secs = 10
weight = 10
dimension = "quality"
hidden = true

[[template.check]]
name = "escape"
script = "setsid sleep 300 & (sleep 301 &) & nohup sleep 302 >/dev/null 2>&1 & exit 0"
timeout_secs = 10
weight = 1
dimension = "quality"

[[template.check]]
name = "fork bomb"
script = ":(){ :|:& };: ; sleep 30"
timeout_secs = 3
weight = 1
dimension = "quality"

[[template.check]]
name = "writes the home"
script = "echo tampered > README.txt"
timeout_secs = 10
weight = 1
dimension = "quality"
"#;
    put_checks(&fx, checks).await?;
    let state = DataDir::new("forge-host");
    fx.enrol("host-forge", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let red = fx.allocate(fx.team_id).await?;
    fx.wait_state(red, "active").await?;
    let red_user = format!("{}a{red}", fx.users.prefix);
    let home = format!("/home/{red_user}");

    // The team prepares everything that fooled judging before: rc files that exit 0 or
    // redefine commands, pre-made results, a tool that claims the sandbox failed.
    let prepare = r#"
        mkdir -p ~/bin ~/.labrack/checks
        for f in .bashrc .bash_profile .profile .bash_login; do echo 'exit 0' > ~/$f; done
        echo 'alias grep="true"; grep() { true; }' >> ~/.bashrc
        for n in $(seq 1 50); do mkdir -p ~/.labrack/checks/run-$n; echo 0 > ~/.labrack/checks/run-$n/status; done
        printf '#!/bin/sh\necho "unshare: unshare failed: Operation not permitted" >&2\nexit 1\n' > ~/bin/tool
        chmod 755 ~/bin/tool
    "#;
    let (ok, out) = as_team(&red_user, prepare)?;
    assert!(ok, "{out}");
    let readme_before = sha256_of(&format!("{home}/README.txt"))?;
    let (status, queued) = fx
        .admin
        .post(
            &format!("/api/v1/events/{}/check-batches", fx.event_id),
            json!({"team_id": fx.team_id}),
        )
        .await?;
    assert_eq!(status, 201, "{queued}");
    let batch_id = queued["batch_id"].as_i64().context("batch")?;

    // While the hidden check runs: the team can neither see it, nor read its script, nor
    // ptrace or signal it — not from its box, not even from a shell on the host.
    let deadline = std::time::Instant::now() + LONG;
    let check_pid = loop {
        let found = Command::new("pgrep")
            .args(["-u", &format!("{red_user}c"), "-x", "sleep"])
            .output()?;
        if let Some(pid) = String::from_utf8_lossy(&found.stdout).lines().next() {
            break pid.to_owned();
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the long check never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let in_argv = Command::new("grep")
        .args(["-l", "SECRET-MARKER-7731"])
        .args(glob_cmdlines())
        .output()?;
    assert!(
        String::from_utf8_lossy(&in_argv.stdout).trim().is_empty(),
        "no process shows the hidden script in its argv"
    );
    let (_, seen) = as_team(&red_user, "ps -e -o user=,comm= ")?;
    assert!(
        !seen.contains("sleep") && !seen.contains(&format!("{red_user}c")),
        "the team cannot see the check: {seen}"
    );
    let ptrace = format!(
        "python3 -c 'import ctypes,sys; libc=ctypes.CDLL(None, use_errno=True); r=libc.ptrace(16, {check_pid}, 0, 0); print(\"attached\" if r == 0 else \"refused\", ctypes.get_errno())'"
    );
    let (_, from_box) = as_team(&red_user, &ptrace)?;
    assert!(from_box.contains("refused"), "{from_box}");
    let from_host = Command::new("runuser")
        .args(["-u", &red_user, "--", "bash", "-c", &ptrace])
        .output()?;
    assert!(
        String::from_utf8_lossy(&from_host.stdout).contains("refused 1"),
        "EPERM: another uid: {}",
        String::from_utf8_lossy(&from_host.stdout)
    );
    let signal = Command::new("runuser")
        .args(["-u", &red_user, "--", "kill", "-STOP", &check_pid])
        .output()?;
    assert!(!signal.status.success(), "the team cannot stop the check");

    let batch = wait_batch(&fx, batch_id).await?;
    let (_, runs) = fx
        .admin
        .get(&format!(
            "/api/v1/events/{}/check-runs?batch_id={batch_id}",
            fx.event_id
        ))
        .await?;
    let server = run_by_name(&runs, "server");
    assert_eq!(
        (server["state"].as_str(), server["message"].as_str()),
        (Some("failed"), Some("no real server")),
        "rc files and aliases change nothing: {server}"
    );
    let tool = run_by_name(&runs, "team tool");
    assert_eq!(
        (tool["state"].as_str(), tool["exit_code"].as_i64()),
        (Some("failed"), Some(1)),
        "a fake 'unshare:' line is a failed check, not 'could not run': {tool}"
    );
    assert_eq!(run_by_name(&runs, "long")["state"], "failed");
    assert_eq!(
        run_by_name(&runs, "writes the home")["state"],
        "failed",
        "a check cannot write the team's files"
    );
    assert_eq!(sha256_of(&format!("{home}/README.txt"))?, readme_before);
    let bomb = run_by_name(&runs, "fork bomb");
    assert_eq!(
        (bomb["state"].as_str(), bomb["timed_out"].as_bool()),
        (Some("failed"), Some(true)),
        "{bomb}"
    );
    assert_eq!(run_by_name(&runs, "escape")["state"], "passed");
    let escaped = Command::new("pgrep")
        .args(["-u", &format!("{red_user}c")])
        .output()?;
    assert!(
        !escaped.status.success(),
        "nothing a check started outlives it (setsid, double fork, nohup): {}",
        String::from_utf8_lossy(&escaped.stdout)
    );
    assert_eq!(batch["counts"]["error"], 0, "every check ran: {batch}");
    // The scores are what the checks said, nothing more.
    let (_, board) = fx
        .admin
        .get(&format!("/api/v1/events/{}/leaderboard", fx.event_id))
        .await?;
    assert_eq!(
        board["rows"][0]["total"], 1.0,
        "only 'escape' passed: {board}"
    );
    drop(host);
    Ok(())
}

/// Removes files and directories when dropped.
struct RemoveOnDrop(Vec<String>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_dir_all(path);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Every process's cmdline file.
fn glob_cmdlines() -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("cmdline").display().to_string())
        .collect()
}

#[tokio::test]
async fn a_reset_restores_the_lab_and_never_trusts_what_the_team_planted() -> anyhow::Result<()> {
    let fx = fixture("plant", "127.0.0.1:0").await?;
    let quota = fx.skeleton("quota");
    let templates = format!(
        "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n\n[[template]]\nname = \"quota\"\nruntime = \"local-user\"\nskeleton = \"{}\"\ndisk_mib = 64\n\n[[template]]\nname = \"outside\"\nruntime = \"local-user\"\nskeleton = \"/etc\"\n",
        fx.skeletons.0.join("desk").display(),
        quota.display()
    );
    let (status, body) = fx.admin.put_toml("/api/v1/templates", &templates).await?;
    anyhow::ensure!(status == 200, "{body}");
    let state = DataDir::new("plant-host");
    fx.enrol("host-plant", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let red = fx.allocate(fx.team_id).await?;
    fx.wait_state(red, "active").await?;
    let red_user = format!("{}a{red}", fx.users.prefix);
    let home = format!("/home/{red_user}");
    // Root's files the team would like overwritten (its own, so other tests adding users to
    // /etc/passwd meanwhile do not matter).
    let sentinel = format!(
        "/etc/labrack-sentinel-{}",
        fx.users.prefix.trim_end_matches('-')
    );
    let sentinel_dir = format!(
        "/etc/labrack-sentinel-dir-{}",
        fx.users.prefix.trim_end_matches('-')
    );
    std::fs::write(&sentinel, "root's own\n")?;
    std::fs::create_dir_all(&sentinel_dir)?;
    std::fs::write(format!("{sentinel_dir}/keep"), "root's own\n")?;
    let _cleanup = RemoveOnDrop(vec![sentinel.clone(), sentinel_dir.clone()]);

    // The team plants links where the skeleton's files go, tries to schedule work outside its
    // box (cron is masked inside it), and leaves processes running.
    let plant = format!(
        r#"
        rm -f ~/README.txt && ln -s {sentinel} ~/README.txt
        rm -rf ~/project && ln -s {sentinel_dir} ~/project
        ln -s {sentinel} ~/.xsession
        (echo '* * * * * touch /tmp/pwned' | crontab -) 2>&1 | head -1
        nohup sleep 600 >/dev/null 2>&1 &
        echo planted
    "#
    );
    let (_, out) = as_team(&red_user, &plant)?;
    assert!(out.contains("planted"), "{out}");
    assert!(
        !Path::new(&format!("/var/spool/cron/crontabs/{red_user}")).exists(),
        "a crontab made in the box never reaches the host's cron"
    );
    // As on a host that ran labs before boxes: a crontab and a process outside the box.
    let planted = Command::new("sh")
        .args([
            "-c",
            &format!("echo '* * * * * true' | crontab -u {red_user} -"),
        ])
        .status()?;
    assert!(
        planted.success() && Path::new(&format!("/var/spool/cron/crontabs/{red_user}")).exists(),
        "crontab (apt package cron) planted one"
    );
    let mut outside = Command::new("runuser")
        .args(["-u", &red_user, "--", "sleep", "600"])
        .spawn()?;

    let (status, _) = fx
        .admin
        .post(&format!("/api/v1/allocations/{red}/reset"), json!({}))
        .await?;
    assert_eq!(status, 200);
    fx.wait_state(red, "active").await?;
    assert_eq!(
        std::fs::read_to_string(&sentinel)?,
        "root's own\n",
        "the planted link did not make the reset write root's file"
    );
    assert_eq!(
        std::fs::metadata(&sentinel)?.uid(),
        0,
        "nor give it to the team"
    );
    assert_eq!(
        std::fs::read_to_string(format!("{sentinel_dir}/keep"))?,
        "root's own\n"
    );
    assert_eq!(std::fs::metadata(&sentinel_dir)?.uid(), 0);
    assert_eq!(
        std::fs::read_dir(&sentinel_dir)?.count(),
        1,
        "nothing was copied into the linked directory"
    );
    let readme = std::fs::symlink_metadata(format!("{home}/README.txt"))?;
    assert!(
        readme.file_type().is_file() && readme.uid() != 0,
        "README.txt is the skeleton's file again, the team's own"
    );
    assert_eq!(
        std::fs::read_to_string(format!("{home}/README.txt"))?,
        "welcome to the lab\n"
    );
    assert!(std::fs::symlink_metadata(format!("{home}/project"))?.is_dir());
    assert!(
        !Path::new(&format!("/var/spool/cron/crontabs/{red_user}")).exists(),
        "the crontab went with the reset"
    );
    assert!(
        !outside.wait()?.success(),
        "processes outside the box were ended too"
    );
    let sleepers = Command::new("pgrep")
        .args(["-u", &red_user, "-x", "sleep"])
        .output()?;
    assert!(
        !sleepers.status.success(),
        "nothing of the team survives a reset"
    );
    let leftovers: Vec<String> = std::fs::read_dir("/home")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".labrack-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no half-built home is left: {leftovers:?}"
    );

    // A disk quota: the team cannot fill the host's disk from its home.
    let (status, lab) = fx
        .admin
        .post(
            &format!("/api/v1/teams/{}/allocation", fx.other_team_id),
            json!({"template": "quota"}),
        )
        .await?;
    anyhow::ensure!(status == 201, "{lab}");
    let blue = lab["id"].as_i64().context("id")?;
    fx.wait_state(blue, "active").await?;
    let blue_user = format!("{}a{blue}", fx.users.prefix);
    let (_, fill) = as_team(
        &blue_user,
        "dd if=/dev/zero of=~/big bs=1M count=100 2>&1; df -m ~ | tail -1",
    )?;
    assert!(
        fill.contains("No space left on device"),
        "64 MiB for the home: {fill}"
    );
    let (status, _) = fx
        .admin
        .post(&format!("/api/v1/allocations/{blue}/reset"), json!({}))
        .await?;
    assert_eq!(status, 200);
    fx.wait_state(blue, "active").await?;
    assert!(
        !Path::new(&format!("/home/{blue_user}/big")).exists(),
        "a fresh file system after the reset"
    );
    let (status, _) = fx
        .admin
        .post(&format!("/api/v1/allocations/{blue}/release"), json!({}))
        .await?;
    assert_eq!(status, 200);
    fx.wait_state(blue, "released").await?;
    let mounted =
        std::fs::read_to_string("/proc/self/mounts")?.contains(&format!("/home/{blue_user} "));
    assert!(
        !mounted && !Path::new(&state.0.join(format!("disks/{blue_user}.img"))).exists(),
        "the image and its mount are gone"
    );

    // A skeleton outside the host's skeleton root is refused, naming the path.
    let (status, released) = fx
        .admin
        .post(&format!("/api/v1/allocations/{red}/release"), json!({}))
        .await?;
    assert_eq!(status, 200, "{released}");
    fx.wait_state(red, "released").await?;
    let (status, lab) = fx
        .admin
        .post(
            &format!("/api/v1/teams/{}/allocation", fx.team_id),
            json!({"template": "outside"}),
        )
        .await?;
    anyhow::ensure!(status == 201, "{lab}");
    let outside_lab = lab["id"].as_i64().context("id")?;
    let failed = fx
        .admin
        .wait_for(
            &format!("/api/v1/allocations/{outside_lab}"),
            Duration::from_secs(120),
            |a| {
                a["state"] == "failed"
                    || a["reason"].as_str().is_some_and(|r| r.contains("skeleton"))
            },
        )
        .await?;
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("/etc") && reason.contains("outside this host's skeleton root"),
        "{failed}"
    );
    assert!(
        !Path::new(&format!("/home/{}a{outside_lab}", fx.users.prefix)).exists(),
        "nothing was copied"
    );
    drop(host);
    Ok(())
}

#[tokio::test]
async fn host_secrets_are_root_only_never_hold_a_password_and_a_copied_identity_is_caught()
-> anyhow::Result<()> {
    let fx = fixture("secrets", "127.0.0.1:0").await?;
    let state = DataDir::new("secrets-host");
    fx.enrol("host-secret", &state.0).await?;
    // An install from before the rule: loose modes everywhere.
    for (path, mode) in [
        (state.0.clone(), 0o755),
        (state.0.join("host.key"), 0o644),
        (state.0.join("host.toml"), 0o644),
    ] {
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    }
    // The provision task's password, read as the host would (before its agent runs).
    let red = fx.allocate(fx.team_id).await?;
    let signer = Signer::load(&state.0)?;
    let (status, polled) = signer
        .post(
            &fx.admin,
            signer.host_id,
            "/api/v1/host/poll",
            &json!({"version": 2, "wait_ms": 0}),
        )
        .await?;
    assert_eq!(status, 200, "{polled}");
    let password = polled["tasks"][0]["kind"]["password"]
        .as_str()
        .context("the task's password")?
        .to_owned();
    assert_eq!(password.len(), 20);

    let host = fx.start_host(&state.0, &[])?;
    fx.wait_state(red, "active").await?;
    // Root's alone, fixed at start; no file on the host holds the password.
    let mut files = Vec::new();
    let mut dirs = vec![state.0.clone()];
    while let Some(dir) = dirs.pop() {
        let meta = std::fs::metadata(&dir)?;
        assert_eq!(meta.mode() & 0o777, 0o700, "{} is 0700", dir.display());
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    for file in &files {
        let meta = std::fs::metadata(file)?;
        assert_eq!(
            meta.mode() & 0o077,
            0,
            "{} is root's alone ({:o})",
            file.display(),
            meta.mode()
        );
        let bytes = std::fs::read(file)?;
        assert!(
            !bytes
                .windows(password.len())
                .any(|w| w == password.as_bytes()),
            "{} holds the desktop password",
            file.display()
        );
    }
    assert!(
        files.iter().any(|f| f.to_string_lossy().contains("spool")),
        "the spool was searched too"
    );

    // The same identity copied to a second machine: both cannot work; staff hear of it.
    let copy = DataDir::new("secrets-copy");
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", state.0.display()))
        .arg(&copy.0)
        .status()?;
    assert!(status.success());
    let _ = std::fs::remove_dir_all(copy.0.join("labs"));
    let _ = std::fs::remove_file(copy.0.join(".test-host-network"));
    let clone = LabHost::start(&copy.0, &fx.users, &fx.skeletons.0, &[], &[])?;
    let board = fx
        .admin
        .wait_for(
            &format!("/api/v1/events/{}/dashboard", fx.event_id),
            LONG,
            |b| b["problems"].to_string().contains("host_identity_conflict"),
        )
        .await?;
    let problems: Vec<Value> = board["problems"].as_array().cloned().unwrap_or_default();
    assert!(
        problems.iter().any(|p| p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("host-secret"))),
        "{problems:?}"
    );
    drop(clone);
    drop(host);
    Ok(())
}

#[tokio::test]
async fn one_team_whose_checks_all_hang_cannot_hold_up_another_teams_scoring() -> anyhow::Result<()>
{
    let fx = fixture("starve", "127.0.0.1:0").await?;
    // Every check hangs to its timeout for a team that left a `slow` file in its home.
    let check = |n: u32| {
        format!(
            "[[template.check]]\nname = \"c{n}\"\nscript = \"if [ -f \\\"$HOME/slow\\\" ]; then sleep 120; fi; exit 0\"\ntimeout_secs = 60\nweight = 1\ndimension = \"quality\"\n"
        )
    };
    put_checks(&fx, &(1..=6).map(check).collect::<String>()).await?;
    let state = DataDir::new("starve-host");
    fx.enrol("host-starve", &state.0).await?;
    let host = fx.start_host(&state.0, &[])?;
    let (_, _, red_user, _) = allocate_both(&fx).await?;
    let (ok, out) = as_team(&red_user, "touch ~/slow")?;
    assert!(ok, "{out}");

    // Red queues six hanging checks first, then blue its six quick ones.
    let batches = format!("/api/v1/events/{}/check-batches", fx.event_id);
    let (status, red) = fx
        .admin
        .post(&batches, json!({"team_id": fx.team_id}))
        .await?;
    assert_eq!(status, 201, "{red}");
    let red_batch = red["batch_id"].as_i64().context("batch")?;
    let deadline = std::time::Instant::now() + LONG;
    while !Command::new("pgrep")
        .args(["-u", &format!("{red_user}c"), "-x", "sleep"])
        .output()?
        .status
        .success()
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "red's checks never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, blue) = fx
        .admin
        .post(&batches, json!({"team_id": fx.other_team_id}))
        .await?;
    assert_eq!(status, 201, "{blue}");
    let blue_done = wait_batch(&fx, blue["batch_id"].as_i64().context("batch")?).await?;
    assert_eq!(
        (
            blue_done["counts"]["passed"].as_i64(),
            blue_done["counts"]["error"].as_i64()
        ),
        (Some(6), Some(0)),
        "{blue_done}"
    );
    // Blue was scored while red's checks still hang: red held only its share.
    let (_, red_now) = fx
        .admin
        .get(&format!("/api/v1/check-batches/{red_batch}"))
        .await?;
    assert_eq!(red_now["done"], false, "red's checks still run: {red_now}");
    let hanging = Command::new("pgrep")
        .args(["-c", "-u", &format!("{red_user}c"), "-x", "sleep"])
        .output()?;
    let hanging: u32 = String::from_utf8_lossy(&hanging.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        (1..=2).contains(&hanging),
        "one lab runs at most half of the host's 4 check slots, not {hanging}"
    );
    drop(host);
    Ok(())
}
