// smoothquant: "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
// Language Models" (Xiao et al., arXiv 2211.10438). Activation outliers sit in a few fixed
// input channels, which makes per-tensor / per-token activation grids coarse. A per-input-channel
// equivalence transform x' = x / s, W' = W diag(s) (Eq. 3) moves part of that range into the
// weights, which quantize per output channel and absorb it easily. s is Eq. 4:
//
//   s_j = max|X_j|^α / max|W_:j|^(1−α)
//
// with max|X_j| over all calibration tokens of the shared input and max|W_:j| over the
// concatenated rows of every consumer (q/k/v share one s; gate/up share one s). The runner
// folds 1/s into the producing RMSNorm weight and s into the consumers' columns
// (core/model/fold.h), so the FP function is unchanged for every α; weights and activations
// are quantized by the later steps / the step's `act` spec.
//
// Config keys (no weight grid: the step's `act` key sets the activation quantization):
//   alpha       number in [0, 1] (default 0.5), or `auto`: the migration strength.
//               Note α = 0 is not the identity: s_j = 1/max|W_:j| equalises the weight columns.
//   alpha_grid  (auto only) candidate α values, default 0, 0.05, ..., 1.
//   auto_wbits, auto_abits  (auto only, default 8 / 8) the bit widths the auto criterion models.
//
// `auto` picks, per norm→consumers group, the α of alpha_grid minimising a predicted output
// error of the consumers under per-output-channel symmetric absmax weights (auto_wbits) and one
// symmetric absmax activation grid over the tensor (auto_abits), computed from the channel
// statistics alone (the plugin never sees the calibration tokens): with x' = x/s, W' = W diag(s),
// Δ_a = max_j max|x'_j| / (2^(abits−1)−1) and Δ_o = max_j |W'_oj| / (2^(wbits−1)−1),
//   E = Σ_j min(Δ_a²/12, E[x'_j²]) Σ_o W'_oj²  +  Σ_o Σ_j min(Δ_o²/12, W'_oj²) E[x'_j²],
// i.e. uniform rounding noise per value, capped by the value's own energy for values that round
// to zero. Ties go to the earliest grid entry. The chosen α and E are in the diagnostics. The
// paper chose α by a grid search on held-out perplexity; this is a calibration-only proxy.
//
// Deliberate differences from the reference code (mit-han-lab/smoothquant smooth.py), as in
// gptq_smoothquant.json: both maxima are clamped to >= 1e-5 (the reference clamps the weight
// maximum and s). s is evaluated in double from the float maxima and rounded to float once, so
// it is within an ulp or two of torch's fp32 pow/div, and the folded norm and weights use
// exactly the returned (float-representable) s.
//
// Diagnostics per group: alpha, max_scale, min_scale, act_outlier_ratio_before/after (max/median
// over channels of max|x_j|, before and after x/s: how much outlier difficulty left the
// activations), weight_outlier_ratio_before/after (the same for the consumers' column maxima),
// alpha_auto (1 when chosen by `auto`), and in auto mode auto_proxy_error and
// auto_proxy_error_unsmoothed (E at s = 1). The median of an even count is the mean of the two
// middle values.
#pragma once
#include <vector>

#include "core/tensor.h"

namespace ql {
class AlgorithmRegistry;
void register_smoothquant(AlgorithmRegistry& registry);

/// max_o |W_oj| over the rows of all consumers (each d_out_i x d), per column j: a d-vector.
/// ShapeError if consumers is empty, holds a null pointer, or the widths differ.
Vector consumer_column_absmax(const std::vector<const Matrix*>& consumers);

/// Eq. 4 with the 1e-5 clamps, rounded to float: s_j = max(a_j,1e-5)^α / max(w_j,1e-5)^(1−α)
/// for activation maxima a and weight column maxima w (both d). α in [0, 1] and finite,
/// non-negative a, w (else NumericError); ShapeError if the sizes differ.
VectorD smoothquant_scales(const Vector& act_absmax, const Vector& weight_absmax, double alpha);

/// The auto criterion E(s) of the header comment for consumers reading an input with
/// per-channel maxima act_absmax and mean squares act_mean_sq (both d), under the transform s.
double smoothquant_proxy_error(const std::vector<const Matrix*>& consumers, const Vector& act_absmax,
                               const VectorD& act_mean_sq, const VectorD& s, int wbits, int abits);

}  // namespace ql
