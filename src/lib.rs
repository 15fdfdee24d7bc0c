//! phlora: extract LoRA adapters from a fully fine-tuned model with no training data.
//!
//! For each weight matrix, ΔW = W_ft − W_base; a truncated (randomized) SVD keeps the top
//! singular directions; the factors are written as a PEFT adapter. Data flows one way:
//! [`plan`] → load ([`checkpoint`]) → delta and [`linalg`] on a [`backend`] → [`factor`] →
//! sink ([`adapter`], [`report`]). [`extract`] orchestrates.

pub mod adapter;
pub mod analyze;
pub mod backend;
pub mod bench;
pub mod check;
pub mod checkpoint;
pub mod compare;
pub mod console;
pub mod error;
pub mod extract;
pub mod factor;
pub mod floor;
pub mod gguf;
pub mod hub;
pub mod interrupt;
pub mod linalg;
pub mod merge;
pub mod names;
pub mod outdir;
pub mod plan;
pub mod plot;
pub mod report;
pub mod rng;
pub mod size;
pub mod staging;
pub mod synth;
pub mod verify;

pub use error::{Error, Result};
