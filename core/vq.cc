#include "core/vq.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <limits>

#include "core/error.h"
#include "core/linalg.h"
#include "core/parallel.h"
#include "core/rng.h"

namespace ql {
namespace {

/// Rows per statistics chunk: fixed, so the summation order (hence the bits) does not depend
/// on the thread count.
constexpr Index kChunk = 1024;
/// Soft assignments with (d - d_min) / T above this are dropped: e^-30 < 1e-13.
constexpr double kSoftCut = 30.0;
/// The reference's ε on the soft counts of the M-step (training/quantize_key_cache.py).
constexpr double kCountEps = 1e-8;

/// The separable squared distance of row x to codeword (A, B):
///   ‖x − U_A − V_B‖² = ‖x‖² + a_A + b_B + G2_AB,  a_A = ‖U_A‖² − 2<x,U_A>,
///   b_B = ‖V_B‖² − 2<x,V_B>,  G2_AB = 2<U_A,V_B>,
/// so one E² search costs two E x dim products and E² additions instead of E² x dim.
struct Tables {
  const Matrix *U, *V, *G2;
  const Vector *uu, *vv;
  int E;
};

/// a + b + G2 for one row into buf (E x E), and the minimum of each row A of buf.
void distances(const Tables& t, const float* xu, const float* xv, float* buf, float* rowmin) {
  const int E = t.E;
  Eigen::Map<const Eigen::ArrayXf> b0(xv, E);
  Eigen::ArrayXf b = t.vv->array() - 2.0f * b0;
  for (int A = 0; A < E; ++A) {
    Eigen::Map<Eigen::ArrayXf> row(buf + static_cast<Index>(A) * E, E);
    row = b + Eigen::Map<const Eigen::ArrayXf>(t.G2->data() + static_cast<Index>(A) * E, E);
    const float a = (*t.uu)(A) - 2.0f * xu[A];
    row += a;
    rowmin[A] = row.minCoeff();
  }
}

/// The first (lexicographic) minimum of buf.
int argmin(const float* buf, const float* rowmin, int E) {
  int A = 0;
  for (int k = 1; k < E; ++k)
    if (rowmin[k] < rowmin[A]) A = k;
  const float* row = buf + static_cast<Index>(A) * E;
  int B = 0;
  for (int k = 1; k < E; ++k)
    if (row[k] < row[B]) B = k;
  return A * E + B;
}

/// Per-chunk E-step statistics: soft counts N (E x E), the marginal-weighted sums
/// RX = Σ_t r_t xᵀ_t, CX = Σ_t c_t xᵀ_t (r_t, c_t = the soft assignment's marginals over A
/// and B), and the weighted hard-assignment squared error.
struct EStats {
  MatrixD N, RX, CX;
  double loss = 0;
};

/// Product of rows [r0, r0+m) of X with the sub-tables: XU, XV (m x E), one thread.
void project(const Matrix& X, Index r0, Index m, const Tables& t, Matrix& XU, Matrix& XV) {
  XU.resize(m, t.E);
  XV.resize(m, t.E);
  const Index d = X.cols();
  gemm(Trans::No, Trans::Yes, m, t.E, d, 1.0f, X.data() + r0 * d, d, t.U->data(), d, 0.0f, XU.data(), t.E);
  gemm(Trans::No, Trans::Yes, m, t.E, d, 1.0f, X.data() + r0 * d, d, t.V->data(), d, 0.0f, XV.data(), t.E);
}

void estep_chunk(const Matrix& X, const Vector& w, Index r0, Index m, const Tables& t, double T, bool soft,
                 EStats& s) {
  const int E = t.E;
  const Index d = X.cols();
  Matrix XU, XV;
  project(X, r0, m, t, XU, XV);
  std::vector<float> buf(static_cast<size_t>(E) * E), rowmin(E);
  Matrix R = Matrix::Zero(m, E), C = Matrix::Zero(m, E);
  s.N = MatrixD::Zero(E, E);
  std::vector<std::pair<int, double>> cand;
  for (Index i = 0; i < m; ++i) {
    const Index r = r0 + i;
    distances(t, XU.data() + i * E, XV.data() + i * E, buf.data(), rowmin.data());
    const int best = argmin(buf.data(), rowmin.data(), E);
    const double x2 = X.row(r).squaredNorm();
    const double d2min = std::max(0.0, x2 + buf[best]);
    s.loss += (w.size() ? w(r) : 1.0) * d2min;
    if (!soft) continue;
    const double dmin = std::sqrt(d2min), lim = dmin + kSoftCut * T;
    const float lim2 = static_cast<float>(lim * lim - x2);
    cand.clear();
    double z = 0;
    for (int A = 0; A < E; ++A) {
      if (rowmin[A] > lim2) continue;
      const float* row = buf.data() + static_cast<Index>(A) * E;
      for (int B = 0; B < E; ++B) {
        if (row[B] > lim2) continue;
        const double p = std::exp(-(std::sqrt(std::max(0.0, x2 + row[B])) - dmin) / T);
        cand.push_back({A * E + B, p});
        z += p;
      }
    }
    for (auto [ab, p] : cand) {
      const double q = p / z;
      s.N(ab / E, ab % E) += q;
      R(i, ab / E) += static_cast<float>(q);
      C(i, ab % E) += static_cast<float>(q);
    }
  }
  if (!soft) return;
  Matrix RX(E, d), CX(E, d);
  gemm(Trans::Yes, Trans::No, E, d, m, 1.0f, R.data(), E, X.data() + r0 * d, d, 0.0f, RX.data(), d);
  gemm(Trans::Yes, Trans::No, E, d, m, 1.0f, C.data(), E, X.data() + r0 * d, d, 0.0f, CX.data(), d);
  s.RX = RX.cast<double>();
  s.CX = CX.cast<double>();
}

/// E-step over all rows: statistics summed in chunk order; returns the weighted hard MSE per
/// element.
double estep(const Matrix& X, const Vector& w, const Tables& t, double T, bool soft, EStats& total) {
  const Index n = X.rows();
  const long chunks = static_cast<long>((n + kChunk - 1) / kChunk);
  std::vector<EStats> part(static_cast<size_t>(chunks));
  ParallelErrors errs;
#pragma omp parallel for schedule(static)
  for (long c = 0; c < chunks; ++c)
    errs.run(c, [&] {
      const Index r0 = c * kChunk;
      estep_chunk(X, w, r0, std::min(kChunk, n - r0), t, T, soft, part[static_cast<size_t>(c)]);
    });
  errs.rethrow();
  total = std::move(part[0]);
  for (long c = 1; c < chunks; ++c) {
    const EStats& p = part[static_cast<size_t>(c)];
    total.loss += p.loss;
    if (!soft) continue;
    total.N += p.N;
    total.RX += p.RX;
    total.CX += p.CX;
  }
  const double wsum = w.size() ? w.cast<double>().sum() : static_cast<double>(n);
  return total.loss / (std::max(wsum, 1e-300) * static_cast<double>(X.cols()));
}

/// M-step of the commutative form: V_B = i·U_B per pair, entry 0 pinned to zero. The normal
/// equations over u_1..u_{E-1} (complex, one right-hand side per pair j):
///   (Σ_B N_kB + Σ_A N_Ak) u_k + i Σ_l (N_kl − N_lk) u_l = rx_k − i cx_k,
/// a Hermitian positive definite system shared by all pairs (the reference's (TᵀNT)⁻¹TᵀN m).
void mstep_commutative(const EStats& s, Matrix& U, Matrix& V) {
  const int E = static_cast<int>(s.N.rows()), P = static_cast<int>(U.cols() / 2);
  const MatrixD N = s.N.array() + kCountEps;
  Eigen::MatrixXcd M(E - 1, E - 1);
  Eigen::MatrixXcd rhs(E - 1, P);
  for (int k = 1; k < E; ++k) {
    for (int l = 1; l < E; ++l)
      M(k - 1, l - 1) = k == l ? std::complex<double>(N.row(k).sum() + N.col(k).sum(), 0.0)
                               : std::complex<double>(0.0, N(k, l) - N(l, k));
    for (int j = 0; j < P; ++j)
      rhs(k - 1, j) = {s.RX(k, 2 * j) + s.CX(k, 2 * j + 1), s.RX(k, 2 * j + 1) - s.CX(k, 2 * j)};
  }
  const Eigen::MatrixXcd u = M.ldlt().solve(rhs);
  U.row(0).setZero();
  V.row(0).setZero();
  for (int k = 1; k < E; ++k)
    for (int j = 0; j < P; ++j) {
      const float re = static_cast<float>(u(k - 1, j).real()), im = static_cast<float>(u(k - 1, j).imag());
      U(k, 2 * j) = re;
      U(k, 2 * j + 1) = im;
      V(k, 2 * j) = -im;  // i·(re + i im)
      V(k, 2 * j + 1) = re;
    }
}

/// M-step of the free form, entry 0 of both tables pinned to zero:
///   [diag(N 1)  N        ] [U]   [RX]
///   [Nᵀ         diag(Nᵀ1)] [V] = [CX]   over entries 1..E-1.
void mstep_free(const EStats& s, Matrix& U, Matrix& V) {
  const int E = static_cast<int>(s.N.rows()), n = E - 1;
  const MatrixD N = s.N.array() + kCountEps;
  MatrixD M = MatrixD::Zero(2 * n, 2 * n), rhs(2 * n, U.cols());
  for (int k = 1; k < E; ++k) {
    M(k - 1, k - 1) = N.row(k).sum();
    M(n + k - 1, n + k - 1) = N.col(k).sum();
    for (int l = 1; l < E; ++l) {
      M(k - 1, n + l - 1) = N(k, l);
      M(n + l - 1, k - 1) = N(k, l);
    }
    rhs.row(k - 1) = s.RX.row(k);
    rhs.row(n + k - 1) = s.CX.row(k);
  }
  const MatrixD sol = M.ldlt().solve(rhs);
  U.row(0).setZero();
  V.row(0).setZero();
  U.bottomRows(n) = sol.topRows(n).cast<float>();
  V.bottomRows(n) = sol.bottomRows(n).cast<float>();
}

/// Codeword (k, k) = data row r_k: U_k = x (1 − i)/2 per pair (so u + i·u = x), or
/// U_k = V_k = x/2; entry 0 stays zero.
void initialise(const Matrix& X, VqStructure st, const CounterRng& rng, uint64_t base, Matrix& U, Matrix& V) {
  const int E = static_cast<int>(U.rows());
  U.row(0).setZero();
  V.row(0).setZero();
  for (int k = 1; k < E; ++k) {
    const auto x = X.row(static_cast<Index>(rng.below(base + static_cast<uint64_t>(k), static_cast<uint64_t>(X.rows()))));
    if (st == VqStructure::Free) {
      U.row(k) = 0.5f * x;
      V.row(k) = 0.5f * x;
      continue;
    }
    for (Index j = 0; j < X.cols() / 2; ++j) {
      const float a = x(2 * j), b = x(2 * j + 1);  // (a + ib)(1 − i)/2
      U(k, 2 * j) = 0.5f * (a + b);
      U(k, 2 * j + 1) = 0.5f * (b - a);
      V(k, 2 * j) = -U(k, 2 * j + 1);
      V(k, 2 * j + 1) = U(k, 2 * j);
    }
  }
}

void check_fit(const Matrix& X, const Vector& w, const VqFitOptions& o) {
  if (X.cols() < 2 || X.cols() % 2 != 0)
    throw ShapeError("vq: vector width " + std::to_string(X.cols()) + " must be even and >= 2");
  if (o.sub_bits < 1 || o.sub_bits > 8) throw ShapeError("vq: sub_bits must be 1..8");
  if (o.stages < 1) throw ShapeError("vq: stages must be >= 1");
  if (o.max_steps < 1) throw ShapeError("vq: max_steps must be >= 1");
  if (!(o.t_start > 0) || !(o.t_end > 0) || o.anneal_every < 1) throw ShapeError("vq: bad temperature schedule");
  if (X.rows() < (Index{1} << o.sub_bits))
    throw ShapeError("vq: " + std::to_string(X.rows()) + " training vectors for " +
                     std::to_string(1 << o.sub_bits) + " entries per sub-table");
  if (w.size() != 0 && w.size() != X.rows()) throw ShapeError("vq: weight length differs from the rows");
  if (!X.allFinite()) throw NumericError("vq: non-finite training vectors");
}

/// Σ_r w_r ‖R_r‖² / (Σ w · dim), in double.
double weighted_mse(const Matrix& R, const Vector& w) {
  double num = 0, den = 0;
  for (Index r = 0; r < R.rows(); ++r) {
    const double wr = w.size() ? w(r) : 1.0;
    num += wr * R.row(r).cast<double>().squaredNorm();
    den += wr;
  }
  return num / (std::max(den, 1e-300) * static_cast<double>(R.cols()));
}

}  // namespace

void ResidualVq::add_stage(Matrix U, Matrix V) {
  G2_.push_back(2.0f * matmul_nt(U, V));
  uu_.push_back(U.rowwise().squaredNorm());
  vv_.push_back(V.rowwise().squaredNorm());
  U_.push_back(std::move(U));
  V_.push_back(std::move(V));
}

ResidualVq ResidualVq::fit(const Matrix& X, const Vector& weight, const VqFitOptions& o,
                           std::vector<VqStageReport>* reports) {
  check_fit(X, weight, o);
  ResidualVq q;
  q.structure_ = o.structure;
  q.sub_bits_ = o.sub_bits;
  q.entries_ = 1 << o.sub_bits;
  q.dim_ = X.cols();
  const int E = q.entries_;
  const CounterRng rng(o.seed, 0x56510000);
  Matrix R = X;  // the residual the next stage fits
  EStats st;
  for (int s = 0; s < o.stages; ++s) {
    // The reference divides the temperature scale by 10 after stage 0 and every 4 stages.
    const double scale = std::pow(10.0, -std::ceil(static_cast<double>(s) / o.anneal_every));
    Matrix U(E, q.dim_), V(E, q.dim_);
    initialise(R, o.structure, rng, static_cast<uint64_t>(s) << 20, U, V);
    Matrix bestU = U, bestV = V;
    double best = std::numeric_limits<double>::infinity();
    VqStageReport rep;
    for (int step = 0; step < o.max_steps; ++step) {
      const double frac = o.max_steps > 1 ? static_cast<double>(step) / (o.max_steps - 1) : 0.0;
      const double T = scale * o.t_start * std::pow(o.t_end / o.t_start, frac);
      const Matrix G2 = 2.0f * matmul_nt(U, V);
      const Vector uu = U.rowwise().squaredNorm(), vv = V.rowwise().squaredNorm();
      const double mse = estep(R, weight, {&U, &V, &G2, &uu, &vv, E}, T, true, st);
      rep.steps = step + 1;
      if (mse < best) {
        best = mse;
        bestU = U;
        bestV = V;
      } else if (mse - best < 1e-5 * best) {
        break;
      }
      if (o.structure == VqStructure::Commutative) mstep_commutative(st, U, V);
      else mstep_free(st, U, V);
      if (!U.allFinite() || !V.allFinite()) throw NumericError("vq: non-finite codebook in EM stage " + std::to_string(s));
    }
    rep.mse_before = weighted_mse(R, weight);
    q.add_stage(std::move(bestU), std::move(bestV));
    std::vector<uint8_t> codes(static_cast<size_t>(R.rows()) * 2);
    q.nearest(s, R, codes.data(), 2);
    for (Index r = 0; r < R.rows(); ++r) R.row(r) -= q.U_[s].row(codes[2 * r]) + q.V_[s].row(codes[2 * r + 1]);
    rep.mse_after = weighted_mse(R, weight);
    if (reports) reports->push_back(rep);
  }
  return q;
}

void ResidualVq::nearest(int s, const Matrix& R, uint8_t* codes, Index code_stride) const {
  const Tables t{&U_[s], &V_[s], &G2_[s], &uu_[s], &vv_[s], entries_};
  const Index n = R.rows();
  const long chunks = static_cast<long>((n + kChunk - 1) / kChunk);
  ParallelErrors errs;
#pragma omp parallel for schedule(static)
  for (long c = 0; c < chunks; ++c)
    errs.run(c, [&] {
      const Index r0 = c * kChunk, m = std::min(kChunk, n - r0);
      Matrix XU, XV;
      project(R, r0, m, t, XU, XV);
      std::vector<float> buf(static_cast<size_t>(entries_) * entries_), rowmin(entries_);
      for (Index i = 0; i < m; ++i) {
        distances(t, XU.data() + i * entries_, XV.data() + i * entries_, buf.data(), rowmin.data());
        const int ab = argmin(buf.data(), rowmin.data(), entries_);
        codes[(r0 + i) * code_stride] = static_cast<uint8_t>(ab / entries_);
        codes[(r0 + i) * code_stride + 1] = static_cast<uint8_t>(ab % entries_);
      }
    });
  errs.rethrow();
}

void ResidualVq::encode(const Matrix& X, uint8_t* codes) const {
  if (X.cols() != dim_) throw ShapeError("vq: encode width " + std::to_string(X.cols()) + ", codebook " + std::to_string(dim_));
  Matrix R = X;
  const Index stride = 2 * stages();
  for (int s = 0; s < stages(); ++s) {
    nearest(s, R, codes + 2 * s, stride);
    for (Index r = 0; r < R.rows(); ++r)
      R.row(r) -= U_[s].row(codes[r * stride + 2 * s]) + V_[s].row(codes[r * stride + 2 * s + 1]);
  }
}

void ResidualVq::decode(const uint8_t* codes, Index rows, Matrix& X) const {
  X = Matrix::Zero(rows, dim_);
  const Index stride = 2 * stages();
  for (Index r = 0; r < rows; ++r)
    for (int s = 0; s < stages(); ++s)
      X.row(r) += U_[s].row(codes[r * stride + 2 * s]) + V_[s].row(codes[r * stride + 2 * s + 1]);
}

}  // namespace ql
