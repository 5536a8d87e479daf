// core/linalg's blocked Cholesky and core/parallel's thread-count guard.
#include <gtest/gtest.h>

#include <cstring>

#include "core/linalg.h"
#include "core/parallel.h"
#include "core/rng.h"

namespace ql {
namespace {

/// A = B Bᵀ/k + 0.1 I, symmetric positive definite, n spanning several kFactorTile tiles.
MatrixD spd(Index n, uint64_t seed) {
  CounterRng rng(seed, 1);
  MatrixD B(n, n + 10);
  for (Index i = 0; i < B.size(); ++i) B.data()[i] = rng.normal(i);
  MatrixD A = B * B.transpose() / static_cast<double>(n);
  A.diagonal().array() += 0.1;
  return A;
}

TEST(Linalg, BlockedCholeskyFactorsAcrossTilesWithTheSameBitsOnAnyThreadCount) {
  const Index n = 2 * kFactorTile + 37;
  const MatrixD A = spd(n, 3);
  MatrixD L1 = A, L2 = A;
  {
    const ThreadCountGuard one(1);
    ASSERT_TRUE(cholesky_lower_blocked(L1, 1e-12));
  }
  {
    const ThreadCountGuard two(2);
    ASSERT_TRUE(cholesky_lower_blocked(L2, 1e-12));
  }
  const MatrixD L = L1.triangularView<Eigen::Lower>();
  EXPECT_LT((L * L.transpose() - A).norm(), 1e-12 * A.norm());
  const MatrixD Lb = L2.triangularView<Eigen::Lower>();
  EXPECT_EQ(std::memcmp(L.data(), Lb.data(), sizeof(double) * L.size()), 0);
}

TEST(Linalg, BlockedCholeskyRefusesSmallPivotsAndIndefiniteMatrices) {
  const Index n = kFactorTile + 5;
  MatrixD A = spd(n, 4);
  MatrixD B = A;
  B(n - 1, n - 1) = -1.0;  // indefinite in the last tile
  EXPECT_FALSE(cholesky_lower_blocked(B, 0.0));
  MatrixD C = A;
  EXPECT_FALSE(cholesky_lower_blocked(C, 1e6));  // every pivot below the floor
}

TEST(Parallel, ThreadCountGuardRestoresTheCallersSetting) {
  const int before = num_threads();
  {
    const ThreadCountGuard g(1);
    EXPECT_EQ(num_threads(), 1);
  }
  EXPECT_EQ(num_threads(), before);
}

}  // namespace
}  // namespace ql
