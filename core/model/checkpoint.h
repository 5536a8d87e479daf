// Loading a Hugging Face checkpoint directory into ModelWeights (core/model/model.h).
//
// A checkpoint directory holds config.json and either model.safetensors or the sharded form
// model.safetensors.index.json ({"weight_map": {tensor name: shard file name}}) plus the shard
// files it names, all relative to the directory. Tensors may be F32, F16 or BF16 and are
// converted to float32 exactly. No tokenizer file is read here.
//
// Supported architectures (config.json "architectures"[0]): LlamaForCausalLM,
// MistralForCausalLM, Qwen2ForCausalLM — the same decoder block (RMSNorm, rotate-half RoPE,
// SwiGLU MLP, grouped-query attention). Config features this project does not implement are
// rejected rather than ignored: rope_scaling (any non-null value), hidden_act other than "silu",
// an active sliding window (Mistral "sliding_window" or Qwen2 "use_sliding_window" with a
// window smaller than max_position_embeddings: such a window never binds for any sequence the
// model accepts, so it is harmless and accepted), Llama "mlp_bias": true, and any
// "quantization_config" (an already-quantized checkpoint).
//
// Biases: Qwen2 always has q/k/v biases. Llama with "attention_bias": true has q/k/v AND o
// biases (as in Hugging Face's LlamaAttention); they are loaded into Linear::b. Mistral has no
// attention biases and rejects "attention_bias": true. ModelConfig::attention_bias is true
// whenever the q/k/v biases exist; DecoderBlock::o.b is non-empty only in the Llama case.
//
// The tensor set must match exactly what the config implies (expected_tensors()):
//  - a missing tensor is an error naming it and the file expected to hold it;
//  - an unexpected tensor is an error naming it and its file, except the non-persistent RoPE
//    buffers "model.layers.<i>.self_attn.rotary_emb.inv_freq" that older transformers versions
//    saved: they are recomputed from rope_theta by the forward pass and are skipped;
//  - a shape differing from the config's is an error with the expected and found shapes;
//  - with tie_word_embeddings, lm_head becomes a copy of embed; a stored lm_head.weight is then
//    accepted only if it equals model.embed_tokens.weight element for element.
// load_checkpoint validates every header, name and shape before reading any tensor data, reads
// tensors in parallel (OpenMP; the result does not depend on the thread count) and either
// returns a complete model or throws (IoError, ConfigError, NumericError on a NaN/Inf weight).
//
// Thread safety: the functions are reentrant; load_checkpoint opens its own OpenMP region.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/model/model.h"

namespace ql {

/// "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM".
const std::vector<std::string>& supported_architectures();
/// rope_scaling / rope_parameters types the loader implements ("linear", "dynamic", "llama3"),
/// and the ones it rejects by name.
const std::vector<std::string>& supported_rope_scalings();
const std::vector<std::string>& rejected_rope_scalings();

/// Parses and validates a Hugging Face config.json.
/// Required: architectures, hidden_size, intermediate_size, num_hidden_layers,
/// num_attention_heads, vocab_size. Defaults: num_key_value_heads = num_attention_heads,
/// head_dim = hidden_size / num_attention_heads, rms_norm_eps 1e-6, rope_theta 10000,
/// tie_word_embeddings false, max_position_embeddings as in transformers (Llama 2048,
/// Mistral 131072, Qwen2 32768), bos/eos_token_id -1 (an eos list keeps its first entry).
/// A null value counts as absent. Checks: positive sizes, num_heads % num_kv_heads == 0,
/// hidden_size % num_heads == 0 when head_dim is not given, even head_dim (rotate-half RoPE),
/// rms_norm_eps > 0, rope_theta > 0.
/// Errors: IoError if the file is missing or not JSON (with line/column); ConfigError
/// "<path>: key '<field>': ..." for a wrong type, missing or out-of-range field, an
/// unsupported architecture (listing the supported ones) or an unsupported feature.
ModelConfig load_model_config(const std::string& config_json_path);

/// A tensor the config implies, with its shape.
struct ExpectedTensor {
  std::string name;
  std::vector<int64_t> shape;
};
/// Every tensor a checkpoint with this config must contain, in model order: embed, per layer
/// (input_layernorm, q/k/v/o [+ biases], post_attention_layernorm, gate/up/down), model.norm,
/// lm_head.weight (absent when tied).
std::vector<ExpectedTensor> expected_tensors(const ModelConfig& config);

/// Loads dir/config.json and the weights (see the header comment). The returned
/// ModelWeights::config is load_model_config(dir + "/config.json").
ModelWeights load_checkpoint(const std::string& dir);

/// One-line summary for logs, e.g. "LlamaForCausalLM: 6 layers, hidden 256, 8 heads / 4 kv
/// heads x head_dim 32, mlp 768, vocab 4096, max_pos 1024, rope_theta 10000, rms_eps 1e-05,
/// untied lm_head, no attention bias".
std::string describe(const ModelConfig& config);

}  // namespace ql
