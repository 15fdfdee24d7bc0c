//! Rank policies: how many singular directions each tensor keeps.

/// How the rank of each tensor is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankPolicy {
    /// The same rank r for every tensor (clamped to min(rows, cols); the factors are
    /// zero-padded back to r so the adapter keeps one uniform rank).
    Fixed(usize),
}

impl RankPolicy {
    /// The adapter's nominal rank (its `r`).
    pub fn adapter_rank(&self) -> usize {
        match *self {
            RankPolicy::Fixed(r) => r,
        }
    }

    /// The rank actually decomposed for a rows×cols matrix.
    pub fn rank_for(&self, rows: usize, cols: usize) -> usize {
        match *self {
            RankPolicy::Fixed(r) => r.min(rows).min(cols),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rank_is_clamped_to_the_matrix() {
        let p = RankPolicy::Fixed(64);
        assert_eq!(p.rank_for(1, 4096), 1);
        assert_eq!(p.rank_for(4096, 32), 32);
        assert_eq!(p.rank_for(4096, 4096), 64);
        assert_eq!(p.adapter_rank(), 64);
    }
}
