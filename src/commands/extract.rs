use std::process::ExitCode;

use super::Ui;
use crate::cli::ExtractArgs;
use phlora::error::Result;
use phlora::report::RunReport;

pub fn run(args: &ExtractArgs, ui: Ui) -> Result<ExitCode> {
    let settings = args.settings(!ui.quiet)?;
    phlora::interrupt::install();
    if let Some(shard) = settings.shard {
        let part = phlora::extract::extract_part(&settings)?;
        if !ui.quiet {
            phlora::say!(
                "shard {}/{}: {} tensors in {:.1} s, kept as a part in {}; join all {} parts with `phlora combine PART... --out ADAPTER`",
                shard.index, shard.count, part.tensors, part.seconds, part.out, shard.count
            );
        }
        if args.json {
            phlora::outln!(
                "{}",
                serde_json::to_string_pretty(&part).expect("plain data serializes")
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let report = phlora::extract::extract(&settings)?;
    show(&report, ui, args.json)?;
    if args.profile {
        phlora::say_raw!("{}", report.profile());
    }
    Ok(ExitCode::SUCCESS)
}

/// The table on stderr (unless quiet) and the JSON summary on stdout (if asked).
pub(super) fn show(report: &RunReport, ui: Ui, json: bool) -> Result<()> {
    if !ui.quiet {
        phlora::say_raw!("{}", report.table());
        phlora::say!("adapter written to {}", report.out);
        if let Some(g) = &report.gguf {
            phlora::say_raw!("{}", super::convert::render(g));
        }
    }
    if json {
        let summary = serde_json::json!({
            "out": report.out,
            "base": report.base,
            "ft": report.ft,
            "device": report.device,
            "rank": report.rank,
            "svd": report.svd,
            "out_dtype": report.out_dtype,
            "summary": report.summary,
            "gguf": report.gguf,
        });
        phlora::outln!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("json serializes")
        )?;
    }
    Ok(())
}
