use std::process::ExitCode;

use super::{emit, Ui};
use crate::cli::CheckArgs;
use crate::config::{adapter_path, model_path};
use phlora::error::Result;

pub fn run(a: &CheckArgs, ui: Ui) -> Result<ExitCode> {
    let mut engines: Vec<_> = a.engines.iter().flatten().copied().collect();
    engines.sort();
    engines.dedup();
    let base = a.base.as_deref().map(model_path).transpose()?;
    let report = phlora::check::check(&adapter_path(&a.adapter)?, base.as_deref(), &engines)?;
    emit(&report.render(), a.json, &report, ui)?;
    let failed = report.refused() || (a.strict && report.differs());
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
