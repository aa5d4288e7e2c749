//! The attackers' share of the CPU in `cargo xtask bench abuse`.
//!
//! At a venue an attacker floods from a laptop of their own; here the attackers (the bench's
//! own attack tasks and the Chromium it starts) share the machine's two cores with the
//! appliance and the honest clients. A plain `nice` does not hold them back: Chromium starts
//! in a session of its own, so the kernel's autogroup scheduling gives it an equal share
//! however nice it is. Instead the attackers' threads and processes go into a CPU cgroup of
//! the lowest weight: they take what the appliance and the honest clients leave over, and
//! the bench reports how much they still managed to send.

use std::path::{Path, PathBuf};

const NAME: &str = "labrack-bench-attackers";

/// A cgroup of the lowest CPU weight for the attackers; removed again on drop.
pub(crate) struct AttackerGroup {
    kind: Kind,
}

enum Kind {
    /// cgroup v1: threads can move one by one (`tasks`), so the bench's attack runtime can
    /// be held back while its honest runtime is not.
    V1 { dir: PathBuf, home: PathBuf },
    /// cgroup v2: only whole processes (Chromium) can move.
    V2 { dir: PathBuf, home: PathBuf },
    /// no writable CPU controller: everything shares the CPU at the same weight.
    None(String),
}

impl AttackerGroup {
    pub(crate) fn create() -> Self {
        let kind = Self::v1()
            .or_else(|_| Self::v2())
            .unwrap_or_else(|why| Kind::None(why.to_string()));
        Self { kind }
    }

    fn v1() -> anyhow::Result<Kind> {
        let root = Path::new("/sys/fs/cgroup/cpu");
        anyhow::ensure!(
            root.join("cpu.shares").exists(),
            "no cgroup v1 cpu controller"
        );
        let home = root.join(own_group("cpu")?.trim_start_matches('/'));
        let dir = root.join(NAME);
        if !dir.exists() {
            std::fs::create_dir(&dir)?;
        }
        std::fs::write(dir.join("cpu.shares"), "2")?;
        Ok(Kind::V1 { dir, home })
    }

    fn v2() -> anyhow::Result<Kind> {
        let root = Path::new("/sys/fs/cgroup");
        let controllers = std::fs::read_to_string(root.join("cgroup.subtree_control"))?;
        anyhow::ensure!(
            controllers.split_whitespace().any(|c| c == "cpu"),
            "the cgroup v2 root does not delegate the cpu controller"
        );
        let home = root.join(own_group("")?.trim_start_matches('/'));
        let dir = root.join(NAME);
        if !dir.exists() {
            std::fs::create_dir(&dir)?;
        }
        std::fs::write(dir.join("cpu.weight"), "1")?;
        Ok(Kind::V2 { dir, home })
    }

    /// Moves the calling thread into the group (cgroup v1 only; a no-op otherwise).
    pub(crate) fn enter_current_thread(&self) {
        if let Kind::V1 { dir, .. } = &self.kind {
            // /proc/thread-self links to "PID/task/TID"
            if let Some(tid) = std::fs::read_link("/proc/thread-self")
                .ok()
                .and_then(|link| link.file_name().map(|n| n.to_owned()))
            {
                let _ = std::fs::write(dir.join("tasks"), tid.as_encoded_bytes());
            }
        }
    }

    /// A shell prefix that moves the shell (and so what it `exec`s) into the group.
    pub(crate) fn shell_prefix(&self) -> String {
        match &self.kind {
            Kind::V1 { dir, .. } | Kind::V2 { dir, .. } => {
                format!("echo $$ > '{}/cgroup.procs' && ", dir.display())
            }
            Kind::None(_) => String::new(),
        }
    }

    /// One line for the report.
    pub(crate) fn describe(&self) -> String {
        match &self.kind {
            Kind::V1 { .. } => format!(
                "attackers (attack tasks and Chromium) in the cgroup v1 `{NAME}` at cpu.shares 2: they get what the appliance and the honest clients leave"
            ),
            Kind::V2 { .. } => format!(
                "Chromium in the cgroup v2 `{NAME}` at cpu.weight 1; the bench's own attack tasks share the CPU with its honest clients (v2 moves whole processes only)"
            ),
            Kind::None(why) => format!(
                "attackers share the CPU with the appliance at the same weight ({why}): honest latency includes the attackers' own CPU"
            ),
        }
    }
}

impl Drop for AttackerGroup {
    fn drop(&mut self) {
        if let Kind::V1 { dir, home } | Kind::V2 { dir, home } = &self.kind {
            // every thread of this process back home, then the (now empty) group away
            let _ = std::fs::write(home.join("cgroup.procs"), std::process::id().to_string());
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// This process's cgroup path for a v1 controller (`""` for the v2 hierarchy).
fn own_group(controller: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, names, path) = (fields.next()?, fields.next()?, fields.next()?);
            let matches = if controller.is_empty() {
                names.is_empty()
            } else {
                names.split(',').any(|n| n == controller)
            };
            matches.then(|| path.to_owned())
        })
        .ok_or_else(|| anyhow::anyhow!("no {controller:?} line in /proc/self/cgroup"))
}
