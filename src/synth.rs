//! A realistic synthetic (base, fine-tune) pair with Llama naming and shapes: config.json and
//! sharded safetensors, written tensor by tensor so memory holds one tensor at a time.
//!
//! Base weights are N(0, 0.02²). Each 2-D ΔW is a planted low-rank part with a power-law
//! spectrum σᵢ ∝ (i+1)^(−decay), i < delta_rank, plus dense Gaussian noise; its RMS is
//! `delta_scale` × the base's. Norms get small dense changes. Both are rounded to `dtype`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use faer::{Accum, Mat, Par};
use rayon::prelude::*;

use crate::checkpoint::dtype::encode_into;
use crate::checkpoint::writer::{HeaderEntry, StreamWriter};
use crate::checkpoint::{DType, INDEX_FILE};
use crate::error::{Error, Result};
use crate::rng::{derive, normal_matrix, seed_for, Rng};

#[derive(Clone, Debug)]
pub struct SynthSettings {
    pub out: PathBuf,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub seed: u64,
    pub dtype: DType,
    /// Rank of the planted part of each ΔW (clamped to the matrix).
    pub delta_rank: usize,
    /// Power-law exponent of the planted spectrum.
    pub decay: f64,
    /// RMS of ΔW's planted part relative to the base weights' RMS.
    pub delta_scale: f64,
    /// RMS of the dense noise relative to the planted part's RMS.
    pub noise: f64,
    /// Largest shard in bytes (a shard holds at least one tensor).
    pub shard_bytes: u64,
    /// Omit lm_head (tied embeddings).
    pub tie_embeddings: bool,
    /// Replace a pair already in OUT.
    pub overwrite: bool,
}

impl SynthSettings {
    /// The ~1B Llama-shaped pair of the benchmarks.
    pub fn llama_1b(out: PathBuf) -> Self {
        SynthSettings {
            out,
            hidden: 2048,
            intermediate: 8192,
            layers: 16,
            heads: 16,
            kv_heads: 8,
            vocab: 32000,
            seed: 0,
            dtype: DType::BF16,
            delta_rank: 256,
            decay: 0.6,
            delta_scale: 0.1,
            noise: 0.2,
            shard_bytes: 1 << 30,
            tie_embeddings: false,
            overwrite: false,
        }
    }

    /// A small pair that is synthesised and extracted in seconds (the demo).
    pub fn tiny(out: PathBuf) -> Self {
        SynthSettings {
            hidden: 256,
            intermediate: 688,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            vocab: 1024,
            delta_rank: 64,
            shard_bytes: 4 << 20,
            ..Self::llama_1b(out)
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Settings(m));
        if self.hidden == 0 || self.intermediate == 0 || self.vocab == 0 || self.layers == 0 {
            return bad("hidden, intermediate, vocab and layers must be at least 1".into());
        }
        if self.heads == 0 || self.hidden % self.heads != 0 {
            return bad(format!(
                "hidden ({}) must be a multiple of heads ({})",
                self.hidden, self.heads
            ));
        }
        if self.kv_heads == 0 || self.heads % self.kv_heads != 0 {
            return bad(format!(
                "heads ({}) must be a multiple of kv-heads ({})",
                self.heads, self.kv_heads
            ));
        }
        if self.delta_rank == 0 {
            return bad("delta-rank must be at least 1".into());
        }
        self.check_memory()
    }

    /// Each tensor is synthesised whole in f32 (the base, ΔWᵀ and its planted factors at
    /// once): a shape whose bytes overflow, or that this machine's memory cannot hold, is
    /// refused by name instead of panicking in the allocator.
    fn check_memory(&self) -> Result<()> {
        let physical = physical_memory();
        for (name, shape) in self.tensors() {
            // Base and ΔWᵀ in f32, both encoded, and the planted factors.
            let rank = self
                .delta_rank
                .min(shape.iter().copied().min().unwrap_or(1));
            let needed = shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .and_then(|n| n.checked_mul(12))
                .and_then(|n| {
                    n.checked_add(
                        (rank as u64).checked_mul(4 * shape.iter().sum::<usize>() as u64)?,
                    )
                });
            if needed.map_or(true, |b| b > physical) {
                return Err(Error::Settings(format!(
                    "tensor `{name}` {shape:?} needs {} of memory to synthesise; this machine has {:.1} GB",
                    needed.map_or("more than 2⁶⁴ bytes".into(), |b| format!("{:.1} GB", b as f64 / 1e9)),
                    physical as f64 / 1e9
                )));
            }
        }
        Ok(())
    }

    /// Every tensor of the model in Llama order, with its shape.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden, self.intermediate);
        let kv = self.kv_heads * (h / self.heads);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        t.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_embeddings {
            t.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        t
    }

    fn config_json(&self, name: &str) -> serde_json::Value {
        serde_json::json!({
            "_name_or_path": name,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": self.dtype.torch_name(),
        })
    }
}

/// What `synth` wrote.
pub struct SynthOutput {
    pub base: PathBuf,
    pub ft: PathBuf,
    pub tensors: usize,
    pub shards: usize,
    pub bytes_per_model: u64,
}

/// This machine's memory in bytes (u64::MAX when unknown).
fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page > 0 {
        (pages as u64).saturating_mul(page as u64)
    } else {
        u64::MAX
    }
}

/// What synth writes into a model folder: the files of an older pair there, replaced.
fn is_synth_file(name: &str) -> bool {
    name == "config.json"
        || name == INDEX_FILE
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// Refuses to replace a pair unless `overwrite`; then removes the older pair's files (shards
/// of another count would be left beside the new ones).
fn clear_pair(dirs: [&Path; 2], overwrite: bool) -> Result<()> {
    for dir in dirs {
        let old: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(is_synth_file))
            .map(|e| e.path())
            .collect();
        if old.is_empty() {
            continue;
        }
        if !overwrite {
            return Err(Error::checkpoint(
                dir,
                "already holds a model (config.json, shards); pass --force to replace the pair",
            ));
        }
        for p in old {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, "cannot replace", e))?;
        }
    }
    Ok(())
}

/// Writes `out/base` and `out/ft`.
pub fn synth(s: &SynthSettings) -> Result<SynthOutput> {
    s.validate()?;
    let _lock = crate::outdir::OutLock::acquire(&s.out, "synth")?;
    clear_pair([&s.out.join("base"), &s.out.join("ft")], s.overwrite)?;
    let tensors = s.tensors();
    let shards = shard_plan(&tensors, s.dtype, s.shard_bytes);
    let (base_dir, ft_dir) = (s.out.join("base"), s.out.join("ft"));
    let n_shards = shards.len();
    let shard_name = |k: usize| format!("model-{:05}-of-{:05}.safetensors", k + 1, n_shards);
    for (dir, name) in [
        (&base_dir, "phlora-synth/base"),
        (&ft_dir, "phlora-synth/ft"),
    ] {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create folder", e))?;
        write_json(&dir.join("config.json"), &s.config_json(name))?;
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (k, range) in shards.iter().enumerate() {
        let entries: Vec<HeaderEntry> = tensors[range.clone()]
            .iter()
            .map(|(name, shape)| HeaderEntry {
                name: name.clone(),
                dtype: s.dtype.as_str(),
                shape: shape.clone(),
                nbytes: shape.iter().product::<usize>() * s.dtype.size(),
            })
            .collect();
        total += entries.iter().map(|e| e.nbytes as u64).sum::<u64>();
        let mut wb = StreamWriter::create(&base_dir.join(shard_name(k)), entries.clone(), &meta)?;
        let mut wf = StreamWriter::create(&ft_dir.join(shard_name(k)), entries, &meta)?;
        for (name, shape) in &tensors[range.clone()] {
            let (b, f) = pair_tensor(s, name, shape);
            wb.write(name, &b)?;
            wf.write(name, &f)?;
            weight_map.insert(name.clone(), shard_name(k));
        }
        wb.finish()?;
        wf.finish()?;
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    for dir in [&base_dir, &ft_dir] {
        write_json(&dir.join(INDEX_FILE), &index)?;
    }
    Ok(SynthOutput {
        base: base_dir,
        ft: ft_dir,
        tensors: tensors.len(),
        shards: n_shards,
        bytes_per_model: total,
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("json serializes");
    std::fs::write(path, text).map_err(|e| Error::io(path, "cannot write", e))
}

/// Consecutive tensor ranges whose bytes stay under `limit` (one tensor at least).
fn shard_plan(
    tensors: &[(String, Vec<usize>)],
    dtype: DType,
    limit: u64,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, (_, shape)) in tensors.iter().enumerate() {
        let b = (shape.iter().product::<usize>() * dtype.size()) as u64;
        if i > start && bytes + b > limit {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += b;
    }
    out.push(start..tensors.len());
    out
}

/// The encoded base and fine-tuned bytes of one tensor.
pub fn pair_tensor(s: &SynthSettings, name: &str, shape: &[usize]) -> (Vec<u8>, Vec<u8>) {
    let seed = seed_for(s.seed, name);
    let base_std = 0.02f64;
    match shape {
        [n] => {
            let mut rng = Rng::new(seed);
            let base: Vec<f32> = (0..*n)
                .map(|_| (1.0 + 0.02 * rng.normal()) as f32)
                .collect();
            let ft: Vec<f32> = base
                .iter()
                .map(|b| b + (0.005 * rng.normal()) as f32)
                .collect();
            (encode(s.dtype, &base), encode(s.dtype, &ft))
        }
        [rows, cols] => {
            let (rows, cols) = (*rows, *cols);
            // Column-major cols×rows storage: column i is row i of the row-major tensor.
            let mut base = normal_matrix(cols, rows, derive(seed, 1));
            scale(&mut base, base_std as f32);
            let delta = planted_delta_t(s, rows, cols, seed);
            let mut ft = delta;
            // By columns on all cores: a 70B layer is 0.86 G elements per checkpoint.
            ft.par_col_iter_mut()
                .zip(base.par_col_iter())
                .for_each(|(f, b)| f.iter_mut().zip(b.iter()).for_each(|(f, b)| *f += *b));
            (encode_cols(s.dtype, &base), encode_cols(s.dtype, &ft))
        }
        _ => unreachable!("synth writes only 1-D and 2-D tensors"),
    }
}

/// ΔWᵀ (cols×rows): V·diag(σ)·Uᵀ plus noise, scaled to the requested RMS.
fn planted_delta_t(s: &SynthSettings, rows: usize, cols: usize, seed: u64) -> Mat<f32> {
    let r = s.delta_rank.min(rows).min(cols);
    let sigma: Vec<f64> = (0..r).map(|i| (i as f64 + 1.0).powf(-s.decay)).collect();
    let norm2: f64 = sigma.iter().map(|x| x * x).sum();
    // With columns of U and V of unit norm on average, ‖UΣVᵀ‖² ≈ Σσ²; scale to the target.
    let target_rms = 0.02 * s.delta_scale;
    let amplitude = target_rms * ((rows * cols) as f64 / norm2).sqrt();
    let mut v = normal_matrix(cols, r, derive(seed, 2));
    let u = normal_matrix(rows, r, derive(seed, 3));
    for (k, sk) in sigma.iter().enumerate() {
        let c = (sk * amplitude / ((rows * cols) as f64).sqrt()) as f32;
        v.col_mut(k).iter_mut().for_each(|x| *x *= c);
    }
    let mut dt = normal_matrix(cols, rows, derive(seed, 4));
    let noise = (target_rms * s.noise) as f32;
    scale(&mut dt, noise);
    faer::linalg::matmul::matmul(
        dt.as_mut(),
        Accum::Add,
        v.as_ref(),
        u.transpose(),
        1.0,
        Par::rayon(0),
    );
    dt
}

fn scale(m: &mut Mat<f32>, c: f32) {
    m.par_col_iter_mut()
        .for_each(|col| col.iter_mut().for_each(|x| *x *= c));
}

fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(dtype, v, &mut out);
    out
}

/// Encodes a column-major matrix column by column (= the row-major tensor it stores), the
/// columns on all cores.
fn encode_cols(dtype: DType, m: &Mat<f32>) -> Vec<u8> {
    let width = m.nrows() * dtype.size();
    let mut out = vec![0u8; m.ncols() * width];
    if width == 0 {
        return out;
    }
    out.par_chunks_mut(width)
        .zip(m.par_col_iter())
        // One scratch buffer per rayon job, not one allocation per column.
        .for_each_init(
            || Vec::with_capacity(width),
            |bytes, (dst, col)| {
                let col = col
                    .try_as_col_major()
                    .expect("owned columns are contiguous");
                bytes.clear();
                encode_into(dtype, col.as_slice(), bytes);
                dst.copy_from_slice(bytes);
            },
        );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_plan_respects_the_limit_and_covers_everything() {
        let t: Vec<(String, Vec<usize>)> = (0..10).map(|i| (format!("t{i}"), vec![100])).collect();
        let p = shard_plan(&t, DType::BF16, 450);
        assert_eq!(p, vec![0..2, 2..4, 4..6, 6..8, 8..10]);
        let p = shard_plan(&t, DType::BF16, 10);
        assert_eq!(p.len(), 10);
    }

    #[test]
    fn llama_shapes() {
        let s = SynthSettings::llama_1b(PathBuf::from("x"));
        let t = s.tensors();
        assert_eq!(t.len(), 1 + 16 * 9 + 2);
        let k = t
            .iter()
            .find(|(n, _)| n == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        assert_eq!(k.1, vec![1024, 2048]);
    }
}
