//! MoE experts in the plan: fused 3-D expert parameters split into one item per expert,
//! per-expert weights fused for transformers v5 (`--fuse-experts`), routers, and the names PEFT
//! gives them.

use std::collections::BTreeMap;

use super::{Action, Form, PlanItem};
use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::error::{Error, Result};
use crate::names::{fused_target, last_segment, module_of, per_expert_weight};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertSlice {
    /// The fused parameter's name (`model.layers.0.mlp.experts.gate_up_proj`).
    pub param: String,
    pub index: usize,
    pub count: usize,
    /// gpt-oss stores each expert [in, out] (ΔW = the slice transposed); transformers v5
    /// stores [out, in].
    pub stored_in_out: bool,
    /// A per-expert weight written into a fused parameter (`--fuse-experts`): which part of
    /// the expert's fused matrix it is (None: all of it).
    pub part: Option<ExpertPart>,
}

/// One of the matrices stacked along the output axis into a fused expert parameter
/// (`gate_proj` then `up_proj` make `gate_up_proj`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertPart {
    pub part: usize,
    /// Its first row in the fused matrix, and the fused matrix's rows.
    pub out_offset: usize,
    pub out_total: usize,
}

/// A fused 3-D expert parameter (transformers v5, gpt-oss): `….experts.<name>_proj` [E, d1, d2].
pub(super) fn is_fused_experts(name: &str) -> bool {
    last_segment(module_of(name)) == "experts" && last_segment(name).ends_with("_proj")
}

/// gpt-oss stores each expert of a fused parameter [in, out]; transformers v5 [out, in].
pub fn experts_in_out(config: Option<&serde_json::Value>) -> bool {
    config
        .and_then(|c| c.get("model_type"))
        .and_then(|m| m.as_str())
        .is_some_and(|m| m == "gpt_oss")
}

/// Whether a fused expert parameter stores each expert [in, out] (gpt-oss) rather than
/// [out, in] (transformers v5), from the config; checked against its hidden_size when given.
pub(super) fn experts_stored_in_out(ck: &Checkpoint, t: &TensorEntry) -> Result<bool> {
    let config = ck.config();
    let in_out = experts_in_out(config);
    let hidden = config
        .and_then(|c| c.get("hidden_size"))
        .and_then(|h| h.as_u64())
        .map(|h| h as usize);
    let param = last_segment(&t.name);
    // The hidden side: the input of gate/up projections, the output of down projections.
    let hidden_is_input = param != "down_proj";
    let (out_axis, in_axis) = if in_out { (2, 1) } else { (1, 2) };
    let expected_axis = if hidden_is_input { in_axis } else { out_axis };
    if let Some(h) = hidden {
        if t.shape[expected_axis] != h {
            return Err(Error::tensor(
                ck.path_of(t),
                &t.name,
                format!(
                    "fused experts {:?}: expected the hidden size {h} on axis {expected_axis} ({} layout, [E, {}]); the config and the tensor disagree",
                    t.shape,
                    if in_out { "gpt-oss" } else { "transformers v5" },
                    if in_out { "in, out" } else { "out, in" },
                ),
            ));
        }
    }
    Ok(in_out)
}

/// One plan item per expert of a fused [E, d1, d2] parameter: byte views of each expert's
/// [d1, d2] slice in both checkpoints.
pub(super) fn expert_items(f: &TensorEntry, b: &TensorEntry, stored_in_out: bool) -> Vec<PlanItem> {
    let (count, d1, d2) = (f.shape[0], f.shape[1], f.shape[2]);
    let slice = |t: &TensorEntry, e: usize, name: &str| {
        let per = t.nbytes() / count.max(1);
        TensorEntry {
            name: name.to_string(),
            shape: vec![d1, d2],
            start: t.start + e * per,
            end: t.start + (e + 1) * per,
            ..t.clone()
        }
    };
    (0..count)
        .map(|e| {
            let name = format!("{}[{e}]", f.name);
            PlanItem {
                base_scale: None,
                ft_scale: None,
                added: None,
                remove_logit_shift: false,
                module: module_of(&f.name).to_string(),
                shape: vec![d1, d2],
                base: slice(b, e, &name),
                ft: slice(f, e, &name),
                action: Action::LoraLinear,
                note: None,
                form: Form::Expert(ExpertSlice {
                    param: f.name.clone(),
                    index: e,
                    count,
                    stored_in_out,
                    part: None,
                }),
                name,
            }
        })
        .collect()
}

/// `--fuse-experts`: per-expert `….experts.N.{gate,up,down}_proj.weight` become experts of the
/// fused parameters `….experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
/// `….experts.down_proj` [E, H, I], as transformers v5 loads them.
pub(super) fn fuse_per_expert(items: &mut [PlanItem], ft: &Checkpoint) -> Result<()> {
    let config_count = ft.config().and_then(|c| {
        ["num_experts", "num_local_experts", "n_routed_experts"]
            .iter()
            .find_map(|k| c.get(*k)?.as_u64())
            .map(|n| n as usize)
    });
    // Per experts module: the expert count, and each projection's [rows, cols].
    #[derive(Default)]
    struct Experts {
        count: usize,
        shapes: BTreeMap<String, (usize, usize)>,
    }
    let mut modules: BTreeMap<String, Experts> = BTreeMap::new();
    for i in items.iter() {
        let Some((experts, index, proj)) = per_expert_weight(&i.name) else {
            continue;
        };
        if i.form != Form::Matrix || i.shape.len() != 2 {
            continue;
        }
        if fused_target(proj).is_none() {
            return Err(Error::tensor(
                ft.path_of(&i.ft),
                &i.name,
                format!("--fuse-experts knows gate_proj, up_proj and down_proj experts, not `{proj}` (PEFT converts per-expert Mixtral adapters itself: drop --fuse-experts)"),
            ));
        }
        let m = modules.entry(experts.to_string()).or_default();
        m.count = m.count.max(index + 1);
        let shape = (i.shape[0], i.shape[1]);
        if let Some(&seen) = m.shapes.get(proj).filter(|&&s| s != shape) {
            return Err(Error::tensor(
                ft.path_of(&i.ft),
                &i.name,
                format!(
                    "--fuse-experts: {:?}, but another expert's `{proj}` is {seen:?}",
                    i.shape
                ),
            ));
        }
        m.shapes.insert(proj.to_string(), shape);
    }
    if modules.is_empty() {
        return Err(Error::Settings(
            "--fuse-experts: no per-expert weight (`….experts.N.gate_proj.weight`) among the selected tensors".into(),
        ));
    }
    for (experts, Experts { count, shapes }) in &mut modules {
        if let Some(n) = config_count {
            if *count > n {
                return Err(Error::Settings(format!(
                    "--fuse-experts: `{experts}` has expert {} but the config says {n} experts",
                    *count - 1
                )));
            }
            *count = n;
        }
        match (shapes.get("gate_proj"), shapes.get("up_proj")) {
            (Some(g), Some(u)) if g == u => {}
            (None, None) => {}
            (g, u) => {
                return Err(Error::Settings(format!(
                    "--fuse-experts: `{experts}` needs gate_proj and up_proj of one shape to fuse them into gate_up_proj (gate_proj {g:?}, up_proj {u:?}); select both, or drop --fuse-experts"
                )))
            }
        }
    }
    for i in items.iter_mut() {
        let Some((experts, index, proj)) = per_expert_weight(&i.name) else {
            continue;
        };
        let Some((target, part)) = fused_target(proj) else {
            continue;
        };
        if i.form != Form::Matrix || i.shape.len() != 2 {
            continue;
        }
        let Experts { count, shapes } = &modules[experts];
        let rows = shapes[proj].0;
        let part = (target == "gate_up_proj").then(|| ExpertPart {
            part,
            out_offset: part * rows,
            out_total: 2 * rows,
        });
        let experts = experts.to_string();
        i.form = Form::Expert(ExpertSlice {
            param: format!("{experts}.{target}"),
            index,
            count: *count,
            stored_in_out: false,
            part,
        });
        i.module = experts;
    }
    Ok(())
}

/// An MoE router: a `gate` or `router` module beside an `experts` module. transformers v5
/// makes several of them a router class rather than nn.Linear, so PEFT can only reach their
/// weight as a target parameter.
pub fn is_router(module: &str, items: &[PlanItem]) -> bool {
    let (parent, last) = module.rsplit_once('.').unwrap_or(("", module));
    if !matches!(last, "gate" | "router") {
        return false;
    }
    let experts = format!("{parent}.experts");
    items.iter().any(|i| i.module.starts_with(&experts))
}

/// A router's rank_pattern key: its weight's path with the block that holds it left open
/// (`model\.layers\.0\.[^.]+\.gate\.weight`), because transformers v5 renames some MoE blocks in
/// memory (Mixtral's `block_sparse_moe` becomes `mlp`) and PEFT matches the in-memory path.
pub fn router_pattern(module: &str) -> String {
    let param = format!("{module}.weight");
    let segments: Vec<&str> = param.split('.').collect();
    let at = segments.len().saturating_sub(3);
    segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if i == at {
                "[^.]+".to_string()
            } else {
                regex::escape(s)
            }
        })
        .collect::<Vec<_>>()
        .join(r"\.")
}
