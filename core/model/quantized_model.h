// A quantized model as one object: the FP weights as loaded (shared, never modified), the
// current weights (transformed and quantized by the pipeline so far), the online transforms
// of each block (the slots of core/model/architecture.h), the activation quantizer at every
// linear's input, and a KV-cache quantizer per block that attention reads through. The
// forward pass evaluates it through hooks(): at a linear's input the online transform, then the
// activation quantizer; after RoPE the key/query transform; in attention the KV quantizer.
//
// Blocks are reached through block(b) only, so a later change can hold one block's current
// weights at a time.
//
// Thread safety: const methods may be called concurrently; hooks() reads the quantizers while
// the forward pass runs, so they must not be modified during a forward call.
#pragma once
#include <array>
#include <memory>
#include <optional>
#include <vector>

#include "core/model/architecture.h"
#include "core/model/model.h"
#include "core/model/transformer.h"
#include "core/model/transforms.h"
#include "core/quant_spec.h"
#include "core/quantize.h"

namespace ql {

/// Fake quantization of one linear's input (per token, per tensor, ...), with the static range
/// fixed at calibration when the spec asks for one.
struct ActQuantizer {
  const ActQuantSpec* spec = nullptr;  ///< null: the input stays float (the spec outlives the model)
  ActRange range;                      ///< used when spec->mode is Static
  ActClip clip;                        ///< learned clipping of the range (FlatQuant's LAC)
  bool active() const { return spec != nullptr; }
  /// Fake-quantizes X (tokens x width) in place (fake_quant_activations); no-op when inactive.
  void apply(Matrix& X) const;
  /// Whether a and this quantize every input identically (both inactive, or equal specs and,
  /// where they apply, equal static ranges and clipping).
  bool same_as(const ActQuantizer& a) const;
};

/// Transforms for one block, one per slot of the architecture table (null = none), as a
/// block-scope plugin returns them. Shapes: qkv_in / gate_up_in hidden, down_in intermediate,
/// o_in across heads (num_heads x num_heads factor, width q_dim), v_out per kv head (width
/// kv_dim), k_post_rope per head (head_dim factor; width kv_dim).
/// Learned clipping of a weight's rows (FlatQuant's LWC): row r is clamped to
/// [min_r · lo[r], max_r · hi[r]] after the input-side transforms are merged (and before v_proj's
/// output transform). Empty: none.
struct RowClip {
  Vector lo, hi;
  bool empty() const { return lo.size() == 0; }
};

struct BlockTransforms {
  std::array<std::shared_ptr<const InputTransform>, kTransformSlots> slot;
  /// Per linear: learned weight clipping (merged by apply_transforms) and learned activation
  /// clipping (installed in the linear's activation quantizer); none by default.
  std::array<RowClip, kLinearKinds> weight_clip;
  std::array<ActClip, kLinearKinds> act_clip;
  /// Learned clipping of the KV cache's per-token grids (FlatQuant's KV LAC): not applied here;
  /// a later KV-cache step reads it (KvCacheInput::key_clip / value_clip).
  ActClip key_clip, value_clip;
  std::shared_ptr<const InputTransform>& operator[](TransformSlot s) { return slot[static_cast<int>(s)]; }
  const std::shared_ptr<const InputTransform>& operator[](TransformSlot s) const {
    return slot[static_cast<int>(s)];
  }
  bool empty() const;
};

class QuantizedModel {
 public:
  /// Starts as the FP model: current weights = a copy of fp, no transforms or quantizers.
  explicit QuantizedModel(std::shared_ptr<const ModelWeights> fp);

  const Architecture& architecture() const { return arch_; }

  /// Installs block b's transforms: every inverse merged into the weights in double (q/k/v,
  /// gate/up, down and o inputs: W <- W P⁻ᵀ; v_out: W_v <- P_vᵀ W_v per kv head with o_proj
  /// absorbing P_v⁻ᵀ on every query head), the online ones kept for evaluation. Weight clipping
  /// is applied after the input-side merges and before v_out's (FlatQuant's order); activation
  /// clipping goes into the linears' activation quantizers. A transform's channel scale c
  /// (x ↦ (x ⊙ c) P) is then folded where the architecture table says the input is produced
  /// (FlatQuant's deployment, ALGORITHMS.md §5.1): into the RMSNorm weight (γ ← γ ⊙ c), or
  /// into the producing linear's rows (down input: up_proj, W_up[i,:] ← c_i W_up[i,:]), in
  /// double rounded once, and only P stays online; without a producer c stays online. A slot that
  /// already holds a transform is a ShapeError (compose transforms in one step), as is a
  /// transform whose width does not fit its slot. The block's function is unchanged up to
  /// rounding; the block's codes() are cleared.
  void apply_transforms(int b, const BlockTransforms& t);
  const BlockTransforms& transforms(int b) const { return transforms_.at(b); }
  /// Where slot s's channel scale of block b was folded ("input_layernorm", "mlp.up_proj
  /// rows"), or "" when it has none or it stays online.
  const std::string& scale_folded_into(int b, TransformSlot s) const {
    return folded_.at(b)[static_cast<int>(s)];
  }
  /// A weight W' of linear `kind` in block b's transformed space mapped back into the FP
  /// model's input/output space (W' Mᵀ for an input transform M, P⁻ᵀ W' for an output transform
  /// P), in float; W' itself when the block has no transforms.
  Matrix effective_weight(int b, LinearKind kind, const Matrix& W) const;

  const ModelWeights& fp() const { return *fp_; }
  const ModelConfig& config() const { return fp_->config; }
  int num_blocks() const { return fp_->config.num_layers; }
  /// Current weights of block b (what the pipeline has made of it so far).
  DecoderBlock& block(int b) { return current_.blocks.at(b); }
  const DecoderBlock& block(int b) const { return current_.blocks.at(b); }
  const DecoderBlock& fp_block(int b) const { return fp_->blocks.at(b); }
  /// The current weights as a whole model, for a Transformer over them.
  const ModelWeights& current() const { return current_; }
  /// Forward passes over the current / FP weights (evaluate current() with hooks()). Callers
  /// outside core/model use these rather than the weight containers, so that how blocks are
  /// held (all resident today; one at a time, memory-mapped, later) stays inside core/model.
  Transformer transformer() const { return Transformer(current_); }
  Transformer fp_transformer() const { return Transformer(*fp_); }

  /// Codes and grids of linear `kind` of block b when its current weights lie on a grid:
  /// then dequantize(*codes(b, kind)) == block(b).linear(kind).W bitwise. Whoever changes the
  /// weights sets or clears this (the pipeline: a layer step's codes, cleared by a step that
  /// changes the weights without them, e.g. a channel-scale fold after quantization).
  std::optional<QuantizedTensor>& codes(int b, LinearKind k) { return codes_.at(b)[static_cast<int>(k)]; }
  const std::optional<QuantizedTensor>& codes(int b, LinearKind k) const {
    return codes_.at(b)[static_cast<int>(k)];
  }

  ActQuantizer& act(int b, LinearKind k) { return act_.at(b)[static_cast<int>(k)]; }
  const ActQuantizer& act(int b, LinearKind k) const { return act_.at(b)[static_cast<int>(k)]; }
  bool has_activation_quant() const;

  /// Block b's KV-cache quantizer (null: exact cache).
  std::shared_ptr<const KvQuantizer>& kv_slot(int b) { return kv_.at(b); }
  const KvQuantizer* kv_quantizer(int b) const { return kv_.at(b).get(); }
  /// Mean over blocks of the KV bits per element of a sequence of n tokens (16 for an exact
  /// block's cache): the `kv_bits` summary metric.
  double kv_bits(int64_t n) const;

  /// Hooks that apply every active quantizer to its linear's input (transform_input) and give
  /// attention the KV quantizers (kv_quantizer); the returned hooks refer to this object,
  /// which must outlive them.
  ForwardHooks hooks() const;

 private:
  std::shared_ptr<const ModelWeights> fp_;
  Architecture arch_;
  ModelWeights current_;
  std::vector<BlockTransforms> transforms_;  // as installed (channel scales included)
  // What the forward pass applies per slot: the transform, without its channel scale where
  // that was folded into weights (folded_ says where).
  std::vector<std::array<std::shared_ptr<const InputTransform>, kTransformSlots>> online_;
  std::vector<std::array<std::string, kTransformSlots>> folded_;
  void fold_scales(int b);
  std::array<int, kLinearKinds> input_slot_{};  // slot acting on each linear's input, or -1
  std::vector<std::array<ActQuantizer, kLinearKinds>> act_;
  std::vector<std::array<std::optional<QuantizedTensor>, kLinearKinds>> codes_;
  std::vector<std::shared_ptr<const KvQuantizer>> kv_;
};

}  // namespace ql
