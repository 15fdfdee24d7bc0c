//! A PEFT LoRA adapter as llama.cpp's GGUF LoRA (`adapter.gguf`; the rules in docs/gguf.md).
//!
//! Every module keeps its exact update: llama.cpp scales each tensor by alpha / rank with one
//! global alpha, so the module's own scale (its rank_pattern, alpha_pattern, rsLoRA) is baked
//! into B and alpha is written as 0, which llama.cpp reads as scale 1. Q and K of the
//! architectures llama.cpp's converter permutes get B's rows permuted the same way. What
//! GGUF LoRA cannot carry (norms, other tensors saved whole, biases, fused experts, an
//! embedding or head that is token_embd's on a tied base) is left out and reported with its
//! share of the adapter's ‖ΔW‖².

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::read::{Adapter, Layout, LoraModule};
use crate::checkpoint::dtype::{self, DType};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gguf::{self, llama_cpp, TensorSpec, TensorType};

/// The file `extract --target llama.cpp` writes beside the PEFT adapter.
pub const GGUF_FILE: &str = "adapter.gguf";

/// What `extract --target llama.cpp` converts with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GgufSettings {
    /// None: the adapter's own dtype.
    pub tensor_type: Option<TensorType>,
}

/// What llama.cpp needs to know of the base model: its config.json, read.
#[derive(Clone, Debug)]
pub struct BaseModel {
    pub config: PathBuf,
    /// transformers' class (`architectures[0]`).
    pub class: String,
    /// llama.cpp's architecture name.
    pub arch: &'static str,
    /// Attention heads (needed where Q/K rows are permuted; Gemma 3's multimodal configs
    /// leave them out).
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub hidden: Option<usize>,
    pub vocab: Option<usize>,
    /// The output head is the embedding matrix (llama.cpp's `output` is `token_embd`).
    pub tied: bool,
}

impl BaseModel {
    /// The base's config.json: `base` is a model folder (its weights are not needed) or a
    /// .safetensors file beside one.
    pub fn read(base: &Path) -> Result<BaseModel> {
        let config = if base.is_dir() {
            base.join("config.json")
        } else {
            base.with_file_name("config.json")
        };
        let text = crate::checkpoint::input::read_string(&config)?;
        let json: Json = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(&config, format!("not valid JSON: {e}")))?;
        let field = |k: &str| crate::checkpoint::config_field(&json, k);
        let count = |k: &str| field(k).and_then(Json::as_u64).map(|v| v as usize);
        let class = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string();
        let arch = llama_cpp::architecture(&class).ok_or_else(|| {
            Error::checkpoint(
                &config,
                format!(
                    "architecture `{}`: phlora writes GGUF LoRA for {} only (llama.cpp names each architecture's tensors its own way, and phlora knows these)",
                    if class.is_empty() { "none given" } else { &class },
                    llama_cpp::SUPPORTED.join(", ")
                ),
            )
        })?;
        let heads = count("num_attention_heads").filter(|&h| h > 0);
        if heads.is_none() && llama_cpp::permutes_qk(arch) {
            return Err(Error::checkpoint(
                &config,
                "no num_attention_heads: llama.cpp's Q/K row order needs it",
            ));
        }
        // transformers' default for Gemma is tied; for the others, untied.
        let tied = field("tie_word_embeddings")
            .and_then(Json::as_bool)
            .unwrap_or(arch.starts_with("gemma"));
        Ok(BaseModel {
            class,
            arch,
            heads,
            kv_heads: count("num_key_value_heads").filter(|&h| h > 0).or(heads),
            hidden: count("hidden_size"),
            vocab: count("vocab_size"),
            tied,
            config,
        })
    }
}

impl BaseModel {
    /// The heads of llama.cpp's Q/K row permutation for a module's GGUF tensor (None: not
    /// permuted).
    fn permuted_heads(&self, gguf_name: &str) -> Option<usize> {
        match gguf_name.rsplit('.').next() {
            Some("attn_q") if llama_cpp::permutes_qk(self.arch) => self.heads,
            Some("attn_k") if llama_cpp::permutes_qk(self.arch) => self.kv_heads,
            _ => None,
        }
    }

    /// The base's own Q and K weights split into the heads the permutation needs: checked
    /// before an extraction, not after it.
    pub fn check_weights(&self, weights: &Checkpoint) -> Result<()> {
        for t in weights.tensors() {
            let Some(module) = t.name.strip_suffix(".weight") else {
                continue;
            };
            let Some(name) = llama_cpp::tensor_name(&text_module(module)) else {
                continue;
            };
            let Some(heads) = self.permuted_heads(&name) else {
                continue;
            };
            let rows = t.shape.first().copied().unwrap_or(0);
            if llama_cpp::qk_row_order(rows, heads).is_none() {
                return Err(Error::tensor(
                    weights.path_of(t),
                    &t.name,
                    format!(
                        "{rows} rows do not split into {heads} heads of an even size, as llama.cpp's Q/K row order needs ({})",
                        self.config.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Why a part of the adapter is not in the GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A norm saved whole: llama.cpp's loader skips `*_norm.weight`.
    Norm,
    /// Another tensor saved whole (modules_to_save).
    SavedWhole,
    /// A lora_B.bias.
    Bias,
    /// A fused 3-D expert parameter (target_parameters).
    FusedExperts,
    /// A module llama.cpp names no tensor for (per-expert MoE, vision, …).
    NoTensor,
    /// An embedding LoRA on a tied base: it would meet the output matmul.
    TiedEmbedding,
    /// An lm_head LoRA where the base's GGUF has no output tensor.
    TiedHead,
    /// Factors over another vocabulary than the base's (a resized fine-tune).
    Vocabulary,
    /// A convolution, or a Conv1D-style (fan_in_fan_out) weight.
    Layout,
    /// New vocabulary rows (added_tokens.safetensors).
    AddedRows,
}

impl Reason {
    pub fn says(self) -> &'static str {
        match self {
            Reason::Norm => "norms (llama.cpp skips *_norm.weight in an adapter)",
            Reason::SavedWhole => "tensors saved whole (GGUF LoRA carries only lora_a/lora_b)",
            Reason::Bias => "lora_B biases (GGUF LoRA has none)",
            Reason::FusedExperts => "fused expert parameters (write per-expert LoRA: extract without --fuse-experts)",
            Reason::NoTensor => "modules llama.cpp has no tensor for",
            Reason::TiedEmbedding => "embedding LoRA on a tied base or a Gemma (llama.cpp's output is token_embd: it aborts the first decode)",
            Reason::TiedHead => "lm_head LoRA on a base whose GGUF has no output tensor (tied embeddings, or the Gemma family)",
            Reason::Vocabulary => "factors over another vocabulary than the base's",
            Reason::Layout => "convolution or fan_in_fan_out weights",
            Reason::AddedRows => "new vocabulary rows (the base GGUF has no rows for them)",
        }
    }
}

/// One part of the adapter the GGUF does not carry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeftOut {
    pub name: String,
    pub reason: Reason,
    /// Its ‖ΔW‖²_F (None: not known without the base's weights).
    pub sq_norm: Option<f64>,
}

/// What a conversion wrote, and what it left out.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GgufExport {
    pub out: String,
    pub architecture: String,
    pub tensor_type: String,
    /// Modules written (two tensors each).
    pub modules: usize,
    /// Modules whose update is zero: nothing to write.
    pub zero_modules: usize,
    /// Tensors written as f16 because q8_0 needs ne[0] a multiple of 32.
    pub f16_fallbacks: usize,
    pub bytes: u64,
    /// ‖ΔW‖² of what the file carries.
    pub carried_sq_norm: f64,
    pub left_out: Vec<LeftOut>,
}

impl GgufExport {
    /// The left-out parts' share of the adapter's ‖ΔW‖² (of what is known), and whether
    /// some part's size is unknown (the share is then a lower bound).
    pub fn left_out_share(&self) -> (f64, bool) {
        // (A sum of nothing is -0.0.)
        let known: f64 = 0.0 + self.left_out.iter().filter_map(|l| l.sq_norm).sum::<f64>();
        let total = known + self.carried_sq_norm;
        let unknown = self.left_out.iter().any(|l| l.sq_norm.is_none());
        (if total > 0.0 { known / total } else { 0.0 }, unknown)
    }

    /// One line per reason, with counts and shares, and the first names.
    pub fn left_out_lines(&self) -> Vec<String> {
        let total =
            self.carried_sq_norm + self.left_out.iter().filter_map(|l| l.sq_norm).sum::<f64>();
        let mut reasons: Vec<Reason> = self.left_out.iter().map(|l| l.reason).collect();
        reasons.sort();
        reasons.dedup();
        reasons
            .into_iter()
            .map(|r| {
                let parts: Vec<&LeftOut> = self.left_out.iter().filter(|l| l.reason == r).collect();
                let share = if parts.iter().any(|l| l.sq_norm.is_none()) {
                    "size not known: new rows, or a tensor the base's weights do not size"
                        .to_string()
                } else if total > 0.0 {
                    let sq: f64 = parts.iter().filter_map(|l| l.sq_norm).sum();
                    format!("{:.2}% of the adapter's ‖ΔW‖²", 100.0 * sq / total)
                } else {
                    "0% of ‖ΔW‖²".to_string()
                };
                let names: Vec<&str> = parts.iter().take(3).map(|l| l.name.as_str()).collect();
                let more = parts.len().saturating_sub(3);
                format!(
                    "{} {} ({share}): {}{}",
                    parts.len(),
                    r.says(),
                    names.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                )
            })
            .collect()
    }

    /// The one warning a conversion that left something out gets.
    pub fn warning(&self) -> Option<String> {
        if self.left_out.is_empty() {
            return None;
        }
        let (share, unknown) = self.left_out_share();
        let size = match (unknown, self.left_out.iter().any(|l| l.sq_norm.is_some())) {
            (false, _) => format!("{:.2}% of its ‖ΔW‖²", 100.0 * share),
            (true, true) => format!(
                "at least {:.2}% of its ‖ΔW‖² (the rest is sized with the base's weights)",
                100.0 * share
            ),
            (true, false) => "of a size known with the base's weights only".to_string(),
        };
        Some(format!(
            "{} leaves out {} part(s) of the adapter that llama.cpp cannot apply, {size}: PEFT applies them, llama.cpp will not. Small as a share may be, it can matter (norms of 0.12% of ‖ΔW‖² held top-1 agreement 0.945 against 0.656 on one measured fine-tune, docs/gguf.md); to keep everything, merge the adapter into the base (`phlora merge`) and convert the merged model",
            self.out,
            self.left_out.len(),
        ))
    }
}

/// Where a module goes in the GGUF.
struct Place {
    /// The base tensor's GGUF name, with `.weight`.
    base: String,
    /// Heads of the Q/K row permutation.
    permute: Option<usize>,
}

/// One module's pair of tensors in the GGUF.
struct Pair<'a> {
    module: &'a LoraModule,
    place: Place,
    /// Rank components kept (those with a non-zero row of A and column of B).
    keep: Vec<usize>,
    sq_norm: f64,
}

/// Converts the adapter in `adapter_dir` for the base `base` (its config.json; its weights,
/// when there, size the left-out tensors saved whole) into the GGUF file `out`, written
/// whole or not at all.
pub fn convert(
    adapter_dir: &Path,
    base: &Path,
    out: &Path,
    tensor_type: Option<TensorType>,
) -> Result<GgufExport> {
    let adapter = Adapter::open(adapter_dir)?;
    let tensor_type = tensor_type.unwrap_or_else(|| {
        let first = adapter.modules.first().and_then(|m| m.b.float_dtype());
        first.map_or(TensorType::F32, tensor_type_of)
    });
    let model = BaseModel::read(base)?;
    let weights = base_weights(base);
    let (pairs, mut left_out) = place_all(&adapter, &model)?;
    left_out.extend(whole_left_out(&adapter, weights.as_ref()));
    let zero_modules = pairs.iter().filter(|p| p.keep.is_empty()).count();
    let pairs: Vec<Pair> = pairs.into_iter().filter(|p| !p.keep.is_empty()).collect();
    if pairs.is_empty() {
        return Err(Error::checkpoint(
            adapter_dir,
            format!(
                "nothing in it is a LoRA llama.cpp can apply to {}: {}",
                model.class,
                if left_out.is_empty() {
                    "every module's update is zero".to_string()
                } else {
                    left_out
                        .iter()
                        .take(3)
                        .map(|l| format!("{} ({:?})", l.name, l.reason))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        ));
    }
    let specs = specs(&pairs, tensor_type);
    let metadata = metadata(&model, adapter_dir);
    let bytes = crate::staging::publish(out, |file| {
        let mut w =
            gguf::Writer::start(file, &metadata, &specs).map_err(|e| Error::checkpoint(out, e))?;
        for (pair, types) in pairs.iter().zip(specs.chunks(2)) {
            // Between two modules: the temporary file goes, nothing half-written stays.
            crate::interrupt::check(&out.display().to_string())?;
            let (a, b) = gguf_factors(&adapter, pair);
            for (values, spec) in [a, b].iter().zip(types) {
                let bytes = encode(values, spec.dtype).map_err(|why| {
                    Error::tensor(
                        &adapter.dir,
                        &pair.module.param,
                        format!("{}: {why}", spec.name),
                    )
                })?;
                w.tensor(&bytes).map_err(|e| Error::checkpoint(out, e))?;
            }
        }
        let file = w.finish().map_err(|e| Error::checkpoint(out, e))?;
        file.flush().map_err(|e| Error::io(out, "cannot write", e))
    })?;
    Ok(GgufExport {
        out: out.display().to_string(),
        architecture: model.arch.to_string(),
        tensor_type: tensor_type.as_str().to_string(),
        modules: pairs.len(),
        zero_modules,
        f16_fallbacks: specs.iter().filter(|s| s.dtype != tensor_type).count(),
        bytes,
        carried_sq_norm: pairs.iter().map(|p| p.sq_norm).sum(),
        left_out,
    })
}

/// The GGUF tensor type for an adapter's dtype.
fn tensor_type_of(d: DType) -> TensorType {
    match d {
        DType::F32 => TensorType::F32,
        DType::F16 => TensorType::F16,
        DType::BF16 => TensorType::BF16,
    }
}

/// The base's weights, if `base` has any (a config-only folder is enough for the GGUF).
fn base_weights(base: &Path) -> Option<Checkpoint> {
    Checkpoint::open(base).ok()
}

/// The keys llama.cpp's loader reads, as convert_lora_to_gguf.py writes them.
fn metadata(model: &BaseModel, adapter_dir: &Path) -> Vec<(&'static str, gguf::Value)> {
    use gguf::Value::{String as S, F32, U32};
    let name = adapter_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "adapter".into());
    vec![
        ("general.architecture", S(model.arch.into())),
        ("general.type", S("adapter".into())),
        ("adapter.type", S("lora".into())),
        ("general.name", S(name)),
        // Each module's scale is in its B: alpha 0 makes llama.cpp's scale 1 (a --lora-scaled
        // factor still applies).
        ("adapter.lora.alpha", F32(0.0)),
        ("general.quantization_version", U32(2)),
    ]
}

/// Every module, placed or left out.
fn place_all<'a>(adapter: &'a Adapter, model: &BaseModel) -> Result<(Vec<Pair<'a>>, Vec<LeftOut>)> {
    let (mut pairs, mut left_out) = (Vec::new(), Vec::new());
    for m in &adapter.modules {
        // (The factors are decoded again when written: the kept ranks go in the header,
        // before any tensor's data, and holding every module's factors would double the
        // adapter in memory.)
        let (a, b) = adapter.factors(m);
        let sq_norm = sq_norm_of(m, &a, &b);
        match place(adapter, m, model)? {
            Ok(place) => pairs.push(Pair {
                module: m,
                place,
                keep: kept_components(m, &a, &b),
                sq_norm,
            }),
            Err(reason) => left_out.push(LeftOut {
                name: m.param.clone(),
                reason,
                sq_norm: Some(sq_norm),
            }),
        }
        if let Some(bias) = &m.bias {
            let mut v = vec![0f32; bias.numel()];
            let d = bias.float_dtype().expect("checked when opened");
            dtype::decode_into(d, adapter.file.bytes(bias), &mut v);
            let s2 = m.scaling * m.scaling;
            left_out.push(LeftOut {
                name: format!("{}.bias", m.module),
                reason: Reason::Bias,
                sq_norm: Some(s2 * v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>()),
            });
        }
    }
    if let Some(added) = &adapter.added {
        for t in added.tensors() {
            left_out.push(LeftOut {
                name: t.name.clone(),
                reason: Reason::AddedRows,
                sq_norm: None,
            });
        }
    }
    Ok((pairs, left_out))
}

/// Where one module goes, or why it cannot (an Err of the outer Result: the adapter does not
/// fit the base).
fn place(
    adapter: &Adapter,
    m: &LoraModule,
    model: &BaseModel,
) -> Result<std::result::Result<Place, Reason>> {
    if m.experts > 0 {
        return Ok(Err(Reason::FusedExperts));
    }
    let Some(name) = llama_cpp::tensor_name(&text_module(&m.module)) else {
        return Ok(Err(Reason::NoTensor));
    };
    if m.a.shape.len() != 2 || (m.layout == Layout::Transposed && !m.embedding) {
        return Ok(Err(Reason::Layout));
    }
    let (token_embd, output) = (name == "token_embd", name == "output");
    // llama.cpp's Gemma graphs take the output from token_embd, tied or not.
    if token_embd && (model.tied || model.arch.starts_with("gemma")) {
        return Ok(Err(Reason::TiedEmbedding));
    }
    if output && (model.tied || model.arch.starts_with("gemma")) {
        return Ok(Err(Reason::TiedHead));
    }
    let weight = Adapter::weight_shape(m);
    let vocab_rows = if token_embd || output {
        Some(weight[0])
    } else {
        None
    };
    if vocab_rows.is_some() && vocab_rows != model.vocab.or(vocab_rows) {
        return Ok(Err(Reason::Vocabulary));
    }
    if token_embd != m.embedding {
        return Err(Error::tensor(
            &adapter.dir,
            &m.param,
            "an embedding's factors on a linear layer, or the reverse: not a layout llama.cpp has",
        ));
    }
    check_hidden(adapter, m, &name, &weight, model)?;
    let permute = model.permuted_heads(&name);
    if let Some(heads) = permute.filter(|&h| llama_cpp::qk_row_order(weight[0], h).is_none()) {
        return Err(Error::tensor(
            &adapter.dir,
            &m.param,
            format!(
                "{} rows do not split into {heads} heads of an even size ({}): is --base the adapter's base?",
                weight[0],
                model.config.display()
            ),
        ));
    }
    Ok(Ok(Place {
        base: format!("{name}.weight"),
        permute,
    }))
}

/// The rank components that change anything: a non-zero row of A and column of B (zero
/// padding, as `--target vllm` writes it, is dropped; the scale is in B, so this is exact).
fn kept_components(m: &LoraModule, a: &faer::Mat<f32>, b: &faer::Mat<f32>) -> Vec<usize> {
    (0..m.rank)
        .filter(|&k| {
            (0..a.ncols()).any(|j| a[(k, j)] != 0.0) && (0..b.nrows()).any(|i| b[(i, k)] != 0.0)
        })
        .collect()
}

/// The hidden size the base's config gives, against the module's side that has it.
fn check_hidden(
    adapter: &Adapter,
    m: &LoraModule,
    name: &str,
    weight: &[usize],
    model: &BaseModel,
) -> Result<()> {
    let Some(hidden) = model.hidden else {
        return Ok(());
    };
    let last = name.rsplit('.').next().unwrap_or(name);
    let side = match last {
        "attn_q" | "attn_k" | "attn_v" | "ffn_gate" | "ffn_up" | "output" | "token_embd" => {
            weight[1]
        }
        _ => weight[0],
    };
    if side == hidden {
        return Ok(());
    }
    Err(Error::tensor(
        &adapter.dir,
        &m.param,
        format!(
            "shaped {weight:?}, which does not fit the base's hidden_size {hidden} ({}): is --base the adapter's base?",
            model.config.display()
        ),
    ))
}

/// A module path without the wrappers a multimodal model puts around its language model.
fn text_module(module: &str) -> String {
    for (prefix, to) in [
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.", ""),
    ] {
        if let Some(rest) = module.strip_prefix(prefix) {
            return format!("{to}{rest}");
        }
    }
    module.to_string()
}

/// ‖scaling · B·A‖²_F = scaling² · Σ (BᵀB) ⊙ (A·Aᵀ), through the r×r Gram matrices (in f32
/// products summed in f64: a share, not a certificate); a fused module's experts one by one.
fn sq_norm_of(m: &LoraModule, a: &faer::Mat<f32>, b: &faer::Mat<f32>) -> f64 {
    let mut sq = 0f64;
    let mut add_gram_product = |a: faer::MatRef<f32>, b: faer::MatRef<f32>| {
        let (ga, gb) = (a * a.transpose(), b.transpose() * b);
        for j in 0..ga.ncols() {
            for i in 0..ga.nrows() {
                sq += ga[(i, j)] as f64 * gb[(i, j)] as f64;
            }
        }
    };
    if m.experts == 0 {
        add_gram_product(a.as_ref(), b.as_ref());
    } else {
        // Expert e: rows e·r + k of A, columns k·E + e of B.
        let (r, experts) = (m.rank, m.experts);
        for e in 0..experts {
            let ae = faer::Mat::from_fn(r, a.ncols(), |k, j| a[(e * r + k, j)]);
            let be = faer::Mat::from_fn(b.nrows(), r, |i, k| b[(i, k * experts + e)]);
            add_gram_product(ae.as_ref(), be.as_ref());
        }
    }
    m.scaling * m.scaling * sq
}

/// Tensors saved whole: never in a GGUF LoRA. Sized against the base's weights when given.
fn whole_left_out(adapter: &Adapter, weights: Option<&Checkpoint>) -> Vec<LeftOut> {
    adapter
        .whole
        .iter()
        .map(|(param, t)| {
            let base = weights.and_then(|w| w.get(param)).filter(|b| {
                b.shape == t.shape && b.float_dtype().is_some() && t.float_dtype().is_some()
            });
            let sq_norm = base.and_then(|b| {
                let w = weights?;
                let rows = t.shape.first().copied().unwrap_or(1).max(1);
                let ft = adapter.file.rows_f32(t, 0, rows);
                let old = w.rows_f32(b, 0, rows);
                Some(
                    ft.iter()
                        .zip(&old)
                        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                        .sum(),
                )
            });
            let reason = if crate::names::is_norm_module(crate::names::module_of(param)) {
                Reason::Norm
            } else {
                Reason::SavedWhole
            };
            LeftOut {
                name: param.clone(),
                reason,
                sq_norm,
            }
        })
        .collect()
}

/// lora_a then lora_b per pair, in ggml order: a linear layer's A [r, in] is ne [in, r] and
/// its B [out, r] ne [r, out]; an embedding's lora_a is Aᵀ [vocab, r] (ne [r, vocab]) and
/// its lora_b B [embd, r] (ne [r, embd]), as the converter writes them.
fn specs(pairs: &[Pair], wanted: TensorType) -> Vec<TensorSpec> {
    let mut out = Vec::with_capacity(2 * pairs.len());
    for p in pairs {
        let r = p.keep.len() as u64;
        let (rows_b, cols_a) = (p.module.b.shape[0] as u64, p.module.a.shape[1] as u64);
        let (ne_a, ne_b) = if p.module.embedding {
            (vec![r, cols_a], vec![r, rows_b])
        } else {
            (vec![cols_a, r], vec![r, rows_b])
        };
        for (suffix, ne) in [("lora_a", ne_a), ("lora_b", ne_b)] {
            // As llama.cpp's converter does: q8_0 needs whole blocks along ne[0], else f16.
            let dtype = match wanted {
                TensorType::Q8_0 if ne[0] % gguf::Q8_0_BLOCK as u64 != 0 => TensorType::F16,
                t => t,
            };
            out.push(TensorSpec {
                name: format!("{}.{suffix}", p.place.base),
                ne,
                dtype,
            });
        }
    }
    out
}

/// The pair's two tensors, row-major in ggml's layout: the kept rank components, B scaled by
/// the module's scaling (and its rows permuted for Q/K).
fn gguf_factors(adapter: &Adapter, p: &Pair) -> (Vec<f32>, Vec<f32>) {
    let (a, b) = adapter.factors(p.module);
    let (a, b) = (&a, &b);
    let s = p.module.scaling as f32;
    let (keep, out_rows) = (&p.keep, b.nrows());
    let order: Vec<usize> = match p.place.permute {
        Some(heads) => llama_cpp::qk_row_order(out_rows, heads).expect("checked when placed"),
        None => (0..out_rows).collect(),
    };
    let scaled_b: Vec<f32> = order
        .iter()
        .flat_map(|&o| keep.iter().map(move |&k| s * b[(o, k)]))
        .collect();
    let a_out: Vec<f32> = if p.module.embedding {
        // Aᵀ: row t holds token t's r coordinates.
        (0..a.ncols())
            .flat_map(|t| keep.iter().map(move |&k| a[(k, t)]))
            .collect()
    } else {
        keep.iter()
            .flat_map(|&k| (0..a.ncols()).map(move |j| a[(k, j)]))
            .collect()
    };
    (a_out, scaled_b)
}

/// The values in `t`, or why they do not fit it (each module's scale is in its lora_b, which
/// can take it past f16's range; q8_0 keeps each block's scale as an f16).
fn encode(values: &[f32], t: TensorType) -> std::result::Result<Vec<u8>, String> {
    let largest = values.iter().fold(0f32, |m, x| m.max(x.abs()));
    let limit = match t {
        TensorType::F16 => f32::from(half::f16::MAX),
        TensorType::Q8_0 => 127.0 * f32::from(half::f16::MAX),
        TensorType::F32 | TensorType::BF16 => f32::MAX,
    };
    if largest > limit {
        return Err(format!(
            "a value of {largest:e} (the module's scale is in lora_b) is beyond {}'s range; use --type bf16 or f32",
            t.as_str()
        ));
    }
    let mut out = Vec::with_capacity(values.len() * 4);
    match t {
        TensorType::F32 => dtype::encode_into(DType::F32, values, &mut out),
        TensorType::F16 => dtype::encode_into(DType::F16, values, &mut out),
        TensorType::BF16 => dtype::encode_into(DType::BF16, values, &mut out),
        TensorType::Q8_0 => gguf::encode_q8_0(values, &mut out),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_config(json: &str) -> (tempfile::TempDir, Result<BaseModel>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), json).unwrap();
        let model = BaseModel::read(dir.path());
        (dir, model)
    }

    #[test]
    fn a_base_config_gives_llama_cpps_architecture_heads_and_tying() {
        // Gemma 3's multimodal configs keep the text model's fields in text_config, and the
        // released ones leave the heads out: only Llama's Q/K order needs them.
        let (_d, m) = base_config(
            r#"{"architectures": ["Gemma3ForConditionalGeneration"],
                "text_config": {"hidden_size": 2560, "vocab_size": 262208}}"#,
        );
        let m = m.unwrap();
        assert_eq!((m.arch, m.heads, m.hidden), ("gemma3", None, Some(2560)));
        assert!(m.tied, "transformers ties Gemma by default");
        assert_eq!(m.permuted_heads("blk.0.attn_q"), None);
        let (_d, m) = base_config(
            r#"{"architectures": ["MistralForCausalLM"], "num_attention_heads": 32,
                "num_key_value_heads": 8, "tie_word_embeddings": false}"#,
        );
        let m = m.unwrap();
        assert_eq!(m.arch, "llama");
        assert_eq!(m.permuted_heads("blk.3.attn_q"), Some(32));
        assert_eq!(m.permuted_heads("blk.3.attn_k"), Some(8));
        assert_eq!(m.permuted_heads("blk.3.attn_v"), None);
        assert!(!m.tied);
        let (_d, m) = base_config(r#"{"architectures": ["LlamaForCausalLM"]}"#);
        assert!(m.unwrap_err().to_string().contains("num_attention_heads"));
        let (_d, m) = base_config(r#"{"architectures": ["MixtralForCausalLM"]}"#);
        let e = m.unwrap_err().to_string();
        assert!(
            e.contains("MixtralForCausalLM") && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn multimodal_wrappers_are_stripped_to_the_language_models_paths() {
        for (hf, gguf) in [
            (
                "model.language_model.layers.2.self_attn.o_proj",
                Some("blk.2.attn_output"),
            ),
            (
                "language_model.model.layers.0.mlp.up_proj",
                Some("blk.0.ffn_up"),
            ),
            ("language_model.lm_head", Some("output")),
            ("model.language_model.embed_tokens", Some("token_embd")),
            ("model.vision_tower.encoder.layers.0.self_attn.q_proj", None),
        ] {
            assert_eq!(
                llama_cpp::tensor_name(&text_module(hf)).as_deref(),
                gguf,
                "{hf}"
            );
        }
    }

    #[test]
    fn casts_beyond_a_types_range_are_refused_not_written_as_inf() {
        assert!(encode(&[7e4], TensorType::F16).unwrap_err().contains("f16"));
        assert!(encode(&[7e4], TensorType::BF16).is_ok());
        assert!(encode(&[6e4; 32], TensorType::Q8_0).is_ok());
        assert!(encode(&[1e7; 32], TensorType::Q8_0)
            .unwrap_err()
            .contains("q8_0"));
        assert_eq!(encode(&[1.5, -2.0], TensorType::F16).unwrap().len(), 4);
    }
}
