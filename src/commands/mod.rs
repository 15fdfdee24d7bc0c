//! One file per subcommand; each is a thin orchestration of the library's stages.

mod analyze;
mod bench;
mod check;
mod combine;
mod compare;
mod convert;
mod demo;
mod extract;
mod floor;
mod inspect;
mod merge;
mod synth;
mod verify;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use phlora::error::Result;

/// Runs a parsed command line.
pub fn run(cli: &Cli) -> Result<ExitCode> {
    let ui = Ui { quiet: cli.quiet };
    match &cli.command {
        Command::Extract(a) => extract::run(a, ui),
        Command::Synth(a) => synth::run(a, ui),
        Command::Demo(a) => demo::run(a, ui),
        Command::Inspect(a) => inspect::run(a, ui),
        Command::Bench(a) => bench::run(a, ui),
        Command::Floor(a) => floor::run(a, ui),
        Command::Verify(a) => verify::run(a, ui),
        Command::Merge(a) => merge::run(a, ui),
        Command::Check(a) => check::run(a, ui),
        Command::Convert(a) => convert::run(a, ui),
        Command::Combine(a) => combine::run(a, ui),
        Command::Compare(a) => compare::run(a, ui),
        Command::Analyze(a) => analyze::run(a, ui),
    }
}

/// What the user asked to see on stderr.
#[derive(Clone, Copy, Debug)]
pub struct Ui {
    pub quiet: bool,
}

/// A command's result: the table on stdout, or with `--json` the JSON on stdout and the table
/// on stderr (unless quiet).
fn emit(text: &str, json: bool, report: &impl serde::Serialize, ui: Ui) -> Result<()> {
    if json {
        if !ui.quiet {
            phlora::say_raw!("{text}");
        }
        phlora::outln!(
            "{}",
            serde_json::to_string_pretty(report).expect("plain data serialises")
        )?;
    } else {
        phlora::out!("{text}")?;
    }
    Ok(())
}
