use std::process::ExitCode;

use super::Ui;
use crate::cli::CombineArgs;
use crate::config::model_path;
use phlora::error::Result;

pub fn run(a: &CombineArgs, ui: Ui) -> Result<ExitCode> {
    let options = phlora::extract::shard::CombineOptions {
        overwrite: a.force,
        max_shard_size: a.max_shard_size,
        base: a.base.as_deref().map(model_path).transpose()?,
        ft: a.ft.as_deref().map(model_path).transpose()?,
    };
    phlora::interrupt::install();
    let report = phlora::extract::shard::combine(&a.parts, &a.out, &options)?;
    super::extract::show(&report, ui, a.json)?;
    Ok(ExitCode::SUCCESS)
}
