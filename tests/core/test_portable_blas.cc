// The portable kernels (core/portable_blas.h) against their contract, and core/linalg.h's mode
// switch. Exact properties are tested exactly: every instruction-set variant of gemm must equal
// a scalar loop that performs the contract's sequence of roundings, bit for bit, for every
// shape, transpose, leading dimension, alpha/beta and write mask; the triangular routines
// must give the same bits for every variant and agree with a double-precision reference.
#include "core/portable_blas.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/linalg.h"
#include "core/numerics.h"
#include "core/rng.h"

namespace ql {
namespace {

using portable::Isa;
using portable::Part;

template <class T>
std::vector<T> random_vec(size_t n, uint64_t stream) {
  CounterRng rng(7, stream);
  std::vector<T> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<T>(rng.normal(i));
  return v;
}

/// The contract written as plainly as possible: one rounded product and one rounded sum per
/// step, k in order, then alpha·s (+ beta·C).
template <class T>
void reference_gemm(bool ta, bool tb, Index m, Index n, Index k, T alpha, const T* A, Index lda,
                    const T* B, Index ldb, T beta, T* C, Index ldc, Part part) {
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      if ((part == Part::Upper && j < i) || (part == Part::Lower && j > i)) continue;
      T s = T(0);
      for (Index p = 0; p < k; ++p) {
        const T a = ta ? A[p * lda + i] : A[i * lda + p];
        const T b = tb ? B[j * ldb + p] : B[p * ldb + j];
        const T prod = a * b;
        s = s + prod;
      }
      T& c = C[i * ldc + j];
      if (beta == T(0)) {
        c = alpha * s;
      } else {
        const T as = alpha * s, bc = beta * c;
        c = as + bc;
      }
    }
}

template <class T>
void check_gemm_contract(int cases, uint64_t seed) {
  CounterRng pick(seed, 99);
  for (int t = 0; t < cases; ++t) {
    auto r = [&](uint64_t salt, uint64_t n) { return pick.below(static_cast<uint64_t>(t) * 16 + salt, n); };
    const Index m = 1 + static_cast<Index>(r(0, 70)), n = 1 + static_cast<Index>(r(1, 90));
    const Index k = static_cast<Index>(r(2, 300));  // includes k == 0
    const bool ta = r(3, 2), tb = r(4, 2);
    const T alpha = r(5, 3) == 0 ? T(-1) : T(0.7);
    const T beta = r(6, 3) == 0 ? T(0) : T(1.3);
    const Part part = r(7, 3) == 0 ? Part::Upper : r(7, 3) == 1 ? Part::Lower : Part::All;
    const Index lda = (ta ? m : k) + static_cast<Index>(r(8, 3)), ldb = (tb ? k : n) + static_cast<Index>(r(9, 3));
    const Index ldc = n + static_cast<Index>(r(10, 3));
    const auto A = random_vec<T>(static_cast<size_t>((ta ? k : m) * lda + 1), 2 * t);
    const auto B = random_vec<T>(static_cast<size_t>((tb ? n : k) * ldb + 1), 2 * t + 1);
    const auto C0 = random_vec<T>(static_cast<size_t>(m * ldc), 1000 + t);
    std::vector<T> want = C0;
    reference_gemm<T>(ta, tb, m, n, k, alpha, A.data(), lda, B.data(), ldb, beta, want.data(), ldc, part);
    for (Isa isa : portable::supported_isas()) {
      std::vector<T> got = C0;
      portable::gemm(isa, ta, tb, m, n, k, alpha, A.data(), lda, B.data(), ldb, beta, got.data(), ldc,
                     part);
      ASSERT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(T)), 0)
          << portable::isa_name(isa) << ": m " << m << " n " << n << " k " << k << " ta " << ta
          << " tb " << tb << " alpha " << alpha << " beta " << beta << " part " << int(part);
    }
  }
}

TEST(PortableBlas, EveryVariantOfSgemmEqualsTheContractBitwise) { check_gemm_contract<float>(300, 1); }
TEST(PortableBlas, EveryVariantOfDgemmEqualsTheContractBitwise) { check_gemm_contract<double>(200, 2); }

TEST(PortableBlas, LargeShapesCrossChunkAndPanelBoundaries) {
  // m > the 256-row chunk, n not a multiple of any panel width, k long.
  const Index m = 300, n = 77, k = 1030;
  const auto A = random_vec<float>(static_cast<size_t>(m * k), 5), B = random_vec<float>(static_cast<size_t>(n * k), 6);
  std::vector<float> want(static_cast<size_t>(m * n));
  reference_gemm<float>(false, true, m, n, k, 1.0f, A.data(), k, B.data(), k, 0.0f, want.data(), n, Part::All);
  for (Isa isa : portable::supported_isas()) {
    std::vector<float> got(want.size(), -1.0f);
    portable::gemm(isa, false, true, m, n, k, 1.0f, A.data(), k, B.data(), k, 0.0f, got.data(), n);
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << portable::isa_name(isa);
  }
}

TEST(PortableBlas, BetaZeroDoesNotReadC) {
  const auto A = random_vec<float>(12, 1), B = random_vec<float>(12, 2);
  for (Isa isa : portable::supported_isas()) {
    std::vector<float> C(9, std::numeric_limits<float>::quiet_NaN());
    portable::gemm(isa, false, false, 3, 3, 4, 1.0f, A.data(), 4, B.data(), 3, 0.0f, C.data(), 3);
    for (float c : C) EXPECT_TRUE(std::isfinite(c)) << portable::isa_name(isa);
  }
}

/// A well-conditioned lower-triangular n x n matrix (row-major, ld n).
std::vector<double> lower_matrix(Index n, uint64_t stream) {
  auto L = random_vec<double>(static_cast<size_t>(n * n), stream);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) {
      if (j > i) L[i * n + j] = 0.0;
      if (j == i) L[i * n + j] = 2.0 + std::fabs(L[i * n + j]);
      if (j < i) L[i * n + j] *= 0.1;
    }
  return L;
}

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

TEST(PortableBlas, TriangularRoutinesMatchDoubleReferencesAndAgreeAcrossVariants) {
  const Index m = 150, n = 140;  // more than two 64-wide blocks, ragged
  const auto L = lower_matrix(n, 11), Lm = lower_matrix(m, 12);
  const auto B0 = random_vec<double>(static_cast<size_t>(m * n), 13);
  const Eigen::Map<const MatD> Le(L.data(), n, n), Lme(Lm.data(), m, m), Be(B0.data(), m, n);
  const MatD want_right = Le.triangularView<Eigen::Lower>().solve(Be.transpose()).transpose();  // B L⁻ᵀ
  const MatD want_left = Lme.triangularView<Eigen::Lower>().solve(Be);                          // L⁻¹ B
  std::vector<double> first_right, first_left;
  for (Isa isa : portable::supported_isas()) {
    std::vector<double> R = B0, Lf = B0;
    portable::trsm_right_lower_trans(isa, m, n, L.data(), n, R.data(), n);
    portable::trsm_left_lower(isa, m, n, Lm.data(), m, Lf.data(), n);
    EXPECT_LT((Eigen::Map<const MatD>(R.data(), m, n) - want_right).cwiseAbs().maxCoeff(), 1e-12);
    EXPECT_LT((Eigen::Map<const MatD>(Lf.data(), m, n) - want_left).cwiseAbs().maxCoeff(), 1e-12);
    if (first_right.empty()) {
      first_right = R;
      first_left = Lf;
    }
    EXPECT_EQ(R, first_right) << portable::isa_name(isa);
    EXPECT_EQ(Lf, first_left) << portable::isa_name(isa);
  }
}

TEST(PortableBlas, TrmmAndCholeskyMatchReferencesAndAgreeAcrossVariants) {
  const Index m = 90, n = 150;
  auto Uf = random_vec<float>(static_cast<size_t>(n * n), 21);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < i; ++j) Uf[i * n + j] = 123.0f;  // never read
  const auto B0 = random_vec<float>(static_cast<size_t>(m * n), 22);
  Eigen::MatrixXd U = Eigen::Map<const Eigen::Matrix<float, -1, -1, Eigen::RowMajor>>(Uf.data(), n, n).cast<double>();
  U.triangularView<Eigen::StrictlyLower>().setZero();
  const Eigen::MatrixXd want =
      Eigen::Map<const Eigen::Matrix<float, -1, -1, Eigen::RowMajor>>(B0.data(), m, n).cast<double>() * U;
  // SPD A = G Gᵀ + n I; its strict upper triangle is poisoned (never read or written).
  const auto G = random_vec<double>(static_cast<size_t>(n * n), 23);
  const Eigen::Map<const MatD> Ge(G.data(), n, n);
  MatD A = Ge * Ge.transpose() + static_cast<double>(n) * MatD::Identity(n, n);
  const MatD want_l = A.llt().matrixL();
  for (Index i = 0; i < n; ++i)
    for (Index j = i + 1; j < n; ++j) A(i, j) = -7.0;
  std::vector<float> first_b;
  MatD first_l;
  for (Isa isa : portable::supported_isas()) {
    std::vector<float> Bm = B0;
    portable::trmm_right_upper(isa, m, n, Uf.data(), n, Bm.data(), n);
    const Eigen::MatrixXd got =
        Eigen::Map<const Eigen::Matrix<float, -1, -1, Eigen::RowMajor>>(Bm.data(), m, n).cast<double>();
    EXPECT_LT((got - want).cwiseAbs().maxCoeff() / want.cwiseAbs().maxCoeff(), 1e-5) << portable::isa_name(isa);
    MatD Ac = A;
    ASSERT_EQ(portable::potrf_lower(isa, n, Ac.data(), n), 0);
    for (Index i = 0; i < n; ++i)
      for (Index j = i + 1; j < n; ++j) ASSERT_EQ(Ac(i, j), -7.0) << "strict upper triangle touched";
    const MatD Lgot = Ac.triangularView<Eigen::Lower>();
    EXPECT_LT((Lgot - want_l).cwiseAbs().maxCoeff(), 1e-10);
    if (first_b.empty()) {
      first_b = Bm;
      first_l = Lgot;
    }
    EXPECT_EQ(Bm, first_b) << portable::isa_name(isa);
    EXPECT_EQ(Lgot, first_l) << portable::isa_name(isa);
  }
  // Not positive definite: the column of the first bad pivot, 1-based.
  MatD bad = MatD::Identity(n, n);
  bad(70, 70) = -1.0;
  EXPECT_EQ(portable::potrf_lower(portable::Isa::Baseline, n, bad.data(), n), 71);
}

TEST(Linalg, ModeScopeSelectsTheKernelsAndBothModesAgreeToRounding) {
  const Matrix X = Eigen::Map<const Matrix>(random_vec<float>(300 * 200, 31).data(), 300, 200);
  const Matrix W = Eigen::Map<const Matrix>(random_vec<float>(64 * 200, 32).data(), 64, 200);
  EXPECT_EQ(current_numerics(), Numerics::Fast);
  const Matrix fast = matmul_nt(X, W);
  Matrix port;
  {
    NumericsScope scope(Numerics::Portable);
    EXPECT_EQ(current_numerics(), Numerics::Portable);
    port = matmul_nt(X, W);
    // The portable path is the portable gemm, bit for bit.
    Matrix direct(300, 64);
    portable::gemm(portable::active_isa(), false, true, 300, 64, 200, 1.0f, X.data(), 200, W.data(), 200,
                   0.0f, direct.data(), 64);
    EXPECT_EQ(port, direct);
  }
  EXPECT_EQ(current_numerics(), Numerics::Fast);
  EXPECT_LT((fast - port).cwiseAbs().maxCoeff(), 1e-4f);
  EXPECT_EQ(parse_numerics("portable"), Numerics::Portable);
  EXPECT_THROW(parse_numerics("exact"), Error);
}

TEST(NumericEnvironment, NamesTheKernelsCpuAndBuild) {
  const NumericEnvironment e = numeric_environment(Numerics::Portable, 3);
  EXPECT_EQ(e.get("mode"), "portable");
  EXPECT_EQ(e.get("threads"), "3");
  for (const char* key : {"portable_kernels", "blas_config", "blas_kernels", "blas_library",
                          "openblas_coretype_env", "lapack_version", "cpu_model", "cpu_features",
                          "libc", "compiler", "compile_flags", "eigen"})
    EXPECT_FALSE(e.get(key).empty()) << key;
  EXPECT_NE(e.get("blas_config").find("OpenBLAS"), std::string::npos) << e.get("blas_config");
  EXPECT_NE(e.get("compile_flags").find("-ffp-contract=off"), std::string::npos) << e.get("compile_flags");
  EXPECT_NE(e.to_text().find("blas_kernels: "), std::string::npos);
}

}  // namespace
}  // namespace ql
