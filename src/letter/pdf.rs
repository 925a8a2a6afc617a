//! The letter as a one-page A4 PDF, written with `pdf-writer` in Helvetica (one of the PDF
//! base-14 fonts, so nothing is embedded) with WinAnsi encoding, which text extractors and
//! GP systems' viewers read back exactly.
//!
//! Lines are wrapped by Helvetica's character widths; a letter whose free text would run
//! past the page is shortened with a note saying so (the full text travels in the
//! structured part of the message).

use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str, TextStr};

use super::Facts;

const PAGE_W: f32 = 595.0;
const PAGE_H: f32 = 842.0;
const MARGIN: f32 = 56.0;
const BODY: f32 = 10.0;
const LEADING: f32 = 13.0;
const HEADING: f32 = 12.0;
const TITLE: f32 = 16.0;

/// Helvetica advance widths (per 1000 units of font size) for the printable ASCII range,
/// from Adobe's published AFM metrics; other characters are taken as 556 (a digit).
const WIDTHS: [u16; 95] = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278,
    278, // ' '..'/'
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584,
    556, // '0'..'?'
    1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722,
    778, // '@'..'O'
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469,
    556, // 'P'..'_'
    333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556,
    556, // '`'..'o'
    556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584, // 'p'..'~'
];

fn char_width(c: char, size: f32) -> f32 {
    let w = match c as u32 {
        0x20..=0x7e => WIDTHS[(c as u32 - 0x20) as usize],
        _ => 556,
    };
    f32::from(w) * size / 1000.0
}

fn text_width(s: &str, size: f32) -> f32 {
    s.chars().map(|c| char_width(c, size)).sum()
}

/// Windows-1252 bytes for `s` (the WinAnsi encoding the font declares); characters it
/// cannot show become `?`, control characters a space.
fn win_ansi(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| match c as u32 {
            0x00..=0x1f | 0x7f => b' ',
            0x20..=0x7e | 0xa0..=0xff => c as u32 as u8,
            0x20ac => 0x80,
            0x2018 => 0x91,
            0x2019 => 0x92,
            0x201c => 0x93,
            0x201d => 0x94,
            0x2022 => 0x95,
            0x2013 => 0x96,
            0x2014 => 0x97,
            _ => b'?',
        })
        .collect()
}

/// Breaks `text` into lines no wider than `width` at `size`, at spaces where it can
/// (a word longer than a line is cut).
pub fn wrap(text: &str, size: f32, width: f32) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.lines() {
        let mut line = String::new();
        for word in para.split_whitespace() {
            let candidate = if line.is_empty() {
                word.to_string()
            } else {
                format!("{line} {word}")
            };
            if text_width(&candidate, size) <= width {
                line = candidate;
                continue;
            }
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
            }
            let mut rest = word.to_string();
            while text_width(&rest, size) > width {
                let mut cut = String::new();
                for c in rest.chars() {
                    if text_width(&cut, size) + char_width(c, size) > width {
                        break;
                    }
                    cut.push(c);
                }
                if cut.is_empty() {
                    break;
                }
                rest = rest[cut.len()..].to_string();
                lines.push(cut);
            }
            line = rest;
        }
        lines.push(line);
    }
    lines
}

enum Line {
    Title(String),
    Heading(String),
    Body(String),
    Gap,
}

impl Line {
    fn height(&self) -> f32 {
        match self {
            Line::Title(_) => TITLE + 10.0,
            Line::Heading(_) => HEADING + 6.0,
            Line::Body(_) => LEADING,
            Line::Gap => LEADING / 2.0,
        }
    }
}

/// Renders `facts` as a one-page PDF letter from `sender` (the gateway's name for itself).
pub fn render(facts: &Facts, sender: &str) -> Vec<u8> {
    let width = PAGE_W - 2.0 * MARGIN;
    let mut lines = vec![
        Line::Title(facts.subject()),
        Line::Body(format!(
            "To: {} ({})",
            facts.practice_name, facts.practice_ods
        )),
        Line::Body(format!(
            "From: {} ({}), sent by {sender}",
            facts.provider_name, facts.provider_id
        )),
        Line::Body(format!("Date: {}", facts.at.get(..10).unwrap_or(&facts.at))),
        Line::Gap,
    ];
    for (title, body) in facts.sections() {
        lines.push(Line::Heading(title));
        for l in body {
            for w in wrap(&l, BODY, width) {
                lines.push(Line::Body(w));
            }
        }
        lines.push(Line::Gap);
    }
    let footer = format!(
        "Generated by {sender} from Task/{} version {} (referral ServiceRequest/{}). \
         Please file in the patient's record.",
        facts.task_id, facts.task_version, facts.service_request_id
    );
    let footer_lines = wrap(&footer, 8.0, width);
    // Keep to one page: drop body lines from the end of the longest free text, and say so.
    let room = PAGE_H - 2.0 * MARGIN - (footer_lines.len() as f32 + 1.0) * 10.0;
    let used: f32 = lines.iter().map(Line::height).sum();
    if used > room {
        let mut total = 0.0;
        let mut keep = 0;
        for l in &lines {
            if total + l.height() > room - 2.0 * LEADING {
                break;
            }
            total += l.height();
            keep += 1;
        }
        lines.truncate(keep);
        lines.push(Line::Body(
            "[Shortened to fit one page: the full text is in the message's structured record.]"
                .into(),
        ));
    }

    let mut content = Content::new();
    let mut y = PAGE_H - MARGIN;
    let (regular, bold) = (Name(b"F1"), Name(b"F2"));
    for l in &lines {
        y -= l.height();
        let (font, size, text) = match l {
            Line::Title(t) => (bold, TITLE, t),
            Line::Heading(t) => (bold, HEADING, t),
            Line::Body(t) => (regular, BODY, t),
            Line::Gap => continue,
        };
        content
            .begin_text()
            .set_font(font, size)
            .next_line(MARGIN, y)
            .show(Str(&win_ansi(text)))
            .end_text();
        if matches!(l, Line::Title(_)) {
            content
                .set_line_width(0.8)
                .move_to(MARGIN, y - 6.0)
                .line_to(PAGE_W - MARGIN, y - 6.0)
                .stroke();
        }
    }
    let mut fy = MARGIN;
    for l in footer_lines.iter().rev() {
        content
            .begin_text()
            .set_font(regular, 8.0)
            .next_line(MARGIN, fy)
            .show(Str(&win_ansi(l)))
            .end_text();
        fy += 10.0;
    }

    let (catalog, pages, page, f1, f2, body, info) = (
        Ref::new(1),
        Ref::new(2),
        Ref::new(3),
        Ref::new(4),
        Ref::new(5),
        Ref::new(6),
        Ref::new(7),
    );
    let mut pdf = Pdf::new();
    pdf.catalog(catalog).pages(pages);
    pdf.pages(pages).kids([page]).count(1);
    let mut p = pdf.page(page);
    p.media_box(Rect::new(0.0, 0.0, PAGE_W, PAGE_H))
        .parent(pages)
        .contents(body);
    p.resources().fonts().pair(regular, f1).pair(bold, f2);
    p.finish();
    pdf.type1_font(f1)
        .base_font(Name(b"Helvetica"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.type1_font(f2)
        .base_font(Name(b"Helvetica-Bold"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.stream(body, &content.finish());
    pdf.document_info(info)
        .title(TextStr(&facts.subject()))
        .producer(TextStr(sender));
    pdf.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_keeps_lines_within_the_width_and_loses_no_word() {
        let text = "Feeling much less isolated; attends the Tuesday group every week and \
                    has made two friends there. Averyveryveryverylongwordthatcannotfitonalineatallbecauseitgoesonandon";
        let lines = wrap(text, 10.0, 120.0);
        assert!(lines.len() > 3);
        for l in &lines {
            assert!(text_width(l, 10.0) <= 120.0, "{l}");
        }
        assert_eq!(lines.concat().replace(' ', ""), text.replace(' ', ""));
    }

    #[test]
    fn win_ansi_keeps_latin1_and_replaces_the_rest() {
        assert_eq!(
            win_ansi("Zoë – “ok” 😀"),
            b"Zo\xeb \x96 \x93ok\x94 ?".to_vec()
        );
    }
}
