use std::path::PathBuf;
use std::process::ExitCode;

use super::Ui;
use crate::cli::DemoArgs;
use phlora::error::{Error, Result};
use phlora::extract::ExtractSettings;
use phlora::synth::SynthSettings;

/// synth (small) → extract → report → verify, in seconds.
pub fn run(args: &DemoArgs, ui: Ui) -> Result<ExitCode> {
    if args.rank == 0 {
        return Err(Error::Settings("--rank must be at least 1".into()));
    }
    let (dir, temporary) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("phlora-demo-{}", std::process::id())),
            true,
        ),
    };
    let result = demo(&dir, args.rank, ui);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn demo(dir: &std::path::Path, rank: usize, ui: Ui) -> Result<ExitCode> {
    // The demo's folder is its own: a second demo replaces the first's pair.
    let synth = SynthSettings {
        overwrite: true,
        ..SynthSettings::tiny(dir.to_path_buf())
    };
    if !ui.quiet {
        phlora::say!(
            "1/3 synthesising a Llama-shaped pair (hidden {}, intermediate {}, {} layers, vocab {}) in {}",
            synth.hidden,
            synth.intermediate,
            synth.layers,
            synth.vocab,
            dir.display()
        );
    }
    let pair = phlora::synth::synth(&synth)?;
    let out: PathBuf = dir.join("adapter");
    if !ui.quiet {
        phlora::say!(
            "2/3 extracting a rank-{rank} adapter into {}",
            out.display()
        );
    }
    let mut s = ExtractSettings::new(pair.base.clone(), pair.ft.clone(), out.clone(), rank);
    s.overwrite = true;
    s.progress = !ui.quiet;
    let report = phlora::extract::extract(&s)?;
    super::extract::show(&report, ui, false)?;
    // An independent check of the files: merge in row blocks and compare with the fine-tune.
    let check = phlora::verify::verify(&phlora::verify::VerifySettings {
        base: pair.base,
        ft: pair.ft,
        adapter: out,
        min_cos: None,
        max_error: None,
        min_weight_cos: None,
    })?;
    if !ui.quiet {
        phlora::say!(
            "3/3 verify (W_base + B·A against W_ft, recomputed from the files): total relative error {:.5} (extract's certificate: {:.5}), worst cos(ΔW) {:.4}",
            check.total_relative_error, report.summary.total_relative_error, check.worst_cos_delta
        );
    }
    if !ui.quiet && dir.starts_with(std::env::temp_dir()) {
        phlora::say!("(the demo folder is temporary; pass --dir DIR to keep it)");
    }
    Ok(ExitCode::SUCCESS)
}
