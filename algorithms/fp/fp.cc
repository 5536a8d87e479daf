#include "algorithms/fp/fp.h"

#include "algorithms/algorithm.h"

namespace ql {
namespace {

struct FpOptions {};

class Fp final : public LayerAlgorithm {
 private:
  LayerOutput quantize_layer(const LayerInput& in) const override {
    LayerOutput out;
    out.W = *in.W;
    return out;
  }
};

}  // namespace

void register_fp(AlgorithmRegistry& registry) {
  AlgorithmInfo info;
  info.name = "fp";
  info.scope = Scope::Layer;
  info.summary = "no quantization: the floating-point reference";
  info.uses_weight_spec = false;
  info.identity = true;
  info.options = std::make_shared<OptionSchema<FpOptions>>();
  info.make = [](const std::any&) { return std::make_unique<Fp>(); };
  registry.add(std::move(info));
}

}  // namespace ql
