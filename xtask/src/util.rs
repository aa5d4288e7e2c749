//! Helpers: process running, paths, apt-get, a managed `labrack serve` process.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

pub(crate) fn project_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR at run time: the checkout being worked on. The
    // compile-time value can name another checkout, since the build cache (and this binary)
    // is shared between clones.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().map(Path::to_path_buf).unwrap_or_default()
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
    command
        .current_dir(project_root())
        .env("CARGO_TARGET_DIR", target_dir());
    command
}

pub(crate) fn step(what: &str) {
    println!("\n==> {what}");
}

pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

pub(crate) fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

pub(crate) fn temp_dir(tag: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "labrack-xtask-{tag}-{}-{}",
        std::process::id(),
        now_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
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
    step(&format!(
        "installing system packages: {}",
        missing.join(" ")
    ));
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| {
        let mut command = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        command
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", "DPkg::Lock::Timeout=900"])
            .args(args);
        run(&mut command)
    };
    apt(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    apt(&args)
}

/// cargo-nextest, from crates.io if absent (a fresh Debian machine has only rustup's cargo).
pub(crate) fn ensure_nextest() -> anyhow::Result<()> {
    if cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    step("installing cargo-nextest (once)");
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
            "install",
            "cargo-nextest",
            "--locked",
        ]),
    )
}

/// tauri-driver, the WebDriver bridge the console's UI test drives (built from crates.io once).
pub(crate) fn ensure_tauri_driver() -> anyhow::Result<()> {
    if Command::new("tauri-driver")
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    step("installing tauri-driver 2.1.0 (once)");
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
            "install",
            "tauri-driver",
            "--version",
            "2.1.0",
            "--locked",
        ]),
    )
}

/// Node.js ≥ 18 with npm, from Debian if absent.
pub(crate) fn ensure_node() -> anyhow::Result<()> {
    let version = Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let major = version.as_deref().and_then(|v| {
        v.trim_start_matches('v')
            .split('.')
            .next()?
            .parse::<u32>()
            .ok()
    });
    let has_npm = Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if major.is_some_and(|m| m >= 18) && has_npm {
        return Ok(());
    }
    ensure_debian_packages(&["nodejs", "npm"])
}

/// Starts `binary serve` on a free loopback port and `data_dir`, serving the built web UI.
pub(crate) fn start_server(binary: &Path, data_dir: &Path) -> anyhow::Result<labrack_e2e::Server> {
    let web = project_root().join("web/dist");
    let web = web.to_str().context("web dir path is not UTF-8")?;
    labrack_e2e::Server::start_binary(binary, data_dir, "127.0.0.1:0", &["--web-dir", web])
}
