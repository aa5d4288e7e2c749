//! A server's own CA and server certificate, made at first start (rcgen) and kept in
//! `DATA/tls/`: the appliance's (consoles and lab hosts pin it by its SHA-256 fingerprint)
//! and the cloud's (appliances are given it). Also self-signed client identities, which
//! the appliance presents to the cloud.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};

/// Paths of the TLS material under the data directory.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    ca_key: PathBuf,
    pub server_cert: PathBuf,
    server_key: PathBuf,
}

impl TlsFiles {
    pub fn in_dir(data_dir: &Path) -> Self {
        let dir = data_dir.join("tls");
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key.pem"),
        }
    }
}

/// The loaded TLS identity.
pub struct TlsIdentity {
    pub server_config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the CA certificate (DER), colon-separated upper-case hex.
    pub ca_fingerprint: String,
    pub files: TlsFiles,
}

/// The server's certificate chain (server, then CA), its key and the CA's fingerprint,
/// generated first if absent.
pub struct ServerMaterial {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca_fingerprint: String,
    pub files: TlsFiles,
}

pub fn server_material(data_dir: &Path, extra_names: &[String]) -> anyhow::Result<ServerMaterial> {
    let files = TlsFiles::in_dir(data_dir);
    if !files.ca_cert.exists() || !files.server_cert.exists() {
        generate(&files, extra_names)?;
    }
    let ca_pem =
        fs::read(&files.ca_cert).with_context(|| format!("reading {}", files.ca_cert.display()))?;
    let ca_der = CertificateDer::from_pem_slice(&ca_pem).context("parsing the CA certificate")?;
    let mut chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.server_cert)
        .with_context(|| format!("reading {}", files.server_cert.display()))?
        .collect::<Result<_, _>>()
        .context("parsing the server certificate")?;
    chain.push(ca_der.clone());
    let key = PrivateKeyDer::from_pem_file(&files.server_key)
        .with_context(|| format!("reading {}", files.server_key.display()))?;
    Ok(ServerMaterial {
        chain,
        key,
        ca_fingerprint: fingerprint(&ca_der),
        files,
    })
}

/// A self-signed client certificate and key kept in `DATA/tls/{name}.pem` and
/// `{name}.key.pem`, made at first use: how the appliance proves itself to the cloud.
pub fn client_identity(
    data_dir: &Path,
    name: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let dir = data_dir.join("tls");
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key.pem")),
    );
    if !cert_path.exists() {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate().context("generating the client key")?;
        let mut params = CertificateParams::new(vec![format!("labrack-{name}")])
            .context("client certificate params")?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("LabRack appliance {}", host_name()),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (not_before, not_after) = validity(3650);
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .self_signed(&key)
            .context("self-signing the client certificate")?;
        write_private(&key_path, &key.serialize_pem())?;
        fs::write(&cert_path, cert.pem())?;
    }
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the client certificate")?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading {}", key_path.display()))?;
    Ok((chain, key))
}

/// Loads the CA and server certificate, generating them first if absent.
/// `extra_names` are DNS names or IP addresses added to the server certificate.
pub fn load_or_create(data_dir: &Path, extra_names: &[String]) -> anyhow::Result<TlsIdentity> {
    let ServerMaterial {
        chain,
        key,
        ca_fingerprint,
        files,
    } = server_material(data_dir, extra_names)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("tls protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("server certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsIdentity {
        server_config: Arc::new(config),
        ca_fingerprint,
        files,
    })
}

/// SHA-256 over DER, as `AB:CD:…`.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn generate(files: &TlsFiles, extra_names: &[String]) -> anyhow::Result<()> {
    let dir = files.ca_cert.parent().context("tls dir")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("ca params")?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("LabRack appliance CA {}", host_name()),
    );
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "LabRack");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let (not_before, not_after) = validity(3650);
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-signing the CA")?;

    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let host = host_name();
    if !host.is_empty() && !names.contains(&host) {
        names.push(host);
    }
    names.extend(extra_names.iter().cloned());
    let mut params = CertificateParams::new(names).context("server certificate names")?;
    params
        .distinguished_name
        .push(DnType::CommonName, "LabRack appliance");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (not_before, not_after) = validity(825);
    params.not_before = not_before;
    params.not_after = not_after;
    let server_key = KeyPair::generate().context("generating the server key")?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_cert = params
        .signed_by(&server_key, &issuer)
        .context("signing the server certificate")?;

    write_private(&files.ca_key, &ca_key.serialize_pem())?;
    write_private(&files.server_key, &server_key.serialize_pem())?;
    fs::write(&files.server_cert, server_cert.pem())?;
    // The CA certificate is written last: its presence marks the set as complete.
    fs::write(&files.ca_cert, ca_cert.pem())?;
    tracing::info!(dir = %dir.display(), "generated the appliance CA and server certificate");
    Ok(())
}

fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::days(1),
        now + time::Duration::days(days),
    )
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// The machine's host name (the server certificate holds it).
pub fn host_name() -> String {
    fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_reloads_the_same_ca() {
        let dir = std::env::temp_dir().join(format!("labrack-tls-{}", rand::random::<u64>()));
        let first = load_or_create(&dir, &["venue.example".into()]).expect("generate");
        let second = load_or_create(&dir, &[]).expect("reload");
        assert_eq!(first.ca_fingerprint, second.ca_fingerprint);
        assert_eq!(first.ca_fingerprint.len(), 32 * 3 - 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(dir.join("tls/ca.key.pem"))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "private key readable by others");
        }
        let _ = fs::remove_dir_all(dir);
    }
}
