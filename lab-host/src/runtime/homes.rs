//! A lab's home, built from its template's skeleton without ever trusting what the team
//! left behind:
//!
//! - skeletons must live under the host's skeleton root (`--skeleton-root`, default
//!   `/var/lib/labrack-host/skeletons`), every directory on the way owned by root and
//!   writable by nobody else; anything else is refused naming the path;
//! - without a disk quota, the new home is built root-owned *beside* the old one (in the
//!   home's parent, which only root may write), then renamed into place; the old one is
//!   renamed away and removed without following any link in it;
//! - with a disk quota (`disk_mib`), the home is its own ext4 image, loop-mounted: a reset
//!   makes a fresh file system, so nothing of the old one survives;
//! - the copy never follows a symbolic link, copies links as links, skips device nodes,
//!   FIFOs and sockets, and drops set-user-ID and set-group-ID bits.
//!
//! The team's processes are all gone before any of this runs (the box is stopped first).

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Where skeletons live unless `--skeleton-root` says otherwise.
pub(crate) const DEFAULT_SKELETON_ROOT: &str = "/var/lib/labrack-host/skeletons";

/// Checks that `skeleton` lies under `root` and that nobody but root can change it or any
/// directory above it up to the root; returns its canonical path.
pub(crate) fn check_skeleton(root: &Path, skeleton: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(skeleton);
    if !path.is_absolute() || skeleton.split('/').any(|part| part == "..") {
        bail!("the skeleton {skeleton:?} must be an absolute path without '..'");
    }
    let root = root.canonicalize().with_context(|| {
        format!(
            "the skeleton root {} does not exist on this host",
            root.display()
        )
    })?;
    let real = path
        .canonicalize()
        .with_context(|| format!("the skeleton {skeleton} does not exist on this host"))?;
    if !real.starts_with(&root) {
        bail!(
            "the skeleton {skeleton} is outside this host's skeleton root {} (--skeleton-root): refused",
            root.display()
        );
    }
    if !real.is_dir() {
        bail!("the skeleton {skeleton} is not a directory");
    }
    let mut dir = real.as_path();
    loop {
        let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            bail!(
                "the skeleton {skeleton} is refused: {} must be owned by root and writable by nobody else",
                dir.display()
            );
        }
        if dir == root {
            break;
        }
        match dir.parent() {
            Some(parent) => dir = parent,
            None => break,
        }
    }
    Ok(real)
}

/// Copies `from` into the (existing, empty) directory `to` as root, giving every file to
/// `uid:gid`. Never follows a link.
pub(crate) fn copy_tree(from: &Path, to: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&source)
            .with_context(|| format!("reading {}", source.display()))?;
        let kind = meta.file_type();
        // No set-user-ID, set-group-ID or sticky bits in a team's home.
        let mode = meta.mode() & 0o777;
        if kind.is_symlink() {
            let link = std::fs::read_link(&source)?;
            std::os::unix::fs::symlink(&link, &target)
                .with_context(|| format!("creating {}", target.display()))?;
        } else if kind.is_dir() {
            std::fs::create_dir(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            copy_tree(&source, &target, uid, gid)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
        } else if kind.is_file() {
            // create_new: the target is fresh, so no link can be waiting there.
            let mut input = std::fs::File::open(&source)?;
            let mut output = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            std::io::copy(&mut input, &mut output)
                .with_context(|| format!("copying {}", source.display()))?;
            output.set_permissions(std::fs::Permissions::from_mode(mode))?;
        } else {
            continue;
        }
        std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", target.display()))?;
    }
    Ok(())
}

/// Builds a fresh home for `uid:gid` at `home` from `skeleton` (see the module docs). The
/// home ends up mode 0750: the lab's group (its checker) may read it, nobody else.
pub(crate) fn rebuild(
    home: &Path,
    skeleton: &Path,
    uid: u32,
    gid: u32,
    disk: Option<&DiskImage>,
) -> anyhow::Result<()> {
    if let Some(disk) = disk {
        disk.recreate(home)?;
        copy_tree(skeleton, home, uid, gid)?;
        std::os::unix::fs::chown(home, Some(uid), Some(gid))?;
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o750))?;
        return Ok(());
    }
    let parent = home.parent().context("a home directory needs a parent")?;
    let name = home
        .file_name()
        .context("a home directory needs a name")?
        .to_string_lossy()
        .into_owned();
    let fresh = parent.join(format!(".labrack-new-{name}"));
    if std::fs::symlink_metadata(&fresh).is_ok() {
        remove_tree(&fresh)?;
    }
    std::fs::create_dir(&fresh).with_context(|| format!("creating {}", fresh.display()))?;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o700))?;
    copy_tree(skeleton, &fresh, uid, gid)?;
    std::os::unix::fs::chown(&fresh, Some(uid), Some(gid))?;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o750))?;
    if std::fs::symlink_metadata(home).is_ok() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let old = parent.join(format!(".labrack-old-{name}-{nanos}"));
        std::fs::rename(home, &old)
            .with_context(|| format!("moving the old {} away", home.display()))?;
        std::fs::rename(&fresh, home)
            .with_context(|| format!("moving the new home into {}", home.display()))?;
        remove_tree(&old)?;
    } else {
        std::fs::rename(&fresh, home)
            .with_context(|| format!("moving the new home into {}", home.display()))?;
    }
    Ok(())
}

/// Removes a directory tree without following links (std's `remove_dir_all` does not).
pub(crate) fn remove_tree(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))
        }
        Ok(_) => std::fs::remove_file(path).with_context(|| format!("removing {}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// A lab's home as an ext4 image of its own (the disk quota).
#[derive(Debug, Clone)]
pub(crate) struct DiskImage {
    pub(crate) file: PathBuf,
    pub(crate) mib: u32,
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .stdin(Stdio::null())
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

impl DiskImage {
    /// Whether this host can make per-lab disk images (loop devices and mkfs.ext4).
    pub(crate) fn available() -> bool {
        Path::new("/dev/loop-control").exists()
            && Command::new("mkfs.ext4")
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    pub(crate) fn is_mounted(home: &Path) -> bool {
        let wanted = home.display().to_string();
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(wanted.as_str()))
    }

    /// Mounts the image at `home` unless it is (after a host reboot, say).
    pub(crate) fn ensure_mounted(&self, home: &Path) -> anyhow::Result<()> {
        if Self::is_mounted(home) {
            return Ok(());
        }
        if !self.file.exists() {
            bail!(
                "the disk image {} of this lab is missing",
                self.file.display()
            );
        }
        std::fs::create_dir_all(home)?;
        run(Command::new("mount")
            .args(["-o", "loop,nosuid,nodev"])
            .arg(&self.file)
            .arg(home))
    }

    /// A new, empty file system of the image's size, mounted at `home`.
    pub(crate) fn recreate(&self, home: &Path) -> anyhow::Result<()> {
        self.unmount(home)?;
        if let Some(dir) = self.file.parent() {
            crate::identity::private_dir(dir)?;
        }
        let _ = std::fs::remove_file(&self.file);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.file)
            .with_context(|| format!("creating {}", self.file.display()))?;
        file.set_len(u64::from(self.mib) * 1024 * 1024)?;
        std::fs::set_permissions(&self.file, std::fs::Permissions::from_mode(0o600))?;
        drop(file);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
            .arg(&self.file))?;
        if std::fs::symlink_metadata(home).is_ok() {
            remove_tree(home)?;
        }
        std::fs::create_dir(home)?;
        run(Command::new("mount")
            .args(["-o", "loop,nosuid,nodev"])
            .arg(&self.file)
            .arg(home))?;
        // mkfs leaves lost+found: not the team's.
        let _ = std::fs::remove_dir(home.join("lost+found"));
        Ok(())
    }

    pub(crate) fn unmount(&self, home: &Path) -> anyhow::Result<()> {
        if Self::is_mounted(home) {
            run(Command::new("umount").arg(home))?;
        }
        Ok(())
    }

    pub(crate) fn remove(&self, home: &Path) -> anyhow::Result<()> {
        self.unmount(home)?;
        let _ = std::fs::remove_file(&self.file);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("labrack-homes-{tag}-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dir
    }

    #[test]
    fn skeletons_outside_the_root_or_writable_by_others_are_refused() {
        let root = temp("root");
        std::fs::create_dir_all(root.join("desk")).expect("skeleton");
        let skeleton = root.join("desk").display().to_string();
        if nix::unistd::geteuid().is_root() {
            assert!(check_skeleton(&root, &skeleton).is_ok());
            std::fs::set_permissions(root.join("desk"), std::fs::Permissions::from_mode(0o777))
                .expect("chmod");
            let refused = check_skeleton(&root, &skeleton).expect_err("world-writable");
            assert!(
                refused.to_string().contains("writable by nobody else"),
                "{refused}"
            );
        }
        let outside = check_skeleton(&root, "/etc").expect_err("outside the root");
        assert!(
            outside
                .to_string()
                .contains("outside this host's skeleton root"),
            "{outside}"
        );
        std::os::unix::fs::symlink("/etc", root.join("escape")).expect("link");
        let escaped = check_skeleton(&root, &root.join("escape").display().to_string())
            .expect_err("a link out");
        assert!(
            escaped.to_string().contains("/etc") || escaped.to_string().contains("escape"),
            "{escaped}"
        );
        assert!(check_skeleton(&root, "relative/path").is_err());
        assert!(check_skeleton(&root, &format!("{}/../etc", root.display())).is_err());
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_rebuilt_home_never_follows_what_the_team_planted() {
        let base = temp("rebuild");
        let skeleton = base.join("skel");
        std::fs::create_dir_all(skeleton.join("project")).expect("skeleton");
        std::fs::write(skeleton.join("README.txt"), "welcome\n").expect("readme");
        std::fs::write(skeleton.join("project/main.py"), "print(1)\n").expect("main");
        std::os::unix::fs::symlink("README.txt", skeleton.join("LINK")).expect("link");
        let victim = base.join("victim.txt");
        std::fs::write(&victim, "untouched\n").expect("victim");
        let home = base.join("home");
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        rebuild(&home, &skeleton, uid, gid, None).expect("first build");
        assert_eq!(
            std::fs::read_to_string(home.join("README.txt")).expect("readme"),
            "welcome\n"
        );
        assert_eq!(
            std::fs::read_link(home.join("LINK")).expect("link"),
            Path::new("README.txt")
        );
        // The team replaces files in its home with links to a file it may not write.
        std::fs::remove_file(home.join("README.txt")).expect("rm");
        std::os::unix::fs::symlink(&victim, home.join("README.txt")).expect("plant");
        std::fs::remove_dir_all(home.join("project")).expect("rm");
        std::os::unix::fs::symlink(&base, home.join("project")).expect("plant dir");
        rebuild(&home, &skeleton, uid, gid, None).expect("rebuild");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("victim"),
            "untouched\n",
            "the planted link was not followed"
        );
        assert!(
            !std::fs::symlink_metadata(home.join("README.txt"))
                .expect("readme")
                .file_type()
                .is_symlink()
        );
        assert!(home.join("project/main.py").exists());
        assert!(
            base.join("skel/project/main.py").exists(),
            "the skeleton is intact"
        );
        assert_eq!(
            std::fs::metadata(&home).expect("home").mode() & 0o777,
            0o750
        );
        let leftovers: Vec<_> = std::fs::read_dir(&base)
            .expect("base")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".labrack-"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "no build or old directory is left behind"
        );
        let _ = std::fs::remove_dir_all(base);
    }
}
