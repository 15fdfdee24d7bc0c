//! How llama.cpp names and lays out a model's weights in GGUF, for the architectures whose
//! LoRA phlora writes (docs/gguf.md: read from convert_hf_to_gguf's model classes and
//! gguf-py's tensor_mapping.py): the architecture name, each HF module's GGUF tensor, and the
//! row permutation llama.cpp's converter applies to Llama-family Q and K.

/// The transformers classes [`architecture`] knows, for messages.
pub const SUPPORTED: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
];

/// llama.cpp's architecture for a transformers `architectures` entry (None: not supported).
/// Mistral converts as llama; Gemma 3's multimodal class as its text model.
pub fn architecture(hf: &str) -> Option<&'static str> {
    Some(match hf {
        "LlamaForCausalLM" | "MistralForCausalLM" => "llama",
        "Qwen2ForCausalLM" => "qwen2",
        "Qwen3ForCausalLM" => "qwen3",
        "GemmaForCausalLM" => "gemma",
        "Gemma2ForCausalLM" => "gemma2",
        "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => "gemma3",
        _ => return None,
    })
}

/// The GGUF tensor (without `.weight`) a transformers module's weight becomes:
/// `model.layers.3.self_attn.q_proj` → `blk.3.attn_q`. None: no LoRA target llama.cpp names.
pub fn tensor_name(module: &str) -> Option<String> {
    match module {
        "model.embed_tokens" => return Some("token_embd".into()),
        "lm_head" => return Some("output".into()),
        _ => {}
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let gguf = match rest {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf}"))
}

/// Whether llama.cpp's converter permutes this architecture's Q and K rows.
pub fn permutes_qk(architecture: &str) -> bool {
    architecture == "llama"
}

/// The converter's `LlamaModel.permute` as a row map: entry `k` is the source row of row `k`
/// of the permuted matrix. Within each of `heads` heads of size d, row 2i + j comes from row
/// j·d/2 + i (interleaved rotary halves). None when the rows do not split that way. A LoRA for
/// Q or K permutes B's rows the same way (A is untouched), so B·A lands on the rows llama.cpp
/// stores.
pub fn qk_row_order(rows: usize, heads: usize) -> Option<Vec<usize>> {
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
        return None;
    }
    let d = rows / heads;
    Some(
        (0..rows)
            .map(|k| {
                let (h, within) = (k / d, k % d);
                let (i, j) = (within / 2, within % 2);
                h * d + j * (d / 2) + i
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_map_to_llama_cpp_tensor_names() {
        assert_eq!(
            tensor_name("model.layers.3.self_attn.q_proj").as_deref(),
            Some("blk.3.attn_q")
        );
        assert_eq!(
            tensor_name("model.layers.0.self_attn.o_proj").as_deref(),
            Some("blk.0.attn_output")
        );
        assert_eq!(
            tensor_name("model.layers.12.mlp.down_proj").as_deref(),
            Some("blk.12.ffn_down")
        );
        assert_eq!(
            tensor_name("model.embed_tokens").as_deref(),
            Some("token_embd")
        );
        assert_eq!(tensor_name("lm_head").as_deref(), Some("output"));
        assert_eq!(tensor_name("model.layers.0.input_layernorm"), None);
        assert_eq!(tensor_name("model.layers.x.self_attn.q_proj"), None);
        assert_eq!(architecture("MistralForCausalLM"), Some("llama"));
        assert_eq!(architecture("GPT2LMHeadModel"), None);
    }

    #[test]
    fn the_qk_permutation_is_the_converters_reshape_and_swap() {
        // One head of 4 rows: [0, 1, 2, 3] → [0, 2, 1, 3]; two heads repeat it per head.
        assert_eq!(qk_row_order(4, 1).unwrap(), vec![0, 2, 1, 3]);
        assert_eq!(qk_row_order(8, 2).unwrap(), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        // numpy's reshape(h, 2, d/2).swapaxes(1, 2).reshape(-1), written out for d = 6.
        assert_eq!(qk_row_order(6, 1).unwrap(), vec![0, 3, 1, 4, 2, 5]);
        for (rows, heads) in [(64, 4), (128, 8), (96, 3)] {
            let mut order = qk_row_order(rows, heads).unwrap();
            order.sort();
            assert_eq!(order, (0..rows).collect::<Vec<_>>(), "a bijection");
        }
        assert_eq!(qk_row_order(6, 4), None);
        assert_eq!(qk_row_order(6, 2), None, "odd head size");
    }
}
