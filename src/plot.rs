//! Plots as PNG (plotters), drawn with an embedded font: line charts over steps (training) and
//! grouped bar charts over categories (eval).

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use std::path::Path;

/// The font every label is drawn with, embedded so that plots need no system fonts (GPU nodes
/// often have none). DejaVu Sans, under its own free licence: data/fonts/DejaVuSans-LICENSE.txt.
/// Registered as plotters' default family, so axis labels and legends use it too.
const FONT_FAMILY: &str = "sans-serif";
static FONT_TTF: &[u8] = include_bytes!("../data/fonts/DejaVuSans.ttf");

fn register_embedded_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT_TTF).is_ok());
    if ok { Ok(()) } else { Err(anyhow!("the embedded plot font could not be parsed")) }
}

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLOURS: [RGBColor; 4] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];

/// Draws `series` into `path` (written atomically). Series without points are left out.
pub fn lines(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let series: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (x_max, y_min, y_max) = all().fold((1.0f64, f64::INFINITY, f64::NEG_INFINITY), |(x, lo, hi), &(px, py)| {
        (x.max(px), lo.min(py), hi.max(py))
    });
    let (y_min, y_max) = if y_min.is_finite() { (y_min, y_max) } else { (0.0, 1.0) };
    let pad = ((y_max - y_min) * 0.05).max(1e-6);
    draw(path, (800, 480), |root, fail| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT_FAMILY, 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))
            .map_err(|e| fail(&e))?;
        chart.configure_mesh().x_desc("step").y_desc(y_label).draw().map_err(|e| fail(&e))?;
        for (i, s) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), colour.stroke_width(2)))
                .map_err(|e| fail(&e))?
                .label(&s.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
            // Markers too, so a series of one point (a single evaluation) still shows.
            chart.draw_series(PointSeries::of_element(s.points.iter().copied(), 3, colour.filled(), &|c, size, style| {
                EmptyElement::at(c) + Circle::new((0, 0), size, style)
            })).map_err(|e| fail(&e))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| fail(&e))?;
        Ok(())
    })
}

/// One series of a bar chart: a value per category.
pub struct Bars {
    pub name: String,
    pub values: Vec<f64>,
}

/// Horizontal bars into `path`, one row per category, the series stacked left to right (win /
/// tie / loss shares; a single series is a plain bar chart).
pub fn stacked_bars(path: &Path, title: &str, x_label: &str, categories: &[String], series: &[Bars]) -> Result<()> {
    let n = categories.len().max(1) as u32;
    let totals: Vec<f64> = (0..categories.len()).map(|i| series.iter().map(|s| s.values[i]).sum()).collect();
    let x_max = totals.iter().copied().fold(0.0f64, f64::max).max(1e-6) * 1.05;
    let height = 120 + 36 * n;
    draw(path, (900, height), |root, fail| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT_FAMILY, 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(180)
            .build_cartesian_2d(0f64..x_max, (0..n).into_segmented())
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_labels(n as usize)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => categories.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| fail(&e))?;
        let mut start = vec![0.0; categories.len()];
        for (k, s) in series.iter().enumerate() {
            let colour = COLOURS[k % COLOURS.len()];
            let rects: Vec<_> = (0..categories.len())
                .map(|i| {
                    let (from, to) = (start[i], start[i] + s.values[i]);
                    start[i] = to;
                    let mut bar = Rectangle::new([(from, SegmentValue::Exact(i as u32)), (to, SegmentValue::Exact(i as u32 + 1))], colour.filled());
                    bar.set_margin(4, 4, 0, 0);
                    bar
                })
                .collect();
            chart
                .draw_series(rects)
                .map_err(|e| fail(&e))?
                .label(&s.name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled()));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| fail(&e))?;
        Ok(())
    })
}

type Root<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Draws a `size` PNG with `body` into a temporary, then renames it to `path`.
fn draw(path: &Path, size: (u32, u32), body: impl FnOnce(&Root, &dyn Fn(&dyn std::fmt::Display) -> anyhow::Error) -> Result<()>) -> Result<()> {
    register_embedded_font()?;
    // The temporary keeps a .png ending: the bitmap encoder picks the format by extension.
    let tmp = std::path::PathBuf::from(format!("{}.png", crate::run::temporary_sibling(path)?.display()));
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        let fail = |e: &dyn std::fmt::Display| anyhow!("{}: plot: {e}", path.display());
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        body(&root, &fail)?;
        root.present().map_err(|e| fail(&e))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}
