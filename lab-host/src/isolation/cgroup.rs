//! Each lab's cgroup: limits from its template, device rules, membership and killing.
//!
//! Three drivers, chosen once at start-up by what the host offers:
//!
//! - **cgroup v1** (no systemd as PID 1, or a hybrid layout): one directory per lab under
//!   `labrack/` in each controller's hierarchy (`cpu`, `memory`, `pids`, `devices`,
//!   `freezer`, `blkio`), with a child for the desktop (`box`) and one per check
//!   (`check-RUN`). A process joins by writing `0` to `cgroup.procs` itself, before it
//!   starts anything, so nothing it starts is ever outside.
//! - **cgroup v2 with systemd**: a slice per lab (`labrack-USER.slice`) holding the limits,
//!   with a transient scope per desktop and per check started by `systemd-run --scope`; the
//!   scopes carry the device rules (`DevicePolicy=closed` + `DeviceAllow=`), which systemd
//!   compiles to the BPF program cgroup v2 needs.
//! - **cgroup v2 without systemd**: the same directories under the agent's own delegated
//!   cgroup, with every limit but devices (those need BPF); a host with GPUs refuses labs.
//!
//! Architecture invariant: a lab's processes are only ever killed through its cgroup (or
//! systemd unit), never by name, so nothing of another lab is touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use labrack_provisioner::limits::{Enforcement, LabLimits};

use super::devices::DeviceRule;

/// v1 controllers a lab needs, and the ones it uses when present.
const V1_REQUIRED: [&str; 5] = ["cpu", "memory", "pids", "devices", "freezer"];
const V1_OPTIONAL: [&str; 1] = ["blkio"];
/// The CFS period quotas are expressed against.
const CPU_PERIOD_US: u64 = 100_000;

/// Which unit of a lab a cgroup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unit {
    /// the desktop and shell: the lab's init and everything under it
    Box,
    /// one check run
    Check(i64),
}

impl Unit {
    fn dir(&self) -> String {
        match self {
            Self::Box => "box".into(),
            Self::Check(run) => format!("check-{run}"),
        }
    }
}

/// The host's cgroup driver.
#[derive(Debug, Clone)]
pub(crate) enum Cgroups {
    V1 {
        root: PathBuf,
        controllers: Vec<&'static str>,
        io_weight_file: Option<&'static str>,
    },
    V2Systemd,
    V2 {
        base: PathBuf,
    },
}

impl Cgroups {
    /// Finds out what this host has. `name` keeps several agents on one machine (tests)
    /// apart: every group lives under `labrack/`.
    pub(crate) fn detect() -> anyhow::Result<Self> {
        let root = PathBuf::from("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            if Path::new("/run/systemd/system").exists() {
                return Ok(Self::V2Systemd);
            }
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .context("reading /proc/self/cgroup")?;
            let path = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .context("no cgroup v2 entry in /proc/self/cgroup")?;
            let own_dir = root.join(path.trim_start_matches('/'));
            // cgroup v2 lets a group with processes hand no controllers to its children:
            // the agent moves itself into a leaf of its (delegated) group first.
            if own_dir != root && !own_dir.ends_with("agent") {
                let leaf = own_dir.join("agent");
                std::fs::create_dir_all(&leaf).with_context(|| {
                    format!(
                        "creating {} (delegate the agent's cgroup to it)",
                        leaf.display()
                    )
                })?;
                std::fs::write(leaf.join("cgroup.procs"), "0")
                    .with_context(|| format!("moving the agent into {}", leaf.display()))?;
                return Ok(Self::V2 {
                    base: own_dir.join("labrack"),
                });
            }
            let parent = if own_dir.ends_with("agent") {
                own_dir
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or(own_dir.clone())
            } else {
                own_dir
            };
            return Ok(Self::V2 {
                base: parent.join("labrack"),
            });
        }
        let mut controllers = Vec::new();
        for controller in V1_REQUIRED {
            if !root.join(controller).join("cgroup.procs").exists() {
                bail!(
                    "this host has no cgroup v1 `{controller}` hierarchy at /sys/fs/cgroup/{controller} and no cgroup v2: labs cannot be isolated"
                );
            }
            controllers.push(controller);
        }
        for controller in V1_OPTIONAL {
            if root.join(controller).join("cgroup.procs").exists() {
                controllers.push(controller);
            }
        }
        let io_weight_file = ["blkio.bfq.weight", "blkio.weight"]
            .into_iter()
            .find(|f| root.join("blkio").join(f).exists());
        Ok(Self::V1 {
            root,
            controllers,
            io_weight_file,
        })
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::V1 { .. } => "cgroup-v1",
            Self::V2Systemd => "cgroup-v2-systemd",
            Self::V2 { .. } => "cgroup-v2",
        }
    }

    /// The limits this driver enforces.
    pub(crate) fn enforces(&self) -> Vec<Enforcement> {
        let mut all = vec![Enforcement::Cpu, Enforcement::Memory, Enforcement::Pids];
        match self {
            Self::V1 { io_weight_file, .. } => {
                all.push(Enforcement::Devices);
                if io_weight_file.is_some() {
                    all.push(Enforcement::IoWeight);
                }
            }
            Self::V2Systemd => all.extend([Enforcement::Devices, Enforcement::IoWeight]),
            Self::V2 { .. } => all.push(Enforcement::IoWeight),
        }
        all
    }

    fn v1_dir(root: &Path, controller: &str, lab: &str, unit: Option<&Unit>) -> PathBuf {
        let dir = root.join(controller).join("labrack").join(lab);
        match unit {
            Some(unit) => dir.join(unit.dir()),
            None => dir,
        }
    }

    /// Makes (or updates) the lab's group with its limits and device rules.
    pub(crate) fn prepare_lab(
        &self,
        lab: &str,
        limits: &LabLimits,
        devices: &[DeviceRule],
    ) -> anyhow::Result<()> {
        match self {
            Self::V1 {
                root,
                controllers,
                io_weight_file,
            } => {
                for controller in controllers {
                    let dir = Self::v1_dir(root, controller, lab, None);
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                let at = |controller: &str| Self::v1_dir(root, controller, lab, None);
                write(
                    &at("cpu").join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                write(
                    &at("cpu").join("cpu.cfs_quota_us"),
                    &quota_us(limits.cpu_millicores).to_string(),
                )?;
                write(
                    &at("cpu").join("cpu.shares"),
                    &shares(limits.cpu_weight).to_string(),
                )?;
                set_v1_memory(&at("memory"), u64::from(limits.memory_mib) * 1024 * 1024)?;
                write(&at("pids").join("pids.max"), &limits.pids.to_string())?;
                if let Some(weight) = limits.io_weight {
                    let file = io_weight_file.context(
                        "io_weight: this host's block layer has no IO weight (no BFQ scheduler)",
                    )?;
                    write(&at("blkio").join(file), &v1_io_weight(weight).to_string())?;
                }
                apply_v1_devices(&at("devices"), devices)?;
                Ok(())
            }
            Self::V2Systemd => {
                let mut command = Command::new("systemctl");
                command
                    .args(["set-property", "--runtime", &slice(lab)])
                    .args(systemd_limits(limits));
                run(&mut command)
            }
            Self::V2 { base } => {
                let dir = base.join(lab);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                enable_v2_controllers(base, &dir)?;
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", quota_us(limits.cpu_millicores)),
                )?;
                write(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
                write(
                    &dir.join("memory.max"),
                    &(u64::from(limits.memory_mib) * 1024 * 1024).to_string(),
                )?;
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
                if let Some(weight) = limits.io_weight {
                    write(&dir.join("io.weight"), &format!("default {weight}"))?;
                }
                Ok(())
            }
        }
    }

    /// Makes a unit's group below the lab's, with the lab's device rules and, for a check,
    /// its own memory limit. Returns the `cgroup.procs` files a process of the unit writes
    /// `0` to (empty under systemd, where the unit's command is wrapped instead).
    pub(crate) fn prepare_unit(
        &self,
        lab: &str,
        unit: &Unit,
        memory_mib: Option<u32>,
        pids: Option<u32>,
        devices: &[DeviceRule],
    ) -> anyhow::Result<Vec<PathBuf>> {
        match self {
            Self::V1 {
                root, controllers, ..
            } => {
                let mut joins = Vec::new();
                for controller in controllers {
                    let dir = Self::v1_dir(root, controller, lab, Some(unit));
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    joins.push(dir.join("cgroup.procs"));
                }
                apply_v1_devices(&Self::v1_dir(root, "devices", lab, Some(unit)), devices)?;
                if let Some(memory) = memory_mib {
                    set_v1_memory(
                        &Self::v1_dir(root, "memory", lab, Some(unit)),
                        u64::from(memory) * 1024 * 1024,
                    )?;
                }
                if let Some(pids) = pids {
                    write(
                        &Self::v1_dir(root, "pids", lab, Some(unit)).join("pids.max"),
                        &pids.to_string(),
                    )?;
                }
                Ok(joins)
            }
            Self::V2Systemd => Ok(Vec::new()),
            Self::V2 { base } => {
                let dir = base.join(lab).join(unit.dir());
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                if let Some(memory) = memory_mib {
                    write(
                        &dir.join("memory.max"),
                        &(u64::from(memory) * 1024 * 1024).to_string(),
                    )?;
                }
                if let Some(pids) = pids {
                    write(&dir.join("pids.max"), &pids.to_string())?;
                }
                Ok(vec![dir.join("cgroup.procs")])
            }
        }
    }

    /// Under systemd, the command that starts `argv` in the unit's own scope; otherwise
    /// `argv` unchanged (its process joins the group itself).
    pub(crate) fn wrap(
        &self,
        lab: &str,
        unit: &Unit,
        memory_mib: Option<u32>,
        devices: &[DeviceRule],
        argv: Vec<String>,
    ) -> Vec<String> {
        match self {
            Self::V2Systemd => {
                let mut wrapped = vec![
                    "systemd-run".to_owned(),
                    "--scope".to_owned(),
                    "--quiet".to_owned(),
                    "--collect".to_owned(),
                    format!("--unit={}", scope(lab, unit)),
                    format!("--slice={}", slice(lab)),
                    "--property=DevicePolicy=closed".to_owned(),
                ];
                for rule in devices {
                    wrapped.push(format!("--property=DeviceAllow={}", rule.systemd()));
                }
                if let Some(memory) = memory_mib {
                    wrapped.push(format!("--property=MemoryMax={memory}M"));
                }
                wrapped.push("--".to_owned());
                wrapped.extend(argv);
                wrapped
            }
            _ => argv,
        }
    }

    /// Every process id in the unit (or, with `None`, the whole lab).
    pub(crate) fn members(&self, lab: &str, unit: Option<&Unit>) -> Vec<u32> {
        let dir = match self {
            Self::V1 { root, .. } => Self::v1_dir(root, "pids", lab, unit),
            Self::V2Systemd => {
                let name = match unit {
                    Some(unit) => format!("{}/{}", slice(lab), scope(lab, unit)),
                    None => slice(lab),
                };
                PathBuf::from("/sys/fs/cgroup/labrack.slice").join(name)
            }
            Self::V2 { base } => match unit {
                Some(unit) => base.join(lab).join(unit.dir()),
                None => base.join(lab),
            },
        };
        let mut pids = Vec::new();
        collect_pids(&dir, &mut pids);
        pids
    }

    /// Kills every process of the unit (or the whole lab) and waits until none is left.
    pub(crate) fn kill(&self, lab: &str, unit: Option<&Unit>) -> anyhow::Result<()> {
        if let Self::V2Systemd = self {
            let target = match unit {
                Some(unit) => scope(lab, unit),
                None => slice(lab),
            };
            // Stopping a unit that does not exist is not an error worth failing on.
            let _ = Command::new("systemctl")
                .args(["kill", "--signal=KILL", &target])
                .output();
        }
        let freezer = match (self, unit) {
            (Self::V1 { root, .. }, _) => Some(Self::v1_dir(root, "freezer", lab, unit)),
            _ => None,
        };
        let kill_file = match self {
            Self::V2 { base } => Some(match unit {
                Some(unit) => base.join(lab).join(unit.dir()).join("cgroup.kill"),
                None => base.join(lab).join("cgroup.kill"),
            }),
            _ => None,
        };
        // Empty already (a check's init ended, taking its PID namespace along): done.
        if !matches!(self, Self::V2Systemd) && self.members(lab, unit).is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(file) = &kill_file
                && file.exists()
            {
                let _ = std::fs::write(file, "1");
            }
            // Frozen, a group cannot fork while it is being emptied (a fork bomb cannot
            // outrun the kill loop).
            let frozen = freezer.as_ref().is_some_and(|dir| set_frozen(dir, true));
            let pids = self.members(lab, unit);
            for pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(*pid).unwrap_or(0)),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if frozen && let Some(dir) = &freezer {
                set_frozen(dir, false);
            }
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} process(es) of lab {lab} survive SIGKILL", pids.len());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills everything of the lab and removes all its groups.
    pub(crate) fn remove_lab(&self, lab: &str) -> anyhow::Result<()> {
        self.kill(lab, None)?;
        match self {
            Self::V1 {
                root, controllers, ..
            } => {
                for controller in controllers {
                    remove_tree(&Self::v1_dir(root, controller, lab, None));
                }
            }
            Self::V2Systemd => {
                let _ = Command::new("systemctl")
                    .args(["stop", &slice(lab)])
                    .output();
            }
            Self::V2 { base } => remove_tree(&base.join(lab)),
        }
        Ok(())
    }

    /// The lab (user name) a process belongs to, read from its cgroup path.
    pub(crate) fn lab_of(&self, pid: u32) -> Option<String> {
        lab_in(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
    }
}

/// The lab named by a `/proc/PID/cgroup` text, if any.
fn lab_in(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        // cgroupfs: …/labrack/USER/…; systemd: …/labrack-USER.slice/… with '-' written '_'
        // (user prefixes hold no '_', so the way back is plain).
        if let Some(rest) = path.split("/labrack/").nth(1) {
            let lab = rest.split('/').next()?;
            return (!lab.is_empty()).then(|| lab.to_owned());
        }
        let rest = path.split("/labrack-").nth(1)?;
        let lab = rest.split(['/', '.']).next()?.replace('_', "-");
        (!lab.is_empty()).then_some(lab)
    })
}

/// Joins the calling process to `cgroup.procs` files (the unit's groups), before it starts
/// anything. Used by the lab's init and by a check's launcher.
pub(crate) fn join(procs_files: &[PathBuf]) -> anyhow::Result<()> {
    for file in procs_files {
        std::fs::write(file, "0").with_context(|| format!("joining {}", file.display()))?;
    }
    Ok(())
}

fn slice(lab: &str) -> String {
    format!("labrack-{}.slice", lab.replace('-', "_"))
}

fn scope(lab: &str, unit: &Unit) -> String {
    format!("labrack-{}-{}.scope", lab.replace('-', "_"), unit.dir())
}

/// `systemctl set-property` arguments for a lab's slice.
fn systemd_limits(limits: &LabLimits) -> Vec<String> {
    let mut properties = vec![
        format!("CPUQuota={}%", u64::from(limits.cpu_millicores) / 10),
        format!("CPUWeight={}", limits.cpu_weight),
        format!("MemoryMax={}M", limits.memory_mib),
        "MemorySwapMax=0".to_owned(),
        format!("TasksMax={}", limits.pids),
    ];
    if let Some(weight) = limits.io_weight {
        properties.push(format!("IOWeight={weight}"));
    }
    properties
}

fn quota_us(millicores: u32) -> u64 {
    u64::from(millicores) * CPU_PERIOD_US / 1000
}

/// cgroup v2 weight (1–10000, default 100) → v1 shares (2–262144, default 1024).
fn shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).clamp(2, 262_144)
}

/// cgroup v2 IO weight (1–10000) → v1 blkio weight (10–1000).
fn v1_io_weight(weight: u32) -> u32 {
    (weight / 10).clamp(10, 1000)
}

/// Sets a v1 memory limit, swap included where the kernel accounts it. The kernel keeps
/// memory ≤ memory+swap at every step, so a rise sets memory+swap first and a cut memory
/// first; a reused group may still hold the last run's page cache, emptied before a cut.
fn set_v1_memory(dir: &Path, bytes: u64) -> anyhow::Result<()> {
    let (memory, memsw) = (
        dir.join("memory.limit_in_bytes"),
        dir.join("memory.memsw.limit_in_bytes"),
    );
    let value = bytes.to_string();
    let swap = memsw.exists();
    if swap && std::fs::write(&memsw, &value).is_ok() {
        return write(&memory, &value);
    }
    if std::fs::write(&memory, &value).is_err() {
        let _ = std::fs::write(dir.join("memory.force_empty"), "0");
        write(&memory, &value)?;
    }
    if swap {
        write(&memsw, &value)?;
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Deny everything, then allow the rules: a v1 child starts with its parent's list, and may
/// only narrow it. The kernel takes "deny all" only from a group without children, so a
/// group whose list already is the rules is left alone, and otherwise its (empty) children
/// go first; they are made again below it with the new list.
fn apply_v1_devices(dir: &Path, devices: &[DeviceRule]) -> anyhow::Result<()> {
    let mut wanted: Vec<String> = devices.iter().map(DeviceRule::v1).collect();
    wanted.sort();
    let mut current: Vec<String> = std::fs::read_to_string(dir.join("devices.list"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    current.sort();
    if current == wanted {
        return Ok(());
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    write(&dir.join("devices.deny"), "a")
        .context("device rules (a group below it is still in use)")?;
    for rule in devices {
        write(&dir.join("devices.allow"), &rule.v1())?;
    }
    Ok(())
}

fn enable_v2_controllers(base: &Path, lab_dir: &Path) -> anyhow::Result<()> {
    for dir in [base, lab_dir] {
        let control = dir.join("cgroup.subtree_control");
        for controller in ["+cpu", "+memory", "+pids", "+io"] {
            let _ = std::fs::write(&control, controller);
        }
    }
    Ok(())
}

fn set_frozen(dir: &Path, frozen: bool) -> bool {
    let state = dir.join("freezer.state");
    if std::fs::write(&state, if frozen { "FROZEN" } else { "THAWED" }).is_err() {
        return false;
    }
    if !frozen {
        return true;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if std::fs::read_to_string(&state).is_ok_and(|s| s.trim() == "FROZEN") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&entry.path(), pids);
            }
        }
    }
}

/// Removes a cgroup directory tree bottom-up (cgroup directories are removed with
/// `rmdir`, never by deleting their files).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_translate_to_each_cgroup_version() {
        assert_eq!(quota_us(2_000), 200_000);
        assert_eq!(quota_us(500), 50_000);
        assert_eq!(shares(100), 1024);
        assert_eq!(shares(1), 10);
        assert_eq!(v1_io_weight(100), 10);
        assert_eq!(v1_io_weight(10_000), 1000);
        let limits = LabLimits {
            io_weight: Some(300),
            ..LabLimits::default()
        };
        assert_eq!(
            systemd_limits(&limits),
            [
                "CPUQuota=200%",
                "CPUWeight=100",
                "MemoryMax=4096M",
                "MemorySwapMax=0",
                "TasksMax=1024",
                "IOWeight=300"
            ]
        );
    }

    #[test]
    fn a_process_is_traced_to_its_lab_by_its_cgroup_path() {
        assert_eq!(
            lab_in("9:name=systemd:/\n8:pids:/labrack/lr-a7/box\n").as_deref(),
            Some("lr-a7")
        );
        assert_eq!(
            lab_in("0::/labrack.slice/labrack-lr_a7.slice/labrack-lr_a7-check-3.scope\n")
                .as_deref(),
            Some("lr-a7")
        );
        assert_eq!(lab_in("0::/system.slice/ssh.service\n"), None);
    }

    #[test]
    fn systemd_scopes_carry_the_device_rules() {
        let rules = [DeviceRule::char(195, Some(1)), DeviceRule::char(1, Some(3))];
        let argv = Cgroups::V2Systemd.wrap(
            "lr-a7",
            &Unit::Check(12),
            Some(256),
            &rules,
            vec!["labrack-host".into(), "check-exec".into()],
        );
        assert_eq!(
            argv,
            [
                "systemd-run",
                "--scope",
                "--quiet",
                "--collect",
                "--unit=labrack-lr_a7-check-12.scope",
                "--slice=labrack-lr_a7.slice",
                "--property=DevicePolicy=closed",
                "--property=DeviceAllow=/dev/char/195:1 rw",
                "--property=DeviceAllow=/dev/char/1:3 rw",
                "--property=MemoryMax=256M",
                "--",
                "labrack-host",
                "check-exec"
            ]
        );
        let v1 = Cgroups::V1 {
            root: "/sys/fs/cgroup".into(),
            controllers: vec![],
            io_weight_file: None,
        };
        assert_eq!(
            v1.wrap("lr-a7", &Unit::Box, None, &rules, vec!["x".into()]),
            ["x"],
            "v1 processes join by themselves"
        );
    }
}
