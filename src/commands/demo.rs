use std::path::PathBuf;
use std::process::ExitCode;

use super::Ui;
use crate::cli::DemoArgs;
use crate::error::{Error, Result};
use crate::extract::ExtractSettings;
use crate::synth::SynthSettings;

/// synth (small) → extract → report, in seconds.
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
    let synth = SynthSettings::tiny(dir.to_path_buf());
    if !ui.quiet {
        eprintln!(
            "1/2 synthesising a Llama-shaped pair (hidden {}, intermediate {}, {} layers, vocab {}) in {}",
            synth.hidden,
            synth.intermediate,
            synth.layers,
            synth.vocab,
            dir.display()
        );
    }
    let pair = crate::synth::synth(&synth)?;
    let out: PathBuf = dir.join("adapter");
    if !ui.quiet {
        eprintln!(
            "2/2 extracting a rank-{rank} adapter into {}",
            out.display()
        );
    }
    let mut s = ExtractSettings::new(pair.base, pair.ft, out, rank);
    s.overwrite = true;
    s.progress = !ui.quiet;
    let report = crate::extract::extract(&s)?;
    super::extract::show(&report, ui, false);
    if !ui.quiet && dir.starts_with(std::env::temp_dir()) {
        eprintln!("(the demo folder is temporary; pass --dir DIR to keep it)");
    }
    Ok(ExitCode::SUCCESS)
}
