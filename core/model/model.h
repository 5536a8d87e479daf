// A decoder-only transformer checkpoint in memory (LLaMA family: LlamaForCausalLM,
// MistralForCausalLM, Qwen2ForCausalLM), float32, with Hugging Face tensor names.
//
// Layout conventions (as stored by Hugging Face): every linear weight is d_out x d_in (row =
// output channel), y = x Wᵀ + b. Attention heads are contiguous blocks of head_dim rows of the
// q/k/v projections. RoPE is the rotate-half form (first half of each head's dims paired with
// the second half).
#pragma once
#include <string>
#include <vector>

#include "core/model/rope.h"
#include "core/tensor.h"

namespace ql {

struct ModelConfig {
  std::string architecture;  ///< "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM" or "Qwen3ForCausalLM"
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;     ///< grouped-query attention: num_heads % num_kv_heads == 0
  int head_dim = 0;         ///< hidden_size / num_heads unless config.json says otherwise
  int vocab_size = 0;
  int max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeSpec rope;             ///< rope_theta and rope_scaling
  bool tie_word_embeddings = false;
  bool attention_bias = false;  ///< q/k/v biases (Qwen2; Qwen3 and Llama with attention_bias: o too)
  bool qk_norm = false;         ///< per-head RMSNorm of q and k before RoPE (Qwen3)
  int bos_token_id = -1;
  int eos_token_id = -1;
};

/// One linear layer: W is d_out x d_in; b is empty or d_out.
struct Linear {
  Matrix W;
  Vector b;
};

/// The seven linears of a decoder block, in the order of the block's data flow.
enum class LinearKind { Q, K, V, O, Gate, Up, Down };
constexpr int kLinearKinds = 7;
/// "self_attn.q_proj", ..., "mlp.down_proj".
const char* linear_suffix(LinearKind k);
/// "model.layers.3.self_attn.q_proj": the name used by targets/ignore regexes and results.
std::string linear_name(int block, LinearKind k);

struct DecoderBlock {
  Vector input_norm;      ///< RMSNorm weight before attention (hidden)
  Vector post_attn_norm;  ///< RMSNorm weight before the MLP (hidden)
  Linear q, k, v, o, gate, up, down;
  /// Qwen3: RMSNorm weights (head_dim each) applied to every head of q and of k after the
  /// projection and before RoPE; empty otherwise.
  Vector q_norm, k_norm;

  Linear& linear(LinearKind kind);
  const Linear& linear(LinearKind kind) const;
};

struct ModelWeights {
  ModelConfig config;
  Matrix embed;       ///< vocab x hidden
  std::vector<DecoderBlock> blocks;
  Vector final_norm;  ///< hidden
  Matrix lm_head;     ///< vocab x hidden (a copy of embed when tie_word_embeddings)
};

}  // namespace ql
