// The one place where rounding happens. Every plugin quantizes through these functions (the
// ggml_quantize_chunk idea): fit a grid per slice, round, clamp, dequantize.
//
// Thread safety: all functions are reentrant; quantize() parallelises over rows with OpenMP and
// its result does not depend on the thread count.
#pragma once
#include <cstdint>
#include <vector>

#include "core/quant_spec.h"
#include "core/tensor.h"

namespace ql {

/// The grid of one slice: x^ = scale * (q - zero), q in [qmin, qmax].
struct Grid {
  float scale = 1.0f;
  float zero = 0.0f;
  int qmin = 0;
  int qmax = 0;
};

/// Fit a grid to n values x[0], x[stride], ..., x[(n-1)*stride] with spec's scheme and range
/// method (spec.bits must be < 16). Scales are rounded to fp16 when spec.scale_dtype is F16.
Grid fit_grid(const float* x, Index n, Index stride, const QuantSpec& spec);

/// Round one value on a grid: clamp(round(x/scale) + zero, qmin, qmax) (round half away from
/// zero, as std::nearbyint is not used: results must not depend on the FP rounding mode).
int32_t quantize_value(float x, const Grid& g);
inline float dequantize_value(int32_t q, const Grid& g) { return g.scale * (static_cast<float>(q) - g.zero); }

/// Quantize n strided values on a fixed grid (GPTQ's per-column step): writes codes (may be
/// null) and dequantized values xhat (may alias x).
void quantize_with_grid(const float* x, Index n, Index stride, const Grid& g, int32_t* codes,
                        float* xhat, Index out_stride);

/// A quantized weight matrix. Grid layout (n_groups = grids per row):
///   PerTensor: scales/zeros are 1 x 1; PerChannel: rows x 1; PerGroup: rows x ceil(cols/g).
/// codes is rows x cols with codes(r, c) in [spec.qmin(), spec.qmax()].
struct QuantizedTensor {
  QuantSpec spec;
  IntMatrix codes;
  Matrix scales;
  Matrix zeros;

  Index rows() const { return codes.rows(); }
  Index cols() const { return codes.cols(); }
  /// The grid used for weight (r, c).
  Grid grid(Index r, Index c) const;
};

/// THE quantize entry point: fit grids per spec.granularity and round. spec.bits < 16.
QuantizedTensor quantize(const Matrix& W, const QuantSpec& spec);
/// Reconstruct float weights from codes and grids.
Matrix dequantize(const QuantizedTensor& q);
/// quantize + dequantize; the identity copy when spec.bits == 16.
Matrix fake_quant(const Matrix& W, const QuantSpec& spec);

/// Pack codes for storage: each code stored as (code - qmin) in `bits` bits, LSB-first,
/// row-major, rows not padded. unpack_codes inverts it exactly.
std::vector<uint8_t> pack_codes(const IntMatrix& codes, const QuantSpec& spec);
IntMatrix unpack_codes(const std::vector<uint8_t>& packed, Index rows, Index cols,
                       const QuantSpec& spec);

/// Storage bits per weight of a rows x cols matrix: code bits plus, per grid, the scale
/// (16 or 32 bits per scale_dtype) and, for Asym, a zero-point of `bits` bits. 16 for an
/// unquantized spec. E.g. 4-bit asym g128 fp16 scales: 4 + (16 + 4)/128 = 4.15625.
double bits_per_weight(const QuantSpec& spec, Index rows, Index cols);

/// Static activation range measured on calibration data (absmax and min/max per tensor).
struct ActRange {
  float lo = 0.0f, hi = 0.0f;
};

/// Fake-quantize activations X (N tokens x d) in place per spec: PerToken fits one grid per row
/// (dynamic), PerTensor one grid for all of X (dynamic: from X itself; static: from `range`,
/// which must be given). Identity when spec.bits == 16.
void fake_quant_activations(Matrix& X, const ActQuantSpec& spec, const ActRange* range = nullptr);

}  // namespace ql
