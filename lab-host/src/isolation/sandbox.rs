//! The inside of a check run: `labrack-host check-exec` and `labrack-host check-init`.
//!
//! The agent starts `check-exec` as root with the run's spec (script included) on stdin.
//! It joins the run's own cgroup, enters the lab's network namespace (a check allowed the
//! network reaches its own lab's `localhost`) or an empty one (not even loopback), unshares
//! mount, PID, IPC and UTS namespaces, puts the script in a sealed memory file, and starts
//! `check-init` — PID 1 of the new PID namespace. `check-init` gives the run a fresh
//! `/proc` (hidepid), `/tmp`, `/var/tmp`, `/dev/shm` and `/run`, sets the CPU-time limit and
//! no-new-privileges, prints [`READY`] and only then starts the script under `bash` as the
//! lab's checker user (group: the lab's, for read access to its home). The script arrives
//! as `/dev/fd/N`, never in an argument vector.
//!
//! Anything that goes wrong before [`READY`] is printed means the check could not run; the
//! agent decides that from the marker, never from the script's own output. When the
//! script's `bash` exits, `check-init` exits and the kernel kills whatever the script left
//! in its PID namespace (a `setsid` or double fork cannot escape it).

use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use nix::mount::{MsFlags, mount};
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};

/// The first bytes of a check's stdout once its sandbox is up and the script starts.
pub(crate) const READY: &[u8] = b"LABRACK-CHECK-READY\n";
/// PATH inside a check.
const CHECK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What `check-exec` reads on stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckRequest {
    /// `cgroup.procs` files of the run's cgroup (none under systemd)
    pub(crate) joins: Vec<PathBuf>,
    /// the lab's network namespace, when the check may use the network
    pub(crate) netns: Option<PathBuf>,
    pub(crate) inner: InnerSpec,
    pub(crate) script: String,
}

/// What `check-init` needs (in its environment: no script in it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InnerSpec {
    pub(crate) checker: String,
    pub(crate) checker_uid: u32,
    /// the lab's group: the checker reads the lab's home through it
    pub(crate) lab_gid: u32,
    pub(crate) lab_user: String,
    pub(crate) home: PathBuf,
    pub(crate) name: String,
    pub(crate) run_id: i64,
    pub(crate) cpu_secs: u32,
    /// `CUDA_VISIBLE_DEVICES` for the lab's GPUs
    pub(crate) visible_gpus: String,
    /// the memory file holding the script
    #[serde(default)]
    pub(crate) script_fd: i32,
}

const SPEC_ENV: &str = "LABRACK_CHECK_SPEC";

/// `check-exec`: outside the new PID namespace, in the check's mount/net namespaces.
pub(crate) fn exec() -> anyhow::Result<std::process::ExitCode> {
    let mut input = Vec::new();
    std::io::stdin()
        .take(4 * 1024 * 1024)
        .read_to_end(&mut input)
        .context("reading the check request")?;
    let mut request: CheckRequest =
        serde_json::from_slice(&input).context("parsing the check request")?;
    super::cgroup::join(&request.joins)?;
    match &request.netns {
        Some(path) => {
            let netns = std::fs::File::open(path).with_context(|| {
                format!(
                    "the lab's network namespace {} is missing (is its box running?)",
                    path.display()
                )
            })?;
            nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET)
                .context("entering the lab's network namespace")?;
        }
        None => nix::sched::unshare(CloneFlags::CLONE_NEWNET)
            .context("making the check's empty network namespace")?,
    }
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .context("making the check's namespaces")?;
    // The script in a sealed memory file the check's bash reads as /dev/fd/N. Its first
    // line closes N again, so nothing the script starts inherits it.
    let memfd = nix::sys::memfd::memfd_create(
        "labrack-check",
        nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .context("memfd_create")?;
    let fd = memfd.as_raw_fd();
    let mut file = std::fs::File::from(memfd);
    write!(file, "exec {fd}<&-; ").context("writing the script")?;
    file.write_all(request.script.as_bytes())
        .context("writing the script")?;
    file.flush()?;
    let seals = nix::fcntl::SealFlag::F_SEAL_SEAL
        | nix::fcntl::SealFlag::F_SEAL_SHRINK
        | nix::fcntl::SealFlag::F_SEAL_GROW
        | nix::fcntl::SealFlag::F_SEAL_WRITE;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_ADD_SEALS(seals))
        .context("sealing the script")?;
    request.inner.script_fd = fd;
    let exe = std::env::current_exe().context("finding the labrack-host binary")?;
    let status = Command::new(exe)
        .arg("check-init")
        .env_clear()
        .env(SPEC_ENV, serde_json::to_string(&request.inner)?)
        .stdin(Stdio::null())
        .status()
        .context("starting the check's init")?;
    drop(file);
    Ok(exit_code(status))
}

/// The exit status as a process exit code (a signal `n` becomes 128 + n, as shells do).
fn exit_code(status: std::process::ExitStatus) -> std::process::ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255);
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(255))
}

/// `check-init`: PID 1 of the check's PID namespace.
pub(crate) fn init() -> anyhow::Result<std::process::ExitCode> {
    let spec: InnerSpec = serde_json::from_str(&std::env::var(SPEC_ENV).context("no check spec")?)
        .context("parsing the check spec")?;
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the check's mounts private")?;
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
    .context("mounting the check's /proc")?;
    for target in ["/tmp", "/var/tmp", "/dev/shm"] {
        mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777,size=256m"),
        )
        .with_context(|| format!("mounting the check's {target}"))?;
    }
    mount(
        Some("tmpfs"),
        "/run",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m"),
    )
    .context("mounting the check's /run")?;
    let cpu = u64::from(spec.cpu_secs);
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_CPU,
        cpu,
        cpu.saturating_add(1),
    )
    .context("setting the CPU-time limit")?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .context("turning core dumps off")?;
    nix::sys::prctl::set_no_new_privs().context("setting no-new-privileges")?;
    if !std::path::Path::new("/bin/bash").exists() {
        bail!("/bin/bash is missing on this host");
    }
    if !spec.home.is_dir() {
        bail!("the lab's home {} is missing", spec.home.display());
    }
    let mut stdout = std::io::stdout();
    stdout.write_all(READY)?;
    stdout.flush()?;
    let mut child = Command::new("/bin/bash")
        .args(["--noprofile", "--norc"])
        .arg(format!("/dev/fd/{}", spec.script_fd))
        .uid(spec.checker_uid)
        .gid(spec.lab_gid)
        .current_dir(&spec.home)
        .env_clear()
        .env("HOME", &spec.home)
        .env("USER", &spec.checker)
        .env("LOGNAME", &spec.checker)
        .env("PATH", CHECK_PATH)
        .env("LANG", "C.UTF-8")
        .env("LABRACK_CHECK", &spec.name)
        .env("LABRACK_CHECK_RUN", spec.run_id.to_string())
        .env("LABRACK_LAB_USER", &spec.lab_user)
        .env("CUDA_VISIBLE_DEVICES", &spec.visible_gpus)
        .env("NVIDIA_VISIBLE_DEVICES", &spec.visible_gpus)
        .stdin(Stdio::null())
        .spawn()
        .context("starting the check's bash")?;
    let child_pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
    // Reap orphans until the script's bash ends; then exit, which ends the rest.
    loop {
        match nix::sys::wait::waitpid(None, None) {
            Ok(status) if status.pid() == Some(child_pid) => {
                let _ = child.try_wait();
                let code = match status {
                    nix::sys::wait::WaitStatus::Exited(_, code) => code,
                    nix::sys::wait::WaitStatus::Signaled(_, signal, _) => 128 + signal as i32,
                    _ => continue,
                };
                return Ok(std::process::ExitCode::from(
                    u8::try_from(code).unwrap_or(255),
                ));
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(error) => bail!("waiting for the check: {error}"),
        }
    }
}
