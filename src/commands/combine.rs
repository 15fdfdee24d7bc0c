use std::process::ExitCode;

use super::Ui;
use crate::cli::CombineArgs;
use crate::error::Result;

pub fn run(a: &CombineArgs, ui: Ui) -> Result<ExitCode> {
    let report = crate::extract::shard::combine(&a.parts, &a.out, a.force)?;
    super::extract::show(&report, ui, a.json);
    Ok(ExitCode::SUCCESS)
}
