#include "core/model/fold.h"

#include <cmath>
#include <string>

#include "core/error.h"

namespace ql {

void fold_channel_scales(Vector& norm_weight, const std::vector<Matrix*>& consumers,
                         const VectorD& s) {
  fold_channel_scales(&norm_weight, consumers, s);
}

void fold_channel_scales(Vector* norm_weight, const std::vector<Matrix*>& consumers,
                         const VectorD& s) {
  const Index d = norm_weight ? norm_weight->size() : s.size();
  if (s.size() != d)
    throw ShapeError("fold_channel_scales: " + std::to_string(s.size()) + " scales for a norm of " +
                     std::to_string(d) + " channels");
  for (std::size_t i = 0; i < consumers.size(); ++i) {
    if (!consumers[i]) throw ShapeError("fold_channel_scales: consumer " + std::to_string(i) + " is null");
    if (consumers[i]->cols() != d)
      throw ShapeError("fold_channel_scales: consumer " + std::to_string(i) + " has " +
                       std::to_string(consumers[i]->cols()) + " input channels, the norm " +
                       std::to_string(d));
  }
  for (std::size_t i = 0; i < consumers.size(); ++i)
    for (std::size_t k = i + 1; k < consumers.size(); ++k)
      if (consumers[i] == consumers[k])
        throw ShapeError("fold_channel_scales: consumer " + std::to_string(i) + " is listed twice");
  const Vector sf = s.cast<float>();
  for (Index j = 0; j < d; ++j)
    if (!(sf[j] > 0.0f) || !std::isfinite(sf[j]))
      throw NumericError("fold_channel_scales: scale " + std::to_string(j) +
                         " is not positive and finite in float32");
  if (norm_weight) norm_weight->array() /= sf.array();
  for (Matrix* W : consumers) W->array().rowwise() *= sf.transpose().array();
}

}  // namespace ql
