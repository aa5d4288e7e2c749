//! The `local-user` desktop runtime: one dedicated Linux user per allocation, whose
//! desktop the host's RDP server (xrdp) serves and whose shell its `sshd` serves.
//!
//! - provision: create the user with a generated password, fill its home from the
//!   template's skeleton;
//! - reset: end every process of the user, restore the home from the skeleton, rotate the
//!   password;
//! - release: end its processes, remove the user, its home, mail spool, crontab and its
//!   files in the shared temporary directories.
//!
//! Every step is idempotent, so a retried task converges.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use labrack_provisioner::protocol::DesktopAccess;
use rand::Rng as _;

use super::RuntimeSettings;

/// Shared places where a user may leave files behind. The X socket directories matter: a
/// killed X server leaves its socket there, and xrdp's session manager counts a display as
/// taken while its socket exists — without this, every reset would use up a display.
const SHARED_TEMP_DIRS: [&str; 5] = ["/tmp", "/var/tmp", "/dev/shm", "/tmp/.X11-unix", "/tmp/.ICE-unix"];

/// `{prefix}a{allocation}`; the prefix is checked at start-up.
pub(crate) fn username(settings: &RuntimeSettings, allocation_id: i64) -> String {
    format!("{}a{allocation_id}", settings.user_prefix)
}

/// A prefix that makes valid, recognisable user names.
pub(crate) fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    let ok = (2..=16).contains(&prefix.len())
        && prefix.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!("--user-prefix must be 2-16 characters of a-z, 0-9 and '-', starting with a letter (got {prefix:?})");
    }
    Ok(())
}

/// Runs a command; retries while another tool holds the passwd/shadow lock.
fn run(command: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{command:?}");
    let mut tries = 0;
    loop {
        let output = command.stdin(Stdio::null()).output().with_context(|| format!("running {shown}"))?;
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

fn user_exists(name: &str) -> anyhow::Result<bool> {
    let status = Command::new("id").arg("-u").arg(name).stdout(Stdio::null()).stderr(Stdio::null()).status().context("running id")?;
    Ok(status.success())
}

fn uid_of(name: &str) -> anyhow::Result<u32> {
    run(Command::new("id").arg("-u").arg(name))?.trim().parse().context("parsing the uid")
}

fn home_of(name: &str) -> anyhow::Result<PathBuf> {
    let line = run(Command::new("getent").arg("passwd").arg(name))?;
    let home = line.trim().split(':').nth(5).filter(|h| h.starts_with('/')).context("no home directory in passwd")?;
    Ok(PathBuf::from(home))
}

/// The user's uid, primary gid and home directory.
pub(crate) fn identity(name: &str) -> anyhow::Result<(u32, u32, String)> {
    let line = run(Command::new("getent").arg("passwd").arg(name))?;
    let fields: Vec<&str> = line.trim().split(':').collect();
    let (Some(uid), Some(gid), Some(home)) = (fields.get(2), fields.get(3), fields.get(5)) else {
        bail!("unexpected passwd entry for {name}");
    };
    Ok((uid.parse().context("parsing the uid")?, gid.parse().context("parsing the gid")?, (*home).to_owned()))
}

fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..20).map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())])).collect()
}

fn set_password(name: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    let password = generate_password();
    for _ in 0..50 {
        let mut child = Command::new("chpasswd").stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().context("running chpasswd")?;
        if let Some(stdin) = child.stdin.as_mut() {
            stdin.write_all(format!("{name}:{password}\n").as_bytes()).context("writing to chpasswd")?;
        }
        let output = child.wait_with_output().context("waiting for chpasswd")?;
        if output.status.success() {
            return Ok(password);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !stderr.contains("lock") {
            bail!("chpasswd failed: {}", stderr.trim());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("chpasswd: the password files stayed locked")
}

/// Kills every process of the user and waits until none is left (xrdp sessions included).
fn end_sessions(name: &str) -> anyhow::Result<()> {
    let uid = uid_of(name)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // pkill exits 1 when nothing matched: that is the goal, not an error.
        let _ = Command::new("pkill").args(["-KILL", "-U"]).arg(uid.to_string()).status();
        let left = Command::new("pgrep").arg("-U").arg(uid.to_string()).stdout(Stdio::null()).status().context("running pgrep")?;
        if !left.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes of {name} survive SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_skeleton(skeleton: &str) -> anyhow::Result<&Path> {
    let path = Path::new(skeleton);
    if !path.is_absolute() {
        bail!("the skeleton {skeleton:?} must be an absolute path");
    }
    if !path.is_dir() {
        bail!("the skeleton directory {skeleton} does not exist on this host");
    }
    Ok(path)
}

/// Empties `home` and fills it from `skeleton`, owned by the user.
fn fill_home(name: &str, home: &Path, skeleton: &Path) -> anyhow::Result<()> {
    if home.exists() {
        for entry in std::fs::read_dir(home).with_context(|| format!("reading {}", home.display()))? {
            let path = entry?.path();
            let removed = if path.is_dir() && !path.is_symlink() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.with_context(|| format!("removing {}", path.display()))?;
        }
    } else {
        std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    }
    // `cp -a SKEL/. HOME/` copies dotfiles too and keeps modes and links.
    run(Command::new("cp").arg("-a").arg(skeleton.join(".")).arg(home))?;
    run(Command::new("chown").arg("-R").arg(format!("{name}:{name}")).arg(home))?;
    run(Command::new("chmod").arg("0700").arg(home))?;
    Ok(())
}

pub(crate) fn provision(settings: &RuntimeSettings, allocation_id: i64, skeleton: &str) -> anyhow::Result<DesktopAccess> {
    let skeleton = check_skeleton(skeleton)?;
    let name = username(settings, allocation_id);
    if user_exists(&name)? {
        // Left over from an interrupted attempt: start clean.
        remove_user(&name)?;
    }
    run(Command::new("useradd")
        .args(["--create-home", "--user-group", "--shell", "/bin/bash", "--comment"])
        .arg(format!("LabRack lab allocation {allocation_id}"))
        .arg(&name))?;
    let home = home_of(&name)?;
    fill_home(&name, &home, skeleton)?;
    let password = set_password(&name)?;
    Ok(access(settings, name, password))
}

pub(crate) fn reset(settings: &RuntimeSettings, allocation_id: i64, skeleton: &str) -> anyhow::Result<DesktopAccess> {
    let skeleton = check_skeleton(skeleton)?;
    let name = username(settings, allocation_id);
    if !user_exists(&name)? {
        bail!("the lab user {name} does not exist on this host");
    }
    end_sessions(&name)?;
    remove_temp_files(uid_of(&name)?)?;
    let home = home_of(&name)?;
    fill_home(&name, &home, skeleton)?;
    let password = set_password(&name)?;
    Ok(access(settings, name, password))
}

/// What the appliance needs to reach the desktop: this host's servers and their keys.
fn access(settings: &RuntimeSettings, username: String, password: String) -> DesktopAccess {
    DesktopAccess {
        username,
        password,
        rdp_port: settings.rdp_port,
        ssh_port: settings.ssh_port,
        ssh_host_key: settings.ssh_host_key.clone(),
        rdp_cert_sha256: settings.rdp_cert_sha256.clone(),
    }
}

pub(crate) fn release(settings: &RuntimeSettings, allocation_id: i64) -> anyhow::Result<()> {
    let name = username(settings, allocation_id);
    if user_exists(&name)? {
        remove_user(&name)?;
    }
    Ok(())
}

fn remove_user(name: &str) -> anyhow::Result<()> {
    end_sessions(name)?;
    let uid = uid_of(name)?;
    let _ = Command::new("crontab").args(["-r", "-u", name]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    remove_temp_files(uid)?;
    // --remove takes the home directory and mail spool.
    run(Command::new("userdel").arg("--remove").arg(name))?;
    Ok(())
}

/// Removes what the uid left in the shared temporary directories (top level and below).
fn remove_temp_files(uid: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    for dir in SHARED_TEMP_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.uid() == uid {
                let removed = if meta.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed.with_context(|| format!("removing {}", path.display()))?;
            }
        }
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
        for bad in ["", "l", "1lr", "LR-", "lr_", "lr/x", "averyveryverylongprefix"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_long_and_unambiguous() {
        let a = generate_password();
        assert_eq!(a.len(), 20);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() && !b"0O1lI".contains(&b)));
        assert_ne!(a, generate_password());
    }
}
