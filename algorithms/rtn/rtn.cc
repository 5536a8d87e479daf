#include "algorithms/rtn/rtn.h"

#include "algorithms/algorithm.h"

namespace ql {
namespace {

struct RtnOptions {};

class Rtn final : public LayerAlgorithm {
 private:
  LayerOutput quantize_layer(const LayerInput& in) const override {
    LayerOutput out;
    if (!in.spec.quantized()) {  // bits: 16 keeps the layer in float
      out.W = *in.W;
      return out;
    }
    QuantizedTensor q = quantize(*in.W, in.spec);
    out.W = dequantize(q);
    out.quantized = std::move(q);
    return out;
  }
};

}  // namespace

void register_rtn(AlgorithmRegistry& registry) {
  AlgorithmInfo info;
  info.name = "rtn";
  info.scope = Scope::Layer;
  info.summary = "round-to-nearest on the step's grid (min-max, percentile or MSE ranges)";
  info.uses_weight_spec = true;
  info.options = std::make_shared<OptionSchema<RtnOptions>>();
  info.make = [](const std::any&) { return std::make_unique<Rtn>(); };
  registry.add(std::move(info));
}

}  // namespace ql
