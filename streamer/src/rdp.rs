//! The RDP side of a lab desktop (IronRDP, blocking): connect over TLS to the host's RDP
//! server with the lab user's credentials (autologon), pinning the server certificate the
//! lab host reported, and decode what it draws into a framebuffer.
//!
//! It backs the desktop probe (`labrack admin probe-desktop`) and every desktop stream. Two
//! channels ride along: the text clipboard (cliprdr, see [`crate::clipboard`]) and display
//! control (a dynamic channel over drdynvc) for resizing the remote desktop to the viewer's
//! window; a resize ends in the server's deactivation-reactivation sequence, driven here.

use std::io::Write as _;
use std::net::{TcpStream, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use ironrdp_cliprdr::CliprdrClient;
use ironrdp_cliprdr::pdu::{ClipboardFormat, ClipboardFormatId};
use ironrdp_connector::connection_activation::{
    ConnectionActivationFactory, ConnectionActivationState,
};
use ironrdp_connector::{
    ClientConnector, Config, ConnectionOutcome, Credentials, DesktopSize, Sequence as _, ServerName,
};
use ironrdp_displaycontrol::client::DisplayControlClient;
use ironrdp_dvc::DrdynvcClient;
use ironrdp_graphics::image_processing::PixelFormat;
use ironrdp_pdu::gcc;
use ironrdp_pdu::rdp::capability_sets::{MajorPlatformType, RailSupportLevel};
use ironrdp_session::image::DecodedImage;
use ironrdp_session::{ActiveStageBuilder, ActiveStageOutput};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName as TlsName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest as _;

/// Where and how to log in. `Debug` hides the password.
#[derive(Clone)]
pub struct DesktopTarget {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    /// SHA-256 (hex) of the RDP server's certificate, as the lab host reported it
    pub cert_sha256: String,
    pub width: u16,
    pub height: u16,
}

impl std::fmt::Debug for DesktopTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesktopTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
    #[error("cannot reach the lab's RDP server at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("the lab's RDP certificate does not match the one its host reported")]
    CertificateMismatch,
    #[error("TLS with the lab's RDP server failed: {0}")]
    Tls(String),
    #[error("RDP connection failed: {0}")]
    Rdp(String),
    #[error("the RDP server redirected the connection; redirection is not supported")]
    Redirected,
    #[error("no desktop update arrived within {0:?}")]
    NoPicture(Duration),
}

/// What a look at the desktop saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub width: u16,
    pub height: u16,
    /// graphics updates received
    pub updates: u32,
    pub connect_ms: u64,
    pub first_update_ms: Option<u64>,
    /// the most frequent colour and its share of the screen (per mille)
    pub dominant_rgb: [u8; 3],
    pub dominant_per_mille: u32,
    /// RGBA pixels, row-major
    pub rgba: Vec<u8>,
}

/// Accepts exactly the certificate whose SHA-256 the lab host reported (xrdp's certificate
/// is self-signed, so a CA cannot vouch for it; the pin can).
#[derive(Debug)]
struct PinnedCertificate {
    sha256: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// set when the server showed another certificate: how a failed handshake is told
    /// apart from other TLS failures (rustls reports both as an I/O error)
    mismatched: Arc<std::sync::atomic::AtomicBool>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &TlsName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if sha2::Sha256::digest(end_entity.as_ref()).as_slice() == self.sha256.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            self.mismatched
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn config(target: &DesktopTarget) -> Config {
    Config {
        desktop_size: DesktopSize {
            width: target.width,
            height: target.height,
        },
        monitor_layout: None,
        desktop_scale_factor: 0,
        desktop_physical_size: None,
        desktop_orientation: None,
        device_scale_factor: None,
        monitor_extended_layout: None,
        relative_mouse_input: false,
        enable_tls: true,
        // NLA (CredSSP with NTLM) where the server asks for it; TLS-only servers (xrdp) pick TLS.
        enable_credssp: true,
        enable_standard_rdp_security: false,
        credentials: Credentials::UsernamePassword {
            username: target.username.clone(),
            password: target.password.clone(),
        },
        domain: None,
        // xrdp treats builds up to 419 as clients that cannot resize (libxrdp_reset).
        client_build: 7601,
        client_name: "labrack".into(),
        keyboard_type: gcc::KeyboardType::IBM_ENHANCED,
        keyboard_subtype: 0,
        keyboard_functional_keys_count: 12,
        keyboard_layout: 0x409,
        connection_type: gcc::ConnectionType::Lan,
        ime_file_name: String::new(),
        bitmap: ironrdp_pdu::rdp::capability_sets::client_codecs_capabilities(&["remotefx"])
            .ok()
            .map(|codecs| ironrdp_connector::BitmapConfig {
                lossy_compression: false,
                color_depth: 32,
                codecs,
            }),
        dig_product_id: String::new(),
        client_dir: String::new(),
        alternate_shell: String::new(),
        work_dir: String::new(),
        remote_application_mode: false,
        rail_support_level: RailSupportLevel::empty(),
        platform: MajorPlatformType::UNIX,
        hardware_id: None,
        request_data: None,
        // xrdp logs the user in from these credentials instead of drawing a login dialog.
        autologon: true,
        enable_audio_playback: false,
        enable_audio_capture: false,
        performance_flags: Default::default(),
        license_cache: None,
        timezone_info: Default::default(),
        compression_type: None,
        enable_server_pointer: false,
        pointer_software_rendering: true,
        multitransport_flags: None,
        support_dyn_vc_gfx_protocol: false,
    }
}

/// Kerberos is never used (NLA is off, TLS only): refuse any network request.
struct NoNetwork;

impl ironrdp_connector::sspi::network_client::NetworkClient for NoNetwork {
    fn send(
        &self,
        _: &ironrdp_connector::sspi::generator::NetworkRequest,
    ) -> ironrdp_connector::sspi::Result<Vec<u8>> {
        Err(ironrdp_connector::sspi::Error::new(
            ironrdp_connector::sspi::ErrorKind::NoAuthenticatingAuthority,
            "no network client: Kerberos is not used",
        ))
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A logged-in RDP session: the decoded desktop and the damage since the last look.
pub struct DesktopSession {
    framed: ironrdp_blocking::Framed<TlsStream>,
    stage: ironrdp_session::ActiveStage,
    image: DecodedImage,
    activation: ConnectionActivationFactory,
    clipboard: Arc<Mutex<crate::clipboard::ClipboardShared>>,
    read_timeout: Duration,
    started: Instant,
    pub connect_ms: u64,
}

impl std::fmt::Debug for DesktopSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesktopSession")
            .field("width", &self.image.width())
            .field("height", &self.image.height())
            .finish_non_exhaustive()
    }
}

/// What one [`DesktopSession::pump`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pump {
    /// nothing arrived within the read timeout
    Idle,
    /// these rectangles of the picture changed (inclusive pixel bounds made exclusive)
    Damage(Vec<crate::convert::Rect>),
}

impl DesktopSession {
    /// Connects over TLS (certificate pinned), logs in (autologon) and enters the active stage.
    /// Reads then wait at most `read_timeout` in [`DesktopSession::pump`].
    pub fn connect(target: &DesktopTarget, read_timeout: Duration) -> Result<Self, DesktopError> {
        let started = Instant::now();
        let address = format!("{}:{}", target.host, target.port);
        let connect_error = |source| DesktopError::Connect {
            address: address.clone(),
            source,
        };
        let socket = address
            .to_socket_addrs()
            .map_err(connect_error)?
            .next()
            .ok_or_else(|| connect_error(std::io::ErrorKind::NotFound.into()))?;
        let tcp =
            TcpStream::connect_timeout(&socket, Duration::from_secs(5)).map_err(connect_error)?;
        // The connection sequence gets time; the short read timeout applies once it is done.
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(connect_error)?;
        let _ = tcp.set_nodelay(true);
        let client_addr = tcp.local_addr().map_err(connect_error)?;

        let clipboard = Arc::new(Mutex::new(crate::clipboard::ClipboardShared::default()));
        let mut connector = ClientConnector::new(config(target), client_addr)
            .with_static_channel(CliprdrClient::new(Box::new(
                crate::clipboard::QueueingBackend {
                    shared: clipboard.clone(),
                },
            )))
            .with_static_channel(
                DrdynvcClient::new()
                    .with_dynamic_channel(DisplayControlClient::new(|_| Ok(Vec::new()))),
            );
        let mut framed = ironrdp_blocking::Framed::new(tcp);
        let should_upgrade = ironrdp_blocking::connect_begin(&mut framed, &mut connector)
            .map_err(|e| DesktopError::Rdp(e.to_string()))?;
        let tcp = framed.into_inner_no_leftover();

        let pin = hex::decode(target.cert_sha256.trim())
            .map_err(|_| DesktopError::CertificateMismatch)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mismatched = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tls_config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| DesktopError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
                sha256: pin,
                provider,
                mismatched: mismatched.clone(),
            }))
            .with_no_client_auth();
        tls_config.resumption = rustls::client::Resumption::disabled();
        let name =
            TlsName::try_from(target.host.clone()).map_err(|e| DesktopError::Tls(e.to_string()))?;
        let connection = rustls::ClientConnection::new(Arc::new(tls_config), name)
            .map_err(|e| DesktopError::Tls(e.to_string()))?;
        let mut tls = rustls::StreamOwned::new(connection, tcp);
        if let Err(error) = tls.flush() {
            return Err(if mismatched.load(std::sync::atomic::Ordering::Relaxed) {
                DesktopError::CertificateMismatch
            } else {
                DesktopError::Tls(error.to_string())
            });
        }
        let server_public_key = tls
            .conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| {
                use x509_cert::der::Decode as _;
                let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
                cert.tbs_certificate
                    .subject_public_key_info
                    .subject_public_key
                    .as_bytes()
                    .map(<[u8]>::to_vec)
            })
            .ok_or_else(|| DesktopError::Tls("the server sent no usable certificate".into()))?;

        let upgraded = ironrdp_blocking::mark_as_upgraded(should_upgrade, &mut connector);
        let mut framed = ironrdp_blocking::Framed::new(tls);
        let outcome = ironrdp_blocking::connect_finalize(
            upgraded,
            connector,
            &mut framed,
            &mut NoNetwork,
            ServerName::new(target.host.clone()),
            server_public_key,
            None,
        )
        .map_err(|e| DesktopError::Rdp(e.to_string()))?;
        let ConnectionOutcome::Connected(result) = outcome else {
            return Err(DesktopError::Redirected);
        };
        let connect_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        framed
            .get_inner_mut()
            .0
            .sock
            .set_read_timeout(Some(read_timeout.max(Duration::from_millis(1))))
            .map_err(|source| DesktopError::Connect {
                address: address.clone(),
                source,
            })?;
        let image = DecodedImage::new(
            PixelFormat::RgbA32,
            result.desktop_size.width,
            result.desktop_size.height,
        );
        let stage = ActiveStageBuilder {
            static_channels: result.static_channels,
            user_channel_id: result.user_channel_id,
            io_channel_id: result.io_channel_id,
            message_channel_id: result.message_channel_id,
            share_id: result.share_id,
            compression_type: None,
            enable_server_pointer: result.enable_server_pointer,
            pointer_software_rendering: result.pointer_software_rendering,
        }
        .build();
        let read_timeout = read_timeout.max(Duration::from_millis(1));
        Ok(Self {
            framed,
            stage,
            image,
            activation: result.activation_factory,
            clipboard,
            read_timeout,
            started,
            connect_ms,
        })
    }

    pub fn width(&self) -> u16 {
        self.image.width()
    }

    pub fn height(&self) -> u16 {
        self.image.height()
    }

    /// The desktop as RGBA, row-major, `width × 4` bytes per row.
    pub fn rgba(&self) -> &[u8] {
        self.image.data()
    }

    pub fn since_connect(&self) -> Duration {
        self.started.elapsed()
    }

    /// Reads what the server sent (waiting at most the read timeout) and applies it.
    pub fn pump(&mut self) -> Result<Pump, DesktopError> {
        let (action, payload) = match self.framed.read_pdu() {
            Ok(frame) => frame,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Pump::Idle);
            }
            Err(e) => {
                return Err(DesktopError::Rdp(format!(
                    "reading from the RDP server: {e}"
                )));
            }
        };
        let outputs = self
            .stage
            .process(&mut self.image, action, &payload, None)
            .map_err(|e| DesktopError::Rdp(e.to_string()))?;
        self.apply(outputs)
    }

    /// Sends keyboard and mouse input.
    pub fn send_input(
        &mut self,
        events: &[ironrdp_pdu::input::fast_path::FastPathInputEvent],
    ) -> Result<Pump, DesktopError> {
        let outputs = self
            .stage
            .process_fastpath_input(&mut self.image, events)
            .map_err(|e| DesktopError::Rdp(e.to_string()))?;
        self.apply(outputs)
    }

    fn apply(&mut self, outputs: Vec<ActiveStageOutput>) -> Result<Pump, DesktopError> {
        let mut damage = Vec::new();
        for output in outputs {
            match output {
                ActiveStageOutput::ResponseFrame(frame) => self
                    .framed
                    .write_all(&frame)
                    .map_err(|e| DesktopError::Rdp(e.to_string()))?,
                ActiveStageOutput::GraphicsUpdate(rect) => damage.push(crate::convert::Rect {
                    left: u32::from(rect.left),
                    top: u32::from(rect.top),
                    right: u32::from(rect.right) + 1,
                    bottom: u32::from(rect.bottom) + 1,
                }),
                ActiveStageOutput::Terminate(reason) => {
                    return Err(DesktopError::Rdp(format!(
                        "the server ended the session: {reason:?}"
                    )));
                }
                ActiveStageOutput::DeactivateAll => {
                    self.reactivate()?;
                    damage.push(crate::convert::Rect::full(
                        u32::from(self.width()),
                        u32::from(self.height()),
                    ));
                }
                _ => {}
            }
        }
        self.drive_clipboard()?;
        Ok(if damage.is_empty() {
            Pump::Idle
        } else {
            Pump::Damage(damage)
        })
    }

    /// The server deactivated the session (after a resize, typically): run the capability
    /// exchange and finalization again, then carry on with a picture of the new size.
    fn reactivate(&mut self) -> Result<(), DesktopError> {
        let rdp =
            |e: &dyn std::fmt::Display| DesktopError::Rdp(format!("reactivating the session: {e}"));
        self.set_read_timeout(Duration::from_secs(10))?;
        let mut sequence = self.activation.create();
        let mut buf = ironrdp_core::WriteBuf::new();
        let mut skipped = 0_u32;
        let finalized = loop {
            if let ConnectionActivationState::Finalized {
                desktop_size,
                share_id,
                enable_server_pointer,
                pointer_software_rendering,
                static_channel_chunk_size,
                refresh_rect_support,
                ..
            } = sequence.connection_activation_state()
            {
                break (
                    desktop_size,
                    share_id,
                    enable_server_pointer,
                    pointer_software_rendering,
                    static_channel_chunk_size,
                    refresh_rect_support,
                );
            }
            if matches!(
                sequence.connection_activation_state(),
                ConnectionActivationState::Redirected { .. }
            ) {
                return Err(DesktopError::Redirected);
            }
            buf.clear();
            let written = if sequence.next_pdu_hint().is_some() {
                // Updates for the old picture and channel traffic can still arrive before the
                // server's new Demand Active: skip them (a failed step leaves the sequence
                // consumed, so it steps a copy).
                let (action, pdu) = self
                    .framed
                    .read_pdu()
                    .map_err(|e| rdp(&format!("reading: {e}")))?;
                if action == ironrdp_pdu::Action::FastPath {
                    continue;
                }
                let mut attempt = sequence.clone();
                match attempt.step(&pdu, self.framed.last_read_at(), &mut buf) {
                    Ok(written) => {
                        sequence = attempt;
                        written
                    }
                    Err(error) if skipped < 256 => {
                        skipped += 1;
                        tracing::debug!(%error, "skipping a PDU while the session reactivates");
                        continue;
                    }
                    Err(error) => return Err(rdp(&format!("step: {error:?}"))),
                }
            } else {
                sequence
                    .step_no_input(&mut buf)
                    .map_err(|e| rdp(&format!("step: {e:?}")))?
            };
            if let Some(len) = written.size() {
                self.framed.write_all(&buf[..len]).map_err(|e| rdp(&e))?;
            }
        };
        let (size, share_id, server_pointer, software_pointer, chunk_size, refresh_rect) =
            finalized;
        if !self.stage.reactivate(
            self.activation.io_channel_id(),
            self.activation.user_channel_id(),
            share_id,
            server_pointer,
            software_pointer,
            chunk_size,
        ) {
            return Err(rdp(&"the server's virtual channel chunk size is invalid"));
        }
        self.image = DecodedImage::new(PixelFormat::RgbA32, size.width, size.height);
        // The new picture starts blank: ask for all of it rather than wait for changes.
        for frame in self
            .stage
            .request_full_redraw(size.width, size.height, refresh_rect, false)
            .map_err(|e| rdp(&e))?
        {
            self.framed.write_all(&frame).map_err(|e| rdp(&e))?;
        }
        tracing::debug!(
            width = size.width,
            height = size.height,
            "RDP session reactivated"
        );
        self.set_read_timeout(self.read_timeout)
    }

    fn set_read_timeout(&mut self, timeout: Duration) -> Result<(), DesktopError> {
        self.framed
            .get_inner_mut()
            .0
            .sock
            .set_read_timeout(Some(timeout))
            .map_err(|e| DesktopError::Rdp(format!("socket: {e}")))
    }

    /// Asks the server to change the desktop to `width × height` (display control). Returns
    /// false where the server offers no display control (the viewer then scales the picture);
    /// the new picture arrives through [`Self::pump`] once the server has resized.
    pub fn resize(&mut self, width: u32, height: u32) -> Result<bool, DesktopError> {
        let (width, height) =
            ironrdp_displaycontrol::pdu::MonitorLayoutEntry::adjust_display_size(width, height);
        if (width, height) == (u32::from(self.width()), u32::from(self.height())) {
            return Ok(true);
        }
        match self.stage.encode_resize(width, height, None, None) {
            Some(Ok(frame)) => {
                self.framed
                    .write_all(&frame)
                    .map_err(|e| DesktopError::Rdp(e.to_string()))?;
                Ok(true)
            }
            Some(Err(error)) => Err(DesktopError::Rdp(format!("resize: {error}"))),
            None => Ok(false),
        }
    }

    /// Whether the server offers display control (resizing); it opens shortly after login.
    pub fn can_resize(&mut self) -> bool {
        self.stage.display_control_ready() == Some(true)
    }

    /// Puts `text` on the remote desktop's clipboard (the server fetches it when pasted).
    pub fn set_clipboard(&mut self, text: String) -> Result<(), DesktopError> {
        if let Ok(mut shared) = self.clipboard.lock() {
            shared.local_text = Some(text);
            shared
                .actions
                .push_back(crate::clipboard::ClipboardAction::Advertise);
        }
        self.drive_clipboard()
    }

    /// Text copied on the remote desktop since the last call, oldest first.
    pub fn take_remote_clipboard(&mut self) -> Vec<String> {
        self.clipboard
            .lock()
            .map(|mut shared| shared.remote_text.drain(..).collect())
            .unwrap_or_default()
    }

    /// Turns what the clipboard backend queued into channel messages.
    fn drive_clipboard(&mut self) -> Result<(), DesktopError> {
        use crate::clipboard::ClipboardAction;
        loop {
            let (action, local_text) = match self.clipboard.lock() {
                Ok(mut shared) => match shared.actions.pop_front() {
                    Some(action) => {
                        if let ClipboardAction::Fetch(format) = action {
                            shared.fetching(format);
                        }
                        (action, shared.local_text.clone())
                    }
                    None => return Ok(()),
                },
                Err(_) => return Ok(()),
            };
            let Some(cliprdr) = self.stage.get_svc_processor_mut::<CliprdrClient>() else {
                return Ok(());
            };
            let messages = match action {
                ClipboardAction::Advertise if local_text.is_some() => cliprdr
                    .initiate_copy(&[ClipboardFormat::new(ClipboardFormatId::CF_UNICODETEXT)]),
                ClipboardAction::Advertise => cliprdr.initiate_copy(&[]),
                ClipboardAction::Fetch(format) => cliprdr.initiate_paste(format),
                ClipboardAction::Provide(format) => cliprdr
                    .submit_format_data(crate::clipboard::provide(local_text.as_deref(), format)),
            };
            let messages = match messages {
                Ok(messages) => messages,
                // Not ready yet (the channel opens after login): `on_ready` advertises again.
                Err(error) => {
                    tracing::debug!(%error, ?action, "clipboard action skipped");
                    continue;
                }
            };
            let frame = self
                .stage
                .process_svc_processor_messages(messages)
                .map_err(|e| DesktopError::Rdp(format!("clipboard: {e}")))?;
            self.framed
                .write_all(&frame)
                .map_err(|e| DesktopError::Rdp(e.to_string()))?;
        }
    }
}

/// Connects, logs in and watches the desktop for `watch` (or until `done` says the picture
/// is what the caller waits for), then disconnects. Blocking.
pub fn snapshot(
    target: &DesktopTarget,
    watch: Duration,
    done: impl Fn(&Snapshot) -> bool,
) -> Result<Snapshot, DesktopError> {
    let mut session = DesktopSession::connect(target, Duration::from_millis(250))?;
    let mut updates = 0_u32;
    let mut first_update_ms = None;
    let deadline = Instant::now() + watch;
    let mut last_check = Instant::now();
    while Instant::now() < deadline {
        let pump = session.pump()?;
        let idle = matches!(pump, Pump::Idle);
        if let Pump::Damage(rects) = pump {
            updates += u32::try_from(rects.len()).unwrap_or(u32::MAX);
            first_update_ms.get_or_insert_with(|| {
                u64::try_from(session.since_connect().as_millis()).unwrap_or(u64::MAX)
            });
        }
        // Judging the picture costs a pass over it: when the desktop is idle, or every 200 ms.
        if updates > 0 && (idle || last_check.elapsed() >= Duration::from_millis(200)) {
            last_check = Instant::now();
            let shot = summarise(&session, updates, first_update_ms);
            if done(&shot) {
                return Ok(shot);
            }
        }
    }
    if updates == 0 {
        return Err(DesktopError::NoPicture(watch));
    }
    Ok(summarise(&session, updates, first_update_ms))
}

fn summarise(session: &DesktopSession, updates: u32, first_update_ms: Option<u64>) -> Snapshot {
    let rgba = session.rgba().to_vec();
    let (dominant_rgb, dominant_per_mille) = dominant(&rgba);
    Snapshot {
        width: session.width(),
        height: session.height(),
        updates,
        connect_ms: session.connect_ms,
        first_update_ms,
        dominant_rgb,
        dominant_per_mille,
        rgba,
    }
}

/// The most frequent RGB colour and its share, in per mille of the pixels.
pub fn dominant(rgba: &[u8]) -> ([u8; 3], u32) {
    let mut counts: std::collections::HashMap<[u8; 3], u32> = std::collections::HashMap::new();
    for pixel in rgba.chunks_exact(4) {
        *counts.entry([pixel[0], pixel[1], pixel[2]]).or_default() += 1;
    }
    let total = u64::try_from(rgba.len() / 4).unwrap_or(u64::MAX).max(1);
    counts
        .into_iter()
        .max_by_key(|(colour, count)| (*count, *colour))
        .map_or(([0; 3], 0), |(colour, count)| {
            (
                colour,
                u32::try_from(u64::from(count) * 1000 / total).unwrap_or(1000),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dominant_colour_and_share() {
        let mut pixels = Vec::new();
        for _ in 0..3 {
            pixels.extend_from_slice(&[30, 144, 255, 255]);
        }
        pixels.extend_from_slice(&[0, 0, 0, 255]);
        assert_eq!(dominant(&pixels), ([30, 144, 255], 750));
        assert_eq!(dominant(&[]), ([0, 0, 0], 0));
    }
}
