//! The exact thin SVD (faer on the CPU), truncated to rank r: the Eckart–Young optimum.

use super::{first_cols, Method, Truncated};
use crate::backend::{Backend, BackendResult};

pub fn exact_svd<B: Backend>(be: &B, delta: &B::Mat, rank: usize) -> BackendResult<Truncated> {
    let parts = be.thin_svd(delta)?;
    let u = be.download(&parts.u)?;
    let v = be.download(&parts.v)?;
    let r = rank.min(parts.s.len());
    Ok(Truncated {
        u: first_cols(u.as_ref(), r),
        s: parts.s[..r].to_vec(),
        v: first_cols(v.as_ref(), r),
        method: Method::Exact,
        sketch: 0,
    })
}
