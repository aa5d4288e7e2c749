//! The Linux accounts of a lab: its user (the team's), its checker (the user its checks run
//! as: another uid, so the team's processes can neither ptrace nor signal a check), and
//! what either may have left anywhere on the host.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Runs a command; retries while another tool holds the passwd/shadow lock.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{command:?}");
    let mut tries = 0;
    loop {
        let output = command
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {shown}"))?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        tries += 1;
        if stderr.contains("lock") && tries < 50 {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        bail!("{shown} failed ({}): {}", output.status, stderr.trim());
    }
}

/// A user as `getent passwd` knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: PathBuf,
}

/// The account, or `None` when there is no such user.
pub(crate) fn lookup(name: &str) -> anyhow::Result<Option<Account>> {
    let output = Command::new("getent")
        .arg("passwd")
        .arg(name)
        .stdin(Stdio::null())
        .output()
        .context("running getent")?;
    if !output.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<&str> = line.trim().split(':').collect();
    let (Some(uid), Some(gid), Some(home)) = (fields.get(2), fields.get(3), fields.get(5)) else {
        bail!("unexpected passwd entry for {name}");
    };
    Ok(Some(Account {
        name: name.to_owned(),
        uid: uid.parse().context("parsing the uid")?,
        gid: gid.parse().context("parsing the gid")?,
        home: PathBuf::from(home),
    }))
}

/// The lab's user, its own group, home in `/home` (built by the caller, not by useradd).
pub(crate) fn create_lab_user(name: &str, allocation_id: i64) -> anyhow::Result<Account> {
    run(Command::new("useradd")
        .args([
            "--no-create-home",
            "--home-dir",
            &format!("/home/{name}"),
            "--user-group",
            "--shell",
            "/bin/bash",
            "--comment",
        ])
        .arg(format!("LabRack lab allocation {allocation_id}"))
        .arg(name))?;
    lookup(name)?.with_context(|| format!("{name} vanished right after useradd"))
}

/// The checker: a system user with no login, no home and the lab's group as its group.
pub(crate) fn create_checker(
    name: &str,
    lab_group: u32,
    allocation_id: i64,
) -> anyhow::Result<Account> {
    run(Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--gid",
        ])
        .arg(lab_group.to_string())
        .arg("--comment")
        .arg(format!("LabRack checks of lab allocation {allocation_id}"))
        .arg(name))?;
    lookup(name)?.with_context(|| format!("{name} vanished right after useradd"))
}

/// A password the appliance chose: printable ASCII without ':' or spaces (chpasswd's format).
pub(crate) fn check_password(password: &str) -> anyhow::Result<()> {
    let ok = (12..=128).contains(&password.len())
        && password.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if !ok {
        bail!(
            "the desktop password from the appliance is malformed (12–128 printable characters, no ':')"
        );
    }
    Ok(())
}

pub(crate) fn set_password(name: &str, password: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    check_password(password)?;
    for _ in 0..50 {
        let mut child = Command::new("chpasswd")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running chpasswd")?;
        if let Some(stdin) = child.stdin.as_mut() {
            stdin
                .write_all(format!("{name}:{password}\n").as_bytes())
                .context("writing to chpasswd")?;
        }
        let output = child.wait_with_output().context("waiting for chpasswd")?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !stderr.contains("lock") {
            bail!("chpasswd failed: {}", stderr.trim());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("chpasswd: the password files stayed locked")
}

/// Kills every process of `uid` anywhere on the host (not only in its box: an admin's
/// `runuser`, a process started before the box) and waits until none is left.
pub(crate) fn end_processes(uid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // pkill exits 1 when nothing matched: that is the goal, not an error.
        let _ = Command::new("pkill")
            .args(["-KILL", "-U"])
            .arg(uid.to_string())
            .status();
        let left = Command::new("pgrep")
            .arg("-U")
            .arg(uid.to_string())
            .stdout(Stdio::null())
            .status()
            .context("running pgrep")?;
        if !left.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes of uid {uid} survive SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Shared places where a user may leave files behind on the host itself. The X socket
/// directories matter for hosts that ran desktops before boxes existed.
const SHARED_TEMP_DIRS: [&str; 5] = [
    "/tmp",
    "/var/tmp",
    "/dev/shm",
    "/tmp/.X11-unix",
    "/tmp/.ICE-unix",
];

/// What could outlive a reset if left alone: a crontab, `at` jobs, lingering user units,
/// files in the host's shared temporary directories.
pub(crate) fn remove_leftovers(account: &Account) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let _ = Command::new("crontab")
        .args(["-r", "-u", &account.name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    for spool in [
        "/var/spool/cron/crontabs",
        "/var/spool/cron/atjobs",
        "/var/spool/cron/atspool",
    ] {
        for entry in std::fs::read_dir(spool).into_iter().flatten().flatten() {
            if entry.metadata().is_ok_and(|m| m.uid() == account.uid)
                || entry.file_name().to_string_lossy() == account.name
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let _ = Command::new("loginctl")
        .args(["disable-linger", &account.name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_file(format!("/var/lib/systemd/linger/{}", account.name));
    for dir in SHARED_TEMP_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.uid() == account.uid {
                super::homes::remove_tree(&path)?;
            }
        }
    }
    Ok(())
}

/// Removes a user (processes first). `userdel` without `--remove`: homes are the caller's.
pub(crate) fn remove_user(name: &str) -> anyhow::Result<()> {
    let Some(account) = lookup(name)? else {
        return Ok(());
    };
    end_processes(account.uid)?;
    remove_leftovers(&account)?;
    run(Command::new("userdel").arg(name))?;
    Ok(())
}

/// `{prefix}a{allocation}`; the prefix is checked at start-up.
pub(crate) fn lab_user(prefix: &str, allocation_id: i64) -> String {
    format!("{prefix}a{allocation_id}")
}

/// The checker of a lab user.
pub(crate) fn checker_of(lab_user: &str) -> String {
    format!("{lab_user}c")
}

/// A prefix that makes valid, recognisable user names.
pub(crate) fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    let ok = (2..=16).contains(&prefix.len())
        && prefix
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!(
            "--user-prefix must be 2-16 characters of a-z, 0-9 and '-', starting with a letter (got {prefix:?})"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        for good in ["lr-", "lrtest", "lab1-"] {
            assert!(check_prefix(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "l",
            "1lr",
            "LR-",
            "lr_",
            "lr/x",
            "averyveryverylongprefix",
        ] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_from_the_appliance_are_checked_before_chpasswd() {
        assert!(check_password("abcdefghijkmnpqrstuv").is_ok());
        for bad in [
            "short",
            "has:colon-in-it-here",
            "has space in it here",
            "line\nbreak-injected-here",
            &"x".repeat(129),
        ] {
            assert!(check_password(bad).is_err(), "{bad:?}");
        }
        assert_eq!(checker_of(&lab_user("lr-", 7)), "lr-a7c");
    }
}
