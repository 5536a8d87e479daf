// Tests of core/quant_spec.h and core/quantize.h: exact small cases worked by hand (in the
// comments), properties on seeded random data, and the YAML schema's errors.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/config_node.h"
#include "core/error.h"
#include "core/quant_spec.h"
#include "core/quantize.h"
#include "core/rng.h"

namespace ql {
namespace {

QuantSpec make_spec(int bits, QuantScheme scheme, Granularity gran = Granularity::PerTensor,
                    int group = 128, RangeMethod range = RangeMethod::MinMax,
                    ScaleDtype dt = ScaleDtype::F32) {
  QuantSpec s;
  s.bits = bits;
  s.scheme = scheme;
  s.granularity = gran;
  s.group_size = group;
  s.range = range;
  s.scale_dtype = dt;
  return s;
}

Matrix row_matrix(const std::vector<float>& v) {
  Matrix m(1, static_cast<Index>(v.size()));
  for (size_t i = 0; i < v.size(); ++i) m(0, static_cast<Index>(i)) = v[i];
  return m;
}

Matrix random_matrix(Index rows, Index cols, uint64_t seed, bool heavy = false) {
  CounterRng rng(seed, 7);
  Matrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) {
    double z = rng.normal(static_cast<uint64_t>(i));
    m.data()[i] = static_cast<float>(heavy ? z * z * z : z);
  }
  return m;
}

bool bitwise_equal(const Matrix& a, const Matrix& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

// sum |x^ - x|^norm of one slice on a grid, the MSE search's objective.
double objective(const float* x, Index n, const Grid& g, double norm) {
  double s = 0;
  for (Index i = 0; i < n; ++i) {
    float xh = dequantize_value(quantize_value(x[i], g), g);
    s += std::pow(std::fabs(static_cast<double>(xh) - x[i]), norm);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Schemes on tiny vectors.

TEST(QuantSpec, CodeRanges) {
  EXPECT_EQ(make_spec(4, QuantScheme::Asym).qmin(), 0);
  EXPECT_EQ(make_spec(4, QuantScheme::Asym).qmax(), 15);
  EXPECT_EQ(make_spec(4, QuantScheme::Sym).qmin(), -8);
  EXPECT_EQ(make_spec(4, QuantScheme::Sym).qmax(), 7);
  EXPECT_EQ(make_spec(3, QuantScheme::SymOffset).qmin(), 0);
  EXPECT_EQ(make_spec(3, QuantScheme::SymOffset).qmax(), 7);
  EXPECT_EQ(make_spec(8, QuantScheme::Sym).qmin(), -128);
  EXPECT_EQ(make_spec(2, QuantScheme::Asym).qmax(), 3);
}

TEST(QuantSpec, Str) {
  QuantSpec s = make_spec(4, QuantScheme::Asym, Granularity::PerGroup, 128, RangeMethod::MinMax,
                          ScaleDtype::F16);
  EXPECT_EQ(s.str(), "w4 asym g128 minmax");
  s.scheme = QuantScheme::SymOffset;
  s.granularity = Granularity::PerChannel;
  s.range = RangeMethod::Mse;
  EXPECT_EQ(s.str(), "w4 sym_offset per-channel mse");
  ActQuantSpec a;
  a.bits = 8;
  EXPECT_EQ(a.str(), "a8 sym per-token dynamic");
}

TEST(Quantize, AsymTinyVectorRoundsHalfToEven) {
  // 3-bit asym, range [-1, 2.5]: scale = 3.5/7 = 0.5, zero = round(1/0.5) = 2.
  // x/scale = -2, -1.5, -0.5, 0, 0.5, 1.5, 2.5, 5 -> half-to-even -2, -2, -0, 0, 0, 2, 2, 5
  // (half away from zero would give -2, -1, 1, 2, 3 at the halves) -> +zero, clamp [0, 7]:
  // codes 0, 0, 2, 2, 2, 4, 4, 7 -> x^ = 0.5*(q - 2) = -1, -1, 0, 0, 0, 1, 1, 2.5.
  Matrix W = row_matrix({-1.0f, -0.75f, -0.25f, 0.0f, 0.25f, 0.75f, 1.25f, 2.5f});
  QuantSpec s = make_spec(3, QuantScheme::Asym);
  QuantizedTensor q = quantize(W, s);
  ASSERT_EQ(q.scales.rows(), 1);
  ASSERT_EQ(q.scales.cols(), 1);
  EXPECT_EQ(q.scales(0, 0), 0.5f);
  EXPECT_EQ(q.zeros(0, 0), 2.0f);
  std::vector<int> codes = {0, 0, 2, 2, 2, 4, 4, 7};
  std::vector<float> deq = {-1, -1, 0, 0, 0, 1, 1, 2.5f};
  Matrix D = dequantize(q);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(q.codes(0, i), codes[i]) << i;
    EXPECT_EQ(D(0, i), deq[i]) << i;
  }
}

TEST(Quantize, SymTinyVector) {
  // 3-bit sym: max|x| = 1.5, scale = 1.5/3 = 0.5, zero 0, q in [-4, 3].
  // x/scale = -3, -1.5, 0.5, 1, 3 -> -3, -2, 0, 1, 3 -> x^ = -1.5, -1, 0, 0.5, 1.5.
  Matrix W = row_matrix({-1.5f, -0.75f, 0.25f, 0.5f, 1.5f});
  QuantizedTensor q = quantize(W, make_spec(3, QuantScheme::Sym));
  EXPECT_EQ(q.scales(0, 0), 0.5f);
  EXPECT_EQ(q.zeros(0, 0), 0.0f);
  std::vector<int> codes = {-3, -2, 0, 1, 3};
  std::vector<float> deq = {-1.5f, -1.0f, 0.0f, 0.5f, 1.5f};
  Matrix D = dequantize(q);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(q.codes(0, i), codes[i]) << i;
    EXPECT_EQ(D(0, i), deq[i]) << i;
  }
}

TEST(Quantize, SymOffsetTinyVector) {
  // 3-bit sym_offset (GPTQ's sym): max|x| = 3.5, scale = 2*3.5/7 = 1, zero = 2^2 = 4, q in
  // [0, 7], i.e. levels -4..3: half a step off the signed grid, so +3.5 cannot be reached.
  // x = -3.5, -2, -0.5, 0.5, 1.5, 3.5 -> round -4, -2, -0, 0, 2, 4 -> +4: 0, 2, 4, 4, 6, 8
  // -> clamp: 0, 2, 4, 4, 6, 7 -> x^ = -4, -2, 0, 0, 2, 3.
  Matrix W = row_matrix({-3.5f, -2.0f, -0.5f, 0.5f, 1.5f, 3.5f});
  QuantizedTensor q = quantize(W, make_spec(3, QuantScheme::SymOffset));
  EXPECT_EQ(q.scales(0, 0), 1.0f);
  EXPECT_EQ(q.zeros(0, 0), 4.0f);
  std::vector<int> codes = {0, 2, 4, 4, 6, 7};
  std::vector<float> deq = {-4, -2, 0, 0, 2, 3};
  Matrix D = dequantize(q);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(q.codes(0, i), codes[i]) << i;
    EXPECT_EQ(D(0, i), deq[i]) << i;
  }
  // A slice with no negative value keeps lo = -max|x| (documented difference from the
  // reference): x = {0, 3.5} gives the same grid, and 0 maps to code 4.
  QuantizedTensor p = quantize(row_matrix({0.0f, 3.5f}), make_spec(3, QuantScheme::SymOffset));
  EXPECT_EQ(p.scales(0, 0), 1.0f);
  EXPECT_EQ(p.codes(0, 0), 4);
  EXPECT_EQ(p.codes(0, 1), 7);
}

TEST(Quantize, AllZeroSliceUsesUnitRange) {
  Matrix W = Matrix::Zero(2, 6);
  // Asym 4-bit: range [-1, 1], scale = 2/15 = 0.13333334f; -lo/scale = 1/0.13333334f =
  // 7.4999995f (float division) -> zero 7. Every code is 7 and dequantizes to exactly 0.
  QuantizedTensor a = quantize(W, make_spec(4, QuantScheme::Asym, Granularity::PerChannel));
  for (Index r = 0; r < 2; ++r) {
    EXPECT_EQ(a.scales(r, 0), 2.0f / 15.0f);
    EXPECT_EQ(a.zeros(r, 0), 7.0f);
  }
  EXPECT_TRUE((a.codes.array() == 7).all());
  EXPECT_TRUE((dequantize(a).array() == 0.0f).all());
  // Sym 4-bit: max|x| taken as 1, scale = 1/7; codes 0.
  QuantizedTensor s = quantize(W, make_spec(4, QuantScheme::Sym, Granularity::PerChannel));
  EXPECT_EQ(s.scales(0, 0), 1.0f / 7.0f);
  EXPECT_TRUE((s.codes.array() == 0).all());
  // SymOffset 4-bit: scale = 2/15, zero 8.
  QuantizedTensor o = quantize(W, make_spec(4, QuantScheme::SymOffset, Granularity::PerChannel));
  EXPECT_EQ(o.scales(1, 0), 2.0f / 15.0f);
  EXPECT_EQ(o.zeros(1, 0), 8.0f);
  EXPECT_TRUE((dequantize(o).array() == 0.0f).all());
  // Every MSE candidate has zero error on an all-zero slice; ties keep p = 1, the unit range.
  QuantSpec m = make_spec(4, QuantScheme::Asym, Granularity::PerChannel, 128, RangeMethod::Mse);
  EXPECT_EQ(quantize(W, m).scales(0, 0), 2.0f / 15.0f);
}

// The golden RTN protocol (../shared/data/austen-llama-7m/golden/golden.json "protocol.rtn")
// written out literally in float32; asym min-max with fp32 scales must equal it bit for bit.
Matrix golden_rtn(const Matrix& W, int bits, int group) {
  Matrix out(W.rows(), W.cols());
  const float maxq = static_cast<float>((1 << bits) - 1);
  const Index g = group > 0 ? group : W.cols();
  for (Index r = 0; r < W.rows(); ++r)
    for (Index b = 0; b < W.cols(); b += g) {
      Index e = std::min(W.cols(), b + g);
      float lo = 0, hi = 0;
      for (Index c = b; c < e; ++c) {
        lo = std::min(lo, W(r, c));
        hi = std::max(hi, W(r, c));
      }
      if (lo == 0 && hi == 0) lo = -1, hi = 1;
      float scale = (hi - lo) / maxq;
      float zero = std::nearbyint(-lo / scale);
      for (Index c = b; c < e; ++c) {
        float q = std::nearbyint(W(r, c) / scale) + zero;
        q = std::min(std::max(q, 0.0f), maxq);
        out(r, c) = scale * (q - zero);
      }
    }
  return out;
}

TEST(Quantize, MatchesGoldenRtnProtocolBitwise) {
  Matrix W = random_matrix(37, 300, 11);
  W.row(3).setZero();
  W.row(4) = W.row(4).cwiseAbs();  // lo forced to 0
  for (int bits : {2, 3, 4, 8}) {
    QuantSpec ch = make_spec(bits, QuantScheme::Asym, Granularity::PerChannel);
    EXPECT_TRUE(bitwise_equal(fake_quant(W, ch), golden_rtn(W, bits, -1))) << bits;
    QuantSpec gr = make_spec(bits, QuantScheme::Asym, Granularity::PerGroup, 64);
    EXPECT_TRUE(bitwise_equal(fake_quant(W, gr), golden_rtn(W, bits, 64))) << bits;
  }
}

TEST(Quantize, DividesByScaleNotMultipliesByReciprocal) {
  // Random data almost never lands where x/scale and x*(1/scale) round differently, so build
  // such values: within 64 ulps of each (k + 1/2)*scale on a row with range [-1, 2.6] (4 bits:
  // scale = 3.6f/15), keep the floats where the two quotients round to different integers
  // (a search over several ranges found this one rich in them).
  const float lo = -1.0f, hi = 2.6f;
  const float scale = (hi - lo) / 15.0f, inv = 1.0f / scale;
  std::vector<float> row = {lo, hi};
  for (int k = -5; k < 12; ++k) {
    float x = static_cast<float>((k + 0.5) * static_cast<double>(scale));
    for (int i = 0; i < 64; ++i) x = std::nextafter(x, -100.0f);
    for (int i = 0; i < 128; ++i, x = std::nextafter(x, 100.0f))
      if (x > lo && x < hi && std::nearbyint(x / scale) != std::nearbyint(x * inv))
        row.push_back(x);
  }
  ASSERT_GT(row.size(), 6u) << "no adversarial values found";
  Matrix W = row_matrix(row);
  QuantSpec s = make_spec(4, QuantScheme::Asym, Granularity::PerChannel);
  ASSERT_EQ(quantize(W, s).scales(0, 0), scale);
  EXPECT_TRUE(bitwise_equal(fake_quant(W, s), golden_rtn(W, 4, -1)));
}

// ---------------------------------------------------------------------------------------------
// Granularity and layout.

TEST(Quantize, GridShapesPerGranularity) {
  Matrix W = random_matrix(3, 10, 1);
  auto t = quantize(W, make_spec(4, QuantScheme::Asym, Granularity::PerTensor));
  EXPECT_EQ(t.scales.rows(), 1);
  EXPECT_EQ(t.scales.cols(), 1);
  auto c = quantize(W, make_spec(4, QuantScheme::Asym, Granularity::PerChannel));
  EXPECT_EQ(c.scales.rows(), 3);
  EXPECT_EQ(c.scales.cols(), 1);
  auto g = quantize(W, make_spec(4, QuantScheme::Asym, Granularity::PerGroup, 4));
  EXPECT_EQ(g.scales.rows(), 3);
  EXPECT_EQ(g.scales.cols(), 3);  // ceil(10/4): groups of 4, 4 and 2 columns
  EXPECT_EQ(g.zeros.rows(), 3);
  EXPECT_EQ(g.zeros.cols(), 3);
  EXPECT_EQ(g.codes.rows(), 3);
  EXPECT_EQ(g.codes.cols(), 10);
  // grid(r, c) picks the right slot.
  EXPECT_EQ(g.grid(2, 9).scale, g.scales(2, 2));
  EXPECT_EQ(g.grid(1, 4).scale, g.scales(1, 1));
  EXPECT_EQ(g.grid(1, 4).qmax, 15);
  EXPECT_EQ(c.grid(2, 7).zero, c.zeros(2, 0));
  EXPECT_EQ(t.grid(2, 7).scale, t.scales(0, 0));
}

TEST(Quantize, PartialGroupHasItsOwnGrid) {
  // Row: two full groups of 4 with small values, then the partial group {-3, 4.5}.
  // Partial group, 4-bit asym: scale = 7.5/15 = 0.5, zero = round(3/0.5) = 6;
  // codes round(-6) + 6 = 0 and round(9) + 6 = 15, both reproduced exactly.
  Matrix W = row_matrix({0.1f, -0.2f, 0.3f, 0.05f, 0.5f, 0.25f, -0.125f, 0.0f, -3.0f, 4.5f});
  QuantizedTensor q = quantize(W, make_spec(4, QuantScheme::Asym, Granularity::PerGroup, 4));
  ASSERT_EQ(q.scales.cols(), 3);
  EXPECT_EQ(q.scales(0, 2), 0.5f);
  EXPECT_EQ(q.zeros(0, 2), 6.0f);
  EXPECT_EQ(q.codes(0, 8), 0);
  EXPECT_EQ(q.codes(0, 9), 15);
  Matrix D = dequantize(q);
  EXPECT_EQ(D(0, 8), -3.0f);
  EXPECT_EQ(D(0, 9), 4.5f);
  // Group 1 = {0.5, 0.25, -0.125, 0}: range [-0.125, 0.5], scale = 0.625/15; not the
  // partial group's scale.
  EXPECT_EQ(q.scales(0, 1), 0.625f / 15.0f);
  // Each group's grid is fit_grid on that group alone.
  QuantSpec s = make_spec(4, QuantScheme::Asym);
  Grid g0 = fit_grid(W.data(), 4, 1, s);
  EXPECT_EQ(q.scales(0, 0), g0.scale);
  EXPECT_EQ(q.zeros(0, 0), g0.zero);
}

TEST(Quantize, PerChannelRowsIndependent) {
  // Row 0 range [-1, 2.5] (scale 0.5 at 3 bits), row 1 range [0, 7] (scale 1, zero 0).
  Matrix W(2, 3);
  W << -1.0f, 2.5f, 0.75f, 0.0f, 7.0f, 3.5f;
  QuantizedTensor q = quantize(W, make_spec(3, QuantScheme::Asym, Granularity::PerChannel));
  EXPECT_EQ(q.scales(0, 0), 0.5f);
  EXPECT_EQ(q.zeros(0, 0), 2.0f);
  EXPECT_EQ(q.scales(1, 0), 1.0f);
  EXPECT_EQ(q.zeros(1, 0), 0.0f);
  EXPECT_EQ(q.codes(1, 2), 4);  // 3.5 -> round half to even -> 4
  // Per tensor, the whole matrix shares [-1, 7]: scale 8/7.
  QuantizedTensor t = quantize(W, make_spec(3, QuantScheme::Asym, Granularity::PerTensor));
  EXPECT_EQ(t.scales(0, 0), 8.0f / 7.0f);
}

TEST(Quantize, GridFromExplicitRange) {
  // [-1, 2.5] at 3 bits asym: scale 0.5, zero 2 (as in the tiny-vector case).
  Grid g = grid_from_range(-1.0f, 2.5f, make_spec(3, QuantScheme::Asym));
  EXPECT_EQ(g.scale, 0.5f);
  EXPECT_EQ(g.zero, 2.0f);
  EXPECT_EQ(g.qmax, 7);
  // [0.5, 3.5] is widened to [0, 3.5]: scale 0.5, zero 0. Sym uses max(|lo|, hi) = 3.5 -> 3.5/3.
  Grid p = grid_from_range(0.5f, 3.5f, make_spec(3, QuantScheme::Asym));
  EXPECT_EQ(p.scale, 0.5f);
  EXPECT_EQ(p.zero, 0.0f);
  EXPECT_EQ(grid_from_range(0.5f, 3.5f, make_spec(3, QuantScheme::Sym)).scale, 3.5f / 3.0f);
  // The range fit_grid finds gives fit_grid's grid.
  std::vector<float> x = {-0.3f, 1.7f, 0.2f};
  QuantSpec h = make_spec(4, QuantScheme::Asym, Granularity::PerTensor, 128, RangeMethod::MinMax,
                          ScaleDtype::F16);
  EXPECT_EQ(grid_from_range(-0.3f, 1.7f, h).scale, fit_grid(x.data(), 3, 1, h).scale);
  EXPECT_THROW(grid_from_range(-INFINITY, 1.0f, h), NumericError);
}

TEST(Quantize, StridedFitMatchesContiguous) {
  Matrix W = random_matrix(50, 7, 3);
  QuantSpec s = make_spec(4, QuantScheme::Asym, Granularity::PerChannel, 128, RangeMethod::Mse);
  s.mse_grid = 20;
  std::vector<float> col(50);
  for (Index c = 0; c < 7; ++c) {
    for (Index r = 0; r < 50; ++r) col[r] = W(r, c);
    Grid a = fit_grid(W.data() + c, 50, 7, s);
    Grid b = fit_grid(col.data(), 50, 1, s);
    EXPECT_EQ(a.scale, b.scale);
    EXPECT_EQ(a.zero, b.zero);
    // quantize_with_grid writes a column in place with the same arithmetic as quantize_value.
    Matrix Q = W;
    IntMatrix codes(50, 7);
    quantize_with_grid(Q.data() + c, 50, 7, a, codes.data() + c, Q.data() + c, 7);
    for (Index r = 0; r < 50; ++r) {
      EXPECT_EQ(codes(r, c), quantize_value(W(r, c), a));
      EXPECT_EQ(Q(r, c), dequantize_value(codes(r, c), a));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Range methods.

TEST(Quantize, PercentileClipValue) {
  // |x| sorted = 1..10, 90th percentile: h = 9*0.9 = 8.1 -> 9 + 0.1*(10 - 9) = 9.1 (numpy's
  // linear). 4-bit sym: scale = 9.1/7.
  std::vector<float> x = {1, -2, 3, -4, 5, -6, 7, -8, 9, -10};
  QuantSpec s = make_spec(4, QuantScheme::Sym, Granularity::PerTensor, 128, RangeMethod::Percentile);
  s.percentile = 90;
  Grid g = fit_grid(x.data(), 10, 1, s);
  EXPECT_EQ(g.scale, 9.1f / 7.0f);
  // Asym intersects the clip with the min-max range: x = {-2, 1, 3, 5, 9}, |x| sorted
  // 1, 2, 3, 5, 9; 75th percentile: h = 4*0.75 = 3 -> c = 5. Range [max(-2, -5), min(9, 5)]
  // = [-2, 5]: scale = 7/15, zero = round(2/(7/15)) = round(4.29) = 4.
  std::vector<float> y = {-2, 1, 3, 5, 9};
  QuantSpec a = make_spec(4, QuantScheme::Asym, Granularity::PerTensor, 128,
                          RangeMethod::Percentile);
  a.percentile = 75;
  Grid ga = fit_grid(y.data(), 5, 1, a);
  EXPECT_EQ(ga.scale, 7.0f / 15.0f);
  EXPECT_EQ(ga.zero, 4.0f);
  // 9 is clipped to the top code.
  EXPECT_EQ(quantize_value(9.0f, ga), 15);
  // The 100th percentile is max|x|: identical to min-max.
  a.percentile = 100;
  Grid g100 = fit_grid(y.data(), 5, 1, a);
  Grid gmm = fit_grid(y.data(), 5, 1, make_spec(4, QuantScheme::Asym));
  EXPECT_EQ(g100.scale, gmm.scale);
  EXPECT_EQ(g100.zero, gmm.zero);
}

TEST(Quantize, MseNeverWorseThanMinMax) {
  Matrix W = random_matrix(120, 64, 5);
  for (QuantScheme sc : {QuantScheme::Asym, QuantScheme::Sym, QuantScheme::SymOffset})
    for (int bits : {2, 3, 4}) {
      QuantSpec mm = make_spec(bits, sc);
      QuantSpec ms = make_spec(bits, sc, Granularity::PerTensor, 128, RangeMethod::Mse);
      for (Index r = 0; r < W.rows(); ++r) {
        const float* x = W.data() + r * W.cols();
        double err_minmax = objective(x, W.cols(), fit_grid(x, W.cols(), 1, mm), ms.mse_norm);
        double err_shrunk = objective(x, W.cols(), fit_grid(x, W.cols(), 1, ms), ms.mse_norm);
        EXPECT_LE(err_shrunk, err_minmax * (1 + 1e-9)) << "row " << r << " bits " << bits;
      }
    }
}

TEST(Quantize, MseStrictlyBetterOnHeavyTails) {
  // Cubed normals: a few large values stretch the min-max range, so shrinking wins.
  Matrix W = random_matrix(40, 256, 9, /*heavy=*/true);
  for (QuantScheme sc : {QuantScheme::Asym, QuantScheme::Sym, QuantScheme::SymOffset}) {
    QuantSpec mm = make_spec(3, sc);
    QuantSpec ms = make_spec(3, sc, Granularity::PerTensor, 128, RangeMethod::Mse);
    double tot_minmax = 0, tot_shrunk = 0;
    int strictly = 0;
    for (Index r = 0; r < W.rows(); ++r) {
      const float* x = W.data() + r * W.cols();
      Grid gmm = fit_grid(x, W.cols(), 1, mm), gms = fit_grid(x, W.cols(), 1, ms);
      double err_minmax = objective(x, W.cols(), gmm, 2.4), err_shrunk = objective(x, W.cols(), gms, 2.4);
      tot_minmax += err_minmax;
      tot_shrunk += err_shrunk;
      if (err_shrunk < err_minmax && gms.scale < gmm.scale) ++strictly;
    }
    // Measured: total ratio 0.85 (asym), 0.57 (sym), 0.72 (sym_offset); 39-40 of 40 rows
    // strictly better.
    EXPECT_LT(tot_shrunk, 0.9 * tot_minmax) << static_cast<int>(sc);
    EXPECT_GE(strictly, 35) << static_cast<int>(sc);
  }
}

TEST(Quantize, MseSearchAlsoFitsPerGroupAndPerTensor) {
  // The per-tensor objective is summed over fixed 65536-element chunks; the chosen grid must
  // still be the best candidate, i.e. no worse than min-max.
  Matrix W = random_matrix(300, 500, 21, true);
  QuantSpec ms = make_spec(4, QuantScheme::Asym, Granularity::PerTensor, 128, RangeMethod::Mse);
  QuantSpec mm = make_spec(4, QuantScheme::Asym, Granularity::PerTensor);
  auto qs = quantize(W, ms);
  auto qm = quantize(W, mm);
  Grid gs = qs.grid(0, 0), gm = qm.grid(0, 0);
  EXPECT_LT(gs.scale, gm.scale);
  EXPECT_LT(objective(W.data(), W.size(), gs, 2.4), objective(W.data(), W.size(), gm, 2.4));
}

// llama.cpp's importance matrix as weights of the MSE search: uniform weights are the plain
// search bitwise (per tensor, channel and group, including a per-tensor objective split into
// chunks); with real weights every slice's chosen grid is the best candidate of the weighted
// objective, so never above the unweighted choice on it, and a heavily weighted column is
// reproduced at least as closely.
double weighted_objective(const float* x, const float* w, Index n, const Grid& g, double norm) {
  double s = 0;
  for (Index i = 0; i < n; ++i) {
    const float xh = dequantize_value(quantize_value(x[i], g), g);
    s += static_cast<double>(w[i]) * std::pow(std::fabs(static_cast<double>(xh) - x[i]), norm);
  }
  return s;
}

TEST(Quantize, ImatrixWeightedMseSearch) {
  const Matrix W = random_matrix(40, 300, 23, true);
  const Vector ones = Vector::Ones(300);
  Vector imp(300);
  CounterRng rng(4, 9);
  for (Index j = 0; j < 300; ++j) imp[j] = static_cast<float>(std::exp(2.0 * rng.normal(static_cast<uint64_t>(j))));
  for (Granularity gran : {Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup}) {
    SCOPED_TRACE(static_cast<int>(gran));
    QuantSpec s = make_spec(3, QuantScheme::Asym, gran, 64, RangeMethod::Mse);
    const QuantizedTensor plain = quantize(W, s), uniform = quantize(W, s, &ones), weighted = quantize(W, s, &imp);
    EXPECT_TRUE(bitwise_equal(dequantize(plain), dequantize(uniform)));
    EXPECT_TRUE(bitwise_equal(fake_quant(W, s, &ones), dequantize(plain)));
    EXPECT_FALSE(bitwise_equal(dequantize(plain), dequantize(weighted)));
    if (gran == Granularity::PerTensor) continue;
    const Index g = gran == Granularity::PerGroup ? 64 : 300;
    for (Index r = 0; r < W.rows(); ++r)
      for (Index c0 = 0; c0 < 300; c0 += g) {
        const Index n = std::min<Index>(g, 300 - c0);
        const float* x = W.data() + r * 300 + c0;
        EXPECT_LE(weighted_objective(x, imp.data() + c0, n, weighted.grid(r, c0), s.mse_norm),
                  weighted_objective(x, imp.data() + c0, n, plain.grid(r, c0), s.mse_norm));
      }
  }
  // The per-tensor objective over 65,536-element chunks keeps the column weights aligned.
  const Matrix big = random_matrix(300, 500, 24, true);
  QuantSpec t = make_spec(4, QuantScheme::Asym, Granularity::PerTensor, 128, RangeMethod::Mse);
  const Vector ones500 = Vector::Ones(500);
  EXPECT_TRUE(bitwise_equal(fake_quant(big, t, &ones500), fake_quant(big, t)));
  // fit_grid with weights: one column of weight 1e6 among zeros is fitted for itself.
  std::vector<float> x = {-3.0f, 0.1f, 0.2f, 0.37f, 0.5f, 2.0f, 2.9f, 3.0f};
  std::vector<float> w(8, 0.0f);
  w[3] = 1e6f;
  QuantSpec q = make_spec(2, QuantScheme::Asym, Granularity::PerTensor, 128, RangeMethod::Mse);
  const Grid gw = fit_grid(x.data(), 8, 1, q, w.data()), gp = fit_grid(x.data(), 8, 1, q);
  const auto err = [&](const Grid& gr) { return std::fabs(dequantize_value(quantize_value(x[3], gr), gr) - x[3]); };
  EXPECT_LE(err(gw), err(gp));
  // Bad importance vectors.
  Vector neg = ones;
  neg[5] = -1.0f;
  EXPECT_THROW(quantize(W, make_spec(3, QuantScheme::Asym, Granularity::PerChannel, 64, RangeMethod::Mse), &neg),
               NumericError);
  const Vector short_imp = Vector::Ones(299);
  EXPECT_THROW(quantize(W, make_spec(3, QuantScheme::Asym), &short_imp), ShapeError);
}

TEST(Quantize, Fp16ScaleRounding) {
  // x = {0, 1}, 4-bit asym: scale = 1/15 = 0.06666667f. Nearest half: 2^-4 * (1 + 68/1024) =
  // 0.066650390625 (spacing 2^-14 in [2^-4, 2^-3); 0.0041667/2^-14 = 68.27 -> 68).
  std::vector<float> x = {0.0f, 1.0f};
  QuantSpec h = make_spec(4, QuantScheme::Asym, Granularity::PerTensor, 128,
                          RangeMethod::MinMax, ScaleDtype::F16);
  Grid g = fit_grid(x.data(), 2, 1, h);
  EXPECT_EQ(g.scale, 0.066650390625f);
  EXPECT_EQ(g.scale, static_cast<float>(Eigen::half(1.0f / 15.0f)));
  EXPECT_EQ(g.zero, 0.0f);
  // The zero-point is computed from the stored scale: range [-1, 1] -> 2/15 -> half
  // 0.13330078125 -> 1/0.13330078125 = 7.5018 -> zero 8 (the fp32 grid has 7).
  std::vector<float> z = {-1.0f, 1.0f};
  EXPECT_EQ(fit_grid(z.data(), 2, 1, h).scale, 0.13330078125f);
  EXPECT_EQ(fit_grid(z.data(), 2, 1, h).zero, 8.0f);
  // A scale below half's range is clamped to the smallest normal half (2^-14), one above it to
  // the largest half (65504), never 0 or inf.
  std::vector<float> tiny = {0.0f, 1e-7f};
  EXPECT_EQ(fit_grid(tiny.data(), 2, 1, h).scale, 6.103515625e-05f);
  std::vector<float> huge = {0.0f, 1e7f};
  EXPECT_EQ(fit_grid(huge.data(), 2, 1, h).scale, 65504.0f);
  // fp32 keeps the float scale.
  h.scale_dtype = ScaleDtype::F32;
  EXPECT_EQ(fit_grid(x.data(), 2, 1, h).scale, 1.0f / 15.0f);
  // Every stored fp16 scale of a real quantization is an exact half.
  Matrix W = random_matrix(16, 96, 4);
  QuantizedTensor q = quantize(W, make_spec(4, QuantScheme::Sym, Granularity::PerGroup, 32,
                                            RangeMethod::MinMax, ScaleDtype::F16));
  for (Index i = 0; i < q.scales.size(); ++i)
    EXPECT_EQ(q.scales.data()[i], static_cast<float>(Eigen::half(q.scales.data()[i])));
}

TEST(Quantize, CodesAlwaysInRange) {
  Matrix W = random_matrix(24, 77, 13, true);
  W.row(0).setZero();
  W.row(1) = W.row(1).cwiseAbs();
  W.row(2) = -W.row(2).cwiseAbs();
  W(3, 5) = 1e6f;
  for (int bits = 2; bits <= 8; ++bits)
    for (QuantScheme sc : {QuantScheme::Asym, QuantScheme::Sym, QuantScheme::SymOffset})
      for (RangeMethod rm : {RangeMethod::MinMax, RangeMethod::Percentile, RangeMethod::Mse})
        for (Granularity gr :
             {Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup})
          for (ScaleDtype dt : {ScaleDtype::F16, ScaleDtype::F32}) {
            QuantSpec s = make_spec(bits, sc, gr, 16, rm, dt);
            s.percentile = 95;
            s.mse_grid = 10;
            QuantizedTensor q = quantize(W, s);
            EXPECT_GE(q.codes.minCoeff(), s.qmin()) << s.str();
            EXPECT_LE(q.codes.maxCoeff(), s.qmax()) << s.str();
            EXPECT_TRUE(dequantize(q).allFinite()) << s.str();
            // Zero-points lie on the code grid too.
            EXPECT_GE(q.zeros.minCoeff(), static_cast<float>(s.qmin())) << s.str();
            EXPECT_LE(q.zeros.maxCoeff(), static_cast<float>(s.qmax())) << s.str();
          }
}

TEST(Quantize, DequantizeOfQuantizeEqualsFakeQuant) {
  Matrix W = random_matrix(33, 130, 17);
  for (QuantScheme sc : {QuantScheme::Asym, QuantScheme::Sym, QuantScheme::SymOffset})
    for (Granularity gr : {Granularity::PerTensor, Granularity::PerChannel, Granularity::PerGroup})
      for (RangeMethod rm : {RangeMethod::MinMax, RangeMethod::Percentile, RangeMethod::Mse}) {
        QuantSpec s = make_spec(4, sc, gr, 32, rm, ScaleDtype::F16);
        s.mse_grid = 25;
        EXPECT_TRUE(bitwise_equal(dequantize(quantize(W, s)), fake_quant(W, s))) << s.str();
      }
}

TEST(Quantize, SixteenBitsIsIdentity) {
  Matrix W = random_matrix(5, 9, 2);
  QuantSpec s;  // bits 16
  EXPECT_TRUE(bitwise_equal(fake_quant(W, s), W));
  EXPECT_EQ(bits_per_weight(s, 5, 9), 16.0);
  EXPECT_THROW(quantize(W, s), ConfigError);
  ActQuantSpec a;
  Matrix X = W;
  fake_quant_activations(X, a);
  EXPECT_TRUE(bitwise_equal(X, W));
}

TEST(Quantize, ThreadCountDoesNotChangeResult) {
  Matrix W = random_matrix(256, 520, 23, true);
  const int saved = omp_get_max_threads();
  std::vector<QuantSpec> specs = {
      make_spec(4, QuantScheme::Asym, Granularity::PerGroup, 128, RangeMethod::Mse,
                ScaleDtype::F16),
      make_spec(3, QuantScheme::Sym, Granularity::PerChannel, 128, RangeMethod::Percentile),
      make_spec(4, QuantScheme::SymOffset, Granularity::PerTensor, 128, RangeMethod::Mse),
      make_spec(2, QuantScheme::Asym, Granularity::PerGroup, 100)};
  for (const QuantSpec& s : specs) {
    omp_set_num_threads(1);
    QuantizedTensor a = quantize(W, s);
    omp_set_num_threads(2);
    QuantizedTensor b = quantize(W, s);
    EXPECT_TRUE(a.codes == b.codes) << s.str();
    EXPECT_TRUE(bitwise_equal(a.scales, b.scales)) << s.str();
    EXPECT_TRUE(bitwise_equal(a.zeros, b.zeros)) << s.str();
  }
  omp_set_num_threads(saved);
}

// ---------------------------------------------------------------------------------------------
// Packing and storage cost.

// A per-column group index (GPTQ act-order with dynamic groups): column c uses group g_idx[c].
TEST(Quantize, GroupIndexSelectsTheGridPerColumn) {
  QuantizedTensor q;
  q.spec = make_spec(4, QuantScheme::Asym, Granularity::PerGroup, 2);
  q.codes.resize(2, 4);
  q.codes << 1, 2, 3, 4,  //
      5, 6, 7, 8;
  q.scales.resize(2, 2);
  q.scales << 0.5f, 2.0f,  //
      1.0f, 0.25f;
  q.zeros.resize(2, 2);
  q.zeros << 1.0f, 3.0f,  //
      0.0f, 4.0f;
  q.g_idx = {1, 0, 0, 1};
  // Row 0: c0 -> group 1: 2*(1-3) = -4; c1 -> group 0: 0.5*(2-1) = 0.5; c2: 0.5*(3-1) = 1;
  // c3 -> group 1: 2*(4-3) = 2. Row 1: 0.25*(5-4), 1*(6-0), 1*(7-0), 0.25*(8-4).
  Matrix expect(2, 4);
  expect << -4.0f, 0.5f, 1.0f, 2.0f,  //
      0.25f, 6.0f, 7.0f, 1.0f;
  EXPECT_EQ(dequantize(q), expect);
  EXPECT_EQ(q.grid(0, 0).scale, 2.0f);
  EXPECT_EQ(q.grid(0, 2).zero, 1.0f);
  EXPECT_EQ(q.grid(1, 3).scale, 0.25f);
  // The stored index costs 32 bits per column: 32 / rows per weight.
  EXPECT_DOUBLE_EQ(bits_per_weight(q), bits_per_weight(q.spec, 2, 4) + 16.0);
  QuantizedTensor plain = q;
  plain.g_idx.clear();
  EXPECT_DOUBLE_EQ(bits_per_weight(plain), bits_per_weight(q.spec, 2, 4));
  EXPECT_EQ(plain.grid(0, 0).scale, 0.5f);  // consecutive groups without an index

  QuantizedTensor bad = q;
  bad.g_idx = {0, 1, 2, 0};  // group 2 does not exist
  EXPECT_THROW(dequantize(bad), ShapeError);
  bad.g_idx = {0, 1, 1};  // one entry short
  EXPECT_THROW(dequantize(bad), ShapeError);
  bad = quantize(random_matrix(2, 4, 3), make_spec(4, QuantScheme::Asym, Granularity::PerChannel));
  bad.g_idx = {0, 0, 0, 0};  // only group granularity has groups
  EXPECT_THROW(dequantize(bad), ShapeError);
}

TEST(Quantize, PerElementGridsMatchQuantizeValue) {
  const Matrix W = random_matrix(1, 64, 21, true);
  std::vector<Grid> grids(32);
  const QuantSpec s = make_spec(3, QuantScheme::SymOffset);
  for (int i = 0; i < 32; ++i) grids[i] = fit_grid(W.data() + 2 * i, 2, 1, s);
  std::vector<int32_t> codes(64, -7);
  std::vector<float> xhat(64, -7.0f);
  // Every other value (stride 2) on its own grid, written every other slot.
  quantize_with_grids(W.data(), 32, 2, grids.data(), codes.data(), xhat.data(), 2);
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(codes[2 * i], quantize_value(W(0, 2 * i), grids[i]));
    EXPECT_EQ(xhat[2 * i], dequantize_value(codes[2 * i], grids[i]));
    EXPECT_EQ(codes[2 * i + 1], -7);
  }
}

TEST(Quantize, PackLayoutIsLsbFirst) {
  // 3-bit asym codes 1, 2, 7 -> bits 001 | 010 | 111 from bit 0 up:
  // byte 0 = 1 + (2 << 3) + ((7 & 3) << 6) = 1 + 16 + 192 = 209, byte 1 = 7 >> 2 = 1.
  IntMatrix c(1, 3);
  c << 1, 2, 7;
  std::vector<uint8_t> p = pack_codes(c, make_spec(3, QuantScheme::Asym));
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[0], 209);
  EXPECT_EQ(p[1], 1);
  // Sym stores code - qmin: -4 -> 0, 3 -> 7: byte = 0 + (7 << 3) = 56.
  IntMatrix s(1, 2);
  s << -4, 3;
  std::vector<uint8_t> ps = pack_codes(s, make_spec(3, QuantScheme::Sym));
  ASSERT_EQ(ps.size(), 1u);
  EXPECT_EQ(ps[0], 56);
}

TEST(Quantize, PackUnpackRoundTrip) {
  CounterRng rng(99, 1);
  uint64_t k = 0;
  for (int bits = 2; bits <= 8; ++bits)
    for (QuantScheme sc : {QuantScheme::Asym, QuantScheme::Sym})
      for (auto [rows, cols] : std::vector<std::pair<Index, Index>>{{1, 1}, {3, 7}, {5, 13}, {4, 64}}) {
        QuantSpec s = make_spec(bits, sc);
        IntMatrix c(rows, cols);
        const uint64_t span = static_cast<uint64_t>(s.qmax() - s.qmin() + 1);
        for (Index i = 0; i < c.size(); ++i)
          c.data()[i] = s.qmin() + static_cast<int32_t>(rng.below(k++, span));
        c(0, 0) = s.qmax();
        c(rows - 1, cols - 1) = s.qmin();
        std::vector<uint8_t> p = pack_codes(c, s);
        EXPECT_EQ(p.size(), static_cast<size_t>((rows * cols * bits + 7) / 8));
        EXPECT_TRUE(unpack_codes(p, rows, cols, s) == c) << bits << " " << rows << "x" << cols;
      }
  QuantSpec s = make_spec(4, QuantScheme::Asym);
  IntMatrix bad(1, 2);
  bad << 3, 16;
  EXPECT_THROW(pack_codes(bad, s), NumericError);
  EXPECT_THROW(unpack_codes(std::vector<uint8_t>(3), 1, 7, s), ShapeError);  // needs 4 bytes
}

TEST(Quantize, BitsPerWeight) {
  QuantSpec s = make_spec(4, QuantScheme::Asym, Granularity::PerGroup, 128, RangeMethod::MinMax,
                          ScaleDtype::F16);
  EXPECT_DOUBLE_EQ(bits_per_weight(s, 4096, 4096), 4.15625);  // 4 + (16 + 4)/128
  s.scheme = QuantScheme::Sym;
  EXPECT_DOUBLE_EQ(bits_per_weight(s, 4096, 4096), 4.125);  // 4 + 16/128
  s.scheme = QuantScheme::SymOffset;
  EXPECT_DOUBLE_EQ(bits_per_weight(s, 4096, 4096), 4.125);
  s.scheme = QuantScheme::Asym;
  s.scale_dtype = ScaleDtype::F32;
  EXPECT_DOUBLE_EQ(bits_per_weight(s, 256, 1024), 4.28125);  // 4 + (32 + 4)/128
  // Partial group: 200 columns with g = 128 -> 2 grids per row -> 4 + 2*20/200 = 4.2.
  s.scale_dtype = ScaleDtype::F16;
  EXPECT_DOUBLE_EQ(bits_per_weight(s, 10, 200), 4.2);
  // Per channel: one grid per row: 3 + (16 + 3)/512.
  QuantSpec c = make_spec(3, QuantScheme::Asym, Granularity::PerChannel, 128,
                          RangeMethod::MinMax, ScaleDtype::F16);
  EXPECT_DOUBLE_EQ(bits_per_weight(c, 64, 512), 3.0 + 19.0 / 512.0);
  // Per tensor: one grid: 8 + 32/(64*100) with fp32 sym.
  QuantSpec t = make_spec(8, QuantScheme::Sym, Granularity::PerTensor);
  EXPECT_DOUBLE_EQ(bits_per_weight(t, 64, 100), 8.0 + 32.0 / 6400.0);
}

// ---------------------------------------------------------------------------------------------
// Activations.

Matrix act_input() {
  Matrix X(2, 4);
  X << -3.5f, 1.0f, 0.25f, 7.0f,  //
      0.875f, -0.4375f, 0.125f, 0.0625f;
  return X;
}

ActQuantSpec act_spec(ActGranularity g, ActRangeMode m) {
  ActQuantSpec a;
  a.bits = 4;
  a.scheme = QuantScheme::Sym;
  a.granularity = g;
  a.mode = m;
  return a;
}

TEST(QuantizeActivations, PerTokenDynamic) {
  // 4-bit sym, qmax 7. Row 0: max|x| = 7 -> scale 1: -3.5 -> -4 (half to even), 1, 0.25 -> 0,
  // 7. Row 1: max|x| = 0.875 -> scale 0.125: x/s = 7, -3.5, 1, 0.5 -> 7, -4, 1, 0
  // -> 0.875, -0.5, 0.125, 0.
  Matrix X = act_input();
  fake_quant_activations(X, act_spec(ActGranularity::PerToken, ActRangeMode::Dynamic));
  Matrix E(2, 4);
  E << -4, 1, 0, 7, 0.875f, -0.5f, 0.125f, 0;
  EXPECT_TRUE(bitwise_equal(X, E)) << X;
  // clip_ratio 0.5 on row 0: range 3.5 -> scale 0.5: -7 -> -3.5, 2 -> 1, 0.5 -> 0 -> 0,
  // 14 -> clamp 7 -> 3.5.
  Matrix Y = act_input();
  ActQuantSpec c = act_spec(ActGranularity::PerToken, ActRangeMode::Dynamic);
  c.clip_ratio = 0.5;
  fake_quant_activations(Y, c);
  EXPECT_EQ(Y(0, 0), -3.5f);
  EXPECT_EQ(Y(0, 1), 1.0f);
  EXPECT_EQ(Y(0, 2), 0.0f);
  EXPECT_EQ(Y(0, 3), 3.5f);
}

TEST(QuantizeActivations, PerTensorDynamicAndStatic) {
  // Dynamic per tensor: max|X| = 7 -> scale 1 for both rows; row 1 rounds to 1, -0, 0, 0.
  Matrix X = act_input();
  fake_quant_activations(X, act_spec(ActGranularity::PerTensor, ActRangeMode::Dynamic));
  Matrix E(2, 4);
  E << -4, 1, 0, 7, 1, 0, 0, 0;
  EXPECT_TRUE((X.array() == E.array()).all()) << X;
  // Static range [-14, 3.5] -> max 14 -> scale 2: -1.75 -> -2 -> -4, 0.5 -> 0, 0.125 -> 0,
  // 3.5 -> 4 -> 8; row 1 all round to 0.
  Matrix S = act_input();
  ActRange r{-14.0f, 3.5f};
  fake_quant_activations(S, act_spec(ActGranularity::PerTensor, ActRangeMode::Static), &r);
  Matrix ES(2, 4);
  ES << -4, 0, 0, 8, 0, 0, 0, 0;
  EXPECT_TRUE((S.array() == ES.array()).all()) << S;
  Matrix M = act_input();
  EXPECT_THROW(
      fake_quant_activations(M, act_spec(ActGranularity::PerTensor, ActRangeMode::Static)),
      ConfigError);
  EXPECT_THROW(fake_quant_activations(M, act_spec(ActGranularity::PerToken, ActRangeMode::Static),
                                      &r),
               ConfigError);
}

TEST(QuantizeActivations, AsymPerTokenMatchesWeightGrid) {
  // An asym per-token activation grid is the fp32 weight grid of that row.
  Matrix X = random_matrix(6, 40, 31);
  Matrix Y = X;
  ActQuantSpec a;
  a.bits = 5;
  a.scheme = QuantScheme::Asym;
  fake_quant_activations(Y, a);
  EXPECT_TRUE(bitwise_equal(Y, fake_quant(X, make_spec(5, QuantScheme::Asym,
                                                       Granularity::PerChannel))));
}

// ---------------------------------------------------------------------------------------------
// YAML schema.

QuantSpec parse_spec(const std::string& yaml) {
  return quant_spec_schema().parse(ConfigNode::parse(yaml, "exp.yaml"), "quant.0");
}

TEST(QuantSpecSchema, ParsesAllKeys) {
  QuantSpec s = parse_spec(
      "bits: 3\nscheme: sym_offset\ngranularity: group\ngroup_size: 64\nrange: mse\n"
      "percentile: 99\nmse_grid: 50\nmse_maxshrink: 0.5\nmse_norm: 2\nscale_dtype: fp32\n");
  EXPECT_EQ(s.bits, 3);
  EXPECT_EQ(s.scheme, QuantScheme::SymOffset);
  EXPECT_EQ(s.granularity, Granularity::PerGroup);
  EXPECT_EQ(s.group_size, 64);
  EXPECT_EQ(s.range, RangeMethod::Mse);
  EXPECT_EQ(s.percentile, 99.0);
  EXPECT_EQ(s.mse_grid, 50);
  EXPECT_EQ(s.mse_maxshrink, 0.5);
  EXPECT_EQ(s.mse_norm, 2.0);
  EXPECT_EQ(s.scale_dtype, ScaleDtype::F32);
  // The canonical form parses back to the same spec.
  ConfigNode emitted = quant_spec_schema().emit(s);
  QuantSpec back = quant_spec_schema().parse(emitted, "q");
  EXPECT_EQ(quant_spec_schema().emit(back).to_yaml(), emitted.to_yaml());
  EXPECT_EQ(parse_spec("bits: 16\n").bits, 16);
  EXPECT_EQ(parse_spec("bits: 2\n").bits, 2);
  // mse_weights: only with range mse, and the error points at its line.
  const QuantSpec im = parse_spec("bits: 3\nrange: mse\nmse_weights: imatrix\n");
  EXPECT_EQ(im.mse_weights, MseWeights::Imatrix);
  EXPECT_NE(im.str().find("mse-imatrix"), std::string::npos) << im.str();
  try {
    parse_spec("bits: 3\nrange: minmax\nmse_weights: imatrix\n");
    ADD_FAILURE() << "mse_weights without range mse accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("exp.yaml:3"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("quant.0.mse_weights"), std::string::npos) << e.what();
  }
}

TEST(QuantSpecSchema, RejectsBadBitsWithPathAndLine) {
  for (const char* bad : {"9", "15", "1", "0"}) {
    try {
      parse_spec(std::string("scheme: sym\nbits: ") + bad + "\n");
      ADD_FAILURE() << "bits " << bad << " accepted";
    } catch (const ConfigError& e) {
      EXPECT_EQ(e.key_path(), "quant.0.bits");
      EXPECT_EQ(e.loc().line, 2);
      EXPECT_EQ(e.loc().file, "exp.yaml");
      EXPECT_NE(std::string(e.what()).find("expected 2..8 or 16"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(std::string("'") + bad + "'"), std::string::npos);
    }
  }
}

TEST(QuantSpecSchema, GranularityTypoSuggestsClosest) {
  try {
    parse_spec("bits: 4\ngranularity: grup\n");
    ADD_FAILURE() << "typo accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.key_path(), "quant.0.granularity");
    EXPECT_EQ(e.loc().line, 2);
    EXPECT_NE(std::string(e.what()).find("did you mean 'group'"), std::string::npos) << e.what();
  }
}

TEST(QuantSpecSchema, RejectsOutOfRangeNumbers) {
  auto rejects = [](const std::string& yaml, const std::string& key) {
    try {
      parse_spec(yaml);
      ADD_FAILURE() << yaml << " accepted";
    } catch (const ConfigError& e) {
      EXPECT_EQ(e.key_path(), "quant.0." + key) << e.what();
    }
  };
  rejects("percentile: 0\n", "percentile");
  rejects("percentile: 100.5\n", "percentile");
  rejects("mse_maxshrink: 1\n", "mse_maxshrink");
  rejects("mse_maxshrink: 0\n", "mse_maxshrink");
  rejects("mse_norm: 0\n", "mse_norm");
  rejects("mse_grid: 0\n", "mse_grid");
  rejects("group_size: 0\n", "group_size");
  rejects("scale_dtype: bf16\n", "scale_dtype");
  rejects("bits: four\n", "bits");
  rejects("bitz: 4\n", "bitz");
  EXPECT_EQ(parse_spec("percentile: 100\n").percentile, 100.0);
}

TEST(ActQuantSpecSchema, ParsesAndValidates) {
  const auto& schema = act_quant_spec_schema();
  ActQuantSpec a = schema.parse(
      ConfigNode::parse("bits: 8\nscheme: asym\ngranularity: tensor\nmode: static\n"
                        "clip_ratio: 0.9\n",
                        "a.yaml"),
      "act");
  EXPECT_EQ(a.bits, 8);
  EXPECT_EQ(a.scheme, QuantScheme::Asym);
  EXPECT_EQ(a.granularity, ActGranularity::PerTensor);
  EXPECT_EQ(a.mode, ActRangeMode::Static);
  EXPECT_EQ(a.clip_ratio, 0.9);
  try {
    schema.parse(ConfigNode::parse("bits: 8\ngranularity: token\nmode: static\n", "a.yaml"),
                 "act");
    ADD_FAILURE() << "static per-token accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.key_path(), "act.granularity");
    EXPECT_EQ(e.loc().line, 2);
  }
  EXPECT_THROW(schema.parse(ConfigNode::parse("bits: 12\n", "a.yaml"), "act"), ConfigError);
  EXPECT_THROW(schema.parse(ConfigNode::parse("clip_ratio: 0\n", "a.yaml"), "act"), ConfigError);
  EXPECT_THROW(schema.parse(ConfigNode::parse("granularity: channel\n", "a.yaml"), "act"),
               ConfigError);
}

}  // namespace
}  // namespace ql
