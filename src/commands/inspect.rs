use std::process::ExitCode;

use super::Ui;
use crate::cli::InspectArgs;
use crate::config::model_path;
use phlora::checkpoint::Checkpoint;
use phlora::error::Result;
use phlora::plan::{classify, Action, Plan, PlanOptions};

pub fn run(args: &InspectArgs, _ui: Ui) -> Result<ExitCode> {
    let ck = Checkpoint::open(&model_path(&args.path)?)?;
    let opts = PlanOptions::all();
    // With --base, the real planner runs (pairing, shapes, dtypes); without, names and shapes.
    let rows: Vec<(String, String, Vec<usize>, Action)> = match &args.base {
        Some(b) => {
            let base = Checkpoint::open(&model_path(b)?)?;
            Plan::build(&base, &ck, &opts)?
                .items
                .into_iter()
                .map(|i| (i.name, format!("{:?}", i.ft.dtype), i.shape, i.action))
                .collect()
        }
        None => ck
            .tensors()
            .iter()
            .map(|t| {
                let action = if t.float_dtype().is_some() {
                    classify(&t.name, &t.shape, &opts)
                } else {
                    Action::NotCarried(format!("dtype {:?} is not supported", t.dtype))
                };
                (
                    t.name.clone(),
                    format!("{:?}", t.dtype),
                    t.shape.clone(),
                    action,
                )
            })
            .collect(),
    };
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, d, s, a)| serde_json::json!({"name": n, "dtype": d, "shape": s, "action": a}))
            .collect();
        phlora::outln!(
            "{}",
            serde_json::to_string_pretty(&v).expect("json serializes")
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(6).max(6);
    phlora::outln!(
        "{:<width$}  {:<6}  {:>14}  what extract would do",
        "tensor",
        "dtype",
        "shape"
    )?;
    for (name, dtype, shape, action) in &rows {
        let shape = shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("×");
        let what = match action {
            Action::LoraLinear => "LoRA (lora_A/lora_B) if changed".to_string(),
            Action::LoraEmbedding => "LoRA (lora_embedding_A/B) if changed".to_string(),
            Action::SaveWhole => "saved whole (modules_to_save) if changed".to_string(),
            Action::LoraBias => "lora_B.bias (--lora-bias) if changed".to_string(),
            Action::NotCarried(r) => format!("not carried: {r}"),
            Action::Unchanged => "unchanged".to_string(),
        };
        phlora::outln!("{name:<width$}  {dtype:<6}  {shape:>14}  {what}")?;
    }
    let count = |f: fn(&Action) -> bool| rows.iter().filter(|r| f(&r.3)).count();
    phlora::outln!(
        "{} tensors in {} shard(s): {} LoRA targets, {} norms, {} not carried",
        rows.len(),
        ck.num_shards(),
        count(Action::is_lora),
        count(|a| *a == Action::SaveWhole),
        count(|a| matches!(a, Action::NotCarried(_)))
    )?;
    Ok(ExitCode::SUCCESS)
}
