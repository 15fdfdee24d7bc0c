use std::process::ExitCode;

use super::Ui;
use crate::cli::MergeArgs;
use crate::config::{adapter_path, model_path};
use phlora::error::Result;
use phlora::merge::{merge, MergeSettings};

pub fn run(a: &MergeArgs, ui: Ui) -> Result<ExitCode> {
    phlora::interrupt::install();
    let report = merge(&MergeSettings {
        base: model_path(&a.base)?,
        adapter: adapter_path(&a.adapter)?,
        out: a.out.clone(),
        overwrite: a.force,
    })?;
    if !ui.quiet {
        phlora::say!(
            "merged {} LoRA modules and replaced {} whole tensors into {} shard(s), {:.1} MB, in {:.2} s; copied {}; written to {}",
            report.merged,
            report.replaced,
            report.shards,
            report.bytes as f64 / 1e6,
            report.seconds,
            if report.copied_files.is_empty() { "nothing else".to_string() } else { report.copied_files.join(", ") },
            report.out
        );
    }
    if a.json {
        phlora::outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plain data serialises")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
