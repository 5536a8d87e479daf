#include "core/model/quantized_model.h"

#include "core/error.h"

namespace ql {

QuantizedModel::QuantizedModel(std::shared_ptr<const ModelWeights> fp)
    : fp_(std::move(fp)) {
  if (!fp_) throw Error("QuantizedModel: no FP weights");
  current_ = *fp_;
  act_.resize(static_cast<std::size_t>(fp_->config.num_layers));
}

bool QuantizedModel::has_activation_quant() const {
  for (auto& blk : act_)
    for (auto& a : blk)
      if (a.active()) return true;
  return false;
}

ForwardHooks QuantizedModel::hooks() const {
  ForwardHooks h;
  h.transform_input = [this](int b, LinearKind k, Matrix& X) {
    const ActQuantizer& a = act(b, k);
    if (a.active())
      fake_quant_activations(X, *a.spec, a.spec->mode == ActRangeMode::Static ? &a.range : nullptr);
  };
  return h;
}

}  // namespace ql
