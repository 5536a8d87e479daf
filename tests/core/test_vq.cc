// Residual additive VQ (core/vq.h): the commutative structure of every codeword block, the
// stage-wise error guarantee, exact nearest-codeword encoding and thread-count determinism.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/parallel.h"
#include "core/rng.h"
#include "core/vq.h"

namespace ql {
namespace {

/// Unit rows of a few dominant pairs plus noise (pre-RoPE keys have a few large pairs).
Matrix unit_rows(Index n, Index dim, uint64_t seed) {
  const CounterRng rng(seed, 7);
  Matrix X(n, dim);
  for (Index r = 0; r < n; ++r) {
    for (Index c = 0; c < dim; ++c) X(r, c) = static_cast<float>(rng.normal(static_cast<uint64_t>(r * dim + c)));
    X(r, 0) += 3.0f;
    X(r, 1) -= 2.0f;
    X.row(r).normalize();
  }
  return X;
}

VqFitOptions small(VqStructure s, int stages) {
  VqFitOptions o;
  o.structure = s;
  o.stages = stages;
  o.sub_bits = 4;
  o.max_steps = 30;
  o.seed = 3;
  return o;
}

/// Rotates every pair (2j, 2j+1) of x by angle phi_j: multiplication by e^{i phi_j}.
Eigen::RowVectorXf rotate_pairs(const Eigen::RowVectorXf& x, const std::vector<double>& phi) {
  Eigen::RowVectorXf y(x.size());
  for (Index j = 0; j < x.size() / 2; ++j) {
    const float c = static_cast<float>(std::cos(phi[j])), s = static_cast<float>(std::sin(phi[j]));
    y(2 * j) = c * x(2 * j) - s * x(2 * j + 1);
    y(2 * j + 1) = s * x(2 * j) + c * x(2 * j + 1);
  }
  return y;
}

TEST(Vq, EveryCommutativeCodewordBlockCommutesWithEveryRotation) {
  const Matrix X = unit_rows(600, 16, 1);
  const ResidualVq q = ResidualVq::fit(X, Vector(), small(VqStructure::Commutative, 3));
  const CounterRng rng(5, 1);
  int checked = 0;
  for (int s = 0; s < q.stages(); ++s)
    for (int e = 0; e < q.entries(); ++e)
      for (Index j = 0; j < q.dim() / 2; ++j) {
        // The 2x2 block of entry e and pair j: row 0 is what sub-index A selects (U), row 1
        // what sub-index B selects (V); the structure requires [[a, b], [-b, a]].
        const float a = q.U(s)(e, 2 * j), b = q.U(s)(e, 2 * j + 1);
        ASSERT_EQ(q.V(s)(e, 2 * j), -b);
        ASSERT_EQ(q.V(s)(e, 2 * j + 1), a);
        Eigen::Matrix2d M;
        M << a, b, -b, a;
        const double phi = 6.283185307179586 * rng.uniform(static_cast<uint64_t>(checked));
        Eigen::Matrix2d R;
        R << std::cos(phi), std::sin(phi), -std::sin(phi), std::cos(phi);
        EXPECT_LE((M * R - R * M).norm(), 1e-12 * (1.0 + M.norm()));
        ++checked;
      }
  EXPECT_EQ(checked, 3 * 16 * 8);
}

TEST(Vq, DecodeThenRotateEqualsDecodingWithRotatedCodewords) {
  const Matrix X = unit_rows(500, 12, 2);
  const ResidualVq q = ResidualVq::fit(X, Vector(), small(VqStructure::Commutative, 4));
  std::vector<uint8_t> codes(static_cast<size_t>(X.rows()) * 2 * q.stages());
  q.encode(X, codes.data());
  Matrix D;
  q.decode(codes.data(), X.rows(), D);
  const std::vector<double> phi = {0.3, -1.7, 2.9, 0.01, 5.0, -0.4};
  for (Index r = 0; r < 50; ++r) {
    // RoPE after decoding vs. each selected codeword rotated first (the commutation the fast
    // scoring path relies on: e^{iφ}(u_A + i u_B) = (e^{iφ}u_A) + i (e^{iφ}u_B)).
    Eigen::RowVectorXf rotated_codewords = Eigen::RowVectorXf::Zero(q.dim());
    for (int s = 0; s < q.stages(); ++s) {
      const uint8_t A = codes[static_cast<size_t>(r * 2 * q.stages() + 2 * s)];
      const uint8_t B = codes[static_cast<size_t>(r * 2 * q.stages() + 2 * s + 1)];
      const Eigen::RowVectorXf uB = rotate_pairs(q.U(s).row(B), phi);
      Eigen::RowVectorXf iuB(q.dim());
      for (Index j = 0; j < q.dim() / 2; ++j) {
        iuB(2 * j) = -uB(2 * j + 1);
        iuB(2 * j + 1) = uB(2 * j);
      }
      rotated_codewords += rotate_pairs(q.U(s).row(A), phi) + iuB;
    }
    EXPECT_LE((rotated_codewords - rotate_pairs(D.row(r), phi)).norm(), 1e-5 * (1.0 + D.row(r).norm())) << r;
  }
}

TEST(Vq, HardAssignmentErrorNeverIncreasesFromStageToStage) {
  for (VqStructure st : {VqStructure::Commutative, VqStructure::Free}) {
    const Matrix X = unit_rows(800, 16, 4);
    Vector w = Vector::LinSpaced(X.rows(), 0.5f, 2.0f);
    std::vector<VqStageReport> rep;
    const ResidualVq q = ResidualVq::fit(X, w, small(st, 6), &rep);
    ASSERT_EQ(rep.size(), 6u);
    double prev = rep[0].mse_before;
    for (const VqStageReport& r : rep) {
      EXPECT_EQ(r.mse_before, prev);
      EXPECT_LE(r.mse_after, r.mse_before);
      EXPECT_GE(r.steps, 1);
      prev = r.mse_after;
    }
    EXPECT_LT(rep.back().mse_after, 0.5 * rep.front().mse_before);
    // Encoding the training rows reproduces the fit's residual error.
    std::vector<uint8_t> codes(static_cast<size_t>(X.rows()) * 12);
    q.encode(X, codes.data());
    Matrix D;
    q.decode(codes.data(), X.rows(), D);
    double num = 0, den = 0;
    for (Index r = 0; r < X.rows(); ++r) {
      num += w(r) * (D.row(r) - X.row(r)).cast<double>().squaredNorm();
      den += w(r);
    }
    EXPECT_NEAR(num / (den * 16), rep.back().mse_after, 1e-6 * rep.front().mse_before);
  }
}

TEST(Vq, EncodingPicksTheNearestOfAllCodewordsAtEveryStage) {
  const Matrix X = unit_rows(300, 8, 6);
  const ResidualVq q = ResidualVq::fit(X, Vector(), small(VqStructure::Free, 2));
  std::vector<uint8_t> codes(static_cast<size_t>(X.rows()) * 4);
  q.encode(X, codes.data());
  for (Index r = 0; r < 40; ++r) {
    Eigen::RowVectorXf res = X.row(r);
    for (int s = 0; s < 2; ++s) {
      double best = 1e300;
      for (int A = 0; A < q.entries(); ++A)
        for (int B = 0; B < q.entries(); ++B)
          best = std::min(best, static_cast<double>((res - q.U(s).row(A) - q.V(s).row(B)).squaredNorm()));
      const uint8_t A = codes[static_cast<size_t>(r * 4 + 2 * s)], B = codes[static_cast<size_t>(r * 4 + 2 * s + 1)];
      res -= q.U(s).row(A) + q.V(s).row(B);
      EXPECT_LE(res.squaredNorm(), best + 1e-5) << r << " stage " << s;
    }
  }
}

TEST(Vq, FitIsBitwiseTheSameForOneAndTwoThreads) {
  const Matrix X = unit_rows(2500, 16, 8);  // three statistics chunks
  ResidualVq a, b;
  {
    ThreadCountGuard g(1);
    a = ResidualVq::fit(X, Vector(), small(VqStructure::Commutative, 2));
  }
  {
    ThreadCountGuard g(2);
    b = ResidualVq::fit(X, Vector(), small(VqStructure::Commutative, 2));
  }
  for (int s = 0; s < 2; ++s)
    EXPECT_EQ(std::memcmp(a.U(s).data(), b.U(s).data(), sizeof(float) * a.U(s).size()), 0) << s;
}

TEST(Vq, BadShapesAndOptionsAreRefused) {
  EXPECT_THROW(ResidualVq::fit(unit_rows(100, 7, 1), Vector(), small(VqStructure::Free, 1)), ShapeError);
  EXPECT_THROW(ResidualVq::fit(unit_rows(10, 8, 1), Vector(), small(VqStructure::Free, 1)), ShapeError);
  VqFitOptions o = small(VqStructure::Free, 0);
  EXPECT_THROW(ResidualVq::fit(unit_rows(100, 8, 1), Vector(), o), ShapeError);
}

}  // namespace
}  // namespace ql
