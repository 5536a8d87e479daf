// Architecture facts of the LLaMA-family decoders quantlab runs, as data (the way ggml keeps
// its formats in one table): which linears read one shared input and which RMSNorm produces
// it, the head layout, the RoPE pairing, and the slots where an online transform may sit.
// Every placement decision (norm->consumers folding, rotations, KV-cache quantizers, and the
// runner's statistics capture) reads this table instead of naming linears itself.
//
// LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM share one table:
// they differ in q/k/v biases (Qwen2), sizes and Qwen3's per-head q/k norms (head_norms()), not
// in where inputs are shared or transforms sit.
#pragma once
#include <array>
#include <optional>
#include <string>
#include <vector>

#include "core/model/model.h"
#include "core/tensor.h"

namespace ql {

/// The four inputs of a decoder block's linears. Linears of one group multiply the same
/// activations, so they share one Hessian and one set of channel statistics.
enum class InputSite {
  AttnIn,     ///< RMSNorm(h) · input_layernorm: q, k, v
  AttnOut,    ///< the attention output, heads concatenated: o
  MlpIn,      ///< RMSNorm(h) · post_attention_layernorm: gate, up
  MlpHidden,  ///< silu(gate) ⊙ up: down
};
constexpr int kInputSites = 4;

struct InputGroup {
  InputSite site;
  const char* name;                ///< "attn_in", "attn_out", "mlp_in", "mlp_hidden"
  std::vector<LinearKind> members; ///< in data-flow order; the first is the capture point
  /// The RMSNorm whose weight produces the input ("input_layernorm"), where a per-channel
  /// equivalence transform can be folded exactly, or nullptr when no norm sits there.
  const char* norm;
  /// Without a norm: the linear whose output rows produce the input channel by channel, so a
  /// per-channel scale folds into its rows (up_proj for the down input: silu(gate) ⊙ up is
  /// linear in up); none: the scale stays online.
  std::optional<LinearKind> scale_rows = std::nullopt;
};

/// Where an online (evaluation-time) or merged transform may sit, FlatQuant's placement
/// (ALGORITHMS.md §5.1): one slot per transform a rotation/affine method can apply.
enum class TransformSlot {
  QkvInput,          ///< P_a on the q/k/v input (after input_layernorm)
  VOutputPerHead,    ///< P_v per kv head on v_proj's output (merged into v and o)
  OInputAcrossHeads, ///< P_o across heads on o_proj's input
  GateUpInput,       ///< P_ug on the gate/up input (after post_attention_layernorm)
  DownInput,         ///< P_d on down_proj's input (online: silu ⊙ cannot absorb it)
  KeysPerHead,       ///< P_k per head on queries and keys after RoPE (KV-cache quantization)
};
constexpr int kTransformSlots = 6;

struct TransformSlotInfo {
  TransformSlot slot;
  const char* name;  ///< "qkv_in", "v_out", "o_in", "gate_up_in", "down_in", "k_post_rope"
  /// The input group whose activations the transform acts on, or -1 for V's output and the
  /// keys (which no linear of the block reads directly).
  int input_group;
  bool per_head;  ///< a head_dim x head_dim block repeated over heads
  /// Whether the inverse can be merged into weights on both sides (no online cost): true for
  /// q/k/v and gate/up inputs (into the norm-side consumers; the forward transform needs the
  /// norm weight absorbed or applied online) and for V's output (into v and o).
  bool mergeable;
};

/// Head layout of the attention: query head j reads kv head j / (num_heads / num_kv_heads).
struct HeadLayout {
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;
  Index q_dim() const { return Index(num_heads) * head_dim; }
  Index kv_dim() const { return Index(num_kv_heads) * head_dim; }
  int queries_per_kv() const { return num_heads / num_kv_heads; }
  int kv_head_of(int q_head) const { return q_head / queries_per_kv(); }
};

/// Rotate-half RoPE pairing within a head: dimension i rotates with i + head_dim/2 by angle
/// pos · theta^(-2i/head_dim) for i < head_dim/2. A transform or codebook that must commute
/// with RoPE acts on these pairs as 2x2 blocks [[a, b], [-b, a]] (CommVQ, ALGORITHMS.md §7).
struct RopePairing {
  int head_dim = 0;
  RopeSpec rope;  ///< frequencies (theta and scaling)
  int half() const { return head_dim / 2; }
  int partner(int i) const { return i < half() ? i + half() : i - half(); }
};

/// A per-head RMSNorm on a linear's output before RoPE (Qwen3's q_norm, k_norm; weights of
/// head_dim). Input-side placement is unaffected (it sits after the projection), and the
/// post-RoPE key slot sees normalised keys; an output-side transform of q or k before RoPE
/// would not commute with it (none is offered), and the training graph (block_grad) does not
/// model it, so block-/model-level training refuses such blocks.
struct HeadNorm {
  LinearKind after;  ///< Q or K
  const char* name;  ///< "self_attn.q_norm"
};

class Architecture {
 public:
  /// The table for a checkpoint's config; throws ShapeError for an architecture quantlab does not
  /// know (naming it and the known ones) or inconsistent head sizes.
  static Architecture of(const ModelConfig& config);

  const std::string& name() const { return name_; }
  const std::vector<InputGroup>& input_groups() const { return groups_; }
  const InputGroup& group(InputSite site) const { return groups_[static_cast<int>(site)]; }
  /// The index in input_groups() of the group `kind` belongs to.
  int group_of(LinearKind kind) const { return group_of_[static_cast<int>(kind)]; }
  /// Width of a group's input: hidden, q_dim or intermediate.
  Index input_width(int group) const { return widths_[group]; }
  const std::vector<TransformSlotInfo>& transform_slots() const { return slots_; }
  const TransformSlotInfo& slot(TransformSlot s) const { return slots_[static_cast<int>(s)]; }
  /// Width a transform in slot s acts on: hidden (q/k/v and gate/up inputs), q_dim (o input),
  /// intermediate (down input), kv_dim (v output, keys).
  Index slot_width(TransformSlot s) const;
  const HeadLayout& heads() const { return heads_; }
  const RopePairing& rope() const { return rope_; }
  bool qkv_bias() const { return qkv_bias_; }
  /// Per-head norms on projection outputs (empty but for Qwen3).
  const std::vector<HeadNorm>& head_norms() const { return head_norms_; }
  /// "model.layers.3.input_layernorm": where a group's norm sits in block b ("" without one).
  std::string norm_name(int block, int group) const;

 private:
  std::string name_;
  std::vector<InputGroup> groups_;
  std::array<int, kLinearKinds> group_of_{};
  std::array<Index, kInputSites> widths_{};
  std::vector<TransformSlotInfo> slots_;
  HeadLayout heads_;
  RopePairing rope_;
  bool qkv_bias_ = false;
  std::vector<HeadNorm> head_norms_;
};

/// The RMSNorm weight of block `blk` that produces group `g`'s input (ShapeError if the group
/// has no norm).
Vector& norm_weight(DecoderBlock& blk, const InputGroup& g);

}  // namespace ql
