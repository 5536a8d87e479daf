// Folding a per-input-channel equivalence transform into a model: the one place where a
// NormConsumers plugin's ChannelScaleTransform (SmoothQuant Eq. 3, AWQ-style scaling) changes
// weights. For an RMSNorm producer with weight γ feeding linears W_i (each d_out_i x d):
//
//   x = RMSNorm(h) ⊙ γ,  y_i = x W_iᵀ   ==>   γ' = γ / s,  W_i' = W_i diag(s),
//
// so x' = x / s and x' W_i'ᵀ = x W_iᵀ in real arithmetic (float32 rounding of γ/s and W s only).
// Biases are unchanged (they are added after the product). RMSNorm has no β, so nothing else
// moves. Each element is one float32 division / multiplication by float(s_j), as the PyTorch
// reference (ln.weight.div_(s); fc.weight.mul_(s)).
#pragma once
#include <vector>

#include "core/tensor.h"

namespace ql {

/// norm_weight /= s and, for every consumer, W = W diag(s) (column j times s_j), in float32
/// with float(s_j). s must be d = norm_weight.size() positive finite values and every consumer
/// d columns: ShapeError (sizes, a null consumer, a consumer listed twice, which would be scaled
/// twice) or NumericError (a scale that is not positive and finite in float32), thrown before
/// anything is modified. The caller folds each norm group once.
/// Not thread-safe for concurrent calls on the same tensors.
void fold_channel_scales(Vector& norm_weight, const std::vector<Matrix*>& consumers,
                         const VectorD& s);
/// The same with the producer optional: a null norm_weight scales the consumers only (the
/// caller divides the input by s itself, e.g. a synthetic layer's inputs); d is then the
/// consumers' column count.
void fold_channel_scales(Vector* norm_weight, const std::vector<Matrix*>& consumers,
                         const VectorD& s);

}  // namespace ql
