//! `coordinator report RUN_DIR [--out FILE.png]`: the run's curves as a
//! picture — train and validation loss on the left axis, the learning rate
//! on the right one, against the step; every resume, extension and
//! automatic restart is a labelled vertical line.
//!
//! `coordinator report RUN_A RUN_B … [--metric M] [--json]` puts several
//! runs (branches of one checkpoint, say) on one chart, one colour per run
//! named in the legend: train loss as a line, validation loss as a line
//! with dots, the LR on the right axis as a thin line, each run's events
//! marked in its colour. `--metric loss|val_loss|lr|grad_norm|tokens_per_s`
//! draws only that metric, one line per run. Several runs are written to
//! `compare.png` in the current directory unless `--out` says otherwise:
//! a comparison belongs to none of the runs, and report writes nothing
//! inside them. `--json` prints each run's best validation loss and its
//! step, its final losses and the tokens it saw (and draws only with
//! `--out`).
//!
//! The input is `metrics.jsonl` alone (it survives every resume: each
//! coordinator appends to it). When steps were run more than once (a
//! restart or a resume from an earlier checkpoint re-runs them), the curve
//! shows the last run of each step: the history of the weights that
//! survived. The font is DejaVu Sans compiled into the binary, so the
//! report renders the same on a headless node as on a laptop.
//!
//! Its length (~740 lines before its tests) is one command's: reading
//! `metrics.jsonl` and drawing it share the run and event types.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use stride_job::names::UnknownName;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Deserialize;

/// Default image size (pixels).
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 700;

/// One step's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub loss: f64,
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Tokens trained on up to and including this step.
    pub tokens: Option<u64>,
}

/// What `--metric` draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Loss,
    ValLoss,
    Lr,
    GradNorm,
    TokensPerS,
}

impl Metric {
    pub const NAMES: &'static str = "loss, val_loss, lr, grad_norm, tokens_per_s";

    fn name(self) -> &'static str {
        match self {
            Metric::Loss => "loss",
            Metric::ValLoss => "val_loss",
            Metric::Lr => "lr",
            Metric::GradNorm => "grad_norm",
            Metric::TokensPerS => "tokens_per_s",
        }
    }

    fn of(self, p: &Point) -> Option<f64> {
        match self {
            Metric::Loss => Some(p.loss),
            Metric::ValLoss => p.val_loss,
            Metric::Lr => Some(p.lr),
            Metric::GradNorm => p.grad_norm,
            Metric::TokensPerS => p.tokens_per_s,
        }
    }
}

impl std::str::FromStr for Metric {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Metric, UnknownName> {
        [
            Metric::Loss,
            Metric::ValLoss,
            Metric::Lr,
            Metric::GradNorm,
            Metric::TokensPerS,
        ]
        .into_iter()
        .find(|m| m.name() == s)
        .ok_or_else(|| UnknownName::new("metric", s, format!("use one of {}", Metric::NAMES)))
    }
}

/// A vertical line: where a run resumed, was extended or restarted.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub step: u64,
    pub label: String,
}

/// What `metrics.jsonl` says, ready to draw.
#[derive(Debug, Default)]
pub struct Curves {
    pub steps: BTreeMap<u64, Point>,
    pub markers: Vec<Marker>,
}

#[derive(Deserialize)]
struct Line {
    step: Option<u64>,
    event: Option<String>,
    loss: Option<f64>,
    val_loss: Option<f64>,
    lr: Option<f64>,
    grad_norm: Option<f64>,
    tokens_per_s: Option<f64>,
    tokens: Option<u64>,
    previous_max_steps: Option<u64>,
    max_steps: Option<u64>,
    restart: Option<u64>,
    shape: Option<String>,
    branched_from: Option<String>,
}

/// A run directory `report` cannot draw (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRun(String);

/// Reads a run's `metrics.jsonl`.
pub fn read(run_dir: &Path) -> Result<Curves> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        BadRun(format!(
            "cannot read {}: {e}; RUN_DIR must be a run directory such as runs/tiny",
            path.display()
        ))
    })?;
    parse(&text).map_err(|e| BadRun(format!("{}: {e:#}", path.display())).into())
}

/// Parses the lines of a `metrics.jsonl`.
pub fn parse(text: &str) -> Result<Curves> {
    let mut c = Curves::default();
    let lines = text.lines().count();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        // A last line without its newline was torn by a crash (the next
        // start of the run cuts it): skipped, not an error.
        let torn = i + 1 == lines && !text.ends_with('\n');
        let l: Line = match serde_json::from_str(raw) {
            Ok(l) => l,
            Err(_) if torn => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("line {} is not a metrics record", i + 1));
            }
        };
        let Some(step) = l.step else { continue };
        match l.event.as_deref() {
            None => {
                if let (Some(loss), Some(lr)) = (l.loss, l.lr) {
                    c.steps.insert(
                        step,
                        Point {
                            loss,
                            val_loss: l.val_loss,
                            lr,
                            grad_norm: l.grad_norm,
                            tokens_per_s: l.tokens_per_s,
                            tokens: l.tokens,
                        },
                    );
                }
            }
            Some("resume") => {
                let mut label = match (l.previous_max_steps, l.max_steps) {
                    (Some(a), Some(b)) if a < b => format!("extend {a}→{b}"),
                    (Some(a), Some(b)) if a > b => format!("end {a}→{b}"),
                    _ => "resume".to_string(),
                };
                if l.branched_from.is_some() {
                    label = format!("branch, {label}");
                }
                c.markers.push(Marker { step, label });
            }
            Some("decay") => c.markers.push(Marker {
                step,
                label: format!(
                    "decay ({}) →{}",
                    l.shape.as_deref().unwrap_or("?"),
                    l.max_steps.unwrap_or(step)
                ),
            }),
            Some("restart") => c.markers.push(Marker {
                step,
                label: format!("restart {}", l.restart.unwrap_or(0)),
            }),
            Some(other) => c.markers.push(Marker {
                step,
                label: other.to_string(),
            }),
        }
    }
    if c.steps.is_empty() {
        bail!("no step has been recorded yet");
    }
    Ok(c)
}

/// Where the PNG goes by default: `RUN_DIR/report.png`.
pub fn default_out(run_dir: &Path) -> PathBuf {
    run_dir.join("report.png")
}

/// Where the PNG of several runs goes by default (see the module doc).
pub const COMPARE_OUT: &str = "compare.png";

/// What part of the curves a chart shows: the steps (`--steps A..B`,
/// all by default) and the left axis's range (`--ylim LO..HI`; by
/// default chosen from the data shown, see [`y_range`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct View {
    pub steps: Option<(Option<u64>, Option<u64>)>,
    pub ylim: Option<(f64, f64)>,
}

impl View {
    fn shows(&self, step: u64) -> bool {
        match self.steps {
            None => true,
            Some((from, to)) => from.is_none_or(|a| step >= a) && to.is_none_or(|b| step <= b),
        }
    }
}

/// `A..B`, `A..` or `..B` (steps, inclusive) for `--steps`.
pub fn parse_steps(s: &str) -> Result<(Option<u64>, Option<u64>), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}` is not a step range such as 200..400, 200.. or ..400"))?;
    let num = |x: &str| -> Result<Option<u64>, String> {
        if x.is_empty() {
            return Ok(None);
        }
        x.parse()
            .map(Some)
            .map_err(|_| format!("`{x}` in `{s}` is not a step"))
    };
    let (a, b) = (num(a)?, num(b)?);
    if let (Some(x), Some(y)) = (a, b)
        && x > y
    {
        return Err(format!("`{s}`: the range ends before it starts"));
    }
    Ok((a, b))
}

/// `LO..HI` for `--ylim`.
pub fn parse_ylim(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}` is not a range such as 1.0..1.6"))?;
    let (lo, hi): (f64, f64) = (
        a.parse().map_err(|_| format!("`{a}` is not a number"))?,
        b.parse().map_err(|_| format!("`{b}` is not a number"))?,
    );
    if !(lo.is_finite() && hi.is_finite() && lo < hi) {
        return Err(format!("`{s}`: need finite LO < HI"));
    }
    Ok((lo, hi))
}

/// Draws `c` into a PNG of `size` pixels at `out`.
pub fn draw(c: &Curves, title: &str, out: &Path, size: (u32, u32), view: View) -> Result<()> {
    draw_with(out, size, |root| plot(root, c, title, view))
}

/// Draws named runs on one chart (all of them, or only `metric`).
pub fn draw_runs(
    runs: &[(String, Curves)],
    metric: Option<Metric>,
    title: &str,
    out: &Path,
    size: (u32, u32),
    view: View,
) -> Result<()> {
    draw_with(out, size, |root| plot_runs(root, runs, metric, title, view))
}

/// The left axis's range for `values` (step, value) when nothing asks
/// otherwise: from the lowest value shown to the highest one after the
/// first tenth of the steps shown, plus 5 %. The first steps of a run
/// (loss 4.8 falling to 1.3 within a hundred steps) would otherwise squeeze
/// every later curve — the part worth comparing — into a sliver.
pub fn y_range(values: &[(u64, f64)]) -> std::ops::Range<f64> {
    let finite: Vec<(u64, f64)> = values
        .iter()
        .copied()
        .filter(|(_, v)| v.is_finite())
        .collect();
    let (Some(first), Some(last)) = (
        finite.iter().map(|(s, _)| *s).min(),
        finite.iter().map(|(s, _)| *s).max(),
    ) else {
        return 0.0..1.0;
    };
    let settled = first + (last - first) / 10;
    let lo = finite.iter().map(|(_, v)| *v).fold(f64::INFINITY, f64::min);
    let hi = finite
        .iter()
        .filter(|(s, _)| *s >= settled)
        .map(|(_, v)| *v)
        .fold(f64::NEG_INFINITY, f64::max)
        .max(lo);
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-12);
    (lo - pad)..(hi + pad)
}

/// One entry of a legend drawn beside the chart.
struct Entry {
    label: String,
    colour: RGBColor,
    width: u32,
    dot: bool,
}

/// The legend in its own panel, right of the chart, so that it never hides
/// a curve, a point or an event label.
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[Entry],
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    let font = ("sans-serif", 15).into_font();
    for (i, e) in entries.iter().enumerate() {
        let y = 60 + 24 * i as i32;
        area.draw(&PathElement::new(
            [(8, y), (34, y)],
            e.colour.stroke_width(e.width),
        ))?;
        if e.dot {
            area.draw(&Circle::new((21, y), 4, e.colour.filled()))?;
        }
        area.draw(&Text::new(e.label.clone(), (42, y - 8), font.clone()))?;
    }
    Ok(())
}

/// Width of the legend panel for `entries`.
fn legend_width(entries: &[Entry], width: u32) -> u32 {
    let longest = entries
        .iter()
        .map(|e| e.label.chars().count())
        .max()
        .unwrap_or(0) as u32;
    (50 + 8 * longest).clamp(120, width / 3)
}

fn draw_with(
    out: &Path,
    size: (u32, u32),
    plot: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> DrawResult<()>,
) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(out, size).into_drawing_area();
    plot(&root).map_err(|e| anyhow::anyhow!("cannot draw the report: {e}"))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    Ok(())
}

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    anyhow::ensure!(ok, "the bundled DejaVu Sans font did not load");
    Ok(())
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn plot<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    c: &Curves,
    title: &str,
    view: View,
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let shown: Vec<(u64, Point)> = c
        .steps
        .iter()
        .filter(|(s, _)| view.shows(**s))
        .map(|(s, p)| (*s, *p))
        .collect();
    let first = shown.first().map_or(0, |(s, _)| *s);
    let last = shown.last().map_or(0, |(s, _)| *s);
    let x_end = last.max(first + 1) + 1;
    let losses: Vec<(u64, f64)> = shown
        .iter()
        .flat_map(|(s, p)| std::iter::once((*s, p.loss)).chain(p.val_loss.map(|v| (*s, v))))
        .collect();
    let y = view
        .ylim
        .map_or_else(|| y_range(&losses), |(lo, hi)| lo..hi);
    let lr_max = shown
        .iter()
        .map(|(_, p)| p.lr)
        .fold(0.0, f64::max)
        .max(1e-12)
        * 1.1;
    let (train, val, lr) = (
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
    );
    let marker = RGBColor(120, 120, 120);
    let entries = [
        Entry {
            label: "train loss".into(),
            colour: train,
            width: 2,
            dot: false,
        },
        Entry {
            label: "val loss".into(),
            colour: val,
            width: 2,
            dot: true,
        },
        Entry {
            label: "learning rate (right axis)".into(),
            colour: lr,
            width: 2,
            dot: false,
        },
    ];
    let (w, _) = root.dim_in_pixel();
    let (chart_area, legend_area) = root.split_horizontally(w - legend_width(&entries, w));
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .right_y_label_area_size(80)
        .build_cartesian_2d(first..x_end, y)?
        .set_secondary_coord(first..x_end, 0.0..lr_max);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (nats/token)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("learning rate")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    chart.draw_series(LineSeries::new(
        shown.iter().map(|(s, p)| (*s, p.loss)),
        train.stroke_width(2),
    ))?;
    let vals: Vec<(u64, f64)> = shown
        .iter()
        .filter_map(|(s, p)| p.val_loss.map(|v| (*s, v)))
        .collect();
    chart.draw_series(LineSeries::new(vals.iter().copied(), val.stroke_width(2)))?;
    chart.draw_series(
        vals.iter()
            .map(|(s, v)| Circle::new((*s, *v), 4, val.filled())),
    )?;
    chart.draw_secondary_series(LineSeries::new(
        shown.iter().map(|(s, p)| (*s, p.lr)),
        lr.stroke_width(2),
    ))?;
    for m in c.markers.iter().filter(|m| view.shows(m.step)) {
        chart.draw_secondary_series(LineSeries::new(
            [(m.step, 0.0), (m.step, lr_max)],
            marker.stroke_width(2),
        ))?;
        chart.draw_secondary_series(std::iter::once(Text::new(
            format!(" {} @ {}", m.label, m.step),
            (m.step, lr_max * 0.97),
            ("sans-serif", 15).into_font().color(&marker),
        )))?;
    }
    legend(&legend_area, &entries)
}

/// One colour per run (matplotlib's tab10, which is made to be told apart).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn plot_runs<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[(String, Curves)],
    metric: Option<Metric>,
    title: &str,
    view: View,
) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let all = || {
        runs.iter()
            .flat_map(|(_, c)| c.steps.iter())
            .filter(|(s, _)| view.shows(**s))
    };
    let first = all().map(|(s, _)| *s).min().unwrap_or(0);
    let last = all().map(|(s, _)| *s).max().unwrap_or(0);
    let x_end = last.max(first + 1) + 1;
    let primary: Vec<Metric> = match metric {
        Some(m) => vec![m],
        None => vec![Metric::Loss, Metric::ValLoss],
    };
    // Where several runs share steps (branches of one checkpoint) is what a
    // comparison is for: the axis fits those steps when there are any.
    let mut runs_at: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, c) in runs {
        for s in c.steps.keys().filter(|s| view.shows(**s)) {
            *runs_at.entry(*s).or_default() += 1;
        }
    }
    let shared = runs_at.values().any(|n| *n > 1);
    let values: Vec<(u64, f64)> = all()
        .filter(|(s, _)| !shared || runs_at.get(s).is_some_and(|n| *n > 1))
        .flat_map(|(s, p)| primary.iter().filter_map(|m| m.of(p).map(|v| (*s, v))))
        .collect();
    let y = view
        .ylim
        .map_or_else(|| y_range(&values), |(lo, hi)| lo..hi);
    let lr_max = all().map(|(_, p)| p.lr).fold(0.0, f64::max).max(1e-12) * 1.1;
    let y_desc = match metric {
        None => "loss (nats/token)".to_string(),
        Some(m) => m.name().to_string(),
    };
    let mut entries = Vec::new();
    for (i, (name, _)) in runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        for m in &primary {
            let label = match (metric, m) {
                (None, Metric::ValLoss) => format!("{name}: val loss (dots)"),
                (None, _) => format!("{name}: train loss"),
                (Some(_), _) => name.clone(),
            };
            let dot = *m == Metric::ValLoss;
            entries.push(Entry {
                label,
                colour,
                width: if dot { 1 } else { 2 },
                dot,
            });
        }
    }
    if metric.is_none() {
        entries.push(Entry {
            label: "thin lines: learning rate (right axis)".into(),
            colour: RGBColor(120, 120, 120),
            width: 1,
            dot: false,
        });
    }
    let (w, _) = root.dim_in_pixel();
    let (chart_area, legend_area) = root.split_horizontally(w - legend_width(&entries, w));
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .right_y_label_area_size(if metric.is_none() { 80 } else { 0 })
        .build_cartesian_2d(first..x_end, y)?
        .set_secondary_coord(first..x_end, 0.0..lr_max);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_desc)
        .y_label_formatter(&|v| {
            if v.abs() >= 1e-2 && v.abs() < 1e5 {
                format!("{v:.3}")
            } else {
                format!("{v:.1e}")
            }
        })
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    if metric.is_none() {
        chart
            .configure_secondary_axes()
            .y_desc("learning rate (thin lines)")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()?;
    }
    for (i, (name, c)) in runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        for m in &primary {
            let points: Vec<(u64, f64)> = c
                .steps
                .iter()
                .filter(|(s, _)| view.shows(**s))
                .filter_map(|(s, p)| m.of(p).map(|v| (*s, v)))
                .collect();
            let width = if *m == Metric::ValLoss { 1 } else { 2 };
            chart.draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(width),
            ))?;
            if *m == Metric::ValLoss {
                chart.draw_series(
                    points
                        .iter()
                        .map(|(s, v)| Circle::new((*s, *v), 4, colour.filled())),
                )?;
            }
        }
        if metric.is_none() {
            chart.draw_secondary_series(LineSeries::new(
                c.steps
                    .iter()
                    .filter(|(s, _)| view.shows(**s))
                    .map(|(s, p)| (*s, p.lr)),
                colour.mix(0.6).stroke_width(1),
            ))?;
        }
        let short = Path::new(name)
            .file_name()
            .map_or(name.clone(), |n| n.to_string_lossy().into_owned());
        for (k, m) in c.markers.iter().filter(|m| view.shows(m.step)).enumerate() {
            let top = lr_max * (0.97 - 0.05 * ((i + k) % 8) as f64);
            chart.draw_secondary_series(LineSeries::new(
                [(m.step, 0.0), (m.step, lr_max)],
                colour.mix(0.5).stroke_width(1),
            ))?;
            // Labels right of a line in the left half, left of it in the
            // right half: never across the right axis.
            let right_half = m.step > first + (x_end - first) / 2;
            let (text, anchor) = if right_half {
                (format!("{short}: {} @ {} ", m.label, m.step), HPos::Right)
            } else {
                (format!(" {short}: {} @ {}", m.label, m.step), HPos::Left)
            };
            chart.draw_secondary_series(std::iter::once(Text::new(
                text,
                (m.step, top),
                ("sans-serif", 14)
                    .into_font()
                    .color(&colour)
                    .pos(Pos::new(anchor, VPos::Top)),
            )))?;
        }
    }
    legend(&legend_area, &entries)
}

/// Per run: the best validation loss and its step, the final train and
/// validation losses, the last step and the tokens seen (`--json`).
pub fn json_summary(runs: &[(String, Curves)]) -> serde_json::Value {
    let per_run = runs
        .iter()
        .map(|(name, c)| {
            let best = c
                .steps
                .iter()
                .filter_map(|(s, p)| p.val_loss.map(|v| (*s, v)))
                .min_by(|a, b| a.1.total_cmp(&b.1));
            let last = c.steps.iter().next_back();
            serde_json::json!({
                "run": name,
                "best_val_loss": best.map(|b| b.1),
                "best_val_step": best.map(|b| b.0),
                "final_step": last.map(|(s, _)| *s),
                "final_loss": last.map(|(_, p)| p.loss),
                "final_val_loss": c.steps.values().rev().find_map(|p| p.val_loss),
                "tokens": last.and_then(|(_, p)| p.tokens),
            })
        })
        .collect();
    serde_json::Value::Array(per_run)
}

/// A one-paragraph text summary printed next to the picture.
pub fn summary(c: &Curves, out: &Path) -> String {
    let (first, last) = (
        c.steps.keys().next().copied().unwrap_or(0),
        c.steps.keys().next_back().copied().unwrap_or(0),
    );
    let last_point = c.steps.values().next_back();
    let val = c
        .steps
        .values()
        .rev()
        .find_map(|p| p.val_loss)
        .map(|v| format!(", last val loss {v:.4}"))
        .unwrap_or_default();
    let mut s = format!(
        "steps {first}–{last}, last train loss {:.4}{val}\n",
        last_point.map_or(f64::NAN, |p| p.loss)
    );
    for m in &c.markers {
        s.push_str(&format!("  {} at step {}\n", m.label, m.step));
    }
    s.push_str(&format!("wrote {}\n", out.display()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"step":0,"loss":4.8,"lr":0.001,"grad_norm":1.0}
{"step":1,"loss":4.5,"val_loss":4.6,"lr":0.002,"grad_norm":1.0}
{"event":"resume","step":1,"previous_max_steps":2,"max_steps":4,"workers":2}
{"step":1,"loss":4.4,"val_loss":4.5,"lr":0.002,"grad_norm":1.0}
{"event":"restart","step":2,"restart":1,"reason":"rank 1 lost"}
{"step":2,"loss":4.0,"lr":0.001,"grad_norm":1.0}
"#;

    #[test]
    fn the_last_run_of_a_step_wins_and_events_become_markers() {
        let c = parse(LINES).expect("parses");
        assert_eq!(c.steps.len(), 3);
        assert_eq!(c.steps[&1].loss, 4.4);
        assert_eq!(c.steps[&1].val_loss, Some(4.5));
        assert_eq!(
            c.markers,
            vec![
                Marker {
                    step: 1,
                    label: "extend 2→4".into()
                },
                Marker {
                    step: 2,
                    label: "restart 1".into()
                },
            ]
        );
    }

    #[test]
    fn an_empty_or_foreign_file_is_a_clear_error() {
        let e = parse("").expect_err("empty");
        assert!(e.to_string().contains("no step"), "{e}");
        let e = parse("not json\n").expect_err("garbage");
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn several_runs_are_summarised_and_drawn_on_one_chart() {
        let other = LINES
            .replace("4.5,\"lr\"", "4.2,\"lr\"")
            .replace("\"grad_norm\":1.0}", "\"grad_norm\":1.0,\"tokens\":64}");
        let runs = vec![
            ("a".to_string(), parse(LINES).expect("a")),
            ("b".to_string(), parse(&other).expect("b")),
        ];
        let j = json_summary(&runs);
        assert_eq!(j[0]["run"], "a");
        assert_eq!(j[0]["best_val_loss"], 4.5);
        assert_eq!(j[0]["best_val_step"], 1);
        assert_eq!(j[0]["final_step"], 2);
        assert_eq!(j[0]["final_loss"], 4.0);
        assert_eq!(j[0]["final_val_loss"], 4.5);
        assert!(j[0]["tokens"].is_null());
        assert_eq!(j[1]["tokens"], 64);
        let dir = tempfile::tempdir().expect("tmp");
        for metric in [None, Some(Metric::GradNorm), Some(Metric::ValLoss)] {
            let out = dir.path().join("c.png");
            draw_runs(&runs, metric, "t", &out, (640, 400), View::default()).expect("draws");
            assert_eq!(
                &std::fs::read(&out).expect("png")[..8],
                b"\x89PNG\r\n\x1a\n"
            );
        }
        assert_eq!("tokens_per_s".parse::<Metric>(), Ok(Metric::TokensPerS));
        let e = "accuracy"
            .parse::<Metric>()
            .expect_err("unknown")
            .to_string();
        assert!(
            e.contains("loss, val_loss, lr, grad_norm, tokens_per_s"),
            "{e}"
        );
    }

    #[test]
    fn draws_a_png_of_the_asked_size() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("r.png");
        draw(
            &parse(LINES).expect("parses"),
            "t",
            &out,
            (640, 400),
            View::default(),
        )
        .expect("draws");
        let bytes = std::fs::read(&out).expect("png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, right after the chunk header.
        let be = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        assert_eq!(&bytes[12..16], b"IHDR");
        assert_eq!((be(16), be(20)), (640, 400));
    }

    /// The axis fits what is worth seeing: the first tenth of the steps (a
    /// loss falling from 4.8) does not set the top; several runs that share
    /// steps (branches) are fitted to those steps.
    #[test]
    fn the_y_range_follows_the_data_shown() {
        let mut values: Vec<(u64, f64)> = (0..100).map(|s| (s, 1.2 - s as f64 * 0.001)).collect();
        values[0].1 = 4.8;
        values[5].1 = 3.0;
        let r = y_range(&values);
        assert!(r.start < 1.101 && r.end < 1.22, "{r:?}");
        assert_eq!(parse_steps("200..400"), Ok((Some(200), Some(400))));
        assert_eq!(parse_steps("200.."), Ok((Some(200), None)));
        assert_eq!(parse_steps("..400"), Ok((None, Some(400))));
        assert!(parse_steps("400..200").is_err() && parse_steps("x").is_err());
        assert_eq!(parse_ylim("1.0..1.5"), Ok((1.0, 1.5)));
        assert!(parse_ylim("2..1").is_err() && parse_ylim("a..b").is_err());
        let v = View {
            steps: Some((Some(10), Some(20))),
            ylim: None,
        };
        assert!(v.shows(10) && v.shows(20) && !v.shows(9) && !v.shows(21));
    }

    /// A last line torn by a crash (no newline) is skipped; anywhere else
    /// a line that does not parse is an error.
    #[test]
    fn a_torn_last_line_is_skipped() {
        let torn = format!("{LINES}{{\"step\":3,\"loss\":3.");
        assert_eq!(parse(&torn).expect("parses").steps.len(), 3);
        let inside = format!("{{\"step\":3,\"loss\":3.\n{LINES}");
        assert!(parse(&inside).is_err());
    }
}
