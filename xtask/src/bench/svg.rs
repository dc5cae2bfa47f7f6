//! Hand-written SVG bar charts (no plotting crate: the xtask build stays small).
//!
//! One chart per workload group. Each workload is a block of horizontal bars, one per system
//! plus the ceiling, scaled to the best bar of that block, so rates and times share one axis:
//! for times the bar length is `best / value` (longer is always better). The figure itself is
//! printed next to each bar.

use std::fmt::Write as _;

use super::results::{fmt_value, Workload};

const WIDTH: f64 = 760.0;
const LABEL_W: f64 = 150.0;
const BAR_MAX: f64 = 460.0;
const BAR_H: f64 = 14.0;
const GAP: f64 = 3.0;
const BLOCK_GAP: f64 = 16.0;
const TOP: f64 = 40.0;
const PALETTE: [&str; 6] = [
    "#d1495b", "#00798c", "#edae49", "#66a182", "#8d96a3", "#2e4057",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A chart of `workloads` (all of one group) for `systems` (berth first); the ceiling, where
/// a workload has one, is drawn as the last bar in grey.
pub fn chart(title: &str, workloads: &[&Workload], systems: &[String]) -> String {
    let rows_per_block = systems.len() + 1;
    let block_h = rows_per_block as f64 * (BAR_H + GAP) + BLOCK_GAP + 14.0;
    let legend_h = 24.0;
    let height = TOP + workloads.len() as f64 * block_h + legend_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14" font-weight="bold">{}</text><text x="10" y="34" fill="#555">bars scaled to the best in each block; longer is better; figures as measured</text>"##,
        escape(title)
    );
    let mut y = TOP + 8.0;
    for w in workloads {
        let _ = writeln!(
            s,
            r#"<text x="10" y="{:.0}" font-weight="bold">{} ({})</text>"#,
            y + 10.0,
            escape(&w.title),
            escape(&w.unit)
        );
        y += 14.0;
        let mut bars: Vec<(String, Option<f64>, &str)> = systems
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (
                    name.clone(),
                    w.values.get(name).copied(),
                    PALETTE[i % PALETTE.len()],
                )
            })
            .collect();
        if let Some((source, v)) = &w.ceiling {
            bars.push((format!("ceiling: {source}"), Some(*v), "#bbbbbb"));
        }
        let goodness = |v: f64| if w.higher_is_better { v } else { 1.0 / v };
        let best = bars
            .iter()
            .filter_map(|(_, v, _)| v.filter(|v| *v > 0.0).map(goodness))
            .fold(0.0_f64, f64::max);
        for (name, value, color) in &bars {
            let _ = write!(
                s,
                r#"<text x="{:.0}" y="{:.0}" text-anchor="end">{}</text>"#,
                LABEL_W - 6.0,
                y + BAR_H - 3.0,
                escape(name)
            );
            match value.filter(|v| *v > 0.0 && best > 0.0) {
                Some(v) => {
                    let len = (goodness(v) / best * BAR_MAX).max(1.0);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{LABEL_W}" y="{y:.0}" width="{len:.1}" height="{BAR_H}" fill="{color}"/><text x="{:.1}" y="{:.0}">{}</text>"#,
                        LABEL_W + len + 4.0,
                        y + BAR_H - 3.0,
                        fmt_value(v)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.0}" y="{:.0}" fill="#999">n/a</text>"##,
                        LABEL_W + 4.0,
                        y + BAR_H - 3.0
                    );
                }
            }
            y += BAR_H + GAP;
        }
        y += BLOCK_GAP;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_bar_per_figure_and_marks_missing_ones() {
        let mut w = Workload::new("t", "ttfb <cold>", "metadata", "ms", false);
        w.values.insert("berth".into(), 10.0);
        w.values.insert("rclone".into(), 20.0);
        w.ceiling = Some(("s3-sdk".into(), 5.0));
        let svg = chart(
            "Metadata",
            &[&w],
            &["berth".into(), "rclone".into(), "s3fs".into()],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("ttfb &lt;cold&gt;"));
        // ceiling (5 ms) is the best: full length; berth half of it; rclone a quarter.
        assert!(svg.contains(r#"width="460.0""#));
        assert!(svg.contains(r#"width="230.0""#));
        assert!(svg.contains(r#"width="115.0""#));
        assert_eq!(svg.matches(">n/a<").count(), 1);
    }
}
