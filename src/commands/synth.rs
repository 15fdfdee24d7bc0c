use std::process::ExitCode;
use std::time::Instant;

use super::Ui;
use crate::cli::SynthArgs;
use phlora::error::Result;

pub fn run(args: &SynthArgs, ui: Ui) -> Result<ExitCode> {
    let settings = args.settings()?;
    let t0 = Instant::now();
    let out = phlora::synth::synth(&settings)?;
    if !ui.quiet {
        phlora::say!(
            "wrote {} and {}: {} tensors in {} shard(s), {:.1} MB per model, in {:.1} s",
            out.base.display(),
            out.ft.display(),
            out.tensors,
            out.shards,
            out.bytes_per_model as f64 / 1e6,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}
