//! Command-line arguments (clap derive only; validation lives in `config`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use phlora::backend::Device;
use phlora::checkpoint::DType;
use phlora::extract::shard::Shard;

/// `--out-dtype`: the fine-tune's dtype, or one given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    Auto,
    Fixed(DType),
}

#[derive(Debug, Parser)]
#[command(
    name = "phlora",
    version,
    about = "Extract LoRA adapters from fully fine-tuned models, with no training data",
    long_about = "Extract LoRA adapters from fully fine-tuned models, with no training data.\n\n\
For each weight matrix phlora takes ΔW = W_finetuned − W_base, keeps the top singular \
directions with a (randomized) truncated SVD, and writes a PEFT adapter \
(adapter_model.safetensors + adapter_config.json) with an exact error certificate per tensor.\n\n\
Models: every --base/--ft (and inspect's PATH) is a folder (model.safetensors, or \
model.safetensors.index.json + shards), a single .safetensors file, or a Hugging Face id, \
ORG/NAME or ORG/NAME@REVISION (a branch, tag or commit hash), read from the local hub cache \
(HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub) by the hub's own rules. A path \
that exists always wins. phlora does not download: fetch both checkpoints first with the hub's \
parallel tools (`hf download ORG/NAME`).\n\n\
Start with `phlora demo`."
)]
pub struct Cli {
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors on stderr (no table, no warnings, no progress bar).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Extract a LoRA adapter from a (base, fine-tune) checkpoint pair.
    Extract(Box<ExtractArgs>),
    /// Write a synthetic Llama-shaped (base, fine-tune) pair for tests and benchmarks.
    Synth(SynthArgs),
    /// Synthesise a small pair, extract an adapter from it and show the report.
    Demo(DemoArgs),
    /// List a checkpoint's tensors and what extract would do with each.
    Inspect(InspectArgs),
    /// Randomized-SVD throughput on synthetic ΔW of known spectrum (and, on a GPU, the ΔW
    /// kernel's bandwidth), against the GEMM rate and the exact optimum.
    Bench(BenchArgs),
    /// The input floor: time to read both checkpoints once into device memory with extract's
    /// loader and workers (extract cannot be faster; compare its time with this one).
    Floor(FloorArgs),
    /// Check an adapter (phlora's or another tool's) against the pair it should reproduce:
    /// per tensor, cos and relative error of B·A·scaling against ΔW and of the merged weight
    /// against the fine-tune; exit 3 when a threshold is not met.
    Verify(VerifyArgs),
    /// Two or more adapters of the same pair (CPU and GPU, two GPUs, two versions) against the
    /// first: per module ‖ΔB·A‖/‖B·A‖, and from their report.json the residuals and ‖ΔW‖;
    /// exit 3 when one is outside the tolerances docs/determinism.md promises across devices.
    Compare(CompareArgs),
    /// Merge an adapter into its base: the full checkpoint in the base's own layout (same
    /// shards, index, dtypes; config and tokenizer files copied; untouched tensors byte for
    /// byte), written atomically.
    Merge(MergeArgs),
    /// Check an adapter (phlora's or any PEFT LoRA: mergekit's, PEFT's) against serving
    /// engines' loading rules, as read from their sources (docs/engines.md names the
    /// versions): for each engine, whether it refuses the adapter, loads it but computes
    /// another update than PEFT would (a part ignored, another scale), or loads it as PEFT
    /// does; why; and the phlora command that writes an adapter it takes. Exit 3 when a named
    /// engine refuses it (with --strict, also when one computes another update).
    Check(CheckArgs),
    /// Convert a PEFT LoRA adapter (phlora's or another tool's) to llama.cpp's GGUF LoRA, for
    /// llama.cpp and Ollama: every module at its exact scale (per-module ranks, alpha_pattern
    /// and rsLoRA baked into B), Q/K rows permuted as llama.cpp's converter permutes the
    /// base's. What GGUF LoRA cannot carry (norms, tensors saved whole, biases, an embedding
    /// or head tied to token_embd) is left out, with its share of ‖ΔW‖² (docs/gguf.md).
    Convert(ConvertArgs),
    /// Join the parts of a sharded run (`extract --shard I/N`) into one adapter.
    Combine(CombineArgs),
    /// The energy profile of a fine-tune without writing an adapter: E_r at chosen ranks, the
    /// rank each energy needs, the head of each spectrum (JSON, CSV), an energy-versus-rank
    /// plot by module type and a layer × module heatmap (SVG and PNG).
    Analyze(Box<AnalyzeArgs>),
}

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// The base model (a path or a hub id, as for extract).
    #[arg(long, value_name = "PATH|ID")]
    pub base: PathBuf,
    /// The fine-tuned model.
    #[arg(long, value_name = "PATH|ID")]
    pub ft: PathBuf,
    /// Folder for analysis.json, analysis.csv, energy_curves.svg/.png, rank_heatmap.svg/.png
    /// (and allocation_<rule>.svg/.png with --budget).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Ranks at which to report E_r.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "8,16,32,64,128,256"
    )]
    pub ranks: Vec<usize>,
    /// Energies for which to report the rank needed.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "0.5,0.8,0.9,0.95,0.99"
    )]
    pub energies: Vec<f64>,
    /// The energy the heatmap shows the needed rank for.
    #[arg(long, value_name = "T", default_value_t = 0.9)]
    pub heatmap_energy: f64,
    /// Singular values computed per tensor (the randomized SVD's rank) [default: the largest
    /// of --ranks].
    #[arg(long, value_name = "N")]
    pub max_rank: Option<usize>,
    /// Singular values listed per tensor in analysis.json.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub head: usize,
    /// What each --rank-rule of `extract --budget PARAMS` would allocate, per module: a table,
    /// `budget` in analysis.json and allocation_<rule>.svg/.png (each module's rank is capped
    /// by --max-rank, as extract's by its own --max-rank).
    #[arg(long, value_name = "PARAMS", value_parser = crate::config::count)]
    pub budget: Option<u64>,
    /// The floor under --budget's ranks, as for extract [default: ⅞ of the uniform rank the
    /// budget is worth].
    #[arg(long, value_name = "N", requires = "budget")]
    pub min_rank: Option<usize>,
    /// Spectra of lm_head without its logit shift, as `extract --remove-logit-shift` takes them.
    #[arg(long)]
    pub remove_logit_shift: bool,
    /// Compute device (as for extract).
    #[arg(long, default_value = "auto", value_parser = crate::config::device)]
    pub device: Device,
    /// Bound on host memory (as for extract).
    #[arg(long, value_name = "SIZE", value_parser = crate::config::bytes)]
    pub max_ram: Option<u64>,
    /// Bound on device memory (as for extract).
    #[arg(long, value_name = "SIZE", value_parser = crate::config::bytes)]
    pub max_vram: Option<u64>,
    /// Only tensors matching these globs (as for extract).
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Leave out tensors matching these globs.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Print analysis.json on stdout too.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model (a folder, a single .safetensors file, or a hub id ORG/NAME[@REVISION]).
    #[arg(long, value_name = "PATH|ID")]
    pub base: PathBuf,
    /// The adapter folder, single-file or sharded (rank_pattern, alpha_pattern, use_rslora,
    /// fan_in_fan_out and modules_to_save honoured), or an adapter's hub id in the local cache.
    #[arg(long, value_name = "DIR|ID")]
    pub adapter: PathBuf,
    /// Output folder for the merged checkpoint.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace a checkpoint already in the output folder (any weights, index, config.json or
    /// side file there; weights of another layout are removed). OUT is locked while merge
    /// runs, and must not be the base's or the adapter's folder.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The adapter folder (adapter_config.json + its weights), or an adapter's hub id in the
    /// local cache.
    #[arg(value_name = "ADAPTER")]
    pub adapter: PathBuf,
    /// The engines: peft, vllm, sglang, lorax, llama.cpp (also for Ollama), or all; a list
    /// (--for vllm,sglang) or the flag repeated.
    #[arg(
        long = "for",
        value_name = "ENGINE",
        value_delimiter = ',',
        default_value = "all",
        value_parser = crate::config::engines
    )]
    pub engines: Vec<Vec<phlora::check::Engine>>,
    /// The base model (a path or a hub id): also check the factors' shapes and vocabulary
    /// against it, and the limits of its architecture (vLLM's embedding modules and MoE
    /// layout, llama.cpp's tied heads).
    #[arg(long, value_name = "PATH|ID")]
    pub base: Option<PathBuf>,
    /// Also exit 3 when an engine loads the adapter but computes another update than PEFT.
    #[arg(long)]
    pub strict: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConvertTo {
    /// llama.cpp's GGUF LoRA (GGUF v3, general.type = adapter).
    Gguf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GgufTypeArg {
    F32,
    F16,
    Bf16,
    /// 8-bit blocks of 32; a tensor whose ne[0] is no multiple of 32 (the rank, for lora_b and
    /// an embedding's lora_a) falls back to f16, as in llama.cpp's converter.
    #[value(name = "q8_0")]
    Q8_0,
}

impl GgufTypeArg {
    pub fn tensor_type(self) -> phlora::gguf::TensorType {
        use phlora::gguf::TensorType;
        match self {
            GgufTypeArg::F32 => TensorType::F32,
            GgufTypeArg::F16 => TensorType::F16,
            GgufTypeArg::Bf16 => TensorType::BF16,
            GgufTypeArg::Q8_0 => TensorType::Q8_0,
        }
    }
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The adapter folder (adapter_config.json + its weights), or an adapter's hub id.
    #[arg(value_name = "ADAPTER")]
    pub adapter: PathBuf,
    /// The format to write.
    #[arg(long, value_enum)]
    pub to: ConvertTo,
    /// The base model: a folder with its config.json (architecture, heads; the weights are
    /// optional and, when there, size the left-out tensors saved whole), or a hub id.
    #[arg(long, value_name = "DIR|ID")]
    pub base: PathBuf,
    /// The file to write [default: ADAPTER/adapter.gguf].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Tensor type of the factors [default: the adapter's own dtype].
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub tensor_type: Option<GgufTypeArg>,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CombineArgs {
    /// The parts: every OUT of `extract --shard I/N` for I = 1..N, in any order.
    #[arg(required = true, value_name = "PART")]
    pub parts: Vec<PathBuf>,
    /// Output folder for the adapter (byte for byte what a single run writes).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The base model as seen from this machine, when it is not at the path the parts read it
    /// from (another mount point). Its files must be the parts': same names, sizes,
    /// modification times (copy with cp -p or rsync -a) and headers. A path or a hub id.
    #[arg(long, value_name = "PATH|ID")]
    pub base: Option<PathBuf>,
    /// The fine-tuned model as seen from this machine (as --base).
    #[arg(long, value_name = "PATH|ID")]
    pub ft: Option<PathBuf>,
    /// Split the adapter's weights as extract's --max-shard-size does [default: the parts'
    /// setting].
    #[arg(long, value_name = "SIZE", value_parser = crate::config::bytes)]
    pub max_shard_size: Option<u64>,
    /// Replace an adapter already in the output folder: without it, any file the run would
    /// replace or remove there (adapter_config.json, weights of either layout, report.json,
    /// added_tokens.safetensors) is refused. One run at a time per OUT: a second run on a
    /// folder another run holds (OUT/.phlora-lock) is refused, --force or not.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The base model (a path or a hub id, as for extract).
    #[arg(long, value_name = "PATH|ID")]
    pub base: PathBuf,
    /// The fine-tuned model the adapter should reproduce.
    #[arg(long, value_name = "PATH|ID")]
    pub ft: PathBuf,
    /// The adapter folder (adapter_config.json + adapter_model.safetensors, or its shards and
    /// adapter_model.safetensors.index.json); rank_pattern, alpha_pattern, use_rslora and
    /// fan_in_fan_out are honoured. Or an adapter's hub id in the local cache.
    #[arg(long, value_name = "DIR|ID")]
    pub adapter: PathBuf,
    /// Fail (exit 3) if any module's cos(B·A·scaling, ΔW) is below this, e.g. 0.95.
    #[arg(long, value_name = "COS")]
    pub min_cos: Option<f64>,
    /// Fail (exit 3) if any module's ‖ΔW − B·A·scaling‖/‖ΔW‖ is above this, e.g. 0.3.
    #[arg(long, value_name = "ERR")]
    pub max_error: Option<f64>,
    /// Fail (exit 3) if any module's cos(W_base + B·A·scaling, W_ft) is below this, e.g.
    /// 0.999 (near 1 whenever ΔW is small next to W; --min-cos is the sharper test).
    #[arg(long, value_name = "COS")]
    pub min_weight_cos: Option<f64>,
    /// Print the whole report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The reference adapter folder (e.g. the CPU's).
    #[arg(value_name = "REFERENCE")]
    pub reference: PathBuf,
    /// The adapters compared with it.
    #[arg(value_name = "OTHER", required = true)]
    pub others: Vec<PathBuf>,
    /// Largest ‖s·B·A − s'·B'·A'‖/‖s·B·A‖ per module.
    #[arg(long, value_name = "REL", default_value_t = 1e-2)]
    pub max_product_diff: f64,
    /// Largest |Δresidual|/max(residual, 1e-3) per tensor (residuals are exact certificates).
    #[arg(long, value_name = "REL", default_value_t = 1e-5)]
    pub max_residual_diff: f64,
    /// Largest |Δ‖ΔW‖|/‖ΔW‖ per tensor.
    #[arg(long, value_name = "REL", default_value_t = 1e-6)]
    pub max_norm_diff: f64,
    /// List every module, not only those outside the tolerances.
    #[arg(long)]
    pub all: bool,
    /// Print the reports as a JSON array on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FloorArgs {
    /// The base model (a path or a hub id, as for extract).
    #[arg(long, value_name = "PATH|ID")]
    pub base: PathBuf,
    /// The fine-tuned model.
    #[arg(long, value_name = "PATH|ID")]
    pub ft: PathBuf,
    /// Device: auto, cpu, cuda or cuda:N (as for extract).
    #[arg(long, default_value = "auto", value_parser = crate::config::device)]
    pub device: Device,
    /// GPUs to read into (as for extract).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub devices: Option<Vec<usize>>,
    /// Workers per device (as for extract).
    #[arg(long, value_name = "N")]
    pub in_flight: Option<usize>,
    /// Print JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SvdArg {
    /// Randomized range finder + small exact SVD: fast, within ~0.1% of optimal by default.
    Randomized,
    /// Full thin SVD (faer): the Eckart–Young optimum, much slower; for checking.
    Exact,
}

/// How `--budget` shares its parameters among the modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RankRuleArg {
    /// Each module's σ² weighed by 1/(‖ΔW‖^0.7·‖W_base‖^0.3): between frobenius (which
    /// follows ‖ΔW‖² and starves small-norm modules) and relative (which ignores ‖ΔW‖ and
    /// starves the embeddings).
    Balanced,
    /// Each module's σ² weighed by 1/‖ΔW‖², so every module's relative error counts the same
    /// (small-norm modules such as v_proj are not starved; without the floor the embeddings,
    /// whose directions cost most, are).
    Relative,
    /// Maximise the total preserved Σσ² (least total ‖ΔW − B·A‖): ranks go where ΔW is
    /// largest in norm, which on real fine-tunes is not where it matters most.
    Frobenius,
    /// Each module's σ² weighed by 1/‖W_base‖²: its error relative to the weight it changes.
    Base,
    /// The largest single rank the budget pays for, every module the same.
    Uniform,
}

impl From<RankRuleArg> for phlora::linalg::rank::RankRule {
    fn from(r: RankRuleArg) -> Self {
        use phlora::linalg::rank::RankRule;
        match r {
            RankRuleArg::Balanced => RankRule::Balanced,
            RankRuleArg::Relative => RankRule::Relative,
            RankRuleArg::Frobenius => RankRule::Frobenius,
            RankRuleArg::Base => RankRule::Base,
            RankRuleArg::Uniform => RankRule::Uniform,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    Peft,
    Vllm,
    Portable,
    #[value(name = "llama.cpp")]
    LlamaCpp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GemmArg {
    Tf32,
    F32,
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// The base model: a folder (model.safetensors or model.safetensors.index.json + shards), a
    /// single .safetensors file, or a Hugging Face id (ORG/NAME[@REVISION]) in the local hub
    /// cache, which then names the base in adapter_config.json (with the commit as revision).
    /// phlora does not download (`hf download ORG/NAME` first).
    #[arg(long, value_name = "PATH|ID")]
    pub base: PathBuf,
    /// The fully fine-tuned model, laid out like the base (a path or a hub id, as --base).
    #[arg(long, value_name = "PATH|ID")]
    pub ft: PathBuf,
    /// Output folder for adapter_model.safetensors (or its shards, --max-shard-size),
    /// adapter_config.json and report.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// LoRA rank r, the same for every tensor (clamped per tensor to min(rows, cols); factors
    /// are zero-padded to r) [default: 64, unless --energy or --budget chooses ranks].
    #[arg(long, short = 'r', conflicts_with_all = ["energy", "budget"])]
    pub rank: Option<usize>,
    /// Per tensor, the smallest rank whose preserved energy E_r = Σσᵢ²/‖ΔW‖² reaches T (0 < T
    /// ≤ 1), at most --max-rank; the sketch grows until it does. Ranks differ per module:
    /// rank_pattern/alpha_pattern in the config (PEFT), or --portable. Good for a bound on
    /// every tensor's error certificate, and for sizing an adapter to a fine-tune's rank;
    /// against one uniform rank of the same size it was mixed on the fine-tunes measured
    /// (better on a high-rank one at T ≤ 0.7, worse on a sequence task and a domain shift:
    /// BENCHMARKS.md); for the best adapter of a size, use --budget.
    #[arg(long, value_name = "T", conflicts_with = "budget")]
    pub energy: Option<f64>,
    /// A global parameter budget Σ r·(in + out) over all LoRA targets, e.g. 20M: the spectra
    /// come first (a pass over the inputs), then --rank-rule shares the budget among the
    /// modules, then the extraction at those ranks (a second pass). `phlora analyze --budget`
    /// shows the allocation before anything is extracted.
    #[arg(long, value_name = "PARAMS", value_parser = crate::config::count)]
    pub budget: Option<u64>,
    /// How --budget shares its parameters. The default, balanced, beat one uniform rank of
    /// the same size on answer agreement and KL at the budgets of r = 8 and 16 on a sequence
    /// task and a domain shift, and at r = 16 on random labels (three seeds each); it lost at
    /// r = 8 on random labels, where no adapter that small carries the fine-tune, and near
    /// saturation on the sequence task (docs/rank-rules.md, BENCHMARKS.md). Check yours with
    /// scripts/eval_adapter.py.
    #[arg(long, value_enum, default_value_t = RankRuleArg::Balanced, requires = "budget")]
    pub rank_rule: RankRuleArg,
    /// Under --budget, no module below this rank (capped by its size) [default: ⅞ of the
    /// uniform rank the budget is worth]. 0 lets a rule give a module nothing.
    #[arg(long, value_name = "N", requires = "budget")]
    pub min_rank: Option<usize>,
    /// Cap on any tensor's rank under --energy or --budget.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_rank: usize,
    /// Which loaders the adapter is for. peft: per-module ranks via rank_pattern, norms via
    /// modules_to_save. vllm: one rank vLLM accepts (1, 8, 16, 32, 64, 128, 256, 320, 512; a
    /// fixed --rank must be one of them, chosen ranks are zero-padded up), no modules_to_save
    /// (changed norms are left out, with a warning saying how much that drops). portable: what
    /// vLLM, SGLang, LoRAX and TGI all load: as vllm, any rank padded up to an allowed one
    /// (LoRAX ignores embedding LoRA: add --no-embeddings; `phlora check` says what each
    /// engine makes of an adapter, docs/engines.md). llama.cpp (also for Ollama): the PEFT
    /// adapter, and OUT/adapter.gguf converted from it (as `phlora convert`: each module's
    /// exact scale, what GGUF LoRA cannot carry reported with its share of ‖ΔW‖²).
    #[arg(long, value_enum, default_value_t = TargetArg::Peft)]
    pub target: TargetArg,
    /// --target llama.cpp: the GGUF's tensor type [default: the adapter's dtype].
    #[arg(long, value_enum, value_name = "TYPE")]
    pub gguf_type: Option<GgufTypeArg>,
    /// Shorthand for --target portable.
    #[arg(long, conflicts_with = "target")]
    pub portable: bool,
    /// SVD algorithm.
    #[arg(long, value_enum, default_value_t = SvdArg::Randomized)]
    pub svd: SvdArg,
    /// Randomized SVD: extra sketch columns p beyond the rank [default: max(rank, 8)].
    #[arg(long, value_name = "P")]
    pub oversample: Option<usize>,
    /// Randomized SVD: power iterations q (each costs two passes over ΔW).
    #[arg(long, value_name = "Q", default_value_t = 2)]
    pub power_iters: usize,
    /// Seed of the random sketches; each tensor mixes in its name, so results do not depend
    /// on order or sharding.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Dtype of the factors: auto (the fine-tune's), bf16, f16 or f32. Compute is always f32.
    #[arg(long, value_name = "DTYPE", default_value = "auto", value_parser = crate::config::out_dtype)]
    pub out_dtype: OutDtype,
    /// Compute device: auto (every usable GPU, else the CPU with a warning), cpu, cuda (every
    /// visible GPU) or cuda:N (that one); an error when a GPU asked for is not usable.
    #[arg(long, default_value = "auto", value_parser = crate::config::device)]
    pub device: Device,
    /// GPUs to run on, e.g. 0,1,3: one queue, largest tensors first, each GPU with its own
    /// workers; the adapter is the same whichever GPU computed a tensor [default: all visible].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub devices: Option<Vec<usize>>,
    /// Tensors worked on at once per device, sharing its memory bound. On a GPU each has its
    /// own stream, so one's copies overlap another's SVD; on the CPU the cores are split
    /// between them (never both across tensors and inside each GEMM). The adapter does not
    /// depend on it [default: 2 per GPU; 2 on a CPU with 2+ cores].
    #[arg(long, value_name = "N")]
    pub in_flight: Option<usize>,
    /// Print where the time went (read, host-to-device, delta, SVD, factor, residual,
    /// device-to-host, write, idle; per worker; the slowest tensors) after the run. The same
    /// numbers are always in report.json.
    #[arg(long)]
    pub profile: bool,
    /// GPU only: precision of the randomized SVD's products with ΔW. tf32 runs them on tensor
    /// cores (inputs rounded to a 10-bit mantissa: ~5e-4 relative, below bf16 output rounding);
    /// f32 is plain single precision. The residual certificate is always plain f32.
    #[arg(long, value_enum, default_value_t = GemmArg::Tf32)]
    pub gemm: GemmArg,
    /// CPU: bound on host memory for the computation, e.g. 768M or 40G (peak RSS, the mapped
    /// input pages included). A matrix whose f32 ΔW and sketches would not fit is streamed
    /// through the randomized SVD in row blocks re-formed from the checkpoints on every pass
    /// (2q + 4 reads of its inputs); tensors in flight share the bound [default: no bound].
    #[arg(long, value_name = "SIZE", value_parser = crate::config::bytes)]
    pub max_ram: Option<u64>,
    /// GPU: bound on device memory per GPU for the whole process, e.g. 20G. The CUDA context
    /// and each worker's own buffers come off it (~0.6 GiB + 0.3 GiB per worker); tensors in
    /// flight share the rest, and a matrix that would not fit whole is streamed in row blocks
    /// like with --max-ram. If the driver still runs out of memory, the tensor is retried alone
    /// in smaller blocks [default: 90% of each GPU's free memory].
    #[arg(long, value_name = "SIZE", value_parser = crate::config::bytes)]
    pub max_vram: Option<u64>,
    /// Only tensors whose full name matches one of these globs (`*` any run, `?` one char),
    /// e.g. --include '*.self_attn.*'. Repeatable.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Leave out tensors whose full name matches one of these globs. Repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Do not decompose embeddings (they are reported as not carried).
    #[arg(long)]
    pub no_embeddings: bool,
    /// Leave lm_head's logit shift out of its LoRA: the part of ΔW along the vocabulary's
    /// all-ones direction, which moves every logit of a token alike and so no probability
    /// (often most of lm_head's ‖ΔW‖²), giving its rank and its share of a --budget to what
    /// changes the output. Merged weights then differ from the fine-tune's by that shift
    /// (`verify` reads report.json and compares that ΔW modulo the shift, the merged weight as
    /// it is). Never applied to a tied lm_head, added tokens or soft-capped logits (Gemma 2);
    /// report.json says where it was (logit_shift: its share of ‖ΔW‖²).
    #[arg(long)]
    pub remove_logit_shift: bool,
    /// Carry the changed biases of LoRA-targeted layers exactly, as PEFT's `lora_B.bias`
    /// (`lora_bias: true`; PEFT ≥ 0.14 loads it, vLLM does not). PEFT refuses it next to an
    /// embedding LoRA (add --no-embeddings) or fused 3-D experts.
    #[arg(long)]
    pub lora_bias: bool,
    /// A fine-tune whose vocabulary grew (added tokens): carry the rows both share as LoRA, and
    /// write the new rows whole to added_tokens.safetensors (with the fine-tune's tokenizer
    /// files). The factors are shaped for the resized model: resize the base's embeddings to
    /// the fine-tune's vocabulary, copy in the new rows, then load the adapter (docs/models.md: added
    /// tokens). Without it a grown vocabulary is an error.
    #[arg(long)]
    pub added_tokens: bool,
    /// Write per-expert MoE weights (`experts.N.gate_proj/up_proj/down_proj`) as the fused
    /// parameters transformers v5 builds from them in memory (`experts.gate_up_proj`,
    /// `experts.down_proj`), in PEFT's target_parameters layout: what PEFT under transformers
    /// v5 needs for Qwen2-MoE (which it does not convert from per-expert adapters) and for
    /// models with a dense MLP or shared experts (DeepSeek-V3: its conversion drops their LoRA;
    /// with this flag they become target parameters by path). gate and up
    /// stay separate decompositions, stacked block-diagonally (an expert's rank in gate_up_proj
    /// is r_gate + r_up), so each B·A is unchanged. PEFT only; vLLM takes the per-expert form.
    #[arg(long)]
    pub fuse_experts: bool,
    /// Continue an interrupted run (crash, kill, Ctrl-C) from the journal it left in OUT
    /// (OUT/.phlora-journal): only unfinished tensors are computed, and the adapter is
    /// identical to an uninterrupted run. Refused if the inputs or settings changed.
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Split the adapter's weights into files of at most SIZE of tensor data each (e.g. 2G;
    /// a larger tensor gets a file of its own): adapter_model-00001-of-0000N.safetensors plus
    /// adapter_model.safetensors.index.json, the Hugging Face sharded layout. PEFT's
    /// from_pretrained and vLLM read only a single adapter_model.safetensors: shard only for
    /// storage or transfer limits, and `phlora merge`/`verify` read either layout
    /// [default: one file].
    #[arg(long, value_name = "SIZE", value_parser = crate::config::bytes)]
    pub max_shard_size: Option<u64>,
    /// Compute only share I of N (1 ≤ I ≤ N) of the tensors, balanced by bytes read, into OUT
    /// as a part; `phlora combine PART… --out ADAPTER` joins the N parts into the adapter a
    /// single run writes, byte for byte. One process per shard (Slurm array task, Kubernetes
    /// indexed job). Not with --budget.
    #[arg(long, value_name = "I/N", value_parser = crate::config::shard)]
    pub shard: Option<Shard>,
    /// Do not save changed norm weights through modules_to_save (vLLM refuses them; they
    /// are small but matter for quality).
    #[arg(long)]
    pub no_norms: bool,
    /// base_model_name_or_path for adapter_config.json [default: the hub id when --base is
    /// one, else the base's config.json `_name_or_path`, else the --base path].
    #[arg(long, value_name = "NAME")]
    pub base_name: Option<String>,
    /// Replace an adapter already in the output folder: without it, any file the run would
    /// replace or remove there (adapter_config.json, weights of either layout, report.json,
    /// added_tokens.safetensors, a copied tokenizer) is refused. One run at a time per OUT: a
    /// second run on a folder another run holds (OUT/.phlora-lock) is refused, --force or not.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output folder; the pair goes to OUT/base and OUT/ft.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2048)]
    pub hidden: usize,
    #[arg(long, default_value_t = 8192)]
    pub intermediate: usize,
    #[arg(long, default_value_t = 16)]
    pub layers: usize,
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Dtype of both checkpoints: bf16, f16 or f32.
    #[arg(long, default_value = "bf16", value_parser = crate::config::dtype)]
    pub dtype: DType,
    /// Rank of the planted part of each ΔW.
    #[arg(long, default_value_t = 256)]
    pub delta_rank: usize,
    /// Power-law decay exponent of the planted singular values.
    #[arg(long, default_value_t = 0.6)]
    pub decay: f64,
    /// Dense noise RMS relative to the planted part.
    #[arg(long, default_value_t = 0.2)]
    pub noise: f64,
    /// Largest shard, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub shard_mib: u64,
    /// Tie lm_head to the embeddings (no lm_head tensor).
    #[arg(long)]
    pub tie_embeddings: bool,
    /// Replace a pair already in OUT (its model files in OUT/base and OUT/ft).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Work folder [default: a temporary folder, removed afterwards].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long, short = 'r', default_value_t = 16)]
    pub rank: usize,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A model folder, a .safetensors file, or a Hugging Face id (ORG/NAME[@REVISION]) in the
    /// local hub cache.
    #[arg(value_name = "PATH|ID")]
    pub path: PathBuf,
    /// Pair with this base checkpoint (a path or a hub id): validates the pairing as extract
    /// would.
    #[arg(long, value_name = "PATH|ID")]
    pub base: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// ΔW shapes ROWSxCOLS, comma-separated [default: Llama-3-70B's
    /// 8192x8192,1024x8192,28672x8192,8192x28672].
    #[arg(long, value_name = "SHAPES")]
    pub shapes: Option<String>,
    /// Ranks, comma-separated.
    #[arg(long, value_name = "RANKS", default_value = "16,64,256")]
    pub ranks: String,
    /// Compute device: auto, cpu or cuda[:N].
    #[arg(long, default_value = "auto", value_parser = crate::config::device)]
    pub device: Device,
    /// GPU only: precision of the products with ΔW (see `extract --help`).
    #[arg(long, value_enum, default_value_t = GemmArg::Tf32)]
    pub gemm: GemmArg,
    /// Extra sketch columns p [default: max(rank, 8)].
    #[arg(long, value_name = "P")]
    pub oversample: Option<usize>,
    /// Power iterations q.
    #[arg(long, value_name = "Q", default_value_t = 2)]
    pub power_iters: usize,
    /// Timed repetitions after one warm-up (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GPU only: also measure every variant (tf32/f32 × CholeskyQR2/Householder ×
    /// eigh/host eigh/gesvd) on the same shapes and ranks.
    #[arg(long)]
    pub variants: bool,
    /// GPU only: skip the ΔW kernel bandwidth measurement.
    #[arg(long)]
    pub no_delta: bool,
    /// Measure the sink instead of the SVD: Llama-3-70B's factors (random bf16 bytes) at each
    /// of --ranks, journaled and staged as the writer thread does in a run, then committed,
    /// in a folder inside DIR that is removed afterwards. Needs about 3× the adapter free
    /// (journal, staging, adapter: ~5 GiB at rank 64), e.g. --sink /scratch --ranks 64.
    #[arg(long, value_name = "DIR")]
    pub sink: Option<PathBuf>,
    /// With --sink: decoder layers (Llama-3-70B has 80).
    #[arg(long, value_name = "N", default_value_t = 80)]
    pub layers: usize,
    /// Print JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}
