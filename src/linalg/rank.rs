//! Rank policies: how many singular directions each tensor keeps.

use std::collections::HashMap;

/// Ranks vLLM accepts (`max_lora_rank` choices); a portable adapter uses one of them.
pub const PORTABLE_RANKS: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/// How the rank of each tensor is chosen.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RankPolicy {
    /// The same rank r for every tensor (clamped to min(rows, cols); the factors are
    /// zero-padded back to r so the adapter keeps one uniform rank).
    Fixed(usize),
    /// Per tensor, the smallest rank whose preserved energy E_r reaches `target`, at most
    /// `max_rank` (decided after the decomposition; the sketch grows when needed).
    Energy { target: f64, max_rank: usize },
    /// A global parameter budget Σ r·(in + out) ≤ `params`, shared among the tensors by
    /// `rule`, none below `min_rank` (None: [`default_floor`]); spectra first, then the ranks
    /// ([`allocate`]).
    Budget {
        params: u64,
        max_rank: usize,
        rule: RankRule,
        min_rank: Option<usize>,
    },
    /// Ranks decided beforehand per tensor name (what a budget resolves to).
    PerTensor {
        ranks: HashMap<String, usize>,
        max_rank: usize,
    },
}

impl RankPolicy {
    /// The largest rank any tensor may get (the fixed rank, or the cap).
    pub fn adapter_rank(&self) -> usize {
        match self {
            RankPolicy::Fixed(r) => *r,
            RankPolicy::Energy { max_rank, .. }
            | RankPolicy::Budget { max_rank, .. }
            | RankPolicy::PerTensor { max_rank, .. } => *max_rank,
        }
    }

    /// The rank decomposed first for a rows×cols matrix `name` (for Energy, the cap: the
    /// job truncates once it knows the spectrum).
    pub fn rank_for(&self, name: &str, rows: usize, cols: usize) -> usize {
        let cap = rows.min(cols);
        match self {
            RankPolicy::Fixed(r) => (*r).min(cap),
            RankPolicy::Energy { max_rank, .. } | RankPolicy::Budget { max_rank, .. } => {
                (*max_rank).min(cap)
            }
            RankPolicy::PerTensor { ranks, .. } => ranks.get(name).copied().unwrap_or(0).min(cap),
        }
    }

    /// Whether every tensor's factors are padded to one rank (`Fixed`), or each keeps its
    /// own (rank_pattern in the config, unless the adapter is made portable).
    pub fn uniform(&self) -> bool {
        matches!(self, RankPolicy::Fixed(_))
    }
}

/// The energy policy's search over ranks: a decomposition at `first` (or `cap`, if lower),
/// doubling up to `cap` until its σ keep `target` of `total`, then cut to the smallest rank
/// that does. σ from a sketch never exceed the true ones, so a rank that reaches the target on
/// them reaches it on ΔW. Returns the decomposition, its rank, and whether the target was
/// reached (else it is the one at `cap`).
pub fn decompose_to_energy<T, E>(
    target: f64,
    total: f64,
    first: usize,
    cap: usize,
    mut decompose: impl FnMut(usize) -> Result<T, E>,
    singular_values: impl Fn(&T) -> &[f32],
    truncate: impl FnOnce(T, usize) -> Result<T, E>,
) -> Result<(T, usize, bool), E> {
    let mut r = first.min(cap);
    let mut t = decompose(r)?;
    loop {
        if let Some(need) = rank_for_energy(singular_values(&t), total, target) {
            let r = need.max(1);
            return Ok((truncate(t, r)?, r, true));
        }
        if r >= cap {
            return Ok((t, r, false));
        }
        r = (2 * r).min(cap);
        t = decompose(r)?;
    }
}

/// The smallest rank r with Σ_{i≤r} σᵢ² ≥ target·total (σ descending); None if all of `s` do
/// not reach it. A zero ΔW needs rank 0.
pub fn rank_for_energy(s: &[f32], total: f64, target: f64) -> Option<usize> {
    if total <= 0.0 {
        return Some(0);
    }
    let goal = target * total;
    let mut kept = 0.0;
    for (i, &x) in s.iter().enumerate() {
        kept += f64::from(x) * f64::from(x);
        if kept >= goal {
            return Some(i + 1);
        }
    }
    None
}

/// How a parameter budget is shared among the LoRA targets (`--rank-rule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankRule {
    /// Each module's σ² weighed by 1/(‖ΔW‖^0.7·‖W_base‖^0.3): measured against a norm
    /// between the change's and the weight's, where Frobenius follows ‖ΔW‖² and relative
    /// ignores it. The exponents were chosen on the fine-tunes of two seeds and checked on a
    /// third's (BENCHMARKS.md, "Rank rules").
    Balanced,
    /// Each module's σ² weighed by 1/‖ΔW‖²: every module's *relative* error counts the same,
    /// so a module whose change is small in norm but not in effect (a `v_proj`, the
    /// embeddings) is not starved by one whose change is large.
    Relative,
    /// Σσ² over all modules, the total Frobenius error: goes where ΔW is largest.
    Frobenius,
    /// Each module's σ² weighed by 1/‖W_base‖²: the error relative to the weight it changes.
    Base,
    /// The largest uniform rank the budget pays for.
    Uniform,
}

impl RankRule {
    pub const ALL: [RankRule; 5] = [
        RankRule::Balanced,
        RankRule::Relative,
        RankRule::Frobenius,
        RankRule::Base,
        RankRule::Uniform,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RankRule::Balanced => "balanced",
            RankRule::Relative => "relative",
            RankRule::Frobenius => "frobenius",
            RankRule::Base => "base",
            RankRule::Uniform => "uniform",
        }
    }
}

/// One tensor's part in a budget allocation.
#[derive(Clone, Debug)]
pub struct Spectrum {
    pub name: String,
    /// Parameters per rank: in + out.
    pub cost: u64,
    /// ‖ΔW‖²_F (what the relative rule divides by; ≥ Σ s²).
    pub sumsq: f64,
    /// ‖W_base‖²_F (what the base rule divides by).
    pub base_sumsq: f64,
    /// The leading singular values, descending (as many as the tensor may take).
    pub s: Vec<f32>,
}

/// The largest uniform rank r with Σ min(r, len)·cost ≤ budget, over tensors of these costs
/// and rank caps (what a budget "is worth" in uniform rank).
pub fn uniform_rank(tensors: &[(u64, usize)], budget: u64) -> usize {
    let longest = tensors.iter().map(|t| t.1).max().unwrap_or(0);
    let cost = |r: usize| -> u64 { tensors.iter().map(|&(c, len)| r.min(len) as u64 * c).sum() };
    (0..=longest)
        .rev()
        .find(|&r| cost(r) <= budget)
        .unwrap_or(0)
}

/// The floor a budget puts under every tensor's rank unless `--min-rank` says otherwise:
/// ⅞ of the uniform rank the budget is worth, so that a rule moves an eighth of the budget
/// to where it finds the most, and takes it from no module in full. Lower floors let the
/// rules starve the embeddings and lm_head (whose single directions are costly) and did
/// worse at every budget measured (BENCHMARKS.md).
pub fn default_floor(tensors: &[(u64, usize)], budget: u64) -> usize {
    uniform_rank(tensors, budget) * 7 / 8
}

/// Σ min(floor, len)·cost: what a floor alone spends.
pub fn floor_cost(tensors: &[(u64, usize)], floor: usize) -> u64 {
    tensors
        .iter()
        .map(|&(c, len)| floor.min(len) as u64 * c)
        .sum()
}

/// Ranks under Σ rᵢ·costᵢ ≤ `budget` by `rule`, every tensor at least min(`floor`, its
/// length) (the caller checks that the floor fits: [`floor_cost`]). Relative and Frobenius
/// maximise Σ wᵢ·Σ_{j≤rᵢ} σᵢⱼ² (wᵢ = 1/‖ΔWᵢ‖² or 1): directions are taken greedily by weighted
/// σ² per parameter (each tensor's σ descend, so its gains are concave), skipping what no
/// longer fits; the best uniform rank within the budget is tried too and the better of the
/// two kept (greedy alone can lose up to one direction's worth). Deterministic: ties go to
/// the earlier tensor, then the earlier direction.
pub fn allocate(spectra: &[Spectrum], budget: u64, rule: RankRule, floor: usize) -> Vec<usize> {
    let shape: Vec<(u64, usize)> = spectra.iter().map(|t| (t.cost, t.s.len())).collect();
    let best = uniform_rank(&shape, budget);
    let uniform: Vec<usize> = spectra.iter().map(|t| best.min(t.s.len())).collect();
    let weight = |t: &Spectrum| -> f64 {
        match rule {
            RankRule::Balanced if t.sumsq > 0.0 && t.base_sumsq > 0.0 => {
                1.0 / (t.sumsq.powf(0.35) * t.base_sumsq.powf(0.15))
            }
            RankRule::Balanced if t.sumsq > 0.0 => 1.0 / t.sumsq.powf(0.35),
            RankRule::Balanced => 0.0,
            RankRule::Relative if t.sumsq > 0.0 => 1.0 / t.sumsq,
            RankRule::Relative => 0.0,
            RankRule::Base if t.base_sumsq > 0.0 => 1.0 / t.base_sumsq,
            RankRule::Base => 0.0,
            _ => 1.0,
        }
    };
    if rule == RankRule::Uniform {
        return uniform;
    }
    let mut greedy: Vec<usize> = spectra.iter().map(|t| floor.min(t.s.len())).collect();
    let mut spent: u64 = spectra
        .iter()
        .zip(&greedy)
        .map(|(t, &r)| r as u64 * t.cost)
        .sum();
    // (weighted σ² per parameter, tensor, index), best first.
    let mut items: Vec<(f64, usize, usize)> = spectra
        .iter()
        .enumerate()
        .flat_map(|(t, sp)| {
            let w = weight(sp) / sp.cost.max(1) as f64;
            sp.s.iter()
                .enumerate()
                .skip(greedy[t])
                .map(move |(i, &x)| (w * f64::from(x) * f64::from(x), t, i))
        })
        .collect();
    items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    for (_, t, i) in items {
        // A direction is usable only after the ones above it in the same tensor.
        if greedy[t] == i && spent + spectra[t].cost <= budget {
            greedy[t] += 1;
            spent += spectra[t].cost;
        }
    }
    let objective = |ranks: &[usize]| -> f64 {
        spectra
            .iter()
            .zip(ranks)
            .map(|(t, &r)| weight(t) * t.s[..r].iter().map(|&x| f64::from(x).powi(2)).sum::<f64>())
            .sum()
    };
    let floored = uniform
        .iter()
        .zip(spectra)
        .all(|(&r, t)| r >= floor.min(t.s.len()));
    if floored && objective(&uniform) > objective(&greedy) {
        uniform
    } else {
        greedy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rank_is_clamped_to_the_matrix() {
        let p = RankPolicy::Fixed(64);
        assert_eq!(p.rank_for("t", 1, 4096), 1);
        assert_eq!(p.rank_for("t", 4096, 32), 32);
        assert_eq!(p.rank_for("t", 4096, 4096), 64);
        assert_eq!(p.adapter_rank(), 64);
    }

    #[test]
    fn energy_rank_is_the_first_to_reach_the_target() {
        let s = [3.0f32, 2.0, 1.0]; // energies 9, 4, 1 of 14
        assert_eq!(rank_for_energy(&s, 14.0, 0.5), Some(1));
        assert_eq!(rank_for_energy(&s, 14.0, 9.0 / 14.0), Some(1));
        assert_eq!(rank_for_energy(&s, 14.0, 0.9), Some(2));
        assert_eq!(rank_for_energy(&s, 14.0, 1.0), Some(3));
        // Beyond what the sketch saw (the tail holds the rest): not reached.
        assert_eq!(rank_for_energy(&s, 20.0, 0.9), None);
        assert_eq!(rank_for_energy(&[], 0.0, 0.9), Some(0));
    }

    fn spectra(seed: u64) -> Vec<Spectrum> {
        let mut state = seed | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 1000) as f64 / 1000.0
        };
        (0..12)
            .map(|t| {
                let decay = 0.3 + 1.5 * next();
                let scale = 0.1 + 3.0 * next();
                let len = 4 + (next() * 40.0) as usize;
                let s: Vec<f32> = (0..len)
                    .map(|i| (scale * (1.0 + i as f64).powf(-decay)) as f32)
                    .collect();
                // The tail beyond the sketch holds some energy too.
                let sumsq = s.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() * (1.0 + next());
                Spectrum {
                    name: format!("t{t}"),
                    cost: 50 + (next() * 400.0) as u64,
                    sumsq,
                    base_sumsq: 100.0 * sumsq * (0.5 + next()),
                    s,
                }
            })
            .collect()
    }

    #[test]
    fn a_budget_is_never_exceeded_and_beats_the_best_uniform_rank() {
        for seed in [1u64, 7, 42, 1234, 98765] {
            let sp = spectra(seed);
            for budget in [0u64, 100, 1_000, 5_000, 20_000, 1_000_000] {
                let ranks = allocate(&sp, budget, RankRule::Frobenius, 0);
                let cost: u64 = sp.iter().zip(&ranks).map(|(t, &r)| r as u64 * t.cost).sum();
                assert!(cost <= budget, "seed {seed} budget {budget}: spent {cost}");
                assert!(sp.iter().zip(&ranks).all(|(t, &r)| r <= t.s.len()));
                let energy = |ranks: &[usize]| -> f64 {
                    sp.iter()
                        .zip(ranks)
                        .map(|(t, &r)| t.s[..r].iter().map(|&x| f64::from(x).powi(2)).sum::<f64>())
                        .sum()
                };
                // Every uniform rank that fits the budget does no better.
                for u in 0..=50usize {
                    let uniform: Vec<usize> = sp.iter().map(|t| u.min(t.s.len())).collect();
                    let ucost: u64 = sp
                        .iter()
                        .zip(&uniform)
                        .map(|(t, &r)| r as u64 * t.cost)
                        .sum();
                    if ucost <= budget {
                        assert!(
                            energy(&ranks) >= energy(&uniform) - 1e-9,
                            "seed {seed} budget {budget} uniform {u}"
                        );
                    }
                }
                if budget >= 1_000_000 {
                    assert!(
                        sp.iter().zip(&ranks).all(|(t, &r)| r == t.s.len()),
                        "everything fits"
                    );
                }
            }
        }
    }

    #[test]
    fn every_rule_keeps_the_budget_and_the_floor_and_repeats_itself() {
        for seed in [3u64, 11, 99, 2024, 77777] {
            let sp = spectra(seed);
            let shape: Vec<(u64, usize)> = sp.iter().map(|t| (t.cost, t.s.len())).collect();
            for budget in [600u64, 2_000, 8_000, 30_000, 1_000_000] {
                let floors = [0, default_floor(&shape, budget), 2];
                for rule in RankRule::ALL {
                    for floor in floors {
                        if floor_cost(&shape, floor) > budget {
                            continue;
                        }
                        let what = format!("seed {seed} budget {budget} {rule:?} floor {floor}");
                        let ranks = allocate(&sp, budget, rule, floor);
                        let cost: u64 =
                            sp.iter().zip(&ranks).map(|(t, &r)| r as u64 * t.cost).sum();
                        assert!(cost <= budget, "{what}: spent {cost}");
                        for (t, &r) in sp.iter().zip(&ranks) {
                            assert!(r <= t.s.len(), "{what}: {} rank {r}", t.name);
                            assert!(r >= floor.min(t.s.len()), "{what}: {} rank {r}", t.name);
                        }
                        assert_eq!(ranks, allocate(&sp, budget, rule, floor), "{what}");
                        // The uniform rule is the largest uniform rank that fits.
                        if rule == RankRule::Uniform {
                            let u = uniform_rank(&shape, budget);
                            assert!(sp.iter().zip(&ranks).all(|(t, &r)| r == u.min(t.s.len())));
                            assert!(
                                u == shape.iter().map(|t| t.1).max().unwrap() || {
                                    let next: u64 =
                                        shape.iter().map(|&(c, l)| (u + 1).min(l) as u64 * c).sum();
                                    next > budget
                                },
                                "{what}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_relative_rule_beats_every_uniform_rank_on_the_sum_of_relative_energies() {
        for seed in [5u64, 8, 13, 21] {
            let sp = spectra(seed);
            let shape: Vec<(u64, usize)> = sp.iter().map(|t| (t.cost, t.s.len())).collect();
            let relative = |ranks: &[usize]| -> f64 {
                sp.iter()
                    .zip(ranks)
                    .map(|(t, &r)| {
                        t.s[..r].iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / t.sumsq
                    })
                    .sum()
            };
            for budget in [1_000u64, 5_000, 20_000] {
                let ranks = allocate(&sp, budget, RankRule::Relative, 0);
                for u in 0..=uniform_rank(&shape, budget) {
                    let uniform: Vec<usize> = sp.iter().map(|t| u.min(t.s.len())).collect();
                    assert!(
                        relative(&ranks) >= relative(&uniform) - 1e-12,
                        "seed {seed} budget {budget} u {u}"
                    );
                }
                // A module scaled up by 1000 keeps its relative rank, where Frobenius chases it.
                let mut loud = sp.clone();
                loud[0].s.iter_mut().for_each(|x| *x *= 1000.0);
                loud[0].sumsq *= 1e6;
                assert_eq!(
                    allocate(&loud, budget, RankRule::Relative, 0),
                    ranks,
                    "seed {seed} budget {budget}"
                );
                let greedy = allocate(&loud, budget, RankRule::Frobenius, 0);
                assert!(greedy[0] >= ranks[0], "seed {seed} budget {budget}");
            }
        }
    }

    #[test]
    fn a_floor_is_seven_eighths_of_the_uniform_rank_and_always_fits() {
        let shape = [(100u64, 64usize), (300, 64), (50, 4)];
        for budget in [0u64, 450, 4_500, 45_000, 10_000_000] {
            let u = uniform_rank(&shape, budget);
            assert_eq!(default_floor(&shape, budget), u * 7 / 8);
            assert!(floor_cost(&shape, u) <= budget);
            assert!(floor_cost(&shape, default_floor(&shape, budget)) <= budget);
        }
        assert_eq!(uniform_rank(&shape, 450), 1);
        assert_eq!(uniform_rank(&shape, 10_000_000), 64);
    }
}
