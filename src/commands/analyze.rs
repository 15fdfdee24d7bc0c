use std::process::ExitCode;

use super::Ui;
use crate::analyze::{analyze, AnalyzeSettings};
use crate::cli::AnalyzeArgs;
use crate::error::{Error, Result};
use crate::extract::ExtractSettings;
use crate::plan::Glob;

pub fn run(a: &AnalyzeArgs, ui: Ui) -> Result<ExitCode> {
    if a.ranks.is_empty() || a.ranks.contains(&0) {
        return Err(Error::Settings("--ranks: expected positive ranks".into()));
    }
    let valid = |t: f64| t > 0.0 && t <= 1.0;
    if !a.energies.iter().copied().all(valid) || !valid(a.heatmap_energy) {
        return Err(Error::Settings(
            "--energies and --heatmap-energy: expected 0 < T ≤ 1".into(),
        ));
    }
    let cap = a
        .max_rank
        .unwrap_or_else(|| a.ranks.iter().copied().max().unwrap_or(256));
    if cap == 0 {
        return Err(Error::Settings("--max-rank must be at least 1".into()));
    }
    let device = crate::config::device_flag(&a.device)?;
    let mut extract = ExtractSettings::new(a.base.clone(), a.ft.clone(), a.out.clone(), cap);
    extract.device = device;
    extract.max_ram = crate::config::size_flag("--max-ram", &a.max_ram)?;
    extract.max_vram = crate::config::size_flag("--max-vram", &a.max_vram)?;
    extract.plan.include = a.include.iter().map(|g| Glob::new(g)).collect();
    extract.plan.exclude = a.exclude.iter().map(|g| Glob::new(g)).collect();
    extract.progress = !ui.quiet;
    extract.plan.remove_logit_shift = a.remove_logit_shift;
    if let Some(floor) = a.min_rank.filter(|&f| f > cap) {
        return Err(Error::Settings(format!(
            "--min-rank {floor} is above the ranks computed (--max-rank {cap})"
        )));
    }
    let mut energies = a.energies.clone();
    if !energies.contains(&a.heatmap_energy) {
        energies.push(a.heatmap_energy);
    }
    let budget = match &a.budget {
        None => None,
        Some(b) => Some(crate::config::parse_count(b).ok_or_else(|| {
            Error::Settings(format!(
                "--budget `{b}`: expected a parameter count such as 20M or 1.5G"
            ))
        })?),
    };
    let settings = AnalyzeSettings {
        budget,
        min_rank: a.min_rank,
        extract,
        ranks: a.ranks.clone(),
        energies,
        heatmap_energy: a.heatmap_energy,
        head: a.head,
    };
    let report = analyze(&settings, &a.out)?;
    if !ui.quiet {
        crate::say_raw!("{}", report.table());
        crate::say!("written: {}", report.files.join(", "));
    }
    if a.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plain data serialises")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
