// The one place where rounding happens. Every plugin quantizes through these functions (the
// ggml_quantize_chunk idea): fit a grid per slice, round, clamp, dequantize.
//
// Thread safety: all functions are reentrant. quantize/dequantize/fake_quant and
// fake_quant_activations parallelise over rows with OpenMP (serially when called inside an
// active parallel region), and fit_grid sums a large slice's MSE objective over fixed 65536-value
// chunks; no result depends on the thread count.
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
/// method (spec.bits in 2..8, 1..8 for Asym; else ConfigError). Scales are rounded to fp16 when
/// spec.scale_dtype is F16 (a scale outside half's range is clamped to the smallest normal /
/// largest finite half). n == 0 gives the grid of the range [-1, 1]. With `weights` (n values,
/// weights[i] for x[i*stride]) the Mse range search minimises sum w_i |x^_i - x_i|^norm; other
/// range methods do not read them. Weights of exactly 1 give the unweighted search bitwise.
Grid fit_grid(const float* x, Index n, Index stride, const QuantSpec& spec, const float* weights = nullptr);

/// Fit a grid to an explicit range [lo, hi] (e.g. a learned clipping range) with spec's scheme
/// and scale dtype: the range is first forced to contain 0 ([-1, 1] if both ends are 0), as
/// fit_grid does after its range method. NumericError for a non-finite range.
Grid grid_from_range(float lo, float hi, const QuantSpec& spec);

/// A scale as stored with dtype dt: fp16 rounds to the nearest half (ties to even) and clamps
/// to half's finite normal range; fp32 replaces an underflowed 0 by FLT_MIN. fit_grid uses it.
float store_scale(float s, ScaleDtype dt);

/// Round one value on a grid: clamp(round(x/scale) + zero, qmin, qmax) in float32, where x/scale
/// is a true division (not x * (1/scale)) and round is half-to-even (std::nearbyint under the
/// default FE_TONEAREST mode, which quantlab never changes). This is torch.round(x / scale), so
/// the results match the PyTorch references bit for bit.
int32_t quantize_value(float x, const Grid& g);
inline float dequantize_value(int32_t q, const Grid& g) { return g.scale * (static_cast<float>(q) - g.zero); }

/// Quantize n strided values x[i*stride] on a fixed grid (GPTQ's per-column step): writes
/// codes[i*out_stride] (codes may be null) and dequantized values xhat[i*out_stride] (may be
/// null; may alias x when out_stride == stride). Same arithmetic as quantize_value.
void quantize_with_grid(const float* x, Index n, Index stride, const Grid& g, int32_t* codes,
                        float* xhat, Index out_stride);

/// Quantize n strided values, each on its own grid: x[i*stride] on grids[i] (GPTQ's column
/// step, one grid per output row). Writes codes[i*out_stride] and xhat[i*out_stride] (either
/// may be null); same arithmetic as quantize_value.
void quantize_with_grids(const float* x, Index n, Index stride, const Grid* grids,
                         int32_t* codes, float* xhat, Index out_stride);

/// A quantized weight matrix. Grid layout (n_groups = grids per row):
///   PerTensor: scales/zeros are 1 x 1; PerChannel: rows x 1; PerGroup: rows x ceil(cols/g).
/// codes is rows x cols with codes(r, c) in [spec.qmin(), spec.qmax()].
/// g_idx (PerGroup only) maps input column c to its group: empty means consecutive groups
/// (column c in group c / group_size); otherwise it has cols entries in [0, n_groups). GPTQ's
/// act-order with dynamic groups forms groups in a permuted column order and needs it.
struct QuantizedTensor {
  QuantSpec spec;
  IntMatrix codes;
  Matrix scales;
  Matrix zeros;
  std::vector<int32_t> g_idx;

  Index rows() const { return codes.rows(); }
  Index cols() const { return codes.cols(); }
  /// The grid used for weight (r, c) (honours g_idx).
  Grid grid(Index r, Index c) const;
};

/// THE quantize entry point: fit grids per spec.granularity and round (spec.bits in 2..8, else
/// ConfigError). Grids are fitted on the weights alone (fit_grid per slice), or, with
/// `importance` (one finite non-negative weight per input column, e.g. the calibration mean x_j²
/// of llama.cpp's importance matrix), the Mse range search weighs column j's error by
/// importance_j (ShapeError for a wrong size, NumericError for a negative or non-finite weight).
/// W must be finite (Algorithm::run checks); NaN/inf are not rejected here but still give
/// in-range codes.
QuantizedTensor quantize(const Matrix& W, const QuantSpec& spec, const Vector* importance = nullptr);
/// Reconstruct float weights from codes and grids: scale*(float(q) - zero) per weight, so
/// dequantize(quantize(W)) == fake_quant(W) bitwise. Honours g_idx. ShapeError if scales/zeros
/// do not have the layout above, or g_idx is non-empty and not cols entries in [0, n_groups)
/// of a PerGroup tensor.
Matrix dequantize(const QuantizedTensor& q);
/// quantize + dequantize without materialising codes; the identity copy when spec.bits == 16.
Matrix fake_quant(const Matrix& W, const QuantSpec& spec, const Vector* importance = nullptr);

/// Pack codes for storage: each code stored as (code - qmin) in `bits` bits, LSB-first,
/// row-major, rows not padded: ceil(rows*cols*bits/8) bytes, the last byte's high bits 0.
/// NumericError for a code outside [qmin, qmax]. unpack_codes inverts it exactly (ShapeError if
/// the byte count does not match rows x cols).
std::vector<uint8_t> pack_codes(const IntMatrix& codes, const QuantSpec& spec);
IntMatrix unpack_codes(const std::vector<uint8_t>& packed, Index rows, Index cols,
                       const QuantSpec& spec);

/// Storage bits per weight of a rows x cols matrix: code bits plus, per grid, the scale
/// (16 or 32 bits per scale_dtype) and, for Asym, a zero-point of `bits` bits. 16 for an
/// unquantized spec. E.g. 4-bit asym g128 fp16 scales: 4 + (16 + 4)/128 = 4.15625. Grids are
/// counted exactly: a shorter last group per row is one more grid; per-channel has `rows`
/// grids, per-tensor one. Sym and SymOffset store no zero-point (it is fixed by the scheme).
double bits_per_weight(const QuantSpec& spec, Index rows, Index cols);
/// Storage bits per weight of a quantized tensor: bits_per_weight(spec, rows, cols) plus 32 bits
/// per column for a stored g_idx (32 / rows per weight).
double bits_per_weight(const QuantizedTensor& q);

/// Static activation range measured on calibration data (absmax and min/max per tensor).
struct ActRange {
  float lo = 0.0f, hi = 0.0f;
};

/// Learned clipping of one activation quantizer (FlatQuant's LAC): the range's negative and
/// positive ends are multiplied by lo and hi (σ of the trained logits), on top of
/// spec.clip_ratio. Ratios in (0, 1].
struct ActClip {
  float lo = 1.0f, hi = 1.0f;
  bool identity() const { return lo == 1.0f && hi == 1.0f; }
};

/// Fake-quantize activations X (N tokens x d) in place per spec: PerToken fits one grid per row
/// (dynamic), PerTensor one grid for all of X (dynamic: from X itself; static: from `range`,
/// which must be given, else ConfigError). Every range, dynamic or static, is forced to contain
/// 0 and multiplied by spec.clip_ratio before the grid is built; scales stay float32 (no fp16
/// rounding). Rounding as quantize_value. Identity when spec.bits == 16.
/// With `clip`, the range's ends are further multiplied by clip->lo and clip->hi.
void fake_quant_activations(Matrix& X, const ActQuantSpec& spec, const ActRange* range = nullptr,
                            const ActClip* clip = nullptr);

}  // namespace ql
