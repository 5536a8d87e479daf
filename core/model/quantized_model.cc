#include "core/model/quantized_model.h"

#include "core/error.h"

namespace ql {

QuantizedModel::QuantizedModel(std::shared_ptr<const ModelWeights> fp)
    : fp_(std::move(fp)) {
  if (!fp_) throw Error("QuantizedModel: no FP weights");
  current_ = *fp_;
  act_.resize(static_cast<std::size_t>(fp_->config.num_layers));
  kv_.resize(static_cast<std::size_t>(fp_->config.num_layers));
}

double QuantizedModel::kv_bits(int64_t n) const {
  if (kv_.empty()) return 16.0;
  const Index kvd = Index(config().num_kv_heads) * config().head_dim;
  double sum = 0;
  for (auto& q : kv_) sum += q ? q->kv_bits(n, kvd) : 16.0;
  return sum / static_cast<double>(kv_.size());
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
  bool any_kv = false;
  for (auto& q : kv_) any_kv = any_kv || q != nullptr;
  if (any_kv) h.kv_quantizer = [this](int b) { return kv_quantizer(b); };
  return h;
}

}  // namespace ql
