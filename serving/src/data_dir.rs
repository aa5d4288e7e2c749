//! The data directory holds the database (the whole event: sessions, sealed lab
//! credentials, scores), the secret key and the CA key. Nobody but the appliance's own
//! user may read it: the process creates everything with umask 077, the directory is 0700,
//! and files already there from an older, laxer install are tightened to 0600 at start.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::Context as _;

/// Makes the process's new files private, then creates or tightens `dir` and its files.
pub fn prepare(dir: &Path) -> anyhow::Result<()> {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    tighten(dir)
}

fn tighten(dir: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", dir.display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            tighten(&path)?;
        } else if kind.is_file() {
            let mode = entry.metadata()?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o700))
                    .with_context(|| format!("making {} private", path.display()))?;
                tracing::info!(file = %path.display(), was = format!("{mode:o}"), "made private");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_laxer_data_dir_is_tightened() {
        let dir = std::env::temp_dir().join(format!("labrack-data-dir-{}", rand::random::<u32>()));
        std::fs::create_dir_all(dir.join("tls")).expect("dir");
        for file in ["labrack.db", "tls/ca.key"] {
            std::fs::write(dir.join(file), b"x").expect("file");
            std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        tighten(&dir).expect("tighten");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("tls")), 0o700);
        assert_eq!(mode(&dir.join("labrack.db")), 0o600);
        assert_eq!(mode(&dir.join("tls/ca.key")), 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
