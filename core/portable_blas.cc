#include "core/portable_blas.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"

namespace ql::portable {

namespace {

// ---- gemm: packing + an MR x (NB·L) register tile, instantiated per instruction set ----------
//
// Rows of op(A) are taken in chunks of kChunkRows, packed MR rows at a time (k-major, zero-
// padded); op(B) in panels of NR = NB·L columns, packed k-major (zero-padded). The micro-kernel
// keeps MR x NB vectors of L lanes in registers and, for p = 0 .. k-1 in order, adds the
// products a_ip · b_pj to them: one rounded product and one rounded sum per element and step,
// exactly the contract's sequence. Padding rows/columns are computed but never written.

constexpr Index kChunkRows = 256;

template <class T, int MR, int L, int NB>
__attribute__((always_inline)) inline void gemm_impl(bool ta, bool tb, Index m, Index n, Index k,
                                                     T alpha, const T* A, Index lda, const T* B,
                                                     Index ldb, T beta, T* C, Index ldc, Part part) {
  typedef T vec __attribute__((vector_size(sizeof(T) * L)));
  constexpr Index NR = static_cast<Index>(L) * NB;
  if (m <= 0 || n <= 0) return;
  const Index panels_per_chunk = (kChunkRows + MR - 1) / MR;
  std::vector<T> Ap(static_cast<size_t>(panels_per_chunk * MR * std::max<Index>(k, 1)));
  std::vector<T> Bp(static_cast<size_t>(NR * std::max<Index>(k, 1)));
  for (Index i0 = 0; i0 < m; i0 += kChunkRows) {
    const Index mc = std::min(kChunkRows, m - i0);
    const Index np = (mc + MR - 1) / MR;
    for (Index ip = 0; ip < np; ++ip) {
      T* dst = Ap.data() + ip * MR * k;
      for (Index ii = 0; ii < MR; ++ii) {
        const Index i = i0 + ip * MR + ii;
        if (i >= i0 + mc) {
          for (Index p = 0; p < k; ++p) dst[p * MR + ii] = T(0);
        } else if (ta) {
          for (Index p = 0; p < k; ++p) dst[p * MR + ii] = A[p * lda + i];
        } else {
          const T* a = A + i * lda;
          for (Index p = 0; p < k; ++p) dst[p * MR + ii] = a[p];
        }
      }
    }
    for (Index j0 = 0; j0 < n; j0 += NR) {
      const Index nr = std::min(NR, n - j0);
      if (part == Part::Upper && j0 + nr - 1 < i0) continue;  // every j < every i
      if (part == Part::Lower && j0 > i0 + mc - 1) continue;
      for (Index p = 0; p < k; ++p) {
        T* dst = Bp.data() + p * NR;
        for (Index jj = 0; jj < NR; ++jj) {
          const Index j = j0 + jj;
          dst[jj] = jj >= nr ? T(0) : (tb ? B[j * ldb + p] : B[p * ldb + j]);
        }
      }
      for (Index ip = 0; ip < np; ++ip) {
        const Index r0 = i0 + ip * MR, mr = std::min<Index>(MR, i0 + mc - r0);
        if (part == Part::Upper && j0 + nr - 1 < r0) continue;
        if (part == Part::Lower && j0 > r0 + mr - 1) continue;
        vec acc[MR][NB];
#pragma GCC unroll 16
        for (int ii = 0; ii < MR; ++ii)
#pragma GCC unroll 4
          for (int nb = 0; nb < NB; ++nb) acc[ii][nb] = vec{};
        const T* a = Ap.data() + ip * MR * k;
        const T* b = Bp.data();
        for (Index p = 0; p < k; ++p) {
          vec bv[NB];
#pragma GCC unroll 4
          for (int nb = 0; nb < NB; ++nb) std::memcpy(&bv[nb], b + p * NR + nb * L, sizeof(vec));
#pragma GCC unroll 16
          for (int ii = 0; ii < MR; ++ii) {
            const T ai = a[p * MR + ii];
#pragma GCC unroll 4
            for (int nb = 0; nb < NB; ++nb) acc[ii][nb] = acc[ii][nb] + ai * bv[nb];
          }
        }
        for (Index ii = 0; ii < mr; ++ii) {
          const Index i = r0 + ii;
          T* c = C + i * ldc + j0;
          for (Index jj = 0; jj < nr; ++jj) {
            const Index j = j0 + jj;
            if ((part == Part::Upper && j < i) || (part == Part::Lower && j > i)) continue;
            const T s = acc[ii][jj / L][jj % L];
            c[jj] = beta == T(0) ? alpha * s : alpha * s + beta * c[jj];
          }
        }
      }
    }
  }
}

#define QL_GEMM_ARGS(T)                                                                          \
  bool ta, bool tb, Index m, Index n, Index k, T alpha, const T *A, Index lda, const T *B,      \
      Index ldb, T beta, T *C, Index ldc, Part part
#define QL_GEMM_PASS ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, part

// Tile shapes per instruction set (they change the speed, never the bits): MR x NB vectors of
// accumulators fill most of the vector registers (16 xmm, 16 ymm, 32 zmm).
void sgemm_baseline(QL_GEMM_ARGS(float)) { gemm_impl<float, 4, 4, 2>(QL_GEMM_PASS); }
void dgemm_baseline(QL_GEMM_ARGS(double)) { gemm_impl<double, 4, 2, 2>(QL_GEMM_PASS); }
#if defined(__x86_64__)
__attribute__((target("avx2"))) void sgemm_avx2(QL_GEMM_ARGS(float)) {
  gemm_impl<float, 6, 8, 2>(QL_GEMM_PASS);
}
__attribute__((target("avx2"))) void dgemm_avx2(QL_GEMM_ARGS(double)) {
  gemm_impl<double, 6, 4, 2>(QL_GEMM_PASS);
}
__attribute__((target("avx512f"))) void sgemm_avx512(QL_GEMM_ARGS(float)) {
  gemm_impl<float, 8, 16, 1>(QL_GEMM_PASS);
}
__attribute__((target("avx512f"))) void dgemm_avx512(QL_GEMM_ARGS(double)) {
  gemm_impl<double, 8, 8, 1>(QL_GEMM_PASS);
}
#else  // other architectures: the baseline variant only
void sgemm_avx2(QL_GEMM_ARGS(float)) { throw Error("portable kernels: avx2 is x86-64 only"); }
void dgemm_avx2(QL_GEMM_ARGS(double)) { throw Error("portable kernels: avx2 is x86-64 only"); }
void sgemm_avx512(QL_GEMM_ARGS(float)) { throw Error("portable kernels: avx512 is x86-64 only"); }
void dgemm_avx512(QL_GEMM_ARGS(double)) { throw Error("portable kernels: avx512 is x86-64 only"); }
#endif

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::Baseline: return true;
#if defined(__x86_64__)
    case Isa::Avx2: return __builtin_cpu_supports("avx2");
    case Isa::Avx512: return __builtin_cpu_supports("avx512f");
#else
    default: return false;
#endif
  }
  return false;
}

/// Column / row block of the triangular routines. Fixed: it sets the order of the sums.
constexpr Index kTriBlock = 64;

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Baseline: return "baseline";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "?";
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> v;
  for (Isa isa : {Isa::Baseline, Isa::Avx2, Isa::Avx512})
    if (cpu_has(isa)) v.push_back(isa);
  return v;
}

Isa active_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("QL_PORTABLE_KERNELS");
    if (!env || !*env) return supported_isas().back();
    for (Isa i : {Isa::Baseline, Isa::Avx2, Isa::Avx512}) {
      if (std::string(env) != isa_name(i)) continue;
      if (!cpu_has(i))
        throw Error(std::string("QL_PORTABLE_KERNELS=") + env + ": this CPU does not support " +
                    isa_name(i));
      return i;
    }
    throw Error(std::string("QL_PORTABLE_KERNELS=") + env +
                ": expected baseline, avx2 or avx512");
  }();
  return isa;
}

void gemm(Isa isa, QL_GEMM_ARGS(float)) {
  switch (isa) {
    case Isa::Avx512: return sgemm_avx512(QL_GEMM_PASS);
    case Isa::Avx2: return sgemm_avx2(QL_GEMM_PASS);
    case Isa::Baseline: return sgemm_baseline(QL_GEMM_PASS);
  }
}

void gemm(Isa isa, QL_GEMM_ARGS(double)) {
  switch (isa) {
    case Isa::Avx512: return dgemm_avx512(QL_GEMM_PASS);
    case Isa::Avx2: return dgemm_avx2(QL_GEMM_PASS);
    case Isa::Baseline: return dgemm_baseline(QL_GEMM_PASS);
  }
}

void trsm_right_lower_trans(Isa isa, Index m, Index n, const double* L, Index ldl, double* B,
                            Index ldb) {
  // Column blocks left to right: substitution inside the block (x_j = (b_j - Σ_p L_jp x_p) /
  // L_jj), then one gemm removes the block's contribution from the columns to its right.
  for (Index j0 = 0; j0 < n; j0 += kTriBlock) {
    const Index jb = std::min(kTriBlock, n - j0);
    for (Index i = 0; i < m; ++i) {
      double* b = B + i * ldb;
      for (Index j = j0; j < j0 + jb; ++j) {
        const double* l = L + j * ldl;
        double s = b[j];
        for (Index p = j0; p < j; ++p) s -= l[p] * b[p];
        b[j] = s / l[j];
      }
    }
    const Index j1 = j0 + jb;
    if (j1 < n)
      gemm(isa, false, true, m, n - j1, jb, -1.0, B + j0, ldb, L + j1 * ldl + j0, ldl, 1.0,
           B + j1, ldb);
  }
}

void trsm_left_lower(Isa isa, Index m, Index n, const double* L, Index ldl, double* B, Index ldb) {
  // Row blocks top to bottom: row substitution inside the block, then one gemm updates the
  // rows below it.
  for (Index i0 = 0; i0 < m; i0 += kTriBlock) {
    const Index ib = std::min(kTriBlock, m - i0);
    for (Index i = i0; i < i0 + ib; ++i) {
      double* b = B + i * ldb;
      const double* l = L + i * ldl;
      for (Index p = i0; p < i; ++p) {
        const double lp = l[p];
        const double* bp = B + p * ldb;
        for (Index j = 0; j < n; ++j) b[j] -= lp * bp[j];
      }
      const double d = l[i];
      for (Index j = 0; j < n; ++j) b[j] /= d;
    }
    const Index i1 = i0 + ib;
    if (i1 < m)
      gemm(isa, false, false, m - i1, n, ib, -1.0, L + i1 * ldl + i0, ldl, B + i0 * ldb, ldb, 1.0,
           B + i1 * ldb, ldb);
  }
}

void trmm_right_upper(Isa isa, Index m, Index n, const float* U, Index ldu, float* B, Index ldb) {
  // (B U)[:, J] = B[:, J] U[J, J] + B[:, :j0] U[:j0, J] for column block J = [j0, j0+jb):
  // blocks right to left, so B[:, :j0] still holds the input when block J is finished.
  if (n <= 0) return;
  for (Index j0 = ((n - 1) / kTriBlock) * kTriBlock; j0 >= 0; j0 -= kTriBlock) {
    const Index jb = std::min(kTriBlock, n - j0);
    for (Index i = 0; i < m; ++i) {
      float* b = B + i * ldb;
      for (Index j = j0 + jb - 1; j >= j0; --j) {
        float s = 0.0f;
        for (Index p = j0; p <= j; ++p) s += b[p] * U[p * ldu + j];
        b[j] = s;
      }
    }
    if (j0 > 0) gemm(isa, false, false, m, jb, j0, 1.0f, B, ldb, U + j0, ldu, 1.0f, B + j0, ldb);
  }
}

int potrf_lower(Isa isa, Index n, double* A, Index lda) {
  // Right-looking blocked Cholesky: factor the diagonal block (its entries already carry the
  // updates of the blocks before it), solve the panel below it, update the trailing lower
  // triangle with one gemm.
  for (Index k0 = 0; k0 < n; k0 += kTriBlock) {
    const Index kb = std::min(kTriBlock, n - k0);
    for (Index j = k0; j < k0 + kb; ++j) {
      const double* lj = A + j * lda;
      double d = lj[j];
      for (Index p = k0; p < j; ++p) d -= lj[p] * lj[p];
      if (!(d > 0.0) || !std::isfinite(d)) return static_cast<int>(j + 1);
      const double ljj = std::sqrt(d);
      A[j * lda + j] = ljj;
      for (Index i = j + 1; i < k0 + kb; ++i) {
        double* li = A + i * lda;
        double s = li[j];
        for (Index p = k0; p < j; ++p) s -= li[p] * lj[p];
        li[j] = s / ljj;
      }
    }
    const Index r0 = k0 + kb;
    if (r0 >= n) break;
    trsm_right_lower_trans(isa, n - r0, kb, A + k0 * lda + k0, lda, A + r0 * lda + k0, lda);
    gemm(isa, false, true, n - r0, n - r0, kb, -1.0, A + r0 * lda + k0, lda, A + r0 * lda + k0, lda,
         1.0, A + r0 * lda + r0, lda, Part::Lower);
  }
  return 0;
}

}  // namespace ql::portable
