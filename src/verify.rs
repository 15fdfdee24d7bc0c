//! `verify`: rebuilds W_base + B·A·scaling for every module of an adapter and compares it with
//! the fine-tune, tensor by tensor, in row blocks on the CPU (an implementation independent of
//! extract's, so it checks extract too). Tensors that changed but that the adapter does not
//! carry are counted with their share of ‖ΔW‖².

use std::collections::HashMap;
use std::path::PathBuf;

use rayon::prelude::*;
use serde::Serialize;

use crate::adapter::read::{update_rows, Adapter, LoraModule};
use crate::checkpoint::{stacked_rows, Checkpoint, TensorEntry};
use crate::error::{Error, Result};
use crate::plan::tied_counterpart;

#[derive(Clone, Debug)]
pub struct VerifySettings {
    pub base: PathBuf,
    pub ft: PathBuf,
    pub adapter: PathBuf,
    /// Fail (exit 3) when a module's cos(B·A·s, ΔW) is below this.
    pub min_cos: Option<f64>,
    /// Fail when a module's ‖ΔW − B·A·s‖/‖ΔW‖ is above this.
    pub max_error: Option<f64>,
    /// Fail when a module's cos(W_base + B·A·s, W_ft) is below this (close to 1 whenever ΔW
    /// is small next to W: the ΔW cosine says more).
    pub min_weight_cos: Option<f64>,
}

/// How the adapter carries a tensor that changed, as verify sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    #[default]
    Lora,
    LoraEmbedding,
    LoraBias,
    SavedWhole,
    NotCarried,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Lora => "lora",
            CheckKind::LoraEmbedding => "lora-embedding",
            CheckKind::LoraBias => "lora-bias",
            CheckKind::SavedWhole => "saved-whole",
            CheckKind::NotCarried => "not-carried",
        }
    }

    /// A LoRA (lora_A/B or lora_embedding_A/B), whose product is checked against ΔW.
    pub fn is_factored(self) -> bool {
        matches!(self, CheckKind::Lora | CheckKind::LoraEmbedding)
    }

    /// Carried by the adapter's LoRA tensors: factors, or a lora_B.bias.
    pub fn is_lora(self) -> bool {
        self.is_factored() || self == CheckKind::LoraBias
    }
}

impl std::fmt::Display for CheckKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TensorCheck {
    pub name: String,
    pub kind: CheckKind,
    pub shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<f64>,
    /// ‖W_ft − W_base‖ (for an lm_head extracted with --remove-logit-shift, of ΔW without
    /// the shift: every ΔW figure of that tensor is compared modulo the shift).
    pub delta_norm: f64,
    /// The share of this lm_head's ‖ΔW‖² that was a logit shift, left out of the comparison
    /// because extract left it out (report.json says so) and it changes no probability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logit_shift: Option<f64>,
    /// cos(ΔŴ, ΔW): how well the adapter's update points the fine-tune's way.
    pub cos_delta: f64,
    /// ‖ΔW − ΔŴ‖ / ‖ΔW‖.
    pub rel_error_delta: f64,
    /// cos(W_base + ΔŴ, W_ft).
    pub cos_weight: f64,
    /// ‖W_base + ΔŴ − W_ft‖ / ‖W_ft‖.
    pub rel_error_weight: f64,
    pub passed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub base: String,
    pub ft: String,
    pub adapter: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub modules: usize,
    pub saved_whole: usize,
    pub not_carried: usize,
    /// Σ ‖ΔW‖² over changed tensors.
    pub delta_sumsq: f64,
    /// Share of Σ ‖ΔW‖² in tensors the adapter does not touch.
    pub share_not_carried: f64,
    /// √(Σ ‖ΔW − ΔŴ‖² over every changed tensor) / √(Σ ‖ΔW‖²).
    pub total_relative_error: f64,
    pub worst_cos_delta: f64,
    pub worst_rel_error_delta: f64,
    pub passed: bool,
    pub tensors: Vec<TensorCheck>,
}

/// Sums over a tensor (f64), gathered block by block.
#[derive(Clone, Copy, Default)]
struct Sums {
    dd: f64,
    hh: f64,
    dh: f64,
    ee: f64,
    ff: f64,
    mm: f64,
    mf: f64,
    /// Values where the base or the fine-tune is NaN or Inf.
    nonfinite: usize,
    /// Values where the pair is finite but the adapter's update is not (it overflows).
    nonfinite_update: usize,
}

impl Sums {
    fn add(self, o: Sums) -> Sums {
        Sums {
            dd: self.dd + o.dd,
            hh: self.hh + o.hh,
            dh: self.dh + o.dh,
            ee: self.ee + o.ee,
            ff: self.ff + o.ff,
            mm: self.mm + o.mm,
            mf: self.mf + o.mf,
            nonfinite: self.nonfinite + o.nonfinite,
            nonfinite_update: self.nonfinite_update + o.nonfinite_update,
        }
    }
}

/// How the base's side of a pair is read: as it is when the shapes agree, or resized by the
/// adapter's added rows when the fine-tune's vocabulary grew. Any other mismatch is an error.
fn base_side<'a>(
    base: &'a Checkpoint,
    bt: &'a TensorEntry,
    ft: &Checkpoint,
    ftt: &TensorEntry,
    name: &str,
    added: Option<&'a Checkpoint>,
) -> Result<BaseSide<'a>> {
    let side = BaseSide {
        ck: base,
        t: bt,
        added: None,
    };
    if bt.shape == ftt.shape {
        return Ok(side);
    }
    let grown = (bt.shape.len() == 2 && ftt.shape.len() == 2 && bt.shape[1] == ftt.shape[1])
        .then(|| ftt.shape[0].checked_sub(bt.shape[0]))
        .flatten()
        .filter(|&n| n > 0);
    let rows = grown.and_then(|n| {
        let ck = added?;
        let t = ck.get(name)?;
        (t.shape == [n, bt.shape[1]]).then_some((ck, t))
    });
    match (grown, rows) {
        (_, Some(rows)) => Ok(BaseSide {
            added: Some(rows),
            ..side
        }),
        (Some(n), None) => Err(Error::tensor(
            ft.path_of(ftt),
            name,
            format!(
                "shape {:?} is {n} rows more than the base's {:?} (added tokens), and the adapter has no {} with `{name}` [{n}, {}] for them",
                ftt.shape,
                bt.shape,
                crate::adapter::ADDED_TOKENS_FILE,
                bt.shape[1]
            ),
        )),
        (None, None) => Err(Error::tensor(
            ft.path_of(ftt),
            name,
            format!(
                "shape {:?} differs from the base's {:?}",
                ftt.shape, bt.shape
            ),
        )),
    }
}

fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else if num > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// Rows r0..r1 of a weight's update, given those rows of the base (None: no update).
type RowUpdate<'a> = dyn Fn(usize, usize, &[f32]) -> Option<Vec<f32>> + Sync + 'a;

/// A base weight as verify reads it: the base's tensor, then — for a vocabulary the adapter
/// grew — the adapter's added rows, which is the resized model the adapter is loaded onto.
#[derive(Clone, Copy)]
struct BaseSide<'a> {
    ck: &'a Checkpoint,
    t: &'a TensorEntry,
    added: Option<(&'a Checkpoint, &'a TensorEntry)>,
}

impl BaseSide<'_> {
    /// Rows r0..r1 decoded.
    fn rows(&self, r0: usize, r1: usize) -> Vec<f32> {
        stacked_rows(self.ck, self.t, self.added, r0, r1)
    }
}

/// Per column j: (Σ_i ΔW_ij, Σ_i ΔŴ_ij).
type ColumnSums = (Vec<f64>, Vec<f64>);

/// The sums of one weight: `update(r0, r1, base_rows)` gives rows r0..r1 of ΔŴ row-major
/// (None: zero), with those rows of the base at hand. With `columns`, also Σ_i ΔW_ij and
/// Σ_i ΔŴ_ij per column j (for comparing modulo a logit shift).
fn compare(
    base: BaseSide<'_>,
    ft: &Checkpoint,
    ftt: &TensorEntry,
    update: &RowUpdate<'_>,
    columns: bool,
) -> (Sums, Option<ColumnSums>) {
    let rows = ftt.shape.first().copied().unwrap_or(1).max(1);
    let cols = ftt.numel() / rows;
    let step = ((1 << 20) / cols.max(1)).clamp(1, rows);
    type Acc = (Sums, Option<ColumnSums>);
    let empty = || -> Acc {
        (
            Sums::default(),
            columns.then(|| (vec![0.0; cols], vec![0.0; cols])),
        )
    };
    (0..rows.div_ceil(step))
        .into_par_iter()
        .fold(empty, |(mut s, mut cs), c| {
            let (r0, r1) = (c * step, ((c + 1) * step).min(rows));
            let wb = base.rows(r0, r1);
            let wf = ft.rows_f32(ftt, r0, r1);
            let h = update(r0, r1, &wb);
            for i in 0..wb.len() {
                let d = f64::from(wf[i]) - f64::from(wb[i]);
                let hv = h.as_ref().map_or(0.0, |h| f64::from(h[i]));
                let m = f64::from(wb[i]) + hv;
                let f = f64::from(wf[i]);
                if !d.is_finite() {
                    s.nonfinite += 1;
                    continue;
                }
                if !m.is_finite() {
                    s.nonfinite_update += 1;
                    continue;
                }
                s.dd += d * d;
                s.hh += hv * hv;
                s.dh += d * hv;
                s.ee += (d - hv) * (d - hv);
                s.ff += f * f;
                s.mm += m * m;
                s.mf += m * f;
                if let Some((cd, ch)) = cs.as_mut() {
                    cd[i % cols] += d;
                    ch[i % cols] += hv;
                }
            }
            (s, cs)
        })
        .reduce(empty, |(s, a), (t, b)| {
            let add = |mut x: Vec<f64>, y: Vec<f64>| {
                x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                x
            };
            (
                s.add(t),
                a.zip(b)
                    .map(|((a1, a2), (b1, b2))| (add(a1, b1), add(a2, b2))),
            )
        })
}

/// The sums of P·ΔW against P·ΔŴ, P = I − 11ᵀ/m over the rows, from those of ΔW and ΔŴ
/// and their column sums; returns them with the share of ‖ΔW‖² P takes out.
fn without_shift(s: Sums, rows: usize, cd: &[f64], ch: &[f64]) -> (Sums, f64) {
    let m = rows.max(1) as f64;
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>() / m;
    let diff: Vec<f64> = cd.iter().zip(ch).map(|(a, b)| a - b).collect();
    let out = Sums {
        dd: (s.dd - dot(cd, cd)).max(0.0),
        hh: (s.hh - dot(ch, ch)).max(0.0),
        dh: s.dh - dot(cd, ch),
        ee: (s.ee - dot(&diff, &diff)).max(0.0),
        ..s
    };
    (out, ratio(s.dd - out.dd, s.dd))
}

/// The tensors whose logit shift extract left out, from the report.json beside the adapter
/// (none when there is no such report: another tool's adapter).
fn shift_removed(adapter_dir: &std::path::Path) -> std::collections::HashSet<String> {
    let rows = crate::report::tensor_rows_beside(adapter_dir)
        .ok()
        .flatten();
    rows.into_iter()
        .flatten()
        .filter(|t| t.get("logit_shift").is_some_and(|x| x.is_number()))
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect()
}

pub fn verify(s: &VerifySettings) -> Result<VerifyReport> {
    let base = Checkpoint::open(&s.base)?;
    let ft = Checkpoint::open(&s.ft)?;
    let mut adapter = Adapter::open(&s.adapter)?;
    adapter.set_experts_layout(crate::plan::experts_in_out(base.config()));
    check_fits(&adapter, &ft)?;
    let by_param: HashMap<&str, &LoraModule> = adapter
        .modules
        .iter()
        .map(|m| (m.param.as_str(), m))
        .collect();
    let shifted = shift_removed(&adapter.dir);
    let mut checks = Vec::new();
    for (name, bt, ftt) in weight_pairs(&base, &ft)? {
        let side = base_side(&base, bt, &ft, ftt, &name, adapter.added.as_ref())?;
        if bt.float_dtype().is_none() || ftt.float_dtype().is_none() {
            continue; // not a weight phlora reads (the adapter cannot touch it either)
        }
        let source = Source::of(&adapter, &by_param, &name, ftt);
        let pair = Weight {
            name: &name,
            base: (&base, bt),
            ft: (&ft, ftt),
            side,
            shifted: shifted.contains(&name),
        };
        checks.extend(check_weight(s, &adapter, &source, pair)?);
    }
    Ok(report(s, &adapter, checks))
}

/// Every module and whole tensor of the adapter must land on a float weight of the pair, of
/// its shape.
fn check_fits(adapter: &Adapter, ft: &Checkpoint) -> Result<()> {
    // Fused modules whose experts the fine-tune stores one by one (`--fuse-experts`).
    let reached_by_parts: std::collections::HashSet<&str> = ft
        .tensors()
        .iter()
        .filter(|t| t.shape.len() == 2)
        .filter_map(|t| adapter.expert_part(&t.name, t.shape[0], t.shape[1]))
        .map(|(m, _, _)| m.param.as_str())
        .collect();
    // Every module and whole tensor of the adapter must land on a weight of the pair.
    for m in &adapter.modules {
        let name = m.param.clone();
        if reached_by_parts.contains(name.as_str()) && ft.get(&name).is_none() {
            continue;
        }
        let t = ft.get(&name).or_else(|| {
            let shape = Adapter::weight_shape(m);
            tied_counterpart(ft, &name, &shape)
        });
        let t = t.ok_or_else(|| {
            Error::tensor(
                adapter.file.path_of(&m.a),
                &m.module,
                format!("the fine-tune has no `{name}` for this module"),
            )
        })?;
        if t.float_dtype().is_none() {
            return Err(Error::tensor(
                ft.path_of(t),
                &name,
                format!(
                    "is {:?}: verify reads F32, F16 and BF16 weights (FP8 checkpoints are extracted from, not verified against, yet)",
                    t.dtype
                ),
            ));
        }
        if t.shape.as_slice() != Adapter::weight_shape(m) {
            return Err(Error::tensor(
                adapter.file.path_of(&m.a),
                &m.module,
                format!(
                    "B·A is {:?} but `{name}` is {:?}",
                    Adapter::weight_shape(m),
                    t.shape
                ),
            ));
        }
    }
    for (name, t) in &adapter.whole {
        let f = ft.get(name).ok_or_else(|| {
            Error::tensor(
                adapter.file.path_of(t),
                name,
                "saved whole, but the fine-tune has no such tensor",
            )
        })?;
        if f.shape != t.shape || t.float_dtype().is_none() {
            return Err(Error::tensor(
                adapter.file.path_of(t),
                name,
                format!(
                    "saved whole as {:?} {:?}; the fine-tune's is {:?}",
                    t.dtype, t.shape, f.shape
                ),
            ));
        }
    }
    Ok(())
}

/// (name, base tensor, fine-tune tensor) for every tensor of the pair: by name, or a tied
/// lm_head's embedding stand-in.
fn weight_pairs<'a>(
    base: &'a Checkpoint,
    ft: &'a Checkpoint,
) -> Result<Vec<(String, &'a TensorEntry, &'a TensorEntry)>> {
    let mut pairs: Vec<(String, &TensorEntry, &TensorEntry)> = Vec::new();
    for ftt in ft.tensors() {
        let bt = base
            .get(&ftt.name)
            .or_else(|| tied_counterpart(base, &ftt.name, &ftt.shape))
            .ok_or_else(|| {
                Error::tensor(ft.path_of(ftt), &ftt.name, "not in the base checkpoint")
            })?;
        pairs.push((ftt.name.clone(), bt, ftt));
    }
    for bt in base.tensors().iter().filter(|t| ft.get(&t.name).is_none()) {
        if let Some(ftt) = tied_counterpart(ft, &bt.name, &bt.shape) {
            pairs.push((bt.name.clone(), bt, ftt));
        }
    }
    Ok(pairs)
}

/// Where the adapter's update to one weight comes from (all None: it makes none).
struct Source<'a> {
    lora: Option<&'a LoraModule>,
    /// A per-expert weight inside a fused module: its rows of the expert's update.
    part: Option<(&'a LoraModule, usize, usize)>,
    /// A layer's bias that the adapter's lora_B.bias updates.
    bias_of: Option<&'a LoraModule>,
    whole: Option<&'a TensorEntry>,
}

impl<'a> Source<'a> {
    fn of(
        adapter: &'a Adapter,
        by_param: &HashMap<&str, &'a LoraModule>,
        name: &str,
        ftt: &TensorEntry,
    ) -> Source<'a> {
        let lora = by_param.get(name).copied();
        let part = match ftt.shape[..] {
            [rows, cols] if lora.is_none() => adapter.expert_part(name, rows, cols),
            _ => None,
        };
        let bias_of = name
            .strip_suffix(".bias")
            .and_then(|m| by_param.get(format!("{m}.weight").as_str()).copied())
            .filter(|m| m.bias.is_some());
        Source {
            lora,
            part,
            bias_of,
            whole: adapter.whole.get(name),
        }
    }

    /// The update to rows r0..r1 (given the base's rows), as the loaders apply it.
    fn update(&self, adapter: &'a Adapter, ftt: &TensorEntry) -> Box<RowUpdate<'a>> {
        if let Some((m, expert, offset)) = self.part {
            let rows = adapter.expert_rows(m, expert, offset, offset + ftt.shape[0]);
            let cols = ftt.shape[1];
            Box::new(move |r0, r1, _| Some(rows[r0 * cols..r1 * cols].to_vec()))
        } else if let Some(m) = self.lora {
            let (a, b) = adapter.factors(m);
            Box::new(move |r0, r1, _| Some(update_rows(m, &a, &b, r0, r1)))
        } else if let Some(m) = self.bias_of {
            let bt_lora = m.bias.as_ref().expect("filtered");
            let file = &adapter.file;
            Box::new(move |r0, r1, _| {
                let v = file.rows_f32(bt_lora, r0, r1);
                Some(v.iter().map(|x| x * m.scaling as f32).collect())
            })
        } else if let Some(w) = self.whole {
            let file = &adapter.file;
            Box::new(move |r0, r1, wb| {
                // The saved tensor replaces the base: ΔŴ = W_saved − W_base.
                let saved = file.rows_f32(w, r0, r1);
                Some(saved.iter().zip(wb).map(|(x, y)| x - y).collect())
            })
        } else {
            Box::new(|_, _, _| None)
        }
    }
}

/// One weight of the pair, as verify compares it.
struct Weight<'a> {
    name: &'a str,
    base: (&'a Checkpoint, &'a TensorEntry),
    ft: (&'a Checkpoint, &'a TensorEntry),
    side: BaseSide<'a>,
    /// Extract decomposed it without its logit shift.
    shifted: bool,
}

/// One weight's check and its ‖ΔW − update‖² (None: unchanged and untouched). An update that
/// makes the weight NaN or Inf is an error naming the adapter tensor it comes from.
fn check_weight(
    s: &VerifySettings,
    adapter: &Adapter,
    source: &Source<'_>,
    w: Weight<'_>,
) -> Result<Option<(TensorCheck, f64)>> {
    let ((base, bt), (ft, ftt), ftt_name) = (w.base, w.ft, w.name);
    let update = source.update(adapter, ftt);
    // An lm_head extract decomposed without its logit shift is compared modulo the shift (its
    // column sums come from the same pass); its merged weight as it is.
    let (raw, columns) = compare(w.side, ft, ftt, &*update, w.shifted);
    let (sums, logit_shift, weight_ee) = match columns {
        Some((cd, ch)) => {
            let (centred, share) = without_shift(raw, ftt.shape[0], &cd, &ch);
            (centred, Some(share), Some(raw.ee))
        }
        None => (raw, None, None),
    };
    base.release(bt);
    ft.release(ftt);
    if sums.nonfinite > 0 {
        return Err(Error::tensor(
            ft.path_of(ftt),
            ftt_name,
            format!(
                "{} NaN or Inf values in the base's or the fine-tune's weights",
                sums.nonfinite
            ),
        ));
    }
    let (lora, bias_of, whole) = (
        source.lora.or(source.part.map(|p| p.0)),
        source.bias_of,
        source.whole,
    );
    if sums.nonfinite_update > 0 {
        // The adapter's own tensors are finite (checked when it was opened): its update
        // overflows.
        let culprit = lora
            .map(|m| &m.b)
            .or(bias_of.and_then(|m| m.bias.as_ref()))
            .or(whole);
        let (path, key) = culprit.map_or_else(
            || (adapter.dir.clone(), ftt_name.to_string()),
            |t| (adapter.file.path_of(t).to_path_buf(), t.name.clone()),
        );
        return Err(Error::tensor(
                path,
                key,
                format!(
                    "its update makes {} values of `{ftt_name}` NaN or Inf (too large: lora_alpha, or factors whose product overflows)",
                    sums.nonfinite_update
                ),
            ));
    }
    let kind = match (lora, whole) {
        _ if bias_of.is_some() => CheckKind::LoraBias,
        (Some(m), _) if m.embedding => CheckKind::LoraEmbedding,
        (Some(_), _) => CheckKind::Lora,
        (None, Some(_)) => CheckKind::SavedWhole,
        // (A shift-only head leaves f32 rounding behind, as extract's own test allows.)
        (None, None) if sums.dd > 0.0 && !logit_shift.is_some_and(|x| 1.0 - x <= 1e-6) => {
            CheckKind::NotCarried
        }
        _ => return Ok(None), // unchanged and untouched
    };
    let mut c = TensorCheck {
        name: ftt_name.to_string(),
        kind,
        shape: ftt.shape.clone(),
        rank: lora.map(|m| m.rank),
        scaling: lora.map(|m| m.scaling),
        delta_norm: sums.dd.sqrt(),
        logit_shift,
        cos_delta: ratio(sums.dh, (sums.dd * sums.hh).sqrt()),
        rel_error_delta: ratio(sums.ee, sums.dd).sqrt(),
        cos_weight: ratio(sums.mf, (sums.mm * sums.ff).sqrt()),
        rel_error_weight: ratio(weight_ee.unwrap_or(sums.ee), sums.ff).sqrt(),
        passed: true,
    };
    if sums.dd == 0.0 && sums.hh == 0.0 {
        c.cos_delta = 1.0; // nothing to carry, nothing carried
    }
    if kind.is_factored() {
        c.passed = s.min_cos.map_or(true, |t| c.cos_delta >= t)
            && s.max_error.map_or(true, |t| c.rel_error_delta <= t)
            && s.min_weight_cos.map_or(true, |t| c.cos_weight >= t);
    }
    Ok(Some((c, sums.ee)))
}

/// The whole report from each weight's check and its ‖ΔW − update‖².
fn report(s: &VerifySettings, adapter: &Adapter, checks: Vec<(TensorCheck, f64)>) -> VerifyReport {
    // Folds from +0.0: an empty f64 sum is -0.0, which prints as "-0.000%".
    let total = checks
        .iter()
        .fold(0.0, |a, (c, _)| a + c.delta_norm * c.delta_norm);
    let lost = checks.iter().fold(0.0, |a, (_, ee)| a + ee);
    let not_carried = checks
        .iter()
        .filter(|(c, _)| c.kind == CheckKind::NotCarried)
        .fold(0.0, |a, (c, _)| a + c.delta_norm * c.delta_norm);
    let loras = || checks.iter().map(|(c, _)| c).filter(|c| c.kind.is_lora());
    let tensors: Vec<TensorCheck> = checks.iter().map(|(c, _)| c.clone()).collect();
    VerifyReport {
        base: s.base.display().to_string(),
        ft: s.ft.display().to_string(),
        adapter: s.adapter.display().to_string(),
        r: adapter.r,
        lora_alpha: adapter.lora_alpha,
        use_rslora: adapter.use_rslora,
        modules: adapter.modules.len(),
        saved_whole: tensors
            .iter()
            .filter(|c| c.kind == CheckKind::SavedWhole)
            .count(),
        not_carried: tensors
            .iter()
            .filter(|c| c.kind == CheckKind::NotCarried)
            .count(),
        delta_sumsq: total,
        share_not_carried: ratio(not_carried, total),
        total_relative_error: ratio(lost, total).sqrt(),
        worst_cos_delta: loras().map(|c| c.cos_delta).fold(1.0, f64::min),
        worst_rel_error_delta: loras().map(|c| c.rel_error_delta).fold(0.0, f64::max),
        passed: tensors.iter().all(|c| c.passed),
        tensors,
    }
}

impl VerifyReport {
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let width = crate::report::name_width(self.tensors.iter().map(|t| t.name.as_str()));
        let _ = writeln!(
            s,
            "{:<width$}  {:<14}  {:>4}  {:>8}  {:>9}  {:>9}  {:>10}  {:>9}  ok",
            "tensor", "kind", "rank", "scaling", "cos(ΔW)", "err(ΔW)", "cos(W)", "err(W)"
        );
        for t in &self.tensors {
            let _ = writeln!(
                s,
                "{:<width$}  {:<14}  {:>4}  {:>8}  {:>9.6}  {:>9.6}  {:>10.8}  {:>9.2e}  {}",
                t.name,
                t.kind,
                t.rank.map_or("-".into(), |r| r.to_string()),
                t.scaling.map_or("-".into(), |x| format!("{x:.4}")),
                t.cos_delta,
                t.rel_error_delta,
                t.cos_weight,
                t.rel_error_weight,
                if t.passed { "yes" } else { "NO" }
            );
        }
        let _ = writeln!(
            s,
            "{} LoRA modules, {} saved whole, {} changed tensors not carried ({:.3}% of ‖ΔW‖²); total relative error {:.5}; worst cos(ΔW) {:.5}, worst err(ΔW) {:.5}: {}",
            self.modules,
            self.saved_whole,
            self.not_carried,
            100.0 * self.share_not_carried,
            self.total_relative_error,
            self.worst_cos_delta,
            self.worst_rel_error_delta,
            if self.passed { "passed" } else { "FAILED" }
        );
        for t in self.tensors.iter().filter(|t| t.logit_shift.is_some()) {
            let _ = writeln!(
                s,
                "{}: ΔW compared without its logit shift ({:.1}% of its ‖ΔW‖²), as extract --remove-logit-shift left it out; the merged weight is compared as it is",
                t.name,
                100.0 * t.logit_shift.unwrap_or(0.0)
            );
        }
        s
    }
}
