//! Helpers: process running, paths, apt-get, a managed `labrack serve` process.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};

pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The shared build cache: `$CARGO_TARGET_DIR`, else `~/.cache/labrack/target`, outside
/// the checkout so fresh clones (CI) reuse it.
pub(crate) fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| project_root().join("target"));
    cache.join("labrack/target")
}

pub(crate) fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(project_root()).env("CARGO_TARGET_DIR", target_dir());
    command
}

pub(crate) fn step(what: &str) {
    println!("\n==> {what}");
}

pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

pub(crate) fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

pub(crate) fn temp_dir(tag: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("labrack-xtask-{tag}-{}-{}", std::process::id(), now_nanos()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs whichever of `packages` are missing (idempotent: nothing runs if all are there).
pub(crate) fn ensure_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step("system packages: all present");
        return Ok(());
    }
    step(&format!("installing system packages: {}", missing.join(" ")));
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| {
        let mut command = if root { Command::new("apt-get") } else { let mut c = Command::new("sudo"); c.arg("apt-get"); c };
        command.env("DEBIAN_FRONTEND", "noninteractive").args(["-o", "DPkg::Lock::Timeout=900"]).args(args);
        run(&mut command)
    };
    apt(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    apt(&args)
}

/// Node.js ≥ 18 with npm, from Debian if absent.
pub(crate) fn ensure_node() -> anyhow::Result<()> {
    let version = Command::new("node").arg("--version").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let major = version.as_deref().and_then(|v| v.trim_start_matches('v').split('.').next()?.parse::<u32>().ok());
    let has_npm = Command::new("npm").arg("--version").output().is_ok_and(|o| o.status.success());
    if major.is_some_and(|m| m >= 18) && has_npm {
        return Ok(());
    }
    ensure_debian_packages(&["nodejs", "npm"])
}

/// A running `labrack serve` on a data dir, with what it printed at start.
pub(crate) struct Server {
    child: Child,
    pub(crate) url: String,
    pub(crate) admin_password: Option<String>,
    pub(crate) ca_cert: PathBuf,
    pub(crate) pid: u32,
}

impl Server {
    pub(crate) fn start(binary: &Path, data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .arg("--web-dir")
            .arg(project_root().join("web/dist"))
            .args(extra)
            .env("LABRACK_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut admin_password = None;
        let mut url = None;
        for line in lines.by_ref() {
            let line = line?;
            if let Some(rest) = line.strip_prefix("labrack: one-time password for admin: ") {
                admin_password = Some(rest.trim().to_owned());
            }
            if let Some(rest) = line.strip_prefix("labrack: listening on ") {
                url = Some(rest.trim().trim_end_matches('/').to_owned());
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let Some(url) = url else {
            let status = child.wait()?;
            bail!("labrack exited before listening: {status}");
        };
        let pid = child.id();
        Ok(Self { child, url, admin_password, ca_cert: data_dir.join("tls/ca.pem"), pid })
    }

    /// SIGTERM, then wait for a clean exit.
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        let status = self.child.wait()?;
        if !status.success() {
            bail!("labrack exited with {status} after SIGTERM");
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
