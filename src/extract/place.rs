//! Adapter placement: one tensor's encoded factors under the keys and shapes its loaders read
//! them by: PEFT's key names, a conv LoRA's shapes, a grown vocabulary's zero rows, and an
//! expert's place in its fused parameter.

use crate::adapter;
use crate::adapter::writer::{pad_axis, ExpertPlace};
use crate::checkpoint::DType;
use crate::factor::{DeviceFactors, Layout};
use crate::plan::{Action, Form, PlanItem};

/// Where a tensor's factors go (the device copies in `f` are dropped).
pub(super) fn factor_tensors<M>(
    item: &PlanItem,
    layout: Layout,
    f: DeviceFactors<M>,
    dtype: DType,
) -> FactorTensors {
    // A fused parameter's factors are staged under the parameter's own path; assemble gives
    // them PEFT's key once it knows which parameters of the module are targeted.
    let (a_key, b_key) = match (&item.action, &item.form) {
        (_, Form::Expert(e)) => (adapter::lora_a_key(&e.param), adapter::lora_b_key(&e.param)),
        (Action::LoraLinear, _) => (
            adapter::lora_a_key(&item.module),
            adapter::lora_b_key(&item.module),
        ),
        _ => (
            adapter::embedding_a_key(&item.module),
            adapter::embedding_b_key(&item.module),
        ),
    };
    // A conv LoRA: A [r, in, k…] (A's rows are the flattened filters), B [out, r, 1…].
    let (mut a_shape, mut b_shape) = (f.a_shape.to_vec(), f.b_shape.to_vec());
    if item.form == Form::Conv {
        a_shape.truncate(1);
        a_shape.extend_from_slice(&item.shape[1..]);
        b_shape.resize(item.shape.len(), 1);
    }
    // A vocabulary that grew: the factors take the resized model's shape, zero on the new
    // rows (those are written whole beside the adapter).
    let (mut a_bytes, mut b_bytes) = (f.a_bytes, f.b_bytes);
    if let Some(added) = &item.added {
        let (shape, bytes, axis) = if layout == Layout::Embedding {
            (&mut a_shape, &mut a_bytes, 1)
        } else {
            (&mut b_shape, &mut b_bytes, 0)
        };
        *bytes = pad_axis(bytes, shape, axis, added.ft_rows());
        shape[axis] = added.ft_rows();
    }
    let expert = match &item.form {
        Form::Expert(e) => Some(match &e.part {
            None => ExpertPlace::whole(e.index, e.count, b_shape[0]),
            Some(p) => ExpertPlace {
                index: e.index,
                count: e.count,
                part: p.part,
                out_offset: p.out_offset,
                out_total: p.out_total,
            },
        }),
        _ => None,
    };
    FactorTensors {
        a_key,
        a_shape,
        a_bytes,
        b_key,
        b_shape,
        b_bytes,
        dtype: dtype.as_str(),
        expert,
    }
}

/// How a tensor's factors are laid out: embeddings, Conv1D weights and gpt-oss experts store
/// [in, out] (A = (U√S)ᵀ, B = (√S·Vᵀ)ᵀ).
pub(super) fn layout_of(item: &PlanItem) -> Layout {
    if item.action == Action::LoraEmbedding || item.stored_in_out() {
        Layout::Embedding
    } else {
        Layout::Linear
    }
}

/// Encoded A and B, named as PEFT reads them.
pub(super) struct FactorTensors {
    pub a_key: String,
    pub a_shape: Vec<usize>,
    pub a_bytes: Vec<u8>,
    pub b_key: String,
    pub b_shape: Vec<usize>,
    pub b_bytes: Vec<u8>,
    pub dtype: &'static str,
    /// One expert (or part of one) of a fused parameter: the writer packs them.
    pub expert: Option<ExpertPlace>,
}
