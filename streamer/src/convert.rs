//! RGBA → I420 (BT.709, limited range), damage-aware: only the rectangles the desktop
//! redrew are converted, so an idle or typing desktop costs almost nothing.
//!
//! Chromium assumes BT.709 for untagged H.264, and the encoder tags the stream as BT.709
//! too, so colours survive the trip (a BT.601 stream shows red as (255, 26, 1)).

/// A rectangle in pixels, `right`/`bottom` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub left: u32,
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
}

impl Rect {
    pub fn full(width: u32, height: u32) -> Self {
        Self {
            left: 0,
            top: 0,
            right: width,
            bottom: height,
        }
    }

    /// Grown to even coordinates (one chroma sample covers 2×2 pixels) and clipped.
    fn to_chroma_grid(self, width: u32, height: u32) -> Self {
        Self {
            left: self.left.min(width) & !1,
            top: self.top.min(height) & !1,
            right: (self.right.min(width) + 1) & !1,
            bottom: (self.bottom.min(height) + 1) & !1,
        }
    }
}

/// An I420 picture with even dimensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I420 {
    pub width: u32,
    pub height: u32,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

// BT.709 limited range in Q16: Y = 16 + kr·R + kg·G + kb·B, and the chroma rows likewise.
const Y_R: i32 = 11_966;
const Y_G: i32 = 40_254;
const Y_B: i32 = 4_064;
const U_R: i32 = -6_596;
const U_G: i32 = -22_189;
const U_B: i32 = 28_785;
const V_R: i32 = 28_785;
const V_G: i32 = -26_145;
const V_B: i32 = -2_639;
const HALF: i32 = 1 << 15;

fn luma(r: i32, g: i32, b: i32) -> u8 {
    u8::try_from(((Y_R * r + Y_G * g + Y_B * b + HALF) >> 16) + 16).unwrap_or(u8::MAX)
}

fn chroma(r: i32, g: i32, b: i32) -> (u8, u8) {
    let u = ((U_R * r + U_G * g + U_B * b + HALF) >> 16) + 128;
    let v = ((V_R * r + V_G * g + V_B * b + HALF) >> 16) + 128;
    (
        u8::try_from(u.clamp(0, 255)).unwrap_or(128),
        u8::try_from(v.clamp(0, 255)).unwrap_or(128),
    )
}

impl I420 {
    /// A black picture; odd sizes are rounded down to even.
    pub fn new(width: u32, height: u32) -> Self {
        let (width, height) = (width & !1, height & !1);
        let luma_len = (width * height) as usize;
        Self {
            width,
            height,
            y: vec![16; luma_len],
            u: vec![128; luma_len / 4],
            v: vec![128; luma_len / 4],
        }
    }

    /// Converts the `damage` rectangles of an RGBA framebuffer (`stride` bytes per row).
    pub fn update(&mut self, rgba: &[u8], stride: usize, damage: &[Rect]) {
        for rect in damage {
            let rect = rect.to_chroma_grid(self.width, self.height);
            self.convert(rgba, stride, rect);
        }
    }

    fn convert(&mut self, rgba: &[u8], stride: usize, rect: Rect) {
        let width = self.width as usize;
        let chroma_width = width / 2;
        let mut row = rect.top as usize;
        while row < rect.bottom as usize {
            let mut col = rect.left as usize;
            while col < rect.right as usize {
                let (mut rs, mut gs, mut bs) = (0, 0, 0);
                for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let at = (row + dy) * stride + (col + dx) * 4;
                    let Some(px) = rgba.get(at..at + 3) else {
                        continue;
                    };
                    let (r, g, b) = (i32::from(px[0]), i32::from(px[1]), i32::from(px[2]));
                    self.y[(row + dy) * width + col + dx] = luma(r, g, b);
                    rs += r;
                    gs += g;
                    bs += b;
                }
                let (u, v) = chroma((rs + 2) / 4, (gs + 2) / 4, (bs + 2) / 4);
                let at = (row / 2) * chroma_width + col / 2;
                self.u[at] = u;
                self.v[at] = v;
                col += 2;
            }
            row += 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
        (0..width * height)
            .flat_map(|_| [rgb[0], rgb[1], rgb[2], 255])
            .collect()
    }

    #[test]
    fn known_colours_convert_to_bt709_limited_range() {
        for (rgb, expected) in [
            ([255, 255, 255], (235, 128, 128)),
            ([0, 0, 0], (16, 128, 128)),
            ([255, 0, 0], (63, 102, 240)),
            ([0, 255, 0], (173, 42, 26)),
            ([0, 0, 255], (32, 240, 118)),
        ] {
            let mut picture = I420::new(4, 2);
            picture.update(&solid(4, 2, rgb), 16, &[Rect::full(4, 2)]);
            assert_eq!(
                (picture.y[0], picture.u[0], picture.v[0]),
                expected,
                "{rgb:?}"
            );
        }
    }

    #[test]
    fn only_damaged_rectangles_change_and_odd_edges_are_covered() {
        let mut picture = I420::new(8, 8);
        let white = solid(8, 8, [255, 255, 255]);
        picture.update(
            &white,
            32,
            &[Rect {
                left: 3,
                top: 3,
                right: 5,
                bottom: 4,
            }],
        );
        // The damage grows to the 2×2 grid: rows 2..4, columns 2..6.
        for row in 0..8 {
            for col in 0..8 {
                let inside = (2..4).contains(&row) && (2..6).contains(&col);
                assert_eq!(
                    picture.y[row * 8 + col],
                    if inside { 235 } else { 16 },
                    "({col}, {row})"
                );
            }
        }
        assert_eq!(
            picture.u.iter().filter(|&&u| u == 128).count(),
            16,
            "chroma is neutral for white and black"
        );
    }

    #[test]
    fn odd_sizes_round_down_and_short_buffers_do_not_panic() {
        let mut picture = I420::new(5, 3);
        assert_eq!((picture.width, picture.height), (4, 2));
        picture.update(
            &[255; 8],
            20,
            &[
                Rect::full(5, 3),
                Rect {
                    left: 100,
                    top: 100,
                    right: 200,
                    bottom: 200,
                },
            ],
        );
    }
}
