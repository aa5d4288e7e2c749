//! `labrack admin probe-desktop`: logs in to a lab's desktop over RDP exactly as the
//! streamer will (decrypted credentials, pinned certificate) and reports what it shows.
//! Staff use it to tell "the lab is broken" from "the browser is".

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use labrack_streamer::rdp::{self, DesktopTarget, Snapshot};

use crate::secrets::SecretBox;

pub struct ProbeOptions {
    pub data_dir: PathBuf,
    pub secret_key_file: Option<PathBuf>,
    pub allocation: i64,
    pub watch: Duration,
    pub expect_rgb: Option<[u8; 3]>,
    pub ppm: Option<PathBuf>,
    /// also run the streaming pipeline (RDP → I420 → H.264) this long and report on it
    pub stream: Option<Duration>,
    /// the desktop size to ask for
    pub size: (u16, u16),
}

/// `WIDTHxHEIGHT`, each 200–8192.
pub fn parse_size(text: &str) -> Result<(u16, u16), String> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("a size is WIDTHxHEIGHT, like 1280x720 (got {text:?})"))?;
    let parse = |n: &str| {
        n.trim()
            .parse::<u16>()
            .ok()
            .filter(|n| (200..=8192).contains(n))
    };
    match (parse(w), parse(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => Err(format!(
            "{text:?}: width and height must be numbers from 200 to 8192"
        )),
    }
}

/// CPU time this process has used (user + system), from /proc/self/stat.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in USER_HZ, 100 per second on every architecture we run on.
    Some(Duration::from_millis(ticks * 10))
}

/// Share of the screen (per mille) the expected colour must cover.
const EXPECTED_SHARE: u32 = 250;
/// How far each channel may drift: RemoteFX is lossy, so #1e90ff may arrive as #1c90fc.
const CHANNEL_TOLERANCE: u8 = 12;

/// Whether two colours are the same up to codec loss.
pub fn close_to(seen: [u8; 3], wanted: [u8; 3]) -> bool {
    seen.iter()
        .zip(wanted)
        .all(|(a, b)| a.abs_diff(b) <= CHANNEL_TOLERANCE)
}

pub fn parse_rgb(text: &str) -> anyhow::Result<[u8; 3]> {
    let hex = text.trim().trim_start_matches('#');
    anyhow::ensure!(
        hex.len() == 6,
        "a colour is six hex digits, like 1e90ff (got {text:?})"
    );
    let bytes = hex::decode(hex).with_context(|| format!("{text:?} is not hex"))?;
    Ok([bytes[0], bytes[1], bytes[2]])
}

pub fn probe(options: &ProbeOptions) -> anyhow::Result<serde_json::Value> {
    let db_path = options.data_dir.join(crate::store::DB_FILE);
    anyhow::ensure!(db_path.exists(), "no database at {}", db_path.display());
    let key_path = options
        .secret_key_file
        .clone()
        .unwrap_or_else(|| options.data_dir.join("secret.key"));
    anyhow::ensure!(key_path.exists(), "no secret key at {}", key_path.display());
    let secrets = SecretBox::load_or_create(&key_path)?;
    let conn = crate::store::open_connection(&db_path, true)?;
    let desktop = crate::labs::desktop_secret(&conn, &secrets, options.allocation)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_context(|| {
            format!(
                "allocation {} is not active or has no desktop yet",
                options.allocation
            )
        })?;
    let target = desktop
        .rdp_target(options.size.0, options.size.1)
        .map_err(anyhow::Error::msg)?;
    let expect = options.expect_rgb;
    let stream = match options.stream {
        Some(duration) => Some(stream_report(&target, duration)?),
        None => None,
    };
    let shot = rdp::snapshot(&target, options.watch, |s| {
        expect.is_none_or(|rgb| {
            close_to(s.dominant_rgb, rgb) && s.dominant_per_mille >= EXPECTED_SHARE
        })
    })?;
    if let Some(path) = &options.ppm {
        write_ppm(path, &shot)?;
    }
    let summary = serde_json::json!({
        "allocation": options.allocation,
        "width": shot.width,
        "height": shot.height,
        "updates": shot.updates,
        "connect_ms": shot.connect_ms,
        "first_update_ms": shot.first_update_ms,
        "dominant_rgb": format!("#{}", hex::encode(shot.dominant_rgb)),
        "dominant_per_mille": shot.dominant_per_mille,
        "stream": stream,
    });
    if let Some(rgb) = expect {
        anyhow::ensure!(
            close_to(shot.dominant_rgb, rgb) && shot.dominant_per_mille >= EXPECTED_SHARE,
            "the desktop does not show #{} (saw {summary})",
            hex::encode(rgb)
        );
    }
    Ok(summary)
}

/// Frames before this are start-up, not the steady frame rate.
const STEADY_AFTER: Duration = Duration::from_secs(2);

/// Runs the one-encode-per-desktop pipeline with one viewer for `duration`.
fn stream_report(target: &DesktopTarget, duration: Duration) -> anyhow::Result<serde_json::Value> {
    use labrack_streamer::desktop::{DesktopStream, StreamSettings};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream = DesktopStream::start(target.clone(), StreamSettings::default())?;
    let mut frames = stream.subscribe(labrack_streamer::encode::Codec::H264);
    let (mut count, mut first_keyframe, mut first_frame_ms, mut bytes, mut size) =
        (0_u64, None, None, 0_u64, None);
    let mut steady = 0_u64;
    let started = std::time::Instant::now();
    let cpu_before = process_cpu();
    runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + duration;
        while let Ok(Ok(frame)) = tokio::time::timeout_at(deadline, frames.recv()).await {
            count += 1;
            if started.elapsed() >= STEADY_AFTER {
                steady += 1;
            }
            bytes += frame.encoded.data.len() as u64;
            first_keyframe.get_or_insert(frame.encoded.keyframe);
            first_frame_ms.get_or_insert(started.elapsed().as_millis());
            size = Some([frame.width, frame.height]);
        }
    });
    let elapsed = started.elapsed();
    let cpu = process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let stats = &stream.stats;
    let encoded = stats
        .frames
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(1);
    Ok(serde_json::json!({
        "frames": count,
        "fps": count as f64 / elapsed.as_secs_f64().max(0.001),
        // after the first seconds (login, first full picture), when the desktop streams steadily
        "steady_fps": (elapsed > STEADY_AFTER).then(|| steady as f64 / (elapsed - STEADY_AFTER).as_secs_f64().max(0.001)),
        "size": size,
        // the whole process: RDP decode, conversion and encoding, as a share of one core
        "cpu_core_share": cpu.map(|cpu| cpu.as_secs_f64() / elapsed.as_secs_f64().max(0.001)),
        "first_is_keyframe": first_keyframe,
        "first_frame_ms": first_frame_ms,
        "bytes": bytes,
        "keyframes": stats.keyframes.load(std::sync::atomic::Ordering::Relaxed),
        "encode_ms_per_frame": stats.encode_us.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0 / encoded as f64,
    }))
}

fn write_ppm(path: &Path, shot: &Snapshot) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    write!(out, "P6\n{} {}\n255\n", shot.width, shot.height)?;
    for pixel in shot.rgba.chunks_exact(4) {
        out.write_all(&pixel[..3])?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1280x720"), Ok((1280, 720)));
        assert!(parse_size("1280").is_err());
        assert!(
            parse_size("100x720")
                .expect_err("too small")
                .contains("200 to 8192")
        );
    }

    #[test]
    fn cpu_time_is_read() {
        assert!(
            process_cpu().is_some(),
            "/proc/self/stat has utime and stime"
        );
    }

    #[test]
    fn colours_parse() {
        assert_eq!(parse_rgb("#1e90ff").expect("colour"), [0x1e, 0x90, 0xff]);
        assert_eq!(parse_rgb("000000").expect("colour"), [0, 0, 0]);
        assert!(parse_rgb("blue").is_err());
        assert!(parse_rgb("#12345").is_err());
        assert!(
            close_to([0x1c, 0x90, 0xfc], [0x1e, 0x90, 0xff]),
            "codec loss is tolerated"
        );
        assert!(
            !close_to([0, 0, 0], [0x1e, 0x90, 0xff]),
            "a black screen is not the desktop"
        );
    }
}
