use std::process::ExitCode;

use super::Ui;
use crate::cli::ExtractArgs;
use crate::error::Result;
use crate::report::RunReport;

pub fn run(args: &ExtractArgs, ui: Ui) -> Result<ExitCode> {
    let settings = args.settings(!ui.quiet)?;
    crate::interrupt::install();
    let report = crate::extract::extract(&settings)?;
    show(&report, ui, args.json);
    if args.profile {
        eprint!("{}", report.profile());
    }
    Ok(ExitCode::SUCCESS)
}

/// The table on stderr (unless quiet) and the JSON summary on stdout (if asked).
pub(super) fn show(report: &RunReport, ui: Ui, json: bool) {
    if !ui.quiet {
        eprint!("{}", report.table());
        eprintln!("adapter written to {}", report.out);
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
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("json serializes")
        );
    }
}
