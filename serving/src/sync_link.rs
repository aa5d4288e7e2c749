//! TLS for the sync link: the cloud serves its own CA's certificate and asks every
//! appliance for a client certificate (any self-signed one: who it is, is decided by the
//! enrolment record of its fingerprint, after the handshake proved it holds the key); the
//! appliance trusts only the cloud CA it was given and presents its own certificate.

use std::sync::Arc;

use anyhow::Context as _;
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use labrack_wire::sync::ALPN;

/// Accepts any client certificate whose key signed the handshake.
#[derive(Debug)]
struct ProofOfKey(Arc<CryptoProvider>);

impl ClientCertVerifier for ProofOfKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// The cloud's QUIC server configuration; at most `max_pending_handshakes` wait for the
/// accept loop.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    max_pending_handshakes: usize,
) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(Arc::new(ProofOfKey(provider)))
        .with_single_cert(chain, key)
        .context("the cloud's certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("QUIC TLS")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // The server sends no keep-alives (the appliance does): a peer that goes quiet is
    // dropped after the idle timeout instead of being kept alive by us.
    transport.keep_alive_interval(None);
    transport.max_idle_timeout(Some(
        std::time::Duration::from_secs(20)
            .try_into()
            .context("idle timeout")?,
    ));
    // One stream per link is all the protocol uses; none the other way.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    config.max_incoming(max_pending_handshakes);
    Ok(config)
}

/// The appliance's QUIC client configuration: trusts `cloud_ca_pem` only.
pub fn client_config(
    cloud_ca_pem: &[u8],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<quinn::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cloud_ca_pem) {
        roots
            .add(cert.context("parsing the cloud CA")?)
            .context("adding the cloud CA")?;
    }
    anyhow::ensure!(!roots.is_empty(), "the cloud CA file holds no certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the appliance's sync certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC TLS")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(5)));
    transport.max_idle_timeout(Some(
        std::time::Duration::from_secs(20)
            .try_into()
            .context("idle timeout")?,
    ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// SHA-256 (hex) of the peer's first certificate on a QUIC connection.
pub fn peer_fingerprint(connection: &quinn::Connection) -> Option<String> {
    use sha2::Digest as _;
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain
        .first()
        .map(|cert| hex::encode(sha2::Sha256::digest(cert.as_ref())))
}
