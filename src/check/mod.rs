//! `phlora check`: a pre-flight check of any PEFT LoRA adapter (phlora's, mergekit's, PEFT's)
//! against each serving engine's loading rules, as those projects' sources have them (the
//! versions read are in docs/engines.md and in each engine's module). Each finding says what
//! the engine does — refuses the adapter, or loads it and computes another update than PEFT
//! would — why, and the phlora command that writes an adapter the engine takes as PEFT does.

pub mod inventory;
mod llama_cpp;
mod lorax;
mod peft;
mod sglang;
mod vllm;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::Result;
use crate::extract::Target;
pub use inventory::Inventory;

/// An engine that loads PEFT LoRA adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Engine {
    Peft,
    Vllm,
    Sglang,
    Lorax,
    LlamaCpp,
}

impl Engine {
    pub const ALL: [Engine; 5] = [
        Engine::Peft,
        Engine::Vllm,
        Engine::Sglang,
        Engine::Lorax,
        Engine::LlamaCpp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Peft => "peft",
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::Lorax => "lorax",
            Engine::LlamaCpp => "llama.cpp",
        }
    }

    pub fn parse(s: &str) -> Option<Engine> {
        match s.to_ascii_lowercase().as_str() {
            "peft" => Some(Engine::Peft),
            "vllm" => Some(Engine::Vllm),
            "sglang" => Some(Engine::Sglang),
            "lorax" => Some(Engine::Lorax),
            "llama.cpp" | "llamacpp" | "llama-cpp" | "gguf" | "ollama" => Some(Engine::LlamaCpp),
            _ => None,
        }
    }

    /// The sources the rules were read from.
    pub fn sources(self) -> &'static str {
        match self {
            Engine::Peft => peft::SOURCES,
            Engine::Vllm => vllm::SOURCES,
            Engine::Sglang => sglang::SOURCES,
            Engine::Lorax => lorax::SOURCES,
            Engine::LlamaCpp => llama_cpp::SOURCES,
        }
    }

    /// The extract settings that write an adapter this engine loads as PEFT would, for this
    /// adapter and what the rules found: one fixed rank, the adapter's largest (so no module
    /// loses capacity), where the engine needs one.
    fn fix(self, a: &Inventory, findings: &[Finding]) -> Fix {
        let refused = |rule: &str| {
            findings
                .iter()
                .any(|f| f.rule == rule && f.severity == Severity::Refused)
        };
        // (`flags` bounds the rank of every target that must load in vLLM.)
        let rank = a.ranks().into_iter().max().unwrap_or(16);
        let blocked = blocked(a, findings);
        let fix = match self {
            Engine::Peft => Fix::default(),
            Engine::Vllm => Fix {
                target: Some(Target::Vllm),
                no_embeddings: refused("vllm.embeddings"),
                rank: Some(rank),
                ..Fix::default()
            },
            Engine::Sglang => Fix {
                target: Some(Target::Portable),
                rank: Some(rank),
                ..Fix::default()
            },
            Engine::Lorax => Fix {
                target: Some(Target::Portable),
                no_embeddings: true,
                rank: Some(lorax::served_rank(rank)),
                ..Fix::default()
            },
            Engine::LlamaCpp => Fix {
                no_norms: true,
                no_embeddings: refused("llama.cpp.tied_embeddings"),
                rank: Some(rank),
                ..Fix::default()
            },
        };
        Fix { blocked, ..fix }
    }

    fn rules(self, a: &Inventory) -> Vec<Finding> {
        match self {
            Engine::Peft => peft::check(a),
            Engine::Vllm => vllm::check(a),
            Engine::Sglang => sglang::check(a),
            Engine::Lorax => lorax::check(a),
            Engine::LlamaCpp => llama_cpp::check(a),
        }
    }
}

/// The phlora extract settings an engine needs.
#[derive(Clone, Debug, Default)]
struct Fix {
    target: Option<Target>,
    no_embeddings: bool,
    no_norms: bool,
    rank: Option<usize>,
    /// Tensor globs the engine cannot serve (--exclude).
    exclude: Vec<String>,
    /// Why no phlora command gives this engine the adapter's update.
    blocked: Option<String>,
}

impl Fix {
    /// Settings that satisfy both (portable is what every engine's target allows).
    fn and(self, o: Fix) -> Fix {
        Fix {
            target: match (self.target, o.target) {
                (Some(a), Some(b)) if a == b => Some(a),
                (Some(_), Some(_)) => Some(Target::Portable),
                (a, b) => a.or(b),
            },
            no_embeddings: self.no_embeddings || o.no_embeddings,
            no_norms: self.no_norms || o.no_norms,
            // Every engine's rank derives from the adapter's, and LoRAX's rounding is the
            // largest: the larger serves both.
            rank: self.rank.max(o.rank),
            blocked: self.blocked.or(o.blocked),
            exclude: {
                let mut e = self.exclude;
                e.extend(o.exclude);
                e.sort();
                e.dedup();
                e
            },
        }
    }

    fn flags(&self) -> String {
        let mut s = String::new();
        // extract --target vllm takes only ranks from max_lora_rank's set; portable pads.
        let allowed = crate::linalg::rank::PORTABLE_RANKS;
        // Every target but peft must load in vLLM: its largest max_lora_rank bounds the rank
        // (a multiple of 16, so LoRAX's rounding survives it).
        let largest = allowed[allowed.len() - 1];
        let rank = match self.target {
            Some(_) => self.rank.map(|r| r.min(largest)),
            None => self.rank,
        };
        let target = match (self.target, rank) {
            (Some(Target::Vllm), Some(r)) if !allowed.contains(&r) => Some(Target::Portable),
            (t, _) => t,
        };
        if let Some(t) = target {
            s += &format!(" --target {}", t.as_str());
        }
        if self.no_embeddings {
            s += " --no-embeddings";
        }
        if self.no_norms && target.is_none() {
            s += " --no-norms";
        }
        if let Some(r) = rank {
            s += &format!(" --rank {r}");
        }
        for glob in &self.exclude {
            s += &format!(" --exclude '{glob}'");
        }
        s
    }
}

/// What an engine does with what a finding names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The engine refuses the adapter: at load, or on the first request that uses it.
    Refused,
    /// It loads, but computes another update than PEFT would (a part ignored, another scale).
    Differs,
    /// Worth knowing (a slower path, a server setting it needs), with the same result.
    Note,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Refused => "refused",
            Severity::Differs => "differs",
            Severity::Note => "note",
        }
    }
}

/// One rule's verdict on the adapter.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// A stable name for the rule (for scripts): `vllm.modules_to_save`.
    pub rule: &'static str,
    pub message: String,
    /// Tensors (extract's --exclude globs) an adapter for this engine must leave out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

impl Finding {
    fn new(severity: Severity, rule: &'static str, message: impl Into<String>) -> Finding {
        Finding {
            severity,
            rule,
            message: message.into(),
            exclude: Vec::new(),
        }
    }

    /// The same, with the tensors to leave out.
    fn excluding(mut self, globs: impl IntoIterator<Item = String>) -> Finding {
        self.exclude = globs.into_iter().collect();
        self
    }
}

/// One engine's verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub engine: &'static str,
    /// Where its rules were read (project, version or commit, files).
    pub sources: &'static str,
    pub loads: bool,
    /// Loads, and computes the update PEFT would.
    pub as_peft: bool,
    pub findings: Vec<Finding>,
    /// The phlora command that writes an adapter this engine loads as PEFT does (when this
    /// one falls short).
    pub fix: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub adapter: PathBuf,
    /// The base the shapes were checked against (None: not checked).
    pub base: Option<PathBuf>,
    pub from_phlora: bool,
    pub verdicts: Vec<Verdict>,
    /// One phlora command whose adapter every named engine loads as PEFT does (when two or
    /// more fall short).
    pub fix_all: Option<String>,
}

impl CheckReport {
    pub fn refused(&self) -> bool {
        self.verdicts.iter().any(|v| !v.loads)
    }

    pub fn differs(&self) -> bool {
        self.verdicts.iter().any(|v| !v.as_peft)
    }

    /// The report as text: a verdict line per engine, its findings, the fix.
    pub fn render(&self) -> String {
        let mut s = format!("{}\n", self.adapter.display());
        match &self.base {
            Some(b) => s += &format!("shapes and vocabulary checked against {}\n", b.display()),
            None => s +=
                "(no --base: shapes, vocabulary and the architecture's limits are not checked)\n",
        }
        for v in &self.verdicts {
            let verdict = match (v.loads, v.as_peft) {
                (false, _) => "REFUSED",
                (true, false) => "LOADS, DIFFERENTLY",
                (true, true) => "ok",
            };
            s += &format!("\n{}: {verdict}\n", v.engine);
            for f in &v.findings {
                s += &format!("  {:7} {}: {}\n", f.severity.label(), f.rule, f.message);
            }
            if let Some(fix) = &v.fix {
                s += &format!("  fix: {fix}\n");
            }
        }
        if let Some(fix) = &self.fix_all {
            s += &format!("\none adapter for all of them: {fix}\n");
        }
        s
    }
}

/// Checks the adapter in `dir` against each engine (and against its base, when given: shapes,
/// vocabulary, the architecture's own limits).
pub fn check(dir: &Path, base: Option<&Path>, engines: &[Engine]) -> Result<CheckReport> {
    let mut inv = Inventory::open(dir)?;
    inv.base = base.map(inventory::Base::open).transpose()?;
    let mut fixes = Vec::new();
    let verdicts = engines
        .iter()
        .map(|&e| {
            let (v, fix) = verdict(e, &inv);
            if !v.as_peft {
                fixes.push(fix);
            }
            v
        })
        .collect();
    let fix_all = (fixes.len() > 1).then(|| {
        let all = fixes.into_iter().reduce(Fix::and).unwrap_or_default();
        fix_command(&all, &inv)
    });
    Ok(CheckReport {
        fix_all,
        adapter: dir.to_path_buf(),
        base: inv.base.as_ref().map(|b| b.path.clone()),
        from_phlora: inv.from_phlora,
        verdicts,
    })
}

fn verdict(engine: Engine, inv: &Inventory) -> (Verdict, Fix) {
    let mut findings = common(engine, inv);
    findings.extend(engine.rules(inv));
    findings.sort_by_key(|f| f.severity);
    let loads = !findings.iter().any(|f| f.severity == Severity::Refused);
    let as_peft = loads && !findings.iter().any(|f| f.severity == Severity::Differs);
    let mut fix = engine.fix(inv, &findings);
    fix.exclude = findings
        .iter()
        .filter(|f| f.severity != Severity::Note)
        .flat_map(|f| f.exclude.iter().cloned())
        .collect();
    fix.exclude.sort();
    fix.exclude.dedup();
    let verdict = Verdict {
        engine: engine.name(),
        sources: engine.sources(),
        loads,
        as_peft,
        fix: (!as_peft).then(|| fix_command(&fix, inv)),
        findings,
    };
    (verdict, fix)
}

/// The command that writes an adapter `engine` loads as PEFT does: phlora's own from its
/// pair, another tool's through the merged model it stands for.
fn fix_command(fix: &Fix, inv: &Inventory) -> String {
    if let Some(why) = &fix.blocked {
        return format!("none from phlora: {why}");
    }
    let flags = fix.flags();
    let dir = shell_quote(&inv.dir.display().to_string());
    let dora = inv.config.use_dora || inv.modules.iter().any(|m| m.magnitude);
    if inv.from_phlora {
        format!("phlora extract --base BASE --ft FT --out OUT{flags}   (from the pair this adapter was extracted from)")
    } else if dora {
        // phlora's merge reads plain LoRA; PEFT merges DoRA's magnitudes.
        format!(
            "python3 -c \"import sys, transformers, peft; m = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).merge_and_unload(); m.save_pretrained(sys.argv[3])\" BASE {dir} MERGED && phlora extract --base BASE --ft MERGED --out OUT{flags}   (DoRA merged by PEFT, then rewritten as a LoRA)"
        )
    } else {
        format!(
            "phlora merge --base BASE --adapter {dir} --out MERGED && phlora extract --base BASE --ft MERGED --out OUT{flags}   (the same update, rewritten)"
        )
    }
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Why no phlora command rewrites this adapter for an engine, if none does: phlora's merge
/// reads plain LoRA (not another PEFT type, a config PEFT refuses, or an init that changes the
/// base), and a round trip keeps which modules the update changes.
fn blocked(inv: &Inventory, findings: &[Finding]) -> Option<String> {
    const COVERAGE: [&str; 3] = ["sglang.qkv", "llama.cpp.experts", "lorax.partial"];
    if let Some(f) = findings
        .iter()
        .find(|f| f.severity != Severity::Note && COVERAGE.contains(&f.rule))
    {
        return Some(format!("{}: the engine needs modules this update leaves unchanged, and an extraction from the merged model changes the same ones", f.rule));
    }
    if inv.from_phlora {
        return None;
    }
    let c = &inv.config;
    if c.peft_type
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("lora"))
    {
        return Some("phlora merge reads LoRA adapters only (merge it with PEFT's merge_and_unload, then phlora extract from the merged model)".into());
    }
    if let Err(e) = &inv.targets {
        return Some(format!(
            "PEFT refuses this config, and so does phlora merge ({e})"
        ));
    }
    let init = c.init_lora_weights.as_ref().and_then(|v| v.as_str());
    if init.is_some_and(|i| !i.eq_ignore_ascii_case("gaussian")) {
        return Some(format!("init_lora_weights = {:?} changes the base weights when PEFT loads the adapter, so merging it into the original base is not its update: convert it first with PEFT's path_initial_model_for_weight_conversion", init.unwrap_or_default()));
    }
    None
}

/// Rules every engine shares: a LoRA at all, factors in pairs of one rank.
fn common(engine: Engine, inv: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    let name = engine.name();
    match (inv.config.peft_type.as_deref(), engine) {
        (Some(t), _) if t.eq_ignore_ascii_case("lora") => {}
        // SGLang asserts the type; the others read any adapter's lora_A/lora_B as a LoRA.
        (Some(t), Engine::Sglang) => out.push(Finding::new(
            Severity::Refused,
            "peft_type",
            format!("peft_type is {t:?}: SGLang asserts LORA"),
        )),
        (Some(t), Engine::Peft) => out.push(Finding::new(
            Severity::Note,
            "peft_type",
            format!("peft_type is {t:?}, not LORA: PEFT loads it by that type's rules, which these (LoRA's) do not cover"),
        )),
        (Some(t), _) => out.push(Finding::new(
            Severity::Differs,
            "peft_type",
            format!("peft_type is {t:?}, not LORA: {name} reads its lora_A/lora_B as a LoRA and ignores what the type adds"),
        )),
        (None, Engine::Sglang) => out.push(Finding::new(
            Severity::Refused,
            "peft_type",
            "adapter_config.json has no peft_type (SGLang reads it without a default)",
        )),
        (None, _) => {}
    }
    if inv.factored().next().is_none() {
        out.push(Finding::new(
            Severity::Refused,
            "no_factors",
            "the weights hold no lora_A/lora_B factors",
        ));
    }
    for m in inv.factored() {
        match (&m.a, &m.b) {
            (Some(_), None) | (None, Some(_)) => out.push(Finding::new(
                Severity::Refused,
                "unpaired",
                format!("{}: lora_A without lora_B, or the reverse", m.path),
            )),
            (Some(a), Some(b)) if m.rank().is_none() || a.contains(&0) || b.contains(&0) => out
                .push(Finding::new(
                    Severity::Refused,
                    "rank_mismatch",
                    format!("{}: A {a:?} and B {b:?} do not share a rank", m.path),
                )),
            _ => {}
        }
    }
    if let Some(base) = &inv.base {
        out.extend(against_base(inv, base));
    }
    out
}

/// Every engine refuses factors that do not fit the base's weights.
fn against_base(inv: &Inventory, base: &inventory::Base) -> Vec<Finding> {
    let mut missing = Vec::new();
    let mut misfit = Vec::new();
    for m in inv
        .factored()
        .filter(|m| m.experts != inventory::Experts::Fused)
    {
        let (Some(a), Some(b)) = (&m.a, &m.b) else {
            continue;
        };
        let weight = format!("{}.weight", m.path);
        let shape = base.shapes.get(&weight).or_else(|| {
            // A tied head stands for the embedding.
            (m.kind() == "lm_head" && base.tied)
                .then(|| {
                    base.shapes
                        .iter()
                        .find(|(k, _)| k.ends_with("embed_tokens.weight"))
                        .map(|(_, v)| v)
                })
                .flatten()
        });
        let Some(w) = shape else {
            missing.push(m.path.clone());
            continue;
        };
        // A [r, in], B [out, r]; the weight is [out, in], or [in, out] for an embedding and
        // for GPT-2's Conv1D layers (fan_in_fan_out). Convolutions' 4-D shapes are not checked.
        if [w.len(), a.len(), b.len()] != [2, 2, 2] {
            continue;
        }
        let (input, output) = (a[1], b[0]);
        let transposed =
            m.embedding || (inv.config.fan_in_fan_out && crate::names::is_conv1d_module(&m.path));
        let fits = if transposed {
            w[..] == [input, output]
        } else {
            w[..] == [output, input]
        };
        if !fits {
            misfit.push(format!("{} (A {a:?}, B {b:?}; base {w:?})", m.path));
        }
    }
    let mut out = Vec::new();
    if !missing.is_empty() {
        out.push(Finding::new(
            Severity::Refused,
            "base.missing",
            format!(
                "{} modules have no weight in the base {}: the adapter is for another model",
                some(&missing),
                base.path.display()
            ),
        ));
    }
    if !misfit.is_empty() {
        out.push(Finding::new(Severity::Refused, "base.shape", format!("{} modules' factors do not fit the base's weights (a size mismatch; for an embedding, another vocabulary size)", some(&misfit))));
    }
    out
}

/// Fused expert factors (target_parameters) an engine cannot load: from a per-expert base
/// phlora writes them per expert without --fuse-experts; a base that stores its experts
/// fused (gpt-oss) has no per-expert form, so an adapter for this engine leaves them out.
fn fused_experts(inv: &Inventory, rule: &'static str, why: &str) -> Option<Finding> {
    inv.factored().any(|m| m.experts == inventory::Experts::Fused).then(|| {
        let native = inv.base.as_ref().is_some_and(|b| !b.per_expert());
        let msg = format!("fused expert factors (PEFT's target_parameters): {why}");
        if native {
            Finding::new(Severity::Refused, rule, format!("{msg} (the base stores its experts fused, so there is no per-expert form: phlora: --exclude '*.experts.*')"))
                .excluding(["*.experts.*".to_string()])
        } else {
            Finding::new(Severity::Refused, rule, format!("{msg} (phlora: leave out --fuse-experts)"))
        }
    })
}

/// The attention and MLP projections of Llama-family models, which every engine's LoRA takes.
const PROJECTIONS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// `n` items, the first few named: "3 (a, b, c)" / "40 (a, b, c, …)".
fn some(items: &[impl AsRef<str>]) -> String {
    let shown: Vec<&str> = items.iter().take(3).map(|s| s.as_ref()).collect();
    let more = if items.len() > 3 { ", …" } else { "" };
    format!("{} ({}{more})", items.len(), shown.join(", "))
}

/// The module kinds (last segments) of the factored modules, sorted and deduplicated
/// (`fused`: with fused expert parameters, whose paths end in `experts` / `base_layer`).
fn kinds(inv: &Inventory, fused: bool) -> Vec<String> {
    let mut k: Vec<String> = inv
        .factored()
        .filter(|m| fused || m.experts != inventory::Experts::Fused)
        .map(|m| m.kind().to_string())
        .collect();
    k.sort();
    k.dedup();
    k
}
