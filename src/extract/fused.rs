//! Fused 3-D expert parameters (`mlp.experts.gate_up_proj` [E, d1, d2]) as PEFT's
//! `target_parameters`: which ones the adapter holds, and the keys PEFT gives their factors.

use std::collections::BTreeMap;

use crate::adapter;
use crate::plan::{Form, Plan};
use crate::report::TensorAction;
use crate::report::TensorReport;

/// A fused parameter with factors.
pub(super) struct FusedParam {
    /// Its full path (`model.layers.0.mlp.experts.gate_up_proj`), listed in target_parameters.
    pub param: String,
    /// The experts module that holds it.
    pub module: String,
    /// The rank every expert is padded to: the largest expert's.
    pub rank: usize,
}

impl FusedParam {
    /// The key its factors are staged under until they get PEFT's key.
    pub fn staged_keys(&self) -> [String; 2] {
        [
            adapter::lora_a_key(&self.param),
            adapter::lora_b_key(&self.param),
        ]
    }
}

/// The fused parameters whose experts got factors, in plan order. An expert's rank is the sum
/// of its parts' (gate and up of per-expert weights fused into gate_up_proj), each part at
/// `uniform` when every factor is padded to one rank, else at its own.
pub(super) fn fused_params(
    rows: &[TensorReport],
    plan: &Plan,
    uniform: Option<usize>,
) -> Vec<FusedParam> {
    let mut out: Vec<FusedParam> = Vec::new();
    let mut expert_rank: BTreeMap<(String, usize), usize> = BTreeMap::new();
    for (row, item) in rows.iter().zip(&plan.items) {
        let (Form::Expert(e), TensorAction::Lora, Some(r)) = (&item.form, row.action, row.rank)
        else {
            continue;
        };
        let sum = expert_rank.entry((e.param.clone(), e.index)).or_default();
        *sum += uniform.unwrap_or(r);
        let sum = *sum;
        match out.iter_mut().find(|p| p.param == e.param) {
            Some(p) => p.rank = p.rank.max(sum),
            None => out.push(FusedParam {
                param: e.param.clone(),
                module: item.module.clone(),
                rank: sum,
            }),
        }
    }
    out
}

/// PEFT's (A, B) keys for each fused parameter. PEFT targets several parameters of one module
/// by nesting wrappers: the parameter wrapped first sits deepest, its keys carrying one
/// `base_layer.` per wrapper around it (checked against PEFT 0.21.2: with gate_up_proj and
/// down_proj targeted, gate_up_proj's A is `experts.base_layer.lora_A.weight`).
pub(super) fn peft_keys(params: &[FusedParam]) -> Vec<[String; 2]> {
    params
        .iter()
        .map(|p| {
            let mut siblings: Vec<&str> = params
                .iter()
                .filter(|q| q.module == p.module)
                .map(|q| crate::names::last_segment(&q.param))
                .collect();
            siblings.sort_by_key(|s| crate::names::registration_rank(s));
            let at = siblings
                .iter()
                .position(|s| *s == crate::names::last_segment(&p.param))
                .expect("a parameter is its own sibling");
            let path = format!(
                "{}{}",
                p.module,
                ".base_layer".repeat(siblings.len() - 1 - at)
            );
            [adapter::lora_a_key(&path), adapter::lora_b_key(&path)]
        })
        .collect()
}

/// Warns when a module's parameters are not all of the known names: PEFT's nesting follows
/// the model class's registration order, which phlora can only assume for those.
pub(super) fn warn_unknown_order(params: &[FusedParam]) {
    for p in params {
        let name = crate::names::last_segment(&p.param);
        let shared = params.iter().filter(|q| q.module == p.module).count() > 1;
        if shared && crate::names::registration_rank(name).0 == 4 {
            tracing::warn!(
                "{}: several parameters of {} are targeted and `{name}` is not a name phlora knows the registration order of; PEFT nests their keys in that order, so check that the adapter loads",
                p.param,
                p.module
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(param: &str, rank: usize) -> FusedParam {
        FusedParam {
            param: param.into(),
            module: crate::names::module_of(param).into(),
            rank,
        }
    }

    #[test]
    fn the_parameter_wrapped_first_sits_deepest() {
        let params = [
            p("model.layers.0.mlp.experts.down_proj", 4),
            p("model.layers.0.mlp.experts.gate_up_proj", 4),
            p("model.layers.1.mlp.experts.down_proj", 4),
        ];
        let keys = peft_keys(&params);
        assert_eq!(
            keys[0][0],
            "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
        );
        assert_eq!(
            keys[1][1],
            "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"
        );
        // Alone on its module: no nesting.
        assert_eq!(
            keys[2][0],
            "base_model.model.model.layers.1.mlp.experts.lora_A.weight"
        );
    }
}
