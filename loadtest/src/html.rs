//! The HTML report: one self-contained page (inline SVG charts drawn with plotters, inline CSS,
//! no scripts, nothing fetched) that opens in any browser, offline.
//!
//! Charts: latency by percentile on log scales (the HDR plot: the tail is where latency lives),
//! throughput and p99 per second over the run, and outcomes. Tables repeat the numbers.

use std::fmt::Write as _;

use plotters::prelude::*;

use crate::report::{Report, Status};

/// Chart size in pixels.
const SIZE: (u32, u32) = (920, 380);

/// Line colours: `all` first, then one per priority.
const COLOURS: [RGBColor; 6] = [
    RGBColor(20, 20, 20),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

type Result<T> = std::result::Result<T, String>;

fn e<E: std::fmt::Display>(err: E) -> String {
    err.to_string()
}

/// Percentile → x on a log axis: 1 / (1 − p), so 90 % is 10, 99 % is 100, 99.9 % is 1000.
fn percentile_x(p: f64) -> f64 {
    1.0 / (1.0 - (p / 100.0).min(0.999_999))
}

/// The overload curve of a sweep (or ramp): goodput and achieved throughput against offered
/// load (left axis, tasks/s), p99 latency of what ran (right axis, ms, log scale).
pub fn sweep_chart(r: &Report) -> Result<String> {
    let Some(ramp) = &r.ramp else {
        return Err("the report has no steps".into());
    };
    let mut steps = ramp.steps.clone();
    steps.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let max_rate = steps.iter().map(|s| s.rate).fold(1.0f64, f64::max) * 1.05;
    let p99_hi = steps
        .iter()
        .map(|s| s.p99_ms.max(s.refusal_p99_ms))
        .fold(1.0f64, f64::max)
        * 2.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Overload curve: {} ({})", r.target, r.mix),
                ("sans-serif", 18),
            )
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .right_y_label_area_size(70)
            .build_cartesian_2d(0f64..max_rate, 0f64..max_rate)
            .map_err(e)?
            .set_secondary_coord(0f64..max_rate, (0.1f64..p99_hi).log_scale());
        chart
            .configure_mesh()
            .x_desc("offered (tasks/s)")
            .y_desc("tasks/s")
            .x_label_formatter(&|x| trim(*x))
            .y_label_formatter(&|y| trim(*y))
            .draw()
            .map_err(e)?;
        chart
            .configure_secondary_axes()
            .y_desc("p99 (ms, log)")
            .label_style(("sans-serif", 12))
            .y_label_formatter(&|y| trim(*y))
            .draw()
            .map_err(e)?;
        let ideal = [(0.0, 0.0), (max_rate, max_rate)];
        chart
            .draw_series(LineSeries::new(
                ideal,
                RGBColor(200, 200, 200).stroke_width(1),
            ))
            .map_err(e)?
            .label("offered = achieved")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RGBColor(200, 200, 200)));
        let good: Vec<(f64, f64)> = steps.iter().map(|s| (s.rate, s.goodput_per_s)).collect();
        chart
            .draw_series(LineSeries::new(good.clone(), COLOURS[4].stroke_width(3)))
            .map_err(e)?
            .label("goodput (ok/s)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], COLOURS[4].stroke_width(3)));
        chart
            .draw_series(good.iter().map(|&p| Circle::new(p, 3, COLOURS[4].filled())))
            .map_err(e)?;
        let refused: Vec<(f64, f64)> = steps.iter().map(|s| (s.rate, s.refused_per_s)).collect();
        chart
            .draw_series(LineSeries::new(refused, COLOURS[2].stroke_width(2)))
            .map_err(e)?
            .label("refused/s")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], COLOURS[2].stroke_width(2)));
        let p99: Vec<(f64, f64)> = steps.iter().map(|s| (s.rate, s.p99_ms.max(0.1))).collect();
        chart
            .draw_secondary_series(LineSeries::new(p99, COLOURS[1].stroke_width(2)))
            .map_err(e)?
            .label("p99 of what ran (right)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], COLOURS[1].stroke_width(2)));
        let refusal: Vec<(f64, f64)> = steps
            .iter()
            .filter(|s| s.refused_per_s > 0.0)
            .map(|s| (s.rate, s.refusal_p99_ms.max(0.1)))
            .collect();
        chart
            .draw_secondary_series(LineSeries::new(refusal, COLOURS[5].stroke_width(2)))
            .map_err(e)?
            .label("p99 time to refusal (right)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], COLOURS[5].stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

fn latency_chart(r: &Report) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let values = r
            .latency
            .curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.latency_ms));
        let (lo, hi) = values.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = if hi <= 0.0 {
            (0.001, 1.0)
        } else {
            ((lo.max(0.001)) / 2.0, hi * 2.0)
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Latency by percentile (submit → outcome)",
                ("sans-serif", 18),
            )
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d((1f64..1e6f64).log_scale(), (lo..hi).log_scale())
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_label_formatter(&|x| {
                let p = 100.0 * (1.0 - 1.0 / x);
                if p < 1e-9 {
                    "0%".to_owned()
                } else {
                    format!("{}%", trim(p))
                }
            })
            .y_label_formatter(&|y| trim(*y))
            .draw()
            .map_err(e)?;
        for (i, c) in r.latency.curves.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let width = if i == 0 { 3 } else { 2 };
            let points: Vec<(f64, f64)> = c
                .points
                .iter()
                .map(|p| (percentile_x(p.percentile), p.latency_ms.max(lo)))
                .collect();
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(width)))
                .map_err(e)?
                .label(c.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(width))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

fn timeline_chart(
    r: &Report,
    title: &str,
    y_desc: &str,
    value: impl Fn(&crate::record::Tick) -> f64,
    reference: Option<f64>,
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        // Each second is drawn at its middle.
        let pts: Vec<(f64, f64)> = r.timeline.iter().map(|t| (t.t_s + 0.5, value(t))).collect();
        let x0 = r.timeline.first().map_or(0.0, |t| t.t_s);
        let x1 = r.timeline.last().map_or(1.0, |t| t.t_s + 1.0).max(x0 + 1.0);
        let top = pts
            .iter()
            .map(|p| p.1)
            .chain(reference)
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, 0f64..top)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("seconds since measurement started (shaded: warm-up, excluded)")
            .y_desc(y_desc)
            .y_label_formatter(&|y| trim(*y))
            .draw()
            .map_err(e)?;
        if x0 < 0.0 {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.0), (0.0, top)],
                    RGBColor(200, 200, 200).mix(0.35).filled(),
                )))
                .map_err(e)?;
        }
        if let Some(r) = reference {
            chart
                .draw_series(LineSeries::new(
                    vec![(x0, r), (x1, r)],
                    RGBColor(214, 39, 40).stroke_width(1),
                ))
                .map_err(e)?
                .label(format!("offered {}", trim(r)))
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(214, 39, 40))
                });
        }
        chart
            .draw_series(LineSeries::new(pts.clone(), COLOURS[3].stroke_width(2)))
            .map_err(e)?
            .label(y_desc.to_owned())
            .legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], COLOURS[3].stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 2, COLOURS[3].filled())))
            .map_err(e)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

fn outcomes_chart(r: &Report) -> Result<String> {
    let o = &r.tasks.outcomes;
    let bars = [
        ("ok", o.ok, RGBColor(44, 160, 44)),
        ("error", o.error, RGBColor(214, 39, 40)),
        ("timeout", o.timeout, RGBColor(255, 127, 14)),
        ("panic", o.panic, RGBColor(148, 103, 189)),
        ("cancelled", o.cancelled, RGBColor(127, 127, 127)),
        ("rejected", o.rejected, RGBColor(31, 119, 180)),
        ("transport", o.transport_error, RGBColor(188, 189, 34)),
    ];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (SIZE.0, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let top = bars.iter().map(|b| b.1).max().unwrap_or(1).max(1) as f64 * 4.0;
        let mut chart = ChartBuilder::on(&root)
            .caption("Outcomes (log scale)", ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..bars.len() as f64, (0.5f64..top).log_scale())
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = (x - 0.5).round();
                if (x - 0.5 - i).abs() < 0.01 && i >= 0.0 {
                    bars.get(i as usize)
                        .map_or(String::new(), |b| b.0.to_owned())
                } else {
                    String::new()
                }
            })
            .y_desc("tasks")
            .y_label_formatter(&|y| trim(*y))
            .draw()
            .map_err(e)?;
        chart
            .draw_series(
                bars.iter()
                    .enumerate()
                    .filter(|(_, b)| b.1 > 0)
                    .map(|(i, b)| {
                        Rectangle::new(
                            [(i as f64 + 0.15, 0.5), (i as f64 + 0.85, b.1 as f64)],
                            b.2.filled(),
                        )
                    }),
            )
            .map_err(e)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                Text::new(
                    b.1.to_string(),
                    (i as f64 + 0.4, (b.1 as f64).max(0.5) * 1.4),
                    ("sans-serif", 14),
                )
            }))
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

/// A number without float noise or a trailing `.0`.
fn trim(x: f64) -> String {
    let r = if x.abs() >= 100.0 {
        x.round()
    } else {
        (x * 1000.0).round() / 1000.0
    };
    let s = format!("{r}");
    s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The page.
pub fn render(r: &Report) -> Result<String> {
    let offered = r.mode.rate;
    let charts = [
        latency_chart(r)?,
        timeline_chart(
            r,
            "Throughput per second",
            "tasks ended /s",
            |t| t.completed as f64,
            offered,
        )?,
        timeline_chart(r, "p99 latency per second", "p99 (ms)", |t| t.p99_ms, None)?,
        outcomes_chart(r)?,
    ];
    let mut h = String::new();
    let verdict = if r.slo.pass { "PASS" } else { "FAIL" };
    let _ = write!(
        h,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>troupe-loadtest: {verdict}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px auto; max-width: 960px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
.pass {{ color: #1a7f37; font-weight: bold; }} .fail {{ color: #c62828; font-weight: bold; }}
.na {{ color: #777; }} figure {{ margin: 12px 0; }}
</style></head><body>
<h1>troupe-loadtest <span class="{cls}">{verdict}</span></h1>
<p>{target} · mix <code>{mix}</code> · {mode} · {dur}s measured after {warm}s warm-up · started {started}</p>
"#,
        cls = if r.slo.pass { "pass" } else { "fail" },
        target = esc(&r.target),
        mix = esc(&r.mix),
        mode = match (r.mode.rate, r.mode.concurrency) {
            (Some(rate), _) => format!("open loop at {} tasks/s", trim(rate)),
            (_, Some(c)) => format!("closed loop, {c} clients"),
            _ => String::new(),
        },
        dur = trim(r.duration_s),
        warm = trim(r.warmup_s),
        started = esc(&r.started_at),
    );
    h.push_str("<h2>SLO</h2><table><tr><th>objective</th><th>promise</th><th>measured</th><th>limit</th><th>verdict</th></tr>\n");
    for c in &r.slo.checks {
        let (cls, word) = match c.status {
            Status::Pass => ("pass", "pass"),
            Status::Fail => ("fail", "FAIL"),
            Status::NotMeasured => ("na", "not measured"),
        };
        let fmt =
            |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{} {}", trim(v), c.unit));
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{cls}\" title=\"{}\">{word}</td></tr>",
            esc(&c.name),
            esc(&c.objective),
            fmt(c.measured),
            fmt(c.limit),
            esc(&c.note)
        );
    }
    let t = &r.tasks;
    let _ = write!(
        h,
        "</table><p>policy: {}</p>\n<h2>Tasks</h2><table><tr><th>offered</th><th>offered/s</th><th>achieved/s</th><th>ok</th><th>error</th><th>timeout</th><th>panic</th><th>cancelled</th><th>rejected</th><th>transport errors</th><th>error ratio</th></tr>\n<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}%</td></tr></table>\n",
        esc(&r.slo.policy),
        t.outcomes.offered,
        trim(t.offered_per_s),
        trim(t.achieved_per_s),
        t.outcomes.ok,
        t.outcomes.error,
        t.outcomes.timeout,
        t.outcomes.panic,
        t.outcomes.cancelled,
        t.outcomes.rejected,
        t.outcomes.transport_error,
        t.error_ratio * 100.0
    );
    let _ = writeln!(h, "<figure>{}</figure>", charts[0]);
    h.push_str("<table><tr><th>latency (ms)</th><th>count</th><th>p50</th><th>p90</th><th>p95</th><th>p99</th><th>p99.9</th><th>max</th></tr>\n");
    let rows = std::iter::once(("all".to_owned(), &r.latency.overall))
        .chain(
            r.latency
                .by_priority
                .iter()
                .map(|p| (p.priority.as_str().to_owned(), &p.latency)),
        )
        .chain(
            r.entries
                .iter()
                .map(|e| (format!("entry {}", e.name), &e.latency)),
        );
    for (label, p) in rows {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
            esc(&label),
            p.count,
            p.p50_ms,
            p.p90_ms,
            p.p95_ms,
            p.p99_ms,
            p.p999_ms,
            p.max_ms
        );
    }
    h.push_str("</table>\n");
    let _ = writeln!(
        h,
        "<figure>{}</figure>\n<figure>{}</figure>\n<figure>{}</figure>",
        charts[1], charts[2], charts[3]
    );
    if r.bus.offered > 0 {
        let b = &r.bus;
        let _ = writeln!(
            h,
            "<h2>Bus</h2><table><tr><th>offered</th><th>offered/s</th><th>accepted/s</th><th>deliveries/s</th><th>dropped</th><th>failed</th></tr><tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
            b.offered,
            trim(b.offered_per_s),
            trim(b.accepted_per_s),
            trim(b.delivered_per_s),
            b.dropped,
            b.failed
        );
    }
    if let Some(ramp) = &r.ramp {
        h.push_str("<h2>Ramp</h2><table><tr><th>offered/s</th><th>achieved/s</th><th>p95 ms</th><th>p99 ms</th><th>errors</th><th>rejected</th><th>verdict</th></tr>\n");
        for s in &ramp.steps {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.4}%</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                trim(s.rate),
                trim(s.achieved_per_s),
                s.p95_ms,
                s.p99_ms,
                s.error_ratio * 100.0,
                s.rejected,
                if s.pass { "pass" } else { "fail" },
                if s.pass { "pass" } else { "FAIL" }
            );
        }
        let _ = writeln!(
            h,
            "</table><p>Highest rate meeting the SLO: <b>{}</b>.</p>",
            ramp.best_rate
                .map_or("none".to_owned(), |b| format!("{} tasks/s", trim(b)))
        );
    }
    h.push_str("</body></html>\n");
    Ok(h)
}
