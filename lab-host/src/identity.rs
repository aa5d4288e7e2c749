//! The host's identity and settings in its state directory:
//!
//! - `host.toml`: appliance URL, host id and name, heartbeat interval;
//! - `host.key`: the Ed25519 private key (PKCS#8, mode 0600) every call is signed with;
//! - `ca.pem`: the appliance CA, the only certificate authority the host trusts.
//!
//! The state directory is root's alone: mode 0700, every file in it 0600 (fixed at each
//! start for installs made before that rule, see [`secure_state_dir`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

pub(crate) const CONFIG_FILE: &str = "host.toml";
pub(crate) const KEY_FILE: &str = "host.key";
pub(crate) const CA_FILE: &str = "ca.pem";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HostConfig {
    pub(crate) appliance: String,
    pub(crate) host_id: i64,
    pub(crate) name: String,
    pub(crate) heartbeat_secs: u32,
}

pub(crate) struct Identity {
    pub(crate) config: HostConfig,
    pub(crate) key: Ed25519KeyPair,
    pub(crate) ca_pem: Vec<u8>,
}

/// A fresh key pair: the PKCS#8 document to keep and the public key to send (base64).
pub(crate) fn generate_key() -> anyhow::Result<(Vec<u8>, String)> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("generating an Ed25519 key failed"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("the generated key does not parse"))?;
    let public = base64::engine::general_purpose::STANDARD.encode(pair.public_key().as_ref());
    Ok((pkcs8.as_ref().to_vec(), public))
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    // `mode` applies only to a new file: a stale one keeps whatever it had.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Creates `dir` (mode 0700) or tightens it to 0700.
pub(crate) fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))
}

/// Makes the state directory root's alone: the directory and every directory below 0700,
/// every file 0600 (sled's spool files, older installs' files). Skeletons are not kept
/// here by this code; a `skeletons/` directory keeps its own modes (it is read by root only,
/// but its files become a team's).
pub(crate) fn secure_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fn walk(path: &Path) -> anyhow::Result<()> {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
        {
            let entry = entry?;
            let kind = entry.file_type()?;
            let child = entry.path();
            if kind.is_symlink() {
                continue;
            }
            if kind.is_dir() {
                if child.file_name().is_some_and(|n| n == "skeletons") {
                    continue;
                }
                std::fs::set_permissions(&child, std::fs::Permissions::from_mode(0o700))?;
                walk(&child)?;
            } else if kind.is_file() {
                std::fs::set_permissions(&child, std::fs::Permissions::from_mode(0o600))?;
            }
        }
        Ok(())
    }
    private_dir(dir)?;
    walk(dir)
}

pub(crate) fn save(
    dir: &Path,
    config: &HostConfig,
    pkcs8: &[u8],
    ca_pem: &[u8],
) -> anyhow::Result<()> {
    private_dir(dir)?;
    write_private(&dir.join(KEY_FILE), pkcs8)?;
    write_private(&dir.join(CA_FILE), ca_pem)?;
    // The config last: its presence means enrolment finished.
    write_private(&dir.join(CONFIG_FILE), toml::to_string(config)?.as_bytes())?;
    Ok(())
}

pub(crate) fn load(dir: &Path) -> anyhow::Result<Identity> {
    let config_path: PathBuf = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "reading {} (run `labrack-host enrol` first)",
            config_path.display()
        )
    })?;
    let config: HostConfig =
        toml::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
    let pkcs8 = std::fs::read(dir.join(KEY_FILE))
        .with_context(|| format!("reading {}", dir.join(KEY_FILE).display()))?;
    let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| {
        anyhow::anyhow!(
            "{} is not an Ed25519 PKCS#8 key",
            dir.join(KEY_FILE).display()
        )
    })?;
    let ca_pem = std::fs::read(dir.join(CA_FILE))
        .with_context(|| format!("reading {}", dir.join(CA_FILE).display()))?;
    Ok(Identity {
        config,
        key,
        ca_pem,
    })
}
