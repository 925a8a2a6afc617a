//! Bar charts for the figures page, drawn server-side as SVG by `plotters` (no JavaScript;
//! text is SVG `<text>`, so no font file is read). A chart only draws what its table beside
//! it shows: a suppressed figure is a gap, never a bar, and the table is the accessible
//! form of the same numbers.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One series of a grouped bar chart: its name (the legend) and one value per category
/// (`None`: suppressed or absent, not drawn).
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

/// NHS.UK palette colours, distinct from each other and at least 3:1 against white.
const COLOURS: [RGBColor; 7] = [
    RGBColor(0x00, 0x5e, 0xb8), // blue
    RGBColor(0x00, 0x7f, 0x3b), // green
    RGBColor(0x8a, 0x15, 0x38), // dark pink
    RGBColor(0x33, 0x00, 0x72), // purple
    RGBColor(0xed, 0x8b, 0x00), // orange
    RGBColor(0x42, 0x55, 0x63), // dark grey
    RGBColor(0x00, 0xa4, 0x99), // aqua green
];

#[derive(Debug, thiserror::Error)]
#[error("the chart could not be drawn: {0}")]
pub struct ChartError(String);

/// A grouped bar chart: `categories` along the bottom, one bar per series in each, the
/// value axis titled `axis`. `label` names the chart for assistive technology (the SVG is
/// `role="img"`); the page's table gives its numbers.
pub fn bars(
    label: &str,
    categories: &[String],
    series: &[Series],
    axis: &str,
) -> Result<String, ChartError> {
    let err = |e: &dyn std::fmt::Display| ChartError(e.to_string());
    let values = series.iter().flat_map(|s| s.values.iter().flatten());
    let (lo, hi) = values.fold((0f64, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let hi = if hi <= lo { lo + 1.0 } else { hi * 1.1 };
    let lo = if lo < 0.0 { lo * 1.1 } else { 0.0 };
    let n = categories.len().max(1);
    let width = (160 + n * 90 * series.len().clamp(1, 3)).clamp(480, 960) as u32;
    let legend = if series.len() > 1 {
        24 + 20 * series.len() as u32
    } else {
        0
    };
    let height = 320 + legend;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (plot, key) = root.split_vertically(320);
        let mut chart = ChartBuilder::on(&plot)
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..n as f64, lo..hi)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(axis)
            .label_style(("sans-serif", 17).into_font().color(&BLACK))
            .axis_desc_style(("sans-serif", 17).into_font().color(&BLACK))
            .draw()
            .map_err(|e| err(&e))?;
        // Each category's name under its bars, on up to three lines.
        let style = ("sans-serif", 16)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (i, name) in categories.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, lo));
            for (line, words) in wrap(name, 12).iter().take(3).enumerate() {
                plot.draw(&Text::new(
                    words.clone(),
                    (x, y + 6 + 15 * line as i32),
                    style.clone(),
                ))
                .map_err(|e| err(&e))?;
            }
        }
        let k = series.len().max(1) as f64;
        let band = 0.8 / k;
        for (j, s) in series.iter().enumerate() {
            let colour = COLOURS[j % COLOURS.len()];
            chart
                .draw_series(s.values.iter().enumerate().filter_map(|(i, v)| {
                    let v = (*v)?;
                    let x0 = i as f64 + 0.1 + band * j as f64;
                    Some(Rectangle::new(
                        [(x0, 0.0_f64.max(lo)), (x0 + band * 0.9, v)],
                        colour.filled(),
                    ))
                }))
                .map_err(|e| err(&e))?;
        }
        if series.len() > 1 {
            for (j, s) in series.iter().enumerate() {
                let colour = COLOURS[j % COLOURS.len()];
                let y = 12 + 20 * j as i32;
                key.draw(&Rectangle::new([(72, y), (86, y + 14)], colour.filled()))
                    .map_err(|e| err(&e))?;
                key.draw(&Text::new(
                    s.name.clone(),
                    (94, y),
                    ("sans-serif", 17).into_font().color(&BLACK),
                ))
                .map_err(|e| err(&e))?;
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    // Named for assistive technology; scaled by the page's width (CSS), not fixed.
    let label = escape(label);
    Ok(svg.replacen(
        "<svg ",
        &format!(
            "<svg role=\"img\" aria-label=\"{label}\" focusable=\"false\" class=\"report-chart\" "
        ),
        1,
    ))
}

/// `text` in lines of about `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(l) if l.len() + 1 + word.len() <= width => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_named_svg_and_draws_no_bar_for_a_suppressed_figure() {
        let cats = vec!["Jan".to_string(), "Feb".to_string()];
        let one = bars(
            "Referrals <test>",
            &cats,
            &[Series {
                name: "All".into(),
                values: vec![Some(10.0), Some(20.0)],
            }],
            "Referrals",
        )
        .unwrap_or_default();
        let gap = bars(
            "Referrals <test>",
            &cats,
            &[Series {
                name: "All".into(),
                values: vec![Some(10.0), None],
            }],
            "Referrals",
        )
        .unwrap_or_default();
        assert!(one.starts_with("<svg role=\"img\" aria-label=\"Referrals &lt;test&gt;\""));
        assert!(one.contains("\nJan\n") && one.contains("\nFeb\n"), "{one}");
        let hostile = bars(
            "x",
            &["<script>alert(1)</script>".to_string()],
            &[
                Series {
                    name: "a \"b\" <i>".into(),
                    values: vec![Some(1.0)],
                },
                Series {
                    name: "<u>".into(),
                    values: vec![Some(2.0)],
                },
            ],
            "<b>",
        )
        .unwrap_or_default();
        assert!(
            !hostile.contains("<script>")
                && !hostile.contains("<b>")
                && !hostile.contains("<i>")
                && !hostile.contains("<u>")
                && hostile.contains("&lt;script&gt;")
                && hostile.contains("&lt;u&gt;"),
            "text in a chart is escaped: {hostile}"
        );
        let rects = |s: &str| s.matches("<rect").count();
        assert_eq!(
            rects(&one),
            rects(&gap) + 1,
            "the suppressed month has no bar"
        );
    }
}
