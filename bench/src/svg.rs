//! A latency-distribution plot as hand-written SVG (no plotting dependency): latency against
//! percentile, the percentile axis stretched towards the tail as HdrHistogram plots it
//! (x = log10(1 / (1 - p)): 0 %, 90 %, 99 %, 99.9 %, 99.99 % evenly spaced).

use std::fmt::Write as _;

const W: f64 = 860.0;
const H: f64 = 480.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG document: one line per series of (name, sorted latencies in ms).
pub fn percentile_plot(title: &str, series: &[(String, Vec<f64>)]) -> String {
    let max_x = 4.0; // 99.99 %
    let max_y = series
        .iter()
        .filter_map(|(_, v)| v.last().copied())
        .fold(0.0_f64, f64::max)
        .max(0.001)
        * 1.05;
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x_of = |x: f64| LEFT + x.min(max_x) / max_x * pw;
    let y_of = |y: f64| TOP + ph - y / max_y * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        esc(title)
    );
    // Axes and grid.
    for (x, label) in [
        (0.0, "0%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
    ] {
        let px = x_of(x);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + ph,
            TOP + ph + 18.0
        );
    }
    for i in 0..=5 {
        let y = max_y * f64::from(i) / 5.0;
        let py = y_of(y);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{y:.2}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            py + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text><text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">latency (ms)</text>"#,
        LEFT + pw / 2.0,
        H - 10.0,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    for (i, (name, v)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        if !v.is_empty() {
            let n = v.len() as f64;
            // At most ~2,000 points: evenly in x, so the tail keeps its detail.
            let mut points = String::new();
            let steps = 2000;
            let mut last_idx = usize::MAX;
            for k in 0..=steps {
                let x = max_x * f64::from(k) / f64::from(steps);
                let p = 1.0 - 10f64.powf(-x);
                let idx = ((p * n).ceil() as usize).clamp(1, v.len()) - 1;
                if idx == last_idx && k != steps {
                    continue;
                }
                last_idx = idx;
                let _ = write!(points, "{:.1},{:.1} ", x_of(x), y_of(v[idx]));
            }
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{points}"/>"#
            );
        }
        let ly = TOP + 10.0 + i as f64 * 18.0;
        let lx = LEFT + pw + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{} (n={})</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            esc(name),
            v.len()
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plot_is_one_svg_document_with_a_line_per_series() {
        let a: Vec<f64> = (1..=1000).map(f64::from).collect();
        let svg = percentile_plot("t <1>", &[("a".into(), a), ("b & c".into(), vec![])]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("t &lt;1&gt;") && svg.contains("b &amp; c"));
    }
}
