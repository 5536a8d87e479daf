#include "core/calib_stats.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/rng.h"

namespace ql {
namespace {

Matrix random_matrix(Index n, Index d, uint64_t stream) {
  CounterRng rng(42, stream);
  Matrix X(n, d);
  for (Index i = 0; i < X.size(); ++i) X.data()[i] = static_cast<float>(rng.normal(i));
  return X;
}

MatrixD direct_gram(const Matrix& X, const VectorD& w) {
  MatrixD G = MatrixD::Zero(X.cols(), X.cols());
  for (Index t = 0; t < X.rows(); ++t) {
    VectorD x = X.row(t).cast<double>().transpose();
    G += w[t] * x * x.transpose();
  }
  return G / w.sum();
}

double max_rel_diff(const Matrix& A, const MatrixD& B) {
  return (A.cast<double>() - B).cwiseAbs().maxCoeff() / B.cwiseAbs().maxCoeff();
}

TEST(HessianAccumulator, EqualsDirectDoubleGram) {
  const Matrix X = random_matrix(300, 37, 1);
  HessianAccumulator acc(37);
  acc.add(X);
  EXPECT_EQ(acc.count(), 300);
  EXPECT_EQ(acc.weight_sum(), 300.0);
  const Matrix H = acc.hessian();
  EXPECT_LT(max_rel_diff(H, direct_gram(X, VectorD::Ones(300))), 1e-5);
  // Both triangles are filled and symmetric.
  EXPECT_EQ((H - H.transpose()).cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_GT(H(30, 2) * H(30, 2), 0.0f);
}

TEST(HessianAccumulator, TiledAcrossManyChannelsAndThreadCounts) {
  // d spans several SYRK tiles (and a ragged last tile); H must equal the direct Gram matrix
  // and be bitwise identical for 1 and 2 threads.
  const Matrix X = random_matrix(400, 600, 10);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  HessianAccumulator one(600);
  one.add(X);
  omp_set_num_threads(2);
  HessianAccumulator two(600);
  two.add(X);
  omp_set_num_threads(saved);
  const Matrix H1 = one.hessian(), H2 = two.hessian();
  EXPECT_EQ(std::memcmp(H1.data(), H2.data(), sizeof(float) * H1.size()), 0);
  EXPECT_LT(max_rel_diff(H1, direct_gram(X, VectorD::Ones(400))), 1e-5);
  EXPECT_EQ((H1 - H1.transpose()).cwiseAbs().maxCoeff(), 0.0f);
}

TEST(HessianAccumulator, BatchSplitDoesNotMatter) {
  const Matrix X = random_matrix(300, 24, 2);
  HessianAccumulator whole(24);
  whole.add(X);
  for (const auto& split : std::vector<std::vector<Index>>{{1, 50, 249}, {100, 100, 100},
                                                           {299, 1}, {7, 0, 293}}) {
    HessianAccumulator acc(24);
    Index start = 0;
    for (Index m : split) {
      acc.add(Matrix(X.middleRows(start, m)));
      start += m;
    }
    ASSERT_EQ(start, 300);
    EXPECT_EQ(acc.count(), 300);
    EXPECT_LT(max_rel_diff(acc.hessian(), whole.hessian().cast<double>()), 1e-6);
  }
}

TEST(HessianAccumulator, MergeEqualsSequentialAdd) {
  const Matrix X1 = random_matrix(120, 16, 3), X2 = random_matrix(40, 16, 4);
  HessianAccumulator seq(16), a(16), b(16);
  seq.add(X1);
  seq.add(X2);
  a.add(X1);
  b.add(X2);
  a.merge(b);
  EXPECT_EQ(a.count(), 160);
  EXPECT_EQ(a.weight_sum(), 160.0);
  EXPECT_LT(max_rel_diff(a.hessian(), seq.hessian().cast<double>()), 1e-6);
  // Merging into / from an empty accumulator is the identity.
  HessianAccumulator empty(16), c(16);
  c.add(X1);
  const Matrix before = c.hessian();
  c.merge(empty);
  EXPECT_EQ(c.hessian(), before);
  empty.merge(c);
  EXPECT_EQ(empty.hessian(), before);
  EXPECT_EQ(empty.count(), 120);
}

TEST(HessianAccumulator, WeightedEqualsExplicitXtGX) {
  const Matrix X = random_matrix(200, 270, 5);
  CounterRng rng(7, 0);
  Vector w(200);
  for (Index t = 0; t < 200; ++t) w[t] = static_cast<float>(2.0 * rng.uniform(t));
  w[3] = 0.0f;  // a zero-weight token counts but contributes nothing
  HessianAccumulator acc(270);
  acc.add_weighted(X.topRows(80), w.head(80));
  acc.add_weighted(X.bottomRows(120), w.tail(120));
  EXPECT_EQ(acc.count(), 200);
  EXPECT_NEAR(acc.weight_sum(), w.cast<double>().sum(), 1e-9);
  EXPECT_LT(max_rel_diff(acc.hessian(), direct_gram(X, w.cast<double>())), 1e-5);

  // Unit weights reproduce the unweighted mean; a merge of weighted shards weights by Σw.
  HessianAccumulator ones(270), plain(270);
  ones.add_weighted(X, Vector::Ones(200));
  plain.add(X);
  EXPECT_LT(max_rel_diff(ones.hessian(), plain.hessian().cast<double>()), 1e-6);
  HessianAccumulator p(270), q(270);
  p.add_weighted(X.topRows(80), w.head(80));
  q.add_weighted(X.bottomRows(120), w.tail(120));
  p.merge(q);
  EXPECT_LT(max_rel_diff(p.hessian(), direct_gram(X, w.cast<double>())), 1e-5);
}

TEST(HessianAccumulator, RejectsBadShapesAndWeights) {
  HessianAccumulator acc(8);
  EXPECT_THROW(acc.add(Matrix::Zero(4, 7)), ShapeError);
  EXPECT_THROW(acc.add_weighted(Matrix::Zero(4, 9), Vector::Ones(4)), ShapeError);
  EXPECT_THROW(acc.add_weighted(Matrix::Zero(4, 8), Vector::Ones(3)), ShapeError);
  Vector bad = Vector::Ones(4);
  bad[2] = -1.0f;
  EXPECT_THROW(acc.add_weighted(Matrix::Zero(4, 8), bad), NumericError);
  EXPECT_THROW(acc.merge(HessianAccumulator(9)), ShapeError);
  EXPECT_EQ(acc.count(), 0);
}

TEST(ChannelStats, HandComputedValues) {
  Matrix X(3, 2);
  X << 1.0f, -2.0f,  //
      -3.0f, 0.5f,   //
      0.0f, 1.5f;
  ChannelStats s(2);
  s.add(X);
  EXPECT_EQ(s.count(), 3);
  EXPECT_EQ(s.absmax()[0], 3.0f);
  EXPECT_EQ(s.absmax()[1], 2.0f);
  EXPECT_DOUBLE_EQ(s.mean_abs()[0], 4.0 / 3.0);
  EXPECT_DOUBLE_EQ(s.mean_abs()[1], 4.0 / 3.0);
  EXPECT_DOUBLE_EQ(s.mean_sq()[0], 10.0 / 3.0);
  EXPECT_DOUBLE_EQ(s.mean_sq()[1], 6.5 / 3.0);
  EXPECT_EQ(s.min(), -3.0f);
  EXPECT_EQ(s.max(), 1.5f);
}

TEST(ChannelStats, MergeEqualsConcatenation) {
  const Matrix X1 = random_matrix(50, 9, 8), X2 = random_matrix(30, 9, 9);
  Matrix X(80, 9);
  X << X1, X2;
  ChannelStats all(9), a(9), b(9);
  all.add(X);
  a.add(X1);
  b.add(X2);
  a.merge(b);
  EXPECT_EQ(a.count(), 80);
  EXPECT_EQ(a.absmax(), all.absmax());
  EXPECT_EQ(a.min(), all.min());
  EXPECT_EQ(a.max(), all.max());
  for (Index j = 0; j < 9; ++j) {
    EXPECT_NEAR(a.mean_abs()[j], all.mean_abs()[j], 1e-14);
    EXPECT_NEAR(a.mean_sq()[j], all.mean_sq()[j], 1e-14);
  }
  // Min/max come from the data, not from the zero-initialised state.
  ChannelStats pos(2);
  pos.add(Matrix::Constant(2, 2, 5.0f));
  EXPECT_EQ(pos.min(), 5.0f);
  ChannelStats empty(2);
  empty.merge(pos);
  EXPECT_EQ(empty.min(), 5.0f);
  EXPECT_EQ(empty.count(), 2);
  EXPECT_THROW(all.add(Matrix::Zero(1, 8)), ShapeError);
  EXPECT_THROW(all.merge(ChannelStats(3)), ShapeError);
}

TEST(CalibStats, ScaleChannelsEqualsStatisticsOfScaledInputs) {
  const Matrix X = random_matrix(150, 12, 11);
  VectorD s(12);
  for (Index j = 0; j < 12; ++j) s[j] = (j % 3 == 0 ? -1.0 : 1.0) * (0.25 + 0.5 * j);
  const Matrix Xs = X * s.cast<float>().asDiagonal();

  HessianAccumulator h(12), hs(12);
  h.add(X);
  h.scale_channels(s);
  hs.add(Xs);
  EXPECT_LT(max_rel_diff(h.hessian(), hs.hessian().cast<double>()), 1e-6);
  EXPECT_EQ(h.count(), 150);

  ChannelStats c(12), cs(12);
  c.add(X);
  c.scale_channels(s);
  cs.add(Xs);
  for (Index j = 0; j < 12; ++j) {
    EXPECT_NEAR(c.absmax()[j], cs.absmax()[j], 1e-6f * cs.absmax()[j]);
    EXPECT_NEAR(c.mean_abs()[j], cs.mean_abs()[j], 1e-6 * cs.mean_abs()[j]);
    EXPECT_NEAR(c.mean_sq()[j], cs.mean_sq()[j], 1e-6 * cs.mean_sq()[j]);
  }
  // Negative scales swap a channel's extremes; the global range follows exactly.
  EXPECT_NEAR(c.min(), cs.min(), 1e-6f * std::fabs(cs.min()));
  EXPECT_NEAR(c.max(), cs.max(), 1e-6f * std::fabs(cs.max()));
  EXPECT_THROW(h.scale_channels(VectorD::Ones(11)), ShapeError);
  EXPECT_THROW(c.scale_channels(VectorD::Ones(13)), ShapeError);
}

}  // namespace
}  // namespace ql
