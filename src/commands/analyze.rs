use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::Ui;
use crate::cli::AnalyzeArgs;
use phlora::analyze::{analyze, AnalysisReport, AnalyzeSettings};
use phlora::error::{Error, Result};
use phlora::extract::SpectraSettings;
use phlora::plan::Glob;
use phlora::plot;
use phlora::staging::write_atomically;

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
    let mut spectra = SpectraSettings::new(
        crate::config::model_path(&a.base)?,
        crate::config::model_path(&a.ft)?,
        cap,
    );
    spectra.device = a.device;
    spectra.max_ram = a.max_ram;
    spectra.max_vram = a.max_vram;
    spectra.plan.include = a.include.iter().map(|g| Glob::new(g)).collect();
    spectra.plan.exclude = a.exclude.iter().map(|g| Glob::new(g)).collect();
    spectra.progress = !ui.quiet;
    spectra.plan.remove_logit_shift = a.remove_logit_shift;
    if let Some(floor) = a.min_rank.filter(|&f| f > cap) {
        return Err(Error::Settings(format!(
            "--min-rank {floor} is above the ranks computed (--max-rank {cap})"
        )));
    }
    let mut energies = a.energies.clone();
    if !energies.contains(&a.heatmap_energy) {
        energies.push(a.heatmap_energy);
    }
    let budget = a.budget;
    let settings = AnalyzeSettings {
        budget,
        min_rank: a.min_rank,
        spectra,
        ranks: a.ranks.clone(),
        energies,
        heatmap_energy: a.heatmap_energy,
        head: a.head,
    };
    let mut report = analyze(&settings)?;
    write_outputs(&mut report, &a.out)?;
    if !ui.quiet {
        phlora::say_raw!("{}", report.table());
        phlora::say!("written: {}", report.files.join(", "));
    }
    if a.json {
        phlora::outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plain data serialises")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// DIR/analysis.json, analysis.csv, energy_curves and rank_heatmap (and with --budget one
/// allocation heatmap per rule) as SVG and PNG; each figure drawn once and rendered twice.
fn write_outputs(report: &mut AnalysisReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create output folder", e))?;
    let mut figures = vec![
        ("energy_curves".to_string(), plot::energy_curves(report)),
        ("rank_heatmap".to_string(), plot::rank_heatmap(report)),
    ];
    for a in &report.budget {
        figures.push((
            format!("allocation_{}", a.rule.as_str()),
            plot::allocation_heatmap(report, a),
        ));
    }
    let mut files: Vec<(PathBuf, Vec<u8>)> =
        vec![(dir.join("analysis.csv"), report.csv().into_bytes())];
    for (name, fig) in &figures {
        files.push((dir.join(format!("{name}.svg")), fig.svg().into_bytes()));
        files.push((dir.join(format!("{name}.png")), fig.png()?));
    }
    let json = dir.join("analysis.json");
    report.files = files
        .iter()
        .map(|(p, _)| p)
        .chain([&json])
        .map(|p| p.display().to_string())
        .collect();
    let text = serde_json::to_string_pretty(&report).expect("plain data serialises");
    files.push((json, text.into_bytes()));
    for (path, bytes) in files {
        write_atomically(&path, &bytes)?;
    }
    Ok(())
}
