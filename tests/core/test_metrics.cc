#include "core/metrics.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "core/rng.h"

namespace ql {
namespace {

Matrix random_matrix(Index n, Index d, uint64_t stream) {
  CounterRng rng(11, stream);
  Matrix X(n, d);
  for (Index i = 0; i < X.size(); ++i) X.data()[i] = static_cast<float>(rng.normal(i));
  return X;
}

Matrix mat(Index r, Index c, std::initializer_list<float> v) {
  Matrix m(r, c);
  Index i = 0;
  for (float x : v) m.data()[i++] = x;
  return m;
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

TEST(Metrics, WeightAndOutputMse) {
  const Matrix W = mat(2, 2, {1, 2, 3, 4}), Wq = mat(2, 2, {1, 1, 3, 6});
  EXPECT_DOUBLE_EQ(weight_mse(W, Wq), 5.0 / 4.0);
  EXPECT_DOUBLE_EQ(output_mse(W, Wq), 5.0 / 4.0);
  EXPECT_DOUBLE_EQ(weight_mse(W, W), 0.0);
  EXPECT_THROW(weight_mse(W, Matrix::Zero(2, 3)), ShapeError);
  EXPECT_THROW(output_mse(W, Matrix::Zero(1, 4)), ShapeError);
}

TEST(Metrics, RelativeOutputErrorIdentityHessian) {
  const Matrix W = mat(2, 2, {1, 2, 3, 4}), Wq = mat(2, 2, {1, 1, 3, 6});
  // H = I: ‖ΔW‖² / ‖W‖² = 5 / 30.
  EXPECT_NEAR(relative_output_error(W, Wq, Matrix::Identity(2, 2)), 5.0 / 30.0, 1e-12);
}

TEST(Metrics, RelativeOutputErrorGeneralHessian) {
  const Matrix H = mat(2, 2, {2, 1, 1, 3});
  // ΔW = [0 1]: ΔW H ΔWᵀ = 3; W H Wᵀ with W = [1 1] = 7.
  EXPECT_NEAR(relative_output_error(mat(1, 2, {1, 1}), mat(1, 2, {1, 0}), H), 3.0 / 7.0, 1e-12);
  // Zero signal under H: undefined.
  EXPECT_TRUE(std::isnan(relative_output_error(Matrix::Zero(2, 2), Matrix::Ones(2, 2), H)));
  EXPECT_THROW(relative_output_error(Matrix::Ones(2, 2), Matrix::Ones(2, 2), Matrix::Ones(3, 3)),
               ShapeError);

  // Random case against a direct double evaluation, and independent of the thread count.
  const Matrix W = random_matrix(300, 120, 1);
  const Matrix Wq = W + 0.05f * random_matrix(300, 120, 2);
  const Matrix X = random_matrix(500, 120, 3);
  const Matrix Hr = X.transpose() * X / 500.0f;
  const MatrixD Wd = W.cast<double>(), Dd = (W - Wq).cast<double>(), Hd = Hr.cast<double>();
  const double expect = (Dd * Hd * Dd.transpose()).trace() / (Wd * Hd * Wd.transpose()).trace();
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const double one = relative_output_error(W, Wq, Hr);
  omp_set_num_threads(2);
  const double two = relative_output_error(W, Wq, Hr);
  omp_set_num_threads(saved);
  EXPECT_NEAR(one, expect, 1e-5 * expect);
  EXPECT_TRUE(same_bits(one, two));
}

TEST(Metrics, Sqnr) {
  EXPECT_NEAR(sqnr_db(mat(1, 2, {3, 4}), mat(1, 2, {3, 3})), 10.0 * std::log10(25.0), 1e-12);
  EXPECT_EQ(sqnr_db(mat(1, 2, {3, 4}), mat(1, 2, {3, 4})),
            std::numeric_limits<double>::infinity());
  EXPECT_THROW(sqnr_db(Matrix::Ones(1, 2), Matrix::Ones(2, 1)), ShapeError);
}

TEST(Metrics, Cosine) {
  EXPECT_NEAR(cosine_similarity(mat(1, 2, {1, 0}), mat(1, 2, {0, 1})), 0.0, 1e-15);
  EXPECT_NEAR(cosine_similarity(mat(1, 2, {1, 2}), mat(1, 2, {2, 4})), 1.0, 1e-15);
  EXPECT_NEAR(cosine_similarity(mat(1, 2, {1, 0}), mat(1, 2, {1, 1})), 1.0 / std::sqrt(2.0),
              1e-15);
  EXPECT_NEAR(cosine_similarity(mat(2, 1, {1, 2}), mat(2, 1, {-1, -2})), -1.0, 1e-15);
  EXPECT_EQ(cosine_similarity(Matrix::Zero(2, 2), Matrix::Zero(2, 2)), 1.0);
  EXPECT_EQ(cosine_similarity(Matrix::Zero(2, 2), Matrix::Ones(2, 2)), 0.0);
}

TEST(Metrics, MaxAbsError) {
  EXPECT_EQ(max_abs_error(mat(1, 3, {1, -2, 0}), mat(1, 3, {0.5f, 1, 0})), 3.0);
  EXPECT_TRUE(std::isnan(max_abs_error(mat(1, 2, {1, std::nanf("")}), mat(1, 2, {1, 5}))));
  EXPECT_THROW(max_abs_error(Matrix::Ones(1, 2), Matrix::Ones(1, 3)), ShapeError);
}

TEST(Metrics, LargeReductionsMatchDoubleAndThreadCount) {
  // More than one reduction chunk, so the parallel fixed-order path runs.
  const Matrix a = random_matrix(400, 300, 4), b = random_matrix(400, 300, 5);
  const MatrixD ad = a.cast<double>(), bd = b.cast<double>();
  const double mse = (ad - bd).squaredNorm() / ad.size();
  const double cos = (ad.array() * bd.array()).sum() / (ad.norm() * bd.norm());
  const double sq = 10.0 * std::log10(ad.squaredNorm() / (ad - bd).squaredNorm());
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const double mse1 = weight_mse(a, b), cos1 = cosine_similarity(a, b), sq1 = sqnr_db(a, b);
  omp_set_num_threads(2);
  const double mse2 = weight_mse(a, b), cos2 = cosine_similarity(a, b), sq2 = sqnr_db(a, b);
  omp_set_num_threads(saved);
  EXPECT_NEAR(mse1, mse, 1e-12 * mse);
  EXPECT_NEAR(cos1, cos, 1e-12);
  EXPECT_NEAR(sq1, sq, 1e-10);
  EXPECT_TRUE(same_bits(mse1, mse2));
  EXPECT_TRUE(same_bits(cos1, cos2));
  EXPECT_TRUE(same_bits(sq1, sq2));
}

}  // namespace
}  // namespace ql
