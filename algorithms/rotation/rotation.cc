#include "algorithms/rotation/rotation.h"

#include <memory>

#include "algorithms/algorithm.h"
#include "core/rng.h"

namespace ql {
namespace {

enum class MatrixKind { Haar, Hadamard };
enum class KeysMode { Auto, On, Off };

struct RotationOptions {
  int seed = 0;
  MatrixKind matrix = MatrixKind::Haar;
  bool kronecker = true;
  KeysMode keys = KeysMode::Auto;
};

class Rotation final : public BlockAlgorithm {
 public:
  explicit Rotation(RotationOptions o) : opt_(o) {}

 private:
  /// Factor f of slot s in block b: its own counter stream, so every draw is independent of
  /// which other slots are drawn.
  TransformFactor factor(Index n, int block, TransformSlot s, int f) const {
    return draw(n, mix_stream(static_cast<uint64_t>(block), static_cast<uint64_t>(s) * 4 + f));
  }
  /// One n x n orthogonal factor from counter stream `stream` of the plugin's seed.
  TransformFactor draw(Index n, uint64_t stream) const {
    const uint64_t seed = static_cast<uint64_t>(opt_.seed);
    const bool pow2 = n > 0 && (n & (n - 1)) == 0;
    return TransformFactor::orthogonal(opt_.matrix == MatrixKind::Hadamard && pow2 ? random_hadamard(n, seed, stream)
                                                                                   : random_orthogonal(n, seed, stream));
  }
  std::shared_ptr<const InputTransform> input_side(Index width, int block, TransformSlot s) const {
    if (!opt_.kronecker) return std::make_shared<const InputTransform>(InputTransform::dense(factor(width, block, s, 0)));
    const auto [n1, n2] = kronecker_factor_sizes(width);
    return std::make_shared<const InputTransform>(
        InputTransform::kronecker(factor(n1, block, s, 0), factor(n2, block, s, 1)));
  }

  /// A standalone linear's input: the q/k/v input's structure (Kronecker or dense) at `width`,
  /// each linear its own stream.
  std::shared_ptr<const InputTransform> standalone_transform(Index width, uint64_t stream) const override {
    if (!opt_.kronecker)
      return std::make_shared<const InputTransform>(InputTransform::dense(standalone_factor(width, stream, 0)));
    const auto [n1, n2] = kronecker_factor_sizes(width);
    return std::make_shared<const InputTransform>(
        InputTransform::kronecker(standalone_factor(n1, stream, 0), standalone_factor(n2, stream, 1)));
  }
  TransformFactor standalone_factor(Index n, uint64_t stream, int f) const {
    return draw(n, mix_stream(stream, static_cast<uint64_t>(f)));
  }

  BlockTransforms compute_transforms(const BlockInput& in, Diagnostics& diag) const override {
    const Architecture& a = *in.arch;
    const HeadLayout& h = a.heads();
    BlockTransforms t;
    for (TransformSlot s : {TransformSlot::QkvInput, TransformSlot::GateUpInput, TransformSlot::DownInput})
      t[s] = input_side(a.slot_width(s), in.block, s);
    t[TransformSlot::VOutputPerHead] = std::make_shared<const InputTransform>(
        InputTransform::per_head(factor(h.head_dim, in.block, TransformSlot::VOutputPerHead, 0), h.num_kv_heads));
    t[TransformSlot::OInputAcrossHeads] = std::make_shared<const InputTransform>(InputTransform::across_heads(
        factor(h.num_heads, in.block, TransformSlot::OInputAcrossHeads, 0), h.head_dim));
    const bool keys = opt_.keys == KeysMode::On || (opt_.keys == KeysMode::Auto && in.kv_quantized);
    if (keys)
      t[TransformSlot::KeysPerHead] = std::make_shared<const InputTransform>(
          InputTransform::per_head(factor(h.head_dim, in.block, TransformSlot::KeysPerHead, 0), h.num_kv_heads));
    diag.emplace_back("keys_rotated", keys ? 1.0 : 0.0);
    return t;
  }

  RotationOptions opt_;
};

std::shared_ptr<OptionSchema<RotationOptions>> make_schema() {
  auto s = std::make_shared<OptionSchema<RotationOptions>>();
  s->add("seed", &RotationOptions::seed, "seed of the random transforms (sweep it: the result depends on the draw)",
         {0, 2147483647});
  s->add_enum("matrix", &RotationOptions::matrix,
              "haar: random orthogonal (QR of a Gaussian, signs fixed); hadamard: randomized Hadamard where "
              "the size is a power of two, haar otherwise",
              {{"haar", MatrixKind::Haar}, {"hadamard", MatrixKind::Hadamard}});
  s->add("kronecker", &RotationOptions::kronecker,
         "q/k/v, gate/up and down inputs: Kronecker products of two factors (FlatQuant's sizes); false: one dense matrix");
  s->add_enum("keys", &RotationOptions::keys,
              "per-head P_k on keys (and P_k^-T on queries) after RoPE: auto = when a KV-cache step follows",
              {{"auto", KeysMode::Auto}, {"on", KeysMode::On}, {"off", KeysMode::Off}});
  return s;
}

}  // namespace

void register_rotation(AlgorithmRegistry& registry) {
  AlgorithmInfo info;
  info.name = "rotation";
  info.scope = Scope::Block;
  info.summary =
      "fixed random orthogonal transforms in FlatQuant's slots (q/k/v, gate/up, down inputs online; "
      "v per head and o across heads merged/online; keys after RoPE with a quantized KV cache); on the "
      "synthetic suite one transform per layer input";
  info.paper = "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs, arXiv 2404.00456 (without fused kernels)";
  info.uses_weight_spec = false;
  info.standalone_inputs = true;  // the synthetic suite: one transform per linear's input
  info.options = make_schema();
  info.make = [](const std::any& o) { return std::make_unique<Rotation>(std::any_cast<const RotationOptions&>(o)); };
  registry.add(std::move(info));
}

}  // namespace ql
