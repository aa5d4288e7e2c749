//! Secrets at rest: lab desktop passwords are sealed with AES-256-GCM before they touch
//! SQLite. The 32-byte key lives in its own file (`data/secret.key`, mode 0600, or
//! `--secret-key-file` on separate storage), so a copied database alone reveals nothing.
//! Each sealed value is bound to what it belongs to (its associated data), so a sealed
//! password cannot be moved to another allocation's row.

use std::io::Write as _;
use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("secret key file {path} must hold exactly 32 bytes (found {found})")]
    BadKey { path: String, found: usize },
    #[error("sealed value is corrupt or belongs elsewhere")]
    Open,
    #[error("the system random source failed")]
    Random,
}

/// Seals and opens small secrets with the appliance's key.
pub struct SecretBox {
    key: LessSafeKey,
    /// keys the stored hashes of codes people type (join codes, enrolment tokens), so a
    /// copy of the database alone cannot test guesses offline
    code_key: ring::hmac::Key,
    rng: SystemRandom,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<key>)")
    }
}

impl SecretBox {
    /// Loads the key from `path`, creating it (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        let io = |source| SecretError::Io {
            path: path.display().to_string(),
            source,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut fresh = [0_u8; 32];
                SystemRandom::new()
                    .fill(&mut fresh)
                    .map_err(|_| SecretError::Random)?;
                write_private(path, &fresh).map_err(io)?;
                fresh.to_vec()
            }
            Err(e) => return Err(io(e)),
        };
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SecretError::BadKey {
                path: path.display().to_string(),
                found: bytes.len(),
            })?;
        Ok(Self::from_key(&key))
    }

    pub fn from_key(key: &[u8; 32]) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, key)
            .unwrap_or_else(|_| unreachable!("a 32-byte key is valid for AES-256"));
        // A key of its own for the MAC, derived from the secret key (never the AES key itself).
        let derived = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            b"labrack code hash v1",
        );
        let code_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref());
        Self {
            key: LessSafeKey::new(unbound),
            code_key,
            rng: SystemRandom::new(),
        }
    }

    /// The stored hash of a code people type (`purpose` keeps join codes and enrolment
    /// tokens apart): HMAC-SHA-256 under the appliance's secret key, in hex.
    pub fn code_hash(&self, purpose: &str, code: &str) -> String {
        let mut context = ring::hmac::Context::with_key(&self.code_key);
        context.update(purpose.as_bytes());
        context.update(&[0]);
        context.update(code.as_bytes());
        hex::encode(context.sign().as_ref())
    }

    /// `nonce || ciphertext || tag`, bound to `context`.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0_u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SecretError::Random)?;
        let mut in_out = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut in_out,
            )
            .map_err(|_| SecretError::Random)?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&in_out);
        Ok(sealed)
    }

    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, SecretError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretError::Open);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Open)?;
        let mut in_out = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut in_out)
            .map_err(|_| SecretError::Open)?;
        Ok(plain.to_vec())
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_context_and_key() {
        let secrets = SecretBox::from_key(&[7; 32]);
        let sealed = secrets.seal("allocation:1", b"hunter2").expect("seal");
        assert!(
            !sealed.windows(7).any(|w| w == b"hunter2"),
            "no plaintext in the sealed bytes"
        );
        assert_eq!(
            secrets.open("allocation:1", &sealed).expect("open"),
            b"hunter2"
        );
        assert!(
            matches!(
                secrets.open("allocation:2", &sealed),
                Err(SecretError::Open)
            ),
            "bound to its row"
        );
        assert!(matches!(
            SecretBox::from_key(&[8; 32]).open("allocation:1", &sealed),
            Err(SecretError::Open)
        ));
        assert_ne!(
            secrets.seal("allocation:1", b"hunter2").expect("seal"),
            sealed,
            "fresh nonce each time"
        );
        assert!(matches!(
            secrets.open("allocation:1", b"short"),
            Err(SecretError::Open)
        ));
    }

    #[test]
    fn the_key_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("labrack-secret-{}", rand::random::<u64>()));
        let path = dir.join("secret.key");
        let first = SecretBox::load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sealed = first.seal("x", b"v").expect("seal");
        let again = SecretBox::load_or_create(&path).expect("load");
        assert_eq!(again.open("x", &sealed).expect("open"), b"v");
        std::fs::write(&path, b"short").expect("write");
        assert!(matches!(
            SecretBox::load_or_create(&path),
            Err(SecretError::BadKey { found: 5, .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
