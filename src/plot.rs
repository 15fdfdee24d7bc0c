//! Two plots of an analysis, drawn once as a list of shapes and rendered both as SVG and as
//! PNG (a small rasterizer with a 5×7 bitmap font, and a PNG encoder with stored deflate
//! blocks: no image or font dependency).

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
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" font-family=\"sans-serif\">\n",
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

    pub fn png(&self) -> Vec<u8> {
        let mut px = vec![WHITE; self.w * self.h];
        let mut put = |x: i64, y: i64, c: Rgb| {
            if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
                px[y as usize * self.w + x as usize] = c;
            }
        };
        for sh in &self.shapes {
            match sh {
                Shape::Rect { x, y, w, h, fill } => {
                    for yy in (*y as i64)..((y + h).ceil() as i64) {
                        for xx in (*x as i64)..((x + w).ceil() as i64) {
                            put(xx, yy, *fill);
                        }
                    }
                }
                Shape::Line {
                    points,
                    color,
                    width,
                } => {
                    let r = ((width / 2.0).round() as i64).max(0);
                    for seg in points.windows(2) {
                        let ((x0, y0), (x1, y1)) = (seg[0], seg[1]);
                        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
                        for i in 0..=steps {
                            let t = i as f64 / steps as f64;
                            let (x, y) = (
                                (x0 + t * (x1 - x0)).round() as i64,
                                (y0 + t * (y1 - y0)).round() as i64,
                            );
                            for dy in -r..=r {
                                for dx in -r..=r {
                                    put(x + dx, y + dy, *color);
                                }
                            }
                        }
                    }
                }
                Shape::Text {
                    x,
                    y,
                    size,
                    text,
                    color,
                    anchor,
                } => {
                    // 5×7 glyphs in 6-pixel cells, scaled to about the SVG size.
                    let scale = ((size / 9.0).round() as i64).max(1);
                    let width = text.chars().count() as i64 * 6 * scale;
                    let x0 = *x as i64 - [0, width / 2, width][*anchor as usize];
                    let y0 = *y as i64 - 7 * scale;
                    for (k, ch) in text.chars().enumerate() {
                        let g = glyph(ch);
                        for (row, bits) in g.iter().enumerate() {
                            for col in 0..5 {
                                if bits & (0x10 >> col) != 0 {
                                    for sy in 0..scale {
                                        for sx in 0..scale {
                                            put(
                                                x0 + (k as i64 * 6 + col) * scale + sx,
                                                y0 + row as i64 * scale + sy,
                                                *color,
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut raw = Vec::with_capacity(self.h * (1 + 3 * self.w));
        for row in px.chunks(self.w) {
            raw.push(0); // filter: none
            for c in row {
                raw.extend_from_slice(&[c.0, c.1, c.2]);
            }
        }
        png_rgb(self.w as u32, self.h as u32, &raw)
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
    // Cells wide enough for a 10-character label under the 5×7 font.
    let (cw, ch) = (66.0, 24.0);
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
        let label: String = ty.chars().take(10).collect();
        f.text(l + cw * (j as f64 + 0.5), t - 8.0, 10.0, label, BLACK, 1);
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

/// 5×7 glyphs (rows top to bottom, bit 4 = leftmost column); lower case is drawn as upper
/// case, and characters without a glyph as a box.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        ' ' => [0, 0, 0, 0, 0, 0, 0],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '@' => [0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

/// An 8-bit RGB PNG of `raw` (filter byte + pixels per row), in stored (uncompressed)
/// deflate blocks: larger files, no compressor needed.
fn png_rgb(w: u32, h: u32, raw: &[u8]) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    z.extend_from_slice(&adler32(raw).to_be_bytes());
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn a_png_decodes_to_the_pixels_drawn() {
        let mut f = Figure::new(70, 3);
        f.rect(0.0, 0.0, 70.0, 1.0, Rgb(10, 20, 30));
        let png = f.png();
        assert_eq!(&png[..8], &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        // Inflate the stored blocks by hand and look at the first row.
        let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
        let z = &png[idat + 4..];
        assert_eq!(&z[..2], &[0x78, 0x01]);
        let len = u16::from_le_bytes([z[3], z[4]]) as usize;
        assert_eq!(len, 3 * (1 + 3 * 70));
        let raw = &z[7..7 + len];
        assert_eq!(raw[0], 0);
        assert_eq!(&raw[1..4], &[10, 20, 30]);
        assert_eq!(&raw[1 + 3 * 70 + 1..1 + 3 * 70 + 4], &[255, 255, 255]);
    }
}
