use std::process::ExitCode;

use super::Ui;
use crate::cli::FloorArgs;
use crate::config::model_path;
use phlora::backend::WorkerRequest;
use phlora::error::{Error, Result};

pub fn run(a: &FloorArgs, ui: Ui) -> Result<ExitCode> {
    let device = a.device;
    if a.in_flight == Some(0) {
        return Err(Error::Settings("--in-flight must be at least 1".into()));
    }
    let req = WorkerRequest {
        device,
        devices: a.devices.clone(),
        in_flight: a.in_flight,
        options: Default::default(),
    };
    let r = phlora::floor::measure(&model_path(&a.base)?, &model_path(&a.ft)?, &req)?;
    let text = format!(
        "input floor: {:.1} MB ({} tensors, both checkpoints) in {:.3} s = {:.2} GB/s on {} ({} worker(s)); read {:.3} s, host-to-device wait {:.3} s (summed over workers)\n",
        r.bytes as f64 / 1e6,
        r.tensors,
        r.seconds,
        r.bytes_per_s / 1e9,
        r.device,
        r.workers,
        r.read_seconds,
        r.h2d_seconds
    );
    super::emit(&text, a.json, &r, ui)?;
    Ok(ExitCode::SUCCESS)
}
