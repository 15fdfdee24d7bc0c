use std::process::ExitCode;

use super::Ui;
use crate::cli::CombineArgs;
use crate::error::Result;

pub fn run(a: &CombineArgs, ui: Ui) -> Result<ExitCode> {
    let options = crate::extract::shard::CombineOptions {
        overwrite: a.force,
        max_shard_size: crate::config::size_flag("--max-shard-size", &a.max_shard_size)?,
        base: a.base.clone(),
        ft: a.ft.clone(),
    };
    crate::interrupt::install();
    let report = crate::extract::shard::combine(&a.parts, &a.out, &options)?;
    super::extract::show(&report, ui, a.json)?;
    Ok(ExitCode::SUCCESS)
}
