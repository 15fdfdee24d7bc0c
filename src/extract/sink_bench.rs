//! `phlora bench --sink DIR`: the sink stage alone, at the scale of a large model. Each
//! tensor's factors (bytes of the right size for Llama-3-70B's shapes) are journaled — bytes
//! and record, both synced — and staged into the adapter writer, as the writer thread does
//! during a run; then the adapter is committed and the journal removed. It tells whether the
//! disk under OUT keeps up with the GPUs, and what the journal costs there.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::job::Finished;
use super::journal::{Fingerprint, Journal};
use super::place::FactorTensors;
use crate::adapter::AdapterWriter;
use crate::error::Result;
use crate::report::TensorAction;
use crate::report::{StageSeconds, TensorReport};

/// Llama-3-70B: hidden 8192, intermediate 28672, 8 KV heads of 128, vocabulary 128256.
const LAYER: [(&str, usize, usize); 7] = [
    ("self_attn.q_proj", 8192, 8192),
    ("self_attn.k_proj", 1024, 8192),
    ("self_attn.v_proj", 1024, 8192),
    ("self_attn.o_proj", 8192, 8192),
    ("mlp.gate_proj", 28672, 8192),
    ("mlp.up_proj", 28672, 8192),
    ("mlp.down_proj", 8192, 28672),
];
const VOCAB: usize = 128_256;

#[derive(Clone, Debug, Serialize)]
pub struct SinkBench {
    pub rank: usize,
    pub layers: usize,
    pub tensors: usize,
    /// Factor bytes (bf16), once; the journal and the staging file each hold them too.
    pub bytes: u64,
    /// Writer-thread time: journaling (write + 2 syncs per tensor) and staging.
    pub journal_seconds: f64,
    pub stage_seconds: f64,
    /// The commit: the adapter file written from staging and synced, the journal removed.
    pub commit_seconds: f64,
}

impl SinkBench {
    /// Tensors per second the writer thread sustains while tensors arrive.
    pub fn tensors_per_second(&self) -> f64 {
        self.tensors as f64 / (self.journal_seconds + self.stage_seconds).max(1e-9)
    }
}

/// Runs the sink on `layers` layers (and the embedding and lm_head) at `rank` into `out`.
pub fn bench_sink(out: &Path, rank: usize, layers: usize) -> Result<SinkBench> {
    let mut shapes: Vec<(String, usize, usize)> = vec![("model.embed_tokens".into(), 8192, VOCAB)];
    for l in 0..layers {
        for (name, rows, cols) in LAYER {
            shapes.push((format!("model.layers.{l}.{name}"), rows, cols));
        }
    }
    shapes.push(("lm_head".into(), VOCAB, 8192));
    // Bytes that do not compress (a file system might).
    let largest = shapes
        .iter()
        .map(|s| rank * s.1.max(s.2) * 2)
        .max()
        .unwrap_or(0);
    let mut rng = crate::rng::Rng::new(0x5eed);
    let noise: Vec<u8> = (0..largest.div_ceil(8))
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();

    let fingerprint = Fingerprint {
        format: super::journal::JOURNAL_FORMAT,
        files: Vec::new(),
        settings: serde_json::json!({ "sink_bench": { "rank": rank, "layers": layers } }),
        shard: None,
    };
    let mut writer = AdapterWriter::create(out, true, &[])?;
    let mut journal = Journal::start(out, &fingerprint)?;
    let data = journal.data_path();
    let (mut journal_seconds, mut stage_seconds, mut bytes) = (0.0, 0.0, 0u64);
    for (index, (module, rows, cols)) in shapes.iter().enumerate() {
        let (a_len, b_len) = (rank * cols * 2, rows * rank * 2);
        let mut done = Finished {
            index,
            row: TensorReport::new(
                &format!("{module}.weight"),
                TensorAction::Lora,
                &[*rows, *cols],
            ),
            factors: Some(FactorTensors {
                a_key: crate::adapter::lora_a_key(module),
                a_shape: vec![rank, *cols],
                a_bytes: noise[..a_len].to_vec(),
                b_key: crate::adapter::lora_b_key(module),
                b_shape: vec![*rows, rank],
                b_bytes: noise[..b_len].to_vec(),
                dtype: "BF16",
                expert: None,
            }),
            module: Some(module.clone()),
            spectrum: None,
            base_sumsq: None,
            extra: None,
            stages: StageSeconds::default(),
            flops: 0.0,
        };
        bytes += (a_len + b_len) as u64;
        let clock = Instant::now();
        let at = journal.record(&done)?;
        journal_seconds += clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        super::engine::stage_journaled(Some(&mut writer), &mut done, &data, at)?;
        stage_seconds += clock.elapsed().as_secs_f64();
    }
    let clock = Instant::now();
    writer.commit("{}", "{}", &|_| None, None)?;
    journal.remove();
    let commit_seconds = clock.elapsed().as_secs_f64();
    Ok(SinkBench {
        rank,
        layers,
        tensors: shapes.len(),
        bytes,
        journal_seconds,
        stage_seconds,
        commit_seconds,
    })
}
