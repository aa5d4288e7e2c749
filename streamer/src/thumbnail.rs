//! Small still pictures of a desktop for the staff's wall of thumbnails: the framebuffer
//! box-filtered down to fit [`THUMBNAIL_BOX`], then JPEG. A desktop stream makes one at
//! most every [`THUMBNAIL_EVERY`], and only while somebody asked for one lately, so a wall
//! of forty labs costs forty small JPEGs a second at most and nothing when nobody looks.

use std::time::{Duration, SystemTime};

/// The largest thumbnail (width, height); the picture keeps its aspect ratio inside it.
pub const THUMBNAIL_BOX: (u32, u32) = (480, 270);
/// A changed desktop gets a new thumbnail at most this often.
pub const THUMBNAIL_EVERY: Duration = Duration::from_secs(1);
const JPEG_QUALITY: u8 = 70;

#[derive(Debug, thiserror::Error)]
pub enum ThumbnailError {
    #[error("the framebuffer is {got} bytes; {width}×{height} RGBA needs {need}")]
    ShortFramebuffer {
        got: usize,
        need: usize,
        width: u32,
        height: u32,
    },
    #[error("the desktop has no pixels ({0}×{1})")]
    Empty(u32, u32),
    #[error("encoding the thumbnail: {0}")]
    Jpeg(#[from] jpeg_encoder::EncodingError),
}

/// A JPEG picture of a desktop.
#[derive(Debug, Clone)]
pub struct Thumbnail {
    pub jpeg: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub taken: SystemTime,
}

/// The thumbnail size for a `width × height` desktop: as large as fits in `bound`, aspect
/// kept, never larger than the desktop, at least 1×1.
#[must_use]
pub fn fitted_size(width: u32, height: u32, bound: (u32, u32)) -> (u32, u32) {
    if width == 0 || height == 0 {
        return (0, 0);
    }
    let scale = (f64::from(bound.0) / f64::from(width))
        .min(f64::from(bound.1) / f64::from(height))
        .min(1.0);
    // Rounded to whole pixels; the casts hold values ≤ the bound.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let fitted = (
        (f64::from(width) * scale).round().max(1.0) as u32,
        (f64::from(height) * scale).round().max(1.0) as u32,
    );
    fitted
}

/// Averages each output pixel over the source pixels it covers (a box filter: text and
/// window edges stay legible, unlike nearest-neighbour sampling). RGBA in, RGB out.
#[must_use]
pub fn downscale(rgba: &[u8], width: u32, height: u32, out_width: u32, out_height: u32) -> Vec<u8> {
    let (w, h, ow, oh) = (
        width as usize,
        height as usize,
        out_width as usize,
        out_height as usize,
    );
    let mut out = Vec::with_capacity(ow * oh * 3);
    let mut sums = vec![[0_u32; 3]; ow];
    let column_start = |ox: usize| ox * w / ow;
    for oy in 0..oh {
        let (y0, y1) = (oy * h / oh, ((oy + 1) * h / oh).max(oy * h / oh + 1));
        sums.iter_mut().for_each(|s| *s = [0; 3]);
        for y in y0..y1.min(h) {
            let row = &rgba[y * w * 4..(y + 1) * w * 4];
            for (ox, sum) in sums.iter_mut().enumerate() {
                let (x0, x1) = (
                    column_start(ox),
                    column_start(ox + 1).max(column_start(ox) + 1).min(w),
                );
                for pixel in row[x0 * 4..x1 * 4].chunks_exact(4) {
                    sum[0] += u32::from(pixel[0]);
                    sum[1] += u32::from(pixel[1]);
                    sum[2] += u32::from(pixel[2]);
                }
            }
        }
        for (ox, sum) in sums.iter().enumerate() {
            let columns = column_start(ox + 1).max(column_start(ox) + 1).min(w) - column_start(ox);
            let count = u32::try_from(columns * (y1.min(h) - y0))
                .unwrap_or(u32::MAX)
                .max(1);
            out.extend(
                sum.iter()
                    .map(|s| u8::try_from(s / count).unwrap_or(u8::MAX)),
            );
        }
    }
    out
}

/// A thumbnail of a `width × height` RGBA framebuffer.
pub fn make(rgba: &[u8], width: u32, height: u32) -> Result<Thumbnail, ThumbnailError> {
    let need = width as usize * height as usize * 4;
    if rgba.len() < need {
        return Err(ThumbnailError::ShortFramebuffer {
            got: rgba.len(),
            need,
            width,
            height,
        });
    }
    let (out_width, out_height) = fitted_size(width, height, THUMBNAIL_BOX);
    if out_width == 0 {
        return Err(ThumbnailError::Empty(width, height));
    }
    let rgb = downscale(rgba, width, height, out_width, out_height);
    let mut jpeg = Vec::with_capacity(rgb.len() / 8);
    // Both sides are ≤ THUMBNAIL_BOX, well inside u16.
    let (w16, h16) = (
        u16::try_from(out_width).unwrap_or(u16::MAX),
        u16::try_from(out_height).unwrap_or(u16::MAX),
    );
    jpeg_encoder::Encoder::new(&mut jpeg, JPEG_QUALITY).encode(
        &rgb,
        w16,
        h16,
        jpeg_encoder::ColorType::Rgb,
    )?;
    Ok(Thumbnail {
        jpeg,
        width: out_width,
        height: out_height,
        taken: SystemTime::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_keep_the_aspect_inside_the_box_and_never_grow() {
        assert_eq!(fitted_size(1920, 1080, THUMBNAIL_BOX), (480, 270));
        assert_eq!(fitted_size(1024, 768, THUMBNAIL_BOX), (360, 270));
        assert_eq!(fitted_size(3840, 600, THUMBNAIL_BOX), (480, 75));
        assert_eq!(fitted_size(320, 200, THUMBNAIL_BOX), (320, 200));
        assert_eq!(fitted_size(0, 200, THUMBNAIL_BOX), (0, 0));
    }

    #[test]
    fn the_box_filter_averages_what_each_pixel_covers() {
        // 4×2: left half black, right half white → 2×1: one black, one white pixel.
        let mut rgba = Vec::new();
        for _ in 0..2 {
            rgba.extend([
                0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255, 255,
            ]);
        }
        assert_eq!(downscale(&rgba, 4, 2, 2, 1), vec![0, 0, 0, 255, 255, 255]);
        // A 1-pixel red line in 4 rows of black averages to a quarter red.
        let mut striped = vec![0_u8; 2 * 4 * 4];
        striped[..8].copy_from_slice(&[255, 0, 0, 255, 255, 0, 0, 255]);
        assert_eq!(downscale(&striped, 2, 4, 1, 1), vec![63, 0, 0]);
    }

    #[test]
    fn a_thumbnail_is_a_jpeg_of_the_fitted_size() -> Result<(), ThumbnailError> {
        let (w, h) = (1280_u32, 720_u32);
        let rgba: Vec<u8> = std::iter::repeat_n([30_u8, 120, 200, 255], (w * h) as usize)
            .flatten()
            .collect();
        let thumbnail = make(&rgba, w, h)?;
        assert_eq!((thumbnail.width, thumbnail.height), (480, 270));
        assert_eq!(
            &thumbnail.jpeg[..3],
            &[0xFF, 0xD8, 0xFF],
            "JPEG start of image"
        );
        assert_eq!(
            &thumbnail.jpeg[thumbnail.jpeg.len() - 2..],
            &[0xFF, 0xD9],
            "JPEG end of image"
        );
        assert!(
            thumbnail.jpeg.len() < 20_000,
            "a flat 480×270 picture is small: {} bytes",
            thumbnail.jpeg.len()
        );
        assert!(matches!(
            make(&rgba[..100], w, h),
            Err(ThumbnailError::ShortFramebuffer { .. })
        ));
        Ok(())
    }
}
