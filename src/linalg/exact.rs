//! The exact thin SVD (faer on the CPU), truncated to rank r: the Eckart–Young optimum.

use super::{Method, OnDevice};
use crate::backend::{Backend, BackendResult};

pub fn exact_svd<B: Backend>(
    be: &B,
    delta: &B::Mat,
    rank: usize,
) -> BackendResult<OnDevice<B::Mat>> {
    let parts = be.thin_svd(delta)?;
    let r = rank.min(parts.s.len());
    Ok(OnDevice {
        u: be.first_cols(&parts.u, r)?,
        s: parts.s[..r].to_vec(),
        v: be.first_cols(&parts.v, r)?,
        method: Method::Exact,
        sketch: 0,
    })
}
