#include "core/quantize.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "core/detmath.h"
#include "core/error.h"
#include "core/parallel.h"

namespace ql {
namespace {

constexpr float kHalfMinNormal = 6.103515625e-05f;  // 2^-14
constexpr float kHalfMax = 65504.0f;
// The MSE objective is a sum of fixed-size chunks (each summed in order, then the chunk sums in
// order), so its value, and therefore the chosen shrink, is the same for any thread count.
constexpr Index kObjectiveChunk = 1 << 16;
// Below this many weights a parallel region costs more than it saves.
constexpr Index kParallelMinElems = 1 << 15;

/// What a grid needs besides its range; shared by weight and activation specs.
struct GridParams {
  QuantScheme scheme;
  int bits;
  int qmin, qmax;
  ScaleDtype dtype;
};

GridParams params_of(const QuantSpec& s) {
  return {s.scheme, s.bits, s.qmin(), s.qmax(), s.scale_dtype};
}

/// Both references force lo <= 0 <= hi and replace an all-zero range by [-1, 1] (ALGORITHMS.md
/// §1 "Degenerate ranges").
inline void normalise_range(float& lo, float& hi) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  if (lo == 0.0f && hi == 0.0f) {
    lo = -1.0f;
    hi = 1.0f;
  }
}

/// Grid of a normalised range, float32 arithmetic in the references' order of operations
/// (quant_spec.h QuantScheme). SymOffset deliberately uses lo = -max|x| even for a slice with
/// no negative value; the GPTQ reference then keeps lo = 0 with the zero at 2^(b-1), which
/// clips every positive value above half the range.
inline Grid grid_of_range(float lo, float hi, const GridParams& p) {
  Grid g;
  g.qmin = p.qmin;
  g.qmax = p.qmax;
  switch (p.scheme) {
    case QuantScheme::Asym: {
      g.scale = store_scale((hi - lo) / static_cast<float>(p.qmax), p.dtype);
      float z = std::nearbyint(-lo / g.scale);
      g.zero = std::min(std::max(0.0f, z), static_cast<float>(p.qmax));  // max(+0, -0) is +0
      break;
    }
    case QuantScheme::Sym: {
      float amax = std::max(-lo, hi);
      g.scale = store_scale(amax / static_cast<float>(p.qmax), p.dtype);
      g.zero = 0.0f;
      break;
    }
    case QuantScheme::SymOffset: {
      float amax = std::max(-lo, hi);
      g.scale = store_scale((amax + amax) / static_cast<float>(p.qmax), p.dtype);
      g.zero = static_cast<float>(1 << (p.bits - 1));
      break;
    }
  }
  return g;
}

/// clamp(round(x/scale) + zero, qmin, qmax) as a float. Division (not multiplication by
/// 1/scale) and round-half-to-even (std::nearbyint in the default FE_TONEAREST mode, which
/// quantlab never changes) reproduce torch.round(x / scale) bit for bit. The clamp is
/// written so that a NaN lands on qmin instead of reaching an int conversion.
inline float code_of(float x, float scale, float zero, float lo, float hi) {
  float r = std::nearbyint(x / scale) + zero;
  r = r > lo ? r : lo;
  return r < hi ? r : hi;
}

template <bool kCodes, bool kXhat>
inline void apply_grid(const float* x, Index n, const Grid& g, int32_t* codes, float* xhat) {
  const float s = g.scale, z = g.zero;
  const float lo = static_cast<float>(g.qmin), hi = static_cast<float>(g.qmax);
  for (Index i = 0; i < n; ++i) {
    float r = code_of(x[i], s, z, lo, hi);
    if (kCodes) codes[i] = static_cast<int32_t>(r);
    if (kXhat) xhat[i] = s * (r - z);
  }
}

/// lo = min(x), hi = max(x) of a slice (not yet forced to contain 0). Contiguous slices use
/// four independent accumulators so the loop is not one long dependency chain.
inline void minmax_of(const float* x, Index n, Index stride, float& lo, float& hi) {
  float l0 = std::numeric_limits<float>::infinity(), h0 = -l0;
  if (stride == 1) {
    float l1 = l0, l2 = l0, l3 = l0, h1 = h0, h2 = h0, h3 = h0;
    Index i = 0;
    for (; i + 4 <= n; i += 4) {
      l0 = x[i] < l0 ? x[i] : l0;
      h0 = x[i] > h0 ? x[i] : h0;
      l1 = x[i + 1] < l1 ? x[i + 1] : l1;
      h1 = x[i + 1] > h1 ? x[i + 1] : h1;
      l2 = x[i + 2] < l2 ? x[i + 2] : l2;
      h2 = x[i + 2] > h2 ? x[i + 2] : h2;
      l3 = x[i + 3] < l3 ? x[i + 3] : l3;
      h3 = x[i + 3] > h3 ? x[i + 3] : h3;
    }
    for (; i < n; ++i) {
      l0 = x[i] < l0 ? x[i] : l0;
      h0 = x[i] > h0 ? x[i] : h0;
    }
    lo = std::min(std::min(l0, l1), std::min(l2, l3));
    hi = std::max(std::max(h0, h1), std::max(h2, h3));
  } else {
    for (Index i = 0; i < n; ++i) {
      float v = x[i * stride];
      l0 = v < l0 ? v : l0;
      h0 = v > h0 ? v : h0;
    }
    lo = l0;
    hi = h0;
  }
  if (n == 0) lo = hi = 0.0f;
}

/// The `pct`-th percentile of |x| with linear interpolation between order statistics:
/// h = (n-1)*pct/100, c = v[floor h] + frac(h)*(v[floor h + 1] - v[floor h]) (numpy's default).
std::vector<float>& percentile_buffer() {
  thread_local std::vector<float> buf;
  return buf;
}
void release_percentile_buffer() { std::vector<float>().swap(percentile_buffer()); }

float abs_percentile(const float* x, Index n, Index stride, double pct) {
  if (n == 0) return 0.0f;
  std::vector<float>& buf = percentile_buffer();
  buf.resize(static_cast<size_t>(n));
  for (Index i = 0; i < n; ++i) buf[i] = std::fabs(x[i * stride]);
  double h = static_cast<double>(n - 1) * pct / 100.0;
  Index k = std::min<Index>(static_cast<Index>(std::floor(h)), n - 1);
  double frac = h - static_cast<double>(k);
  std::nth_element(buf.begin(), buf.begin() + k, buf.end());
  double a = buf[k];
  if (frac <= 0.0 || k + 1 >= n) return static_cast<float>(a);
  // After nth_element every element past k is >= buf[k]; the next order statistic is their min.
  double b = *std::min_element(buf.begin() + k + 1, buf.end());
  return static_cast<float>(a + frac * (b - a));
}

/// abs_percentile reuses a per-thread buffer (groups and rows call it once per slice); a
/// per-tensor call must not leave a whole matrix's copy behind.
float abs_percentile_scoped(const float* x, Index n, Index stride, double pct) {
  float c = abs_percentile(x, n, stride, pct);
  if (n > kObjectiveChunk) release_percentile_buffer();
  return c;
}

/// One chunk of sum |x^ - x|^norm, summed in order; stops early once `bound` is exceeded (the
/// partial sums of non-negative terms never decrease, so the caller's strict comparison
/// against `bound` is decided exactly as with the full sum).
/// Per-element weights of the MSE objective: element i of a slice has weight
/// w[(offset + i) mod period] (a weight row's columns: the input channels' importance).
struct SliceWeights {
  const float* w = nullptr;
  Index period = 1, offset = 0;
  float at(Index i) const { return w[(offset + i) % period]; }
  SliceWeights shifted(Index by) const { return {w, period, offset + by}; }
};

/// One chunk of sum w_i |x^_i - x_i|^norm (w_i = 1 without weights; a weight of exactly 1
/// leaves every term's bits as they are).
double objective_chunk(const float* x, Index n, Index stride, const Grid& g, float norm,
                       double bound, const SliceWeights* sw) {
  const float s = g.scale, z = g.zero;
  const float lo = static_cast<float>(g.qmin), hi = static_cast<float>(g.qmax);
  double sum = 0.0;
  if (norm == 2.0f) {
    for (Index i = 0; i < n; ++i) {
      float v = x[i * stride];
      float e = s * (code_of(v, s, z, lo, hi) - z) - v;
      sum += sw ? static_cast<double>(sw->at(i)) * static_cast<double>(e * e) : static_cast<double>(e * e);
      if ((i & 63) == 63 && sum > bound) return sum;
    }
  } else {
    for (Index i = 0; i < n; ++i) {
      float v = x[i * stride];
      float e = std::fabs(s * (code_of(v, s, z, lo, hi) - z) - v);
      const double t = detmath::pow(static_cast<double>(e), norm);
      sum += sw ? static_cast<double>(sw->at(i)) * t : t;
      if ((i & 63) == 63 && sum > bound) return sum;
    }
  }
  return sum;
}

double objective(const float* x, Index n, Index stride, const Grid& g, float norm,
                 double bound, const SliceWeights* sw) {
  if (n <= kObjectiveChunk) return objective_chunk(x, n, stride, g, norm, bound, sw);
  const Index chunks = (n + kObjectiveChunk - 1) / kObjectiveChunk;
  std::vector<double> part(static_cast<size_t>(chunks));
  const bool par = !omp_in_parallel();
#pragma omp parallel for schedule(static) if (par)
  for (Index c = 0; c < chunks; ++c) {
    Index b = c * kObjectiveChunk, len = std::min(kObjectiveChunk, n - b);
    const SliceWeights shifted = sw ? sw->shifted(b) : SliceWeights{};
    part[c] = objective_chunk(x + b * stride, len, stride, g, norm,
                              std::numeric_limits<double>::infinity(), sw ? &shifted : nullptr);
  }
  double sum = 0.0;
  for (double p : part) sum += p;
  return sum;
}

/// MSE range search (ALGORITHMS.md §1): candidates p = 1 - i/grid, i = 0 .. floor(maxshrink *
/// grid) - 1 (the reference's int(maxshrink*grid); at least p = 1), range p*[lo, hi] with the
/// grid rebuilt from the shrunk range (Asym: new zero; Sym/SymOffset: zero fixed by the
/// scheme). Candidates are scored with their stored (e.g. fp16) scales; ties keep the larger p.
Grid mse_search(const float* x, Index n, Index stride, float lo, float hi, const GridParams& p,
                const QuantSpec& spec, const SliceWeights* sw) {
  Grid best = grid_of_range(lo, hi, p);
  const float norm = static_cast<float>(spec.mse_norm);
  double best_err = objective(x, n, stride, best, norm, std::numeric_limits<double>::infinity(), sw);
  const long candidates =
      std::max(1L, static_cast<long>(std::floor(spec.mse_maxshrink * spec.mse_grid)));
  for (long i = 1; i < candidates; ++i) {
    const float shrink =
        static_cast<float>(1.0 - static_cast<double>(i) / static_cast<double>(spec.mse_grid));
    Grid g = grid_of_range(shrink * lo, shrink * hi, p);
    double err = objective(x, n, stride, g, norm, best_err, sw);
    if (err < best_err) {
      best_err = err;
      best = g;
    }
  }
  return best;
}

/// fit_grid without the spec checks (callers check once per matrix).
inline Grid fit_unchecked(const float* x, Index n, Index stride, const QuantSpec& spec,
                          const GridParams& p, const SliceWeights* sw = nullptr) {
  float lo, hi;
  minmax_of(x, n, stride, lo, hi);
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  if (spec.range == RangeMethod::Percentile) {
    float c = abs_percentile_scoped(x, n, stride, spec.percentile);
    lo = std::max(lo, -c);
    hi = std::min(hi, c);
  }
  normalise_range(lo, hi);
  if (spec.range == RangeMethod::Mse) return mse_search(x, n, stride, lo, hi, p, spec, sw);
  return grid_of_range(lo, hi, p);
}

[[noreturn]] void bad_spec(const std::string& key, const std::string& what) {
  throw ConfigError(SourceLoc{}, key, what);
}

/// The invariants the schema enforces, re-checked for specs built in code.
void check_spec(const QuantSpec& s, const char* fn) {
  // One bit is a grid only with a zero-point ({lo, hi}); a symmetric 1-bit grid has no levels
  // on both sides of 0.
  const int min_bits = s.scheme == QuantScheme::Asym ? 1 : 2;
  if (!(s.bits >= min_bits && s.bits <= 8))
    bad_spec("bits", std::string(fn) + " needs a quantized spec (bits " + std::to_string(min_bits) +
                         "..8), found " + std::to_string(s.bits));
  if (s.granularity == Granularity::PerGroup && s.group_size < 1)
    bad_spec("group_size", "expected >= 1, found " + std::to_string(s.group_size));
  if (s.range == RangeMethod::Percentile && !(s.percentile > 0 && s.percentile <= 100))
    bad_spec("percentile", "expected a number in (0, 100], found " + format_double(s.percentile));
  if (s.range == RangeMethod::Mse) {
    if (s.mse_grid < 1) bad_spec("mse_grid", "expected >= 1, found " + std::to_string(s.mse_grid));
    if (!(s.mse_maxshrink > 0 && s.mse_maxshrink < 1))
      bad_spec("mse_maxshrink",
               "expected a number in (0, 1), found " + format_double(s.mse_maxshrink));
    if (!(s.mse_norm > 0))
      bad_spec("mse_norm", "expected a number > 0, found " + format_double(s.mse_norm));
  }
}

Index groups_per_row(const QuantSpec& s, Index cols) {
  switch (s.granularity) {
    case Granularity::PerTensor:
    case Granularity::PerChannel: return 1;
    case Granularity::PerGroup: return (cols + s.group_size - 1) / s.group_size;
  }
  return 1;
}

/// Grid-matrix shape of a rows x cols weight (QuantizedTensor's layout).
void grid_shape(const QuantSpec& s, Index rows, Index cols, Index& gr, Index& gc) {
  gr = s.granularity == Granularity::PerTensor ? 1 : rows;
  gc = s.granularity == Granularity::PerGroup ? std::max<Index>(groups_per_row(s, cols), 0) : 1;
}

/// The shared RTN driver: fits grids per granularity and writes codes and/or dequantized
/// values. Rows are independent (PerTensor fits its one grid first), so the output is the same
/// for any thread count.
template <bool kCodes, bool kXhat>
void rtn(const Matrix& W, const QuantSpec& spec, IntMatrix* codes, Matrix* xhat, Matrix* scales,
         Matrix* zeros, const Vector* importance) {
  const Index rows = W.rows(), cols = W.cols();
  const SliceWeights all{importance ? importance->data() : nullptr, std::max<Index>(cols, 1), 0};
  const SliceWeights* sw = importance ? &all : nullptr;
  const GridParams p = params_of(spec);
  Index gr, gc;
  grid_shape(spec, rows, cols, gr, gc);
  if (scales) scales->resize(gr, gc);
  if (zeros) zeros->resize(gr, gc);

  Grid tensor_grid;
  if (spec.granularity == Granularity::PerTensor) {
    tensor_grid = fit_unchecked(W.data(), W.size(), 1, spec, p, sw);
    if (scales) (*scales)(0, 0) = tensor_grid.scale;
    if (zeros) (*zeros)(0, 0) = tensor_grid.zero;
  }
  const Index gsize = spec.granularity == Granularity::PerGroup ? spec.group_size : cols;
  const bool par = rows * cols >= kParallelMinElems && !omp_in_parallel();
  ParallelErrors errs;
#pragma omp parallel for schedule(static) if (par)
  for (Index r = 0; r < rows; ++r) {
    errs.run(r, [&] {
      const float* x = W.data() + r * cols;
      int32_t* c = kCodes ? codes->data() + r * cols : nullptr;
      float* o = kXhat ? xhat->data() + r * cols : nullptr;
      if (spec.granularity == Granularity::PerTensor) {
        apply_grid<kCodes, kXhat>(x, cols, tensor_grid, c, o);
        return;
      }
      if (cols == 0 && spec.granularity == Granularity::PerChannel) {
        const Grid g = fit_unchecked(x, 0, 1, spec, p);  // an empty row still has its grid
        if (scales) (*scales)(r, 0) = g.scale;
        if (zeros) (*zeros)(r, 0) = g.zero;
      }
      for (Index b = 0, j = 0; b < cols; b += gsize, ++j) {
        const Index len = std::min(gsize, cols - b);
        const SliceWeights group = all.shifted(b);
        const Grid g = fit_unchecked(x + b, len, 1, spec, p, sw ? &group : nullptr);
        if (scales) (*scales)(r, j) = g.scale;
        if (zeros) (*zeros)(r, j) = g.zero;
        apply_grid<kCodes, kXhat>(x + b, len, g, kCodes ? c + b : nullptr,
                                  kXhat ? o + b : nullptr);
      }
    });
  }
  errs.rethrow();
}

void qrange(QuantScheme scheme, int bits, int& qmin, int& qmax) {
  QuantSpec s;
  s.bits = bits;
  s.scheme = scheme;
  qmin = s.qmin();
  qmax = s.qmax();
}

}  // namespace

/// Scale as stored. fp16: nearest half (ties to even); a scale below half's range would be
/// stored as 0 and one above as inf, both unusable, so they are clamped to the nearest finite
/// normal half. fp32: a scale that underflowed to 0 (range below ~1e-43) gets FLT_MIN so that
/// x/scale stays finite.
float store_scale(float s, ScaleDtype dt) {
  if (dt == ScaleDtype::F16) {
    float h = static_cast<float>(Eigen::half(s));
    if (h == 0.0f) return kHalfMinNormal;
    if (std::isinf(h)) return kHalfMax;
    return h;
  }
  return s > 0.0f ? s : std::numeric_limits<float>::min();
}


Grid fit_grid(const float* x, Index n, Index stride, const QuantSpec& spec, const float* weights) {
  check_spec(spec, "fit_grid");
  const SliceWeights sw{weights, std::max<Index>(n, 1), 0};
  return fit_unchecked(x, n, stride, spec, params_of(spec), weights ? &sw : nullptr);
}

namespace {
void check_importance(const Vector* importance, Index cols, const char* fn) {
  if (!importance) return;
  if (importance->size() != cols)
    throw ShapeError(std::string(fn) + ": importance of " + std::to_string(importance->size()) +
                     " channels for " + std::to_string(cols) + " input columns");
  if (!importance->allFinite() || (importance->size() > 0 && importance->minCoeff() < 0))
    throw NumericError(std::string(fn) + ": importance weights must be finite and non-negative");
}
}  // namespace

Grid grid_from_range(float lo, float hi, const QuantSpec& spec) {
  check_spec(spec, "grid_from_range");
  if (!std::isfinite(lo) || !std::isfinite(hi))
    throw NumericError("grid_from_range: non-finite range [" + std::to_string(lo) + ", " +
                       std::to_string(hi) + "]");
  normalise_range(lo, hi);
  return grid_of_range(lo, hi, params_of(spec));
}

int32_t quantize_value(float x, const Grid& g) {
  return static_cast<int32_t>(
      code_of(x, g.scale, g.zero, static_cast<float>(g.qmin), static_cast<float>(g.qmax)));
}

void quantize_with_grid(const float* x, Index n, Index stride, const Grid& g, int32_t* codes,
                        float* xhat, Index out_stride) {
  const float s = g.scale, z = g.zero;
  const float lo = static_cast<float>(g.qmin), hi = static_cast<float>(g.qmax);
  for (Index i = 0; i < n; ++i) {
    float r = code_of(x[i * stride], s, z, lo, hi);
    if (codes) codes[i * out_stride] = static_cast<int32_t>(r);
    if (xhat) xhat[i * out_stride] = s * (r - z);
  }
}

void quantize_with_grids(const float* x, Index n, Index stride, const Grid* grids,
                         int32_t* codes, float* xhat, Index out_stride) {
  for (Index i = 0; i < n; ++i) {
    const Grid& g = grids[i];
    const float r = code_of(x[i * stride], g.scale, g.zero, static_cast<float>(g.qmin),
                            static_cast<float>(g.qmax));
    if (codes) codes[i * out_stride] = static_cast<int32_t>(r);
    if (xhat) xhat[i * out_stride] = g.scale * (r - g.zero);
  }
}

Grid QuantizedTensor::grid(Index r, Index c) const {
  Index gr = spec.granularity == Granularity::PerTensor ? 0 : r;
  Index gc = 0;
  if (spec.granularity == Granularity::PerGroup)
    gc = g_idx.empty() ? c / spec.group_size : g_idx[c];
  Grid g;
  g.scale = scales(gr, gc);
  g.zero = zeros(gr, gc);
  g.qmin = spec.qmin();
  g.qmax = spec.qmax();
  return g;
}

QuantizedTensor quantize(const Matrix& W, const QuantSpec& spec, const Vector* importance) {
  check_spec(spec, "quantize");
  check_importance(importance, W.cols(), "quantize");
  QuantizedTensor q;
  q.spec = spec;
  q.codes.resize(W.rows(), W.cols());
  rtn<true, false>(W, spec, &q.codes, nullptr, &q.scales, &q.zeros, importance);
  return q;
}

Matrix dequantize(const QuantizedTensor& q) {
  const QuantSpec& spec = q.spec;
  check_spec(spec, "dequantize");
  const Index rows = q.rows(), cols = q.cols();
  Index gr, gc;
  grid_shape(spec, rows, cols, gr, gc);
  if (q.scales.rows() != gr || q.scales.cols() != gc || q.zeros.rows() != gr ||
      q.zeros.cols() != gc)
    throw ShapeError("dequantize: scales/zeros of a " + std::to_string(rows) + "x" +
                     std::to_string(cols) + " " + spec.str() + " tensor must be " +
                     std::to_string(gr) + "x" + std::to_string(gc) + ", found " +
                     std::to_string(q.scales.rows()) + "x" + std::to_string(q.scales.cols()) +
                     " and " + std::to_string(q.zeros.rows()) + "x" +
                     std::to_string(q.zeros.cols()));
  if (!q.g_idx.empty()) {
    if (spec.granularity != Granularity::PerGroup)
      throw ShapeError("dequantize: a group index is given for a " + spec.str() + " tensor");
    if (static_cast<Index>(q.g_idx.size()) != cols)
      throw ShapeError("dequantize: group index has " + std::to_string(q.g_idx.size()) +
                       " entries for " + std::to_string(cols) + " columns");
    for (Index c = 0; c < cols; ++c)
      if (q.g_idx[c] < 0 || q.g_idx[c] >= gc)
        throw ShapeError("dequantize: group index of column " + std::to_string(c) + " is " +
                         std::to_string(q.g_idx[c]) + ", expected 0.." + std::to_string(gc - 1));
  }
  Matrix out(rows, cols);
  const Index gsize = spec.granularity == Granularity::PerGroup ? spec.group_size : cols;
  const bool par = rows * cols >= kParallelMinElems && !omp_in_parallel();
  if (!q.g_idx.empty()) {
    const int32_t* gi = q.g_idx.data();
#pragma omp parallel for schedule(static) if (par)
    for (Index r = 0; r < rows; ++r) {
      const int32_t* c = q.codes.data() + r * cols;
      const float* s = q.scales.data() + r * gc;
      const float* z = q.zeros.data() + r * gc;
      float* o = out.data() + r * cols;
      for (Index i = 0; i < cols; ++i) o[i] = s[gi[i]] * (static_cast<float>(c[i]) - z[gi[i]]);
    }
    return out;
  }
#pragma omp parallel for schedule(static) if (par)
  for (Index r = 0; r < rows; ++r) {
    const int32_t* c = q.codes.data() + r * cols;
    float* o = out.data() + r * cols;
    const Index grow = spec.granularity == Granularity::PerTensor ? 0 : r;
    for (Index b = 0, j = 0; b < cols; b += gsize, ++j) {
      const Index len = std::min(gsize, cols - b);
      const float s = q.scales(grow, j), z = q.zeros(grow, j);
      for (Index i = b; i < b + len; ++i) o[i] = s * (static_cast<float>(c[i]) - z);
    }
  }
  return out;
}

Matrix fake_quant(const Matrix& W, const QuantSpec& spec, const Vector* importance) {
  if (!spec.quantized()) return W;
  check_spec(spec, "fake_quant");
  check_importance(importance, W.cols(), "fake_quant");
  Matrix out(W.rows(), W.cols());
  rtn<false, true>(W, spec, nullptr, &out, nullptr, nullptr, importance);
  return out;
}

std::vector<uint8_t> pack_codes(const IntMatrix& codes, const QuantSpec& spec) {
  check_spec(spec, "pack_codes");
  const int bits = spec.bits;
  const int32_t qmin = spec.qmin(), qmax = spec.qmax();
  const Index n = codes.size();
  std::vector<uint8_t> out(static_cast<size_t>((n * bits + 7) / 8), 0);
  uint64_t acc = 0;
  int have = 0;
  size_t pos = 0;
  const int32_t* c = codes.data();
  for (Index i = 0; i < n; ++i) {
    if (c[i] < qmin || c[i] > qmax)
      throw NumericError("pack_codes: code " + std::to_string(c[i]) + " at (" +
                         std::to_string(i / codes.cols()) + ", " +
                         std::to_string(i % codes.cols()) + ") is outside [" +
                         std::to_string(qmin) + ", " + std::to_string(qmax) + "] of " +
                         spec.str());
    acc |= static_cast<uint64_t>(c[i] - qmin) << have;
    have += bits;
    while (have >= 8) {
      out[pos++] = static_cast<uint8_t>(acc & 0xffu);
      acc >>= 8;
      have -= 8;
    }
  }
  if (have > 0) out[pos++] = static_cast<uint8_t>(acc & 0xffu);
  return out;
}

IntMatrix unpack_codes(const std::vector<uint8_t>& packed, Index rows, Index cols,
                       const QuantSpec& spec) {
  check_spec(spec, "unpack_codes");
  if (rows < 0 || cols < 0)
    throw ShapeError("unpack_codes: negative shape " + std::to_string(rows) + "x" +
                     std::to_string(cols));
  const int bits = spec.bits;
  const Index n = rows * cols;
  const size_t expect = static_cast<size_t>((n * bits + 7) / 8);
  if (packed.size() != expect)
    throw ShapeError("unpack_codes: " + std::to_string(rows) + "x" + std::to_string(cols) +
                     " codes of " + std::to_string(bits) + " bits need " +
                     std::to_string(expect) + " bytes, found " + std::to_string(packed.size()));
  IntMatrix codes(rows, cols);
  const int32_t qmin = spec.qmin();
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  uint64_t acc = 0;
  int have = 0;
  size_t pos = 0;
  int32_t* c = codes.data();
  for (Index i = 0; i < n; ++i) {
    while (have < bits) {
      acc |= static_cast<uint64_t>(packed[pos++]) << have;
      have += 8;
    }
    c[i] = static_cast<int32_t>(acc & mask) + qmin;
    acc >>= bits;
    have -= bits;
  }
  return codes;
}

double bits_per_weight(const QuantSpec& spec, Index rows, Index cols) {
  if (!spec.quantized()) return 16.0;
  check_spec(spec, "bits_per_weight");
  const double n = static_cast<double>(rows) * static_cast<double>(cols);
  if (n <= 0) return spec.bits;
  Index gr, gc;
  grid_shape(spec, rows, cols, gr, gc);
  const double grids = static_cast<double>(gr) * static_cast<double>(gc);
  const double per_grid = (spec.scale_dtype == ScaleDtype::F16 ? 16.0 : 32.0) +
                          (spec.scheme == QuantScheme::Asym ? spec.bits : 0);
  return spec.bits + grids * per_grid / n;
}

double bits_per_weight(const QuantizedTensor& q) {
  double bpw = bits_per_weight(q.spec, q.rows(), q.cols());
  if (!q.g_idx.empty() && q.rows() > 0) bpw += 32.0 / static_cast<double>(q.rows());
  return bpw;
}

void fake_quant_activations(Matrix& X, const ActQuantSpec& spec, const ActRange* range, const ActClip* learned) {
  if (!spec.quantized()) return;
  if (!(spec.bits >= 2 && spec.bits <= 8))
    bad_spec("bits", "fake_quant_activations needs bits 2..8 or 16, found " +
                         std::to_string(spec.bits));
  if (!(spec.clip_ratio > 0 && spec.clip_ratio <= 1))
    bad_spec("clip_ratio", "expected a number in (0, 1], found " + format_double(spec.clip_ratio));
  GridParams p;
  p.scheme = spec.scheme;
  p.bits = spec.bits;
  p.dtype = ScaleDtype::F32;  // activation scales are computed on the fly, never stored
  qrange(spec.scheme, spec.bits, p.qmin, p.qmax);
  if (learned && !(learned->lo > 0 && learned->lo <= 1 && learned->hi > 0 && learned->hi <= 1))
    throw NumericError("fake_quant_activations: learned clip ratios (" + format_double(learned->lo) + ", " +
                       format_double(learned->hi) + ") outside (0, 1]");
  const float clip = static_cast<float>(spec.clip_ratio);
  // Negative / positive ends: the spec's ratio, then the learned ones (FlatQuant's LAC order:
  // max(x, 0)·σ(a), min(x, 0)·σ(b)).
  const float clip_lo = learned ? clip * learned->lo : clip, clip_hi = learned ? clip * learned->hi : clip;
  const Index rows = X.rows(), cols = X.cols();
  const bool par = rows * cols >= kParallelMinElems && !omp_in_parallel();

  if (spec.granularity == ActGranularity::PerToken) {
    if (spec.mode == ActRangeMode::Static)
      bad_spec("granularity", "static activation ranges need granularity tensor, found token");
#pragma omp parallel for schedule(static) if (par)
    for (Index r = 0; r < rows; ++r) {
      float* x = X.data() + r * cols;
      float lo, hi;
      minmax_of(x, cols, 1, lo, hi);
      lo = std::min(lo, 0.0f) * clip_lo;
      hi = std::max(hi, 0.0f) * clip_hi;
      normalise_range(lo, hi);
      apply_grid<false, true>(x, cols, grid_of_range(lo, hi, p), nullptr, x);
    }
    return;
  }

  float lo, hi;
  if (spec.mode == ActRangeMode::Static) {
    if (!range)
      bad_spec("mode", "static activation quantization needs a calibrated range, none given");
    if (!std::isfinite(range->lo) || !std::isfinite(range->hi))
      throw NumericError("fake_quant_activations: non-finite static range [" +
                         std::to_string(range->lo) + ", " + std::to_string(range->hi) + "]");
    lo = range->lo;
    hi = range->hi;
  } else {
    minmax_of(X.data(), X.size(), 1, lo, hi);
  }
  lo = std::min(lo, 0.0f) * clip_lo;
  hi = std::max(hi, 0.0f) * clip_hi;
  normalise_range(lo, hi);
  const Grid g = grid_of_range(lo, hi, p);
#pragma omp parallel for schedule(static) if (par)
  for (Index r = 0; r < rows; ++r) {
    float* x = X.data() + r * cols;
    apply_grid<false, true>(x, cols, g, nullptr, x);
  }
}

}  // namespace ql
