//! SVG charts for the experiments: values per run, one series per setup (like the thesis's
//! figures 5.2 and 5.3), and bar charts for the benchmark. Plain SVG 1.1 text, so any browser
//! or image viewer shows it and git diffs it; no fonts or native libraries needed.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
/// Colour-blind-safe (Okabe-Ito).
const COLOURS: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];
/// A different marker per series, so that series stay apart in grey print too.
const MARKERS: [Marker; 3] = [Marker::Circle, Marker::Square, Marker::Triangle];

#[derive(Clone, Copy)]
enum Marker {
    Circle,
    Square,
    Triangle,
}

/// XML text escaping for labels.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `count` ticks up to `max`.
fn tick_step(max: f64, count: f64) -> f64 {
    if max.is_nan() || max <= 0.0 {
        return 1.0;
    }
    let raw = max / count;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    step.max(f64::MIN_POSITIVE)
}

fn fmt_tick(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}

struct Frame {
    svg: String,
    x_max: f64,
    y_max: f64,
}

impl Frame {
    fn new(title: &str, x_label: &str, y_label: &str, x_max: f64, y_max: f64) -> Self {
        let y_step = tick_step(y_max, 8.0);
        let y_max = (y_max / y_step).ceil().max(1.0) * y_step;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            (LEFT + WIDTH - RIGHT) / 2.0,
            esc(title)
        );
        let mut frame = Self { svg, x_max, y_max };
        let (x0, y0, x1, y1) = (LEFT, HEIGHT - BOTTOM, WIDTH - RIGHT, TOP);
        let mut tick = 0.0;
        while tick <= y_max + y_step / 2.0 {
            let y = frame.y(tick);
            let _ = writeln!(
                frame.svg,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                x0 - 6.0,
                y + 4.0,
                fmt_tick(tick)
            );
            tick += y_step;
        }
        let _ = writeln!(
            frame.svg,
            r##"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#000"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#000"/>"##
        );
        let _ = writeln!(
            frame.svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (x0 + x1) / 2.0,
            HEIGHT - 12.0,
            esc(x_label)
        );
        let _ = writeln!(
            frame.svg,
            r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
            (y0 + y1) / 2.0,
            (y0 + y1) / 2.0,
            esc(y_label)
        );
        frame
    }

    fn x(&self, v: f64) -> f64 {
        LEFT + (WIDTH - LEFT - RIGHT) * v / self.x_max.max(f64::MIN_POSITIVE)
    }

    fn y(&self, v: f64) -> f64 {
        HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * v / self.y_max
    }

    fn marker(&mut self, marker: Marker, x: f64, y: f64, colour: &str) {
        let _ = match marker {
            Marker::Circle => writeln!(
                self.svg,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{colour}"/>"#
            ),
            Marker::Square => writeln!(
                self.svg,
                r#"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="{colour}"/>"#,
                x - 4.0,
                y - 4.0
            ),
            Marker::Triangle => writeln!(
                self.svg,
                r#"<path d="M{x:.1} {:.1} L{:.1} {:.1} L{:.1} {:.1} Z" fill="{colour}"/>"#,
                y - 5.0,
                x + 5.0,
                y + 4.0,
                x - 5.0,
                y + 4.0
            ),
        };
    }

    fn legend(&mut self, i: usize, name: &str, colour: &str, marker: Option<Marker>) {
        let (x, y) = (WIDTH - RIGHT + 16.0, TOP + 10.0 + 20.0 * i as f64);
        match marker {
            Some(m) => self.marker(m, x + 4.0, y, colour),
            None => {
                let _ = writeln!(
                    self.svg,
                    r#"<rect x="{x}" y="{}" width="10" height="10" fill="{colour}"/>"#,
                    y - 5.0
                );
            }
        }
        let _ = writeln!(
            self.svg,
            r#"<text x="{}" y="{:.1}">{}</text>"#,
            x + 16.0,
            y + 4.0,
            esc(name)
        );
    }

    fn write(mut self, path: &Path) -> Result<()> {
        self.svg.push_str("</svg>\n");
        std::fs::write(path, self.svg).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// One point per run (x: run number from 1), one series per setup.
pub fn per_run(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let runs = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let y_max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1.0);
    let mut frame = Frame::new(title, "run", y_label, runs as f64 + 1.0, y_max);
    let x_step = tick_step(runs as f64, 10.0).max(1.0);
    let mut tick = x_step;
    while tick <= runs as f64 {
        let x = frame.x(tick);
        let _ = writeln!(
            frame.svg,
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
            HEIGHT - BOTTOM + 18.0,
            fmt_tick(tick)
        );
        tick += x_step;
    }
    for (i, (name, values)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let marker = MARKERS[i % MARKERS.len()];
        for (run, v) in values.iter().enumerate() {
            if v.is_finite() {
                let (x, y) = (frame.x(run as f64 + 1.0), frame.y(*v));
                frame.marker(marker, x, y, colour);
            }
        }
        frame.legend(i, name, colour, Some(marker));
    }
    frame.write(path)
}

/// One bar per value, labelled under it.
pub fn bars(path: &Path, title: &str, y_label: &str, bars: &[(String, f64)]) -> Result<()> {
    let y_max = bars
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1.0);
    let mut frame = Frame::new(title, "", y_label, bars.len() as f64, y_max);
    let slot = (WIDTH - LEFT - RIGHT) / bars.len().max(1) as f64;
    for (i, (name, v)) in bars.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let v = if v.is_finite() { *v } else { 0.0 };
        let (x, y) = (LEFT + slot * (i as f64 + 0.2), frame.y(v));
        let _ = writeln!(
            frame.svg,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{colour}"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            slot * 0.6,
            HEIGHT - BOTTOM - y,
            x + slot * 0.3,
            y - 5.0,
            fmt_tick((v * 100.0).round() / 100.0),
            x + slot * 0.3,
            HEIGHT - BOTTOM + 18.0,
            esc(name)
        );
        frame.legend(i, name, colour, None);
    }
    frame.write(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(100.0, 10.0), 10.0);
        assert_eq!(tick_step(7.0, 8.0), 1.0);
        assert_eq!(tick_step(0.3, 8.0), 0.05);
        assert_eq!(tick_step(0.0, 8.0), 1.0);
        assert_eq!(fmt_tick(20.0), "20");
        assert_eq!(fmt_tick(0.25), "0.25");
        assert_eq!(fmt_tick(0.5), "0.5");
    }

    #[test]
    fn charts_are_well_formed_svg_with_every_point_and_label() {
        let dir = std::env::temp_dir().join(format!("hf-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("runs.svg");
        per_run(
            &path,
            "lost <packets>",
            "lost",
            &[
                ("frr".into(), vec![0.0, 1.0, 2.0]),
                ("bird & co".into(), vec![3.0, f64::NAN]),
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // 3 + 1 points plus 2 legend markers.
        let markers = svg.matches("<circle").count() + svg.matches("<rect x").count();
        assert_eq!(markers, 3 + 1 + 2, "{svg}");
        assert!(svg.contains("lost &lt;packets&gt;") && svg.contains("bird &amp; co"));
        let bar_path = dir.join("bars.svg");
        bars(
            &bar_path,
            "throughput",
            "Mbit/s",
            &[("a".into(), 10.0), ("b".into(), 2.5)],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&bar_path).unwrap();
        assert!(svg.contains(">2.5<") && svg.contains(">a<"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
