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
    // imatrix (llama.cpp): the MSE range search weighs column j by the calibration mean x_j².
    Vector importance;
    if (in.spec.mse_weights == MseWeights::Imatrix) {
      if (!in.channels || in.channels->count() == 0)
        throw ShapeError("'" + in.name + "': mse_weights imatrix needs the layer's calibration inputs");
      importance = in.channels->mean_sq().cast<float>();
    }
    QuantizedTensor q = quantize(*in.W, in.spec, importance.size() ? &importance : nullptr);
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
  info.summary =
      "round-to-nearest on the step's grid (min-max, percentile or MSE ranges; range: mse with mse_weights: "
      "imatrix weighs the search by the calibration mean x^2 per input channel, llama.cpp's importance matrix)";
  info.uses_weight_spec = true;
  info.options = std::make_shared<OptionSchema<RtnOptions>>();
  info.make = [](const std::any&) { return std::make_unique<Rtn>(); };
  registry.add(std::move(info));
}

}  // namespace ql
