//! `labrack-host lab-init`: PID 1 of a lab's box. Started by the supervisor inside the
//! lab's new PID, mount, IPC and UTS namespaces and its network namespace, as root, it:
//!
//! 1. joins the lab's cgroup (writes `0` to `cgroup.procs`) before anything else, so
//!    everything it starts is inside;
//! 2. gives the box its own `/proc` (`hidepid=invisible`: a user sees only its own
//!    processes), `/tmp`, `/var/tmp`, `/dev/shm` (tmpfs, counted in the lab's memory),
//!    `/run` (no host sockets: no D-Bus, no systemd, no other lab's X sockets), its own
//!    pseudo-terminals, and an empty cron spool (a crontab written inside never reaches
//!    the host's cron);
//! 3. starts the box's sshd, xrdp session manager and xrdp, restarts any that exits, and
//!    reaps every orphan (it is their init).
//!
//! When it exits the kernel kills everything in the box's PID namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::mount::{MsFlags, mount};
use serde::{Deserialize, Serialize};

/// What the box's init needs, written by the supervisor (`box.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InitSpec {
    /// `cgroup.procs` files to join first (none under systemd: the scope holds it already)
    pub(crate) joins: Vec<PathBuf>,
    /// the box's directory on the host, shown inside at `/run/labrack-box`
    pub(crate) box_dir: PathBuf,
    /// the lab user's home: the only one the box's `/home` shows
    pub(crate) home: PathBuf,
    pub(crate) hostname: String,
    /// size of each private tmpfs
    pub(crate) tmp_mib: u32,
    pub(crate) daemons: Vec<Daemon>,
}

/// A server the init keeps running.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Daemon {
    pub(crate) name: String,
    pub(crate) argv: Vec<String>,
    pub(crate) log: PathBuf,
}

struct Running {
    daemon: Daemon,
    child: Option<Child>,
    restart_at: Instant,
    restarts: u32,
}

pub(crate) fn run(spec_path: &Path) -> anyhow::Result<()> {
    let spec: InitSpec = serde_json::from_slice(
        &std::fs::read(spec_path).with_context(|| format!("reading {}", spec_path.display()))?,
    )
    .with_context(|| format!("parsing {}", spec_path.display()))?;
    super::cgroup::join(&spec.joins)?;
    // The box's init is the last thing the kernel's OOM killer should pick inside it.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    make_mounts(spec.tmp_mib, &spec.box_dir, &spec.home)?;
    nix::unistd::sethostname(&spec.hostname).context("setting the box's host name")?;
    let mut running: Vec<Running> = spec
        .daemons
        .into_iter()
        .map(|daemon| Running {
            daemon,
            child: None,
            restart_at: Instant::now(),
            restarts: 0,
        })
        .collect();
    loop {
        for entry in &mut running {
            if entry.child.is_none() && Instant::now() >= entry.restart_at {
                match spawn(&entry.daemon) {
                    Ok(child) => entry.child = Some(child),
                    Err(error) => eprintln!("lab-init: {}: {error:#}", entry.daemon.name),
                }
                // 0.2 s, 0.4 s, … at most 10 s between restarts of a server that keeps dying.
                entry.restarts = entry.restarts.saturating_add(1);
                entry.restart_at = Instant::now()
                    + Duration::from_millis(200u64.saturating_mul(1 << entry.restarts.min(6)))
                        .min(Duration::from_secs(10));
            }
        }
        // Reap: our own servers (restart them later) and any orphan of the box.
        loop {
            match nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    if let Some(pid) = status.pid() {
                        for entry in &mut running {
                            if entry
                                .child
                                .as_ref()
                                .is_some_and(|c| c.id() == u32::try_from(pid.as_raw()).unwrap_or(0))
                            {
                                eprintln!(
                                    "lab-init: {} exited ({status:?}); restarting it",
                                    entry.daemon.name
                                );
                                entry.child = None;
                            }
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn(daemon: &Daemon) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&daemon.log)
        .with_context(|| format!("opening {}", daemon.log.display()))?;
    Command::new(&daemon.argv[0])
        .args(&daemon.argv[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8")
        .spawn()
        .with_context(|| format!("starting {}", daemon.argv[0]))
}

fn mount_tmpfs(target: &str, mode: &str, size_mib: u32) -> anyhow::Result<()> {
    if !Path::new(target).is_dir() {
        return Ok(());
    }
    let options = format!("mode={mode},size={size_mib}m");
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .with_context(|| format!("mounting a private tmpfs on {target}"))
}

/// Shows a directory opened (`O_PATH`) before anything was masked at `target`.
fn bind_fd(fd: &std::os::fd::OwnedFd, target: &str) -> anyhow::Result<()> {
    let source = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
    mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("binding {target}"))
}

fn open_path(dir: &Path) -> anyhow::Result<std::os::fd::OwnedFd> {
    nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| format!("opening {}", dir.display()))
}

fn make_mounts(tmp_mib: u32, box_dir: &Path, home: &Path) -> anyhow::Result<()> {
    // Held open before anything is masked: the box's directory may lie below /tmp or /run.
    let box_fd = open_path(box_dir)?;
    let home_fd = open_path(home)?;
    // Nothing mounted here reaches the host (unshare made the tree private; again to be sure).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the box's mounts private")?;
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        proc_flags,
        Some("hidepid=invisible"),
    )
    .or_else(|_| {
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            proc_flags,
            Some("hidepid=2"),
        )
    })
    .context("mounting the box's /proc")?;
    mount_tmpfs("/run", "0755", 64)?;
    std::fs::create_dir_all(super::supervisor::INNER_DIR)
        .context("creating the box's own directory")?;
    std::fs::set_permissions(
        super::supervisor::INNER_DIR,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    bind_fd(&box_fd, super::supervisor::INNER_DIR)?;
    drop(box_fd);
    // No other lab's home, not even its name.
    if home.parent() == Some(Path::new("/home")) {
        mount_tmpfs("/home", "0755", 1)?;
        std::fs::create_dir(home).with_context(|| format!("creating {}", home.display()))?;
        bind_fd(&home_fd, &home.display().to_string())?;
    }
    drop(home_fd);
    mount_tmpfs("/tmp", "1777", tmp_mib)?;
    mount_tmpfs("/var/tmp", "1777", tmp_mib)?;
    mount_tmpfs("/dev/shm", "1777", tmp_mib)?;
    // Its own pseudo-terminals: no lab sees another's /dev/pts.
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .context("mounting the box's /dev/pts")?;
    mount(
        Some("/dev/pts/ptmx"),
        "/dev/ptmx",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .context("binding /dev/ptmx")?;
    for (dir, mode) in [
        ("/run/sshd", 0o755),
        ("/run/xrdp", 0o755),
        ("/run/xrdp/sockdir", 0o1777),
        ("/run/lock", 0o1777),
        ("/run/user", 0o755),
    ] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .with_context(|| format!("chmod {dir}"))?;
    }
    // A crontab written inside lands here, never in the host's spool.
    mount_tmpfs("/var/spool/cron", "0755", 1)?;
    Ok(())
}
