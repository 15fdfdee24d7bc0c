use std::process::ExitCode;

use super::Ui;
use crate::cli::VerifyArgs;
use crate::config::{adapter_path, model_path};
use phlora::error::{Error, Result};
use phlora::verify::{verify, VerifySettings};

/// Exit status when the adapter does not meet --min-cos / --max-error (1 is for errors).
pub const FAILED_CHECK: u8 = 3;

pub fn run(a: &VerifyArgs, ui: Ui) -> Result<ExitCode> {
    if [a.min_cos, a.min_weight_cos]
        .iter()
        .flatten()
        .any(|c| !(-1.0..=1.0).contains(c))
    {
        return Err(Error::Settings(
            "--min-cos and --min-weight-cos must be between -1 and 1".into(),
        ));
    }
    if a.max_error.is_some_and(|e| !(e >= 0.0 && e.is_finite())) {
        return Err(Error::Settings(
            "--max-error must be a finite number ≥ 0".into(),
        ));
    }
    let report = verify(&VerifySettings {
        base: model_path(&a.base)?,
        ft: model_path(&a.ft)?,
        adapter: adapter_path(&a.adapter)?,
        min_cos: a.min_cos,
        max_error: a.max_error,
        min_weight_cos: a.min_weight_cos,
    })?;
    if !ui.quiet {
        phlora::say_raw!("{}", report.table());
    }
    if a.json {
        phlora::outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plain data serialises")
        )?;
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FAILED_CHECK)
    })
}
