//! The RDP client against the other real servers a lab host may run (xrdp is covered by
//! the lab-host suite): freerdp-shadow on Xvfb and weston's RDP backend. Each test starts
//! its server on a free 127.0.0.1 port, pins the certificate the server uses, and looks at
//! the decoded desktop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use labrack_streamer::rdp::{self, DesktopTarget, Snapshot};
use sha2::Digest as _;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(command: &mut Command) -> Process {
    Process(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}")),
    )
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "labrack-rdp-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_for(what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pem_sha256(path: &Path) -> String {
    let pem = std::fs::read(path).expect("certificate");
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .expect("a certificate")
        .expect("valid PEM");
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}

fn target(port: u16, cert_sha256: String) -> DesktopTarget {
    DesktopTarget {
        host: "127.0.0.1".into(),
        port,
        username: "lab".into(),
        password: "any".into(),
        cert_sha256,
        width: 1024,
        height: 768,
    }
}

/// Xvfb (on a display it picks itself, so parallel tests never share one) with its root
/// window painted `root_colour`, shared by freerdp-shadow on a free port.
struct Shadow {
    _xvfb: Process,
    _shadow: Process,
    port: u16,
    cert: PathBuf,
    home: PathBuf,
}

impl Shadow {
    fn start(tag: &str, root_colour: &str, security: &[String]) -> Self {
        use std::io::BufRead as _;
        let home = temp_dir(tag);
        let mut xvfb = Command::new("Xvfb")
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                "1024x768x24",
                "-nolisten",
                "tcp",
                "-noreset",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvfb (apt xvfb)");
        let mut line = String::new();
        std::io::BufReader::new(xvfb.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("Xvfb's display number");
        let xvfb = Process(xvfb);
        let display = format!(":{}", line.trim());
        wait_for("Xvfb", || {
            Command::new("xsetroot")
                .env("DISPLAY", &display)
                .args(["-solid", root_colour])
                .status()
                .is_ok_and(|s| s.success())
        });
        let port = free_port();
        let shadow = spawn(
            Command::new("freerdp-shadow-cli")
                .env("DISPLAY", &display)
                .env("HOME", &home)
                .args(["/bind-address:127.0.0.1", &format!("/port:{port}")])
                .args(security),
        );
        wait_for("freerdp-shadow", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let cert = home.join(".config/freerdp/shadow/shadow.crt");
        wait_for("the shadow certificate", || cert.exists());
        Self {
            _xvfb: xvfb,
            _shadow: shadow,
            port,
            cert,
            home,
        }
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

fn near(seen: [u8; 3], want: [u8; 3]) -> bool {
    seen.iter().zip(want).all(|(a, b)| a.abs_diff(b) <= 12)
}

#[test]
fn freerdp_shadow_on_xvfb_shows_its_root_colour() {
    let shadow = Shadow::start("shadow", "#00ff00", &["-auth".into(), "/sec:tls".into()]);
    let (port, cert) = (shadow.port, &shadow.cert);
    let shot: Snapshot = rdp::snapshot(
        &target(port, pem_sha256(cert)),
        Duration::from_secs(20),
        |s| near(s.dominant_rgb, [0, 255, 0]) && s.dominant_per_mille > 500,
    )
    .expect("freerdp-shadow session");
    assert!(
        near(shot.dominant_rgb, [0, 255, 0]),
        "{:?} {}",
        shot.dominant_rgb,
        shot.dominant_per_mille
    );
    // A wrong pin is refused before any credentials are sent.
    let refused = rdp::snapshot(
        &target(port, "00".repeat(32)),
        Duration::from_secs(5),
        |_| true,
    );
    assert!(
        matches!(refused, Err(rdp::DesktopError::CertificateMismatch)),
        "{refused:?}"
    );
}

#[test]
fn weston_rdp_backend_draws_its_desktop() {
    let dir = temp_dir("weston");
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).expect("runtime dir");
    std::fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(made.success());
    let port = free_port();
    let _weston = spawn(
        Command::new("weston")
            .env("XDG_RUNTIME_DIR", &runtime)
            .arg("--backend=rdp-backend.so")
            .arg(format!("--rdp-tls-cert={}", cert.display()))
            .arg(format!("--rdp-tls-key={}", key.display()))
            .args([
                "--address=127.0.0.1",
                &format!("--port={port}"),
                "--width=1024",
                "--height=768",
            ]),
    );
    wait_for("weston", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    // Weston's shell paints a background and a panel; wait until it is not a black screen.
    let shot = rdp::snapshot(
        &target(port, pem_sha256(&cert)),
        Duration::from_secs(20),
        |s| s.dominant_rgb != [0, 0, 0],
    )
    .expect("weston session");
    assert!(shot.updates > 0);
    assert_ne!(
        shot.dominant_rgb,
        [0, 0, 0],
        "weston drew its desktop ({} per mille)",
        shot.dominant_per_mille
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn freerdp_shadow_with_nla_checks_the_password() {
    let sam_dir = temp_dir("shadow-sam");
    let sam = sam_dir.join("users.sam");
    let hash = Command::new("winpr-hash")
        .args(["-u", "lab", "-p", "correct-horse", "-f", "sam"])
        .output()
        .expect("winpr-hash (apt winpr-utils)");
    std::fs::write(&sam, &hash.stdout).expect("sam file");
    let shadow = Shadow::start(
        "shadow-nla",
        "#ff00ff",
        &[
            "/sec:nla".into(),
            "+auth".into(),
            format!("/sam-file:{}", sam.display()),
        ],
    );
    let (port, cert) = (shadow.port, &shadow.cert);
    let mut good = target(port, pem_sha256(cert));
    good.password = "correct-horse".into();
    let shot = rdp::snapshot(&good, Duration::from_secs(20), |s| {
        near(s.dominant_rgb, [255, 0, 255]) && s.dominant_per_mille > 500
    })
    .expect("NLA session");
    assert!(
        near(shot.dominant_rgb, [255, 0, 255]),
        "{:?}",
        shot.dominant_rgb
    );
    let mut bad = good.clone();
    bad.password = "wrong".into();
    assert!(
        rdp::snapshot(&bad, Duration::from_secs(5), |_| true).is_err(),
        "a wrong password is refused by NLA"
    );
    let _ = std::fs::remove_dir_all(sam_dir);
}

/// Waits for the next frame on `frames` that passes `wanted`, polling (no async runtime).
fn next_frame(
    frames: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<labrack_streamer::desktop::Frame>>,
    wanted: impl Fn(&labrack_streamer::desktop::Frame) -> bool,
) -> std::sync::Arc<labrack_streamer::desktop::Frame> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match frames.try_recv() {
            Ok(frame) if wanted(&frame) => return frame,
            Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "no wanted frame in time ({error:?})"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn a_desktop_stream_serves_both_codecs_and_follows_its_viewers_bitrate() {
    use labrack_streamer::desktop::{DesktopStream, StreamSettings};
    use labrack_streamer::encode::Codec;
    use std::sync::atomic::Ordering;

    let shadow = Shadow::start("stream", "#3050a0", &["-auth".into(), "/sec:tls".into()]);
    let stream = DesktopStream::start(
        target(shadow.port, pem_sha256(&shadow.cert)),
        StreamSettings::default(),
    )
    .expect("stream");

    // One desktop, two codecs: each viewer's first frame is a keyframe in its codec, and an
    // idle desktop keeps sending (the once-a-second heartbeat).
    let mut h264 = stream.subscribe(Codec::H264);
    let mut vp8 = stream.subscribe(Codec::Vp8);
    let first = next_frame(&mut h264, |f| f.encoded.keyframe);
    assert_eq!(first.codec, Codec::H264);
    assert_eq!(&first.encoded.data[..4], &[0, 0, 0, 1], "Annex-B H.264");
    let first = next_frame(&mut vp8, |f| f.encoded.keyframe);
    assert_eq!(
        (first.codec, first.encoded.data[3..6].to_vec()),
        (Codec::Vp8, vec![0x9d, 0x01, 0x2a]),
        "a VP8 keyframe"
    );
    next_frame(&mut h264, |f| !f.encoded.keyframe);

    // A viewer's feedback asks for less: the encoders are rebuilt at that rate (within the
    // 2 s rebuild gap), starting again with keyframes.
    assert_eq!(stream.stats.bitrate_bps.load(Ordering::Relaxed), 4_000_000);
    stream.set_viewer_bitrate(7, 1_000_000);
    wait_for("the bitrate change", || {
        stream.stats.bitrate_bps.load(Ordering::Relaxed) == 1_000_000
    });
    assert_eq!(stream.stats.bitrate_changes.load(Ordering::Relaxed), 1);
    next_frame(&mut h264, |f| f.encoded.keyframe);
    // A small change (under 15 %) is not worth a keyframe.
    stream.set_viewer_bitrate(7, 950_000);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(stream.stats.bitrate_bps.load(Ordering::Relaxed), 1_000_000);
    stream.stop();
}
