//! Join-code badges as a PDF: eight to an A4 page, each with the participant's name, team,
//! the event and the personal join code. Join codes are shown once, at import, so the
//! console prints them straight from the import's answer. A small hand-written PDF (the
//! built-in Helvetica, no embedded fonts) keeps the console free of a PDF dependency.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct Badge {
    pub(crate) name: String,
    pub(crate) team: String,
    pub(crate) join_code: String,
}

/// Text for a PDF string in Helvetica (WinAnsi): Latin-1 kept, anything else `?`, and the
/// string delimiters escaped.
fn pdf_text(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars().take(60) {
        match c {
            '(' | ')' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if (' '..='~').contains(&c) => out.push(c),
            c if u32::from(c) >= 0xa0 && u32::from(c) <= 0xff => {
                out.push_str(&format!("\\{:03o}", u32::from(c)))
            }
            _ => out.push('?'),
        }
    }
    out
}

const PAGE_W: f32 = 595.0;
const PAGE_H: f32 = 842.0;
const PER_PAGE: usize = 8;

fn page_content(event: &str, event_code: &str, badges: &[Badge]) -> String {
    let mut content = String::new();
    for (index, badge) in badges.iter().enumerate() {
        let column = (index % 2) as f32;
        let row = (index / 2) as f32;
        let (x, top) = (40.0 + column * 265.0, PAGE_H - 40.0 - row * 195.0);
        content.push_str(&format!("0.6 w {x:.1} {:.1} 250 180 re S\n", top - 180.0));
        let mut line = |size: u32, dy: f32, text: &str| {
            content.push_str(&format!(
                "BT /F1 {size} Tf {:.1} {:.1} Td ({}) Tj ET\n",
                x + 14.0,
                top - dy,
                pdf_text(text)
            ));
        };
        line(18, 36.0, &badge.name);
        line(12, 58.0, &format!("Team {}", badge.team));
        line(10, 86.0, event);
        line(10, 104.0, &format!("Event code {event_code}"));
        line(20, 140.0, &badge.join_code);
        line(
            8,
            162.0,
            "Join at the appliance's page: event code + this personal code",
        );
    }
    content
}

/// The PDF bytes.
pub(crate) fn pdf(event: &str, event_code: &str, badges: &[Badge]) -> Vec<u8> {
    let pages: Vec<&[Badge]> = if badges.is_empty() {
        vec![&[]]
    } else {
        badges.chunks(PER_PAGE).collect()
    };
    // Objects: 1 catalog, 2 pages, 3 font, then per page: the page and its content stream.
    let mut objects: Vec<String> = Vec::new();
    objects.push("<< /Type /Catalog /Pages 2 0 R >>".to_owned());
    let kids: Vec<String> = (0..pages.len())
        .map(|i| format!("{} 0 R", 4 + 2 * i))
        .collect();
    objects.push(format!(
        "<< /Type /Pages /Kids [{}] /Count {} >>",
        kids.join(" "),
        pages.len()
    ));
    objects.push(
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_owned(),
    );
    for (i, page) in pages.iter().enumerate() {
        let content = page_content(event, event_code, page);
        objects.push(format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
            5 + 2 * i
        ));
        objects.push(format!(
            "<< /Length {} >>\nstream\n{content}endstream",
            content.len()
        ));
    }
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{object}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for offset in offsets {
        out.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn badges_make_a_well_formed_pdf() {
        let badges: Vec<Badge> = (0..9)
            .map(|n| Badge {
                name: format!("Zoë (n{n})"),
                team: "Red".into(),
                join_code: format!("ABCD-EF{n}"),
            })
            .collect();
        let bytes = pdf("Lab Day", "K7Q2XM", &badges);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("%PDF-1.4\n") && text.ends_with("%%EOF\n"));
        assert!(text.contains("/Count 2"), "nine badges need two pages");
        assert!(
            text.contains("(Zo\\353 \\(n0\\)) Tj"),
            "Latin-1 and delimiters escaped"
        );
        assert!(text.contains("(ABCD-EF8) Tj"));
        // Every xref offset points at its object.
        let xref_at: usize = text
            .rsplit("startxref\n")
            .next()
            .and_then(|t| t.lines().next())
            .and_then(|n| n.parse().ok())
            .expect("startxref");
        let table = &text[xref_at..];
        for (i, line) in table
            .lines()
            .skip(3)
            .take_while(|l| l.ends_with(" n "))
            .enumerate()
        {
            let offset: usize = line[..10].parse().expect("offset");
            assert!(
                text[offset..].starts_with(&format!("{} 0 obj", i + 1)),
                "object {} at {offset}",
                i + 1
            );
        }
        assert_eq!(pdf_text("日本"), "??");
    }
}
