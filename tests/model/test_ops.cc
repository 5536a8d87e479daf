// The decoder ops of core/model/ops.h on their own: each against a double-precision formula,
// RoPE's pairing and relative-position property, and thread-independence of the bits.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/model/ops.h"
#include "core/rng.h"

namespace ql {
namespace {

Matrix random_matrix(Index r, Index c, uint64_t stream, double scale = 1.0) {
  CounterRng rng(11, stream);
  Matrix m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(scale * rng.normal(i));
  return m;
}

bool same_bits(const Matrix& a, const Matrix& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

// RoPE scaling (core/model/rope.h) against transformers' formulas written out here in double:
// Llama 3 (theta 500000, factor 8, low 1, high 4, original 8192) at head_dim 128 has
// wavelengths below L0/high = 2048 (unchanged), between 2048 and 8192 (blended) and above
// 8192 (divided by the factor), and each regime is checked; linear divides every frequency;
// dynamic NTK changes nothing up to max_position_embeddings and raises the base beyond.
TEST(Ops, RopeScalingFrequencies) {
  const int hd = 128;
  const double theta = 500000.0;
  const std::vector<float> plain = rope_inv_freq(RopeSpec(theta), hd, 1);
  for (int i = 0; i < hd / 2; ++i)
    EXPECT_NEAR(plain[i], std::pow(theta, -2.0 * i / hd), 2e-7 * std::pow(theta, -2.0 * i / hd)) << i;
  RopeSpec l3(theta);
  l3.scaling = RopeSpec::Scaling::Llama3;
  l3.factor = 8;
  l3.low_freq_factor = 1;
  l3.high_freq_factor = 4;
  l3.original_max_position = 8192;
  const std::vector<float> f = rope_inv_freq(l3, hd, 1);
  int below = 0, between = 0, above = 0;
  for (int i = 0; i < hd / 2; ++i) {
    const double w = 2 * M_PI / plain[i];
    double want = plain[i];
    if (w > 8192) {
      want = plain[i] / 8.0;
      ++above;
    } else if (w >= 2048) {
      const double sm = (8192 / w - 1.0) / (4.0 - 1.0);
      want = (1 - sm) * plain[i] / 8.0 + sm * plain[i];
      ++between;
      EXPECT_LT(f[i], plain[i]);
      EXPECT_GT(f[i], plain[i] / 8.0);
    } else {
      ++below;
    }
    EXPECT_NEAR(f[i], want, 1e-7 * want) << "i " << i << " wavelength " << w;
  }
  EXPECT_GT(below, 0);
  EXPECT_GT(between, 0);
  EXPECT_GT(above, 0);
  RopeSpec lin(theta);
  lin.scaling = RopeSpec::Scaling::Linear;
  lin.factor = 4;
  const std::vector<float> fl = rope_inv_freq(lin, hd, 1);
  for (int i = 0; i < hd / 2; ++i) EXPECT_NEAR(fl[i], plain[i] / 4.0, 1e-7 * plain[i]);
  RopeSpec dyn(theta);
  dyn.scaling = RopeSpec::Scaling::Dynamic;
  dyn.factor = 2;
  dyn.original_max_position = 4096;
  EXPECT_EQ(rope_inv_freq(dyn, hd, 4096), plain);
  const std::vector<float> fd = rope_inv_freq(dyn, hd, 10000);
  const double base = theta * std::pow(2.0 * 10000 / 4096 - 1.0, double(hd) / (hd - 2));
  for (int i = 0; i < hd / 2; ++i) EXPECT_NEAR(fd[i], std::pow(base, -2.0 * i / hd), 2e-7 * std::pow(base, -2.0 * i / hd));
  // The tables use the forward's length for dynamic scaling: positions 0..9999 differ from 0..99.
  RopeTables a, b;
  rope_tables(0, 10000, hd, dyn, a);
  rope_tables(0, 100, hd, dyn, b);
  EXPECT_NE(a.sin(99, 8), b.sin(99, 8));
}

TEST(Ops, RopeInverseUndoesForward) {
  const int heads = 3, hd = 16;
  RopeTables tab;
  rope_tables(37, 50, hd, 10000.0, tab);
  const Matrix X = random_matrix(50, heads * hd, 1);
  Matrix Y = X;
  rope_forward(Y, heads, hd, tab);
  EXPECT_GT((Y - X).norm(), 0.1 * X.norm());  // it did rotate
  rope_inverse(Y, heads, hd, tab);
  EXPECT_LT((Y - X).norm(), 1e-6 * X.norm());
}

TEST(Ops, RopePairsDimensionIWithIPlusHalf) {
  // A unit vector in dimension i of head 1 moves only within the pair (i, i + head_dim/2), by
  // the angle pos · theta^(-2i/head_dim): the rotate-half layout of Hugging Face LLaMA.
  const int heads = 2, hd = 8, half = hd / 2;
  const int64_t pos = 5;
  RopeTables tab;
  rope_tables(pos, 1, hd, 10000.0, tab);
  for (int i = 0; i < half; ++i) {
    Matrix X = Matrix::Zero(1, heads * hd);
    X(0, hd + i) = 1.0f;
    rope_forward(X, heads, hd, tab);
    const double angle = static_cast<double>(pos) * std::pow(10000.0, -2.0 * i / hd);
    for (int j = 0; j < heads * hd; ++j) {
      if (j == hd + i) EXPECT_NEAR(X(0, j), std::cos(angle), 1e-6) << i;
      else if (j == hd + i + half) EXPECT_NEAR(X(0, j), std::sin(angle), 1e-6) << i;
      else EXPECT_EQ(X(0, j), 0.0f) << i << " " << j;
    }
  }
}

TEST(Ops, RopeScoresDependOnTheDistanceOnly) {
  // <R_m q, R_n k> = <q, R_{n-m} k>: shifting both positions leaves the score unchanged.
  const int hd = 32;
  const Matrix q = random_matrix(1, hd, 2), k = random_matrix(1, hd, 3);
  auto score = [&](int64_t m, int64_t n) {
    RopeTables tm, tn;
    rope_tables(m, 1, hd, 10000.0, tm);
    rope_tables(n, 1, hd, 10000.0, tn);
    Matrix a = q, b = k;
    rope_forward(a, 1, hd, tm);
    rope_forward(b, 1, hd, tn);
    return static_cast<double>(a.row(0).dot(b.row(0)));
  };
  for (int64_t shift : {1, 17, 200}) EXPECT_NEAR(score(9, 4), score(9 + shift, 4 + shift), 2e-4);
}

TEST(Ops, RmsNormMatchesTheFormulaAndKeepsItsFactors) {
  const Matrix h = random_matrix(7, 24, 4, 3.0);
  Vector w = random_matrix(1, 24, 5).row(0).transpose();
  Matrix out;
  Vector rstd;
  rms_norm_forward(h, w, 1e-5f, out, &rstd);
  ASSERT_EQ(rstd.size(), 7);
  for (Index t = 0; t < 7; ++t) {
    const double ms = h.row(t).cast<double>().squaredNorm() / 24.0;
    const double r = 1.0 / std::sqrt(ms + 1e-5);
    EXPECT_NEAR(rstd[t], r, 1e-6 * r);
    for (Index j = 0; j < 24; ++j) EXPECT_NEAR(out(t, j), w[j] * h(t, j) * r, 1e-5 * (1 + std::abs(out(t, j))));
  }
}

TEST(Ops, LinearAndSwigluMatchTheFormulaWithTheSameBitsOnAnyThreadCount) {
  const Matrix X = random_matrix(300, 40, 6), W = random_matrix(150, 40, 7), U = random_matrix(150, 40, 8);
  const Vector b = random_matrix(1, 150, 9).row(0).transpose();
  Matrix Y1, Y2, G, Uo;
  LinearJob j1{&X, &W, &b, &Y1};
  linear_forward(&j1, 1, true);
  LinearJob j2{&X, &W, &b, &Y2};
  linear_forward(&j2, 1, false);
  EXPECT_TRUE(same_bits(Y1, Y2));
  const MatrixD ref = X.cast<double>() * W.cast<double>().transpose() +
                      MatrixD::Ones(300, 1) * b.cast<double>().transpose();
  EXPECT_LT((Y1.cast<double>() - ref).norm(), 1e-5 * ref.norm());

  swiglu_forward({&X, &W, nullptr, &G}, {&X, &U, nullptr, &Uo}, true);
  const MatrixD g = X.cast<double>() * W.cast<double>().transpose();
  const MatrixD u = X.cast<double>() * U.cast<double>().transpose();
  const MatrixD s = (g.array() / (1.0 + (-g.array()).exp()) * u.array()).matrix();
  EXPECT_LT((G.cast<double>() - s).norm(), 1e-5 * s.norm());
  EXPECT_LT((Uo.cast<double>() - u).norm(), 1e-5 * u.norm());
}

TEST(Ops, CausalGroupedAttentionMatchesTheFormula) {
  // 4 query heads on 2 kv heads, 5 new queries after 150 cached positions (two query chunks
  // would need > kAttnRows rows; the past exercises the causal offset).
  const int heads = 4, kv = 2, hd = 8;
  const Index T = 5, past = 150, n = past + T;
  const Matrix Q = random_matrix(T, heads * hd, 10), K = random_matrix(n, kv * hd, 11),
               V = random_matrix(n, kv * hd, 12);
  Matrix out, out1;
  attention_forward(Q, K.data(), V.data(), kv * hd, past, heads, kv, hd, true, out);
  attention_forward(Q, K.data(), V.data(), kv * hd, past, heads, kv, hd, false, out1);
  EXPECT_TRUE(same_bits(out, out1));
  for (int h = 0; h < heads; ++h) {
    const int g = h / (heads / kv);
    for (Index t = 0; t < T; ++t) {
      const Index visible = past + t + 1;
      VectorD s(visible);
      for (Index j = 0; j < visible; ++j)
        s[j] = Q.row(t).segment(h * hd, hd).cast<double>().dot(K.row(j).segment(g * hd, hd).cast<double>()) /
               std::sqrt(static_cast<double>(hd));
      VectorD p = (s.array() - s.maxCoeff()).exp().matrix();
      p /= p.sum();
      for (int c = 0; c < hd; ++c) {
        double o = 0;
        for (Index j = 0; j < visible; ++j) o += p[j] * V(j, g * hd + c);
        EXPECT_NEAR(out(t, h * hd + c), o, 1e-5) << h << " " << t << " " << c;
      }
    }
  }
}

}  // namespace
}  // namespace ql
