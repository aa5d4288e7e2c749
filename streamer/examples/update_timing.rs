//! Diagnostic for the latency budget: how long after an X change its pixels reach the
//! appliance's decoded framebuffer, and over how many RDP updates.
//! `cargo run --release -p labrack-streamer --example update_timing -- HOST PORT USER PASSWORD CERT_SHA256 WxH DISPLAY XAUTHORITY`

use std::process::Command;
use std::time::{Duration, Instant};

use labrack_streamer::rdp::{DesktopSession, DesktopTarget, Pump};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [
        host,
        port,
        username,
        password,
        cert,
        size,
        display,
        xauthority,
    ] = args.as_slice()
    else {
        return Err("usage: HOST PORT USER PASSWORD CERT WxH DISPLAY XAUTHORITY".into());
    };
    let (w, h) = size.split_once('x').ok_or("WxH")?;
    let target = DesktopTarget {
        host: host.clone(),
        port: port.parse()?,
        username: username.clone(),
        password: password.clone(),
        cert_sha256: cert.clone(),
        width: w.parse()?,
        height: h.parse()?,
    };
    let mut session = DesktopSession::connect(&target, Duration::from_millis(2))?;
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(4) {
        session.pump()?;
    }
    println!("desktop {}x{}", session.width(), session.height());
    let colours = [
        ("#ff0000", [255u8, 0, 0]),
        ("#0000ff", [0, 0, 255]),
        ("#00c800", [0, 200, 0]),
    ];
    for round in 0..12 {
        let (name, rgb) = colours[round % 3];
        let status = Command::new("xsetroot")
            .args(["-display", display, "-solid", name])
            .env("XAUTHORITY", xauthority)
            .status()?;
        let changed = Instant::now();
        assert!(status.success());
        let (mut first, mut ready, mut last, mut updates) = (None, None, None, 0);
        let (px, py) = (
            usize::from(session.width()) - 40,
            usize::from(session.height()) / 2,
        );
        while changed.elapsed() < Duration::from_millis(600) {
            if let Pump::Damage(rects) = session.pump()? {
                updates += rects.len();
                first.get_or_insert(changed.elapsed());
                last = Some(changed.elapsed());
                let at = (py * usize::from(session.width()) + px) * 4;
                let pixel = &session.rgba()[at..at + 3];
                if ready.is_none() && pixel.iter().zip(rgb).all(|(a, b)| a.abs_diff(b) < 40) {
                    ready = Some(changed.elapsed());
                }
            }
        }
        println!(
            "{name}: first update {first:?}, pixel decoded {ready:?}, last update {last:?}, {updates} rectangles"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}
