// A quantized model as one object: the FP weights as loaded (shared, never modified), the
// current weights (transformed and quantized by the pipeline so far), the activation
// quantizer at every linear's input, and a KV-cache quantizer per block that attention reads
// through. The forward pass evaluates it through hooks().
//
// Blocks are reached through block(b) only, so a later change can hold one block's current
// weights at a time.
//
// Thread safety: const methods may be called concurrently; hooks() reads the quantizers while
// the forward pass runs, so they must not be modified during a forward call.
#pragma once
#include <array>
#include <memory>
#include <vector>

#include "core/model/model.h"
#include "core/model/transformer.h"
#include "core/quant_spec.h"
#include "core/quantize.h"

namespace ql {

/// Fake quantization of one linear's input (per token, per tensor, ...), with the static range
/// fixed at calibration when the spec asks for one.
struct ActQuantizer {
  const ActQuantSpec* spec = nullptr;  ///< null: the input stays float (the spec outlives the model)
  ActRange range;                      ///< used when spec->mode is Static
  bool active() const { return spec != nullptr; }
};

class QuantizedModel {
 public:
  /// Starts as the FP model: current weights = a copy of fp, no activation quantizers.
  explicit QuantizedModel(std::shared_ptr<const ModelWeights> fp);

  const ModelWeights& fp() const { return *fp_; }
  const ModelConfig& config() const { return fp_->config; }
  int num_blocks() const { return fp_->config.num_layers; }
  /// Current weights of block b (what the pipeline has made of it so far).
  DecoderBlock& block(int b) { return current_.blocks.at(b); }
  const DecoderBlock& block(int b) const { return current_.blocks.at(b); }
  const DecoderBlock& fp_block(int b) const { return fp_->blocks.at(b); }
  /// The current weights as a whole model, for a Transformer over them.
  const ModelWeights& current() const { return current_; }

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
  ModelWeights current_;
  std::vector<std::array<ActQuantizer, kLinearKinds>> act_;
  std::vector<std::shared_ptr<const KvQuantizer>> kv_;
};

}  // namespace ql
