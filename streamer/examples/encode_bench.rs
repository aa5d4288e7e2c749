//! The encode side of `cargo xtask bench stream`: damage-aware RGBA→I420 plus OpenH264 (and
//! libvpx VP8, the fallback) on synthetic desktop content, one thread, as the desktop stream
//! thread does it.
//!
//! Workloads: `typing` (a full first frame, then a 240×24 text line changes per frame) and
//! `motion` (every pixel changes every frame). Prints one JSON line per (codec, size, workload),
//! then one per size for the staff wall's thumbnails (`thumbnail::make`: box filter + JPEG).

use std::time::Instant;

use labrack_streamer::convert::{I420, Rect};
use labrack_streamer::encode::{Codec, VideoEncoder};

fn main() {
    let frames: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    for codec in [Codec::H264, Codec::Vp8] {
        for (width, height) in [(1280_u32, 720_u32), (1920, 1080)] {
            for workload in ["typing", "motion"] {
                let result = run(codec, width, height, workload, frames);
                println!("{result}");
            }
        }
    }
    for (width, height) in [(1280_u32, 720_u32), (1920, 1080)] {
        println!("{}", thumbnails(width, height, frames.clamp(10, 100)));
    }
}

/// One desktop's thumbnail, as the stream makes it (at most once a second per desktop).
fn thumbnails(width: u32, height: u32, count: usize) -> String {
    let rgba = desktop(width, height);
    let mut times = Vec::with_capacity(count);
    let mut bytes = 0;
    for _ in 0..count {
        let started = Instant::now();
        let picture = labrack_streamer::thumbnail::make(&rgba, width, height).expect("thumbnail");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        bytes = picture.jpeg.len();
    }
    let first = times[0];
    times.sort_by(f64::total_cmp);
    let (p50, p95) = (
        times[times.len() / 2],
        times[(times.len() as f64 * 0.95) as usize],
    );
    format!(
        r#"{{"codec":"JPEG","size":"{width}x{height}","workload":"thumbnail","frames":{count},"encode_ms_p50":{p50:.2},"encode_ms_p95":{p95:.2},"first_frame_ms":{first:.2},"kbit_per_s_at_30fps":0,"bytes":{bytes}}}"#
    )
}

fn desktop(width: u32, height: u32) -> Vec<u8> {
    // A desktop-like picture: flat background, a window with text-like stripes.
    let mut rgba = vec![0_u8; (width * height * 4) as usize];
    for y in 0..height {
        for x in 0..width {
            let at = ((y * width + x) * 4) as usize;
            let in_window =
                x > width / 8 && x < width * 7 / 8 && y > height / 8 && y < height * 7 / 8;
            let (r, g, b) = if !in_window {
                (30, 144, 255)
            } else if (y / 2) % 9 < 2 && (x / 5) % 7 != 0 {
                (20, 20, 20)
            } else {
                (250, 250, 250)
            };
            rgba[at..at + 4].copy_from_slice(&[r, g, b, 255]);
        }
    }
    rgba
}

fn run(codec: Codec, width: u32, height: u32, workload: &str, frames: usize) -> String {
    let mut rgba = desktop(width, height);
    let stride = (width * 4) as usize;
    let mut picture = I420::new(width, height);
    let mut encoder = VideoEncoder::new(codec, width, height, 4_000_000, 30.0).expect("encoder");
    let mut times = Vec::with_capacity(frames);
    let mut bytes = 0_usize;
    let mut seed = 0x2545_f491_u32;
    for n in 0..frames {
        let damage = if n == 0 {
            vec![Rect::full(width, height)]
        } else if workload == "typing" {
            // One more "character" appears on a text line.
            let (left, top) = (width / 4 + (n as u32 * 8) % 240, height / 2);
            for y in top..top + 24 {
                for x in left..left + 8 {
                    let at = ((y * width + x) * 4) as usize;
                    let v = if (x + y + n as u32).is_multiple_of(3) {
                        10
                    } else {
                        240
                    };
                    rgba[at..at + 3].copy_from_slice(&[v, v, v]);
                }
            }
            vec![Rect {
                left,
                top,
                right: left + 8,
                bottom: top + 24,
            }]
        } else {
            for px in rgba.chunks_exact_mut(4) {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                px[0] = px[0].wrapping_add((seed & 7) as u8);
                px[1] = px[1].wrapping_add(((seed >> 3) & 7) as u8);
                px[2] = px[2].wrapping_add(((seed >> 6) & 7) as u8);
            }
            vec![Rect::full(width, height)]
        };
        let started = Instant::now();
        picture.update(&rgba, stride, &damage);
        let frame = encoder.encode(&picture).expect("encode");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        bytes += frame.data.len();
    }
    let mut steady: Vec<f64> = times[1..].to_vec();
    steady.sort_by(f64::total_cmp);
    let p50 = steady[steady.len() / 2];
    let p95 = steady[(steady.len() as f64 * 0.95) as usize];
    let kbps_at_30 = bytes as f64 * 8.0 / 1000.0 / (frames as f64 / 30.0);
    format!(
        r#"{{"codec":"{}","size":"{width}x{height}","workload":"{workload}","frames":{frames},"encode_ms_p50":{p50:.2},"encode_ms_p95":{p95:.2},"first_frame_ms":{:.2},"kbit_per_s_at_30fps":{kbps_at_30:.0}}}"#,
        codec.name(),
        times[0]
    )
}
