use std::process::ExitCode;

use super::{emit, Ui};
use crate::cli::{ConvertArgs, ConvertTo, GgufTypeArg};
use crate::config::{adapter_path, model_path};
use phlora::adapter::gguf::{self, GgufExport, GGUF_FILE};
use phlora::error::{Error, Result};

pub fn run(a: &ConvertArgs, ui: Ui) -> Result<ExitCode> {
    let ConvertTo::Gguf = a.to;
    let adapter = adapter_path(&a.adapter)?;
    let base = model_path(&a.base)?;
    let out = match &a.out {
        Some(out) => out.clone(),
        // An adapter from the hub cache is not ours to write into.
        None if !a.adapter.exists() => {
            return Err(Error::Settings(format!(
                "{} is a hub id: name the file to write with --out",
                a.adapter.display()
            )))
        }
        None => adapter.join(GGUF_FILE),
    };
    if out.exists() && !a.force {
        return Err(Error::checkpoint(
            &out,
            "already exists; pass --force to replace it",
        ));
    }
    phlora::interrupt::install();
    // An extract writing into the adapter's folder is kept out while it is read.
    let _lock = phlora::outdir::OutLock::acquire_to_read(&adapter, "convert")?;
    let tensor_type = a.tensor_type.map(GgufTypeArg::tensor_type);
    let export = gguf::convert(&adapter, &base, &out, tensor_type)?;
    emit(&render(&export), a.json, &export, ui)?;
    if let Some(w) = export.warning() {
        tracing::warn!("{w}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What was written, and each reason something was left out.
pub(super) fn render(e: &GgufExport) -> String {
    let mut s = format!(
        "{}: {} modules for llama.cpp's `{}` ({} tensors, {}, {:.1} MiB; each module's scale in its lora_b, adapter.lora.alpha = 0)\n",
        e.out,
        e.modules,
        e.architecture,
        2 * e.modules,
        e.tensor_type,
        e.bytes as f64 / (1u64 << 20) as f64
    );
    if e.f16_fallbacks > 0 {
        s += &format!(
            "  {} tensors as f16: q8_0 needs ne[0] a multiple of 32\n",
            e.f16_fallbacks
        );
    }
    if e.zero_modules > 0 {
        s += &format!(
            "  {} modules with a zero update are not written\n",
            e.zero_modules
        );
    }
    for line in e.left_out_lines() {
        s += &format!("  left out: {line}\n");
    }
    s
}
