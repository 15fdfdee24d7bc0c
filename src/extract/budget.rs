//! A budget's ranks (`--budget`, `analyze --budget`): from the spectra of the first pass to a
//! rank per tensor, by one of the rules of [`RankRule`].

use std::collections::HashMap;

use super::spectra::TensorSpectrum;
use crate::error::{Error, Result};
use crate::linalg::rank::{
    allocate, default_floor, floor_cost, uniform_rank, RankPolicy, RankRule, Spectrum,
};
use crate::plan::Plan;
use crate::report::BudgetAllocation;

/// The spectra a budget shares: one per changed LoRA target, a tied lm_head folded into its
/// embedding (both carry the same factors, so one rank of the pair costs both).
fn budget_spectra(rows: &[TensorSpectrum]) -> Vec<Spectrum> {
    let mut spectra: Vec<Spectrum> = rows
        .iter()
        .filter(|t| t.tied_to.is_none() && !t.s.is_empty())
        .map(|t| Spectrum {
            name: t.name.clone(),
            cost: t.cost,
            sumsq: t.delta_norm * t.delta_norm,
            base_sumsq: t.base_sumsq,
            s: t.s.clone(),
        })
        .collect();
    for copy in rows.iter().filter(|t| t.tied_to.is_some()) {
        if let Some(sp) = spectra
            .iter_mut()
            .find(|sp| Some(&sp.name) == copy.tied_to.as_ref())
        {
            sp.cost += copy.cost;
        }
    }
    spectra
}

/// Ranks for `params` by `rule`, none below `min_rank` (None: [`default_floor`]). A floor that alone spends more than the budget is refused.
pub fn allocate_budget(
    rows: &[TensorSpectrum],
    params: u64,
    rule: RankRule,
    min_rank: Option<usize>,
) -> Result<BudgetAllocation> {
    let spectra = budget_spectra(rows);
    let shape: Vec<(u64, usize)> = spectra.iter().map(|t| (t.cost, t.s.len())).collect();
    let floor = min_rank.unwrap_or_else(|| default_floor(&shape, params));
    let floor_spends = floor_cost(&shape, floor);
    if floor_spends > params {
        return Err(Error::Settings(format!(
            "--min-rank {floor}: the floor alone costs {floor_spends} parameters over the {} changed LoRA targets, more than --budget {params}; lower it or raise the budget",
            spectra.len()
        )));
    }
    let ranks = allocate(&spectra, params, rule, floor);
    let by_name: HashMap<&str, usize> = spectra
        .iter()
        .zip(&ranks)
        .map(|(t, &r)| (t.name.as_str(), r))
        .collect();
    let spent = spectra
        .iter()
        .zip(&ranks)
        .map(|(t, &r)| r as u64 * t.cost)
        .sum();
    let ranks = rows
        .iter()
        .map(|t| {
            let owner = t.tied_to.as_deref().unwrap_or(&t.name);
            (t.name.clone(), by_name.get(owner).copied().unwrap_or(0))
        })
        .collect();
    Ok(BudgetAllocation {
        rule,
        params,
        spent,
        min_rank: floor,
        uniform_rank: uniform_rank(&shape, params),
        ranks,
    })
}

/// A budget's ranks from its first pass: each LoRA target's spectrum, allocated by the
/// budget's rule, as a per-tensor policy (and what the allocation was, for the report).
pub(super) fn ranks_from_spectra(
    policy: &RankPolicy,
    plan: &Plan,
    finished: &[Option<super::job::Finished>],
) -> Result<(RankPolicy, BudgetAllocation)> {
    let RankPolicy::Budget {
        params,
        max_rank,
        rule,
        min_rank,
    } = *policy
    else {
        return Err(Error::Internal("a budget's ranks without a budget".into()));
    };
    let rows = super::spectra::spectrum_rows(plan, finished);
    let chosen = allocate_budget(&rows, params, rule, min_rank)?;
    let ranks = RankPolicy::PerTensor {
        ranks: chosen.rank_map(),
        max_rank,
    };
    Ok((ranks, chosen))
}
