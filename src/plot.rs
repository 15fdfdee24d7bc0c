//! The plots of an analysis, drawn once as a list of shapes and written both as SVG and as a
//! PNG rasterised by tiny-skia, the text set in an embedded font (a DejaVu Sans subset,
//! assets/) that the SVG names too: the same labels, the same places, on every machine.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use tiny_skia::{Paint, PathBuilder, Pixmap, PremultipliedColorU8, Stroke, Transform};

use crate::analyze::{AnalysisReport, TensorProfile};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }
}

const WHITE: Rgb = Rgb(255, 255, 255);
const BLACK: Rgb = Rgb(0, 0, 0);
const GREY: Rgb = Rgb(200, 200, 200);
/// Module types in turn (Tableau 10).
const PALETTE: [Rgb; 10] = [
    Rgb(31, 119, 180),
    Rgb(255, 127, 14),
    Rgb(44, 160, 44),
    Rgb(214, 39, 40),
    Rgb(148, 103, 189),
    Rgb(140, 86, 75),
    Rgb(227, 119, 194),
    Rgb(127, 127, 127),
    Rgb(188, 189, 34),
    Rgb(23, 190, 207),
];

#[derive(Clone, Debug)]
enum Shape {
    Rect {
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: Rgb,
    },
    Line {
        points: Vec<(f64, f64)>,
        color: Rgb,
        width: f64,
    },
    /// `anchor`: 0 start, 1 middle, 2 end.
    Text {
        x: f64,
        y: f64,
        size: f64,
        text: String,
        color: Rgb,
        anchor: u8,
    },
}

pub struct Figure {
    w: usize,
    h: usize,
    shapes: Vec<Shape>,
}

impl Figure {
    fn new(w: usize, h: usize) -> Figure {
        let mut f = Figure {
            w,
            h,
            shapes: Vec::new(),
        };
        f.rect(0.0, 0.0, w as f64, h as f64, WHITE);
        f
    }
    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: Rgb) {
        self.shapes.push(Shape::Rect { x, y, w, h, fill });
    }
    fn line(&mut self, points: Vec<(f64, f64)>, color: Rgb, width: f64) {
        self.shapes.push(Shape::Line {
            points,
            color,
            width,
        });
    }
    fn text(&mut self, x: f64, y: f64, size: f64, text: impl Into<String>, color: Rgb, anchor: u8) {
        self.shapes.push(Shape::Text {
            x,
            y,
            size,
            text: text.into(),
            color,
            anchor,
        });
    }

    pub fn svg(&self) -> String {
        use std::fmt::Write as _;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" font-family=\"DejaVu Sans, sans-serif\">\n",
            self.w, self.h, self.w, self.h
        );
        for sh in &self.shapes {
            match sh {
                Shape::Rect { x, y, w, h, fill } => {
                    let _ = writeln!(s, "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{}\"/>", fill.hex());
                }
                Shape::Line {
                    points,
                    color,
                    width,
                } => {
                    let pts: Vec<String> = points
                        .iter()
                        .map(|(x, y)| format!("{x:.1},{y:.1}"))
                        .collect();
                    let _ = writeln!(s, "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{width}\"/>", pts.join(" "), color.hex());
                }
                Shape::Text {
                    x,
                    y,
                    size,
                    text,
                    color,
                    anchor,
                } => {
                    let a = ["start", "middle", "end"][*anchor as usize];
                    let esc = text
                        .replace('&', "&amp;")
                        .replace('<', "&lt;")
                        .replace('>', "&gt;");
                    let _ = writeln!(s, "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" fill=\"{}\" text-anchor=\"{a}\">{esc}</text>", color.hex());
                }
            }
        }
        s.push_str("</svg>\n");
        s
    }

    /// The same drawing rasterised (tiny-skia: anti-aliased shapes; the text set in the
    /// embedded font with ab_glyph, placed as the SVG places it), as a compressed PNG.
    pub fn png(&self) -> crate::Result<Vec<u8>> {
        let broken = |what: String| crate::Error::Internal(format!("plot: {what}"));
        let font =
            FontRef::try_from_slice(FONT).map_err(|e| broken(format!("the embedded font: {e}")))?;
        let mut pixmap = Pixmap::new(self.w as u32, self.h as u32)
            .ok_or_else(|| broken(format!("no pixels in {}×{}", self.w, self.h)))?;
        pixmap.fill(tiny_skia::Color::WHITE);
        for shape in &self.shapes {
            match shape {
                Shape::Rect { x, y, w, h, fill } => {
                    let rect =
                        tiny_skia::Rect::from_xywh(*x as f32, *y as f32, *w as f32, *h as f32);
                    if let Some(rect) = rect {
                        pixmap.fill_rect(rect, &paint(*fill), Transform::identity(), None);
                    }
                }
                Shape::Line {
                    points,
                    color,
                    width,
                } => {
                    let mut path = PathBuilder::new();
                    for (i, &(x, y)) in points.iter().enumerate() {
                        if i == 0 {
                            path.move_to(x as f32, y as f32);
                        } else {
                            path.line_to(x as f32, y as f32);
                        }
                    }
                    let stroke = Stroke {
                        width: *width as f32,
                        line_join: tiny_skia::LineJoin::Round,
                        ..Stroke::default()
                    };
                    if let Some(path) = path.finish() {
                        pixmap.stroke_path(
                            &path,
                            &paint(*color),
                            &stroke,
                            Transform::identity(),
                            None,
                        );
                    }
                }
                Shape::Text {
                    x,
                    y,
                    size,
                    text,
                    color,
                    anchor,
                } => draw_text(&mut pixmap, &font, (*x, *y), *size, text, *color, *anchor),
            }
        }
        pixmap
            .encode_png()
            .map_err(|e| broken(format!("PNG encoding: {e}")))
    }
}

/// The font every label is set in (the SVG names it too).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

fn paint(c: Rgb) -> Paint<'static> {
    let mut p = Paint::default();
    p.set_color_rgba8(c.0, c.1, c.2, 255);
    p.anti_alias = true;
    p
}

/// `text` at (x, baseline y), `size` px to the em as SVG's font-size, anchored at its start,
/// middle or end (`anchor` 0, 1, 2), kerned; each glyph's coverage blended over the pixels.
fn draw_text(
    pixmap: &mut Pixmap,
    font: &FontRef<'_>,
    (x, y): (f64, f64),
    size: f64,
    text: &str,
    color: Rgb,
    anchor: u8,
) {
    let em = font.units_per_em().unwrap_or(2048.0);
    let scaled = font.as_scaled(PxScale::from(size as f32 * font.height_unscaled() / em));
    let mut glyphs = Vec::new();
    let mut caret = 0f32;
    let mut previous = None;
    for c in text.chars() {
        let id = font.glyph_id(c);
        if let Some(p) = previous {
            caret += scaled.kern(p, id);
        }
        glyphs.push((id, caret));
        caret += scaled.h_advance(id);
        previous = Some(id);
    }
    let start = x as f32 - [0.0, caret / 2.0, caret][usize::from(anchor.min(2))];
    let (w, h) = (pixmap.width() as i32, pixmap.height() as i32);
    let pixels = pixmap.pixels_mut();
    for (id, at) in glyphs {
        let glyph = id.with_scale_and_position(scaled.scale(), point(start + at, y as f32));
        let Some(outline) = font.outline_glyph(glyph) else {
            continue; // a space
        };
        let bounds = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let (px, py) = (
                bounds.min.x as i32 + gx as i32,
                bounds.min.y as i32 + gy as i32,
            );
            if (0..w).contains(&px) && (0..h).contains(&py) {
                let pixel = &mut pixels[(py * w + px) as usize];
                let a = coverage.clamp(0.0, 1.0);
                let mix = |old: u8, new: u8| {
                    (f32::from(old) * (1.0 - a) + f32::from(new) * a).round() as u8
                };
                *pixel = PremultipliedColorU8::from_rgba(
                    mix(pixel.red(), color.0),
                    mix(pixel.green(), color.1),
                    mix(pixel.blue(), color.2),
                    255,
                )
                .expect("opaque colours are valid");
            }
        });
    }
}

/// E_r against r (log scale), one line per tensor (thin) and per module type's mean (thick).
pub fn energy_curves(r: &AnalysisReport) -> Figure {
    let (w, h) = (760usize, 460usize);
    let (l, t, pw, ph) = (60.0, 40.0, 500.0, 360.0);
    let mut f = Figure::new(w, h);
    let max_r = r
        .tensors
        .iter()
        .map(|t| t.curve.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let xs = |k: usize| l + pw * (k as f64).ln() / (max_r as f64).ln();
    let ys = |e: f64| t + ph * (1.0 - e);
    f.text(
        l + pw / 2.0,
        24.0,
        14.0,
        "preserved energy E_r by rank",
        BLACK,
        1,
    );
    for e in [0.0, 0.25, 0.5, 0.75, 1.0] {
        f.line(vec![(l, ys(e)), (l + pw, ys(e))], GREY, 1.0);
        f.text(l - 6.0, ys(e) + 4.0, 11.0, format!("{e:.2}"), BLACK, 2);
    }
    let mut k = 1;
    while k <= max_r {
        f.line(vec![(xs(k), t), (xs(k), t + ph)], GREY, 1.0);
        f.text(xs(k), t + ph + 16.0, 11.0, k.to_string(), BLACK, 1);
        k *= 4;
    }
    f.text(l + pw / 2.0, t + ph + 34.0, 12.0, "rank r", BLACK, 1);
    let types = module_types(&r.tensors);
    for (i, ty) in types.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let of: Vec<&TensorProfile> = r.tensors.iter().filter(|t| &t.module_type == ty).collect();
        for tp in &of {
            let pts: Vec<(f64, f64)> = tp
                .curve
                .iter()
                .enumerate()
                .map(|(j, &e)| (xs(j + 1), ys(e)))
                .collect();
            if pts.len() > 1 {
                f.line(pts, lighter(color), 1.0);
            }
        }
        let len = of.iter().map(|t| t.curve.len()).min().unwrap_or(0);
        let mean: Vec<(f64, f64)> = (0..len)
            .map(|j| {
                (
                    xs(j + 1),
                    ys(of.iter().map(|t| t.curve[j]).sum::<f64>() / of.len() as f64),
                )
            })
            .collect();
        if mean.len() > 1 {
            f.line(mean, color, 3.0);
        }
        let y = t + 10.0 + 20.0 * i as f64;
        f.rect(l + pw + 20.0, y - 9.0, 14.0, 10.0, color);
        f.text(l + pw + 40.0, y, 12.0, ty.clone(), BLACK, 0);
    }
    f
}

/// Layers × module types, the colour the rank needed for the heatmap's energy.
pub fn rank_heatmap(r: &AnalysisReport) -> Figure {
    let key = format!("{}", r.heatmap_energy);
    heatmap(
        &r.tensors,
        format!("rank needed for E_r >= {key}"),
        r.cap,
        |tp| tp.rank_for.get(&key).copied().flatten(),
    )
}

/// Layers × module types, the colour the rank a budget rule allocates (`analyze --budget`).
pub fn allocation_heatmap(r: &AnalysisReport, a: &crate::report::BudgetAllocation) -> Figure {
    let ranks = a.rank_map();
    heatmap(
        &r.tensors,
        format!(
            "--budget {} --rank-rule {} (floor {}; uniform would be {})",
            a.params,
            a.rule.as_str(),
            a.min_rank,
            a.uniform_rank
        ),
        r.cap,
        |tp| ranks.get(&tp.name).copied(),
    )
}

/// Layers × module types, each cell coloured by a rank on a log scale up to `cap` (grey and
/// ">cap" where `rank_of` has none).
fn heatmap(
    tensors: &[TensorProfile],
    title: String,
    cap: usize,
    rank_of: impl Fn(&TensorProfile) -> Option<usize>,
) -> Figure {
    let types = module_types(tensors);
    let mut layers: Vec<Option<usize>> = tensors.iter().map(|t| t.layer).collect();
    layers.sort();
    layers.dedup();
    // Cells wide enough for the longest module label at 10 px (DejaVu Sans averages ~6 px a
    // character there, 6.6 for the widest lower-case runs).
    let longest = types.iter().map(|t| t.chars().count()).max().unwrap_or(0);
    let (cw, ch) = ((6.6 * longest as f64 + 10.0).max(66.0), 24.0);
    let (l, t) = (90.0, 60.0);
    let w = (l + cw * types.len() as f64 + 120.0) as usize;
    let h = (t + ch * layers.len() as f64 + 40.0).max(260.0) as usize;
    let mut f = Figure::new(w, h);
    f.text(l, 24.0, 14.0, title, BLACK, 0);
    let top = cap;
    let cap = cap.max(2) as f64;
    let colour = |rank: Option<usize>| match rank {
        Some(k) => viridis(((k.max(1) as f64).ln() / cap.ln()).clamp(0.0, 1.0)),
        None => Rgb(60, 60, 60),
    };
    for (j, ty) in types.iter().enumerate() {
        f.text(
            l + cw * (j as f64 + 0.5),
            t - 8.0,
            10.0,
            ty.clone(),
            BLACK,
            1,
        );
    }
    for (i, layer) in layers.iter().enumerate() {
        let y = t + ch * i as f64;
        f.text(
            l - 8.0,
            y + ch * 0.65,
            11.0,
            layer.map_or("other".into(), |v| format!("layer {v}")),
            BLACK,
            2,
        );
        for (j, ty) in types.iter().enumerate() {
            let x = l + cw * j as f64;
            if let Some(tp) = tensors
                .iter()
                .find(|tp| tp.layer == *layer && &tp.module_type == ty)
            {
                let rank = rank_of(tp);
                f.rect(x + 1.0, y + 1.0, cw - 2.0, ch - 2.0, colour(rank));
                let label = rank.map_or(format!(">{top}"), |k| k.to_string());
                let ink = if rank.is_some_and(|k| (k.max(1) as f64).ln() / cap.ln() > 0.6) {
                    BLACK
                } else {
                    WHITE
                };
                f.text(x + cw / 2.0, y + ch * 0.7, 10.0, label, ink, 1);
            }
        }
    }
    // The colour scale.
    let sx = l + cw * types.len() as f64 + 30.0;
    for k in 0..100 {
        let v = 1.0 - k as f64 / 100.0;
        f.rect(sx, t + 1.6 * k as f64, 16.0, 1.7, viridis(v));
    }
    f.text(sx + 22.0, t + 8.0, 11.0, format!("{top}"), BLACK, 0);
    f.text(
        sx + 22.0,
        t + 80.0,
        11.0,
        format!("{}", cap.sqrt().round()),
        BLACK,
        0,
    );
    f.text(sx + 22.0, t + 160.0, 11.0, "1", BLACK, 0);
    f.rect(sx, t + 175.0, 16.0, 10.0, Rgb(60, 60, 60));
    f.text(sx + 22.0, t + 184.0, 11.0, format!("> {top}"), BLACK, 0);
    f
}

fn module_types(tensors: &[TensorProfile]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for t in tensors {
        if !v.contains(&t.module_type) {
            v.push(t.module_type.clone());
        }
    }
    v
}

fn lighter(c: Rgb) -> Rgb {
    let m = |x: u8| (x as u16 + (255 - x as u16) * 2 / 3) as u8;
    Rgb(m(c.0), m(c.1), m(c.2))
}

/// Five stops of matplotlib's viridis, linearly interpolated; v in [0, 1].
fn viridis(v: f64) -> Rgb {
    const S: [(f64, f64, f64); 5] = [
        (68., 1., 84.),
        (59., 82., 139.),
        (33., 145., 140.),
        (94., 201., 98.),
        (253., 231., 37.),
    ];
    let x = v.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let t = x - i as f64;
    let mix = |a: f64, b: f64| (a + t * (b - a)).round() as u8;
    Rgb(
        mix(S[i].0, S[i + 1].0),
        mix(S[i].1, S[i + 1].1),
        mix(S[i].2, S[i + 1].2),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_png_draws_the_shapes_and_real_text() {
        let mut f = Figure::new(120, 40);
        f.rect(0.0, 0.0, 120.0, 10.0, Rgb(10, 20, 30));
        f.text(4.0, 32.0, 16.0, "embed_tokens", BLACK, 0);
        let png = f.png().unwrap();
        let img = tiny_skia::Pixmap::decode_png(&png).unwrap();
        assert_eq!((img.width(), img.height()), (120, 40));
        let at = |x: u32, y: u32| {
            let p = img.pixel(x, y).unwrap();
            (p.red(), p.green(), p.blue())
        };
        assert_eq!(at(60, 5), (10, 20, 30));
        assert_eq!(at(118, 38), (255, 255, 255));
        // The label is drawn: dark pixels under its baseline's line, across most of its width.
        let inked: Vec<u32> = (0..120)
            .filter(|&x| (20..34).any(|y| at(x, y).0 < 128))
            .collect();
        assert!(inked.len() > 40, "{} inked columns", inked.len());
        assert!(
            *inked.last().unwrap() > 80,
            "the label ends at x = {:?}",
            inked.last()
        );
    }
}
