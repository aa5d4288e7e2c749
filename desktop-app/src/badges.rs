//! Join-code badges as a PDF: eight to an A4 page, each with the participant's name, team,
//! the event and the personal join code. Join codes are shown once, at import, so the
//! console prints them straight from the import's answer.
//!
//! The PDF is written by krilla, which embeds (and subsets) the fonts and shapes the text,
//! so a name in any script prints as itself: DejaVu Sans covers Latin, Greek, Cyrillic and
//! Arabic (joined, right to left), Droid Sans Fallback covers Chinese, Japanese and Korean.
//! Both are Debian fonts, embedded in the console at build time (see `build.rs`).

use krilla::Document;
use krilla::geom::{PathBuilder, Point, Rect, Size};
use krilla::page::PageSettings;
use krilla::paint::{Fill, Stroke};
use krilla::text::{Font, TextDirection};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct Badge {
    pub(crate) name: String,
    pub(crate) team: String,
    pub(crate) join_code: String,
}

const PAGE_W: f32 = 595.0;
const PAGE_H: f32 = 842.0;
const PER_PAGE: usize = 8;
/// Longest text printed on a badge line, in characters.
const LINE_CHARS: usize = 60;

static LATIN_GREEK_CYRILLIC_ARABIC: &[u8] = include_bytes!(env!("LABRACK_BADGE_FONT"));
static CJK: &[u8] = include_bytes!(env!("LABRACK_BADGE_CJK_FONT"));

/// The badge fonts, in the order they are tried for each character.
struct Fonts {
    faces: Vec<(Font, skrifa::FontRef<'static>)>,
}

impl Fonts {
    fn load() -> Result<Self, String> {
        let mut faces = Vec::new();
        for data in [LATIN_GREEK_CYRILLIC_ARABIC, CJK] {
            let font = Font::new(data.into(), 0).ok_or("a badge font does not load")?;
            let face = skrifa::FontRef::new(data).map_err(|e| format!("a badge font: {e}"))?;
            faces.push((font, face));
        }
        Ok(Self { faces })
    }

    /// The first font with a glyph for `c`; the first font when none has one (it draws
    /// its "missing" box, never a question mark).
    fn for_char(&self, c: char) -> usize {
        use skrifa::MetadataProvider as _;
        self.faces
            .iter()
            .position(|(_, face)| face.charmap().map(c).is_some())
            .unwrap_or(0)
    }

    /// `text` cut into runs that one font draws; spaces and punctuation stay with the run
    /// they are in, so words are shaped whole.
    fn runs<'t>(&self, text: &'t str) -> Vec<(usize, &'t str)> {
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (at, c) in text.char_indices() {
            let end = at + c.len_utf8();
            let neutral = c.is_whitespace() || c.is_ascii_punctuation();
            match runs.last_mut() {
                Some((_, _, last_end)) if neutral => *last_end = end,
                Some((font, _, last_end)) if *font == self.for_char(c) => *last_end = end,
                _ => runs.push((self.for_char(c), at, end)),
            }
        }
        runs.into_iter()
            .map(|(font, start, end)| (font, &text[start..end]))
            .collect()
    }
}

/// One line of text from `(x, baseline)`, run by run; the advance of each run is measured
/// from its shaped glyphs so the next starts where it ends.
fn line(
    surface: &mut krilla::surface::Surface<'_>,
    fonts: &Fonts,
    x: f32,
    baseline: f32,
    size: f32,
    text: &str,
) {
    let text: String = text.chars().take(LINE_CHARS).collect();
    let mut pen = x;
    for (index, run) in fonts.runs(&text) {
        let (font, face) = &fonts.faces[index];
        surface.draw_text(
            Point::from_xy(pen, baseline),
            font.clone(),
            size,
            run,
            false,
            TextDirection::Auto,
        );
        pen += advance(face, run, size);
    }
}

/// How far `run` advances in `face` at `size` points (unshaped widths: close enough to
/// place the next run of a line).
fn advance(face: &skrifa::FontRef<'_>, run: &str, size: f32) -> f32 {
    use skrifa::MetadataProvider as _;
    let metrics = face.glyph_metrics(
        skrifa::instance::Size::new(size),
        skrifa::instance::LocationRef::default(),
    );
    let charmap = face.charmap();
    run.chars()
        .filter_map(|c| charmap.map(c))
        .filter_map(|glyph| metrics.advance_width(glyph))
        .sum()
}

fn badge_box(surface: &mut krilla::surface::Surface<'_>, x: f32, top: f32) {
    let mut path = PathBuilder::new();
    if let Some(rect) = Rect::from_xywh(x, top, 250.0, 180.0) {
        path.push_rect(rect);
    }
    if let Some(path) = path.finish() {
        surface.set_fill(None);
        surface.set_stroke(Some(Stroke {
            width: 0.6,
            ..Stroke::default()
        }));
        surface.draw_path(&path);
        surface.set_stroke(None);
        surface.set_fill(Some(Fill::default()));
    }
}

/// The PDF bytes.
pub(crate) fn pdf(event: &str, event_code: &str, badges: &[Badge]) -> Result<Vec<u8>, String> {
    let fonts = Fonts::load()?;
    let pages: Vec<&[Badge]> = if badges.is_empty() {
        vec![&[]]
    } else {
        badges.chunks(PER_PAGE).collect()
    };
    let size = Size::from_wh(PAGE_W, PAGE_H).ok_or("page size")?;
    let mut document = Document::new();
    for page_badges in pages {
        let mut page = document.start_page_with(PageSettings::new(size));
        let mut surface = page.surface();
        for (index, badge) in page_badges.iter().enumerate() {
            let column = (index % 2) as f32;
            let row = (index / 2) as f32;
            // krilla's origin is the top left corner, y downwards.
            let (x, top) = (40.0 + column * 265.0, 40.0 + row * 195.0);
            badge_box(&mut surface, x, top);
            let text_x = x + 14.0;
            line(&mut surface, &fonts, text_x, top + 36.0, 18.0, &badge.name);
            line(
                &mut surface,
                &fonts,
                text_x,
                top + 58.0,
                12.0,
                &format!("Team {}", badge.team),
            );
            line(&mut surface, &fonts, text_x, top + 86.0, 10.0, event);
            line(
                &mut surface,
                &fonts,
                text_x,
                top + 104.0,
                10.0,
                &format!("Event code {event_code}"),
            );
            line(
                &mut surface,
                &fonts,
                text_x,
                top + 140.0,
                20.0,
                &badge.join_code,
            );
            line(
                &mut surface,
                &fonts,
                text_x,
                top + 162.0,
                8.0,
                "Join at the appliance's page: event code + this personal code",
            );
        }
        surface.finish();
        page.finish();
    }
    document
        .finish()
        .map_err(|error| format!("writing the badges PDF: {error:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_script_goes_to_a_font_that_has_it() {
        let fonts = Fonts::load().expect("fonts");
        assert_eq!(fonts.runs("Ελένη Иван"), vec![(0, "Ελένη Иван")]);
        assert_eq!(fonts.runs("محمد"), vec![(0, "محمد")]);
        assert_eq!(fonts.runs("日本 語"), vec![(1, "日本 語")]);
        assert_eq!(
            fonts.runs("Zoë 日本"),
            vec![(0, "Zoë "), (1, "日本")],
            "a space joins the run before it"
        );
        for c in ['日', '語', 'Λ', 'И', 'م'] {
            let index = fonts.for_char(c);
            use skrifa::MetadataProvider as _;
            assert!(
                fonts.faces[index].1.charmap().map(c).is_some(),
                "{c} has a glyph"
            );
        }
    }

    #[test]
    fn nine_badges_make_two_pages_of_pdf() {
        let badges: Vec<Badge> = (0..9)
            .map(|n| Badge {
                name: format!("Zoë (n{n}) 日本"),
                team: "Red".into(),
                join_code: format!("ABCD-EF{n}"),
            })
            .collect();
        let bytes = pdf("Lab Day", "K7Q2XM", &badges).expect("pdf");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("%PDF-") && text.trim_end().ends_with("%%EOF"));
        assert!(text.contains("/Count 2"), "nine badges need two pages");
        assert!(text.contains("/FontFile2"), "the fonts are embedded");
    }

    fn poppler(tool: &str, args: &[&std::ffi::OsStr]) -> Vec<u8> {
        let output = std::process::Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("{tool} (poppler-utils; the test command installs it): {e}")
            });
        assert!(
            output.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// Dark pixels of a binary PGM (`P5`) inside the rectangle.
    fn ink(pgm: &[u8], (left, top, right, bottom): (usize, usize, usize, usize)) -> usize {
        let text = String::from_utf8_lossy(&pgm[..pgm.len().min(64)]).into_owned();
        let mut fields = text.split_ascii_whitespace();
        assert_eq!(fields.next(), Some("P5"));
        let width: usize = fields.next().and_then(|w| w.parse().ok()).expect("width");
        let height: usize = fields.next().and_then(|h| h.parse().ok()).expect("height");
        let header = pgm.len() - width * height;
        let pixels = &pgm[header..];
        (top..bottom.min(height))
            .flat_map(|y| (left..right.min(width)).map(move |x| (x, y)))
            .filter(|(x, y)| pixels[y * width + x] < 128)
            .count()
    }

    /// A badge for a name in each script shows that name: poppler reads the names back as
    /// text from the embedded fonts, and on the rendered page each name's place has ink.
    #[test]
    fn names_in_every_script_print_as_themselves() {
        let names = ["日本 語", "Ελένη", "Иван", "محمد"];
        let badges: Vec<Badge> = names
            .iter()
            .map(|name| Badge {
                name: (*name).into(),
                team: "Blue".into(),
                join_code: "ABCD-EFGH".into(),
            })
            .collect();
        let bytes = pdf("Lab Day", "K7Q2XM", &badges).expect("pdf");
        let dir = std::env::temp_dir().join(format!("labrack-badges-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("badges.pdf");
        std::fs::write(&file, &bytes).expect("write");

        let text = String::from_utf8(poppler("pdftotext", &[file.as_os_str(), "-".as_ref()]))
            .expect("UTF-8 text");
        for name in names {
            assert!(
                text.contains(name),
                "{name} is not in the PDF's text:\n{text}"
            );
        }
        assert!(
            !text.contains('?'),
            "no name became question marks:\n{text}"
        );
        let fonts = String::from_utf8_lossy(&poppler("pdffonts", &[file.as_os_str()])).into_owned();
        assert!(
            fonts.contains("DejaVuSans") && fonts.contains("DroidSansFallback"),
            "both fonts are used:\n{fonts}"
        );

        let page = dir.join("page");
        poppler(
            "pdftoppm",
            &[
                "-r".as_ref(),
                "72".as_ref(),
                "-gray".as_ref(),
                "-singlefile".as_ref(),
                file.as_os_str(),
                page.as_os_str(),
            ],
        );
        let pgm = std::fs::read(dir.join("page.pgm")).expect("rendered page");
        for (index, name) in names.iter().enumerate() {
            let (x, top) = (40 + (index % 2) * 265, 40 + (index / 2) * 195);
            let dark = ink(&pgm, (x + 10, top + 18, x + 240, top + 42));
            assert!(
                dark > 30,
                "{name}'s badge has {dark} dark pixels where the name goes"
            );
        }
        // The same place on a badge with no name is blank: the ink is the name's.
        let blank = pdf(
            "Lab Day",
            "K7Q2XM",
            &[Badge {
                name: String::new(),
                team: "Blue".into(),
                join_code: "ABCD-EFGH".into(),
            }],
        )
        .expect("pdf");
        std::fs::write(&file, &blank).expect("write");
        poppler(
            "pdftoppm",
            &[
                "-r".as_ref(),
                "72".as_ref(),
                "-gray".as_ref(),
                "-singlefile".as_ref(),
                file.as_os_str(),
                page.as_os_str(),
            ],
        );
        let pgm = std::fs::read(dir.join("page.pgm")).expect("rendered page");
        assert_eq!(ink(&pgm, (50, 58, 280, 82)), 0, "no name, no ink");
        let _ = std::fs::remove_dir_all(dir);
    }
}
