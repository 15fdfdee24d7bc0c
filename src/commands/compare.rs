use std::process::ExitCode;

use super::verify::FAILED_CHECK;
use super::Ui;
use crate::cli::CompareArgs;
use phlora::compare::{compare, Tolerances};
use phlora::error::{Error, Result};

pub fn run(a: &CompareArgs, ui: Ui) -> Result<ExitCode> {
    let tol = Tolerances {
        product: a.max_product_diff,
        residual: a.max_residual_diff,
        delta_norm: a.max_norm_diff,
    };
    if [tol.product, tol.residual, tol.delta_norm]
        .iter()
        .any(|t| !(*t >= 0.0 && t.is_finite()))
    {
        return Err(Error::Settings(
            "--max-product-diff, --max-residual-diff and --max-norm-diff must be finite numbers ≥ 0"
                .into(),
        ));
    }
    let reports = a
        .others
        .iter()
        .map(|o| compare(&a.reference, o, tol))
        .collect::<Result<Vec<_>>>()?;
    if !ui.quiet || !a.json {
        for r in &reports {
            if a.json {
                phlora::say_raw!("{}", r.table(a.all));
            } else {
                phlora::out!("{}", r.table(a.all))?;
            }
        }
    }
    if a.json {
        phlora::outln!(
            "{}",
            serde_json::to_string_pretty(&reports).expect("plain data serialises")
        )?;
    }
    Ok(if reports.iter().all(|r| r.passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FAILED_CHECK)
    })
}
