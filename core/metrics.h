// Error metrics between a reference weight/output and its quantized version. All reductions
// are in double and in a fixed order, so results do not depend on the thread count.
#pragma once
#include <vector>

#include "core/tensor.h"

namespace ql {

/// mean over entries of (W - Wq)².
double weight_mse(const Matrix& W, const Matrix& Wq);
/// Relative output error under a Hessian proxy H (d_in x d_in):
/// tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with ΔW = W - Wq (GPTQ's layer objective, normalised).
double relative_output_error(const Matrix& W, const Matrix& Wq, const Matrix& H);
/// tr(ΔW H ΔWᵀ) for ΔW (rows x d_in) and H (d_in x d_in): the output error Σ_t |ΔW x_t|² / n
/// of inputs with second moment H = XᵀX/n (GPTQ's layer objective, unnormalised). In double,
/// thread-count independent. ShapeError for mismatched sizes.
double output_error(const Matrix& dW, const Matrix& H);
/// mean over entries of (Y - Yq)² for outputs Y = X Wᵀ on evaluation inputs X.
double output_mse(const Matrix& Y, const Matrix& Yq);
/// Signal-to-quantization-noise ratio 10 log10(Σ ref² / Σ (ref - q)²) in dB; +inf when equal.
double sqnr_db(const Matrix& ref, const Matrix& q);
/// Cosine similarity of the flattened matrices (1 when both are zero).
double cosine_similarity(const Matrix& a, const Matrix& b);
/// max |a - b|.
double max_abs_error(const Matrix& a, const Matrix& b);

/// Mean, sample standard deviation (n - 1 in the denominator; 0 for n = 1; NaN for n = 0) and
/// standard error sd/√n of repeated measurements, e.g. one metric over calibration draws.
struct MeanSd {
  double mean = 0, sd = 0, se = 0;
  int n = 0;
};
MeanSd mean_sd(const std::vector<double>& values);

}  // namespace ql
